"""Agents: one per stable key (`dm:<user id>`, `channel:<channel id>`, `local:<name>`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .clock import now
from .config import EngineSettings
from .db import Database, sqlite3

DEFAULT_PERSONA = (
    "I am a friendly, curious assistant with a long memory. I keep notes about the people "
    "I talk with and refer back to past conversations when it helps. I am concise."
)


@dataclass(frozen=True)
class Agent:
    id: int
    key: str


def default_blocks(key: str, settings: EngineSettings) -> list[tuple[str, str, int, str]]:
    """(label, value, limit, description) for a new agent.

    A DM agent keeps notes on its one human; a channel agent talks with many
    people, so its second block is about the channel and who is in it.
    """
    persona = ("persona", DEFAULT_PERSONA, settings.persona_limit, "who you are and how you speak")
    if key.startswith("channel:"):
        return [
            persona,
            ("channel", "", settings.channel_limit, "what this channel is about, its regulars and their preferences"),
        ]
    return [persona, ("human", "", settings.human_limit, "facts about the person you are talking with")]


async def get_or_create(db: Database, key: str, settings: EngineSettings) -> Agent:
    row = await db.fetchone("SELECT id FROM agents WHERE key = ?", (key,))
    if row:
        return Agent(row[0], key)

    def create(c: sqlite3.Connection) -> int:
        stamp = now()
        # another task may have created it since the read: IGNORE
        c.execute("INSERT OR IGNORE INTO agents(key, created_at) VALUES (?, ?)", (key, stamp))
        (agent_id,) = c.execute("SELECT id FROM agents WHERE key = ?", (key,)).fetchone()
        c.executemany(
            "INSERT OR IGNORE INTO blocks(agent_id, label, value, char_limit, description, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            [(agent_id, label, value, limit, desc, stamp) for label, value, limit, desc in default_blocks(key, settings)],
        )
        return int(agent_id)

    return Agent(await db.transact(create, quick=True), key)


async def find(db: Database, key: str) -> Agent | None:
    row = await db.fetchone("SELECT id FROM agents WHERE key = ?", (key,))
    return Agent(row[0], key) if row else None


async def get_options(db: Database, agent: Agent) -> dict[str, Any]:
    return json.loads(await db.fetchval("SELECT options FROM agents WHERE id = ?", (agent.id,), "{}"))


async def set_option(db: Database, agent: Agent, name: str, value: Any) -> None:
    await db.execute(
        "UPDATE agents SET options = json_set(options, '$.' || ?, json(?)) WHERE id = ?", (name, json.dumps(value), agent.id)
    )
