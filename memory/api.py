"""One public surface for an agent's memory, for the Discord bot and the CLI (`engine.memory`).

Everything that looks into or changes memory from outside a turn goes through here, so
callers hold no SQL and the rule for erasing (never inside a turn, and a consolidation
pass still running drops its notes: `Engine.exclusive`) is kept in one place.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from . import agents, context, core, documents, portability, recall, search
from .agents import Agent
from .core import Block

if TYPE_CHECKING:
    from .engine import Engine

Scope = Literal["conversation", "core", "archival", "all"]
SCOPES: tuple[Scope, ...] = ("conversation", "core", "archival", "all")
# listen flags kept in memory (one lookup per channel message otherwise); least recently used go first
OPTION_CACHE = 4096

# ids as /memory search shows them (m12, p3): ASCII digits only, or "m١٢" would read as m12
_ID = re.compile(r"\b([mp])#?([0-9]{1,18})\b", re.ASCII | re.IGNORECASE)
_IDS = re.compile(r"(\s*[mp]#?[0-9]{1,18}\s*,?)+", re.ASCII | re.IGNORECASE)


def parse_ids(target: str) -> tuple[list[int], list[int]] | None:
    """(message ids, passage ids) when `target` is only ids like "m12 p3", else None (it is text)."""
    if not _IDS.fullmatch(target):
        return None
    found = _ID.findall(target)
    return [int(n) for k, n in found if k.lower() == "m"], [int(n) for k, n in found if k.lower() == "p"]


@dataclass(frozen=True)
class View:
    key: str
    blocks: list[Block]
    summary: str
    messages: int
    in_context: int
    passages: int
    context_tokens: int
    context_window: int
    model_calls: int
    tokens_in: int
    tokens_out: int
    # what the engine saw wrong with the model server (e.g. it drops the start of prompts), with the fix
    model_warning: str = ""


@dataclass(frozen=True)
class Found:
    messages: search.Page
    passages: search.Page


@dataclass(frozen=True)
class Matches:
    """What a text matches, shown to the person before `forget` deletes it."""

    message_ids: list[int]
    passage_ids: list[int]


@dataclass(frozen=True)
class Ingested:
    name: str
    chars: int
    passages: int

    @property
    def note(self) -> str:
        """What the agent is told about the document."""
        return (
            f"[Document `{self.name}` ({self.chars} characters) was saved to archival memory as "
            f'{self.passages} passages tagged "document"; search it with archival_memory_search.]'
        )


class MemoryAPI:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._options: OrderedDict[tuple[str, str], Any] = OrderedDict()

    async def _agent(self, key: str) -> Agent:
        return await self._engine.agent(key)

    async def view(self, key: str) -> View:
        engine = self._engine
        agent = await self._agent(key)
        prompt = await context.build(engine.db, agent, engine.settings.context_window)
        row = await engine.db.fetchone("SELECT summary, tokens_in, tokens_out, model_calls FROM agents WHERE id = ?", (agent.id,))
        return View(
            key=key,
            blocks=await core.blocks(engine.db, agent),
            summary=row["summary"],
            messages=await recall.count(engine.db, agent),
            in_context=len(prompt.history),
            passages=await engine.archive.count(agent),
            context_tokens=prompt.tokens,
            context_window=engine.settings.context_window,
            model_calls=row["model_calls"],
            tokens_in=row["tokens_in"],
            tokens_out=row["tokens_out"],
            model_warning=engine.model.truncation,
        )

    async def search(self, key: str, query: str) -> Found:
        """Recall and archival matches. Raises search.BadArgument for a query that cannot be searched."""
        agent = await self._agent(key)
        return Found(await recall.search_messages(self._engine.db, agent, query), await self._engine.archive.search(agent, query))

    async def find(self, key: str, text: str) -> Matches:
        """Every message and passage containing `text` (case-insensitive for ASCII letters)."""
        agent = await self._agent(key)
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        db = self._engine.db
        # replies live in the arguments of send_message calls, so tool_calls is searched too
        messages = await db.fetchall(
            "SELECT id FROM messages WHERE agent_id = ?1 AND (content LIKE ?2 ESCAPE '\\' OR tool_calls LIKE ?2 ESCAPE '\\')",
            (agent.id, pattern),
        )
        passages = await db.fetchall(
            "SELECT id FROM passages WHERE agent_id = ? AND content LIKE ? ESCAPE '\\'", (agent.id, pattern)
        )
        return Matches([r[0] for r in messages], [r[0] for r in passages])

    async def forget(self, key: str, message_ids: list[int], passage_ids: list[int]) -> tuple[int, int]:
        """Delete these messages and passages of the agent (others' ids are ignored); returns how many of each."""
        agent = await self._agent(key)
        async with self._engine.exclusive(key):
            messages = await recall.delete(self._engine.db, agent, message_ids)
            passages = await self._engine.archive.delete(agent, passage_ids)
        return messages, passages

    async def reset(self, key: str, scope: Scope) -> None:
        """Erase the conversation (recall and summary), the core blocks (to their defaults), archival memory, or all."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; use one of {list(SCOPES)}")
        engine = self._engine
        agent = await self._agent(key)
        async with engine.exclusive(key):
            if scope in ("conversation", "all"):
                await recall.clear(engine.db, agent)
            if scope in ("core", "all"):
                for label, value, _, _ in agents.default_blocks(key, engine.settings):
                    await core.set_value(engine.db, agent, label, value)
            if scope in ("archival", "all"):
                await engine.archive.clear(agent)

    async def set_block(self, key: str, label: str, value: str) -> str:
        """Overwrite a core block; returns the outcome as a sentence (refusals included)."""
        return (await core.set_value(self._engine.db, await self._agent(key), label, value)).text

    async def option(self, key: str, name: str, default: Any = None) -> Any:
        cached = self._options.get((key, name), _MISSING)
        if cached is _MISSING:
            cached = (await agents.get_options(self._engine.db, await self._agent(key))).get(name, default)
            self._remember(key, name, cached)
        else:
            self._options.move_to_end((key, name))
        return cached

    async def set_option(self, key: str, name: str, value: Any) -> None:
        await agents.set_option(self._engine.db, await self._agent(key), name, value)
        self._remember(key, name, value)

    def _remember(self, key: str, name: str, value: Any) -> None:
        self._options[(key, name)] = value
        self._options.move_to_end((key, name))
        while len(self._options) > OPTION_CACHE:
            self._options.popitem(last=False)

    async def listening(self, key: str) -> bool:
        """Whether the agent answers every message in its channel, not only mentions and replies."""
        return bool(await self.option(key, "listen", False))

    async def set_listening(self, key: str, on: bool) -> None:
        await self.set_option(key, "listen", on)

    async def meta(self, name: str) -> str | None:
        """A value of the database-wide key-value store (e.g. the hash of the synced commands)."""
        return await self._engine.db.fetchval("SELECT value FROM meta WHERE key = ?", (name,))

    async def set_meta(self, name: str, value: str) -> None:
        await self._engine.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (name, value))

    async def last_message_id(self, key: str) -> int:
        agent = await self._agent(key)
        return int(await self._engine.db.fetchval("SELECT coalesce(max(id), 0) FROM messages WHERE agent_id = ?", (agent.id,), 0))

    async def messages_since(self, key: str, after_id: int) -> list[recall.Message]:
        """The agent's messages stored after message `after_id`, oldest first."""
        agent = await self._agent(key)
        rows = await self._engine.db.fetchall(
            "SELECT id FROM messages WHERE agent_id = ? AND id > ? ORDER BY id", (agent.id, after_id)
        )
        return await recall.get(self._engine.db, agent, [r[0] for r in rows]) if rows else []

    async def ingest(self, key: str, name: str, data: bytes, *, content_type: str | None = None, source: str = "") -> Ingested:
        """Read a document (text or PDF) into archival memory, tagged "document" and its name.

        Raises documents.Unreadable (its text is for the person) when it holds no text this can read.
        """
        text = await documents.extract(name, data, content_type)
        agent = await self._agent(key)
        ids = await self._engine.archive.insert(
            agent, text, tags=["document", name], source=source or name, max_chars=documents.MAX_DOCUMENT_CHARS
        )
        return Ingested(name, len(text), len(ids))

    async def exists(self, key: str) -> bool:
        return await agents.find(self._engine.db, key) is not None

    async def export(self, key: str) -> dict[str, Any]:
        """The agent's whole memory as JSON-ready data (`import_data` loads it)."""
        return await portability.export_agent(self._engine, await self._agent(key))

    async def import_data(self, data: Any, key: str | None = None) -> dict[str, Any]:
        """Load an export into agent `key` (default: the exported key), in one transaction.

        Returns counts; raises ValueError when `data` is not a valid export.
        """
        return await portability.import_agent(self._engine, data, key)


_MISSING = object()
