"""The SQLite file: connections, sqlite-vec, and schema migrations.

One writer: a connection owned by a single thread, to which every transaction
is handed whole as a function (`Database.transact`), so a transaction costs one
trip between threads and writers queue without holding anything on the event
loop; transactions that queue up share a trip and a commit (bench/bot_load.py:
CPU per reply -17 %, p95 -40 ms). Holding an asyncio lock across a
transaction's many awaits instead made 100 concurrent users wait ~1 s per turn
for it (bench/bot_load.py). Reads go through aiosqlite on two more connections,
which in WAL mode see committed data only and never wait for the writer; a
turn's prompt is read on the writer, in one transaction (with its first writes
for the first prompt), since a trip there costs less than several reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import unicodedata
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

# sqlean is a DB-API 2.0 twin of the stdlib sqlite3 module, with a recent SQLite
# that can always load extensions (many Pythons' stdlib sqlite3 cannot).
import sqlean as sqlite3
import sqlite_vec

from . import search

log = logging.getLogger(__name__)


class StorageError(Exception):
    """The database cannot be opened or used; str() says why in one line."""


T = TypeVar("T")
# SQLite releases the GIL while it works: two readers let two queries run at once
READERS = 2
# most transactions committed together (Database._flush)
BATCH = 8
Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def marks(n: int) -> str:
    """Placeholders for an SQL `IN (...)` list of n values."""
    return ",".join("?" * n)


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_agents_and_blocks(c: sqlite3.Connection) -> None:
    _script(
        c,
        """
        CREATE TABLE agents (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            summary TEXT NOT NULL DEFAULT '',
            summary_updated_at TEXT,
            -- set when the memory-pressure warning was sent, cleared when usage drops
            pressure_warned INTEGER NOT NULL DEFAULT 0,
            tokens_in INTEGER NOT NULL DEFAULT 0,
            tokens_out INTEGER NOT NULL DEFAULT 0,
            model_calls INTEGER NOT NULL DEFAULT 0,
            options TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE blocks (
            agent_id INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
            label TEXT NOT NULL,
            value TEXT NOT NULL,
            char_limit INTEGER NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            updated_at TEXT NOT NULL,
            PRIMARY KEY (agent_id, label)
        );
        """
    )


@migration
def m002_messages(c: sqlite3.Connection) -> None:
    _script(
        c,
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            agent_id INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'tool', 'system')),
            author TEXT NOT NULL DEFAULT '',
            author_id TEXT NOT NULL DEFAULT '',
            content TEXT NOT NULL DEFAULT '',
            tool_calls TEXT,
            tool_call_id TEXT,
            created_at TEXT NOT NULL,
            -- 1 in the context window, 0 evicted, 2 waiting for the next turn
            in_context INTEGER NOT NULL DEFAULT 1,
            -- order inside the context window: the order messages entered it
            position INTEGER,
            tokens INTEGER NOT NULL DEFAULT 0,
            -- platform id of the source message (e.g. a Discord message id), for dedup and forget
            external_id TEXT
        );
        CREATE INDEX messages_agent_time ON messages(agent_id, created_at);
        CREATE INDEX messages_context ON messages(agent_id, in_context, position);
        -- the agent token lives inside the index so MATCH filters by agent itself.
        -- Contentless, rows removed with the 'delete' command and their old values:
        -- contentless_delete=1 would miscount the statistics bm25 ranks by.
        CREATE VIRTUAL TABLE messages_fts USING fts5(
            agent, content, content='', tokenize='porter unicode61 remove_diacritics 2'
        );
        """
    )


@migration
def m003_passages(c: sqlite3.Connection) -> None:
    _script(
        c,
        """
        CREATE TABLE passages (
            id INTEGER PRIMARY KEY,
            agent_id INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
            content TEXT NOT NULL,
            -- text of the passages inserted just before and after it: indexed with a low
            -- weight, so a question matches an answer split across neighbouring items
            context TEXT NOT NULL DEFAULT '',
            tags TEXT NOT NULL DEFAULT '[]',
            source TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            text_hash TEXT NOT NULL,
            embedded INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX passages_agent_time ON passages(agent_id, created_at);
        CREATE INDEX passages_unembedded ON passages(embedded) WHERE embedded = 0;
        CREATE INDEX passages_hash ON passages(text_hash);
        CREATE TABLE passage_tags (
            passage_id INTEGER NOT NULL REFERENCES passages(id) ON DELETE CASCADE,
            agent_id INTEGER NOT NULL,
            tag TEXT NOT NULL,
            PRIMARY KEY (agent_id, tag, passage_id)
        );
        -- context: the neighbouring passages' text, date: "8 May 2023"; both ranked low
        -- (bench/retrieval.py: neighbours lift LoCoMo recall@10 from 0.69 to 0.80)
        CREATE VIRTUAL TABLE passages_fts USING fts5(
            agent, content, context, date, content='',
            tokenize='porter unicode61 remove_diacritics 2'
        );
        -- vectors of recent search queries (passages' vectors are in passage_vectors)
        CREATE TABLE embedding_cache (
            model TEXT NOT NULL,
            text_hash TEXT NOT NULL,
            vector BLOB NOT NULL,
            PRIMARY KEY (model, text_hash)
        );
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """
    )


@migration
def m004_agent_scoped_fts(c: sqlite3.Connection) -> None:
    """Full-text rows hold their agent's mark on every word (memory/search.py), indexed anew.

    With one agent column ANDed into every query, each term's posting list spanned all
    agents: bench/search.py's 1,000,000 passages made a keyword search read ~100 times
    more of the index than its agent wrote.
    """
    index_anew(c)


def index_anew(c: sqlite3.Connection) -> None:
    """Build both full-text indexes again from the rows they index.

    At m004, and whenever Python's Unicode tables changed since (a new Python):
    search.scoped cuts words by them, and a contentless index forgets a row only
    when told the very tokens it was given.
    """
    from .archival import fts_row
    from .recall import Message, fts_text

    c.execute("DROP TABLE IF EXISTS messages_fts")
    c.execute("DROP TABLE IF EXISTS passages_fts")
    c.execute(f"CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='', tokenize=\"{search.TOKENIZER}\")")
    c.execute(
        f"CREATE VIRTUAL TABLE passages_fts USING fts5(content, context, date, content='', tokenize=\"{search.TOKENIZER}\")"
    )
    messages = c.execute("SELECT id, agent_id, role, content, tool_calls FROM messages")
    c.executemany(
        "INSERT INTO messages_fts(rowid, content) VALUES (?, ?)",
        (
            (r[0], text)
            for r in messages
            if (text := fts_text(r[1], Message(r[2], r[3], tool_calls=json.loads(r[4]) if r[4] else None)))
        ),
    )
    passages = c.execute("SELECT id, agent_id, content, context, created_at FROM passages")
    c.executemany(
        "INSERT INTO passages_fts(rowid, content, context, date) VALUES (?, ?, ?, ?)",
        ((r[0], *fts_row(r[1], r[2], r[3], r[4])) for r in passages),
    )
    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('fts_unicode', ?)", (unicodedata.unidata_version,))


@migration
def m005_passage_vectors(c: sqlite3.Connection) -> None:
    """Vectors leave vec0: floats by passage id, and their sign bits clustered by agent.

    A float KNN in vec0 read all of an agent's vectors (10,000 x 1.5 KB, in
    overflow pages) and picked its top k in O(n k). Now a search sorts the agent's
    sign bits (48 bytes each for 384-d, one contiguous range of passage_bits) by
    hamming distance and rescores the best few hundred exactly by primary key.
    """
    _script(
        c,
        """
        CREATE TABLE passage_vectors (
            id INTEGER PRIMARY KEY REFERENCES passages(id) ON DELETE CASCADE,
            vector BLOB NOT NULL
        );
        -- vec_quantize_binary(vector); no foreign key: a cascade would scan for id
        CREATE TABLE passage_bits (
            agent_id INTEGER NOT NULL,
            id INTEGER NOT NULL,
            bits BLOB NOT NULL,
            PRIMARY KEY (agent_id, id)
        ) WITHOUT ROWID;
        """,
    )
    if not c.execute("SELECT 1 FROM sqlite_master WHERE name = 'passages_vec'").fetchone():
        return
    dim = int(c.execute("SELECT value FROM meta WHERE key = 'embedding_dim'").fetchone()[0])
    if dim % 8:  # stored unpadded (embeddings.pack pads now): a new space, embedded again at the next start
        c.execute("UPDATE passages SET embedded = 0")
        c.execute("DELETE FROM meta WHERE key LIKE 'embedding_%'")
        c.execute("DELETE FROM embedding_cache")
    else:
        c.execute("INSERT INTO passage_vectors(id, vector) SELECT rowid, embedding FROM passages_vec")
        c.execute("INSERT INTO passage_bits SELECT agent_id, rowid, vec_quantize_binary(embedding) FROM passages_vec")
    c.execute("DROP TABLE passages_vec")


def _script(c: sqlite3.Connection, script: str) -> None:
    """Run statements one by one: executescript() would commit the open transaction."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            c.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL statement in migration: {statement!r}")


def _connect_sync(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    except Exception as exc:  # the wheel for this platform is missing or broken
        conn.close()
        raise StorageError(f"cannot load the sqlite-vec extension ({exc}); reinstall the sqlite-vec package") from exc
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


class Database:
    """The writer thread and the reader connection of one SQLite file, with sqlite-vec loaded."""

    def __init__(
        self, path: Path, writer: sqlite3.Connection, thread: ThreadPoolExecutor, readers: list[aiosqlite.Connection]
    ) -> None:
        self.path = path
        self._writer = writer
        self._thread = thread
        self._readers = readers
        self._busy = [0] * len(readers)
        self._queued: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._batch: asyncio.Future[list[tuple[bool, Any]]] | None = None

    @classmethod
    async def open(cls, path: str | Path, *, migrations: Iterable[Migration] | None = None) -> "Database":
        path = Path(path)
        loop = asyncio.get_running_loop()
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = await loop.run_in_executor(thread, _open_writer, str(path), list(MIGRATIONS if migrations is None else migrations))
            readers = [await aiosqlite.Connection(lambda: _connect_sync(str(path)), 64) for _ in range(READERS)]
            for reader in readers:
                await reader.execute("PRAGMA query_only = ON")
                # reads of vector chunks come from mapped pages instead of a system call each
                await reader.execute(f"PRAGMA mmap_size = {1 << 30}")
        except StorageError:
            thread.shutdown()
            raise
        except (OSError, sqlite3.Error) as exc:
            thread.shutdown()
            raise StorageError(f"cannot use database {path}: {exc}") from exc
        return cls(path, writer, thread, readers)

    async def close(self) -> None:
        while self._batch is not None:
            await asyncio.wait([self._batch])
        for reader in self._readers:
            await reader.close()

        def finish() -> None:
            # a checkpoint folds the WAL back so a copied .db file is complete
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._writer.close()

        await asyncio.get_running_loop().run_in_executor(self._thread, finish)
        self._thread.shutdown()

    async def transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` as one transaction on the writer thread; rolled back if it raises.

        Transactions queued while the thread is busy go together: one trip to the thread
        and one commit, each in a savepoint of its own. The transaction finishes even if
        the awaiting task is cancelled.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((fn, future))
        if self._batch is None:
            self._flush()
        return await future

    def _flush(self) -> None:
        # a larger batch costs less CPU but its first transaction waits for all the others:
        # unbounded batches raised p50 under bench/bot_load.py; 4, 8 and 16 measured alike
        batch, self._queued = self._queued[:BATCH], self._queued[BATCH:]
        self._batch = asyncio.get_running_loop().run_in_executor(self._thread, self._commit, [fn for fn, _ in batch])
        self._batch.add_done_callback(lambda done: self._settle(batch, done))

    def _commit(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        c = self._writer
        outcomes: list[tuple[bool, Any]] = []
        try:
            c.execute("BEGIN IMMEDIATE")
            for fn in fns:
                c.execute("SAVEPOINT one")
                try:
                    outcomes.append((True, fn(c)))
                except Exception as exc:
                    if not c.in_transaction:  # SQLite rolled back the whole batch (disk full, I/O)
                        raise
                    c.execute("ROLLBACK TO one")
                    outcomes.append((False, exc))
                c.execute("RELEASE one")
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return outcomes

    def _settle(self, batch: list[tuple[Any, asyncio.Future[Any]]], done: asyncio.Future[list[tuple[bool, Any]]]) -> None:
        self._batch = None
        failed = done.exception()
        outcomes = [(False, failed)] * len(batch) if failed else done.result()
        for (_, future), (ok, value) in zip(batch, outcomes):
            if not future.done():  # cancelled: nobody waits for it
                future.set_result(value) if ok else future.set_exception(value)
        if self._queued:
            self._flush()

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """One write statement as a transaction of its own; returns the rows it changed."""
        args = tuple(params)
        return await self.transact(lambda c: c.execute(sql, args).rowcount)

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        # the least busy reader, so concurrent queries run on different threads
        i = self._busy.index(min(self._busy))
        self._busy[i] += 1
        try:
            return list(await self._readers[i].execute_fetchall(sql, tuple(params)))
        finally:
            self._busy[i] -= 1

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Any:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, params: Iterable[Any] = (), default: Any = None) -> Any:
        row = await self.fetchone(sql, params)
        return row[0] if row else default


def _open_writer(path: str, migrations: list[Migration]) -> sqlite3.Connection:
    conn = _connect_sync(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a committed write survives a crash of the process;
        # only an OS crash or power cut can lose the last transactions.
        conn.execute("PRAGMA synchronous = NORMAL")
        _migrate(conn, migrations)
        _reindex_after_unicode_change(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _reindex_after_unicode_change(c: sqlite3.Connection) -> None:
    if not c.execute("SELECT 1 FROM _migrations WHERE name = 'm004_agent_scoped_fts'").fetchone():
        return
    row = c.execute("SELECT value FROM meta WHERE key = 'fts_unicode'").fetchone()
    if row and row[0] == unicodedata.unidata_version:
        return
    log.warning("Unicode %s -> %s (a new Python): indexing full text anew", row[0] if row else "?", unicodedata.unidata_version)
    c.execute("BEGIN IMMEDIATE")
    try:
        index_anew(c)
    except BaseException:
        c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")


def _migrate(c: sqlite3.Connection, migrations: list[Migration]) -> None:
    c.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in c.execute("SELECT name FROM _migrations")}
    for fn in migrations:
        if fn.__name__ in done:
            continue
        log.info("applying migration %s", fn.__name__)
        c.execute("BEGIN IMMEDIATE")
        try:
            fn(c)
            c.execute("INSERT INTO _migrations VALUES (?, ?)", (fn.__name__, time.time()))
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
