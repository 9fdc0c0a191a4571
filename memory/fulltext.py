"""Full-text rules of messages_fts and passages_fts: agent-scoped terms, the rows they index, queries.

Every word goes into the FTS5 index with its agent's mark in front ("x17xotters"
for agent 17), so each term's posting list holds one agent's rows only: a query
reads as much of the index as that agent wrote, not the whole file's, bm25's
document frequencies are the agent's own, and no query can reach another
agent's rows, whatever it contains. The words are cut here, by the same rule the
tokenizer uses (unicode61 with categories 'L* N* Co M*'), so each one stays one
token with its mark; the tokenizer still folds case and diacritics and stems.

Both indexes are contentless: one forgets a row only when told exactly what it
was given for it. So one function computes a row's text (`message_row`,
`passage_row`) and every insert, delete and rebuild goes through it.

Queries are cut the same way and every word is quoted, so FTS5 syntax in the
input (`"`, `*`, `AND`, `NEAR(`, `-`, `:`) is only ever searched for, never
parsed. Stop-words are dropped from queries: on conversational data they drown
the words that carry the meaning (LoCoMo, BM25 top 10: recall 0.628 with them,
0.662 without; MRR 0.418 and 0.458).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable
from datetime import datetime
from typing import Any

# sqlean: see memory/db.py
import sqlean as sqlite3

MAX_TERMS = 32

# the FTS5 tokenizer of messages_fts and passages_fts (migration m004)
TOKENIZER = "porter unicode61 remove_diacritics 2 categories 'L* N* Co M*'"


@functools.cache
def _words() -> re.Pattern[str]:
    """Runs of letters, digits, marks and private-use characters: unicode61's tokens.

    Python's \\w lacks marks, which would cut Devanagari words at their vowel signs.
    Built on first use, not at import: scanning the code points takes long enough to
    delay every start of `mnemocord run`.
    """
    ranges: list[list[int]] = []
    for cp in range(0x20000):  # the planes where marks live, plus the tags' below
        if unicodedata.category(chr(cp))[0] == "M":
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    ranges += [[0xE0100, 0xE01EF], [0xE000, 0xF8FF], [0xF0000, 0x10FFFD]]  # variation selectors, private use
    extra = "".join(f"{chr(a)}-{chr(b)}" for a, b in ranges)
    # "_" separates words, as in FTS5's unicode61 tokenizer
    return re.compile(f"(?:[^\\W_]|[{extra}])+")


# unicode61's tokens in ASCII text, where there are no marks or private-use characters: the
# general pattern tests each character against hundreds of ranges, several times slower
_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+")


def words(text: str) -> list[str]:
    """The words of `text` as unicode61 (categories 'L* N* Co M*') cuts them."""
    return _ASCII_WORDS.findall(text) if text.isascii() else _words().findall(text)


# NLTK's English list plus question fillers; not "may", which is also a month.
STOP_WORDS = frozenset(
    """
    a about above after again against ain all also am an and any anything are aren as at be because been
    before being below between both but by can could couldn d did didn do does doesn doing don down during
    each ever few for from further had hadn has hasn have haven having he her here hers herself him himself
    his how i if in into is isn it its itself just kind kinds likely ll m ma many me might mightn more most
    much mustn my myself needn no nor not now o of off on once one ones only or other our ours ourselves out
    over own re s same shan she should shouldn so some something sort such t than that the their theirs
    them themselves then there these they thing things this those through to too type types under until up
    ve very was wasn we were weren what when where which while who whom why will with won would wouldn y
    you your yours yourself yourselves
    """.split()
)


def terms(text: str) -> list[str]:
    """Meaningful lower-case words of `text`, in order, without repeats."""
    seen: dict[str, None] = {}
    found = words(text.lower())
    for word in found:
        if word not in STOP_WORDS and word not in seen and len(word) < 64:
            seen[word] = None
    if not seen:  # a query of only stop-words ("who is it?") still searches for them
        seen = dict.fromkeys(w for w in found if len(w) < 64)
    return list(seen)[:MAX_TERMS]


def _mark(agent_id: int) -> str:
    # consonants and digits only, so the stemmer's measure of a word is as without it; what the
    # mark does change: words of 1-2 letters get stemmed too ("us" -> "u"), and words near 60
    # letters no longer are; indexing and queries agree on both
    return f"x{agent_id}x"


def scoped(agent_id: int, text: str) -> str:
    """`text` as one agent's rows of an FTS5 index hold it: every word behind the agent's mark."""
    mark = _mark(agent_id)
    return " ".join(mark + w for w in words(text))


def match(agent_id: int, text: str, columns: str) -> str | None:
    """An FTS5 MATCH expression for one agent's rows, or None if `text` has no words.

    `columns` is the FTS5 column filter, e.g. "{content context}".
    """
    words = terms(text)
    if not words:
        return None
    mark = _mark(agent_id)
    return f"{columns} : (" + " OR ".join(f'"{mark}{w}"' for w in words) + ")"


# --- messages_fts ------------------------------------------------------------


def said(role: str, content: str, tool_calls: list[dict[str, Any]] | None) -> str:
    """The words people and the agent said in a message: its content and its send_message replies.

    Tool results are not indexed ("" for them).
    """
    if role == "tool":
        return ""
    parts = [content]
    for call in tool_calls or []:
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        if isinstance(function, dict) and function.get("name") == "send_message":
            try:
                parts.append(str(json.loads(function.get("arguments") or "{}").get("message", "")))
            # arguments the model got wrong (or nested past Python's recursion) are not words it said
            except (ValueError, TypeError, AttributeError, RecursionError):
                pass
    return "\n".join(p for p in parts if p)


def message_row(agent_id: int, role: str, content: str, tool_calls: list[dict[str, Any]] | None) -> str:
    """A message's row in messages_fts ("" for none)."""
    text = said(role, content, tool_calls)
    return scoped(agent_id, text) if text else ""


# (id, role, content, tool_calls) of a message, tool_calls parsed
MessageRow = tuple[int, str, str, list[dict[str, Any]] | None]


def index_messages(c: sqlite3.Connection, agent_id: int, messages: Iterable[MessageRow]) -> None:
    _write(
        c,
        "INSERT INTO messages_fts(rowid, content) VALUES (?, ?)",
        [(i, text) for i, role, content, calls in messages if (text := message_row(agent_id, role, content, calls))],
    )


def unindex_messages(c: sqlite3.Connection, agent_id: int, messages: Iterable[MessageRow]) -> None:
    _write(
        c,
        "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', ?, ?)",
        [(i, text) for i, role, content, calls in messages if (text := message_row(agent_id, role, content, calls))],
    )


# --- passages_fts ------------------------------------------------------------


def spoken_date(stamp: str) -> str:
    """ "2023-05-08T13:56:00Z" -> "8 May 2023", the way people ask about dates."""
    try:
        day = datetime.strptime(stamp[:10], "%Y-%m-%d")
    except ValueError:
        return ""
    return f"{day.day} {day:%B %Y}"


def passage_row(agent_id: int, content: str, context: str, created_at: str) -> tuple[str, str, str]:
    """The content, context and date columns of a passage's row in passages_fts."""
    return scoped(agent_id, content), scoped(agent_id, context), scoped(agent_id, spoken_date(created_at))


# (id, content, context, created_at) of a passage
PassageRow = tuple[int, str, str, str]


def index_passages(c: sqlite3.Connection, agent_id: int, passages: Iterable[PassageRow]) -> None:
    _write(
        c,
        "INSERT INTO passages_fts(rowid, content, context, date) VALUES (?, ?, ?, ?)",
        [(i, *passage_row(agent_id, content, context, at)) for i, content, context, at in passages],
    )


def unindex_passages(c: sqlite3.Connection, agent_id: int, passages: Iterable[PassageRow]) -> None:
    _write(
        c,
        "INSERT INTO passages_fts(passages_fts, rowid, content, context, date) VALUES ('delete', ?, ?, ?, ?)",
        [(i, *passage_row(agent_id, content, context, at)) for i, content, context, at in passages],
    )


# --- both --------------------------------------------------------------------


# FTS5 writes the terms it holds out as a new segment at every savepoint and commit (~100 µs each
# here, whatever their number), and Database._commit gives each transaction of a batch a savepoint.
# So inside a batch the writer connection holds the index writes and does them together before the
# commit: in their order, which a contentless index needs (a row is deleted with what it was given),
# and without those of a transaction that rolled back. At most HELD_ROWS rows are held: past that
# they are done at once, inside the running transaction's savepoint.
HELD_ROWS = 1_000

Write = tuple[str, list[tuple[Any, ...]]]


class Held(sqlite3.Connection):
    """A connection that holds its full-text writes while a batch runs (memory/db.py's writer)."""

    _writes: list[Write] | None = None  # None: not in a batch, writes are done at once
    _rows = 0
    _mark = 0  # where the running transaction's writes begin
    # earlier transactions' writes done inside the running one's savepoint: its rollback undoes them
    _spilled: list[Write]  # set by hold()

    def hold(self) -> None:
        """A batch begins."""
        self._writes, self._rows, self._mark, self._spilled = [], 0, 0, []

    def begin(self) -> None:
        """A transaction of the batch begins, in its savepoint."""
        self._mark, self._spilled = len(self._writes or ()), []

    def rolled_back(self) -> None:
        """The transaction was rolled back to its savepoint: its writes go, the earlier ones stay held."""
        if self._writes is not None:
            self._writes = self._spilled + self._writes[: self._mark]
            self._rows = sum(len(rows) for _, rows in self._writes)

    def release(self) -> None:
        """Do the held writes (before the batch commits) and stop holding."""
        writes, self._writes = self._writes or [], None
        for sql, rows in writes:
            self.executemany(sql, rows)

    def drop(self) -> None:
        """The batch failed: nothing held is done."""
        self._writes = None

    def write(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if self._writes is None:
            self.executemany(sql, rows)
            return
        self._writes.append((sql, rows))
        self._rows += len(rows)
        if self._rows > HELD_ROWS:
            self._spilled += self._writes[: self._mark]
            writes, self._writes, self._rows, self._mark = self._writes, [], 0, 0
            for held_sql, held_rows in writes:
                self.executemany(held_sql, held_rows)


def _write(c: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    if not rows:
        return
    if isinstance(c, Held):
        c.write(sql, rows)
    else:
        c.executemany(sql, rows)


def reindex(c: sqlite3.Connection) -> None:
    """Build both indexes again from the rows they index, inside the caller's transaction.

    At m004, and whenever Python's Unicode tables changed since (a new Python):
    `scoped` cuts words by them, so rows indexed under the old tables could no
    longer be forgotten.
    """
    c.execute("DROP TABLE IF EXISTS messages_fts")
    c.execute("DROP TABLE IF EXISTS passages_fts")
    c.execute(f"CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='', tokenize=\"{TOKENIZER}\")")
    c.execute(f"CREATE VIRTUAL TABLE passages_fts USING fts5(content, context, date, content='', tokenize=\"{TOKENIZER}\")")
    messages = c.execute("SELECT id, agent_id, role, content, tool_calls FROM messages")
    c.executemany(
        "INSERT INTO messages_fts(rowid, content) VALUES (?, ?)",
        ((r[0], text) for r in messages if (text := message_row(r[1], r[2], r[3], json.loads(r[4]) if r[4] else None))),
    )
    passages = c.execute("SELECT id, agent_id, content, context, created_at FROM passages")
    c.executemany(
        "INSERT INTO passages_fts(rowid, content, context, date) VALUES (?, ?, ?, ?)",
        ((r[0], *passage_row(r[1], r[2], r[3], r[4])) for r in passages),
    )
    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('fts_unicode', ?)", (unicodedata.unidata_version,))


def unicode_changed(c: sqlite3.Connection) -> str | None:
    """The Unicode version the indexes were built with, if not this Python's ("?" if unknown); else None."""
    row = c.execute("SELECT value FROM meta WHERE key = 'fts_unicode'").fetchone()
    if row and row[0] == unicodedata.unidata_version:
        return None
    return row[0] if row else "?"
