"""Archival retrieval quality on LoCoMo, through the engine's own insert and search.

    python bench/retrieval.py                                         # keyword mode
    python bench/retrieval.py --embeddings http://127.0.0.1:8089/v1   # hybrid mode

Each LoCoMo conversation goes into its own agent, each turn as one archival
item ("Speaker: text") with its session's date as created_at, through
Archive.insert: the same chunking, neighbour context, date column and
embedding the engine does for the model's archival_memory_insert. Then every
question of categories 1-4 (multi-hop, temporal, open-domain, single-hop;
5, adversarial, has no evidence to find) is asked through Archive.search with
page_size=10, and the gold evidence turns are looked for in that top 10:

    recall_any@k   a gold turn is among the first k hits
    recall_all@10  every gold turn is in the top 10
    MRR            1 / rank of the first gold turn in the top 10 (0 if none)

Evidence is split on ';' (a few entries are malformed, "D8:6; D9:17"), ids
that resolve to no turn are skipped, and a question with no resolvable
evidence is left out. Every figure is an average over questions.

Without --embeddings the archive has no embedder: keyword search (FTS5 BM25).
With it, an Embedder for "all-MiniLM-L6-v2" over the engine's LLMClient:
hybrid search. bench/embed_server.py serves that model on loopback. By default
each insert embeds its passage at once (one HTTP call per turn, the path of
the model's archival_memory_insert); --embed-after inserts every turn first
and then embeds them all with Archive.embed_pending (batched, the path after
an embedding outage or a model change).

The dataset (CC BY-NC 4.0, evaluation only) is read from shared/, never copied
into this repository. The database is a fresh temporary file unless --db is
given. The last line printed is the summary:

    retrieval mode=<keyword|hybrid> n=<questions> recall_any@5=<x> recall_any@10=<y> recall_all@10=<z> mrr=<m>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memory import agents  # noqa: E402
from memory.archival import CANDIDATES, OVERSAMPLE, Archive  # noqa: E402
from memory.config import EngineSettings  # noqa: E402
from memory.db import Database  # noqa: E402
from memory.embeddings import Embedder  # noqa: E402
from memory.llm import LLMClient, LLMError  # noqa: E402

DEFAULT_DATASET = ROOT.parent / "shared" / "datasets" / "locomo" / "locomo-dev.json"
MODEL = "all-MiniLM-L6-v2"
TOP = 10
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}


def session_time(text: str) -> str:
    """ "1:56 pm on 8 May, 2023" -> "2023-05-08T13:56:00Z" (the dataset has no time zone; taken as UTC)."""
    cleaned = re.sub(r"\s+", " ", text.replace(",", "")).strip()
    try:
        moment = datetime.strptime(cleaned, "%I:%M %p on %d %B %Y")
    except ValueError:
        raise ValueError(f"session date {text!r} is not like '1:56 pm on 8 May, 2023'") from None
    return moment.replace(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Turn:
    dia_id: str
    text: str  # "Speaker: text", as stored
    created_at: str


@dataclass
class Question:
    text: str
    category: int
    gold: set[str]  # dia ids


@dataclass
class Conversation:
    sample_id: str
    turns: list[Turn]
    questions: list[Question]


def load(path: Path) -> tuple[list[Conversation], int]:
    """The conversations, and how many category 1-4 questions had no evidence that resolves."""
    conversations, unresolved = [], 0
    for sample in json.loads(path.read_text(encoding="utf-8")):
        c = sample["conversation"]
        sessions = sorted(int(k.split("_")[1]) for k in c if re.fullmatch(r"session_\d+", k))
        turns: list[Turn] = []
        for n in sessions:
            stamp = session_time(c[f"session_{n}_date_time"])
            for t in c[f"session_{n}"]:
                turns.append(Turn(t["dia_id"], f"{t['speaker']}: {t['text']}", stamp))
        known = {t.dia_id for t in turns}
        questions = []
        for qa in sample["qa"]:
            if qa.get("category") not in CATEGORIES:
                continue
            gold = {p.strip() for e in qa.get("evidence", []) for p in str(e).split(";")} & known
            if gold:
                questions.append(Question(qa["question"], qa["category"], gold))
            else:
                unresolved += 1
        conversations.append(Conversation(sample["sample_id"], turns, questions))
    return conversations, unresolved


@dataclass
class Result:
    category: int
    gold: set[str]
    ranked: list[str]  # dia ids of the hits, best first


def scores(results: list[Result]) -> dict[str, float]:
    n = len(results)
    mrr = any5 = any10 = all10 = 0.0
    for r in results:
        first = next((i for i, d in enumerate(r.ranked[:TOP]) if d in r.gold), None)
        if first is not None:
            mrr += 1 / (first + 1)
            any5 += first < 5
            any10 += first < 10
        all10 += r.gold <= set(r.ranked[:TOP])
    div = n or 1
    return {"n": n, "mrr": mrr / div, "any5": any5 / div, "any10": any10 / div, "all10": all10 / div}


class WarningCounter(logging.Handler):
    """Embedding failures only log a warning in the engine (it falls back to keywords); count them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def run(args: argparse.Namespace, db_path: Path) -> int:
    conversations, unresolved = load(args.dataset)
    db = await Database.open(db_path)
    client = LLMClient(args.embeddings, max_retries=2, retry_budget=30) if args.embeddings else None
    try:
        embedder = None
        if client is not None:
            try:  # fail at once, not after 2,760 silent keyword-only inserts
                await client.embed(MODEL, ["ping"])
            except LLMError as exc:
                print(f"embeddings endpoint {args.embeddings} does not work: {exc}", file=sys.stderr)
                return 2
            embedder = Embedder(db, client, MODEL)
            await embedder.prepare()
        mode = "hybrid" if embedder else "keyword"
        archive = Archive(db, embedder)
        settings = EngineSettings(_env_file=None)
        failures = WarningCounter()
        logging.getLogger("memory").addHandler(failures)

        # ingest
        agent_of, passage_to_turn = {}, {}
        started = time.perf_counter()
        writer = Archive(db, None) if args.embed_after else archive
        passages = 0
        for conv in conversations:
            agent = await agents.get_or_create(db, f"local:locomo-{conv.sample_id}", settings)
            agent_of[conv.sample_id] = agent
            for turn in conv.turns:
                for pid in await writer.insert(agent, turn.text, source="locomo", created_at=turn.created_at):
                    passage_to_turn[pid] = turn.dia_id
                    passages += 1
        if args.embed_after and embedder:
            await archive.embed_pending()
        ingest_s = time.perf_counter() - started
        if embedder:
            missing = await db.fetchval("SELECT count(*) FROM passages WHERE embedded = 0", (), 0)
            if missing:
                print(f"{missing} passages have no vector; hybrid figures would be wrong", file=sys.stderr)
                return 2

        # search
        results: list[Result] = []
        latencies: list[float] = []
        agreement: list[float] = []  # of the vector side's candidates with an exact scan
        for conv in conversations:
            agent = agent_of[conv.sample_id]
            for q in conv.questions:
                t0 = time.perf_counter()
                page = await archive.search(agent, q.text, page_size=TOP)
                latencies.append(time.perf_counter() - t0)
                ranked = list(dict.fromkeys(passage_to_turn[h.id] for h in page.hits if h.id in passage_to_turn))
                results.append(Result(q.category, q.gold, ranked))
                if embedder:
                    (vector,) = await embedder.embed([q.text])
                    exact = await db.fetchall(
                        "SELECT v.id FROM passage_vectors v JOIN passages p ON p.id = v.id WHERE p.agent_id = ?"
                        " ORDER BY vec_distance_l2(v.vector, ?) LIMIT ?",
                        (agent.id, vector, CANDIDATES),
                    )
                    found = set(await archive.nearest(agent, q.text, k=CANDIDATES))
                    agreement.append(len(found & {r[0] for r in exact}) / max(1, len(exact)))
        if failures.count:
            print(
                f"{failures.count} warnings from the engine (embedding failures?); figures are not pure {mode}", file=sys.stderr
            )
            return 2
    finally:
        if client is not None:
            await client.aclose()
        await db.close()

    turns = sum(len(c.turns) for c in conversations)
    print(
        f"LoCoMo {args.dataset.name}: {len(conversations)} conversations, {turns} turns, "
        f"{len(results)} questions (categories 1-4; {unresolved} without resolvable evidence left out)"
    )
    print(
        f"mode {mode}"
        + (
            f", embeddings {MODEL} at {args.embeddings} ({'batched after ingest' if args.embed_after else 'one call per insert'})"
            if embedder
            else ""
        )
    )
    print()
    print(f"{'category':<16} {'n':>5} {'MRR':>7} {'any@5':>7} {'any@10':>7} {'all@10':>7}")
    groups = [(f"{c} {name}", [r for r in results if r.category == c]) for c, name in CATEGORIES.items()]
    for name, group in [*groups, ("all", results)]:
        s = scores(group)
        print(f"{name:<16} {s['n']:>5} {s['mrr']:>7.3f} {s['any5']:>7.3f} {s['any10']:>7.3f} {s['all10']:>7.3f}")
    print()
    ms = [x * 1000 for x in latencies]
    p95 = statistics.quantiles(ms, n=20)[-1] if len(ms) > 1 else ms[0]
    print(f"ingest {passages} passages in {ingest_s:.1f} s: {passages / ingest_s:.0f} passages/s")
    print(f"search {len(ms)} queries: p50 {statistics.median(ms):.2f} ms, p95 {p95:.2f} ms")
    if agreement:
        print(
            f"vector candidates (sign bits, {OVERSAMPLE}x oversampled, rescored): {statistics.fmean(agreement):.3f}"
            f" of an exact scan's top {CANDIDATES}, agents of ~{passages // len(conversations)} passages"
        )
    s = scores(results)
    print(
        f"retrieval mode={mode} n={s['n']} recall_any@5={s['any5']:.3f} recall_any@10={s['any10']:.3f} "
        f"recall_all@10={s['all10']:.3f} mrr={s['mrr']:.3f}"
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help=f"LoCoMo JSON (default {DEFAULT_DATASET})")
    parser.add_argument("--embeddings", metavar="URL", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8089/v1")
    parser.add_argument(
        "--embed-after", action="store_true", help="insert every turn first, then embed them all at once (Archive.embed_pending)"
    )
    parser.add_argument("--db", type=Path, help="database file to use (default: a fresh temporary one)")
    args = parser.parse_args()
    if not args.dataset.is_file():
        parser.error(f"dataset {args.dataset} not found")
    if args.db:
        if args.db.exists():
            parser.error(f"{args.db} exists; give a new path (the benchmark needs an empty archive)")
        sys.exit(asyncio.run(run(args, args.db)))
    with tempfile.TemporaryDirectory(prefix="mnemocord-retrieval-") as tmp:
        sys.exit(asyncio.run(run(args, Path(tmp) / "bench.db")))


if __name__ == "__main__":
    main()
