"""Schema migrations: an ordered list of small functions, each applied once, in its own transaction.

A migration's function name is recorded in `_migrations` when it is applied, so
names never change and new migrations only ever go at the end.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# sqlean: see memory/db.py
import sqlean as sqlite3

from . import fulltext

log = logging.getLogger(__name__)

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


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
        """,
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
        """,
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
        -- context: the neighbouring passages' text, date: "8 May 2023"; both ranked low, so a
        -- question matches an answer split across neighbouring passages (bench/retrieval.py)
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
        """,
    )


@migration
def m004_agent_scoped_fts(c: sqlite3.Connection) -> None:
    """Full-text rows hold their agent's mark on every word (memory/fulltext.py), indexed anew.

    With one agent column ANDed into every query, each term's posting list spanned all
    agents, so a keyword search read the whole file's postings, not its agent's.
    """
    fulltext.reindex(c)


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


@migration
def m006_events(c: sqlite3.Connection) -> None:
    """Scheduled events (memory/events.py): the timer reads the earliest pending due time from
    events_due; a prompt's memory status reads an agent's pending ones from events_agent."""
    _script(
        c,
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            agent_id INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
            -- UTC, as memory/clock.py stamps: sortable as text
            due_at TEXT NOT NULL,
            note TEXT NOT NULL,
            repeat TEXT NOT NULL DEFAULT 'none' CHECK (repeat IN ('none', 'daily', 'weekly')),
            -- the person whose message the event was set after (name, platform id)
            set_by TEXT NOT NULL DEFAULT '',
            set_by_id TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'fired', 'cancelled', 'failed'))
        );
        CREATE INDEX events_due ON events(due_at) WHERE state = 'pending';
        CREATE INDEX events_agent ON events(agent_id, state, due_at);
        """,
    )


@migration
def m007_people(c: sqlite3.Connection) -> None:
    """People in channels: person blocks, and stored data that follows Discord.

    Person blocks live in their own table, so core memory's queries never carry them.

    Edits, deletes and "forget me" look messages up by `external_id` (one index
    probe instead of a scan per event), and a deleted message takes the passages
    read from its attachments with it (`passages.origin`: that message's id).
    """
    _script(
        c,
        """
        CREATE INDEX messages_external ON messages(external_id) WHERE external_id IS NOT NULL;
        ALTER TABLE passages ADD COLUMN origin TEXT;
        CREATE INDEX passages_origin ON passages(origin) WHERE origin IS NOT NULL;
        -- a channel agent's block about each person (memory/people.py); a row only once something is written
        CREATE TABLE people (
            agent_id INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
            user_id TEXT NOT NULL,
            value TEXT NOT NULL,
            char_limit INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (agent_id, user_id)
        );
        -- "forget me" finds a person's blocks in every agent
        CREATE INDEX people_user ON people(user_id);
        -- confirmation buttons' requests: a click after a restart still finds what to do, until expires_at
        CREATE TABLE confirmations (
            token TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            action TEXT NOT NULL,
            args TEXT NOT NULL,
            expires_at TEXT NOT NULL
        );
        """,
    )


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


def migrate(c: sqlite3.Connection, migrations: list[Migration]) -> None:
    """Apply the migrations not yet recorded in `_migrations`, in order, each in its own transaction.

    Then index the full text anew if Python's Unicode tables changed since it was indexed.
    """
    c.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in c.execute("SELECT name FROM _migrations")}
    for fn in migrations:
        if fn.__name__ in done:
            continue
        log.info("applying migration %s", fn.__name__)
        with _transaction(c):
            fn(c)
            c.execute("INSERT INTO _migrations VALUES (?, ?)", (fn.__name__, time.time()))
    if not c.execute("SELECT 1 FROM _migrations WHERE name = 'm004_agent_scoped_fts'").fetchone():
        return
    if (before := fulltext.unicode_changed(c)) is not None:
        log.warning("Unicode %s -> %s (a new Python): indexing full text anew", before, unicodedata.unidata_version)
        with _transaction(c):
            fulltext.reindex(c)


@contextmanager
def _transaction(c: sqlite3.Connection) -> Iterator[None]:
    c.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")
