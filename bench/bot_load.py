"""Load test: 100 users x 10 DMs through the fake Discord server, against the real bot process and a floor.

    python bench/bot_load.py                         # the issue's run: 100 users x 10 DMs, 200-ms model
    python bench/bot_load.py --users 20 --messages 3 # a quick run
    python bench/bot_load.py --floor-only            # the floor alone
    python bench/bot_load.py --stream                # replies streamed: the model writes each over 1 s
    python bench/bot_load.py --runs 5                # 5 pairs one after the other: the last line has their medians

Absolute times differ about 2x between machines, so the run measures its own floor first: a bare
discord.py bot under the same load, with the same fakes and the same process layout. Then the
real bot. The figure that travels between machines is ratio_p50 = mnemocord's p50 / the floor's.

Three processes per run, so the bot's memory and CPU are the bot's alone:

    this process   tests.fakediscord.FakeDiscord on 127.0.0.1 (REST + gateway) and the load
                   generator: every user writes a DM, waits for the bot's answer, then writes
                   the next one (a conversation); all users run at once.
    model          `bench/bot_load.py --serve-model`: tests.fakeopenai.FakeOpenAI answering every
                   chat completion after asyncio.sleep(MODEL_MS) with one send_message tool call
                   (4 in 5) or a plain reply (1 in 5) -- one model call per turn. The answer
                   quotes the message's tag (#u<user>m<n>), so each reply is matched to its
                   message. (In long conversations, --messages 100, the summarizer's calls
                   get a summary.) It has no /models route: the bot's start-up check gets a 404, which
                   it accepts.
    bot            the floor: `bench/bot_load.py --floor-bot`, a plain discord.Client with no
                   memory and no database (the same intents and client options as mnemocord's);
                   per DM it receives MESSAGE_CREATE, makes one chat completion over aiohttp
                   (a short system prompt, the user's message, mnemocord's tool schemas from
                   memory.tools.SCHEMAS), takes the text of the send_message call or the plain
                   content, and POSTs it as a reply -- nothing else.
                   mnemocord: `python -m bot.cli run` (the real entry point, what `mnemocord run`
                   runs), configured only through the environment (cwd is a temp dir, so no .env).

Each run gets fresh fakes; the two runs never overlap.

Reply latency = time from send_dm() returning (the MESSAGE_CREATE frame is written to the
bot's websocket) to the fake receiving the bot's POST /channels/{id}/messages: the fake is
subclassed to timestamp that POST with time.monotonic() (exact, no polling). A message is lost
if its reply has not arrived LOST_AFTER seconds after it was sent (the next message of that
user is then sent anyway; a late reply is still matched by its tag and counted). The first
message of every user is also reported apart: all users send it at once, to a bot (and a floor)
that has answered nobody yet, so the run's p95 is theirs; the later messages are the steady state.

Memory: VmHWM (peak RSS) of the bot process from /proc/<pid>/status at the end of the load,
plus VmRSS after start-up and at the end. CPU: utime+stime from /proc/<pid>/stat, and of the
event loop's thread (the one that serializes the work) from /proc/<pid>/task/<pid>/stat.
At the end the bot gets SIGTERM; its exit code and time to exit are reported.

The harness (fake Discord + 100 users) shares the machine's cores with the bot and the model;
its own event-loop lag is reported so a slow harness is not mistaken for a slow bot.

--stream: the fake model streams its answer (a longer one, so there is something to stream)
in chunks spread over MODEL_MS (default 1000 with --stream) when asked to stream, and answers
whole after MODEL_MS when not (the floor); mnemocord runs with STREAM_REPLIES on (off in the
plain run). A reply's latency is then the time until its first text shows in Discord (the POST
of the message that will hold it); `edits` counts the PATCHes of all replies, and
`max_edits_per_msg_per_s` is the fastest any one message was written (1 / the shortest gap
between its post and edits), which must stay at or below 1 / STREAM_EDIT_SECONDS.

Figures only, no asserts. The floor's lines start with "floor". The last line is:
    bot_load users=100 messages=1000 replies=<n> lost=<l> p50_reply_ms=<x> p95_reply_ms=<y> rss_mib=<r> floor_p50_reply_ms=<f> ratio_p50=<x/f>
with --stream, followed by ` edits=<e> max_edits_per_msg_per_s=<m>`; with --runs N (N > 1), by ` runs=<N>`:
each figure is then the median of the N pairs' (the ratio the median of their ratios), replies the
fewest, and RSS and max_edits_per_msg_per_s the highest of any run. This shared machine's speed moves
by the hour and from run to run, and the ratio with it: a median of pairs is the figure to compare.
With --floor-only:
    bot_load_floor users=100 messages=1000 replies=<n> lost=<l> p50_reply_ms=<f> p95_reply_ms=<y> rss_mib=<r>
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
from dataclasses import dataclass
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


# the floor's system prompt: a plain assistant's, as short as a bare bot would send
FLOOR_SYSTEM = "You are a helpful assistant talking with one person in Discord direct messages. Answer with send_message."


# ============================================================== the floor bot (child process)


def floor_bot() -> None:
    """A bare discord.py bot: one model call per DM, one reply; no memory, no database.

    Configured by the same environment as mnemocord (plus FLOOR_TOOLS, the tool schemas as
    JSON, so this process imports nothing of mnemocord and its memory figures stay bare)."""
    import aiohttp
    import discord
    import orjson
    import yarl

    discord.http.Route.BASE = os.environ["DISCORD_API_BASE"].rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(os.environ["DISCORD_GATEWAY_URL"])
    url = os.environ["LLM_BASE_URL"].rstrip("/") + "/chat/completions"
    model = os.environ["LLM_MODEL"]
    tools = json.loads(os.environ["FLOOR_TOOLS"])
    headers = {"Content-Type": "application/json"}

    class FloorBot(discord.Client):
        def __init__(self, session: aiohttp.ClientSession) -> None:
            intents = discord.Intents.none()
            intents.guilds = intents.guild_messages = intents.dm_messages = intents.message_content = True
            # mnemocord's client options, so both do the same Discord work per message
            super().__init__(
                intents=intents, allowed_mentions=discord.AllowedMentions.none(), guild_ready_timeout=0.5, max_messages=None
            )
            self.session = session

        async def on_message(self, message: discord.Message) -> None:
            if message.author.bot:  # its own replies come back as MESSAGE_CREATE too
                return
            body = {
                "model": model,
                "messages": [{"role": "system", "content": FLOOR_SYSTEM}, {"role": "user", "content": message.content}],
                "tools": tools,
            }
            async with self.session.post(url, data=orjson.dumps(body), headers=headers) as response:
                answer = orjson.loads(await response.read())["choices"][0]["message"]
            text = answer.get("content") or ""
            for call in answer.get("tool_calls") or []:
                if call["function"]["name"] == "send_message":
                    text = orjson.loads(call["function"]["arguments"])["message"]
            await message.channel.send(text, reference=message.to_reference(fail_if_not_exists=False))

    async def main() -> None:
        # aiohttp's default pool (100 connections) is also what mnemocord's httpx-over-aiohttp transport gets
        async with aiohttp.ClientSession() as session, FloorBot(session) as client:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(client.close()))
            await client.start(os.environ["DISCORD_TOKEN"])  # returns once closed

    asyncio.run(main())


# ============================================================== the fake model (child process)


# what the model adds to its answer with --stream: something to stream, about 300 characters
STREAMED_TAIL = " Here is a longer answer, written a few words at a time, as a model on a small box writes." * 3


def serve_model(model_ms: float, stream: bool = False) -> None:
    """Run FakeOpenAI until stdin closes; print its URL, answer "stats" lines with JSON."""
    from memory.context import SUMMARY_INSTRUCTIONS
    from tests.fakeopenai import Delay, FakeOpenAI, call, reply

    summarizer = SUMMARY_INSTRUCTIONS.partition("\n")[0]  # how its requests begin

    arrived: dict[str, float] = {}  # tag -> time.monotonic() of its first chat request (one clock for all processes)

    def answer(body: dict[str, Any]) -> Any:
        messages = body["messages"]
        if messages and str(messages[0].get("content", "")).startswith(summarizer):
            # a long conversation (--messages 100) fills the window: the summarizer gets a summary, not a reply
            return Delay(model_ms / 1000, reply("The user and the assistant exchanged greetings and tagged messages."))
        # the newest message with a tag: a memory-pressure event may come after it
        users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
        tags = next((found for text in reversed(users) if (found := TAG.findall(text))), [])
        tag = tags[-1] if tags else "?"
        arrived.setdefault(tag, time.monotonic())
        text = f"ack #{tag}: noted, thanks." + (STREAMED_TAIL if stream else "")
        plain = tag != "?" and int(tag.split("m")[1]) % 5 == 4
        answer = reply(text) if plain else call("send_message", {"message": text})
        # a streamed answer takes MODEL_MS spread over its chunks (fake.stream_seconds), a whole one all at once
        return answer if body.get("stream") else Delay(model_ms / 1000, answer)

    async def main() -> None:
        fake = await FakeOpenAI(usage=True).start()
        fake.default = answer
        fake.stream_seconds = model_ms / 1000
        print("URL", fake.url, flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            if line.strip() == "stats":
                chats = fake.chat_requests
                stats = {
                    "chat_calls": len(chats),
                    "requests": len(fake.requests),
                    "max_in_flight": fake.max_in_flight,
                    "prompt_chars_mean": statistics.fmean(len(json.dumps(b["messages"])) for b in chats) if chats else 0,
                    "arrived": arrived,
                }
                print(json.dumps(stats), flush=True)
        await fake.stop()

    asyncio.run(main())


class ModelProcess:
    async def start(self, model_ms: float, stream: bool = False) -> str:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-model",
            "--model-ms",
            str(model_ms),
            *(["--stream"] if stream else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
            # the stats line holds every message's arrival time: past 64 KiB (asyncio's default) from ~2,000 messages
            limit=64 << 20,
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
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# ============================================================== the fake Discord, timestamping replies


def make_fake_discord(ending: str) -> Any:
    """`ending`: how a complete reply ends (with --stream one is complete after its last edit)."""
    from tests.fakediscord import FakeDiscord

    class TimedFakeDiscord(FakeDiscord):
        """Stamps every bot message with time.monotonic() when its POST reaches the fake."""

        def __init__(self) -> None:
            super().__init__()
            self.complete: dict[str, asyncio.Future[None]] = {}  # tag -> set when its reply holds the whole text
            self.reply_at: dict[str, float] = {}  # tag -> first reply's arrival
            self.waiters: dict[str, asyncio.Future[float]] = {}
            self.untagged: list[str] = []  # bot messages without a tag: apologies, warnings
            self.posted_at: dict[str, float] = {}  # message id -> its POST's arrival

        def _create_bot_message(self, channel: Any, body: Any, files: Any, **kwargs: Any) -> Any:
            record = super()._create_bot_message(channel, body, files, **kwargs)
            at = time.monotonic()
            self.posted_at[record["id"]] = at
            tags = TAG.findall(record.get("content") or "")
            if not tags:
                self.untagged.append((record.get("content") or "")[:120])
            for tag in tags:
                self.reply_at.setdefault(tag, at)
                waiter = self.waiters.get(tag)
                if waiter is not None and not waiter.done():
                    waiter.set_result(at)
            self._completes(record)
            return record

        def _edit_message(self, message: Any, body: Any, files: Any, *, kind: str) -> None:
            super()._edit_message(message, body, files, kind=kind)
            self._completes(message)

        def _completes(self, message: Any) -> None:
            content = (message.get("content") or "").rstrip()
            if content.endswith(ending):
                for tag in TAG.findall(content):
                    if not self.completion(tag).done():
                        self.completion(tag).set_result(None)

        def completion(self, tag: str) -> asyncio.Future[None]:
            return self.complete.setdefault(tag, asyncio.get_running_loop().create_future())

        def edit_figures(self) -> tuple[int, float]:
            """(PATCHes of bot messages, the fastest any one message was written: 1 / its shortest gap)."""
            edits, fastest = 0, 0.0
            for m in self.sent_messages:
                times = [self.posted_at.get(m["id"], 0.0), *(e["at"] for e in m["edits"])]
                edits += len(m["edits"])
                gaps = [b - a for a, b in zip(times, times[1:])]
                if gaps:
                    fastest = max(fastest, 1 / max(min(gaps), 1e-6))
            return edits, fastest

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
        except TimeoutError:
            pass


class NotReady(Exception):
    """The bot under test never reached READY; str() holds its exit code and output."""


@dataclass
class Run:
    """One bot's figures under the load."""

    name: str
    sent: int
    replies: int
    lat_ms: list[float]
    first_ms: list[float]  # of each user's first message: all users write it at once, to a bot that is cold
    later_ms: list[float]  # of the others
    before_model_ms: list[float]  # from a message to its chat request reaching the model (one monotonic clock)
    after_model_ms: list[float]  # from the model's answer (request + MODEL_MS) to the reply reaching the fake
    late: int
    wall: float  # the load
    span: float  # the load plus any wait for stragglers
    startup_s: float
    idle: dict[str, int]  # /proc status after start-up
    status: dict[str, int]  # ... and at the end of the load
    rss_samples: list[int]
    cpu_startup: float
    cpu_total: float
    cpu_load: float
    cpu_loop: float
    cpu_harness: float
    cpu_model: float
    busy: float  # the machine's CPU seconds during the load
    foreign: float  # ... of processes outside this bench
    lag_ms: list[float]
    model_stats: dict[str, Any]
    fake_requests: int
    fake_messages: int
    untagged: list[str]
    fake_errors: list[Any]
    db_bytes: int | None  # None: the bot has no database
    edits: int  # PATCHes of bot messages (replies shown while written)
    max_edit_rate: float  # the fastest any one message was written, per second
    exit_code: int | None
    exit_s: float
    log_text: str

    @property
    def p50(self) -> float:
        return pct(self.lat_ms, 50)

    @property
    def p95(self) -> float:
        return pct(self.lat_ms, 95)

    @property
    def hwm_mib(self) -> float:
        return self.status.get("VmHWM", 0) / 1024

    @property
    def cpu_ms_per_reply(self) -> float:
        return self.cpu_load / max(1, self.replies) * 1000

    @property
    def loop_ms_per_reply(self) -> float:
        return self.cpu_loop / max(1, self.replies) * 1000


async def measure(args: argparse.Namespace, *, floor: bool) -> Run:
    """Start fresh fakes and one bot (the floor or mnemocord), run the load, stop them all."""
    fake = make_fake_discord(STREAMED_TAIL.strip() if args.stream else "noted, thanks.")
    await fake.start()
    model = ModelProcess()
    model_url = await model.start(args.model_ms, args.stream)
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
        "STREAM_REPLIES": "true" if args.stream else "false",
        "PYTHONPATH": str(Path(args.bot_root).resolve() if args.bot_root else ROOT),
    }
    if floor:
        from memory.tools import SCHEMAS

        env["FLOOR_TOOLS"] = json.dumps(SCHEMAS)
        command = [str(Path(__file__).resolve()), "--floor-bot"]
    elif args.profile:
        command = ["-c", PROFILE_WRAPPER, str(Path(args.profile).resolve())]
    else:
        command = ["-m", "bot.cli", "run"]
    stderr_path = Path(tmp.name) / "bot.stderr"
    stderr_file = open(stderr_path, "wb")
    t_spawn = time.monotonic()
    bot = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        cwd=tmp.name,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stderr_file,
        stderr=stderr_file,
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
            raise NotReady(f"exit code {bot.returncode}; its output:\n{stderr_path.read_text(errors='replace')[-3000:]}")
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
                    # a person reads the reply to its end before writing again (streamed: its last edit)
                    await asyncio.wait_for(asyncio.shield(fake.completion(tag)), LOST_AFTER)
                except TimeoutError:
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
        arrived: dict[str, float] = model_stats.pop("arrived")
        db_bytes = None if floor else sum(p.stat().st_size for p in Path(tmp.name).glob("bot.db*"))
        edits, max_edit_rate = fake.edit_figures()

        # shutdown: SIGTERM, then time to exit
        t_term = time.monotonic()
        exit_code: int | None = bot.returncode
        if exit_code is None:
            bot.send_signal(signal.SIGTERM)
            try:
                exit_code = await asyncio.wait_for(asyncio.shield(exited), 30)
            except TimeoutError:
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

    return Run(
        name="floor" if floor else "mnemocord",
        sent=len(sent_at),
        replies=sum(1 for t in sent_at if t in fake.reply_at),
        lat_ms=[x * 1000 for x in latencies],
        first_ms=[(fake.reply_at[t] - sent_at[t]) * 1000 for t in sent_at if t.endswith("m0") and t in fake.reply_at],
        later_ms=[(fake.reply_at[t] - sent_at[t]) * 1000 for t in sent_at if not t.endswith("m0") and t in fake.reply_at],
        before_model_ms=[(arrived[t] - sent_at[t]) * 1000 for t in sent_at if t in arrived and t in fake.reply_at],
        after_model_ms=[
            (fake.reply_at[t] - arrived[t]) * 1000 - args.model_ms for t in sent_at if t in arrived and t in fake.reply_at
        ],
        late=len(late),
        wall=t_done - t_load,
        span=t_end - t_load,
        startup_s=startup_s,
        idle=idle,
        status=status,
        rss_samples=rss_samples,
        cpu_startup=cpu_startup,
        cpu_total=cpu_total,
        cpu_load=cpu_total - cpu_bot0,
        cpu_loop=cpu_loop,
        cpu_harness=cpu_harness,
        cpu_model=cpu_model,
        busy=busy,
        foreign=foreign,
        lag_ms=[x * 1000 for x in lags],
        model_stats=model_stats,
        fake_requests=len(fake.requests),
        fake_messages=len(fake.sent_messages),
        untagged=fake.untagged,
        fake_errors=fake.errors,
        db_bytes=db_bytes,
        edits=edits,
        max_edit_rate=max_edit_rate,
        exit_code=exit_code,
        exit_s=exit_s,
        log_text=log_text,
    )


def report(args: argparse.Namespace, r: Run) -> None:
    """mnemocord's lines as they always were; the floor's the same, prefixed with "floor"."""
    prefix = "floor " if r.name == "floor" else ""
    lat_ms, p50, span, replies = r.lat_ms, r.p50, r.span, r.replies

    def out(line: str) -> None:
        print(prefix + line)

    out(
        f"load: {args.users} users x {args.messages} DMs, sequential per user, users concurrent; "
        f"sent {r.sent}, wall {r.wall:.2f} s, throughput {replies / r.wall if r.wall else 0:.1f} replies/s"
    )
    out(
        f"reply latency ms: min {min(lat_ms, default=float('nan')):.1f} p50 {p50:.1f} p90 {pct(lat_ms, 90):.1f} "
        f"p95 {r.p95:.1f} p99 {pct(lat_ms, 99):.1f} max {max(lat_ms, default=float('nan')):.1f} "
        f"mean {statistics.fmean(lat_ms) if lat_ms else float('nan'):.1f} "
        f"(minus the {args.model_ms:.0f} ms model: p50 overhead {p50 - args.model_ms:.1f} ms); late replies {r.late}"
    )
    out(
        f"first message of each user (all at once, to a cold bot): p50 {pct(r.first_ms, 50):.1f} p95 {pct(r.first_ms, 95):.1f}; "
        f"later messages: p50 {pct(r.later_ms, 50):.1f} p95 {pct(r.later_ms, 95):.1f}"
    )
    model_stats = r.model_stats
    out(
        f"model: {model_stats['chat_calls']} chat calls ({model_stats['chat_calls'] / max(1, replies):.2f} per reply), "
        f"max in flight {model_stats['max_in_flight']}, mean prompt {model_stats['prompt_chars_mean']:.0f} chars"
    )
    if r.before_model_ms:
        out(
            f"where a reply's time goes, p50: {pct(r.before_model_ms, 50):.1f} ms from the message to the model's request, "
            f"{args.model_ms:.0f} ms of model, {pct(r.after_model_ms, 50):.1f} ms from its answer to the reply "
            f"(p95 {pct(r.before_model_ms, 95):.1f} and {pct(r.after_model_ms, 95):.1f})"
        )
    out(
        f"bot memory: VmHWM {r.hwm_mib:.1f} MiB, VmRSS after start-up {r.idle.get('VmRSS', 0) / 1024:.1f} MiB, "
        f"at end {r.status.get('VmRSS', 0) / 1024:.1f} MiB (sampled max {max(r.rss_samples, default=0) / 1024:.1f}), "
        f"threads {r.status.get('Threads', 0)}" + ("" if r.db_bytes is None else f"; database {r.db_bytes / 2**20:.1f} MiB")
    )
    threads = "the rest on SQLite's" if r.db_bytes is not None else "the rest on discord.py's heartbeat thread"
    out(
        f"bot CPU: {r.cpu_total:.2f} s total, {r.cpu_startup:.2f} s start-up, {r.cpu_load:.2f} s under load "
        f"= {r.cpu_ms_per_reply:.2f} ms per reply ({r.loop_ms_per_reply:.2f} on the event loop's thread, {threads}), "
        f"{r.cpu_load / span * 100 if span else 0:.0f}% of one core; start-up to READY {r.startup_s:.2f} s"
    )
    # every user waits for their answer, so the users' messages come in rounds; the loop keeps up with
    # a round only while its work on all of them fits in one model call
    loop_ms = r.loop_ms_per_reply
    round_ms = args.users * loop_ms
    out(
        f"event loop per round of messages: {args.users} users x {loop_ms:.2f} ms = "
        f"{round_ms:.0f} ms of work against {args.model_ms:.0f} ms of model ({round_ms / args.model_ms:.2f}); "
        f"near 1 and above, replies queue behind each other's work and p50 follows the CPU per reply"
    )
    out(
        f"other processes under load: harness (fake Discord + users) {r.cpu_harness:.2f} s CPU "
        f"({r.cpu_harness / span * 100 if span else 0:.0f}% of one core), fake model {r.cpu_model:.2f} s "
        f"({r.cpu_model / span * 100 if span else 0:.0f}%)"
    )
    out(
        f"machine during the load ({span:.1f} s): {r.busy / span * 100 if span else 0:.0f}% busy of {os.cpu_count()} CPUs "
        f"({r.busy / span / (os.cpu_count() or 1) * 100 if span else 0:.0f}% of capacity); processes outside this bench used "
        f"{max(0.0, r.foreign) / span * 100 if span else 0:.0f}% of a core"
        f"{'  <- other work competed for the CPUs: figures are pessimistic' if span and r.foreign / span > 0.1 else ''}"
    )
    out(
        f"harness: event-loop lag p50 {pct(r.lag_ms, 50):.1f} ms p99 {pct(r.lag_ms, 99):.1f} ms max {max(r.lag_ms, default=0):.1f} ms; "
        f"fake Discord requests {r.fake_requests}, bot messages {r.fake_messages}, "
        f"untagged {len(r.untagged)}{' e.g. ' + repr(r.untagged[0]) if r.untagged else ''}"
        f"{'; FAKE ERRORS ' + repr(r.fake_errors[:3]) if r.fake_errors else ''}"
    )
    clean = r.exit_code == 0 and "Traceback" not in r.log_text
    out(f"shutdown: SIGTERM -> exit code {r.exit_code} in {r.exit_s:.2f} s ({'clean' if clean else 'NOT clean'})")
    # discord.py's start-up notes about optional voice libraries are not findings
    interesting = [line for line in r.log_text.splitlines() if line.strip() and "voice will NOT be supported" not in line]
    if interesting:
        out(f"bot log ({len(interesting)} lines at WARNING+ besides voice-library notes), last ones:")
        for line in interesting[-8:]:
            out("  " + line[:300])


async def run(args: argparse.Namespace) -> None:
    total = args.users * args.messages
    print(
        f"settings: RATE_LIMIT_PER_MINUTE={args.rate_limit} (high enough that the limiter never refuses), "
        f"MAX_CONCURRENT_LLM_CALLS={args.max_llm}, EMBEDDING_MODEL unset, LOG_LEVEL=WARNING, "
        f"model {args.model_ms:.0f} ms per call, {os.cpu_count()} CPUs shared by bot, model and harness; "
        f"the floor (a bare discord.py bot, one model call per DM) runs first, then mnemocord"
        + (f"; {args.runs} such pairs, one after the other" if args.runs > 1 else "")
    )
    pairs: list[tuple[Run, Run]] = []
    for n in range(1, args.runs + 1):
        if args.runs > 1:
            print(f"--- pair {n} of {args.runs}")
        try:
            floor = await measure(args, floor=True)
        except NotReady as exc:
            print(f"the floor bot did not become ready: {exc}")
            print(
                f"bot_load_floor users={args.users} messages={total} replies=0 lost={total} p50_reply_ms=nan p95_reply_ms=nan rss_mib=nan"
            )
            raise SystemExit(1) from None
        report(args, floor)
        if args.floor_only:
            print(
                f"bot_load_floor users={args.users} messages={total} replies={floor.replies} lost={total - floor.replies} "
                f"p50_reply_ms={floor.p50:.0f} p95_reply_ms={floor.p95:.0f} rss_mib={floor.hwm_mib:.0f}"
            )
            return
        try:
            bot = await measure(args, floor=False)
        except NotReady as exc:
            print(f"the bot did not become ready: {exc}")
            print(
                f"bot_load users={args.users} messages={total} replies=0 lost={total} p50_reply_ms=nan p95_reply_ms=nan rss_mib=nan "
                f"floor_p50_reply_ms={floor.p50:.0f} ratio_p50=nan"
            )
            raise SystemExit(1) from None
        report(args, bot)
        pairs.append((floor, bot))
        if args.runs > 1:
            print(
                f"pair {n}: ratio_p50={bot.p50 / floor.p50:.2f} (p50 {bot.p50:.0f} against {floor.p50:.0f} ms; the event loop's "
                f"CPU per reply {bot.loop_ms_per_reply:.2f} against {floor.loop_ms_per_reply:.2f} ms)"
            )
    summarize(args, pairs)


def summarize(args: argparse.Namespace, pairs: list[tuple[Run, Run]]) -> None:
    """The goals and the last line; over several pairs, their medians (this machine's speed moves between runs)."""
    total = args.users * args.messages
    ratios = sorted(bot.p50 / floor.p50 for floor, bot in pairs)
    ratio = statistics.median(ratios)
    p50 = statistics.median(bot.p50 for _, bot in pairs)
    p95 = statistics.median(bot.p95 for _, bot in pairs)
    floor_p50 = statistics.median(floor.p50 for floor, _ in pairs)
    floor_p95 = statistics.median(floor.p95 for floor, _ in pairs)
    lost = total - min(bot.replies for _, bot in pairs)
    hwm = max(bot.hwm_mib for _, bot in pairs)
    cpu = statistics.median(bot.cpu_ms_per_reply for _, bot in pairs)
    floor_cpu = statistics.median(floor.cpu_ms_per_reply for floor, _ in pairs)
    budget = args.model_ms + 50
    if len(pairs) > 1:
        print(f"over {len(pairs)} pairs: ratio_p50 median {ratio:.2f} ({', '.join(f'{r:.2f}' for r in ratios)}); the medians:")
    print(
        f"floor: p50 {floor_p50:.1f} ms, p95 {floor_p95:.1f} ms, lost {total - min(floor.replies for floor, _ in pairs)}; "
        f"mnemocord over the floor: p50 {ratio:.2f}x (+{p50 - floor_p50:.1f} ms), p95 {p95 / floor_p95:.2f}x, "
        f"CPU per reply {cpu:.2f} vs {floor_cpu:.2f} ms"
    )
    print(
        f"goals: lost=0 {'met' if lost == 0 else 'MISSED'}; ratio_p50 <= 1.15 {'met' if ratio <= 1.15 else 'MISSED'} ({ratio:.2f}); "
        f"p50 <= {budget:.0f} ms {'met' if p50 <= budget else 'MISSED'} ({p50:.0f}); "
        f"peak RSS <= 100 MiB {'met' if hwm <= 100 else 'MISSED'} ({hwm:.1f})"
    )
    edits = statistics.median(bot.edits for _, bot in pairs)
    fastest = max(bot.max_edit_rate for _, bot in pairs)
    print(
        f"bot_load users={args.users} messages={total} replies={total - lost} lost={lost} "
        f"p50_reply_ms={p50:.0f} p95_reply_ms={p95:.0f} rss_mib={hwm:.0f} "
        f"floor_p50_reply_ms={floor_p50:.0f} ratio_p50={ratio:.2f}"
        + (f" edits={edits:.0f} max_edits_per_msg_per_s={fastest:.2f}" if args.stream else "")
        + (f" runs={len(pairs)}" if len(pairs) > 1 else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--messages", type=int, default=10, help="DMs per user")
    parser.add_argument("--model-ms", type=float, help="the fake model's time per call (default 200, 1000 with --stream)")
    parser.add_argument("--stream", action="store_true", help="the model streams its answers and the bot its replies")
    parser.add_argument("--rate-limit", type=int, default=1000, help="RATE_LIMIT_PER_MINUTE for the bot")
    parser.add_argument("--max-llm", type=int, default=128, help="MAX_CONCURRENT_LLM_CALLS for the bot")
    parser.add_argument(
        "--floor-only", action="store_true", help="measure only the floor (a bare discord.py bot): a quick check of the harness"
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run the bot under cProfile (main-thread CPU time), stats written to FILE at exit (slows it)",
    )
    parser.add_argument("--bot-root", metavar="DIR", help="run the bot from another checkout (to measure a candidate fix)")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        metavar="N",
        help="measure N pairs (floor, then mnemocord) one after the other; the last line has their medians",
    )
    parser.add_argument("--serve-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor-bot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or (args.runs > 1 and args.floor_only):
        parser.error("--runs takes a number from 1 up, and only without --floor-only")
    if args.model_ms is None:
        args.model_ms = 1000.0 if args.stream else 200.0
    if args.serve_model:
        serve_model(args.model_ms, args.stream)
    elif args.floor_bot:
        floor_bot()
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
