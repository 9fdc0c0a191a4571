"""Stored copies follow what people do: edited and deleted messages, erased conversations, "forget me".

Messages are found by their platform id (`messages.external_id`, a Discord
message id, unique across all agents), and the passages read from a message's
attachments by `passages.origin`. Every deletion goes through recall's and
archival's in-transaction forms (forget, wipe, delete, clear), which tell the
full-text indexes exactly what they were given.
Erasing runs under `Engine.exclusive`: never inside a turn, and a consolidation
pass that read the erased text drops its notes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from . import agents, archival, core, fulltext, recall, tokens
from .agents import Agent
from .archival import Archive
from .config import EngineSettings
from .db import Database, marks, sqlite3
from .text import valid


class Options(Protocol):
    """The per-agent options of the memory API (memory/api.py)."""

    def forget_options(self, key: str) -> None: ...

    async def option(self, key: str, name: str, default: Any = None) -> Any: ...

    async def set_option(self, key: str, name: str, value: Any) -> None: ...


class Timer(Protocol):
    """The scheduled events' timer (memory/events.py), told when events go."""

    def changed(self) -> None: ...


class Engine(Protocol):
    """What erasing needs of the engine (memory/engine.py)."""

    @property
    def events(self) -> Timer: ...

    @property
    def db(self) -> Database: ...

    @property
    def archive(self) -> Archive: ...

    @property
    def settings(self) -> EngineSettings: ...

    @property
    def memory(self) -> Options: ...

    async def agent(self, key: str) -> Agent: ...

    def exclusive(self, key: str) -> AbstractAsyncContextManager[None]: ...


# ids per SQL statement (SQLite's default limit on parameters is 32,766)
BATCH = 500
# the note a message gets for each document it brought (api.Ingested.note): an edit keeps these lines
DOCUMENT_NOTE = re.compile(
    r'\[Document `[^`\n]*` \([0-9]+ characters\) was saved to archival memory as [0-9]+ passages tagged "document";'
    r" search it with archival_memory_search\.\]"
)
# agent option: the newest platform message id catch-up may skip to, though no stored message has it
CAUGHT_UP = "caught_up_through"


@dataclass(frozen=True)
class Erased:
    """What an erasure removed, in counts, for the person who asked."""

    messages: int = 0
    passages: int = 0
    agents: int = 0
    person_blocks: int = 0
    events: int = 0  # scheduled events: their notes hold what people asked to be reminded of

    def __add__(self, other: Erased) -> Erased:
        return Erased(
            self.messages + other.messages,
            self.passages + other.passages,
            self.agents + other.agents,
            self.person_blocks + other.person_blocks,
            self.events + other.events,
        )


async def _agents_of(engine: Engine, sql: str, values: list[str]) -> dict[str, list[int]]:
    """{agent key: row ids} for `sql` (selecting key and id, with one IN list), in batches."""
    found: dict[str, list[int]] = defaultdict(list)
    for i in range(0, len(values), BATCH):
        part = values[i : i + BATCH]
        for key, row_id in await engine.db.fetchall(sql.format(marks(len(part))), part):
            found[key].append(row_id)
    return found


async def delete_external(engine: Engine, external_ids: list[str]) -> Erased:
    """Delete the messages with these platform ids, and the passages read from their attachments."""
    messages = await _agents_of(
        engine, "SELECT a.key, m.id FROM messages m JOIN agents a ON a.id = m.agent_id WHERE m.external_id IN ({})", external_ids
    )
    passages = await _agents_of(
        engine, "SELECT a.key, p.id FROM passages p JOIN agents a ON a.id = p.agent_id WHERE p.origin IN ({})", external_ids
    )
    total = Erased()
    for key in messages.keys() | passages.keys():
        total += await forget_items(engine, key, messages.get(key, []), passages.get(key, []))
    return total


async def forget_items(engine: Engine, key: str, message_ids: list[int], passage_ids: list[int]) -> Erased:
    """Delete these messages and passages of one agent (others' ids are ignored), in one transaction:
    a failure leaves everything."""
    agent = await engine.agent(key)

    def erase(c: sqlite3.Connection) -> Erased:
        return Erased(recall.forget(c, agent, message_ids), archival.delete(c, agent, passage_ids))

    async with engine.exclusive(key):
        return await engine.db.transact(erase)


async def edit_external(engine: Engine, external_id: str, content: str) -> int:
    """Replace the text of the messages with this platform id (and their index rows); returns how many.

    The notes of the documents the message brought stay: the edit changes what the person wrote, and the
    passages are still there.
    """
    content = valid(content)

    def edit(c: sqlite3.Connection) -> int:
        rows = c.execute(
            "SELECT id, agent_id, role, content, tool_calls, author, author_id, created_at FROM messages"
            " WHERE external_id = ? AND role = 'user'",
            (external_id,),
        ).fetchall()
        for r in rows:
            calls = json.loads(r["tool_calls"]) if r["tool_calls"] else None
            fulltext.unindex_messages(c, r["agent_id"], [(r["id"], r["role"], r["content"], calls)])
            notes = [line for line in r["content"].split("\n") if DOCUMENT_NOTE.fullmatch(line)]
            text = "\n".join([content, *notes]) if content else "\n".join(notes)
            shown = recall.Message(
                role=r["role"], content=text, author=r["author"], author_id=r["author_id"], created_at=r["created_at"]
            )
            c.execute(
                "UPDATE messages SET content = ?, tokens = ? WHERE id = ?",
                (text, tokens.count_message(shown.to_openai()), r["id"]),
            )
            fulltext.index_messages(c, r["agent_id"], [(r["id"], r["role"], text, calls)])
        return len(rows)

    return await engine.db.transact(edit)


async def erase_agent(engine: Engine, key: str) -> Erased:
    """Erase an agent's whole memory: recall, summary, archival, options, core blocks back to their defaults."""
    agent = await agents.find(engine.db, key)
    if agent is None:
        return Erased()
    counted = await engine.db.fetchone(
        "SELECT (SELECT count(*) FROM messages WHERE agent_id = ?1), (SELECT count(*) FROM passages WHERE agent_id = ?1)",
        (agent.id,),
    )
    defaults = agents.default_blocks(agent.key, engine.settings)

    def erase(c: sqlite3.Connection) -> int:
        recall.wipe(c, agent)
        archival.clear(c, agent)
        core.write_defaults(c, agent, defaults)
        c.execute("UPDATE agents SET options = '{}' WHERE id = ?", (agent.id,))
        c.execute("DELETE FROM people WHERE agent_id = ?", (agent.id,))
        return int(c.execute("DELETE FROM events WHERE agent_id = ?", (agent.id,)).rowcount)

    async with engine.exclusive(key):
        scheduled = await engine.db.transact(erase)  # whole: a failure leaves the agent as it was
    engine.memory.forget_options(key)
    engine.events.changed()
    return Erased(counted[0], counted[1], 1, events=scheduled)


async def forget_author(engine: Engine, author_id: str) -> Erased:
    """Delete every message `author_id` wrote in any agent, with the passages read from its attachments."""
    rows = await engine.db.fetchall(
        "SELECT a.key, m.id, m.external_id FROM messages m JOIN agents a ON a.id = m.agent_id"
        " WHERE m.author_id = ? AND m.role = 'user'",
        (author_id,),
    )
    messages: dict[str, list[int]] = defaultdict(list)
    newest: dict[str, int] = {}
    for key, message_id, external_id in rows:
        messages[key].append(message_id)
        if external_id and external_id.isdigit():
            newest[key] = max(newest.get(key, 0), int(external_id))
    passages = await _agents_of(
        engine,
        "SELECT a.key, p.id FROM passages p JOIN agents a ON a.id = p.agent_id WHERE p.origin IN ({})",
        [r[2] for r in rows if r[2]],
    )
    total = Erased()
    for key in messages.keys() | passages.keys():
        total += await forget_items(engine, key, messages.get(key, []), passages.get(key, []))
    # their messages are still in the platform's history: catch-up must not read them back in
    for key, external_id in newest.items():
        if external_id > int(await engine.memory.option(key, CAUGHT_UP, 0) or 0):
            await engine.memory.set_option(key, CAUGHT_UP, external_id)
    blocks = await engine.db.execute("DELETE FROM people WHERE user_id = ?", (author_id,))
    # the reminders they set, in any agent: a note holds what they asked for, and would still fire
    scheduled = await engine.db.execute("DELETE FROM events WHERE set_by_id = ?", (author_id,))
    engine.events.changed()
    return total + Erased(person_blocks=blocks, events=scheduled)


async def agents_of_guild(engine: Engine, guild_id: str) -> list[str]:
    """Keys of the agents of a server's channels and threads (as recorded when their messages came)."""
    rows = await engine.db.fetchall("SELECT key FROM agents WHERE json_extract(options, '$.guild') = ? ORDER BY id", (guild_id,))
    return [r[0] for r in rows]
