"""An agent's whole memory as JSON, and back: a user's data is theirs to take along."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from . import archival, core, events, recall, search
from .agents import Agent
from .archival import Archive
from .clock import now
from .db import Database, StorageError, sqlite3
from .text import without_surrogates_in

FORMAT = "mnemocord-export"
# PERSON_LIMIT's own bound (memory/config.py): an export cannot bring a larger block
MAX_PERSON_LIMIT = 20_000
VERSION = 1


async def export_agent(db: Database, agent: Agent) -> dict[str, Any]:
    row = await db.fetchone("SELECT created_at, summary, options FROM agents WHERE id = ?", (agent.id,))
    blocks = await core.blocks(db, agent)
    messages = await db.fetchall(
        "SELECT id, role, content, author, author_id, tool_calls, tool_call_id, created_at, in_context"
        " FROM messages WHERE agent_id = ? ORDER BY id",
        (agent.id,),
    )
    passages = await db.fetchall(
        "SELECT id, content, tags, source, created_at FROM passages WHERE agent_id = ? ORDER BY id", (agent.id,)
    )
    scheduled = await db.transact(lambda c: events.export_rows(c, agent))
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": now(),
        "agent": {
            "key": agent.key,
            "created_at": row["created_at"],
            "summary": row["summary"],
            "options": json.loads(row["options"]),
        },
        "blocks": [{"label": b.label, "value": b.value, "limit": b.limit, "description": b.description} for b in blocks],
        "messages": [
            {
                "id": m["id"],
                "role": m["role"],
                "content": m["content"],
                "author": m["author"],
                "author_id": m["author_id"],
                "tool_calls": json.loads(m["tool_calls"]) if m["tool_calls"] else None,
                "tool_call_id": m["tool_call_id"],
                "created_at": m["created_at"],
                "in_context": m["in_context"] == recall.IN_CONTEXT,
            }
            for m in messages
        ],
        "passages": [
            {
                "id": p["id"],
                "content": p["content"],
                "tags": json.loads(p["tags"]),
                "source": p["source"],
                "created_at": p["created_at"],
            }
            for p in passages
        ],
        "events": scheduled,
        # person blocks of a channel agent (memory/people.py); absent from older exports
        "people": [
            {"user_id": r[0], "value": r[1], "limit": r[2]}
            for r in await db.fetchall(
                "SELECT user_id, value, char_limit FROM people WHERE agent_id = ? ORDER BY user_id", (agent.id,)
            )
        ],
    }


async def import_agent(
    db: Database, archive: Archive, agent_of: Callable[[str], Awaitable[Agent]], data: dict[str, Any], key: str | None = None
) -> dict[str, Any]:
    """Load an export into agent `key` (default: the exported key); `agent_of` finds or makes it.

    Blocks and the summary are replaced; messages and passages are added, all in
    one transaction, after the whole file was checked: a malformed file or an error
    while writing leaves memory as it was. Vectors are computed after the commit.
    Raises ValueError when `data` is not a valid export, StorageError when writing failed.
    """
    # a file from outside: lone surrogates (json.loads accepts their escapes) cannot be stored
    data = without_surrogates_in(data)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f'missing "format": "{FORMAT}"')
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported version {data.get('version')!r}")
    try:
        key = str(key or data["agent"]["key"])
        summary = str(data["agent"].get("summary", ""))
        blocks = [(str(b["label"]), str(b["value"]), int(b["limit"]), str(b.get("description", ""))) for b in data["blocks"]]
        messages = [
            (
                recall.Message(
                    role=str(m["role"]),
                    content=str(m.get("content") or ""),
                    author=str(m.get("author", "")),
                    author_id=str(m.get("author_id", "")),
                    tool_calls=_calls(m.get("tool_calls")),
                    tool_call_id=m.get("tool_call_id"),
                    created_at=_stamp(m["created_at"]),
                ),
                bool(m.get("in_context")),
            )
            for m in data["messages"]
        ]
        passages = [
            (str(p["content"]), [str(t) for t in p.get("tags") or []], str(p.get("source", "")), _stamp(p["created_at"]))
            for p in data["passages"]
        ]
        scheduled = events.checked_rows(data.get("events"))  # absent in exports made before events
        persons = [(str(p["user_id"]), str(p["value"]), int(p["limit"])) for p in data.get("people") or []]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"missing or malformed field {exc}") from None
    for user_id, value, limit in persons:
        if not (user_id.isascii() and user_id.isdigit() and len(user_id) <= 20):
            raise ValueError(f"person block user_id {user_id[:40]!r} is not a Discord id")
        if not 0 < limit <= MAX_PERSON_LIMIT:
            raise ValueError(f"the person block of {user_id} has a limit of {limit}; limits go from 1 to {MAX_PERSON_LIMIT}")
        if len(value) > limit:
            raise ValueError(f"the person block of {user_id} holds {len(value)} characters, over its limit of {limit}")
    for m, _ in messages:
        if m.role not in recall.ROLES:
            raise ValueError(f"message role {m.role!r} is not one of {list(recall.ROLES)}")
        if m.tool_call_id is not None and not isinstance(m.tool_call_id, str):
            raise ValueError(f"tool_call_id {m.tool_call_id!r} is not a string")
    labels = [label for label, *_ in blocks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a block label appears twice: {sorted(labels)}")
    agent = await agent_of(key)
    current = {b.label: b.limit for b in await core.blocks(db, agent)}
    for label, value, limit, _ in blocks:
        if len(value) > current.get(label, limit):
            raise ValueError(f"block {label!r} holds {len(value)} characters, over its limit of {current.get(label, limit)}")

    evicted = [m for m, kept in messages if not kept]
    # in-context messages go last and in order, so tool calls keep their results
    in_context = [m for m, kept in messages if kept]
    recall.prepare(evicted + in_context)
    pieces = [
        (found, archival.clean_tags(tags), source, created_at)
        for content, tags, source, created_at in passages
        if (found := archival.chunk(content))
    ]
    stamp = now()

    def write(c: sqlite3.Connection) -> None:
        for label, value, limit, description in blocks:
            c.execute(
                "INSERT INTO blocks(agent_id, label, value, char_limit, description, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(agent_id, label) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (agent.id, label, value, limit, description, stamp),
            )
        c.execute("UPDATE agents SET summary = ? WHERE id = ?", (summary, agent.id))
        c.executemany(
            "INSERT INTO people(agent_id, user_id, value, char_limit, updated_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(agent_id, user_id) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            [(agent.id, user_id, value, limit, stamp) for user_id, value, limit in persons],
        )
        recall.insert(c, agent, evicted, recall.EVICTED)
        recall.insert(c, agent, in_context, recall.IN_CONTEXT)
        for found, tags, source, created_at in pieces:
            archival.store(c, agent, found, tags, source, created_at)
        events.import_rows(c, agent, scheduled)

    # one transaction: an error anywhere leaves memory as it was
    try:
        await db.transact(write)
    except sqlite3.Error as exc:
        raise StorageError(f"the import failed and changed nothing: {exc}") from exc
    await archive.embed_pending(agent)
    return {
        "agent": agent.key,
        "blocks": len(blocks),
        "messages": len(messages),
        "passages": len(passages),
        "events": len(scheduled),
    }


def _stamp(value: object) -> str:
    """A stored time stamp, or ValueError: search and ordering compare them as text."""
    stamp = search.parse_date(value, "created_at")
    if stamp is None:
        raise TypeError("created_at")
    return stamp


def _calls(value: object) -> list[dict[str, Any]] | None:
    """Tool calls in the shape the model client writes them, or TypeError."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise TypeError("tool_calls")
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(function, dict)
            and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str)
            and isinstance(call.get("id", ""), str)
        ):
            raise TypeError("tool_calls")
    try:
        json.dumps(value, allow_nan=False)  # NaN would be stored, then fail every read of the row
    except ValueError:
        raise TypeError("tool_calls") from None
    return value
