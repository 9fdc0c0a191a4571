"""Scheduled events at scale: 100,000 pending across 10,000 agents, 1,000 due in the same second.

    python bench/events.py                         # the issue's figures
    python bench/events.py --agents 1000 --events 10000 --due 100   # a quick run

The real engine (Engine.open, its scheduler and intake, SQLite on a temp file)
talks to a fake OpenAI-compatible model in a child process (`--serve`) that
answers every request with a send_message call after 50 ms, so its CPU and
memory are not counted here. The model-call limit is the engine's default
(MAX_CONCURRENT_LLM_CALLS=4).

Set-up, in a child process (as a bot that accumulated the events before a
restart): the agents and their blocks, then the events, written straight into
the database. `--due` events, each on its own agent, are due in the same second
`--lead` seconds after the set-up ends; the rest are spread over the coming
year. This process then opens the engine and starts the timer with a delivery
function that records when each answer arrives.

Figures:
    idle        process CPU while the timer waits with every event pending
    rss         VmRSS before any event existed, with all of them pending and
                the timer armed, and the peak (ru_maxrss) over the whole run
    late        per delivered answer: arrival - due time - the model time of the
                turn that answered it (TurnResult.model_seconds: its calls as the
                client saw them, waiting for a slot under the call limit
                included) - the time it waited behind other turns for the model
                before it began (TurnResult.queued_seconds: at most
                TURNS_PER_CALL_SLOT turns per call slot run at once, and the timer
                fires no more events than there is room for, so an event's wait
                while it was due and the engine had no room is counted there too);
                what is left is the engine's own lateness: from the moment it had
                room for the event to the answer, less the model's time.
    missed      events due by the end that were not answered within --deadline s

The last line:

    events pending=<n> fired=<n> missed=<n> late_p50_ms=<x> late_p95_ms=<y> rss_mib=<z>

with pending the events pending when the timer was armed and rss_mib the RSS
they add: with the timer armed over all of them, against the same process with
the engine open before the timer started (which reads no event).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import agents, events  # noqa: E402
from memory.clock import stamp  # noqa: E402
from memory.config import EngineSettings  # noqa: E402
from memory.db import Database  # noqa: E402
from memory.engine import Engine  # noqa: E402

MODEL_SECONDS = 0.05


def serve() -> None:
    """The fake model (tests/fakeopenai.py): every chat request gets a send_message call after MODEL_SECONDS."""
    from tests.fakeopenai import Delay, FakeOpenAI, call

    async def main() -> None:
        fake = await FakeOpenAI(usage=False).start()
        fake.default = lambda body: Delay(MODEL_SECONDS, call("send_message", {"message": "Reminder!"}))
        print(fake.url, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_settings(path: Path, url: str, args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(  # type: ignore[call-arg]
        _env_file=None,
        database_path=path,
        llm_base_url=url,
        llm_model="fake",
        max_pending_events=max(25, args.events // args.agents + 1),
    )


async def set_up(args: argparse.Namespace, path: Path) -> None:
    """In a child process, as a bot that accumulated these events before its restart; prints the due second."""
    settings = bench_settings(path, "http://127.0.0.1:1/v1", args)
    db = await Database.open(path)
    rng = random.Random(7)
    created = stamp(datetime.now(UTC))

    def add_agents(c: Any) -> list[int]:
        ids = []
        for n in range(args.agents):
            key = f"dm:{n}"
            (agent_id,) = c.execute("INSERT INTO agents(key, created_at) VALUES (?, ?) RETURNING id", (key, created)).fetchone()
            c.executemany(
                "INSERT INTO blocks(agent_id, label, value, char_limit, description, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(agent_id, label, value, limit, d, created) for label, value, limit, d in agents.default_blocks(key, settings)],
            )
            ids.append(int(agent_id))
        return ids

    def add_events(rows: list[tuple[int, str, str]]) -> Any:
        return lambda c: c.executemany(
            "INSERT INTO events(agent_id, due_at, note, repeat, set_by, set_by_id, created_at, state)"
            " VALUES (?, ?, ?, 'none', 'bench', '1', ?, 'pending')",
            [(*r, created) for r in rows],
        )

    agent_ids = await db.transact(add_agents)
    now = datetime.now(UTC)
    later = [
        (rng.choice(agent_ids), stamp(now + timedelta(days=1, seconds=rng.randrange(360 * 86400))), f"later {i}")
        for i in range(args.events - args.due)
    ]
    await db.transact(add_events(later))
    due = stamp(datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=args.lead))
    await db.transact(add_events([(a, due, f"due now {i}") for i, a in enumerate(rng.sample(agent_ids, args.due))]))
    await db.close()
    print(due, flush=True)


async def run(args: argparse.Namespace, url: str, path: Path, due_stamp: str) -> None:
    settings = bench_settings(path, url, args)
    engine = await Engine.open(settings)
    rss_before = rss_mib()
    arrivals: dict[int, float] = {}
    model: dict[int, float] = {}
    done = asyncio.Event()

    async def deliver(key: str, result: events.Answer, event: events.Event) -> bool:
        arrivals[event.id] = time.time()
        model[event.id] = result.model_seconds + result.queued_seconds
        if len(arrivals) >= args.due:
            done.set()
        return True

    await engine.events.start(deliver)
    pending = args.events  # as written by the set-up: counting them here would read the whole table into memory
    due = events.parse_stamp(due_stamp)
    cpu = time.process_time()
    idle_for = (due - datetime.now(UTC)).total_seconds() - 0.3
    if idle_for < 0.5:
        sys.exit("set-up outlasted --lead: raise it")
    await asyncio.sleep(idle_for)
    idle_cpu_ms = (time.process_time() - cpu) * 1000
    rss_armed = rss_mib()
    try:
        await asyncio.wait_for(done.wait(), args.deadline)
    except TimeoutError:
        pass
    await engine.events.finish()
    due_at = due.timestamp()
    missed_rows = await engine.db.fetchval(
        "SELECT count(*) FROM events WHERE due_at <= ? AND state = 'pending'", (stamp(datetime.now(UTC)),)
    )
    fired = len(arrivals)
    missed = args.due - fired + int(missed_rows)
    limit = settings.max_concurrent_llm_calls
    late = [(arrived - due_at - model[n]) * 1000 for n, arrived in arrivals.items()]
    raw = sorted((a - due_at) * 1000 for a in arrivals.values())
    await engine.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    nan = float("nan")
    print(f"{args.agents} agents, {pending} pending events, {args.due} of them due at {due_stamp}")
    print(f"idle: {idle_cpu_ms:.1f} ms CPU over {idle_for:.1f} s with every event pending and the timer armed")
    print(
        f"answers after the due time (model {MODEL_SECONDS * 1000:.0f} ms, {limit} calls at a time; the calls alone need "
        f"{(args.due // limit) * MODEL_SECONDS * 1000:.0f} ms): first {raw[0] if raw else nan:.0f} ms, "
        f"p50 {percentile(raw, 0.5):.0f} ms, last {raw[-1] if raw else nan:.0f} ms"
    )
    print(
        f"rss: {rss_before:.1f} MiB with the engine open and the timer not started, {rss_armed:.1f} MiB with "
        f"{pending} pending and the timer armed; peak over the run (1,000 turns) {peak:.1f} MiB"
    )
    print(
        f"events pending={pending} fired={fired} missed={missed} late_p50_ms={statistics.median(late) if late else nan:.1f} "
        f"late_p95_ms={percentile(late, 0.95):.1f} rss_mib={rss_armed - rss_before:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--due", type=int, default=1_000, help="events due in the same second, on distinct agents")
    parser.add_argument("--lead", type=int, default=5, help="seconds from the end of the set-up to the due second")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds to wait for the answers")
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.setup:
        asyncio.run(set_up(args, args.setup))
        return
    if not args.due <= args.agents or args.due > args.events:
        parser.error("--due must be at most --agents and --events")
    child = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "events.db"
            counts = [f"--{name}={getattr(args, name)}" for name in ("agents", "events", "due", "lead")]
            started = time.perf_counter()
            due = subprocess.run(
                [sys.executable, __file__, "--setup", str(path), *counts], check=True, capture_output=True, text=True
            ).stdout.strip()
            print(f"set-up (a child process): {time.perf_counter() - started:.1f} s")
            asyncio.run(run(args, url, path, due))
    finally:
        child.terminate()
        child.wait()


if __name__ == "__main__":
    main()
