"""One turn of an agent: steps of model call → function calls → results until a reply.

The user's messages are in recall before the model is called: the engine
stores each one as it arrives, and the turn's first transaction moves the
waiting ones into the context window. Each step's
assistant message and its function results are stored in one transaction, so
a crash never leaves a call without its result.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from . import context, recall, tools
from .agents import Agent
from .archival import Archive
from .config import EngineSettings
from .db import Database, sqlite3
from .llm import ContextOverflowError, LLMClient, LLMError

log = logging.getLogger(__name__)

APOLOGY = "Sorry, I can't reach my language model right now. Your message is saved; please try again in a moment."
STUCK = "Sorry, I got stuck working on that and stopped. Could you rephrase or ask again?"
# after eviction the prompt should be at most this share of the flush line
COMPACT_TO = 0.6


@dataclass
class TurnResult:
    reply: str | None
    outcome: str  # reply | step_limit | loop | error | merged
    steps: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    model_calls: int = 0
    model_seconds: float = 0.0
    engine_seconds: float = 0.0
    error: str = ""
    evicted: list[recall.Message] = field(default_factory=list)
    admitted_through: int = 0  # the newest waiting message this turn took in
    request_tokens: list[int] = field(default_factory=list)


@dataclass
class Turn:
    db: Database
    llm: LLMClient
    archive: Archive
    settings: EngineSettings
    agent: Agent
    # provider count / our estimate, when the provider says more than we thought
    token_scale: float = 1.0
    # (tokens in, tokens out, model calls) of this turn already added to the agent's row
    _recorded: tuple[int, int, int] = field(default=(0, 0, 0), init=False)

    async def run(self) -> TurnResult:
        started = time.perf_counter()
        result = TurnResult(reply=None, outcome="reply")
        budget = self.settings.context_window // 4

        def start(c: sqlite3.Connection) -> tuple[tuple[int, int], context.Snapshot]:
            # admitting the waiting messages and reading the first prompt: one trip to the
            # database thread, which costs more CPU than these statements
            return recall.admit_waiting(c, self.agent, budget), context.read(c, self.agent)

        (filed, result.admitted_through), snapshot = await self.db.transact(start)
        if filed:
            await self._event(
                result,
                f"{filed} older messages arrived since your last turn and went straight to recall memory "
                "without being shown here; conversation_search finds them."
            )
        # with the event in the context the first prompt is read again
        first = None if filed else context.assemble(snapshot, self.settings.context_window)
        try:
            await self._steps(result, first)
        except LLMError as exc:
            log.warning("%s: model call failed: %s", self.agent.key, exc)
            result.outcome, result.error, result.reply = "error", str(exc), APOLOGY
            await self._append(result, [recall.Message(role="system", content=f"The model call failed: {exc}")])
        await self._append(result, [])  # the usage, if the turn's last messages did not carry it
        result.engine_seconds = time.perf_counter() - started - result.model_seconds
        return result

    async def _steps(self, result: TurnResult, first: context.Prompt | None) -> None:
        max_steps = self.settings.max_steps_per_turn
        seen: dict[tuple[str, str], int] = {}
        for step in range(1, max_steps + 1):
            last = step == max_steps and max_steps > 1
            if last:
                await self._event(result, f"Step limit reached ({max_steps} steps). Answer the user now in plain text.")
            prompt = await self._prompt(result, first if step == 1 else None)
            answer = await self._call(prompt, result, use_tools=not last)
            result.steps = step
            if not answer.tool_calls:
                text = answer.content.strip()
                if text:
                    await self._append(result, [recall.Message(role="assistant", content=text)])
                    result.reply = text
                    if last:
                        result.outcome = "step_limit"
                    return
                await self._event(result, "Your answer was empty. Reply to the user with send_message.")
                continue
            stored = [recall.Message(role="assistant", content=answer.content.strip(), tool_calls=[c.as_openai() for c in answer.tool_calls])]
            replies: list[str] = []
            looping = False
            for call in answer.tool_calls:
                signature = (call.name, _normalized(call.arguments))
                seen[signature] = seen.get(signature, 0) + 1
                if seen[signature] > 1 and call.name != "send_message":
                    looping = looping or seen[signature] > 2
                    outcome = tools.Outcome(
                        f"Error: you already called {call.name} with these arguments in this turn; its result is above. "
                        "Do not repeat it: answer the user with send_message."
                    )
                else:
                    outcome = await tools.execute(self.db, self.archive, self.agent, call.name, call.arguments)
                if outcome.reply:
                    replies.append(outcome.reply)
                stored.append(recall.Message(role="tool", content=outcome.text, tool_call_id=call.id))
            await self._append(result, stored)
            if replies:
                result.reply = "\n\n".join(replies)
                return
            if looping:
                await self._event(result, "The turn was stopped: the same function call kept repeating.")
                result.reply, result.outcome = STUCK, "loop"
                return
        await self._event(result, f"The turn was stopped after {max_steps} steps without an answer.")
        result.reply, result.outcome = STUCK, "step_limit"

    async def _prompt(self, result: TurnResult, ready: context.Prompt | None) -> context.Prompt:
        """The next request (`ready` if already read), compacted and with a pressure warning if needed."""
        s = self.settings
        prompt = self._scaled(ready if ready is not None else await context.build(self.db, self.agent, s.context_window))
        if prompt.tokens > s.memory_flush_fraction * s.context_window:
            eviction = await context.compact(
                self.db, self.llm, s.llm_model, self.agent, prompt, s, target=s.memory_flush_fraction * COMPACT_TO
            )
            if eviction:
                self._count(eviction, result)
                prompt = self._scaled(await context.build(self.db, self.agent, s.context_window))
        if await context.warn_if_pressured(self.db, self.agent, prompt, s):
            prompt = self._scaled(await context.build(self.db, self.agent, s.context_window))
        return prompt

    def _scaled(self, prompt: context.Prompt) -> context.Prompt:
        """The estimate, corrected by what the provider reported (when it counted more)."""
        prompt.tokens = int(prompt.tokens * self.token_scale)
        return prompt

    async def _call(self, prompt: context.Prompt, result: TurnResult, *, use_tools: bool = True):
        schemas = tools.SCHEMAS if use_tools else None
        try:
            answer = await self.llm.chat(self.settings.llm_model, prompt.messages, schemas)
        except ContextOverflowError as exc:
            # our estimate was low for this model: compact hard, then one retry
            log.warning("%s: provider says the context overflowed (%s); compacting", self.agent.key, exc)
            self.token_scale = max(self.token_scale, 1.25)
            forced = context.Prompt(prompt.messages, prompt.history, max(prompt.tokens, self.settings.context_window + 1))
            eviction = await context.compact(
                self.db, self.llm, self.settings.llm_model, self.agent, forced, self.settings, target=0.4
            )
            if eviction is None:
                raise
            self._count(eviction, result)
            prompt = await context.build(self.db, self.agent, self.settings.context_window)
            answer = await self.llm.chat(self.settings.llm_model, prompt.messages, schemas)
        result.request_tokens.append(prompt.tokens)
        result.model_calls += 1
        result.model_seconds += answer.seconds
        if answer.usage:
            result.tokens_in += answer.usage.prompt_tokens
            result.tokens_out += answer.usage.completion_tokens
            if prompt.tokens:
                self.token_scale = max(1.0, min(3.0, self.token_scale * answer.usage.prompt_tokens / prompt.tokens))
        return answer

    def _count(self, eviction: context.Eviction, result: TurnResult) -> None:
        """The summarizer's calls are model time and model tokens of this turn too."""
        result.evicted.extend(eviction.messages)
        for call in eviction.calls:
            result.model_calls += 1
            result.model_seconds += call.seconds
            if call.usage:
                result.tokens_in += call.usage.prompt_tokens
                result.tokens_out += call.usage.completion_tokens

    async def _event(self, result: TurnResult, text: str) -> None:
        await self._append(result, [recall.Message(role="system", content=text)])

    async def _append(self, result: TurnResult, messages: list[recall.Message]) -> None:
        """Store messages and the usage not written yet in one transaction (a trip to the database
        thread costs more CPU than the statements, bench/bot_load.py)."""
        usage = _usage(result)
        tokens_in, tokens_out, calls = (now - before for now, before in zip(usage, self._recorded))
        self._recorded = usage

        def add_usage(c: sqlite3.Connection) -> None:
            if calls:
                c.execute(
                    "UPDATE agents SET tokens_in = tokens_in + ?, tokens_out = tokens_out + ?, model_calls = model_calls + ? WHERE id = ?",
                    (tokens_in, tokens_out, calls, self.agent.id),
                )

        recall.prepare(messages)
        if messages or calls:
            await self.db.transact(lambda c: (recall.insert(c, self.agent, messages), add_usage(c)))


def _usage(result: TurnResult) -> tuple[int, int, int]:
    return result.tokens_in, result.tokens_out, result.model_calls


def _normalized(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), sort_keys=True)
    except ValueError:
        return arguments.strip()
