"""The SQLite file itself: sqlite-vec loaded, migrations, durability."""

from __future__ import annotations

import asyncio
import os
import random
import string
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from memory import agents, core, recall
from memory.config import EngineSettings
from memory.db import Database, StorageError, StorageFull, sqlite3
from memory.migrations import MIGRATIONS


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
        db.transact(put("first")),
        db.transact(put("a")),
        db.transact(half_then_fail),
        db.transact(put("b")),
        return_exceptions=True,
    )
    assert results[:2] == [1, 1] and isinstance(results[2], ValueError) and results[3] == 1
    cancelled = asyncio.create_task(db.transact(put("cancelled")))
    await asyncio.sleep(0)  # queued
    cancelled.cancel()
    await db.transact(put("last"))
    keys = {row[0] for row in await db.fetchall("SELECT key FROM meta WHERE key != 'fts_unicode'")}
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


async def test_full_text_rows_of_an_older_database_are_indexed_anew(tmp_path: Path, settings: EngineSettings) -> None:
    """m004 rebuilds both FTS indexes from the rows, with each agent's marked terms."""
    path = tmp_path / "old.db"
    old = await Database.open(path, migrations=MIGRATIONS[:3])
    for key in ("dm:1", "channel:2"):
        await old.execute("INSERT INTO agents(key, created_at) VALUES (?, '2024-01-01T00:00:00Z')", (key,))
    # rows as the code before m004 wrote them: an agent column in each FTS table
    await old.transact(
        lambda c: (
            c.execute(
                "INSERT INTO messages(id, agent_id, role, content, created_at) VALUES (1, 1, 'user', 'the heron nests by the weir', '2024-05-08T10:00:00Z')"
            ),
            c.execute("INSERT INTO messages_fts(rowid, agent, content) VALUES (1, 'a1', 'the heron nests by the weir')"),
            c.execute(
                "INSERT INTO passages(id, agent_id, content, created_at, text_hash) VALUES (7, 2, 'Herons were counted in May.', '2024-05-08T10:00:00Z', 'h')"
            ),
            c.execute(
                "INSERT INTO passages_fts(rowid, agent, content, context, date) VALUES (7, 'a2', 'Herons were counted in May.', '', '8 May 2024')"
            ),
        )
    )
    await old.close()

    from memory.archival import Archive

    new = await Database.open(path)
    dm = await agents.get_or_create(new, "dm:1", settings)
    channel = await agents.get_or_create(new, "channel:2", settings)
    assert [h.id for h in (await recall.search_messages(new, dm, "herons")).hits] == [1]
    assert (await recall.search_messages(new, channel, "herons")).total == 0
    archive = Archive(new, None)
    assert [h.id for h in (await archive.search(channel, "heron counts 8 May")).hits] == [7]
    assert (await archive.search(dm, "heron")).total == 0
    await new.close()


def test_ascii_text_is_cut_into_the_same_words_by_the_fast_path() -> None:
    from memory import fulltext

    rng = random.Random(7)
    samples = ["".join(map(chr, range(128))), "snake_case __x__ a1b2 C3PO it's #u17m3: noted, thanks."]
    samples += ["".join(rng.choice(string.printable) for _ in range(200)) for _ in range(200)]
    for text in samples:
        assert fulltext.words(text) == fulltext._words().findall(text)


async def test_words_with_marks_and_accents_are_searchable(db: Database, settings: EngineSettings) -> None:
    agent = await agents.get_or_create(db, "dm:3", settings)
    await recall.append(
        db,
        agent,
        [
            recall.Message(role="user", content="मुझे हिन्दी पसंद है", author="ravi"),
            recall.Message(role="user", content="un Cafe\u0301 crème au bar_tabac", author="léa"),
        ],
    )
    assert (await recall.search_messages(db, agent, "हिन्दी")).total == 1
    assert (await recall.search_messages(db, agent, "हि")).total == 0  # a word is one term, not its first letter
    assert (await recall.search_messages(db, agent, "café creme")).total == 1
    assert (await recall.search_messages(db, agent, "tabac")).total == 1


async def test_float_vectors_of_an_older_database_move_to_passage_vectors(tmp_path: Path, settings: EngineSettings) -> None:
    """m005: vec0 float vectors (the layout before it) become passage_vectors rows and sign bits."""
    import struct

    from memory.archival import Archive
    from memory.embeddings import Embedder

    path = tmp_path / "old.db"
    old = await Database.open(path, migrations=MIGRATIONS[:4])
    await old.execute("INSERT INTO agents(key, created_at) VALUES ('dm:1', '2024-01-01T00:00:00Z')")
    near, far = struct.pack("8f", 1, 0, 0, 0, 0, 0, 0, 0), struct.pack("8f", 0, 0, 0, 0, 0, 0, 0, -1)

    def old_layout(c) -> None:  # type: ignore[no-untyped-def]
        c.execute(
            "CREATE VIRTUAL TABLE passages_vec USING vec0(agent_id INTEGER PARTITION KEY, embedding float[8] distance_metric=l2)"
        )
        c.executemany("INSERT INTO meta VALUES (?, ?)", [("embedding_model", "m8"), ("embedding_dim", "8")])
        for pid, vector in ((1, far), (2, near)):
            c.execute(
                "INSERT INTO passages(id, agent_id, content, created_at, text_hash, embedded) VALUES (?, 1, ?, '2024-01-01T00:00:00Z', ?, 1)",
                (pid, f"p{pid}", f"h{pid}"),
            )
            c.execute("INSERT INTO passages_vec(rowid, agent_id, embedding) VALUES (?, 1, ?)", (pid, vector))

    await old.transact(old_layout)
    await old.close()
    new = await Database.open(path)
    assert await new.fetchval("SELECT count(*) FROM sqlite_master WHERE name = 'passages_vec'") == 0
    assert [tuple(r) for r in await new.fetchall("SELECT id, vector FROM passage_vectors ORDER BY id")] == [(1, far), (2, near)]

    class Query:  # the embedding client: the query's vector is `near`
        async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
            return [[1, 0, 0, 0, 0, 0, 0, 0.1] for _ in texts]

    embedder = Embedder(new, Query(), "m8")  # type: ignore[arg-type]
    await embedder.prepare()
    agent = await agents.get_or_create(new, "dm:1", settings)
    assert await Archive(new, embedder).nearest(agent, "anything", k=2) == [2, 1]
    await new.close()


async def test_a_full_disk_fails_the_batch_with_its_own_error(db: Database) -> None:
    """SQLite rolls a whole transaction back when the file is full: every batched caller hears why."""
    pages = await db.fetchval("PRAGMA page_count")
    await db.transact(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 3}"))
    await db.transact(lambda c: c.execute("INSERT INTO meta VALUES ('first', 'v')"))  # alone: it commits
    results = await asyncio.gather(
        db.transact(lambda c: c.execute("INSERT INTO meta VALUES ('a', 'v')")),
        db.transact(lambda c: c.execute("INSERT INTO meta VALUES ('big', ?)", ("x" * 200_000,))),
        db.transact(lambda c: c.execute("INSERT INTO meta VALUES ('b', 'v')")),
        return_exceptions=True,
    )
    for r in results:
        assert isinstance(r, StorageFull) and str(r).startswith("storage is full: database "), r
    assert [r[0] for r in await db.fetchall("SELECT key FROM meta WHERE key != 'fts_unicode' ORDER BY key")] == ["first"]
    await db.transact(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))


async def test_full_text_is_indexed_anew_when_pythons_unicode_tables_change(tmp_path: Path, settings: EngineSettings) -> None:
    from memory.archival import Archive

    path = tmp_path / "u.db"
    db = await Database.open(path)
    agent = await agents.get_or_create(db, "dm:1", settings)
    await Archive(db, None).insert(agent, "the swordfish lives in the bay")
    # a row the index can no longer forget, as words cut by other Unicode tables would leave
    await db.transact(
        lambda c: c.execute("INSERT INTO passages_fts(rowid, content) VALUES (999, ?)", (f"x{agent.id}xswordfish",))
    )
    assert (await Archive(db, None).search(agent, "swordfish")).total == 2
    await db.execute("UPDATE meta SET value = '13.0.0' WHERE key = 'fts_unicode'")
    await db.close()
    again = await Database.open(path)
    assert (await Archive(again, None).search(agent, "swordfish")).total == 1
    import unicodedata

    assert await again.fetchval("SELECT value FROM meta WHERE key = 'fts_unicode'") == unicodedata.unidata_version
    await again.close()


# --- group commit ------------------------------------------------------------


async def test_queued_transactions_commit_in_batches_of_at_most_batch_in_order(db: Database, settings: EngineSettings) -> None:
    """Each transaction reports how many rows were committed when it ran, as another connection sees them."""
    from memory.db import BATCH

    probe = sqlite3.connect(settings.database_path, check_same_thread=False)
    release, started = threading.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocker(c: sqlite3.Connection) -> int:
        loop.call_soon_threadsafe(started.set)
        release.wait()
        return put("k00")(c)

    def put(key: str) -> Callable[[sqlite3.Connection], int]:
        def run(c: sqlite3.Connection) -> int:
            committed = probe.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0]
            c.execute("INSERT INTO meta(key, value) VALUES (?, 'v')", (key,))
            return committed

        return run

    first = asyncio.create_task(db.transact(blocker))
    await started.wait()  # the writer is busy: everything below queues
    keys = [f"k{n:02}" for n in range(1, 2 * BATCH + 4)]
    queued = [asyncio.create_task(db.transact(put(k))) for k in keys]
    release.set()
    seen = await asyncio.gather(first, *queued)
    probe.close()
    assert seen == [0] + [1] * BATCH + [1 + BATCH] * BATCH + [1 + 2 * BATCH] * 3
    assert [r[0] for r in await db.fetchall("SELECT key FROM meta WHERE key LIKE 'k%' ORDER BY rowid")] == ["k00", *keys]


async def test_the_writer_keeps_committing_queued_batches_while_the_event_loop_is_busy(db: Database) -> None:
    """A busy event loop must not leave the writer idle between batches: under load that made
    every transaction wait for the loop's next pass (bench/bot_load.py, ~100 ms per trip)."""
    from memory.db import BATCH

    release, started, last = threading.Event(), asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    def blocker(c: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(started.set)
        release.wait()

    def put(n: int) -> Callable[[sqlite3.Connection], None]:
        def run(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO meta(key, value) VALUES (?, 'v')", (f"w{n}",))
            if n == 3 * BATCH - 1:
                last.set()

        return run

    first = asyncio.create_task(db.transact(blocker))
    await started.wait()
    queued = [asyncio.create_task(db.transact(put(n))) for n in range(3 * BATCH)]
    # one pass runs the tasks (each queues its transaction), the next hands them to the writer
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    release.set()
    # the event loop's thread is blocked here: only the writer itself can go on to the next batches
    assert last.wait(timeout=5), "the writer waited for the event loop between batches"
    await asyncio.gather(first, *queued)
    assert await db.fetchval("SELECT count(*) FROM meta WHERE key LIKE 'w%'") == 3 * BATCH


async def test_quick_transactions_run_on_the_loop_while_the_writer_thread_is_idle_and_queue_behind_it_otherwise(
    db: Database,
) -> None:
    loop_thread = threading.get_ident()
    ran: list[tuple[str, int]] = []

    def note(name: str) -> Callable[[sqlite3.Connection], None]:
        def run(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO meta(key, value) VALUES (?, 'v')", (name,))
            ran.append((name, threading.get_ident()))

        return run

    await db.transact(note("quick"), quick=True)
    await db.transact(note("slow"))
    assert ran[0] == ("quick", loop_thread) and ran[1][0] == "slow" and ran[1][1] != loop_thread

    # while the thread is busy, a quick one waits behind what is queued there, in order
    release, started = threading.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocker(c: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(started.set)
        release.wait()
        note("blocker")(c)

    first = asyncio.create_task(db.transact(blocker))
    await started.wait()
    behind = asyncio.create_task(db.transact(note("quick behind"), quick=True))
    # one pass runs the task (it queues its transaction), the next hands it over while the thread is held
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, behind)
    assert [name for name, _ in ran[2:]] == ["blocker", "quick behind"]
    assert ran[3][1] != loop_thread
    # a pass mixing quick and other transactions goes to the thread whole, in order
    await asyncio.gather(db.transact(note("q1"), quick=True), db.transact(note("other")), db.transact(note("q2"), quick=True))
    assert [(name, thread != loop_thread) for name, thread in ran[4:]] == [("q1", True), ("other", True), ("q2", True)]


async def test_a_batchs_full_text_writes_go_together_at_its_end_in_order_without_those_rolled_back(
    db: Database, agent: agents.Agent
) -> None:
    def said(text: str, fail: bool = False) -> Callable[[sqlite3.Connection], None]:
        def run(c: sqlite3.Connection) -> None:
            recall.insert(c, agent, [recall.Message(role="user", content=text, author="ann", author_id="1")])
            if fail:
                raise ValueError("rolled back")

        return run

    def forget(text: str) -> Callable[[sqlite3.Connection], int]:
        def run(c: sqlite3.Connection) -> int:
            (found,) = c.execute("SELECT id FROM messages WHERE content = ?", (text,)).fetchone()
            return recall.forget(c, agent, [found])

        return run

    await db.transact(said("warm up"))  # the index's first segment and its structure record
    segments = await db.fetchval("SELECT count(*) FROM messages_fts_data")
    # one pass of the loop: one batch, a savepoint each
    outcomes = await asyncio.gather(
        db.transact(said("otters swim")),
        db.transact(said("badgers dig", fail=True)),
        db.transact(said("herons wait")),
        db.transact(said("otters again")),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], ValueError)
    # FTS5 writes out a segment at every savepoint and commit it holds terms at: the batch wrote one
    assert await db.fetchval("SELECT count(*) FROM messages_fts_data") == segments + 1
    # a row indexed and forgotten in one batch: deleted from the index after it was added
    assert await asyncio.gather(db.transact(said("kites fly")), db.transact(forget("kites fly"))) == [None, 1]

    async def found(query: str) -> list[str]:
        return sorted(hit.text for hit in (await recall.search_messages(db, agent, query)).hits)

    assert await found("otters") == ["otters again", "otters swim"]
    assert await found("badgers") == [] and await found("kites") == [] and await found("herons") == ["herons wait"]
    await db.transact(lambda c: c.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 0)"))


async def test_held_full_text_writes_past_the_bound_are_done_at_once_and_a_rollback_still_undoes_only_its_own(
    db: Database, agent: agents.Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memory import fulltext

    monkeypatch.setattr(fulltext, "HELD_ROWS", 2)

    def said(*texts: str, fail: bool = False) -> Callable[[sqlite3.Connection], int]:
        def run(c: sqlite3.Connection) -> int:
            for text in texts:  # one write each: the third goes past the bound
                recall.insert(c, agent, [recall.Message(role="user", content=text, author="ann", author_id="1")])
            if fail:
                raise ValueError("rolled back")
            # what the index holds already, as this transaction sees it
            expression = fulltext.match(agent.id, texts[0].split()[0], "{content}")
            return int(c.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH ?", (expression,)).fetchone()[0])

        return run

    # the second transaction's second row does the first one's held write inside its own savepoint
    outcomes = await asyncio.gather(
        db.transact(said("otters swim")),
        db.transact(said("badgers dig", "badgers sleep", "badgers eat", "badgers hide", fail=True)),
        db.transact(said("herons wait", "herons fish", "herons fly")),
        return_exceptions=True,
    )
    # the first held; in the third, the second row goes past the bound: the held writes are done at
    # once (with the first transaction's, restored after the second one's rollback), the third is held
    assert outcomes[0] == 0 and isinstance(outcomes[1], ValueError) and outcomes[2] == 2

    async def found(query: str) -> list[str]:
        return sorted(hit.text for hit in (await recall.search_messages(db, agent, query)).hits)

    assert await found("otters") == ["otters swim"]
    assert await found("badgers") == []
    assert await found("herons") == ["herons fish", "herons fly", "herons wait"]
    await db.transact(lambda c: c.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 0)"))


async def test_checkpoints_run_on_the_writer_thread_and_keep_the_wal_small_under_quick_commits(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    db = await Database.open(path)
    loop_thread = threading.get_ident()
    checkpoints: list[int] = []
    # SQLite's own checkpoints would run inside commits, some of them on the event loop
    assert await db.transact(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0

    def traced(c: sqlite3.Connection) -> None:
        c.set_trace_callback(lambda sql: checkpoints.append(threading.get_ident()) if "wal_checkpoint" in sql else None)

    await db.transact(traced)
    row = "x" * 4000
    for n in range(5000):  # 20 MB written, one commit each, all quick
        await db.transact(lambda c, n=n: c.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (f"r{n}", row)), quick=True)
    wal = path.with_name(path.name + "-wal").stat().st_size
    await db.close()
    assert checkpoints and loop_thread not in checkpoints
    assert wal < 6 << 20, f"the WAL grew to {wal} bytes"


async def test_close_during_a_batch_finishes_every_queued_transaction(tmp_path: Path) -> None:
    path = tmp_path / "closing.db"
    db = await Database.open(path)
    release, started = threading.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocker(c: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(started.set)
        release.wait()
        c.execute("INSERT INTO meta VALUES ('first', 'v')")

    first = asyncio.create_task(db.transact(blocker))
    await started.wait()
    queued = [asyncio.create_task(db.execute("INSERT INTO meta VALUES (?, 'v')", (f"q{n}",))) for n in range(12)]
    closing = asyncio.create_task(db.close())
    await asyncio.sleep(0)  # close() is now waiting on the running batch
    assert not closing.done()
    release.set()
    await closing
    assert first.done() and all(q.result() == 1 for q in queued)
    again = await Database.open(path)
    assert await again.fetchval("SELECT count(*) FROM meta WHERE key = 'first' OR key LIKE 'q%'") == 13
    await again.close()


# --- a hostile file system (issue 13, items 10-12) ----------------------------


async def test_a_read_only_database_file_is_refused_at_open(tmp_path: Path, settings: EngineSettings) -> None:
    path = tmp_path / "ro.db"
    db = await Database.open(path)
    await agents.get_or_create(db, "dm:1", settings)
    await db.close()
    path.chmod(0o444)
    # root writes through permission bits: only the immutable attribute makes a file read-only for it
    immutable = os.geteuid() == 0
    if immutable:
        assert await _run("chattr", "+i", str(path)) == (0, "")
    try:
        with pytest.raises(StorageError) as refused:
            await Database.open(path)
    finally:
        if immutable:
            assert await _run("chattr", "-i", str(path)) == (0, "")
        path.chmod(0o644)
    assert f"database {path} is read-only" in str(refused.value) and "\n" not in str(refused.value)


async def _run(*command: str) -> tuple[int | None, str]:
    """Exit code and standard error of a command."""
    child = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
    _, err = await child.communicate()
    return child.returncode, err.decode()


def _damage_a_page_of(path: Path, table: str) -> None:
    """Overwrite the header of one of `table`'s leaf pages, far from anything a start reads."""
    conn = sqlite3.connect(path)
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    page = conn.execute("SELECT max(pageno) FROM dbstat WHERE name = ? AND pagetype = 'leaf'", (table,)).fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\xff" * 64)


async def _database_with_passages(path: Path, settings: EngineSettings) -> None:
    from memory.archival import Archive

    db = await Database.open(path)
    agent = await agents.get_or_create(db, "dm:1", settings)
    for n in range(40):
        await Archive(db, None).insert(agent, f"passage {n}: " + "the heron nests by the weir " * 20)
    await db.close()


async def test_damaged_pages_are_found_at_open(tmp_path: Path, settings: EngineSettings) -> None:
    path = tmp_path / "damaged.db"
    await _database_with_passages(path, settings)
    _damage_a_page_of(path, "passages")
    with pytest.raises(StorageError) as refused:
        await Database.open(path)
    assert f"database {path} is damaged" in str(refused.value) and "\n" not in str(refused.value)


async def test_a_large_file_gets_a_bounded_check_at_open_and_the_full_one_on_demand(
    tmp_path: Path, settings: EngineSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memory import db as db_module

    path = tmp_path / "large.db"
    await _database_with_passages(path, settings)
    healthy = await Database.open(path)
    assert await healthy.check() == []
    await healthy.close()
    _damage_a_page_of(path, "passages")
    monkeypatch.setattr(db_module, "FULL_CHECK_BYTES", path.stat().st_size - 1)
    db = await Database.open(path)  # the damaged pages are not the ones a bounded check reads
    problems = await db.check()
    await db.close()
    assert problems and all(isinstance(p, str) for p in problems)


_HOLD = """
import asyncio, sys
from memory.db import Database

async def main() -> None:
    db = await Database.open(sys.argv[1])
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await db.close()

asyncio.run(main())
"""


async def test_a_second_process_is_refused_until_the_first_one_dies(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLD,
        str(path),
        cwd=Path(__file__).parent.parent,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"open\n"
        with pytest.raises(StorageError) as refused:
            await Database.open(path)
        message = str(refused.value)
        assert f"database {path} is in use by another process (pid {holder.pid}: " in message and "\n" not in message
    finally:
        holder.kill()
        await holder.wait()
    # the kernel dropped the lock with its holder
    db = await Database.open(path)
    await db.close()


async def test_one_process_opens_a_database_again_after_closing_it(tmp_path: Path) -> None:
    path = tmp_path / "again.db"
    for _ in range(2):
        db = await Database.open(path)
        await db.close()
    lock = path.with_name("again.db.lock")
    # closed: another process may take it now
    taker = "import fcntl, sys; fcntl.flock(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    assert await _run(sys.executable, "-c", taker, str(lock)) == (0, "")


_FILL_THEN_CLOSE_ON_A_FULL_DISK = """
import asyncio, os, resource, signal, sys
from memory.db import Database

async def main(path: str) -> None:
    db = await Database.open(path)
    # committed rows stay in the WAL until the checkpoint at close
    await db.transact(lambda c: c.execute("PRAGMA wal_autocheckpoint = 0"))
    await db.transact(lambda c: c.executemany("INSERT INTO meta VALUES (?, ?)", [(f"k{n}", "x" * 1000) for n in range(500)]))
    # the database file cannot grow any more: the checkpoint's writes fail as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path), resource.RLIM_INFINITY))
    await db.close()
    print("closed", flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_close_is_clean_when_the_final_checkpoint_fails(tmp_path: Path) -> None:
    path = tmp_path / "full.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _FILL_THEN_CLOSE_ON_A_FULL_DISK,
        str(path),
        cwd=Path(__file__).parent.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await child.communicate()
    assert (child.returncode, out) == (0, b"closed\n"), err.decode()
    assert b"without folding its WAL back" in err
    db = await Database.open(path)  # nothing committed was lost: the WAL is read back
    assert await db.fetchval("SELECT count(*) FROM meta WHERE key LIKE 'k%'") == 500
    await db.close()


async def test_a_write_after_close_is_refused_not_left_waiting(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "closed.db")
    await db.close()
    with pytest.raises(StorageError, match="is closed"):
        await asyncio.wait_for(db.execute("INSERT INTO meta VALUES ('late', 'v')"), 5)
