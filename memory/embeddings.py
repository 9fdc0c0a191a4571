"""Embeddings for archival memory, from an OpenAI-compatible `/embeddings` endpoint.

Passages' vectors are stored twice: whole in passage_vectors (float32, unit
length), and as sign bits in passage_bits, which a search scans first;
archival.py rescores its best candidates exactly. Search queries' vectors are
cached (the newest few thousand); a passage whose text was embedded before
takes that vector from passage_vectors.

The model name and dimension in use are recorded in the database. When the
configured model changes, every vector is dropped and every passage is
embedded again, so vectors of two models never share one space.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import struct

from .db import Database, marks, sqlite3
from .llm import LLMClient, LLMError

log = logging.getLogger(__name__)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def pack(vector: list[float]) -> bytes:
    """Unit length, float32: L2 distance on unit vectors ranks like cosine and is faster.

    Zero-padded to a multiple of 8 dimensions, which sign bits need (bit[N] is
    stored in bytes); zeros change no distance.
    """
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    padding = -len(vector) % 8
    return struct.pack(f"{len(vector) + padding}f", *(x / norm for x in vector), *([0.0] * padding))


class Embedder:
    def __init__(self, db: Database, client: LLMClient, model: str, batch_size: int = 64) -> None:
        self.db = db
        self.client = client
        self.model = model
        self.batch_size = batch_size
        self.dim: int | None = None

    async def prepare(self) -> None:
        """Compare the configured model with the recorded one; on a change, start over."""
        recorded = dict(await self.db.fetchall("SELECT key, value FROM meta WHERE key LIKE 'embedding_%'"))
        if recorded.get("embedding_model") == self.model:
            self.dim = int(recorded["embedding_dim"])
            return
        if recorded:
            log.warning(
                "embedding model changed from %s to %s: archival passages will be embedded again",
                recorded.get("embedding_model"),
                self.model,
            )

        def start_over(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM passage_bits")
            c.execute("DELETE FROM passage_vectors")
            c.execute("DELETE FROM meta WHERE key LIKE 'embedding_%'")
            c.execute("UPDATE passages SET embedded = 0 WHERE embedded = 1")

        await self.db.transact(start_over)
        self.dim = None

    async def _start_space(self, dim: int) -> None:
        await self.db.transact(
            lambda c: c.executemany(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                [("embedding_model", self.model), ("embedding_dim", str(dim))],
            )
        )
        self.dim = dim

    async def embed(self, texts: list[str], *, remember: bool = True) -> list[bytes]:
        """Vectors for `texts`, packed; text seen before comes from the cache.

        Passages pass remember=False: their vectors live in passage_vectors, where
        Archive finds them by text hash, and a second copy would double the file.
        """
        hashes = [text_hash(t) for t in texts]
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(hashes))
        for i in range(0, len(unique), 500):
            part = unique[i : i + 500]
            rows = await self.db.fetchall(
                f"SELECT text_hash, vector FROM embedding_cache WHERE model = ? AND text_hash IN ({marks(len(part))})",
                (self.model, *part),
            )
            found.update((r[0], r[1]) for r in rows)
        todo = {h: t for h, t in zip(hashes, texts) if h not in found}
        items = list(todo.items())
        for i in range(0, len(items), self.batch_size):
            batch = items[i : i + self.batch_size]
            vectors = await self.client.embed(self.model, [t for _, t in batch])
            dim = len(vectors[0])
            if self.dim is None:
                await self._start_space(dim)
            if any(len(v) != self.dim for v in vectors):
                raise LLMError(f"embedding model {self.model} returned {dim} dimensions, expected {self.dim}")
            packed = [pack(v) for v in vectors]
            if remember:
                rows = [(self.model, h, p) for (h, _), p in zip(batch, packed)]
                await self.db.transact(functools.partial(_remember, rows=rows))
            found.update((h, p) for (h, _), p in zip(batch, packed))
        return [found[h] for h in hashes]


CACHE_ROWS = 10_000


def _remember(c: sqlite3.Connection, rows: list[tuple[str, str, bytes]]) -> None:
    c.executemany("INSERT OR IGNORE INTO embedding_cache(model, text_hash, vector) VALUES (?, ?, ?)", rows)
    # queries keep coming: keep the newest
    c.execute("DELETE FROM embedding_cache WHERE rowid <= (SELECT max(rowid) FROM embedding_cache) - ?", (CACHE_ROWS,))
