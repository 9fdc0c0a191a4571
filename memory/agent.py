"""One turn of an agent: steps of model call → function calls → results until a reply.

The steps are the tool loop (memory/loop.py) with the turn as its host. The
user's messages are in recall before the model is called: the engine stores
each one as it arrives, and the turn's first transaction moves the waiting
ones into the context window. Each step's assistant message and its function
results are stored in one transaction, so a crash never leaves a call without
its result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from . import context, images, recall, replies, serving, tools
from .agents import Agent
from .archival import Archive
from .config import EngineSettings
from .db import Database, sqlite3
from .llm import (
    ChatResult,
    ContextOverflowError,
    ImagesUnsupportedError,
    LLMClient,
    LLMError,
    ToolCall,
    ToolsUnsupportedError,
    TooSlowError,
)
from .loop import Ending, Loop

log = logging.getLogger(__name__)

APOLOGY = "Sorry, I can't reach my language model right now. Your message is saved; please try again in a moment."
TOO_LARGE = (
    "Sorry, this conversation no longer fits my language model's context window, so I could not answer. "
    "Your message is saved; the operator has been told how to fix it."
)
TOO_SLOW = "Sorry, my language model took too long to answer. Your message is saved; please try again in a moment."
CUT = "\n[… cut: the answer reached the model's output limit]"
STUCK = "Sorry, I got stuck working on that and stopped. Could you rephrase or ask again?"
# after eviction the prompt should be at most this share of the flush line
COMPACT_TO = 0.6
# when the provider says the prompt overflowed: compact to this share of the window...
OVERFLOW_TARGET = 0.4
# ...and trust our estimate at least this much less from then on
OVERFLOW_SCALE = 1.25


# how to give a server native tools (DESIGN.md §8)
TOOL_FIX = (
    "to use native tools, start llama-server with --jinja, vLLM with --enable-auto-tool-choice --tool-call-parser NAME, "
    "or pick an Ollama model whose template supports tools"
)


class TurnOutcome(StrEnum):
    REPLY = "reply"
    STEP_LIMIT = "step_limit"
    LOOP = "loop"
    ERROR = "error"  # the model call failed
    OVERFLOW = "overflow"  # the request does not fit the model's window even after compaction
    MERGED = "merged"  # a later message's turn answered this one too
    NOTHING = "nothing"  # no message was waiting after all (its store failed): no model call


@dataclass
class TurnResult:
    reply: str | None
    outcome: TurnOutcome
    steps: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    model_calls: int = 0
    model_seconds: float = 0.0
    engine_seconds: float = 0.0
    # before the turn began: waiting behind other turns for the model (Engine.TURNS_PER_CALL_SLOT);
    # for a scheduled event, also while it was due and the engine had no room (Engine.room)
    queued_seconds: float = 0.0
    error: str = ""
    evicted: list[recall.Message] = field(default_factory=list)
    admitted_through: int = 0  # the newest waiting message this turn took in
    request_tokens: list[int] = field(default_factory=list)
    # the whole reply when `reply` was cut at MAX_REPLY_CHARS (the bot may attach it as a file)
    full_reply: str | None = None
    thinking: str = ""  # the model's private reasoning this turn: never in the reply unless the operator asks


@dataclass
class Turn:
    db: Database
    llm: LLMClient
    archive: Archive
    settings: EngineSettings
    agent: Agent
    # the provider's count / our estimate for this model, shared by every turn that calls it
    token_scale: context.TokenScale = field(default_factory=context.TokenScale)
    # what the engine learned about the server (tool mode, window, truncation), shared likewise
    model: serving.ModelState = field(default_factory=serving.ModelState)
    # messages that came with images, and their images: sent with the turn's first request only. The
    # mailbox's own list, so a message arriving while the turn waits to begin is in it; its id is
    # known once it is stored, which is before the turn reads its prompt (Engine._arrive)
    images: list[tuple[recall.Message, list[images.Image]]] = field(default_factory=list)
    # who is shown the reply while it is written (memory/streaming.py), asked once the turn has taken in
    # its messages, with the newest one's id: the caller whose message carries the reply, if it watches
    listen: Callable[[int], Callable[[str], None] | None] | None = None
    # that caller's callback: each call gets the text so far
    on_text: Callable[[str], None] | None = field(default=None, init=False)
    # (tokens in, tokens out, model calls) of this turn already added to the agent's row
    _recorded: tuple[int, int, int] = field(default=(0, 0, 0), init=False)
    _result: TurnResult = field(init=False)
    # the newest waiting message this turn took in, known even if the turn fails after its first transaction
    admitted_through: int = field(default=0, init=False)
    _first: context.Prompt | None = field(default=None, init=False)

    async def run(self) -> TurnResult:
        started = time.perf_counter()
        result = self._result = TurnResult(reply=None, outcome=TurnOutcome.REPLY)
        budget = self.settings.context_window // 4

        def start(c: sqlite3.Connection) -> tuple[tuple[int, int], context.Snapshot]:
            # admitting the waiting messages and reading the first prompt: one transaction,
            # which costs less CPU than a read and a write apart
            return recall.admit_waiting(c, self.agent, budget), context.read(c, self.agent)

        (filed, result.admitted_through), snapshot = await self.db.transact(start, quick=True)
        self.admitted_through = result.admitted_through
        if not result.admitted_through:
            result.outcome = TurnOutcome.NOTHING
            return result
        if self.listen is not None:
            self.on_text = self.listen(self.admitted_through)
        if filed:
            await self._event(
                result,
                f"{filed} older messages arrived since your last turn and went straight to recall memory "
                "without being shown here; conversation_search finds them.",
            )
        # with the event in the context the first prompt is read again
        first = None if filed else context.assemble(snapshot, self.settings.context_window)
        try:
            await self._steps(result, first)
        except ContextOverflowError as exc:
            result.model_seconds += exc.seconds
            s = self.settings
            log.error(
                "%s: the request is larger than the model's context window even after compacting (%s). "
                "CONTEXT_WINDOW is %d: raise the context size on the model server (e.g. Ollama's num_ctx) "
                "or lower CONTEXT_WINDOW here to what the server really gives the model.",
                self.agent.key,
                exc,
                s.context_window,
            )
            result.outcome, result.error, result.reply = TurnOutcome.OVERFLOW, str(exc), TOO_LARGE
            await self._event(result, f"The request was too large for the model's context window: {exc.brief}")
        except LLMError as exc:
            result.model_seconds += exc.seconds  # retries that failed are model time, not the engine's
            log.warning("%s: model call failed: %s", self.agent.key, exc)
            result.outcome, result.error = TurnOutcome.ERROR, str(exc)
            result.reply = TOO_SLOW if isinstance(exc, TooSlowError) else APOLOGY
            await self._event(result, f"The model call failed: {exc.brief}")
        await self._append(result, [])  # the usage, if the turn's last messages did not carry it
        result.engine_seconds = time.perf_counter() - started - result.model_seconds
        return result

    async def _steps(self, result: TurnResult, first: context.Prompt | None) -> None:
        self._first = first
        s = self.settings
        end = await Loop(self, tools.TOOLS, s.max_steps_per_turn, s.max_tool_calls_per_answer, must_answer=True).run()
        result.steps = end.steps
        if end.thinking:
            result.thinking = "\n\n".join(end.thinking)
            # private thought stays in recall (searchable, shown by `chat -v`), never in the prompt
            thought = recall.Message(role="system", content=f"Private thought: {result.thinking}")
            await recall.append(self.db, self.agent, [thought], state=recall.EVICTED)
        if end.how in (Ending.REPLY, Ending.TEXT, Ending.TEXT_AT_LIMIT):
            self._reply(result, end.text + (CUT if end.cut else ""))
            if end.how is Ending.TEXT_AT_LIMIT:
                result.outcome = TurnOutcome.STEP_LIMIT
            return
        if end.how is Ending.STEP_LIMIT:
            await self._event(result, f"The turn was stopped after {end.steps} steps without an answer.")
        result.reply, result.outcome = STUCK, TurnOutcome.LOOP if end.how is Ending.LOOP else TurnOutcome.STEP_LIMIT

    def _reply(self, result: TurnResult, text: str) -> None:
        """A reply for the person, cut at MAX_REPLY_CHARS; the whole text stays on the result."""
        limit = self.settings.max_reply_chars
        if len(text) <= limit:
            result.reply = text
            return
        result.full_reply = text
        result.reply = text[:limit] + f"\n[… cut: the reply has {len(text)} characters]"

    # the loop's host: what a turn's steps ask, keep and run
    async def ask(self, schemas: list[dict[str, Any]] | None, note: str | None) -> ChatResult:
        first, self._first = self._first, None
        prompt = await self._prompt(self._result, first)
        try:
            answer = await self._call(prompt, self._result, schemas, note)
        except ToolsUnsupportedError as exc:
            if self.settings.tool_mode != "auto":
                raise LLMError(f"{exc}. The server refuses native tools: {TOOL_FIX} or set TOOL_MODE=text.") from None
            self.model.text_tools = True
            if self.model.once("text_tools"):
                log.warning("the model server refuses native tools (%s); using text tool mode from now on. %s.", exc, TOOL_FIX)
            answer = await self._call(prompt, self._result, schemas, note)
        self.images = []  # seen once: later steps and turns have the stand-ins in recall
        return answer

    async def keep(self, messages: list[recall.Message]) -> None:
        for m in messages:
            if m.role == "assistant" and self.model.answered(bool(m.tool_calls)):
                log.warning(
                    "the model has answered %d times without calling a function: it saves no memory. The server may "
                    "be ignoring tools (llama.cpp: start llama-server with --jinja; vLLM: --enable-auto-tool-choice "
                    "--tool-call-parser; Ollama: a model whose template has tools), or set TOOL_MODE=text. "
                    "`mnemocord doctor` checks it.",
                    serving.NEVER_CALLED_AFTER,
                )
        await self._append(self._result, messages)

    async def execute(self, call: ToolCall, available: dict[str, tools.Tool]) -> tools.Outcome:
        return await tools.execute(self.db, self.archive, self.agent, call.name, call.arguments, available)

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
        """The estimate, corrected by what the provider reported for this model."""
        return replace(prompt, tokens=self.token_scale.apply(prompt.estimate))

    async def _chat(self, messages: list[dict[str, Any]], schemas: list[dict[str, Any]] | None) -> ChatResult:
        """One request, in the tool mode in force: native `tools`, or the tools described in the prompt."""
        s = self.settings
        if (s.vision == "off" or self.model.no_vision) and images.carries_images(messages):
            messages = images.without_images(messages)
        if self.model.text_tools or s.tool_mode == "text":
            messages = replies.as_text_mode(messages, schemas)
            schemas = None
        on_text = self._show if self.on_text is not None and s.stream_replies else None
        try:
            return await self.llm.chat(
                s.llm_model,
                messages,
                schemas,
                max_tokens=s.llm_max_tokens,
                on_text=on_text,
                shown_chars=s.max_reply_chars,
                shown_calls=s.max_tool_calls_per_answer,
            )
        except ImagesUnsupportedError as exc:
            # the person still gets an answer: the model is told in words that an image came
            self._result.model_seconds += exc.seconds
            if s.vision == "auto":
                self.model.no_vision = True
                if self.model.once("no_vision"):
                    log.warning("the model server refuses images (%s); describing them in words from now on", exc)
            else:
                log.warning("the model server refused images (%s); sent without them. Set VISION=auto or off", exc)
        except LLMError as exc:
            refused = exc.status is not None and 400 <= exc.status < 500 and exc.status != 429
            if not refused or isinstance(exc, ToolsUnsupportedError) or not images.carries_images(messages):
                raise
            # refused for their number or size, not for being images: this once without them, nothing learned
            self._result.model_seconds += exc.seconds
            log.warning("the model server refused a request with images (%s); sent again without them", exc)
        return await self.llm.chat(
            s.llm_model,
            images.without_images(messages),
            schemas,
            max_tokens=s.llm_max_tokens,
            on_text=on_text,
            shown_chars=s.max_reply_chars,
            shown_calls=s.max_tool_calls_per_answer,
        )

    def _request(self, prompt: context.Prompt, note: str | None) -> list[dict[str, Any]]:
        """The prompt's messages to send, with the images of the messages that came with them."""
        messages = prompt.messages
        if self.images:
            first = len(messages) - len(prompt.history)  # the system prompt comes before the history
            found = {m.id: shown for m, shown in self.images if m.id}
            parts = {first + i: [image.part() for image in found[m.id]] for i, m in enumerate(prompt.history) if m.id in found}
            messages = images.attach(messages, parts)
        return _with_note(messages, note)

    def _show(self, text: str) -> None:
        """A snapshot of the reply being written, as long as the reply may be (the final one is cut with a note)."""
        if text and self.on_text is not None:
            self.on_text(text[: self.settings.max_reply_chars])

    async def _call(
        self, prompt: context.Prompt, result: TurnResult, schemas: list[dict[str, Any]] | None, note: str | None
    ) -> ChatResult:
        try:
            answer = await self._chat(self._request(prompt, note), schemas)
        except ContextOverflowError as exc:
            # our estimate was low for this model: compact hard, then one retry
            log.warning("%s: provider says the context overflowed (%s); compacting", self.agent.key, exc)
            if exc.limit and exc.limit < self.settings.context_window:
                # the server said its real window: use it from now on instead of overflowing again
                log.warning(
                    "the model server's context window is %d tokens, not %d: using %d",
                    exc.limit,
                    self.settings.context_window,
                    exc.limit,
                )
                self.settings.context_window = exc.limit
                self.model.server_window = exc.limit
            self.token_scale.at_least(OVERFLOW_SCALE)
            eviction = await context.compact(
                self.db, self.llm, self.settings.llm_model, self.agent, prompt, self.settings, target=OVERFLOW_TARGET, force=True
            )
            if eviction is None:
                raise
            result.model_seconds += exc.seconds  # the refused call was model time
            self._count(eviction, result)
            prompt = self._scaled(await context.build(self.db, self.agent, self.settings.context_window))
            answer = await self._chat(self._request(prompt, note), schemas)
        result.request_tokens.append(prompt.tokens)
        result.model_calls += 1
        result.model_seconds += answer.seconds
        if answer.usage:
            result.tokens_in += answer.usage.prompt_tokens
            result.tokens_out += answer.usage.completion_tokens
        # images count as tokens we do not estimate: such a request would teach the scale a wrong correction
        if answer.usage and not self.images:
            self.token_scale.learn(prompt.estimate, answer.usage.prompt_tokens)  # bounded: it never learns a truncation whole
            warning = serving.truncation_warning(prompt.estimate, answer.usage.prompt_tokens)
            if warning is not None:
                self.model.truncation = warning
                if self.model.once("truncation"):
                    log.warning("%s", warning[0].upper() + warning[1:])
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

        def store(c: sqlite3.Connection) -> None:
            recall.insert(c, self.agent, messages)
            add_usage(c)

        recall.prepare(messages)
        if messages or calls:
            await self.db.transact(store, quick=len(messages) <= recall.QUICK_MESSAGES)


def _usage(result: TurnResult) -> tuple[int, int, int]:
    return result.tokens_in, result.tokens_out, result.model_calls


def _with_note(messages: list[dict[str, Any]], note: str | None) -> list[dict[str, Any]]:
    # as a user-role event, like stored system events: mid-conversation system messages break local chat templates
    return messages if note is None else [*messages, {"role": "user", "content": f"[system event] {note}"}]
