"""One public surface for an agent's memory, for the Discord bot and the CLI (`engine.memory`).

Everything that looks into or changes memory from outside a turn goes through here, so
callers hold no SQL and the rule for erasing (never inside a turn, and a consolidation
pass still running drops its notes: `Engine.exclusive`) is kept in one place.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import orjson

from . import agents, archival, clock, context, core, documents, erasure, events, people, portability, recall, search
from .agents import Agent
from .core import Block
from .db import marks, sqlite3
from .events import Event as ScheduledEvent
from .events import Scheduler
from .serving import ModelState


class Engine(erasure.Engine, Protocol):
    """What the memory API needs of the engine (memory/engine.py), which owns it: what erasing
    needs, and the whole timer and the model's state."""

    @property
    def events(self) -> Scheduler: ...

    @property
    def model(self) -> ModelState: ...


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
class Pending:
    """A stored request waiting for its confirmation button."""

    user_id: str
    action: str
    args: dict[str, Any]
    expired: bool


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
        messages = await recall.search_messages(self._engine.db, agent, query, for_people=True)
        return Found(messages, await self._engine.archive.search(agent, query))

    async def find(self, key: str, text: str) -> Matches:
        """Every message and passage containing `text` (case-insensitive for ASCII letters)."""
        agent = await self._agent(key)
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        db = self._engine.db
        said = await db.fetchall("SELECT id FROM messages WHERE agent_id = ? AND content LIKE ? ESCAPE '\\'", (agent.id, pattern))
        # replies and saved notes live in function calls' arguments, stored as escaped JSON ("café"
        # as caf\\u00e9): read them as the words they are
        needle = text.casefold()
        calls = await db.fetchall(
            "SELECT id, tool_calls FROM messages WHERE agent_id = ? AND tool_calls IS NOT NULL", (agent.id,)
        )
        replied = [r[0] for r in calls if needle in _words_in_calls(orjson.loads(r[1])).casefold()]
        passages = await db.fetchall(
            "SELECT id FROM passages WHERE agent_id = ? AND content LIKE ? ESCAPE '\\'", (agent.id, pattern)
        )
        return Matches(sorted({r[0] for r in said} | set(replied)), [r[0] for r in passages])

    async def forget(self, key: str, message_ids: list[int], passage_ids: list[int]) -> tuple[int, int]:
        """Delete these messages and passages of the agent (others' ids are ignored); returns how many of each."""
        erased = await erasure.forget_items(self._engine, key, message_ids, passage_ids)
        return erased.messages, erased.passages

    async def reset(self, key: str, scope: Scope) -> None:
        """Erase the conversation (recall and summary), the core blocks (to their defaults), archival memory, or all."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; use one of {list(SCOPES)}")
        engine = self._engine
        agent = await self._agent(key)
        defaults = agents.default_blocks(key, engine.settings)

        def erase(c: sqlite3.Connection) -> None:
            if scope in ("conversation", "all"):
                recall.wipe(c, agent)
            if scope in ("core", "all"):
                core.write_defaults(c, agent, defaults)
                c.execute("DELETE FROM people WHERE agent_id = ?", (agent.id,))
            if scope in ("archival", "all"):
                archival.clear(c, agent)
            if scope == "all":  # scheduled events are memory too: their notes say what was asked
                c.execute("DELETE FROM events WHERE agent_id = ?", (agent.id,))

        async with engine.exclusive(key):
            await engine.db.transact(erase)  # whole: a full disk midway leaves memory as it was
        if scope == "all":
            engine.events.changed()

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

    async def ingest(
        self, key: str, name: str, data: bytes, *, content_type: str | None = None, source: str = "", origin: str | None = None
    ) -> Ingested:
        """Read a document (text or PDF) into archival memory, tagged "document" and its name.

        `origin` is the platform id of the message it came with: deleting that message deletes these passages.
        Raises documents.Unreadable (its text is for the person) when it holds no text this can read.
        """
        text = await documents.extract(name, data, content_type)
        agent = await self._agent(key)
        ids = await self._engine.archive.insert(
            agent, text, tags=["document", name], source=source or name, max_chars=documents.MAX_DOCUMENT_CHARS, origin=origin
        )
        return Ingested(name, len(text), len(ids))

    async def exists(self, key: str) -> bool:
        return await agents.find(self._engine.db, key) is not None

    async def export(self, key: str) -> dict[str, Any]:
        """The agent's whole memory as JSON-ready data (`import_data` loads it)."""
        return await portability.export_agent(self._engine.db, await self._agent(key))

    async def import_data(self, data: Any, key: str | None = None) -> dict[str, Any]:
        """Load an export into agent `key` (default: the exported key), in one transaction.

        Returns counts; raises ValueError when `data` is not a valid export.
        """
        counts = await portability.import_agent(self._engine.db, self._engine.archive, self._agent, data, key)
        if counts["events"]:
            self._engine.events.changed()  # the timer re-arms for them
        return counts

    async def events(self, key: str) -> list[ScheduledEvent]:
        """The agent's pending scheduled events, soonest first."""
        return await events.pending(self._engine.db, await self._agent(key))

    async def event(self, key: str, event_id: int) -> ScheduledEvent | None:
        """One of the agent's events (any state), or None."""
        return await events.get(self._engine.db, await self._agent(key), event_id)

    async def cancel_event(self, key: str, event_id: int) -> bool:
        """Cancel a pending event of the agent; False when it has none with that id."""
        return await events.cancel(self._engine.db, await self._agent(key), event_id)

    # --- stored data follows what people do in Discord (memory/erasure.py) ---

    async def message_deleted(self, external_ids: list[str]) -> erasure.Erased:
        """Messages deleted where they were posted: gone from recall, the indexes and the context window,
        with the passages read from their attachments."""
        return await erasure.delete_external(self._engine, external_ids)

    async def message_edited(self, external_id: str, content: str) -> int:
        """A message edited where it was posted: its stored text and index row replaced; returns how many rows."""
        return await erasure.edit_external(self._engine, external_id, content)

    async def erase(self, key: str) -> erasure.Erased:
        """Erase an agent's whole memory (its channel or thread was deleted, or its server purged)."""
        return await erasure.erase_agent(self._engine, key)

    async def forget_person(self, user_id: str) -> erasure.Erased:
        """Everything held from one person: their DM agent's whole memory, and every message they
        wrote in any other agent's recall with the passages read from its attachments."""
        dm = await erasure.erase_agent(self._engine, f"dm:{user_id}")
        return dm + await erasure.forget_author(self._engine, user_id)

    async def purge_guild(self, guild_id: str) -> erasure.Erased:
        """Erase the memory of every channel and thread agent of a server."""
        total = erasure.Erased()
        for key in await erasure.agents_of_guild(self._engine, guild_id):
            total += await erasure.erase_agent(self._engine, key)
        return total

    async def person_block(self, key: str, user_id: str) -> str:
        """One person's block in a channel agent ("" when it holds nothing)."""
        return await people.block(self._engine.db, await self._agent(key), user_id)

    async def clear_person(self, key: str, user_id: str) -> bool:
        """Empty one person's block in a channel agent; whether it held something."""
        agent = await self._agent(key)
        async with self._engine.exclusive(key):
            return await people.clear(self._engine.db, agent, user_id)

    async def last_external_ids(self) -> list[tuple[str, int]]:
        """(agent key, newest stored platform message id) of every agent that stored one: where catch-up starts."""
        rows = await self._engine.db.fetchall(
            "SELECT a.key, (SELECT max(CAST(external_id AS INTEGER)) FROM messages WHERE agent_id = a.id AND external_id IS NOT NULL),"
            " CAST(json_extract(a.options, '$.' || ?) AS INTEGER) FROM agents a ORDER BY a.id",
            (erasure.CAUGHT_UP,),
        )
        return [(key, max(int(last), int(floor or 0))) for key, last, floor in rows if last]

    async def stored_external(self, external_ids: list[str]) -> set[str]:
        """Which of these platform message ids are stored already (by any agent)."""
        found: set[str] = set()
        for i in range(0, len(external_ids), erasure.BATCH):
            part = external_ids[i : i + erasure.BATCH]
            rows = await self._engine.db.fetchall(
                f"SELECT external_id FROM messages WHERE external_id IN ({marks(len(part))})", part
            )
            found.update(r[0] for r in rows)
        return found

    async def add_confirmation(self, user_id: str, action: str, args: dict[str, Any], minutes: float) -> str:
        """Store a request that `user_id` may confirm for `minutes`; returns its token. Expired ones are dropped."""
        token = secrets.token_hex(16)
        stamp = clock.now()
        expires = clock.stamp(datetime.now(UTC) + timedelta(minutes=minutes))

        def add(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM confirmations WHERE expires_at < ?", (stamp,))
            c.execute("INSERT INTO confirmations VALUES (?, ?, ?, ?, ?)", (token, user_id, action, json.dumps(args), expires))

        await self._engine.db.transact(add)
        return token

    async def confirmation(self, token: str) -> Pending | None:
        row = await self._engine.db.fetchone(
            "SELECT user_id, action, args, expires_at FROM confirmations WHERE token = ?", (token,)
        )
        if row is None:
            return None
        return Pending(row[0], row[1], json.loads(row[2]), row[3] < clock.now())

    async def take_confirmation(self, token: str) -> bool:
        """Use up a request; False when an earlier call took it."""
        return await self._engine.db.execute("DELETE FROM confirmations WHERE token = ?", (token,)) == 1

    def forget_options(self, key: str) -> None:
        """Drop the cached options of an agent whose options were erased."""
        for cached in [k for k in self._options if k[0] == key]:
            del self._options[cached]


_MISSING = object()


def _words_in_calls(calls: Any) -> str:
    """The text in function calls' arguments: every string in them, decoded."""
    out: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for call in calls if isinstance(calls, list) else []:
        arguments = call.get("function", {}).get("arguments", "") if isinstance(call, dict) else ""
        try:
            walk(json.loads(arguments))
        except (ValueError, TypeError, RecursionError):  # not JSON: the raw text is what was said
            out.append(str(arguments))
    return "\n".join(out)
