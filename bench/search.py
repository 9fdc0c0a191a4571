"""Archival search latency on a large store: keyword, vector and hybrid.

    python bench/search.py                    # 1,000,000 passages across 100 agents
    python bench/search.py --passages 20000   # a quick run

Builds (once; cached as bench/.cache/search-v<version>-s<seed>-<N>.db) a
database of N archival passages spread over agents of 10,000 passages each,
with generated text (a Zipf-distributed vocabulary, so BM25 posting lists have
realistic sizes) and random unit 384-d vectors, then times searches for one
agent of 10,000 passages:

    keyword  Archive(db, embedder=None).search(agent, q)
    vector   Archive(db, embedder).nearest(agent, q, k=CANDIDATES)
    hybrid   Archive(db, embedder).search(agent, q)

The schema is made by the engine itself (Database.open, agents.get_or_create,
Embedder.prepare/embed, which writes the meta rows). The
passages are then written with plain SQL in large transactions, row for row
what Archive.insert + embed_pending would leave: passages (embedded = 1),
passages_fts (the neighbours' text as context, the spoken date), passage_vectors
and passage_bits (the embedder caches query vectors only). Before each
build a self-check inserts a few passages both ways, through Archive.insert
and through the bulk path, and compares the two files; a difference is
printed, as a sign this file has fallen behind memory/archival.py.

Query vectors come from a stand-in embedding client (no HTTP) and are put into
the embedding cache before timing, so the vector and hybrid figures include
the cache lookup the engine does for a query, not a model call. The last line
printed is the summary:

    search p50_ms_keyword=<x> p50_ms_vector=<y> p50_ms_hybrid=<z> p95_ms_hybrid=<w> passages=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import random
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import NormalDist

import sqlean as sqlite3
import sqlite_vec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import agents  # noqa: E402
from memory.archival import CANDIDATES, CONTEXT_CHARS, Archive  # noqa: E402
from memory.config import EngineSettings  # noqa: E402
from memory.db import Database  # noqa: E402
from memory.embeddings import Embedder, pack, text_hash  # noqa: E402
from memory.fulltext import passage_row  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
# bump when the generated data changes, so old cache files are not reused
DATA_VERSION = 2
MODEL = "bench-random-384"
DIM = 384
PER_AGENT = 10_000
VOCABULARY = 5_000
ZIPF_S = 1.0
BATCH = 20_000
WARMUP = 10
SEED = 1234
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
SPAN_SECONDS = 730 * 86400  # the passages' dates spread over two years

# Function words take the top ranks, as in real text; fulltext.terms() drops most of them.
COMMON = (
    "the of and to a in is it you that he was for on are with as i his they be at one have this from or had by "
    "not but what some we can out other were all there when up use your how said an each she which do their"
).split()
_ONSETS = [
    "",
    "b",
    "br",
    "c",
    "ch",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "pl",
    "r",
    "s",
    "sh",
    "st",
    "t",
    "th",
    "tr",
    "v",
    "w",
    "z",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "x"]


def vocabulary(size: int = VOCABULARY) -> list[str]:
    """`size` distinct words: common English function words, then made-up words."""
    rng = random.Random(7)
    words = list(dict.fromkeys(COMMON))
    seen = set(words)
    while len(words) < size:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        w += rng.choice(_CODAS)
        if len(w) > 2 and w not in seen:
            seen.add(w)
            words.append(w)
    return words


class Text:
    """Sentences drawn from a Zipf-distributed vocabulary."""

    def __init__(self) -> None:
        self.words = vocabulary()
        total = 0.0
        self.cum: list[float] = []
        for rank in range(1, len(self.words) + 1):
            total += 1.0 / rank**ZIPF_S
            self.cum.append(total)
        self.first_content = len(dict.fromkeys(COMMON))

    def draw(self, rng: random.Random, n: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cum, k=n)

    def passage(self, rng: random.Random) -> str:
        """10-40 words (at most ~600 characters: always one chunk)."""
        words = self.draw(rng, rng.randint(10, 40))
        sentences, i = [], 0
        while i < len(words):
            n = rng.randint(4, 12)
            s = " ".join(words[i : i + n])
            sentences.append(s[0].upper() + s[1:] + rng.choice(".....?!"))
            i += n
        return " ".join(sentences)

    def query(self, rng: random.Random) -> str:
        """2-6 words like the text's, with at least one that is not a function word."""
        words = self.draw(rng, rng.randint(2, 6))
        if all(w in COMMON for w in words):
            # a draw from the content words only, still Zipf-distributed
            top, low = self.cum[-1], self.cum[self.first_content - 1]
            words[rng.randrange(len(words))] = self.words[bisect.bisect(self.cum, low + rng.random() * (top - low))]
        return " ".join(words)


# Inverse normal CDF at 65,536 points: two random bytes become one N(0, 1) sample,
# far faster than random.gauss() for the ~400 million numbers of a full build.
_GAUSS = [NormalDist().inv_cdf((i + 0.5) / 65536) for i in range(65536)]


def random_vector(text: str, dim: int = DIM) -> list[float]:
    """The same random direction for the same text, like a (useless) embedding model."""
    return list(map(_GAUSS.__getitem__, array("H", random.Random(text_hash(text)).randbytes(2 * dim))))


class RandomEmbeddings:
    """Stands in for the LLM client's embed(): random_vector() of each text, no HTTP."""

    def __init__(self) -> None:
        self.calls = 0

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        return [random_vector(t) for t in texts]


def settings() -> EngineSettings:
    return EngineSettings(_env_file=None)  # type: ignore[call-arg]


def agent_keys(count: int) -> list[str]:
    return [f"channel:{900_000 + i}" if i % 3 == 0 else f"dm:{100_000 + i}" for i in range(count)]


def plan(passages: int) -> list[int]:
    """Passages per agent: 10,000 each; the last one takes the remainder."""
    full, rest = divmod(passages, PER_AGENT)
    return [PER_AGENT] * full + ([rest] if rest else [])


def interleave(counts: Sequence[int], seed: int) -> list[int]:
    """Agent index of each passage in insertion order: agents write at the same time."""
    order = [a for a, n in enumerate(counts) for _ in range(n)]
    random.Random(seed).shuffle(order)
    return order


def sidecars(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in sidecars(path) if p.exists())


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.enable_load_extension(False)
    return conn


# ---------------------------------------------------------------- building


class Corpus:
    """Passage n (0-based, in insertion order): its text and time, a pure function of (seed, n)."""

    def __init__(self, order: Sequence[int], seed: int) -> None:
        self.order = order
        self.seed = seed
        self.text = Text()
        self.step = SPAN_SECONDS / max(1, len(order))

    def content(self, n: int) -> str:
        return self.text.passage(random.Random(self.seed * 100_000_007 + n))

    def stamp(self, n: int) -> str:
        return (BASE_TIME + timedelta(seconds=int(n * self.step))).strftime("%Y-%m-%dT%H:%M:%SZ")


async def open_space(db: Database, keys: list[str]) -> tuple[list[int], Embedder]:
    """The agents (created with their blocks) and an embedder whose vector table exists."""
    ids = [(await agents.get_or_create(db, key, settings())).id for key in keys]
    embedder = Embedder(db, RandomEmbeddings(), MODEL)  # type: ignore[arg-type]
    await embedder.prepare()
    await embedder.embed(["bench search: the first text creates the vector table"])
    return ids, embedder


async def create_schema(path: Path, keys: list[str]) -> list[int]:
    """Everything the engine makes itself: tables, agents with their blocks, the vector space."""
    db = await Database.open(path)
    try:
        ids, embedder = await open_space(db, keys)
        if embedder.dim != DIM:
            raise SystemExit(f"the embedder recorded {embedder.dim} dimensions, expected {DIM}")
    finally:
        await db.close()
    return ids


def bulk_insert(path: Path, agent_ids: list[int], corpus: Corpus, progress: bool) -> None:
    """The rows Archive.insert and embed_pending would write for every passage of `corpus`."""
    order, total = corpus.order, len(corpus.order)
    # the next passage of the same agent: its text is this one's "after" context
    following = array("q", [-1]) * total
    last: dict[int, int] = {}
    for n in range(total - 1, -1, -1):
        following[n] = last.get(order[n], -1)
        last[order[n]] = n
    previous: dict[int, str] = {}  # agent index -> content of its latest passage

    conn = connect(path)
    # a throwaway file until it is complete: no journal, no fsync
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")
    first_id = (conn.execute("SELECT max(id) FROM passages").fetchone()[0] or 0) + 1
    started = time.perf_counter()
    done = 0
    while done < total:
        rows, fts, vec = [], [], []
        for n in range(done, min(total, done + BATCH)):
            a = order[n]
            pid, agent_id = first_id + n, agent_ids[a]
            content = corpus.content(n)
            stamp = corpus.stamp(n)
            before = previous.get(a, "")[-CONTEXT_CHARS:]
            previous[a] = content
            context = before if following[n] < 0 else f"{before} {corpus.content(following[n])[:CONTEXT_CHARS]}".strip()
            h = text_hash(content)
            vector = pack(random_vector(content))
            rows.append((pid, agent_id, content, context, "[]", "", stamp, h))
            fts.append((pid, *passage_row(agent_id, content, context, stamp)))
            vec.append((pid, agent_id, vector))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO passages(id, agent_id, content, context, tags, source, created_at, text_hash, embedded)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
            rows,
        )
        conn.executemany("INSERT INTO passages_fts(rowid, content, context, date) VALUES (?, ?, ?, ?)", fts)
        conn.executemany("INSERT INTO passage_vectors(id, vector) VALUES (?, ?)", [(v[0], v[2]) for v in vec])
        conn.executemany(
            "INSERT INTO passage_bits(agent_id, id, bits) VALUES (?, ?, vec_quantize_binary(?))",
            [(v[1], v[0], v[2]) for v in vec],
        )
        conn.execute("COMMIT")
        done += len(rows)
        if progress:
            elapsed = time.perf_counter() - started
            print(
                f"  {done:>10,} / {total:,}  {done / elapsed:,.0f} passages/s"
                f"  eta {(total - done) / (done / elapsed) / 60:.1f} min  {file_size(path) / 2**20:,.0f} MiB",
                flush=True,
            )
    if progress:
        print("  optimizing the full-text index", flush=True)
    conn.execute("INSERT INTO passages_fts(passages_fts) VALUES('optimize')")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()


def build(path: Path, passages: int, seed: int) -> None:
    partial = path.with_name(path.name + ".partial")
    for p in sidecars(partial):
        p.unlink(missing_ok=True)
    counts = plan(passages)
    started = time.perf_counter()
    print(f"building {path.name}: {passages:,} passages, {len(counts)} agents", flush=True)
    agent_ids = asyncio.run(create_schema(partial, agent_keys(len(counts))))
    bulk_insert(partial, agent_ids, Corpus(interleave(counts, seed), seed), progress=True)
    for src, dst in zip(sidecars(partial), sidecars(path)):
        if src.exists():
            src.replace(dst)
    print(f"built {path.name} in {(time.perf_counter() - started) / 60:.1f} min, {file_size(path) / 2**20:,.0f} MiB", flush=True)


# What the two ways of writing must agree on (agents.created_at and blocks.updated_at are "now").
COMPARED = {
    "schema": "SELECT type, name, sql FROM sqlite_master ORDER BY name",
    "agents": "SELECT id, key FROM agents ORDER BY id",
    "blocks": "SELECT agent_id, label, value, char_limit, description FROM blocks ORDER BY agent_id, label",
    "passages": "SELECT * FROM passages ORDER BY id",
    "passage_tags": "SELECT * FROM passage_tags ORDER BY passage_id, tag",
    "passages_fts terms": "SELECT term, doc, col, offset FROM temp.v ORDER BY doc, col, offset",
    "passage_vectors": "SELECT id, vector FROM passage_vectors ORDER BY id",
    "passage_bits": "SELECT agent_id, id, bits FROM passage_bits ORDER BY id",
    "embedding_cache": "SELECT model, text_hash, vector FROM embedding_cache ORDER BY text_hash",
    "meta": "SELECT key, value FROM meta ORDER BY key",
}


async def engine_insert(path: Path, keys: list[str], corpus: Corpus) -> None:
    db = await Database.open(path)
    try:
        ids, embedder = await open_space(db, keys)
        archive = Archive(db, embedder)
        for n, a in enumerate(corpus.order):
            await archive.insert(agents.Agent(ids[a], keys[a]), corpus.content(n), created_at=corpus.stamp(n))
    finally:
        await db.close()


def self_check(seed: int) -> list[str]:
    """Differences between Archive.insert and the bulk path on a few passages (empty: none)."""
    counts = [5, 4, 3]
    keys = agent_keys(len(counts))
    corpus = Corpus(interleave(counts, seed), seed)
    with tempfile.TemporaryDirectory() as tmp:
        engine, bulk = Path(tmp, "engine.db"), Path(tmp, "bulk.db")
        asyncio.run(engine_insert(engine, keys, corpus))
        bulk_insert(bulk, asyncio.run(create_schema(bulk, keys)), corpus, progress=False)
        found = {}
        for path in (engine, bulk):
            conn = connect(path)
            conn.execute("INSERT INTO passages_fts(passages_fts) VALUES('optimize')")
            conn.execute("CREATE VIRTUAL TABLE temp.v USING fts5vocab(main, passages_fts, instance)")
            found[path] = {name: conn.execute(sql).fetchall() for name, sql in COMPARED.items()}
            conn.close()
    return [name for name in COMPARED if found[engine][name] != found[bulk][name]]


def usable(path: Path, passages: int) -> bool:
    """The cached file has every passage and the schema the engine makes today."""
    if not path.exists():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp, "fresh.db")
        asyncio.run(create_schema(fresh, agent_keys(1)))
        conn = connect(fresh)
        schema = conn.execute(COMPARED["schema"]).fetchall()
        conn.close()
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            ok = conn.execute(COMPARED["schema"]).fetchall() == schema
            ok = ok and conn.execute("SELECT count(*) FROM passages").fetchone()[0] == passages
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False
    return ok


# ---------------------------------------------------------------- timing


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


async def timed(label: str, queries: list[str], run: Callable[[str], Awaitable[int]]) -> list[float]:
    times, results = [], []
    for q in queries:
        t = time.perf_counter()
        found = await run(q)
        times.append((time.perf_counter() - t) * 1000)
        results.append(found)
    print(
        f"  {label:<8} p50 {percentile(times, 0.5):7.2f} ms  p95 {percentile(times, 0.95):7.2f} ms"
        f"  max {max(times):7.2f} ms  mean {statistics.fmean(times):7.2f} ms  {statistics.fmean(results):8.1f} results/query",
        flush=True,
    )
    return times


async def measure(path: Path, queries: int, seed: int) -> tuple[dict[str, list[float]], int]:
    db = await Database.open(path)
    try:
        row = await db.fetchone(
            "SELECT agent_id FROM passages GROUP BY agent_id ORDER BY count(*) = ? DESC, count(*) DESC, agent_id LIMIT 1",
            (PER_AGENT,),
        )
        agent_id = row[0]
        agent = agents.Agent(agent_id, await db.fetchval("SELECT key FROM agents WHERE id = ?", (agent_id,)))
        total = await db.fetchval("SELECT count(*) FROM passages", (), 0)
        own = await db.fetchval("SELECT count(*) FROM passages WHERE agent_id = ?", (agent_id,), 0)

        text, rng = Text(), random.Random(seed + 2)
        warm = [text.query(rng) for _ in range(WARMUP)]
        qs = [text.query(rng) for _ in range(queries)]
        client = RandomEmbeddings()
        embedder = Embedder(db, client, MODEL)  # type: ignore[arg-type]
        await embedder.prepare()
        if embedder.dim != DIM:
            raise SystemExit(f"the database's embedding space is {embedder.dim}-d, expected {DIM}; use --rebuild")
        # query vectors into the embedding cache: the timed searches only look them up
        await embedder.embed(warm + qs)
        calls = client.calls
        keyword = Archive(db, None)
        hybrid = Archive(db, embedder)

        async def kw(q: str) -> int:
            return (await keyword.search(agent, q)).total

        async def vec(q: str) -> int:
            return len(await hybrid.nearest(agent, q, k=CANDIDATES))

        async def both(q: str) -> int:
            return (await hybrid.search(agent, q)).total

        async def lookup(q: str) -> int:
            return len(await embedder.embed([q]))

        async def ping(q: str) -> int:
            return int(await db.fetchval("SELECT 1", (), 0))

        print(
            f"timing {len(qs)} searches for agent {agent.key} ({own:,} of {total:,} passages) after"
            f" {WARMUP} warm-up queries and an untimed pass; database {file_size(path) / 2**20:,.0f} MiB",
            flush=True,
        )
        print(f"  queries like {qs[0]!r}, {qs[1]!r}, {qs[2]!r}", flush=True)
        # the figures are for a database in the OS page cache, as a busy bot's would be
        for run in (kw, vec, both, lookup, ping):
            for q in warm + qs:
                await run(q)
        out = {
            "keyword": await timed("keyword", qs, kw),
            "vector": await timed("vector", qs, vec),
            "hybrid": await timed("hybrid", qs, both),
        }
        # parts of the above that are not the search itself
        await timed("embed*", qs, lookup)
        await timed("hop**", qs, ping)
        print("  * the query-vector cache lookup alone (part of vector and hybrid)", flush=True)
        print("  ** one round-trip through the aiosqlite reader (SELECT 1)", flush=True)
        if client.calls != calls:
            print(f"  note: the embedding client was called {client.calls - calls} times while timing", flush=True)
        return out, total
    finally:
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=1_000_000, help="total passages (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per mode (default 200)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--rebuild", action="store_true", help="build the database again even if cached")
    parser.add_argument("--build-only", action="store_true", help="build (or check) the database, time nothing")
    args = parser.parse_args()
    if args.passages < 1 or args.queries < 1:
        parser.error("--passages and --queries must be at least 1")

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"search-v{DATA_VERSION}-s{args.seed}-{args.passages}.db"
    if args.rebuild or not usable(path, args.passages):
        differ = self_check(args.seed)
        if differ:
            print(
                f"WARNING: the bulk build differs from Archive.insert in: {', '.join(differ)};"
                " bench/search.py needs updating to match memory/",
                flush=True,
            )
        for p in sidecars(path):
            p.unlink(missing_ok=True)
        build(path, args.passages, args.seed)
    else:
        print(f"reusing {path} ({file_size(path) / 2**20:,.0f} MiB)", flush=True)
    if args.build_only:
        return
    r, total = asyncio.run(measure(path, args.queries, args.seed))
    print(
        f"search p50_ms_keyword={percentile(r['keyword'], 0.5):.2f} p50_ms_vector={percentile(r['vector'], 0.5):.2f}"
        f" p50_ms_hybrid={percentile(r['hybrid'], 0.5):.2f} p95_ms_hybrid={percentile(r['hybrid'], 0.95):.2f}"
        f" passages={total}"
    )


if __name__ == "__main__":
    main()
