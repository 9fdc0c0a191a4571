"""`mnemocord run` as a real process: how it starts, how it refuses to start, how it stops."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from memory.db import Database
from tests.fakediscord import FakeDiscord
from tests.fakeopenai import Drip, Error, FakeOpenAI, reply

ROOT = Path(__file__).parent.parent
SECRET_KEY = "sk-live-0123456789abcdef"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) ([\w.]+): .*")


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(tmp_path: Path, fake: FakeOpenAI, fake_discord: FakeDiscord | None = None, **over: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DISCORD_TOKEN": "secret-token-value",
        "LLM_BASE_URL": fake.url,
        "LLM_MODEL": "m",
        "DATABASE_PATH": str(tmp_path / "run.db"),
        "PYTHONPATH": str(ROOT),
    }
    if fake_discord:
        env |= {"DISCORD_API_BASE": fake_discord.rest_base, "DISCORD_GATEWAY_URL": fake_discord.gateway_url}
    return env | over


async def start(tmp_path: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "run",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def refused_start(tmp_path: Path, env: dict[str, str]) -> str:
    """Run a start that must fail with one line besides the log; that line."""
    proc = await start(tmp_path, env)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    text = err.decode()
    assert proc.returncode == 1 and "Traceback" not in text, text
    assert SECRET_KEY not in text and "pa55-w0rd" not in text, text
    (line,) = [line for line in text.splitlines() if not LOG_LINE.match(line)]
    return line


async def test_sigterm_ends_run_in_bounded_time_while_the_model_drips(
    fake_discord: FakeDiscord, fake: FakeOpenAI, tmp_path: Path
) -> None:
    alice = fake_discord.add_user("alice")
    # a byte a second: LLM_TIMEOUT (120 s by default) bounds the call, shutdown must not wait for it
    fake.default = lambda body: Drip(1.0)
    proc = await start(tmp_path, run_env(tmp_path, fake, fake_discord))
    try:
        await fake_discord.wait_ready(timeout=20)
        await fake_discord.send_dm(alice["id"], "a message worth keeping")
        await fake_discord.wait_for(lambda f: fake.dripping, timeout=10)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    log = err.decode()
    assert proc.returncode == 0, log
    assert "ending their model calls" in log and "stopped" in log and "Traceback" not in log
    db = await Database.open(tmp_path / "run.db")
    try:
        stored = await db.fetchall("SELECT content FROM messages WHERE role = 'user'")
    finally:
        await db.close()
    assert [r[0] for r in stored] == ["a message worth keeping"]


async def test_unreachable_discord_stops_the_start_with_one_line(fake: FakeOpenAI, tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{closed_port()}/api/v10"
    err = await refused_start(
        tmp_path, run_env(tmp_path, fake, DISCORD_API_BASE=api, DISCORD_GATEWAY_URL=f"ws://127.0.0.1:{closed_port()}/")
    )
    assert err.startswith(f"mnemocord: DISCORD_API_BASE: cannot reach Discord at {api} ("), err


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_key_stops_the_start_with_one_line_without_secrets(fake: FakeOpenAI, tmp_path: Path, status: int) -> None:
    fake.fail_models = Error(status, {"error": {"message": f"bad credentials alice:pa55-w0rd / {SECRET_KEY}"}})
    url = fake.url.replace("http://", "http://alice:pa55-w0rd@")
    err = await refused_start(tmp_path, run_env(tmp_path, fake, LLM_BASE_URL=url, LLM_API_KEY=SECRET_KEY))
    assert err == f"mnemocord: LLM_API_KEY: {fake.url} refused the key (HTTP {status})"
    assert fake.request_headers[-1]["Authorization"] == "Basic " + base64.b64encode(b"alice:pa55-w0rd").decode()
    fake.fail_models = Error(status, {"error": {"message": f"Incorrect API key provided: {SECRET_KEY}"}})
    err = await refused_start(tmp_path, run_env(tmp_path, fake, LLM_API_KEY=SECRET_KEY))
    assert err == f"mnemocord: LLM_API_KEY: {fake.url} refused the key (HTTP {status})"
    assert fake.request_headers[-1]["Authorization"] == f"Bearer {SECRET_KEY}"


async def test_unreachable_endpoint_start_error_hides_url_credentials(fake: FakeOpenAI, tmp_path: Path) -> None:
    port = closed_port()
    err = await refused_start(tmp_path, run_env(tmp_path, fake, LLM_BASE_URL=f"http://alice:pa55-w0rd@127.0.0.1:{port}/v1"))
    assert err.startswith(f"mnemocord: LLM_BASE_URL: cannot reach http://127.0.0.1:{port}/v1 ("), err
    assert "pa55-w0rd" not in err and "alice" not in err


def test_a_start_does_not_build_the_full_text_word_pattern() -> None:
    # scanning the Unicode tables for it took ~40 ms of every start before the bot connected
    probe = "import bot.main, memory.fulltext as f; print(f._words.cache_info().currsize)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"


async def test_url_credentials_are_not_echoed_by_a_config_error_or_the_chat_banner(fake: FakeOpenAI, tmp_path: Path) -> None:
    base = {**os.environ, "DATABASE_PATH": str(tmp_path / "c.db"), "LLM_MODEL": "m", "PYTHONPATH": str(ROOT)}
    for url in ("ftp://ann:hunter2secret@example.invalid/v1", " http://ann:hunter2secret@example.invalid/v1"):
        done = subprocess.run(
            [sys.executable, "-m", "bot.cli", "chat"],
            cwd=tmp_path,
            env={**base, "LLM_BASE_URL": url},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1 and "LLM_BASE_URL" in done.stderr and "hunter2secret" not in done.stderr
    url = fake.url.replace("http://", "http://ann:hunter2secret@")
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "chat"],
        cwd=tmp_path,
        env={**base, "LLM_BASE_URL": url},
        input="",
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "Chatting with agent" in done.stdout and "hunter2secret" not in done.stdout + done.stderr


async def test_a_dripping_endpoint_fails_the_start_check_within_its_limit(
    fake: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot import main
    from bot.config import BotSettings
    from memory.config import ConfigError

    monkeypatch.setattr(main, "ENDPOINT_CHECK_SECONDS", 0.5)
    fake.fail_models = Drip(0.2)  # a byte every 0.2 s: httpx's per-read timeout never trips
    settings = BotSettings(_env_file=None, database_path=tmp_path / "d.db", llm_base_url=fake.url, llm_model="m")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="did not answer within 0.5 s"):
        await asyncio.wait_for(main.check_endpoint(settings), 5)


async def test_the_log_of_a_start_and_a_turn_holds_one_start_line_and_one_turn_line(
    fake_discord: FakeDiscord, fake: FakeOpenAI, tmp_path: Path
) -> None:
    # what `journalctl -u mnemocord` shows: no voice-support warnings, no line per HTTP request or
    # gateway session, nothing from the libraries at all in a normal run
    alice = fake_discord.add_user("alice")
    dm = fake_discord.dm_channel(alice["id"])
    fake.default = lambda body: reply("hello there")
    # a small window: the third turn moves messages out of the context (and consolidates them)
    proc = await start(tmp_path, run_env(tmp_path, fake, fake_discord, CONTEXT_WINDOW="1024", KEEP_LAST_MESSAGES="2"))
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        while not lines or ": connected as " not in lines[-1]:  # the start is over
            lines.append((await asyncio.wait_for(proc.stderr.readline(), 20)).decode().rstrip("\n"))
            assert lines[-1], lines  # the process ended
        started = lines[-1]
        for n in range(1, 5):
            await fake_discord.send_dm(alice["id"], f"message {n}: " + "words to remember " * 25)
            await fake_discord.wait_for(lambda f, n=n: len(f.bot_messages(dm["id"])) == n, timeout=20)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    lines += err.decode().splitlines()
    assert proc.returncode == 0, lines
    records = [LOG_RECORD.fullmatch(line) for line in lines]
    assert all(records), lines  # every line is one log record: no bare warnings, no tracebacks
    levels_and_names = [(r[1], r[2]) for r in records if r]
    assert all(level == "INFO" for level, _ in levels_and_names), lines
    assert all(name.split(".")[0] in ("bot", "memory", "mnemocord") for _, name in levels_and_names), lines
    assert not [line for line in lines if "voice" in line.lower() or "HTTP Request" in line], lines
    assert len([line for line in lines if ": connected as " in line]) == 1, lines
    # between the start and the stop: a line per turn, nothing else (not even for moving messages out)
    turns = lines[lines.index(started) + 1 : next(i for i, line in enumerate(lines) if ": shutting down" in line)]
    assert len(turns) == 4 and all(": turn agent=dm:" in line for line in turns), lines
    assert "evicted=0 " in turns[0] and "evicted=0 " not in turns[-1], lines
