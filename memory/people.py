"""Person blocks: a channel agent's small core block about each person it talks with.

A channel's one shared block would make what it knows about each person compete
for the same few thousand characters. Each person gets a block of their own,
keyed by (agent, platform user id), so it can never show in another channel or in
a DM: only its own agent reads it. The prompt holds the blocks of the people whose
messages are in the context window, most recent speakers first, within a share of
the window; the model reads and edits any block (also of people not shown) with
the core_memory_* tools and the label "person:<user id or name>".

Rows exist only for people with something written about them, so a channel of
strangers costs one header line in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import tokens
from .agents import Agent
from .clock import now
from .core import Edit, quote
from .db import Database, marks, sqlite3

PREFIX = "person:"
# used when the engine did not record PERSON_LIMIT (an engine made without Engine.open)
DEFAULT_LIMIT = 600
# person blocks may take at most 1/PROMPT_SHARE of the context window
PROMPT_SHARE = 10
HEADER = (
    'People (each person\'s own block, label "person:<id>"; to read one not shown here, core_memory_append to it'
    " with empty content):"
)


@dataclass(frozen=True)
class Person:
    user_id: str
    name: str
    value: str
    limit: int


def is_person_label(label: str) -> bool:
    return label.strip().lower().startswith(PREFIX)


def for_channel(agent: Agent) -> bool:
    """Only channel agents talk with many people; a DM agent has its `human` block."""
    return agent.key.startswith("channel:")


def present(c: sqlite3.Connection, agent: Agent, speakers: list[tuple[str, str]]) -> list[Person]:
    """The blocks of these (user id, current name) speakers that hold something, in the order given."""
    if not speakers:
        return []
    ids = [uid for uid, _ in speakers]
    rows = {
        r[0]: r
        for r in c.execute(
            f"SELECT user_id, value, char_limit FROM people WHERE agent_id = ? AND user_id IN ({marks(len(ids))}) AND value != ''",
            (agent.id, *ids),
        )
    }
    return [Person(uid, name, rows[uid][1], rows[uid][2]) for uid, name in speakers if uid in rows]


def render(people: list[Person], budget: int) -> str:
    """The header and as many blocks as fit `budget` tokens, in order; the rest are named for the model to read."""
    parts, used, left_out = [HEADER], 0, []
    for p in people:
        text = f'<person id="{p.user_id}" name="{_attr(p.name)}" chars="{len(p.value)}/{p.limit}">\n{p.value}\n</person>'
        cost = tokens.count(text)
        if used + cost > budget:
            left_out.append(p.user_id)
            continue
        parts.append(text)
        used += cost
    if left_out:
        parts.append(f"(blocks not shown for lack of room: {', '.join('person:' + i for i in left_out)})")
    return "\n".join(parts)


def _attr(name: str) -> str:
    return name.replace('"', "'").replace("<", "").replace(">", "").replace("\n", " ")[:64]


def _limit(c: sqlite3.Connection) -> int:
    row = c.execute("SELECT value FROM meta WHERE key = 'person_limit'").fetchone()
    return int(row[0]) if row else DEFAULT_LIMIT


def _resolve(c: sqlite3.Connection, agent: Agent, label: str) -> str | Edit:
    """The user id a "person:<id or name>" label means, or a refusal that says how to name someone."""
    who = label.strip()[len(PREFIX) :].strip().lstrip("@")
    if not who:
        return Edit(False, 'Error: say whose block: label "person:<user id>" (the id in their messages) or "person:<name>".')
    if who.isascii() and who.isdigit() and len(who) <= 20:
        return who
    # a name: the people who wrote here under it (their ids are in the message headers)
    ids = [
        r[0]
        for r in c.execute(
            "SELECT DISTINCT author_id FROM messages WHERE agent_id = ? AND role = 'user' AND author = ? COLLATE NOCASE"
            " AND author_id != '' LIMIT 5",
            (agent.id, who),
        )
    ]
    if len(ids) == 1:
        return str(ids[0])
    if not ids:
        return Edit(
            False, f'Error: nobody named {quote(who)} wrote here. Use label "person:<user id>" with the id from their messages.'
        )
    return Edit(False, f'Error: several people are named {quote(who)} (ids {", ".join(ids)}); use "person:<user id>".')


def _edit(c: sqlite3.Connection, agent: Agent, label: str, change: str, content: str, old: str = "") -> Edit:
    if not for_channel(agent):
        return Edit(False, 'Error: person blocks exist in channels only; here, use the "human" block.')
    user_id = _resolve(c, agent, label)
    if isinstance(user_id, Edit):
        return user_id
    row = c.execute("SELECT value, char_limit FROM people WHERE agent_id = ? AND user_id = ?", (agent.id, user_id)).fetchone()
    value, limit = (row[0], row[1]) if row else ("", _limit(c))
    name = f"person:{user_id}"
    if change == "append":
        content = content.strip()
        if not content:  # how the model reads a block the prompt does not show; not an edit
            return Edit(
                False, f"Nothing was appended. {name} holds ({len(value)}/{limit} characters):\n{value or '(nothing yet)'}"
            )
        new_value = f"{value}\n{content}" if value else content
    else:
        if not old:
            return Edit(False, "Error: old_content is empty. Quote the exact text to change; to add text use core_memory_append.")
        found = value.count(old)
        if found != 1:
            where = "does not occur" if not found else f"occurs {found} times"
            return Edit(
                False, f"Error: {quote(old)} {where} in block {name!r}. Quote the exact text as the block shows it, once."
            )
        new_value = value.replace(old, content, 1)
    if len(new_value) > limit:
        return Edit(
            False,
            f"Error: block {name!r} would hold {len(new_value)} characters; its limit is {limit} (now {len(value)}). "
            "Condense it with core_memory_replace, or save details with archival_memory_insert.",
        )
    c.execute(
        "INSERT INTO people(agent_id, user_id, value, char_limit, updated_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT(agent_id, user_id) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (agent.id, user_id, new_value, limit, now()),
    )
    return Edit(True, f"{'Appended to' if change == 'append' else 'Changed'} {name!r} ({len(new_value)}/{limit} characters).")


async def append(db: Database, agent: Agent, label: str, content: str) -> Edit:
    # read and written in one transaction: a consolidation pass may edit the same block beside a turn
    return await db.transact(lambda c: _edit(c, agent, label, "append", content))


async def replace(db: Database, agent: Agent, label: str, old: str, new: str) -> Edit:
    return await db.transact(lambda c: _edit(c, agent, label, "replace", new, old))


async def block(db: Database, agent: Agent, user_id: str) -> str:
    return str(await db.fetchval("SELECT value FROM people WHERE agent_id = ? AND user_id = ?", (agent.id, user_id), ""))


async def clear(db: Database, agent: Agent, user_id: str) -> bool:
    """Empty one person's block in one agent; whether there was one."""
    return await db.execute("DELETE FROM people WHERE agent_id = ? AND user_id = ?", (agent.id, user_id)) > 0
