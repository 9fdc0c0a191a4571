"""The engine: opens the store and the model client, and runs agents' turns.

One turn at a time per agent: messages that arrive while a turn runs are
persisted at once and answered together by the next turn, in order. A message
for an idle agent is persisted by the first transaction of the turn it starts,
still before the model is called. Different agents run concurrently; the model
client caps calls in flight for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from . import agents, context, core, recall, replies, serving, tools
from .agent import Turn, TurnOutcome, TurnResult
from .agents import Agent
from .api import MemoryAPI
from .archival import Archive
from .config import EngineSettings
from .db import Database
from .embeddings import Embedder
from .llm import ChatResult, LLMClient, LLMError, ToolCall
from .loop import Loop
from .text import valid

log = logging.getLogger(__name__)

CONSOLIDATION_STEPS = 3
# the smallest window the engine works in (CONTEXT_WINDOW's own lower bound)
MIN_WINDOW = 1024
# first pause before embedding again after the endpoint failed; it doubles up to 10 minutes
EMBEDDING_RETRY_SECONDS = 30.0
CONSOLIDATION_INSTRUCTIONS = """\
You maintain the long-term memory of an assistant. The conversation below is leaving its context window.
1. Save what is worth remembering from it with archival_memory_insert: one passage of dated notes (who, what, when).
2. If it taught something lasting about the people, the channel or the assistant, update core memory with core_memory_append or core_memory_replace.
Then answer "done". Do not save small talk.

Current core memory:
{core}"""


@dataclass
class _Mailbox:
    # messages stored and waiting for an answer, with the callers waiting for it
    pending: list[tuple[recall.Message, asyncio.Future[TurnResult]]] = field(default_factory=list)
    worker: asyncio.Task[None] | None = None


class Engine:
    def __init__(self, settings: EngineSettings, db: Database, llm: LLMClient, archive: Archive) -> None:
        self.settings = settings
        self.db = db
        self.llm = llm
        self.archive = archive
        # the provider's correction to our token estimate: one per model, and this engine calls one
        self.token_scale = context.TokenScale()
        # what the engine learned about the model server: tool mode, window, truncation
        self.model = serving.ModelState(text_tools=settings.tool_mode == "text")
        self._mailboxes: dict[str, _Mailbox] = {}
        # agents are never deleted: a key's id never changes
        self._agents: dict[str, asyncio.Future[Agent]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._epochs: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._embedding: asyncio.Task[None] | None = None
        self.memory = MemoryAPI(self)

    @classmethod
    async def open(
        cls, settings: EngineSettings, *, http_transport: Callable[[], httpx.AsyncBaseTransport] | None = None
    ) -> Engine:
        """Open the database and the model client. Raises ConfigError or StorageError.

        `http_transport` makes the transport for each HTTP client (default: httpx's own).
        """
        settings.require_llm()
        db = await Database.open(settings.database_path)

        def new_transport() -> httpx.AsyncBaseTransport | None:
            return http_transport() if http_transport else None

        llm = LLMClient(
            settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value(),
            timeout=settings.llm_timeout,
            max_retries=settings.llm_max_retries,
            retry_budget=settings.llm_retry_budget,
            max_concurrent=settings.max_concurrent_llm_calls,
            transport=new_transport(),
        )
        embedder = None
        if settings.embedding_model:
            embed_client = llm
            if settings.embedding_base_url and settings.embedding_base_url != settings.llm_base_url:
                embed_client = LLMClient(
                    settings.embedding_base_url,
                    api_key=(settings.embedding_api_key or settings.llm_api_key).get_secret_value(),
                    timeout=settings.llm_timeout,
                    max_retries=settings.llm_max_retries,
                    retry_budget=settings.llm_retry_budget,
                    transport=new_transport(),
                )
            embedder = Embedder(db, embed_client, settings.embedding_model, settings.embedding_batch_size)
            await embedder.prepare()
        else:
            log.info("EMBEDDING_MODEL is not set: archival search is keyword-only")
        await _learn_window(settings, llm)
        engine = cls(settings, db, llm, Archive(db, embedder))
        if embedder:
            engine._embedding = asyncio.create_task(engine._catch_up_embeddings())
        return engine

    async def close(self) -> None:
        """Let running turns finish, stop background work, close the database."""
        workers = [m.worker for m in self._mailboxes.values() if m.worker and not m.worker.done()]
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        background = [*self._background, *([self._embedding] if self._embedding else [])]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        embedder = self.archive.embedder
        if embedder and embedder.client is not self.llm:
            await embedder.client.aclose()
        await self.llm.aclose()
        await self.db.close()

    async def agent(self, key: str) -> Agent:
        """The agent of `key`, created on first use. Callers resume in the order they asked,
        so messages for a new agent are still stored in the order they arrived."""
        found = self._agents.get(key)
        if found is None:
            found = self._agents[key] = asyncio.ensure_future(agents.get_or_create(self.db, key, self.settings))
            found.add_done_callback(lambda f: f.exception() is not None and self._agents.pop(key, None))
        return await found

    async def record(self, key: str, message: recall.Message) -> None:
        """Store a message the agent should remember but not answer; its next turn sees it."""
        await self._arrive(key, message)

    async def send(self, key: str, message: recall.Message) -> TurnResult:
        """Store `message`, then answer it in this agent's next turn.

        When several messages wait for one agent, one turn answers them all: the
        last one's result carries the reply, the others get outcome "merged".
        """
        future = await self._arrive(key, message, answer=True)
        assert future is not None
        return await future

    async def _arrive(self, key: str, message: recall.Message, *, answer: bool = False) -> asyncio.Future[TurnResult] | None:
        """The one way in for messages: stored at once, in call order, waiting for the next turn.

        Raises StorageError when it cannot be stored: the caller must say so, nothing else will.
        """
        message.content, message.author = valid(message.content), valid(message.author)
        agent = await self.agent(key)
        await recall.append(self.db, agent, [message], state=recall.WAITING)
        if not answer:
            return None
        box = self._mailboxes.setdefault(key, _Mailbox())
        future: asyncio.Future[TurnResult] = asyncio.get_running_loop().create_future()
        box.pending.append((message, future))
        if box.worker is None or box.worker.done():
            box.worker = asyncio.create_task(self._work(agent, box))
        return future

    def lock(self, key: str) -> asyncio.Lock:
        """Held by each turn (and by `exclusive`)."""
        return self._locks.setdefault(key, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        """For erasing memory: never cuts into a turn, and a consolidation pass still running
        (it read the memory before) drops its notes instead of writing back what was erased."""
        async with self.lock(key):
            try:
                yield
            finally:
                self._epochs[key] = self._epochs.get(key, 0) + 1

    async def _work(self, agent: Agent, box: _Mailbox) -> None:
        """Turns until no stored message waits for an answer."""
        while box.pending:
            try:
                async with self.lock(agent.key):
                    result = await self.run_turn(agent)
            except Exception as exc:  # a bug must not leave callers waiting forever
                log.exception("%s: turn failed", agent.key)
                result = TurnResult(reply="Sorry, something went wrong on my side.", outcome=TurnOutcome.ERROR, error=repr(exc))
            # the turn answered every message it admitted; all of them if it failed before admitting
            through = result.admitted_through or max(m.id for m, _ in box.pending)
            batch = [p for p in box.pending if p[0].id <= through]
            box.pending = [p for p in box.pending if p[0].id > through]
            for _, future in batch[:-1]:
                if not future.done():
                    future.set_result(TurnResult(reply=None, outcome=TurnOutcome.MERGED))
            if batch and not batch[-1][1].done():
                batch[-1][1].set_result(result)
        if self._mailboxes.get(agent.key) is box:
            del self._mailboxes[agent.key]

    async def run_turn(self, agent: Agent) -> TurnResult:
        """A turn that answers every message waiting for this agent."""
        turn = Turn(self.db, self.llm, self.archive, self.settings, agent, token_scale=self.token_scale, model=self.model)
        result = await turn.run()
        log.info(
            "turn agent=%s steps=%d tokens_in=%d tokens_out=%d model_ms=%.0f engine_ms=%.1f outcome=%s",
            agent.key,
            result.steps,
            result.tokens_in,
            result.tokens_out,
            result.model_seconds * 1000,
            result.engine_seconds * 1000,
            result.outcome,
        )
        if result.evicted:
            self._spawn(self._consolidate(agent, result.evicted))
        return result

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_background(self) -> None:
        """For tests and shutdown: wait until background passes are finished."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _catch_up_embeddings(self) -> None:
        """Runs for the engine's life: embeds passages left without vectors at start (a new
        model, an earlier outage) and, after pauses that grow, whenever the endpoint failed."""
        pause = EMBEDDING_RETRY_SECONDS
        while True:
            self.archive.behind.clear()
            try:
                while await self.archive.embed_pending():
                    pass
            except Exception:  # a database error: this task must outlive it
                log.exception("embedding passages failed")
                self.archive.behind.set()
            if self.archive.behind.is_set():
                await asyncio.sleep(pause)
                pause = min(pause * 2, 600.0)
            else:
                pause = EMBEDDING_RETRY_SECONDS
                await self.archive.behind.wait()

    async def _consolidate(self, agent: Agent, evicted: list[recall.Message]) -> None:
        """Off the reply path: turn an evicted span into archival notes and core edits."""
        epoch = self._epochs.get(agent.key, 0)
        try:
            blocks = core.render(await core.blocks(self.db, agent))
            host = _Consolidation(
                self,
                agent,
                evicted,
                epoch,
                [
                    {"role": "system", "content": CONSOLIDATION_INSTRUCTIONS.format(core=blocks)},
                    {"role": "user", "content": context.transcript(evicted)},
                ],
            )
            end = await Loop(host, tools.CONSOLIDATION_TOOLS, CONSOLIDATION_STEPS, self.settings.max_tool_calls_per_answer).run()
            if end.edits:
                await recall.append(
                    self.db,
                    agent,
                    [recall.Message(role="system", content="Memory consolidation: " + " ".join(end.edits))],
                    state=recall.EVICTED,
                )
        except _Erased:
            log.info("%s: memory was erased during consolidation; its notes are dropped", agent.key)
        except LLMError as exc:
            log.warning("%s: consolidation skipped: %s", agent.key, exc)
        except Exception:
            log.exception("%s: consolidation failed", agent.key)


class _Erased(Exception):
    """Memory was erased while a consolidation pass ran: it must not write back what it read."""


@dataclass
class _Consolidation:
    """The tool loop's host for a consolidation pass: its messages live in a list, never in recall."""

    engine: Engine
    agent: Agent
    evicted: list[recall.Message]
    epoch: int
    messages: list[dict[str, Any]]

    async def ask(self, schemas: list[dict[str, Any]] | None, note: str | None) -> ChatResult:
        # no note comes: a pass that does not have to answer ends on an empty answer instead of being nudged.
        # Nobody waits for it: it gives way to turns, and its output is bounded.
        s, messages = self.engine.settings, self.messages
        if self.engine.model.text_tools or s.tool_mode == "text":
            messages, schemas = replies.as_text_mode(messages, schemas), None
        return await self.engine.llm.chat(s.llm_model, messages, schemas, max_tokens=s.consolidation_max_tokens, background=True)

    async def keep(self, messages: list[recall.Message]) -> None:
        self.messages.extend(m.to_openai() for m in messages)

    async def execute(self, call: ToolCall, available: dict[str, tools.Tool]) -> tools.Outcome:
        if self.engine._epochs.get(self.agent.key, 0) != self.epoch:
            raise _Erased
        arguments = call.arguments
        if call.name == "archival_memory_insert":  # date the notes by the span they come from
            arguments = _with_tag(arguments, "conversation " + self.evicted[0].created_at[:10])
        e = self.engine
        return await tools.execute(e.db, e.archive, self.agent, call.name, arguments, available)


def _with_tag(arguments: str, tag: str) -> str:
    try:
        args = tools.parse_arguments(arguments)
    except tools.BadArguments:
        return arguments  # the call is refused with the reason
    tags = args.get("tags")
    if isinstance(tags, str):  # models often send "a, b" for an array; tools read it so
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    return json.dumps({**args, "tags": [*(tags if isinstance(tags, list) else []), tag]})


async def _learn_window(settings: EngineSettings, llm: LLMClient) -> None:
    """Use the server's context window when it states one: CONTEXT_WINDOW, when set, only if it is smaller."""
    window, source = await serving.detect_window(llm, settings.llm_model)
    configured = "context_window" in settings.model_fields_set
    if window is None:
        if not configured:
            log.info("the model server does not state its context window; using %d (set CONTEXT_WINDOW)", settings.context_window)
        return
    if not configured:
        log.info("context window: %d tokens (from %s)", window, source)
        settings.context_window = max(window, MIN_WINDOW)
    elif window < settings.context_window:
        log.warning(
            "CONTEXT_WINDOW is %d but the model server (%s) gives the model %d tokens: using %d",
            settings.context_window,
            source,
            window,
            window,
        )
        settings.context_window = max(window, MIN_WINDOW)
