"""The tool loop: model call → function calls → results back, until an answer or the step cap.

A turn and the background consolidation both run it. What differs between them
is passed in: which tools, where the messages are kept (recall, or a list), the
step cap, and whether the last step must answer in plain text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from . import recall, replies, tools
from .llm import ChatResult, ToolCall

# sent with the next request only: an engine instruction is never stored, so it can reach neither
# a later prompt nor the summary, nor be taken for something a person said
EMPTY_ANSWER = "Your answer was empty. Reply to the user with send_message."
EMPTY_LAST_ANSWER = "Your answer was empty. Answer the user now in plain text."
MALFORMED_CALL = (
    'Your function call could not be read. Write it exactly as <tool_call>{"name": "NAME", "arguments": {...}}</tool_call> '
    "with valid JSON, or answer the user in plain text."
)
# engine text meant for the model; a model that copies one into its answer must not pass it on to people
_NOTES = (EMPTY_ANSWER, EMPTY_LAST_ANSWER, MALFORMED_CALL)
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
    thinking: list[str] = field(default_factory=list)  # the model's private reasoning, step by step
    cut: bool = False  # the answer stopped at the output limit (finish_reason "length")


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
        thinking: list[str] = []
        note: str | None = None
        for step in range(1, self.max_steps + 1):
            last = self.must_answer and step == self.max_steps and self.max_steps > 1
            if last:
                await self.host.keep([event(f"Step limit reached ({self.max_steps} steps). Answer the user now in plain text.")])
                note = EMPTY_LAST_ANSWER if note else None
            answer = await self.host.ask(None if last else schemas, note)
            note = None
            reading = replies.read(answer.content, self.tools, answer.reasoning)
            if reading.thinking:
                thinking.append(reading.thinking)
            text = _without_notes(reading.text)
            calls = answer.tool_calls
            if not calls and not last:  # a call the server's parser missed is still a call
                calls = [ToolCall(f"call_{uuid.uuid4().hex[:12]}", c.name, c.arguments) for c in reading.calls]
            if not calls:
                if text:
                    await self.host.keep([recall.Message(role="assistant", content=text)])
                    how = Ending.TEXT_AT_LIMIT if last else Ending.TEXT
                    return End(how, text, step, edits, thinking, cut=answer.finish_reason == "length")
                if not self.must_answer:
                    return End(Ending.EMPTY, "", step, edits, thinking)
                note = MALFORMED_CALL if reading.malformed and not last else EMPTY_ANSWER
                continue
            found, looping = await self._execute(text, calls, seen, edits)
            if found:
                return End(Ending.REPLY, "\n\n".join(found), step, edits, thinking)
            if looping:
                await self.host.keep([event("The turn was stopped: the same function call kept repeating.")])
                return End(Ending.LOOP, "", step, edits, thinking)
        return End(Ending.STEP_LIMIT, "", self.max_steps, edits, thinking)

    async def _execute(
        self, text: str, answered: list[ToolCall], seen: dict[tuple[str, str], int], edits: list[str]
    ) -> tuple[list[str], bool]:
        """Run an answer's calls and keep them with their results; every call kept gets a result.

        Only the answer's cleaned text is kept beside the calls: its thinking and call markup never go
        back to the model. Calls past the cap are neither run nor kept: a thousand 19 KB calls in one
        answer would otherwise be stored whole, and re-read and re-sent with every later prompt.
        """
        calls, dropped = answered[: self.max_calls_per_answer], len(answered) - self.max_calls_per_answer
        stored = [recall.Message(role="assistant", content=text, tool_calls=[c.as_openai() for c in calls])]
        found: list[str] = []
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
                reply = _without_notes(replies.read(outcome.reply, self.tools).text)
                if reply:
                    found.append(reply)
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
        return found, looping


def _without_notes(text: str) -> str:
    for note in _NOTES:
        text = text.replace(note, "")
    return text.strip()


def event(text: str) -> recall.Message:
    return recall.Message(role="system", content=text)


def _normalized(arguments: str) -> str:
    try:
        return json.dumps(tools.parse_arguments(arguments), sort_keys=True)
    except tools.BadArguments:
        return arguments.strip()
