"""The SQLite file itself: sqlite-vec loaded, migrations, durability."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from memory import agents, core, recall
from memory.config import EngineSettings
from memory.db import MIGRATIONS, Database, StorageError, sqlite3


async def test_sqlite_vec_and_fts5_available(db: Database) -> None:
    assert (await db.fetchval("SELECT vec_version()")).startswith("v")
    assert await db.fetchval("SELECT vec_length(vec_f32('[1,2,3]'))") == 3
    assert await db.fetchval("PRAGMA journal_mode") == "wal"


async def test_transactions_committed_together_still_fail_alone(db: Database) -> None:
    def put(key: str) -> Callable[[sqlite3.Connection], int]:
        return lambda c: c.execute("INSERT INTO meta(key, value) VALUES (?, 'v')", (key,)).rowcount

    def half_then_fail(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO meta(key, value) VALUES ('half', 'v')")
        raise ValueError("no")

    # the first goes alone; the others queue behind it and share the next commit
    results = await asyncio.gather(
        db.transact(put("first")), db.transact(put("a")), db.transact(half_then_fail), db.transact(put("b")),
        return_exceptions=True,
    )
    assert results[:2] == [1, 1] and isinstance(results[2], ValueError) and results[3] == 1
    cancelled = asyncio.create_task(db.transact(put("cancelled")))
    await asyncio.sleep(0)  # queued
    cancelled.cancel()
    await db.transact(put("last"))
    keys = {row[0] for row in await db.fetchall("SELECT key FROM meta")}
    assert keys == {"first", "a", "b", "cancelled", "last"}  # a cancelled caller's transaction still commits


async def test_older_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = await Database.open(path, migrations=MIGRATIONS[:1])
    await old.execute("INSERT INTO agents(key, created_at) VALUES ('dm:1', '2024-01-01T00:00:00Z')")
    await old.close()
    new = await Database.open(path)
    names = [r[0] for r in await new.fetchall("SELECT name FROM _migrations ORDER BY rowid")]
    assert names == [m.__name__ for m in MIGRATIONS]
    assert await new.fetchval("SELECT key FROM agents") == "dm:1"
    assert await new.fetchval("SELECT count(*) FROM messages") == 0
    await new.close()


async def test_write_that_returned_is_on_disk(tmp_path: Path, settings: EngineSettings) -> None:
    path = tmp_path / "durable.db"
    db = await Database.open(path)
    agent = await agents.get_or_create(db, "dm:7", settings)
    await recall.append(db, agent, [recall.Message(role="user", content="remember the blue door", author="ann", author_id="7")])
    await core.append(db, agent, "human", "Ann likes blue doors.")
    # no close() first: the process may die right after a write returns
    again = await Database.open(path)
    agent2 = await agents.get_or_create(again, "dm:7", settings)
    assert agent2 == agent
    page = await recall.search_messages(again, agent2, "blue door")
    assert page.total == 1
    assert "Ann likes blue doors." in core.render(await core.blocks(again, agent2))
    await again.close()
    await db.close()


async def test_unusable_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="not-a-db.db"):
        await Database.open(bad)


async def test_agents_created_once_with_kind_specific_blocks(db: Database, settings: EngineSettings) -> None:
    dm = await agents.get_or_create(db, "dm:1", settings)
    assert await agents.get_or_create(db, "dm:1", settings) == dm
    channel = await agents.get_or_create(db, "channel:9", settings)
    assert [b.label for b in await core.blocks(db, dm)] == ["persona", "human"]
    assert [b.label for b in await core.blocks(db, channel)] == ["persona", "channel"]
