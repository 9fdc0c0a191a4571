"""The tool loop: model call → function calls → results back, until an answer or the step cap.

A turn and the background consolidation both run it. What differs between them
is passed in: which tools, where the messages are kept (recall, or a list), the
step cap, and whether the last step must answer in plain text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from . import recall, tools
from .llm import ChatResult, ToolCall

# sent with the next request only: an engine instruction is never stored, so it can reach neither
# a later prompt nor the summary, nor be taken for something a person said
EMPTY_ANSWER = "Your answer was empty. Reply to the user with send_message."
EMPTY_LAST_ANSWER = "Your answer was empty. Answer the user now in plain text."
# a third identical call in one turn ends it
REPEATS_BEFORE_STOP = 2


class Ending(Enum):
    REPLY = "reply"  # send_message
    TEXT = "text"  # plain text without function calls
    TEXT_AT_LIMIT = "text_at_limit"  # plain text on the last step, which had no tools
    EMPTY = "empty"  # no text and no calls, and the host does not ask again
    LOOP = "loop"  # the same call kept repeating
    STEP_LIMIT = "step_limit"  # the steps ran out without an answer


@dataclass
class End:
    how: Ending
    text: str = ""  # the reply or the plain answer
    steps: int = 0
    edits: list[str] = field(default_factory=list)  # "name: result" of each call that changed memory


class Host(Protocol):
    async def ask(self, schemas: list[dict[str, Any]] | None, note: str | None) -> ChatResult:
        """One model call; `note` is a transient instruction to add after the messages."""

    async def keep(self, messages: list[recall.Message]) -> None:
        """Where this loop's messages go (the turn: recall; consolidation: its own list)."""

    async def execute(self, call: ToolCall, available: dict[str, tools.Tool]) -> tools.Outcome:
        """Run one call."""


@dataclass
class Loop:
    host: Host
    tools: dict[str, tools.Tool]
    max_steps: int
    max_calls_per_answer: int
    # a turn must end with words for the person: its last step has no tools, and an empty answer is asked again
    must_answer: bool = False

    async def run(self) -> End:
        schemas = [t.schema for t in self.tools.values()]
        seen: dict[tuple[str, str], int] = {}
        edits: list[str] = []
        note: str | None = None
        for step in range(1, self.max_steps + 1):
            last = self.must_answer and step == self.max_steps and self.max_steps > 1
            if last:
                await self.host.keep([event(f"Step limit reached ({self.max_steps} steps). Answer the user now in plain text.")])
                note = EMPTY_LAST_ANSWER if note else None
            answer = await self.host.ask(None if last else schemas, note)
            note = None
            if not answer.tool_calls:
                text = answer.content.strip()
                if text:
                    await self.host.keep([recall.Message(role="assistant", content=text)])
                    return End(Ending.TEXT_AT_LIMIT if last else Ending.TEXT, text, step, edits)
                if not self.must_answer:
                    return End(Ending.EMPTY, "", step, edits)
                note = EMPTY_ANSWER
                continue
            replies, looping = await self._execute(answer, seen, edits)
            if replies:
                return End(Ending.REPLY, "\n\n".join(replies), step, edits)
            if looping:
                await self.host.keep([event("The turn was stopped: the same function call kept repeating.")])
                return End(Ending.LOOP, "", step, edits)
        return End(Ending.STEP_LIMIT, "", self.max_steps, edits)

    async def _execute(self, answer: ChatResult, seen: dict[tuple[str, str], int], edits: list[str]) -> tuple[list[str], bool]:
        """Run an answer's calls and keep them with their results; every call kept gets a result.

        Calls past the cap are neither run nor kept: a thousand 19 KB calls in one answer would
        otherwise be stored whole, and re-read and re-sent with every later prompt.
        """
        calls, dropped = answer.tool_calls[: self.max_calls_per_answer], len(answer.tool_calls) - self.max_calls_per_answer
        stored = [recall.Message(role="assistant", content=answer.content.strip(), tool_calls=[c.as_openai() for c in calls])]
        replies: list[str] = []
        looping = False
        for call in calls:
            signature = (call.name, _normalized(call.arguments))
            seen[signature] = seen.get(signature, 0) + 1
            if seen[signature] > 1 and call.name != "send_message":
                looping = looping or seen[signature] > REPEATS_BEFORE_STOP
                outcome = tools.refused(
                    f"Error: you already called {call.name} with these arguments in this turn; its result is above. "
                    "Do not repeat it: answer the user with send_message."
                )
            else:
                outcome = await self.host.execute(call, self.tools)
            if outcome.reply:
                replies.append(outcome.reply)
            tool = self.tools.get(call.name)
            if outcome.ok and tool is not None and tool.edits_memory:
                edits.append(f"{call.name}: {outcome.text}")
            stored.append(recall.Message(role="tool", content=outcome.text, tool_call_id=call.id))
        if dropped > 0:
            stored.append(
                event(
                    f"{dropped} more function calls in that answer were not run: at most {self.max_calls_per_answer} "
                    "are carried out per answer. Make the ones still needed in your next answer."
                )
            )
        await self.host.keep(stored)
        return replies, looping


def event(text: str) -> recall.Message:
    return recall.Message(role="system", content=text)


def _normalized(arguments: str) -> str:
    try:
        return json.dumps(tools.parse_arguments(arguments), sort_keys=True)
    except tools.BadArguments:
        return arguments.strip()
