"""The SQLite file: its lock, connections with sqlite-vec loaded, the writer thread and group commit.

One writer connection, to which every transaction is handed whole as a function
(`Database.transact`): transactions that queue up share a commit, and writers queue
without holding anything on the event loop. (An asyncio lock held across a
transaction's many awaits instead makes concurrent turns queue behind each other's
awaits.) A transaction runs on the writer's own thread, unless it is one of a turn's
few small ones (`quick`): those run on the event loop itself while that thread is
idle, since the trip there costs more CPU than their statements. Checkpoints, which
copy pages and sync the file, always run on the thread. Reads go through aiosqlite
on two more connections, which in WAL mode see committed data only and never wait
for the writer; a turn's prompt is read on the writer, in one transaction (with its
first writes for the first prompt), since that costs less than several reads.

The schema is memory/migrations.py's; the full-text rules are memory/fulltext.py's.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import aiosqlite

# sqlean is a DB-API 2.0 twin of the stdlib sqlite3 module, with a recent SQLite
# that can always load extensions (many Pythons' stdlib sqlite3 cannot).
import sqlean as sqlite3
import sqlite_vec

from . import fulltext
from .migrations import MIGRATIONS, Migration, migrate

log = logging.getLogger(__name__)


class StorageError(Exception):
    """The database cannot be opened or used; str() says why in one line."""


class StorageFull(StorageError):
    """A transaction failed because the disk (or the database's size limit) is full: nothing of it was stored."""


# SQLITE_FULL, the primary result code (extended codes carry it in their low byte)
_SQLITE_FULL = 13


T = TypeVar("T")
# a transaction handed to the writer, and the future its caller awaits
_Queued = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
# SQLite releases the GIL while it works: two readers let two queries run at once
READERS = 2
# most transactions committed together (Database._drain_inbox)
BATCH = 8
# most quick transactions committed together on the event loop (a pass of them blocks it ~5 ms)
INLINE = 64
# commits between two checkpoints, and the WAL's size after a transaction on the thread that calls
# for one sooner (SQLite's own, every 1,000 pages, would run inside commits, some of them on the
# loop). A small WAL keeps reads fast: a page in it is looked up and read there, not in the mapped file.
CHECKPOINT_COMMITS = 128
WAL_BYTES = 4 << 20
# files up to this size get SQLite's quick_check whole at open: it reads every page, 15-40 s
# per GB measured here; larger ones a bounded check, and Database.check() for the rest
FULL_CHECK_BYTES = 32 << 20


def marks(n: int) -> str:
    """Placeholders for an SQL `IN (...)` list of n values."""
    return ",".join("?" * n)


def _connect_sync(path: str, factory: type[sqlite3.Connection] = sqlite3.Connection) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=factory)
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
    """The writer thread and the reader connections of one SQLite file, with sqlite-vec loaded.

    While it is open, this process holds the file's lock (`_Lock`): a second
    process is refused at open instead of writing beside this one.
    """

    def __init__(
        self, writer: fulltext.Held, thread: ThreadPoolExecutor, readers: list[aiosqlite.Connection], lock: _Lock
    ) -> None:
        self._writer = writer
        self._thread = thread
        self._readers = readers
        self._lock = lock
        self._busy = [0] * len(readers)
        # transactions of this pass of the event loop, handed to the writer together at its end
        self._queued: list[_Queued] = []
        self._all_quick = True  # every transaction in _queued is quick
        self._wal = Path(f"{lock.database}-wal")
        self._wal_mark = WAL_BYTES  # the WAL's size that calls for the next checkpoint (the thread's)
        self._commits = 0  # since the last checkpoint was called for (the loop's)
        self._checkpoint_due = False  # (under _guard)
        self._soon: asyncio.Handle | None = None
        # handed over, not yet taken by the writer thread, which drains it without waiting for the
        # event loop between batches (a busy loop would otherwise leave the writer idle)
        self._inbox: collections.deque[_Queued] = collections.deque()
        self._guard = threading.Lock()
        self._draining = False  # a drain is running or submitted (under _guard)
        self._drain: asyncio.Future[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str | Path, *, migrations: Iterable[Migration] | None = None) -> Database:
        """Lock, check and migrate the file. Raises StorageError with one line saying what is wrong."""
        path = Path(path)
        loop = asyncio.get_running_loop()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = _Lock.take(path)
        except OSError as exc:
            raise StorageError(f"cannot use database {path}: {exc}") from exc
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        writer: fulltext.Held | None = None
        readers: list[aiosqlite.Connection] = []
        try:
            writer = await loop.run_in_executor(
                thread, _open_writer, path, list(MIGRATIONS if migrations is None else migrations)
            )
            for _ in range(READERS):
                readers.append(reader := await aiosqlite.Connection(lambda: _connect_sync(str(path)), 64))
                await reader.execute("PRAGMA query_only = ON")
                # reads of vector chunks come from mapped pages instead of a system call each
                await reader.execute(f"PRAGMA mmap_size = {1 << 30}")
        except BaseException as exc:
            for reader in readers:
                await reader.close()
            if writer is not None:
                await loop.run_in_executor(thread, writer.close)
            thread.shutdown()
            lock.release()
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise StorageError(f"cannot use database {path}: {exc}") from exc
            raise
        return cls(writer, thread, readers, lock)

    async def close(self) -> None:
        """Finish every queued transaction, then close; a failing final checkpoint is logged, not raised."""
        while self._queued or self._drain is not None:
            self._flush()
            if self._drain is not None:
                # its batches' results were handed to the loop before it ended: they are set first
                await asyncio.wait([self._drain])
        self._closed = True
        try:
            for reader in self._readers:
                await reader.close()
            await asyncio.get_running_loop().run_in_executor(self._thread, self._finish)
        finally:
            self._thread.shutdown()
            self._lock.release()

    def _finish(self) -> None:
        try:
            # folds the WAL back into the file, so a copied .db file is complete
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a full disk: every committed write is in the WAL, read back at the next open
            log.warning("closing %s without folding its WAL back into it: %s", self._lock.database, exc)
        finally:
            self._writer.close()

    async def check(self) -> list[str]:
        """SQLite's quick_check over the whole file: the problems found, [] if none.

        It reads every page, about 15-40 s per GB here, so `open` runs it only on files
        up to FULL_CHECK_BYTES; this is for `mnemocord doctor`.
        """
        try:
            rows = [r[0] for r in await self.fetchall("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:  # damage that stops the check itself
            return [str(exc)]
        return [] if rows == ["ok"] else rows

    async def transact(self, fn: Callable[[sqlite3.Connection], T], *, quick: bool = False) -> T:
        """Run `fn(connection)` as one transaction of the writer connection; rolled back if it raises.

        Transactions queued while the thread is busy, or in the same pass of the event loop,
        go together: one trip to the thread and one commit, each in a savepoint of its own.
        `quick`: a few statements over a few rows (a turn's own reads and writes). A pass of
        the loop whose transactions are all quick commits them on the loop, without the trip,
        when the thread is idle. The transaction finishes even if the awaiting task is
        cancelled. Raises StorageFull when the disk is full.
        """
        if self._closed:
            raise StorageError(f"database {self._lock.database} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((fn, future))
        self._all_quick = self._all_quick and quick
        if self._soon is None:
            # after the callbacks already scheduled, so that tasks they start join the batch (a
            # message's arrival and the turn that answers it, when the message opens it: Engine._arrive)
            self._soon = loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        """Commit this pass's transactions here if they are quick, else hand them to the writer thread."""
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        quick, self._all_quick = self._all_quick, True
        # only the loop sets _draining, so False read here stays False: the connection is the loop's
        if quick and len(queued) <= INLINE and not self._draining:
            self._settle(queued, self._outcomes(queued))
            return
        with self._guard:
            self._inbox.extend(queued)
        self._wake()

    def _wake(self) -> None:
        """Start a drain of the inbox (and of a due checkpoint) on the thread, unless one runs."""
        with self._guard:
            start, self._draining = not self._draining, True
        if start:
            loop = asyncio.get_running_loop()
            drain = self._drain = loop.run_in_executor(self._thread, self._drain_inbox, loop)
            drain.add_done_callback(lambda done: self._drained(done))

    def _drained(self, done: asyncio.Future[None]) -> None:
        if self._drain is done:
            self._drain = None

    def _drain_inbox(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer thread: commit batches until the inbox is empty, each batch's results
        handed to the loop as it commits."""
        while True:
            with self._guard:
                checkpoint = not self._inbox and self._checkpoint_due
                if checkpoint:  # once the queue is empty: a large transaction is in the WAL by then
                    self._checkpoint_due = False
                elif not self._inbox:
                    self._draining = False
                    return
                else:
                    # a larger batch costs less CPU, but its first transaction waits for all the others
                    batch = [self._inbox.popleft() for _ in range(min(BATCH, len(self._inbox)))]
            if checkpoint:
                self._checkpoint()
                continue
            loop.call_soon_threadsafe(self._settle, batch, self._outcomes(batch))
            # the large transactions run here (quick ones are small): one may have grown the WAL past
            # WAL_BYTES, and the checkpoint follows once the queue is empty
            if self._wal_grown():
                with self._guard:
                    self._checkpoint_due = True

    def _wal_grown(self) -> bool:
        try:
            size = self._wal.stat().st_size
        except OSError:
            return False
        if size <= WAL_BYTES:  # checkpointed and cut back since: the WAL is reused from its start
            self._wal_mark = WAL_BYTES
            return False
        if size < self._wal_mark:
            return False
        # a PASSIVE checkpoint stops short while a reader holds old pages: tried again as the WAL grows
        self._wal_mark = size + WAL_BYTES // 4
        return True

    def _checkpoint(self) -> None:
        """Fold the WAL back into the file as far as readers allow (PASSIVE: nobody waits)."""
        try:
            self._writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # a full disk: the WAL keeps every commit, and the next try folds it
            log.warning("could not checkpoint %s: %s", self._lock.database, exc)

    def _outcomes(self, batch: list[_Queued]) -> list[tuple[bool, Any]]:
        try:
            return self._commit([fn for fn, _ in batch])
        except Exception as exc:
            return [(False, exc)] * len(batch)

    def _commit(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        """The batch in one transaction, each function in a savepoint of its own; the full-text
        writes are held to the end (fulltext.Held), so a failure there fails the whole batch."""
        c = self._writer
        outcomes: list[tuple[bool, Any]] = []
        c.hold()
        try:
            c.execute("BEGIN IMMEDIATE")
            for fn in fns:
                c.execute("SAVEPOINT one")
                c.begin()
                try:
                    outcomes.append((True, fn(c)))
                except Exception as exc:
                    if not c.in_transaction:  # SQLite rolled back the whole batch (disk full, I/O)
                        raise
                    c.execute("ROLLBACK TO one")
                    c.rolled_back()
                    outcomes.append((False, self._full(exc) or exc))
                c.execute("RELEASE one")
            c.release()
            c.execute("COMMIT")
        except BaseException as exc:
            c.drop()
            if c.in_transaction:
                c.execute("ROLLBACK")
            if full := self._full(exc):
                raise full from exc
            raise
        return outcomes

    def _full(self, exc: BaseException) -> StorageFull | None:
        """The StorageFull that `exc` means, if it is SQLite saying the disk or the file is full."""
        if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_FULL:
            return StorageFull(f"storage is full: database {self._lock.database} cannot grow ({exc}); free disk space")
        return None

    def _settle(self, batch: list[_Queued], outcomes: list[tuple[bool, Any]]) -> None:
        """On the loop: hand a committed batch's results to its callers."""
        for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
            if not future.done():  # cancelled: nobody waits for it
                future.set_result(value) if ok else future.set_exception(value)
        self._commits += 1
        if self._commits >= CHECKPOINT_COMMITS:
            self._commits = 0
            with self._guard:
                self._checkpoint_due = True
            self._wake()

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


def _open_writer(path: Path, migrations: list[Migration]) -> fulltext.Held:
    conn = cast(fulltext.Held, _connect_sync(str(path), fulltext.Held))
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a committed write survives a crash of the process;
        # only an OS crash or power cut can lose the last transactions.
        conn.execute("PRAGMA synchronous = NORMAL")
        # checkpoints are the thread's (Database._settle): SQLite's own would also run in commits on the loop
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_BYTES}")
        _check_writable(conn, path)
        _check_pages(conn, path)
        migrate(conn, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_writable(c: sqlite3.Connection, path: Path) -> None:
    """SQLite opens a file it may not write read-only, silently: the first write would fail instead."""
    c.execute("BEGIN IMMEDIATE")
    try:
        # a write that changes nothing still needs a writable file
        c.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        c.execute("DELETE FROM _migrations WHERE 0")
    except sqlite3.Error as exc:
        raise StorageError(f"database {path} is read-only ({exc}): the user running mnemocord must be able to write it") from exc
    finally:
        if c.in_transaction:
            c.execute("ROLLBACK")


def _check_pages(c: sqlite3.Connection, path: Path) -> None:
    """Damage in pages a start does not read would otherwise surface much later, as a failed turn."""
    if path.stat().st_size <= FULL_CHECK_BYTES:
        targets = [""]
    else:  # the schema and the small tables every turn reads; Database.check() reads the rest
        small = c.execute("SELECT name FROM sqlite_schema WHERE type = 'table' AND name IN ('agents', 'blocks', 'meta')")
        targets = ["(sqlite_schema)", *(f"({name})" for (name,) in small.fetchall())]
    problems: list[str] = []
    for target in targets:
        try:
            problems += [r[0] for r in c.execute(f"PRAGMA quick_check{target}") if r[0] != "ok"]
        except sqlite3.DatabaseError as exc:  # damage that stops the check itself
            problems.append(str(exc))
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise StorageError(f"database {path} is damaged (SQLite quick_check: {problems[0]}{more}); restore it from a backup")


class _Lock:
    """`<database>.lock`, flock()ed while this process has the database open; the kernel drops it when the process dies.

    The file holds the holder's pid, so a refused process can name it. Opens of one
    database within this process share the lock.
    """

    _held: ClassVar[dict[str, _Lock]] = {}

    def __init__(self, database: Path, key: str, fd: int) -> None:
        self.database = database
        self._key = key
        self._fd = fd
        self._users = 1

    @classmethod
    def take(cls, database: Path) -> _Lock:
        path = database.with_name(database.name + ".lock")
        key = os.path.realpath(path)
        if (held := cls._held.get(key)) is not None:
            held._users += 1
            return held
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise StorageError(
                f"database {database} is in use by another process ({_describe(holder)}); stop it, or use another DATABASE_PATH"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        cls._held[key] = lock = cls(database, key, fd)
        return lock

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            del self._held[self._key]
            os.close(self._fd)  # closing drops the flock


def _describe(pid: str) -> str:
    """ "pid 4242: mnemocord run", as far as this system tells."""
    if not pid.isdigit():
        return "pid unknown"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            # arguments are separated by NULs and may hold newlines: one line of words
            command = " ".join(f.read(200).replace(b"\0", b" ").decode("utf-8", "replace").split())
    except OSError:
        return f"pid {pid}"
    return f"pid {pid}: {command}" if command else f"pid {pid}"
