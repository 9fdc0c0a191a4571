"""Recall memory: every message ever exchanged, kept forever and searchable.

The newest messages are also the in-context queue (`in_context = 1`); eviction
only clears that flag, so nothing leaves recall.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import fulltext, search, tokens
from .agents import Agent
from .clock import minute, now
from .db import Database, marks, sqlite3

ROLES = ("user", "assistant", "tool", "system")

# messages.in_context
EVICTED, IN_CONTEXT, WAITING = 0, 1, 2
# messages stored in one transaction that is still quick (Database.transact)
QUICK_MESSAGES = 8


@dataclass
class Message:
    role: str
    content: str = ""
    author: str = ""
    author_id: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    external_id: str | None = None
    created_at: str = field(default_factory=now)
    id: int = 0
    tokens: int = 0

    def to_openai(self) -> dict[str, Any]:
        """The message as the model sees it: who and when, for user text and events."""
        when = minute(self.created_at)
        if self.role == "user":
            name = _NOT_IN_NAMES.sub("", self.author) or "user"
            who = f"{name} ({self.author_id})" if self.author_id else name
            return {"role": "user", "content": f"[{when}] {who}: {quoted(self.content)}"}
        if self.role == "system":
            # mid-conversation system messages break many local chat templates
            return {"role": "user", "content": f"[{when} system event] {self.content}"}
        if self.role == "tool":
            return {"role": "tool", "tool_call_id": self.tool_call_id or "", "content": self.content}
        # "" and never null: llama-cpp-python and llama.cpp answer HTTP 500 to a null content
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out

    def index_text(self) -> str:
        """What full-text search sees: the words people and the agent said."""
        return fulltext.said(self.role, self.content, self.tool_calls)

    def visible_text(self) -> str:
        """The text a person saw (the reply for assistant rows; inner monologue is never shown)."""
        if self.role != "assistant" or not self.tool_calls:
            return self.content
        return "\n".join(t for t in self.index_text().split("\n") if t and t != self.content)


# a name is shown as "name (id)": brackets, parentheses and colons in it could fake another header
_NOT_IN_NAMES = re.compile(r"[\[\]():\n\r\t\v\f\x85\u2028\u2029]")


def quoted(text: str) -> str:
    """Every line after the first as a quote ("> "): a person's text cannot start a line of its
    own, so it can never pass for another message's header or a system event."""
    return "\n> ".join(text.splitlines())


_COLUMNS = "id, role, content, author, author_id, tool_calls, tool_call_id, external_id, created_at, tokens"


def _row(row: Any) -> Message:
    """A row of `SELECT {_COLUMNS}`. Every turn reads its whole context back, so this is hot:
    unpacked by position (sqlite3.Row's lookups by name are slower), JSON by orjson."""
    id_, role, content, author, author_id, tool_calls, tool_call_id, external_id, created_at, tokens = row
    return Message(
        role,
        content,
        author,
        author_id,
        orjson.loads(tool_calls) if tool_calls else None,
        tool_call_id,
        external_id,
        created_at,
        id_,
        tokens,
    )


async def append(db: Database, agent: Agent, messages: list[Message], *, state: int = IN_CONTEXT) -> list[Message]:
    """Persist messages (one transaction), filling in their ids and token counts.

    WAITING messages are in recall at once but enter the context only when a
    turn admits them, so they never land in the middle of a running turn.
    """
    prepare(messages)
    if messages:
        await db.transact(lambda c: insert(c, agent, messages, state), quick=len(messages) <= QUICK_MESSAGES)
    return messages


def prepare(messages: list[Message]) -> None:
    """Check and count messages before `insert`: outside the transaction, which other agents wait for."""
    for m in messages:
        if m.role not in ROLES:
            raise ValueError(f"unknown role {m.role!r}")
        m.content = m.content.replace("\x00", "")
        m.tokens = tokens.count_message(m.to_openai())


def insert(c: sqlite3.Connection, agent: Agent, messages: list[Message], state: int = IN_CONTEXT) -> None:
    """`append` inside a transaction, for messages `prepare` has seen."""
    for m in messages:
        cur = c.execute(
            "INSERT INTO messages(agent_id, role, author, author_id, content, tool_calls, tool_call_id,"
            " external_id, created_at, in_context, tokens, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " CASE WHEN ?10 = 1 THEN (SELECT coalesce(max(position), 0) + 1 FROM messages WHERE agent_id = ?1 AND in_context = 1) END)",
            (
                agent.id,
                m.role,
                m.author,
                m.author_id,
                m.content,
                json.dumps(m.tool_calls) if m.tool_calls else None,
                m.tool_call_id,
                m.external_id,
                m.created_at,
                state,
                m.tokens,
            ),
        )
        m.id = cur.lastrowid or 0
    fulltext.index_messages(c, agent.id, [(m.id, m.role, m.content, m.tool_calls) for m in messages])


_IN_CONTEXT = f"SELECT {_COLUMNS} FROM messages WHERE agent_id = ? AND in_context = 1 ORDER BY position"


async def in_context(db: Database, agent: Agent) -> list[Message]:
    return [_row(r) for r in await db.fetchall(_IN_CONTEXT, (agent.id,))]


def read_in_context(c: sqlite3.Connection, agent: Agent) -> list[Message]:
    """`in_context` inside a transaction."""
    return [_row(r) for r in c.execute(_IN_CONTEXT, (agent.id,))]


def admit_waiting(c: sqlite3.Connection, agent: Agent, budget: int) -> tuple[int, int]:
    """Move waiting messages into the context, in the order they arrived (inside a transaction).

    Only the newest `budget` tokens of them: a busy channel can pile up more
    chatter between two mentions than a window holds. The older ones go straight
    to recall (searchable, never summarized). Returns how many did, and the id of
    the newest message admitted (0 if none).
    """
    waiting = c.execute(
        "SELECT id, tokens FROM messages WHERE agent_id = ? AND in_context = 2 ORDER BY id DESC", (agent.id,)
    ).fetchall()
    total, first_kept = 0, None
    newest = waiting[0][0] if waiting else 0
    for message_id, size in waiting:
        total += size
        if total > budget and first_kept is not None:
            break
        first_kept = message_id
    if first_kept is None:
        return 0, 0
    filed = 0
    if first_kept != waiting[-1][0]:  # not all of them fit
        filed = c.execute(
            "UPDATE messages SET in_context = 0 WHERE agent_id = ? AND in_context = 2 AND id < ?", (agent.id, first_kept)
        ).rowcount
    c.execute(
        "UPDATE messages SET in_context = 1, position = base + n FROM ("
        " SELECT id AS wid, row_number() OVER (ORDER BY id) AS n,"
        " (SELECT coalesce(max(position), 0) FROM messages WHERE agent_id = ?1 AND in_context = 1) AS base"
        " FROM messages WHERE agent_id = ?1 AND in_context = 2) WHERE messages.id = wid",
        (agent.id,),
    )
    return filed, newest


async def count(db: Database, agent: Agent) -> int:
    return await db.fetchval("SELECT count(*) FROM messages WHERE agent_id = ?", (agent.id,), 0)


async def get(db: Database, agent: Agent, ids: list[int]) -> list[Message]:
    in_ids = marks(len(ids))
    rows = await db.fetchall(
        f"SELECT {_COLUMNS} FROM messages WHERE agent_id = ? AND id IN ({in_ids}) ORDER BY id", (agent.id, *ids)
    )
    return [_row(r) for r in rows]


async def delete(db: Database, agent: Agent, ids: list[int]) -> int:
    """Delete specific messages (a user's "forget"); the engine itself never deletes."""
    return await db.transact(lambda c: forget(c, agent, ids)) if ids else 0


def forget(c: sqlite3.Connection, agent: Agent, ids: list[int]) -> int:
    """`delete` inside a transaction; returns how many of `ids` were the agent's."""
    if not ids:
        return 0
    chosen = c.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE agent_id = ? AND id IN ({marks(len(ids))})", (agent.id, *ids)
    ).fetchall()
    doomed = {r["id"]: r for r in chosen}
    # A call and its results must stay together or the provider rejects the
    # context: a call leaves with its results (stored right after it, in one
    # transaction), and a result on its own is blanked instead of deleted.
    for r in chosen:
        if r["role"] == "assistant" and r["tool_calls"]:
            for result in c.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE agent_id = ? AND role = 'tool' AND id BETWEEN ? AND ?",
                (agent.id, r["id"] + 1, r["id"] + len(json.loads(r["tool_calls"]))),
            ):
                doomed[result["id"]] = result
    alone = [r for r in chosen if r["role"] == "tool" and not _follows_doomed(r, doomed)]
    for r in alone:
        del doomed[r["id"]]
        c.execute("UPDATE messages SET content = '[forgotten]' WHERE id = ?", (r["id"],))
    _delete(c, agent, list(doomed.values()))
    return len(chosen)


def _follows_doomed(result: Any, doomed: dict[int, Any]) -> bool:
    """Whether this tool result belongs to an assistant call that is being deleted."""
    return any(
        r["role"] == "assistant" and r["tool_calls"] and r["id"] < result["id"] <= r["id"] + len(json.loads(r["tool_calls"]))
        for r in doomed.values()
    )


def _delete(c: sqlite3.Connection, agent: Agent, rows: Iterable[Any]) -> int:
    messages = [_row(r) for r in rows]
    fulltext.unindex_messages(c, agent.id, [(m.id, m.role, m.content, m.tool_calls) for m in messages])
    for i in range(0, len(messages), 500):
        part = [m.id for m in messages[i : i + 500]]
        c.execute(f"DELETE FROM messages WHERE id IN ({marks(len(part))})", part)
    return len(messages)


async def clear(db: Database, agent: Agent) -> None:
    """Forget the whole conversation: recall, the in-context queue and the summary."""
    await db.transact(lambda c: wipe(c, agent))


def wipe(c: sqlite3.Connection, agent: Agent) -> None:
    """`clear` inside a transaction."""
    _delete(c, agent, c.execute(f"SELECT {_COLUMNS} FROM messages WHERE agent_id = ?", (agent.id,)))
    c.execute("UPDATE agents SET summary = '', summary_updated_at = NULL, pressure_warned = 0 WHERE id = ?", (agent.id,))


async def search_messages(
    db: Database,
    agent: Agent,
    query: str,
    *,
    start_date: str | None = None,
    end_date: str | None = None,
    roles: list[str] | None = None,
    page: object = 1,
    page_size: int = search.PAGE_SIZE,
    for_people: bool = False,
) -> search.Page:
    """Ranked full-text search; with an empty query, messages in the date range, newest first.

    `for_people`: only what people saw in the conversation (messages, replies, system events):
    not function results, nor the agent's private thoughts beside its calls.
    Raises search.BadArgument for arguments the caller should correct.
    """
    filters, params = search.base_filters("m", agent.id, start_date, end_date)
    if for_people:
        filters.append(
            "m.role != 'tool' AND (m.role != 'assistant' OR m.tool_calls IS NULL OR m.tool_calls LIKE '%\"send\\_message\"%' ESCAPE '\\')"
        )
    number = search.page_number(page)
    if roles:
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise search.BadArgument(f"unknown role(s) {bad}; use any of {list(ROLES)}")
        filters.append(f"m.role IN ({marks(len(roles))})")
        params.extend(roles)
    where = " AND ".join(filters)
    expression = fulltext.match(agent.id, query or "", "{content}")
    if expression:
        source = "messages_fts f JOIN messages m ON m.id = f.rowid"
        where = f"messages_fts MATCH ? AND {where}"
        params.insert(0, expression)
        order = "bm25(messages_fts)"
    elif query and query.strip():  # words were all too long or not words: nothing can match
        return search.Page([], 0, number, page_size)
    else:
        source, order = "messages m", "m.id DESC"
    total = await db.fetchval(f"SELECT count(*) FROM {source} WHERE {where}", params, 0)
    rows = await db.fetchall(
        f"SELECT {', '.join('m.' + c.strip() for c in _COLUMNS.split(','))} FROM {source} WHERE {where}"
        f" ORDER BY {order} LIMIT ? OFFSET ?",
        (*params, page_size, (number - 1) * page_size),
    )
    hits = []
    for r in rows:
        m = _row(r)
        label = m.author or m.role if m.role == "user" else m.role
        text = m.visible_text() if m.role != "system" else m.content
        hits.append(search.Hit(m.id, m.created_at, text, label))
    return search.Page(hits, total, number, page_size)
