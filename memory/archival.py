"""Archival memory: passages the agent (or a document upload) chose to keep.

Search is hybrid: FTS5 BM25 over the passage and, with lower weights, the
passages inserted before and after it and its date; plus the nearest vectors:
the agent's passages sorted by hamming distance of their sign bits, the best
OVERSAMPLE times as many as wanted rescored by exact L2 (sqlite-vec's
functions). The scores are fused linearly (BM25 scaled by the best one, cosine
as is). Without an embedding endpoint search is keyword-only.
bench/retrieval.py measures these choices on LoCoMo, bench/search.py their speed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import fulltext, search
from .agents import Agent
from .clock import now
from .db import Database, marks, sqlite3
from .embeddings import Embedder, text_hash
from .llm import LLMError
from .search import Hit

log = logging.getLogger(__name__)

CHUNK_CHARS = 1000
OVERLAP_CHARS = 150
# the model inserts notes, not books; documents come in through ingest with their own limit
MAX_INSERT_CHARS = 20_000
MAX_TAGS = 10
# of each neighbour, in the context column
CONTEXT_CHARS = 500
# passages per transaction of a long insert: a whole document in one transaction holds the
# single writer for seconds while others' turns wait; each commit costs full-text index
# merging, so fewer than this slows a long ingest down
TRANSACTION_PIECES = 64

BM25_WEIGHTS = (1.0, 0.5, 0.5)  # content, context, date
CANDIDATES = 50
# nearest by sign bits first, this many times the neighbours wanted, then rescored exactly
OVERSAMPLE = 4
KEYWORD_SHARE = 0.5  # of the fused score; the rest is cosine similarity

_BREAK = re.compile(r"(?<=[.!?。！？])\s+|\n\s*\n")


def chunk(text: str, size: int = CHUNK_CHARS, overlap: int = OVERLAP_CHARS) -> list[str]:
    """Split on sentence and paragraph ends into pieces of at most `size` characters.

    Each piece repeats the last sentences (up to `overlap` characters) of the one
    before, so a fact that straddles a boundary is whole in one of them.
    """
    text = text.replace("\x00", "").strip()
    if len(text) <= size:
        return [text] if text else []
    sentences: list[str] = []
    for s in _BREAK.split(text):
        s = s.strip()
        while len(s) > size:  # a sentence longer than a chunk: cut at a space
            cut = s.rfind(" ", size // 2, size)
            cut = cut if cut > 0 else size
            sentences.append(s[:cut].strip())
            s = s[cut:].strip()
        if s:
            sentences.append(s)
    chunks: list[str] = []
    current: list[str] = []
    for s in sentences:
        if current and len(" ".join(current)) + 1 + len(s) > size:
            chunks.append(" ".join(current))
            tail: list[str] = []
            for prev in reversed(current):
                if sum(len(t) + 1 for t in tail) + len(prev) > overlap or len(prev) + 1 + len(s) > size:
                    break
                tail.insert(0, prev)
            current = tail
        current.append(s)
    if current:
        chunks.append(" ".join(current))
    return chunks


def clean_tags(tags: Iterable[str] | None) -> list[str]:
    out = []
    for t in tags or []:
        t = str(t).strip().lower().replace("\x00", "")[:50]
        if t and t not in out:
            out.append(t)
    return out[:MAX_TAGS]


def pieces_of(content: str, max_chars: int = MAX_INSERT_CHARS) -> list[str]:
    """The passages `content` becomes, or ValueError (with a message for the model)."""
    if not content.strip():
        raise ValueError("content is empty; nothing was stored")
    if len(content) > max_chars:
        raise ValueError(
            f"content is {len(content)} characters; store at most {max_chars} at a time "
            "(split it into several inserts, keeping what matters)"
        )
    pieces = chunk(content)
    if not pieces:
        raise ValueError("content has no text; nothing was stored")
    return pieces


def store(
    c: sqlite3.Connection, agent: Agent, pieces: list[str], tags: list[str], source: str, stamp: str, origin: str | None = None
) -> list[int]:
    """Insert passages inside a transaction (without vectors: `Archive.embed_pending` adds them); returns their ids.

    `tags` as `clean_tags` returns them. Each passage's context holds the end of the one
    stored before it, and that one's context gets this one's beginning.
    """
    ids = []
    previous = c.execute(f"SELECT {_ROW} FROM passages WHERE agent_id = ? ORDER BY id DESC LIMIT 1", (agent.id,)).fetchone()
    if previous and pieces:  # the first piece is the previous passage's "after" context
        context = f"{previous['context']} {pieces[0][:CONTEXT_CHARS]}".strip()
        c.execute("UPDATE passages SET context = ? WHERE id = ?", (context, previous["id"]))
        fulltext.unindex_passages(c, agent.id, [_passage(previous)])
        fulltext.index_passages(c, agent.id, [(previous["id"], previous["content"], context, previous["created_at"])])
    before = previous["content"][-CONTEXT_CHARS:] if previous else ""
    # each passage is written once, with the pieces on both sides: rewriting one in the index after
    # the next one is in makes FTS5 write out a segment (its rowids must rise)
    for i, piece in enumerate(pieces):
        context = f"{before} {pieces[i + 1][:CONTEXT_CHARS]}".strip() if i + 1 < len(pieces) else before
        pid = c.execute(
            "INSERT INTO passages(agent_id, content, context, tags, source, created_at, text_hash, origin)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (agent.id, piece, context, json.dumps(tags), source, stamp, text_hash(piece), origin),
        ).lastrowid
        ids.append(pid)
        fulltext.index_passages(c, agent.id, [(pid, piece, context, stamp)])
        c.executemany(
            "INSERT OR IGNORE INTO passage_tags(passage_id, agent_id, tag) VALUES (?, ?, ?)",
            [(pid, agent.id, t) for t in tags],
        )
        before = piece[-CONTEXT_CHARS:]
    return ids


@dataclass
class Archive:
    """Archival memory of every agent, with the embedder if one is configured."""

    db: Database
    embedder: Embedder | None = None
    # set when the endpoint failed and passages were left without vectors (Engine retries them)
    behind: asyncio.Event = field(default_factory=asyncio.Event)

    async def insert(
        self,
        agent: Agent,
        content: str,
        *,
        tags: Iterable[str] | None = None,
        source: str = "",
        created_at: str | None = None,
        max_chars: int = MAX_INSERT_CHARS,
        origin: str | None = None,
    ) -> list[int]:
        """Store `content` as one or more passages; returns their ids.

        `origin`: the platform id of the message it came with (deleting that message deletes them).

        A long text goes in several transactions of TRANSACTION_PIECES passages each, so other
        agents' writes interleave with it instead of waiting for the whole document; each
        transaction is whole, so a failure leaves no passage half indexed. Raises ValueError
        (with a message for the model) when the text is empty or too long.
        """
        pieces = pieces_of(content, max_chars)
        tag_list = clean_tags(tags)
        stamp = created_at or now()
        ids: list[int] = []
        for i in range(0, len(pieces), TRANSACTION_PIECES):
            part = pieces[i : i + TRANSACTION_PIECES]
            ids += await self.db.transact(
                functools.partial(store, agent=agent, pieces=part, tags=tag_list, source=source, stamp=stamp, origin=origin)
            )
        await self.embed_pending(agent)
        return ids

    async def embed_pending(self, agent: Agent | None = None, limit: int = 10_000) -> int:
        """Embed passages that have no vector yet (new, or after a model change or outage)."""
        if self.embedder is None:
            return 0
        where, params = ("embedded = 0 AND agent_id = ?", (agent.id,)) if agent else ("embedded = 0", ())
        rows = await self.db.fetchall(
            f"SELECT id, agent_id, content, text_hash FROM passages WHERE {where} ORDER BY id LIMIT ?", (*params, limit)
        )
        done = 0
        step = self.embedder.batch_size * 4
        for i in range(0, len(rows), step):
            batch = rows[i : i + step]
            try:
                vectors = await self._vectors(batch)
            except LLMError as exc:
                log.warning("embedding failed, %d passages stay keyword-only until the next try: %s", len(rows) - done, exc)
                self.behind.set()
                break

            def store(c: sqlite3.Connection, batch: list[Any] = batch, vectors: list[bytes] = vectors) -> None:
                for r, v in zip(batch, vectors):
                    # the passage may have been deleted while its vector was computed
                    if c.execute("UPDATE passages SET embedded = 1 WHERE id = ? AND embedded = 0", (r["id"],)).rowcount:
                        c.execute("INSERT OR REPLACE INTO passage_vectors(id, vector) VALUES (?, ?)", (r["id"], v))
                        c.execute(
                            "INSERT OR REPLACE INTO passage_bits(agent_id, id, bits) VALUES (?, ?, vec_quantize_binary(?))",
                            (r["agent_id"], r["id"], v),
                        )

            await self.db.transact(store)
            done += len(batch)
        return done

    async def _vectors(self, rows: list[Any]) -> list[bytes]:
        """Vectors for passages: copied from an embedded passage with the same text, else embedded."""
        assert self.embedder is not None
        hashes = list({r["text_hash"] for r in rows})
        known: dict[str, bytes] = {}
        if self.embedder.dim is not None:
            known = dict(
                await self.db.fetchall(
                    f"SELECT p.text_hash, v.vector FROM passages p JOIN passage_vectors v ON v.id = p.id"
                    f" WHERE p.text_hash IN ({marks(len(hashes))}) AND p.embedded = 1 GROUP BY p.text_hash",
                    hashes,
                )
            )
        todo = [r for r in rows if r["text_hash"] not in known]
        fresh = await self.embedder.embed([r["content"] for r in todo], remember=False) if todo else []
        known.update((r["text_hash"], v) for r, v in zip(todo, fresh))
        return [known[r["text_hash"]] for r in rows]

    async def search(
        self,
        agent: Agent,
        query: str,
        *,
        tags: Iterable[str] | None = None,
        start_date: str | None = None,
        end_date: str | None = None,
        page: object = 1,
        page_size: int = search.PAGE_SIZE,
    ) -> search.Page:
        """Raises search.BadArgument for arguments the caller should correct."""
        filters, params = search.base_filters("p", agent.id, start_date, end_date)
        number = search.page_number(page)
        tag_list = clean_tags(tags)
        for t in tag_list:
            filters.append(
                "EXISTS (SELECT 1 FROM passage_tags t WHERE t.agent_id = p.agent_id AND t.passage_id = p.id AND t.tag = ?)"
            )
            params.append(t)
        where = " AND ".join(filters)
        filtered = len(params) > 1
        wanted = max(CANDIDATES, number * page_size)

        expression = fulltext.match(agent.id, query, "{content context date}")
        if not expression:
            if query.strip():
                return search.Page([], 0, number, page_size)
            # no query: the newest passages, filtered
            total = await self.db.fetchval(f"SELECT count(*) FROM passages p WHERE {where}", params, 0)
            rows = await self.db.fetchall(
                f"SELECT p.id FROM passages p WHERE {where} ORDER BY p.id DESC LIMIT ? OFFSET ?",
                (*params, page_size, (number - 1) * page_size),
            )
            return search.Page(await self._hits(agent, [r[0] for r in rows]), total, number, page_size)

        # keyword and vector search run side by side, on different reader connections
        (keyword, total), vector = await asyncio.gather(
            self._keyword(expression, wanted, where if filtered else None, params),
            self._knn(agent, query, wanted, where if filtered else None, params),
        )
        if vector is None:
            ranked, note = [i for i, _ in keyword], ""
        else:
            ranked = fuse(keyword, vector)
            total, note = len(ranked), "best matches by keyword and meaning"
        page_ids = ranked[(number - 1) * page_size : number * page_size]
        return search.Page(await self._hits(agent, page_ids), total, number, page_size, note)

    async def _keyword(
        self, expression: str, wanted: int, where: str | None, params: list[object]
    ) -> tuple[list[tuple[int, float]], int]:
        """(id, bm25 score) of the best keyword matches, and how many matched in all."""
        weights = ", ".join(str(w) for w in BM25_WEIGHTS)
        if where:
            source, condition, args = (
                "passages_fts f JOIN passages p ON p.id = f.rowid",
                f"passages_fts MATCH ? AND {where}",
                (expression, *params),
            )
        else:  # the agent's marked terms already keep other agents' rows out: no join
            source, condition, args = "passages_fts", "passages_fts MATCH ?", (expression,)
        # materialized once: the ranking and the total come from one evaluation of MATCH
        rows = await self.db.fetchall(
            f"WITH m AS MATERIALIZED (SELECT {'p.id' if where else 'rowid'} AS id, bm25(passages_fts, {weights}) AS s"
            f" FROM {source} WHERE {condition}) SELECT id, -s, (SELECT count(*) FROM m) FROM m ORDER BY s LIMIT ?",
            (*args, wanted),
        )
        return [(r[0], r[1]) for r in rows], (rows[0][2] if rows else 0)

    async def nearest(self, agent: Agent, query: str, k: int = 10) -> list[int]:
        """Passage ids nearest to `query` by meaning alone (empty without vectors)."""
        return [i for i, _ in await self._knn(agent, query, k, None, []) or []]

    async def _knn(
        self, agent: Agent, query: str, wanted: int, where: str | None, params: list[object]
    ) -> list[tuple[int, float]] | None:
        """(id, cosine) of the nearest passages, or None when there are no vectors to search."""
        if self.embedder is None or self.embedder.dim is None:
            return None
        try:
            (vector,) = await self.embedder.embed([query])
        except LLMError as exc:
            log.warning("query embedding failed, searching by keyword only: %s", exc)
            return None
        if where:  # exact, over the rows the filters leave
            rows = await self.db.fetchall(
                f"SELECT p.id, vec_distance_l2(v.vector, ?) AS d FROM passages p JOIN passage_vectors v ON v.id = p.id"
                f" WHERE {where} ORDER BY d LIMIT ?",
                (vector, *params, wanted),
            )
        else:  # hamming distance on sign bits picks the candidates, their floats rank them
            rows = await self.db.fetchall(
                "SELECT id, vec_distance_l2(vector, ?1) AS d FROM passage_vectors WHERE id IN ("
                " SELECT id FROM passage_bits WHERE agent_id = ?2"
                " ORDER BY vec_distance_hamming(vec_bit(bits), vec_quantize_binary(?1)) LIMIT ?3)"
                " ORDER BY d LIMIT ?4",
                (vector, agent.id, wanted * OVERSAMPLE, wanted),
            )
        # unit vectors: cosine = 1 - L2² / 2
        return [(r[0], 1.0 - r[1] * r[1] / 2) for r in rows]

    async def _hits(self, agent: Agent, ids: list[int]) -> list[Hit]:
        if not ids:
            return []
        # "+agent_id": look rows up by id; the agent index would walk all of the agent's rows
        rows = await self.db.fetchall(
            f"SELECT id, created_at, content, tags FROM passages WHERE id IN ({marks(len(ids))}) AND +agent_id = ?",
            (*ids, agent.id),
        )
        by_id = {r["id"]: r for r in rows}
        hits = []
        for i in ids:
            if i in by_id:
                r = by_id[i]
                tags = json.loads(r["tags"])
                hits.append(search.Hit(i, r["created_at"], r["content"], "tags " + ", ".join(tags) if tags else "passage"))
        return hits

    async def count(self, agent: Agent) -> int:
        return await self.db.fetchval("SELECT count(*) FROM passages WHERE agent_id = ?", (agent.id,), 0)

    async def delete(self, agent: Agent, ids: list[int]) -> int:
        return await self.db.transact(lambda c: delete(c, agent, ids)) if ids else 0

    async def clear(self, agent: Agent) -> None:
        await self.db.transact(lambda c: clear(c, agent))


def delete(c: sqlite3.Connection, agent: Agent, ids: list[int]) -> int:
    """`Archive.delete` inside a transaction; returns how many of `ids` were the agent's."""
    if not ids:
        return 0
    rows = c.execute(f"SELECT {_ROW} FROM passages WHERE agent_id = ? AND id IN ({marks(len(ids))})", (agent.id, *ids))
    return _delete_rows(c, agent.id, rows.fetchall())


def clear(c: sqlite3.Connection, agent: Agent) -> None:
    """`Archive.clear` inside a transaction."""
    _delete_rows(c, agent.id, c.execute(f"SELECT {_ROW} FROM passages WHERE agent_id = ?", (agent.id,)).fetchall())


_ROW = "id, content, context, created_at"


def _passage(row: Any) -> fulltext.PassageRow:
    """A row of `SELECT {_ROW}` (or a dict with its keys) as fulltext takes it."""
    return row["id"], row["content"], row["context"], row["created_at"]


def _delete_rows(c: sqlite3.Connection, agent_id: int, rows: list[Any]) -> int:
    for i in range(0, len(rows), 500):
        part = rows[i : i + 500]
        ids = [r["id"] for r in part]
        in_ids = marks(len(ids))
        fulltext.unindex_passages(c, agent_id, [_passage(r) for r in part])
        c.execute(f"DELETE FROM passage_bits WHERE agent_id = ? AND id IN ({in_ids})", (agent_id, *ids))
        c.execute(f"DELETE FROM passages WHERE id IN ({in_ids})", ids)  # passage_vectors rows go with them
    return len(rows)


def fuse(keyword: list[tuple[int, float]], vector: list[tuple[int, float]]) -> list[int]:
    """Linear fusion: BM25 scaled by the best keyword score, plus cosine similarity.

    A keyword hit outside the nearest-neighbour list gets the lowest cosine seen
    there (it is at most that near), not zero: zero would let any weak vector
    match outrank a strong keyword match.
    """
    cosine = dict(vector)
    floor = min(cosine.values(), default=0.0)
    best = max((s for _, s in keyword), default=0.0) or 1.0
    scores = {i: (1 - KEYWORD_SHARE) * c for i, c in vector}
    for i, s in keyword:
        scores[i] = (1 - KEYWORD_SHARE) * cosine.get(i, floor) + KEYWORD_SHARE * s / best
    return sorted(scores, key=lambda i: -scores[i])
