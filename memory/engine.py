"""The engine: opens the store and the model client, and runs agents' turns.

Every message is stored the moment it arrives (`Engine._arrive`), before any
model call. One turn at a time per agent: messages that arrive while a turn
runs are answered together by the next turn, in order. Different agents run
concurrently; the model client caps calls in flight for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from . import agents, context, core, events, recall, replies, serving, tools
from .agent import Turn, TurnOutcome, TurnResult
from .agents import Agent
from .api import MemoryAPI
from .archival import Archive
from .config import EngineSettings
from .db import Database, StorageFull, sqlite3
from .embeddings import Embedder
from .images import Image
from .llm import ChatResult, LLMClient, LLMError, ToolCall
from .loop import Loop
from .text import valid

log = logging.getLogger(__name__)

CONSOLIDATION_STEPS = 3
# agents whose id stays cached (an agent's id never changes; a miss costs one read)
AGENTS_KEPT = 4096
# turns in progress at once, per model call allowed at once: enough to keep every call slot busy
# (a turn also runs tools and reads its prompt between calls); the rest wait before reading their
# prompt, so a crowd of turns (1,000 events due in one second) does not make each one late
TURNS_PER_CALL_SLOT = 2
STORAGE_FULL = "Sorry, my storage is full, so I can't think this through right now. The bot's operator has to free disk space."
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
class _Hold:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by each turn and by `exclusive`
    erasures: int = 0
    users: int = 0


@dataclass
class _Mailbox:
    # messages stored and waiting for an answer, with the callers waiting for it
    pending: list[tuple[recall.Message, asyncio.Future[TurnResult]]] = field(default_factory=list)
    worker: asyncio.Task[None] | None = None
    # the images that came with pending messages: in memory only, for the turn that answers them
    images: list[tuple[recall.Message, list[Image]]] = field(default_factory=list)
    # pending scheduled events that waited for room before they fired: queue time of their turn
    waited: dict[asyncio.Future[TurnResult], float] = field(default_factory=dict)
    # who is shown the reply while it is written (Engine.send's on_text), by the caller's future
    listeners: dict[asyncio.Future[TurnResult], Callable[[str], None]] = field(default_factory=dict)


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
        self._agents: OrderedDict[str, asyncio.Future[Agent]] = OrderedDict()
        self._holds: dict[str, _Hold] = {}
        self._turns = asyncio.Semaphore(TURNS_PER_CALL_SLOT * settings.max_concurrent_llm_calls)
        self._turns_wanted = 0  # turns running or waiting for the gate
        self._turn_done = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._embedding: asyncio.Task[None] | None = None
        self.memory = MemoryAPI(self)
        # fires nothing until an adapter starts it with the way to deliver answers
        self.events = events.Scheduler(self, max_pending=settings.max_pending_events)

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
        # the memory tools make person blocks with this limit, and they see the database, not the settings
        await db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('person_limit', ?)", (str(settings.person_limit),))
        if embedder:
            engine._embedding = asyncio.create_task(engine._catch_up_embeddings())
        return engine

    async def close(self) -> None:
        """Let running turns finish, stop background work, close the database."""
        await self.events.stop()
        workers = [m.worker for m in self._mailboxes.values() if m.worker and not m.worker.done()]
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        await self.events.finish()
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
            found.add_done_callback(functools.partial(self._forget_failed, key))
            oldest = next(iter(self._agents.values()))
            if len(self._agents) > AGENTS_KEPT and oldest.done():
                self._agents.popitem(last=False)
        else:
            self._agents.move_to_end(key)
        # shielded: one waiter cancelled (a handler at shutdown) must not cancel it for the others
        return await asyncio.shield(found)

    def _forget_failed(self, key: str, found: asyncio.Future[Agent]) -> None:
        if (found.cancelled() or found.exception() is not None) and self._agents.get(key) is found:
            del self._agents[key]  # the next caller tries again

    @property
    def sees_images(self) -> bool:
        """Whether images sent now would reach the model (VISION, and what the server answered so far)."""
        return self.settings.vision == "on" or (self.settings.vision == "auto" and not self.model.no_vision)

    async def record(self, key: str, message: recall.Message) -> None:
        """Store a message the agent should remember but not answer; its next turn sees it."""
        await self._arrive(key, message)

    async def send(
        self,
        key: str,
        message: recall.Message,
        images: list[Image] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> TurnResult:
        """Store `message`, then answer it in this agent's next turn.

        When several messages wait for one agent, one turn answers them all: the
        last one's result carries the reply, the others get outcome "merged".
        `images` came with it: the turn that answers it shows them to the model, once
        (recall keeps only the stand-ins the message's text has). `on_text` gets snapshots of
        the reply while it is written (STREAM_REPLIES), each the text so far; the result's reply
        is the final text. Only the caller whose message carries the result is shown it: one whose
        result is "merged" gets none.
        """
        future = await self._arrive(key, message, answer=True, images=images, on_text=on_text)
        assert future is not None
        return await future

    def image_bytes_waiting(self) -> int:
        """The bytes of the images held for turns not yet run (they are only in memory)."""
        return sum(len(i.data) for box in self._mailboxes.values() for _, found in box.images for i in found)

    async def room(self) -> int:
        """How many more turns could begin now without waiting behind others; if none, waits for a
        turn to end and then says at least 1.

        The events timer fires no more than this: due events wait in the database, not as turns
        queued in memory, and a person's message does not queue behind a crowd of them. The
        "at least 1" keeps events going while people's turns keep every slot busy."""
        if (free := self._turns_free()) > 0:
            return free
        self._turn_done.clear()
        await self._turn_done.wait()
        return max(1, self._turns_free())

    def _turns_free(self) -> int:
        return TURNS_PER_CALL_SLOT * self.settings.max_concurrent_llm_calls - self._turns_wanted

    async def wake(
        self,
        batch: list[tuple[Agent, recall.Message, Callable[[sqlite3.Connection], bool]]],
        *,
        waited: Sequence[float] = (),
    ) -> list[asyncio.Future[TurnResult] | None]:
        """System events agents must answer (scheduled events firing), each stored only if its claim
        returns True, all in one transaction; then queued like any message. A future per event carries
        its answer (None: not claimed, e.g. cancelled meanwhile). `waited`: per event, how long it was
        due while the engine had no room for it (Engine.room), counted as its turn's queue time."""
        for _, message, _ in batch:
            message.content = valid(message.content)
        recall.prepare([message for _, message, _ in batch])

        def store(c: sqlite3.Connection) -> list[bool]:
            claimed = []
            for agent, message, claim in batch:
                claimed.append(claim(c))
                if claimed[-1]:
                    recall.insert(c, agent, [message], recall.WAITING)
            return claimed

        claimed = await self.db.transact(store)
        waits = list(waited) or [0.0] * len(batch)
        return [
            self._queue(agent, message, waited=wait) if ok else None
            for (agent, message, _), ok, wait in zip(batch, claimed, waits, strict=True)
        ]

    async def _arrive(
        self,
        key: str,
        message: recall.Message,
        *,
        answer: bool = False,
        images: list[Image] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> asyncio.Future[TurnResult] | None:
        """The one way in for messages: stored at once, in call order, waiting for the next turn.

        Raises StorageError when it cannot be stored: the caller must say so, nothing else will.
        """
        message.content, message.author = valid(message.content), valid(message.author)
        agent = await self.agent(key)
        if not answer:
            await recall.append(self.db, agent, [message], state=recall.WAITING)
            return None
        # the worker is woken first: its turn's first transaction joins this message's batch, one
        # commit for both, when this message's transaction opened the batch (Database.transact);
        # under load an earlier one of the pass usually has, and the batch commits before the worker runs
        future = self._queue(agent, message, images, on_text)
        try:
            await recall.append(self.db, agent, [message], state=recall.WAITING)
        except BaseException:
            message.id = 0  # the writer set it before the batch failed: the message is not stored
            box = self._mailboxes.get(key)
            if box is not None:
                box.pending = [p for p in box.pending if p[1] is not future]
                box.images = [p for p in box.images if p[0] is not message]
                box.listeners.pop(future, None)
            raise
        return future

    def _queue(
        self,
        agent: Agent,
        message: recall.Message,
        images: list[Image] | None = None,
        on_text: Callable[[str], None] | None = None,
        *,
        waited: float = 0.0,
    ) -> asyncio.Future[TurnResult]:
        """A stored message waits for the agent's next turn; the future carries that turn's result.
        `waited`: how long it already waited for room (a scheduled event, Engine.room)."""
        key = agent.key
        box = self._mailboxes.setdefault(key, _Mailbox())
        future: asyncio.Future[TurnResult] = asyncio.get_running_loop().create_future()
        box.pending.append((message, future))
        if waited:
            box.waited[future] = waited
        if images:
            box.images.append((message, images))
        if on_text is not None:
            box.listeners[future] = on_text
        if box.worker is None or box.worker.done():
            box.worker = asyncio.create_task(self._work(agent, box))
        return future

    @contextlib.contextmanager
    def _use(self, key: str) -> Iterator[_Hold]:
        """The agent's lock and erasure count, kept while anything uses them: idle agents cost nothing."""
        hold = self._take(key)
        try:
            yield hold
        finally:
            self._let_go(key, hold)

    def _take(self, key: str) -> _Hold:
        hold = self._holds.get(key) or self._holds.setdefault(key, _Hold())
        hold.users += 1
        return hold

    def _let_go(self, key: str, hold: _Hold) -> None:
        hold.users -= 1
        if not hold.users:
            del self._holds[key]

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        """For erasing memory: never cuts into a turn, and a consolidation pass still running
        (it read the memory before) drops its notes instead of writing back what was erased.

        The erasure is counted before the erase begins, so no note slips in between its steps.
        """
        with self._use(key) as hold:
            async with hold.lock:
                hold.erasures += 1
                yield

    async def _work(self, agent: Agent, box: _Mailbox) -> None:
        """Turns until no stored message waits for an answer."""
        with self._use(agent.key) as hold:
            while box.pending:
                await self._answer(agent, box, hold)
        if self._mailboxes.get(agent.key) is box:
            del self._mailboxes[agent.key]

    async def _answer(self, agent: Agent, box: _Mailbox, hold: _Hold) -> None:
        """One turn, and its result to everyone it answered."""
        async with hold.lock:
            # chosen once the turn has taken in its messages: one may arrive while it waits to begin
            result = await self.run_turn(agent, hold, box.images, listen=functools.partial(self._listener, box))
        # the turn answered every message it admitted; all of them if it failed before admitting any
        # (a message whose store is still on its way has no id yet: the next turn answers it)
        stored = [p for p in box.pending if p[0].id]
        if result.outcome is TurnOutcome.NOTHING:
            through = 0
        else:
            through = result.admitted_through or max((m.id for m, _ in stored), default=0)
        # the newest carries the reply: pending is not in id order (events are stored before they
        # are queued, messages after)
        batch = sorted((p for p in stored if p[0].id <= through), key=lambda p: p[0].id)
        box.pending = [p for p in box.pending if not p[0].id or p[0].id > through]
        # shown or not (a failed turn): the stand-ins are in recall, and the bytes are not kept
        box.images = [(m, found) for m, found in box.images if not m.id or m.id > through]
        result.queued_seconds += max((box.waited.pop(f, 0.0) for _, f in batch), default=0.0)
        for _, future in batch:
            box.listeners.pop(future, None)
        for _, future in batch[:-1]:
            if not future.done():
                future.set_result(TurnResult(reply=None, outcome=TurnOutcome.MERGED))
        if batch and not batch[-1][1].done():
            batch[-1][1].set_result(result)

    @staticmethod
    def _listener(box: _Mailbox, through: int) -> Callable[[str], None] | None:
        """Who is shown the reply of a turn that took in the messages up to `through`: the caller of
        the newest, whose result carries the reply (as `_answer` gives it), if that caller watches."""
        admitted = [(m.id, f) for m, f in box.pending if 0 < m.id <= through]
        return box.listeners.get(max(admitted, key=lambda p: p[0])[1]) if admitted else None

    async def run_turn(
        self,
        agent: Agent,
        hold: _Hold,
        images: list[tuple[recall.Message, list[Image]]] | None = None,
        listen: Callable[[int], Callable[[str], None] | None] | None = None,
    ) -> TurnResult:
        """A turn that answers every message waiting for this agent; `hold`'s lock is held.
        `images`: those that came with waiting messages; `listen`: Turn.listen."""
        turn = Turn(
            self.db,
            self.llm,
            self.archive,
            self.settings,
            agent,
            token_scale=self.token_scale,
            model=self.model,
            images=[] if images is None else images,  # the mailbox's own list, even while empty
            listen=listen,
        )
        queued = time.perf_counter()
        self._turns_wanted += 1
        try:
            async with self._turns:
                waited = time.perf_counter() - queued
                result = await turn.run()
        except Exception as exc:  # a full disk, or a bug: the callers must still get an answer
            if isinstance(exc, StorageFull):
                log.error("%s: %s", agent.key, exc)
                reply = STORAGE_FULL
            else:
                log.exception("%s: turn failed", agent.key)
                reply = "Sorry, something went wrong on my side."
            result = TurnResult(reply=reply, outcome=TurnOutcome.ERROR, error=repr(exc), admitted_through=turn.admitted_through)
        finally:
            self._turns_wanted -= 1
            self._turn_done.set()
        result.queued_seconds = waited
        log.info(
            "turn agent=%s steps=%d tokens_in=%d tokens_out=%d queued_ms=%.0f model_ms=%.0f engine_ms=%.1f evicted=%d outcome=%s",
            agent.key,
            result.steps,
            result.tokens_in,
            result.tokens_out,
            result.queued_seconds * 1000,
            result.model_seconds * 1000,
            result.engine_seconds * 1000,
            len(result.evicted),
            result.outcome,
        )
        if result.evicted:
            # the erasure count is read while the turn still holds the agent, and the hold is kept
            # until the pass ends: an erase waiting for this turn is always seen by the pass
            self._take(agent.key)
            self._spawn(self._consolidate(agent, result.evicted, hold, hold.erasures))
        return result

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_background(self) -> None:
        """For tests: wait until background passes are finished (close() cancels them instead)."""
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

    async def _consolidate(self, agent: Agent, evicted: list[recall.Message], hold: _Hold, erasures: int) -> None:
        """Off the reply path: turn an evicted span into archival notes and core edits.

        `hold` was taken for this pass, with the erasure count as the turn left it; let go at the end.
        """
        try:
            blocks = core.render(await core.blocks(self.db, agent))
            host = _Consolidation(
                self,
                agent,
                evicted,
                hold,
                erasures,
                [
                    {"role": "system", "content": CONSOLIDATION_INSTRUCTIONS.format(core=blocks)},
                    {"role": "user", "content": context.transcript(evicted, max_tokens=self.settings.context_window // 2)},
                ],
            )
            end = await Loop(host, tools.CONSOLIDATION_TOOLS, CONSOLIDATION_STEPS, self.settings.max_tool_calls_per_answer).run()
            if end.edits:
                host.check()
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
        finally:
            self._let_go(agent.key, hold)


class _Erased(Exception):
    """Memory was erased while a consolidation pass ran: it must not write back what it read."""


@dataclass
class _Consolidation:
    """The tool loop's host for a consolidation pass: its messages live in a list, never in recall."""

    engine: Engine
    agent: Agent
    evicted: list[recall.Message]
    hold: _Hold
    erasures: int  # when the pass read the memory
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

    def check(self) -> None:
        """Raises _Erased if memory was erased (or is being erased) since the pass read it."""
        if self.hold.erasures != self.erasures:
            raise _Erased

    async def execute(self, call: ToolCall, available: dict[str, tools.Tool]) -> tools.Outcome:
        self.check()
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
