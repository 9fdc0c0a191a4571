"""Load test: 100 users x 10 DMs through the fake Discord server, against the real bot process.

    python bench/bot_load.py                         # the issue's run: 100 users x 10 DMs, 200-ms model
    python bench/bot_load.py --users 20 --messages 3 # a quick run

Three processes, so the bot's memory and CPU are the bot's alone:

    this process   tests.fakediscord.FakeDiscord on 127.0.0.1 (REST + gateway) and the load
                   generator: every user writes a DM, waits for the bot's answer, then writes
                   the next one (a conversation); all users run at once.
    model          `bench/bot_load.py --serve-model`: tests.fakeopenai.FakeOpenAI answering every
                   chat completion after asyncio.sleep(MODEL_MS) with one send_message tool call
                   (4 in 5) or a plain reply (1 in 5) -- one model call per turn. The answer
                   quotes the message's tag (#u<user>m<n>), so each reply is matched to its
                   message. It has no /models route: the bot's start-up check gets a 404, which
                   it accepts.
    bot            `python -m bot.cli run` (the real entry point, what `mnemocord run` runs),
                   configured only through the environment (cwd is a temp dir, so no .env).

Reply latency = time from send_dm() returning (the MESSAGE_CREATE frame is written to the
bot's websocket) to the fake receiving the bot's POST /channels/{id}/messages: the fake is
subclassed to timestamp that POST with time.monotonic() (exact, no polling). A message is lost
if its reply has not arrived LOST_AFTER seconds after it was sent (the next message of that
user is then sent anyway; a late reply is still matched by its tag and counted).

Memory: VmHWM (peak RSS) of the bot process from /proc/<pid>/status at the end of the load,
plus VmRSS after start-up and at the end. CPU: utime+stime from /proc/<pid>/stat, and of the
event loop's thread (the one that serializes the work) from /proc/<pid>/task/<pid>/stat.
At the end the bot gets SIGTERM; its exit code and time to exit are reported.

The harness (fake Discord + 100 users) shares the machine's cores with the bot and the model;
its own event-loop lag is reported so a slow harness is not mistaken for a slow bot.

Figures only, no asserts. The last line is:
    bot_load users=100 messages=1000 replies=<n> lost=<l> p50_reply_ms=<x> p95_reply_ms=<y> rss_mib=<r>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TAG = re.compile(r"#(u\d+m\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOST_AFTER = 30.0  # seconds after a send without its reply: lost

# --profile: `python -m bot.cli run` under cProfile timing the main thread's CPU (not wall
# time, which on a shared machine charges preemption to whatever call was running)
PROFILE_WRAPPER = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = ["mnemocord", "run"]
profiler = cProfile.Profile(time.thread_time)
profiler.enable()
try:
    runpy.run_module("bot.cli", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""


# ============================================================== the fake model (child process)


def serve_model(model_ms: float) -> None:
    """Run FakeOpenAI until stdin closes; print its URL, answer "stats" lines with JSON."""
    from tests.fakeopenai import Delay, FakeOpenAI, call, reply

    def answer(body: dict[str, Any]) -> Any:
        users = [m.get("content") or "" for m in body["messages"] if m.get("role") == "user"]
        tags = TAG.findall(users[-1]) if users else []
        tag = tags[-1] if tags else "?"
        text = f"ack #{tag}: noted, thanks."
        plain = tag != "?" and int(tag.split("m")[1]) % 5 == 4
        return Delay(model_ms / 1000, reply(text) if plain else call("send_message", {"message": text}))

    async def main() -> None:
        fake = await FakeOpenAI(usage=True).start()
        fake.default = answer
        print("URL", fake.url, flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            if line.strip() == "stats":
                chats = fake.chat_requests
                stats = {
                    "chat_calls": len(chats),
                    "requests": len(fake.requests),
                    "max_in_flight": fake.max_in_flight,
                    "prompt_chars_mean": statistics.fmean(len(json.dumps(b["messages"])) for b in chats) if chats else 0,
                }
                print(json.dumps(stats), flush=True)
        await fake.stop()

    asyncio.run(main())


class ModelProcess:
    async def start(self, model_ms: float) -> str:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--serve-model", "--model-ms", str(model_ms),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=str(ROOT),
        )
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode()
        if not line.startswith("URL "):
            raise RuntimeError(f"the fake model did not start: {line!r}")
        return line.split()[1]

    async def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 10))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# ============================================================== the fake Discord, timestamping replies


def make_fake_discord() -> Any:
    from tests.fakediscord import FakeDiscord

    class TimedFakeDiscord(FakeDiscord):
        """Stamps every bot message with time.monotonic() when its POST reaches the fake."""

        def __init__(self) -> None:
            super().__init__()
            self.reply_at: dict[str, float] = {}  # tag -> first reply's arrival
            self.waiters: dict[str, asyncio.Future[float]] = {}
            self.untagged: list[str] = []  # bot messages without a tag: apologies, warnings

        def _create_bot_message(self, channel: Any, body: Any, files: Any, **kwargs: Any) -> Any:
            record = super()._create_bot_message(channel, body, files, **kwargs)
            at = time.monotonic()
            tags = TAG.findall(record.get("content") or "")
            if not tags:
                self.untagged.append((record.get("content") or "")[:120])
            for tag in tags:
                self.reply_at.setdefault(tag, at)
                waiter = self.waiters.get(tag)
                if waiter is not None and not waiter.done():
                    waiter.set_result(at)
            return record

        def expect(self, tag: str) -> asyncio.Future[float]:
            fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            if tag in self.reply_at:
                fut.set_result(self.reply_at[tag])
            self.waiters[tag] = fut
            return fut

    return TimedFakeDiscord()


# ============================================================== /proc readings


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... in KiB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.startswith("Vm") or key == "Threads":
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """Of the process, or of one of its threads (the event loop's thread has tid == pid)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]  # nearest rank


# ============================================================== the run


async def loop_lag(samples: list[float], stop: asyncio.Event, interval: float = 0.01) -> None:
    """How late this process's event loop wakes up: the harness's own delay."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(interval)
        samples.append(loop.time() - t - interval)


async def sample_rss(pid: int, samples: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss = proc_status(pid).get("VmRSS")
        if rss:
            samples.append(rss)
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass


async def run(args: argparse.Namespace) -> None:
    fake = make_fake_discord()
    await fake.start()
    model = ModelProcess()
    model_url = await model.start(args.model_ms)
    tmp = tempfile.TemporaryDirectory(prefix="bot_load_")
    db_path = Path(tmp.name) / "bot.db"

    users = [fake.add_user(f"user{u:03d}") for u in range(args.users)]
    for user in users:
        fake.dm_channel(user["id"])

    env = {
        **os.environ,
        "DISCORD_TOKEN": "fake",
        "DISCORD_API_BASE": fake.rest_base,
        "DISCORD_GATEWAY_URL": fake.gateway_url,
        "LLM_BASE_URL": model_url,
        "LLM_MODEL": "fake",
        "LLM_API_KEY": "",
        "EMBEDDING_MODEL": "",  # keyword-only archival search: no embedding calls in the load
        "DATABASE_PATH": str(db_path),
        "RATE_LIMIT_PER_MINUTE": str(args.rate_limit),
        "MAX_CONCURRENT_LLM_CALLS": str(args.max_llm),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(Path(args.bot_root).resolve() if args.bot_root else ROOT),
    }
    stderr_path = Path(tmp.name) / "bot.stderr"
    stderr_file = open(stderr_path, "wb")
    t_spawn = time.monotonic()
    command = ["-c", PROFILE_WRAPPER, str(Path(args.profile).resolve())] if args.profile else ["-m", "bot.cli", "run"]
    bot = await asyncio.create_subprocess_exec(
        sys.executable, *command, cwd=tmp.name, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=stderr_file, stderr=stderr_file,
    )
    pid = bot.pid

    lags: list[float] = []
    rss_samples: list[int] = []
    stop = asyncio.Event()
    lag_task = asyncio.create_task(loop_lag(lags, stop))
    rss_task = asyncio.create_task(sample_rss(pid, rss_samples, stop))

    try:
        exited = asyncio.create_task(bot.wait())
        ready = asyncio.create_task(fake.wait_ready(timeout=60))
        await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done() or ready.exception() is not None:
            ready.cancel()
            print(f"the bot did not become ready (exit code {bot.returncode}); its output:")
            print(stderr_path.read_text(errors="replace")[-3000:])
            total = args.users * args.messages
            print(f"bot_load users={args.users} messages={total} replies=0 lost={total} p50_reply_ms=nan p95_reply_ms=nan rss_mib=nan")
            raise SystemExit(1)
        startup_s = time.monotonic() - t_spawn
        await asyncio.sleep(0.5)  # let on_ready and the command sync settle
        idle = proc_status(pid)
        cpu_startup = cpu_seconds(pid)

        latencies: list[float] = []
        sent_at: dict[str, float] = {}
        last_send = [0.0]

        async def conversation(u: int, user: dict[str, Any]) -> None:
            for n in range(args.messages):
                if exited.done():
                    return
                tag = f"u{u}m{n}"
                waiter = fake.expect(tag)
                await fake.send_dm(user["id"], f"Hello there, this is message {n} from user {u}. #{tag}", timeout=30)
                t0 = time.monotonic()
                sent_at[tag] = last_send[0] = t0
                try:
                    at = await asyncio.wait_for(asyncio.shield(waiter), LOST_AFTER)
                    latencies.append(at - t0)
                except asyncio.TimeoutError:
                    pass  # lost, unless it turns up before the end (matched by tag below)

        cpu_model0 = cpu_seconds(model.proc.pid)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_harness0 = usage.ru_utime + usage.ru_stime
        cpu_bot0 = cpu_seconds(pid)
        cpu_loop0 = cpu_seconds(pid, pid)
        machine0 = machine_cpu()
        t_load = time.monotonic()
        await asyncio.gather(*(conversation(u, user) for u, user in enumerate(users)))
        t_done = time.monotonic()
        # stragglers: whatever is still unanswered gets until LOST_AFTER after the last send
        pending = [t for t in sent_at if t not in fake.reply_at]
        if pending and not exited.done():
            deadline = last_send[0] + LOST_AFTER
            while time.monotonic() < deadline and any(t not in fake.reply_at for t in pending):
                await asyncio.sleep(0.1)
        late = [t for t in pending if t in fake.reply_at]
        latencies += [fake.reply_at[t] - sent_at[t] for t in late]

        t_end = time.monotonic()
        status = proc_status(pid)
        cpu_total = cpu_seconds(pid)
        cpu_loop = cpu_seconds(pid, pid) - cpu_loop0
        cpu_model = cpu_seconds(model.proc.pid) - cpu_model0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_harness = usage.ru_utime + usage.ru_stime - cpu_harness0
        machine1 = machine_cpu()
        busy = machine1[0] - machine0[0]
        foreign = busy - (cpu_total - cpu_bot0) - cpu_harness - cpu_model
        model_stats = await model.stats()
        db_bytes = sum(p.stat().st_size for p in Path(tmp.name).glob("bot.db*"))

        # shutdown: SIGTERM, then time to exit
        t_term = time.monotonic()
        exit_code: int | None = bot.returncode
        if exit_code is None:
            bot.send_signal(signal.SIGTERM)
            try:
                exit_code = await asyncio.wait_for(asyncio.shield(exited), 30)
            except asyncio.TimeoutError:
                bot.kill()
                await bot.wait()
                exit_code = None
        exit_s = time.monotonic() - t_term
    finally:
        stop.set()
        await asyncio.gather(lag_task, rss_task)
        if bot.returncode is None:
            bot.kill()
            await bot.wait()
        stderr_file.close()
        await model.stop()
        await fake.stop()

    log_text = stderr_path.read_text(errors="replace")
    tmp.cleanup()

    total = args.users * args.messages
    sent = len(sent_at)
    replies = sum(1 for t in sent_at if t in fake.reply_at)
    lost = total - replies
    wall = t_done - t_load
    lat_ms = [x * 1000 for x in latencies]
    p50, p95, p99 = pct(lat_ms, 50), pct(lat_ms, 95), pct(lat_ms, 99)
    hwm_mib = status.get("VmHWM", 0) / 1024
    lag_ms = [x * 1000 for x in lags]

    print(f"settings: RATE_LIMIT_PER_MINUTE={args.rate_limit} (high enough that the limiter never refuses), "
          f"MAX_CONCURRENT_LLM_CALLS={args.max_llm}, EMBEDDING_MODEL unset, LOG_LEVEL=WARNING, "
          f"model {args.model_ms:.0f} ms per call, {os.cpu_count()} CPUs shared by bot, model and harness")
    print(f"load: {args.users} users x {args.messages} DMs, sequential per user, users concurrent; "
          f"sent {sent}, wall {wall:.2f} s, throughput {replies / wall if wall else 0:.1f} replies/s")
    print(f"reply latency ms: min {min(lat_ms, default=float('nan')):.1f} p50 {p50:.1f} p90 {pct(lat_ms, 90):.1f} "
          f"p95 {p95:.1f} p99 {p99:.1f} max {max(lat_ms, default=float('nan')):.1f} "
          f"mean {statistics.fmean(lat_ms) if lat_ms else float('nan'):.1f} "
          f"(minus the {args.model_ms:.0f} ms model: p50 overhead {p50 - args.model_ms:.1f} ms); late replies {len(late)}")
    print(f"model: {model_stats['chat_calls']} chat calls ({model_stats['chat_calls'] / max(1, replies):.2f} per reply), "
          f"max in flight {model_stats['max_in_flight']}, mean prompt {model_stats['prompt_chars_mean']:.0f} chars")
    print(f"bot memory: VmHWM {hwm_mib:.1f} MiB, VmRSS after start-up {idle.get('VmRSS', 0) / 1024:.1f} MiB, "
          f"at end {status.get('VmRSS', 0) / 1024:.1f} MiB (sampled max {max(rss_samples, default=0) / 1024:.1f}), "
          f"threads {status.get('Threads', 0)}; database {db_bytes / 2**20:.1f} MiB")
    span = t_end - t_load  # the load plus any wait for stragglers
    bot_load_cpu = cpu_total - cpu_bot0
    print(f"bot CPU: {cpu_total:.2f} s total, {cpu_startup:.2f} s start-up, {bot_load_cpu:.2f} s under load "
          f"= {bot_load_cpu / max(1, replies) * 1000:.2f} ms per reply "
          f"({cpu_loop / max(1, replies) * 1000:.2f} on the event loop's thread, the rest on SQLite's), "
          f"{bot_load_cpu / span * 100 if span else 0:.0f}% of one core; start-up to READY {startup_s:.2f} s")
    print(f"other processes under load: harness (fake Discord + users) {cpu_harness:.2f} s CPU "
          f"({cpu_harness / span * 100 if span else 0:.0f}% of one core), fake model {cpu_model:.2f} s "
          f"({cpu_model / span * 100 if span else 0:.0f}%)")
    print(f"machine during the load ({span:.1f} s): {busy / span * 100 if span else 0:.0f}% busy of {os.cpu_count()} CPUs "
          f"({busy / span / (os.cpu_count() or 1) * 100 if span else 0:.0f}% of capacity); processes outside this bench used "
          f"{max(0.0, foreign) / span * 100 if span else 0:.0f}% of a core"
          f"{'  <- other work competed for the CPUs: figures are pessimistic' if span and foreign / span > 0.1 else ''}")
    print(f"harness: event-loop lag p50 {pct(lag_ms, 50):.1f} ms p99 {pct(lag_ms, 99):.1f} ms max {max(lag_ms, default=0):.1f} ms; "
          f"fake Discord requests {len(fake.requests)}, bot messages {len(fake.sent_messages)}, "
          f"untagged {len(fake.untagged)}{' e.g. ' + repr(fake.untagged[0]) if fake.untagged else ''}"
          f"{'; FAKE ERRORS ' + repr(fake.errors[:3]) if fake.errors else ''}")
    clean = exit_code == 0 and "Traceback" not in log_text
    print(f"shutdown: SIGTERM -> exit code {exit_code} in {exit_s:.2f} s ({'clean' if clean else 'NOT clean'})")
    # discord.py's start-up notes about optional voice libraries are not findings
    interesting = [line for line in log_text.splitlines() if line.strip() and "voice will NOT be supported" not in line]
    if interesting:
        print(f"bot log ({len(interesting)} lines at WARNING+ besides voice-library notes), last ones:")
        for line in interesting[-8:]:
            print("  " + line[:300])
    budget = args.model_ms + 50
    print(f"goals: lost=0 {'met' if lost == 0 else 'MISSED'}; p50 <= {budget:.0f} ms {'met' if p50 <= budget else 'MISSED'} "
          f"({p50:.0f}); peak RSS <= 100 MiB {'met' if hwm_mib <= 100 else 'MISSED'} ({hwm_mib:.1f})")
    print(
        f"bot_load users={args.users} messages={total} replies={replies} lost={lost} "
        f"p50_reply_ms={p50:.0f} p95_reply_ms={p95:.0f} rss_mib={hwm_mib:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--messages", type=int, default=10, help="DMs per user")
    parser.add_argument("--model-ms", type=float, default=200.0, help="the fake model's time per call")
    parser.add_argument("--rate-limit", type=int, default=1000, help="RATE_LIMIT_PER_MINUTE for the bot")
    parser.add_argument("--max-llm", type=int, default=128, help="MAX_CONCURRENT_LLM_CALLS for the bot")
    parser.add_argument("--profile", metavar="FILE", help="run the bot under cProfile (main-thread CPU time), stats written to FILE at exit (slows it)")
    parser.add_argument("--bot-root", metavar="DIR", help="run the bot from another checkout (to measure a candidate fix)")
    parser.add_argument("--serve-model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_model:
        serve_model(args.model_ms)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
