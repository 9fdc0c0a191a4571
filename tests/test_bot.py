"""The real discord.py bot against a fake Discord server and a scripted model, both on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.client import MnemoBot
from bot.config import BotSettings
from bot.main import open_engine, point_discord_at
from memory import recall
from memory.engine import Engine
from tests.fakediscord import EPHEMERAL, FakeDiscord
from tests.fakeopenai import FakeOpenAI, call, reply

MANAGE_CHANNELS = 1 << 4


@pytest.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        # recorded so monkeypatch restores them after point_discord_at() changes them
        monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        yield server


def bot_settings(tmp_path: Path, fake_discord: FakeDiscord, fake: FakeOpenAI, **over: Any) -> BotSettings:
    values: dict[str, Any] = dict(
        database_path=tmp_path / "bot.db",
        llm_base_url=fake.url,
        llm_model="fake-model",
        llm_max_retries=1,
        llm_retry_budget=3,
        llm_timeout=5,
        discord_token="fake-token",
        discord_api_base=fake_discord.rest_base,
        discord_gateway_url=fake_discord.gateway_url,
    )
    values.update(over)
    return BotSettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(tmp_path: Path, fake_discord: FakeDiscord, fake: FakeOpenAI) -> BotSettings:
    return bot_settings(tmp_path, fake_discord, fake)


@contextlib.asynccontextmanager
async def running(settings: BotSettings, fake_discord: FakeDiscord) -> AsyncIterator[MnemoBot]:
    point_discord_at(settings)
    engine = await open_engine(settings)
    bot = MnemoBot(settings, engine)
    ready_before = fake_discord.ready_count
    task = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
    try:
        await fake_discord.wait_ready(count=ready_before + 1)
        await asyncio.wait_for(bot.wait_until_ready(), 5)
        yield bot
    finally:
        await bot.drain()
        await engine.close()
        await bot.close()
        await asyncio.wait_for(task, 5)


async def eventually(check: Any, timeout: float = 5.0) -> Any:
    """Poll an async check until it returns something truthy (bot-side state has no event)."""
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.02)
    return result


def last_user_text(body: dict[str, Any]) -> str:
    users = [m["content"] for m in body["messages"] if m["role"] == "user"]
    return users[-1] if users else ""


def chat_requests(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [r for r in fake.chat_requests if r["messages"][0]["content"].startswith("You are a companion")]


@pytest.fixture
def world(fake_discord: FakeDiscord) -> dict[str, Any]:
    f = fake_discord
    alice, bob, admin = f.add_user("alice"), f.add_user("bob"), f.add_user("admin")
    guild = f.add_guild("Guild", owner_id=admin["id"])
    general = f.add_text_channel(guild["id"], "general")
    f.add_member(guild["id"], alice["id"])
    f.add_member(guild["id"], bob["id"])
    return {"alice": alice, "bob": bob, "admin": admin, "guild": guild, "general": general}


async def test_dm_remembered_across_restart(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.push(
        call("core_memory_append", {"label": "human", "content": "Name: Zed. Loves sailing."}),
        call("send_message", {"message": "Nice to meet you, Zed!"}),
    )
    async with running(settings, fake_discord):
        await fake_discord.send_dm(alice["id"], "hi, I'm Zed and I love sailing")
        (answer,) = await fake_discord.wait_for(lambda f: f.bot_messages(dm["id"]))
        assert answer["content"] == "Nice to meet you, Zed!"
        assert answer["allowed_mentions"] == {"parse": []}
        assert fake_discord.typing == []  # a quick turn shows no typing indicator
    synced = len([r for r in fake_discord.requests if r[0] == "PUT" and "commands" in r[1]])
    fake.push(reply("You're Zed, the sailor."))
    async with running(settings, fake_discord):  # a new process: same database, new client
        await fake_discord.send_dm(alice["id"], "who am I?")
        await fake_discord.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 2)
    body = chat_requests(fake)[-1]
    assert "Name: Zed. Loves sailing." in body["messages"][0]["content"]
    assert any("I'm Zed" in (m.get("content") or "") for m in body["messages"][1:])
    # the commands did not change: no second sync
    assert len([r for r in fake_discord.requests if r[0] == "PUT" and "commands" in r[1]]) == synced == 1


async def test_typing_shows_for_slow_turns(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("bot.client.TYPING_AFTER", 0.05)
    dm = fake_discord.dm_channel(world["alice"]["id"])

    async def until_typing(body: dict[str, Any]) -> dict[str, Any]:
        await fake_discord.wait_for(lambda f: f.typing)  # a turn that outlasts TYPING_AFTER
        return reply("Thought about it.")

    fake.default = until_typing
    async with running(settings, fake_discord):
        await fake_discord.send_dm(world["alice"]["id"], "a hard question")
        await fake_discord.wait_for(lambda f: f.bot_messages(dm["id"]))
    assert [t["channel_id"] for t in fake_discord.typing] == [dm["id"]]


async def test_mention_answered_unaddressed_stored_and_found(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, bob = world["general"], world["alice"], world["bob"]

    def model(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] == "tool":
            return call("send_message", {"message": "Found it: " + body["messages"][-1]["content"]})
        return call("conversation_search", {"query": "deploy password"})

    fake.default = model
    async with running(settings, fake_discord) as bot:
        kept = bot.wait_for("message_handled", check=lambda m, _: m.content == "lunch anyone?", timeout=5)
        await fake_discord.send_message(general["id"], bob["id"], "fyi the deploy password is octopus-42")
        await fake_discord.send_message(general["id"], alice["id"], "lunch anyone?")
        assert (await kept)[1] == "recorded"  # handed over after bob's, in arrival order
        assert fake.chat_requests == [] and fake_discord.bot_messages(general["id"]) == []
        question = await fake_discord.send_message(
            general["id"], alice["id"], f"<@{fake_discord.bot_user_id}> what was the deploy password?"
        )
        (answer,) = await fake_discord.wait_for(lambda f: f.bot_messages(general["id"]))
        assert "octopus-42" in answer["content"] and "bob" in answer["content"]
        assert answer["message_reference"]["message_id"] == question["id"]
    first = chat_requests(fake)[0]
    texts = [m.get("content") or "" for m in first["messages"]]
    # the unaddressed messages reached the context too, named by author and id
    assert any(t.endswith(f"bob ({bob['id']}): fyi the deploy password is octopus-42") for t in texts)
    assert any(f"alice ({alice['id']}): @fakebot what was the deploy password?" in t for t in texts)


async def test_long_reply_split_and_everyone_pings_nobody(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice = world["general"], world["alice"]
    code = "```python\n" + "\n".join(f"value_{i} = compute({i})  # step {i} of the pipeline" for i in range(90)) + "\n```"
    long_text = (
        "@everyone here is the plan <@&123> <@" + alice["id"] + ">\n\n" + ("Intro sentence. " * 60) + "\n\n" + code + "\n\nDone."
    )
    assert len(long_text) > 5000
    fake.push(reply(long_text))
    async with running(settings, fake_discord):
        await fake_discord.send_message(general["id"], alice["id"], f"<@{fake_discord.bot_user_id}> plan please")
        await fake_discord.wait_for(lambda f: any(m["content"].endswith("Done.") for m in f.bot_messages(general["id"])))
        parts = fake_discord.bot_messages(general["id"])
    assert len(parts) >= 3 and all(len(p["content"]) <= 2000 for p in parts)
    assert all(sum(line.startswith("```") for line in p["content"].split("\n")) % 2 == 0 for p in parts)
    assert sum("value_" in p["content"] for p in parts) >= 2
    assert all(p["allowed_mentions"] == {"parse": []} for p in parts)
    assert all(p["mentions"] == [] and not p["mention_everyone"] and p["mention_roles"] == [] for p in parts)
    assert parts[0]["message_reference"] is not None and parts[1].get("message_reference") is None


async def test_memory_view_is_ephemeral(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    async with running(settings, fake_discord):
        interaction = await fake_discord.send_slash(world["general"]["id"], world["alice"]["id"], "memory", "view")
        await fake_discord.wait_for(lambda f: len(interaction["responses"]) >= 2)
    defer, answer = interaction["responses"][:2]
    assert defer["type"] == 5 and defer["flags"] & EPHEMERAL
    text = fake_discord.messages[interaction["original_message_id"]]["content"]
    assert "__persona__" in text and "__channel__" in text and "Context window:" in text
    assert fake_discord.messages[interaction["original_message_id"]]["ephemeral"]


async def test_reset_needs_permission_and_confirmation(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, admin = world["general"], world["alice"], world["admin"]
    fake.default = lambda body: reply("ok")
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_message(general["id"], alice["id"], "remember: the cake is a lie")
        agent = await bot.engine.agent(f"channel:{general['id']}")
        await eventually(lambda: recall.count(bot.engine.db, agent))
        refused = await fake_discord.send_slash(general["id"], alice["id"], "memory", "reset", {"scope": "all"})
        (r,) = await fake_discord.wait_for(lambda f: refused["responses"])
        assert r["ephemeral"] and "Manage Channels" in r["data"]["content"]
        assert await recall.count(bot.engine.db, agent) == 1

        asked = await fake_discord.send_slash(general["id"], admin["id"], "memory", "reset", {"scope": "conversation"})
        await fake_discord.wait_for(lambda f: asked["responses"])
        assert [b["label"] for b in fake_discord.buttons(asked)] == ["Confirm", "Cancel"]
        assert await recall.count(bot.engine.db, agent) == 1  # nothing happens before the click
        stranger = await fake_discord.click_button(asked, fake_discord.buttons(asked)[0]["custom_id"], alice["id"])
        await fake_discord.wait_for(lambda f: stranger["responses"])
        assert await recall.count(bot.engine.db, agent) == 1
        click = await fake_discord.click_button(asked, fake_discord.buttons(asked)[0]["custom_id"], admin["id"])
        await fake_discord.wait_for(lambda f: len(click["responses"]) >= 2)
        assert await recall.count(bot.engine.db, agent) == 0
        assert "erased" in fake_discord.messages[asked["original_message_id"]]["content"]


async def test_attachment_ingested_and_searchable(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    doc = "\n\n".join(f"Section {i}. The warranty for model X{i} lasts {i + 1} years." for i in range(80))

    def model(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] == "tool":
            return call("send_message", {"message": body["messages"][-1]["content"][:1500]})
        return call("archival_memory_search", {"query": "warranty X42"})

    fake.default = model
    async with running(settings, fake_discord):
        await fake_discord.send_dm(alice["id"], "here's the manual", attachments=[("manual.md", doc.encode(), "text/markdown")])
        await fake_discord.wait_for(lambda f: any("X42 lasts 43 years" in m["content"] for m in f.bot_messages(dm["id"])))
        await fake_discord.send_dm(alice["id"], "and this", attachments=[("photo.png", b"\x89PNG....", "image/png")])
        await fake_discord.wait_for(
            lambda f: any("`photo.png` is not a PNG, JPEG, WebP or GIF image" in m["content"] for m in f.bot_messages(dm["id"]))
        )
        big = b"x" * (settings.max_attachment_bytes + 1)
        await fake_discord.send_dm(alice["id"], "too big", attachments=[("big.txt", big, "text/plain")])
        await fake_discord.wait_for(
            lambda f: any("`big.txt` is" in m["content"] and "up to" in m["content"] for m in f.bot_messages(dm["id"]))
        )
    progress = [m for m in fake_discord.bot_messages(dm["id"]) if "manual.md" in m["content"]]
    assert progress and "Saved `manual.md` to my archival memory" in progress[0]["content"]
    told = chat_requests(fake)[0]["messages"][-1]["content"]
    assert "here's the manual" in told and "Document `manual.md`" in told


async def test_two_dm_users_concurrent_and_isolated(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice, bob, general = world["alice"], world["bob"], world["general"]
    dm_a, dm_b = fake_discord.dm_channel(alice["id"]), fake_discord.dm_channel(bob["id"])

    arrived = {"alpha": asyncio.Event(), "bravo": asyncio.Event()}
    overlapped: list[bool] = []

    async def both_in_flight(mine: str, other: str, then: dict[str, Any]) -> dict[str, Any]:
        arrived[mine].set()
        try:  # answered only once the other user's request is in flight too
            await asyncio.wait_for(arrived[other].wait(), 3)
            overlapped.append(True)
        except TimeoutError:
            overlapped.append(False)
        return then

    def model(body: dict[str, Any]) -> Any:
        text = last_user_text(body)
        if body["messages"][-1]["role"] == "tool":
            return reply("saved")
        if "secret" in text:
            mine = "alpha" if "alpha" in text else "bravo"
            other = "bravo" if mine == "alpha" else "alpha"
            note = call("core_memory_append", {"label": "human", "content": "secret " + text.split("secret ")[-1]})
            return both_in_flight(mine, other, note)
        return reply("hello")

    fake.default = model
    async with running(settings, fake_discord):
        await fake_discord.send_dm(alice["id"], "my secret alpha-apple")
        await fake_discord.send_dm(bob["id"], "my secret bravo-banana")
        await fake_discord.wait_for(lambda f: f.bot_messages(dm_a["id"]) and f.bot_messages(dm_b["id"]), timeout=8)
        assert overlapped == [True, True]  # the two users' turns ran side by side
        await fake_discord.send_message(general["id"], alice["id"], f"<@{fake_discord.bot_user_id}> hi channel")
        await fake_discord.wait_for(lambda f: f.bot_messages(general["id"]))
    for body in chat_requests(fake):
        dump = json.dumps(body)
        assert not ("alpha-apple" in dump and "bravo-banana" in dump)
    channel_prompts = [b for b in chat_requests(fake) if "hi channel" in json.dumps(b)]
    assert channel_prompts and not any("alpha-apple" in json.dumps(b) or "bravo-banana" in json.dumps(b) for b in channel_prompts)


async def test_endpoint_down_apologises_and_keeps_message(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    down = settings.model_copy(update={"llm_base_url": "http://127.0.0.1:9/v1"})
    async with running(down, fake_discord) as bot:
        await fake_discord.send_dm(alice["id"], "are you awake? remember the blue kettle")
        (answer,) = await fake_discord.wait_for(lambda f: f.bot_messages(dm["id"]), timeout=10)
        assert "can't reach my language model" in answer["content"]
        agent = await bot.engine.agent(f"dm:{alice['id']}")
        assert (await recall.search_messages(bot.engine.db, agent, "blue kettle")).total == 1


async def test_bots_webhooks_and_other_channels_ignored_listen_mode_answers_all(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, admin = world["general"], world["alice"], world["admin"]
    other_bot = fake_discord.add_user("otherbot", bot=True)
    fake_discord.add_member(world["guild"]["id"], other_bot["id"])
    fake.default = lambda body: reply("heard you")
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_message(general["id"], other_bot["id"], f"<@{fake_discord.bot_user_id}> beep")
        await fake_discord.send_message(general["id"], alice["id"], f"<@{fake_discord.bot_user_id}> from a hook", webhook=True)
        toggled = await fake_discord.send_slash(general["id"], admin["id"], "memory-admin", "listen", {"enabled": True})
        await fake_discord.wait_for(lambda f: toggled["responses"])
        await fake_discord.send_message(general["id"], alice["id"], "no mention here")
        await fake_discord.wait_for(lambda f: any(m["content"] == "heard you" for m in f.bot_messages(general["id"])))
        agent = await bot.engine.agent(f"channel:{general['id']}")
        stored = await bot.engine.db.fetchall("SELECT content FROM messages WHERE agent_id = ? AND role = 'user'", (agent.id,))
    assert [r[0] for r in stored] == ["no mention here"]
    assert len(chat_requests(fake)) == 1


async def test_rate_limit_replies_once_and_keeps_messages(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    limited = settings.model_copy(update={"rate_limit_per_minute": 2})
    fake.default = lambda body: reply("ok")
    async with running(limited, fake_discord) as bot:
        handled = [
            bot.wait_for("message_handled", check=lambda m, _, i=i: m.content == f"message {i}", timeout=5) for i in range(5)
        ]
        for i in range(5):
            await fake_discord.send_dm(alice["id"], f"message {i}")
        outcomes = [outcome for _, outcome in await asyncio.gather(*handled)]  # warnings sent by then
        assert sorted(outcomes) == ["answered"] * 2 + ["limited"] * 3
        warnings = [m for m in fake_discord.bot_messages(dm["id"]) if "faster" in m["content"]]
        agent = await bot.engine.agent(f"dm:{alice['id']}")
        assert len(warnings) == 1
        assert (
            await bot.engine.db.fetchval("SELECT count(*) FROM messages WHERE agent_id = ? AND role = 'user'", (agent.id,)) == 5
        )


async def test_export_forget_and_import_round_trip(
    settings: BotSettings,
    fake_discord: FakeDiscord,
    fake: FakeOpenAI,
    world: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.push(call("archival_memory_insert", {"content": "Alice's cat is called Miso."}), reply("noted"))
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_dm(alice["id"], "my cat is Miso")
        await fake_discord.wait_for(lambda f: f.bot_messages(dm["id"]))
        exported = await fake_discord.send_slash(dm["id"], alice["id"], "memory", "export")
        (file_msg,) = await fake_discord.wait_for(lambda f: [m for m in f.bot_messages(dm["id"]) if m["files"]])
        data = json.loads(file_msg["files"][0]["data"])
        assert data["format"] == "mnemocord-export" and data["passages"][0]["content"] == "Alice's cat is called Miso."
        assert file_msg["ephemeral"] and exported["responses"][0]["flags"] & EPHEMERAL
        searched = await fake_discord.send_slash(dm["id"], alice["id"], "memory", "search", {"query": "Miso"})
        await fake_discord.wait_for(lambda f: len(searched["responses"]) >= 2)
        listing = fake_discord.messages[searched["original_message_id"]]["content"]
        passage_id = data["passages"][0]["id"]
        assert f"`p{passage_id}`" in listing
        forgot = await fake_discord.send_slash(dm["id"], alice["id"], "memory", "forget", {"target": f"p{passage_id}"})
        await fake_discord.wait_for(lambda f: len(forgot["responses"]) >= 2)
        agent = await bot.engine.agent(f"dm:{alice['id']}")
        assert await bot.engine.archive.count(agent) == 0
    path = tmp_path / "export.json"
    path.write_text(json.dumps(data))
    from bot.cli import main

    other_db = settings.model_copy(update={"database_path": tmp_path / "other.db"})
    for name, value in {"DATABASE_PATH": str(other_db.database_path), "LLM_BASE_URL": fake.url, "LLM_MODEL": "m"}.items():
        monkeypatch.setenv(name, value)
    await asyncio.to_thread(main, ["import", str(path), "--agent", "dm:999"])
    engine = await Engine.open(other_db)
    agent = await engine.agent("dm:999")
    assert (await engine.archive.search(agent, "cat")).hits[0].text == "Alice's cat is called Miso."
    assert (await recall.search_messages(engine.db, agent, "Miso")).total >= 1
    await engine.close()


async def test_mnemocord_run_process_answers_and_stops_cleanly_on_sigterm(
    fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any], tmp_path: Path
) -> None:
    import os
    import signal
    import sys

    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    stopping = asyncio.Event()

    async def finish_after_sigterm() -> dict[str, Any]:
        await stopping.wait()  # the turn is still running when the process is told to stop
        return call("send_message", {"message": "finished before stopping"})

    fake.default = lambda body: finish_after_sigterm()
    env = {
        **os.environ,
        "DISCORD_TOKEN": "secret-token-value",
        "DISCORD_API_BASE": fake_discord.rest_base,
        "DISCORD_GATEWAY_URL": fake_discord.gateway_url,
        "LLM_BASE_URL": fake.url,
        "LLM_MODEL": "m",
        "DATABASE_PATH": str(tmp_path / "run.db"),
        "PYTHONPATH": str(Path(__file__).parent.parent),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "run",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await fake_discord.wait_ready(timeout=20)
        await fake_discord.send_dm(alice["id"], "please finish this")
        await fake_discord.wait_for(lambda f: fake.chat_requests, timeout=10)  # the turn is in flight
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        before = b""
        while b"shutting down" not in before:
            line = await asyncio.wait_for(proc.stderr.readline(), 20)
            assert line, before.decode()
            before += line
        stopping.set()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
    log = before.decode() + err.decode()
    assert proc.returncode == 0, log
    assert [m["content"] for m in fake_discord.bot_messages(dm["id"])] == ["finished before stopping"]
    assert "turn agent=dm:" in log and "outcome=reply" in log and "stopped" in log
    assert "secret-token-value" not in log and "Traceback" not in log
    assert not (tmp_path / "run.db-wal").exists() or (tmp_path / "run.db-wal").stat().st_size == 0


async def test_message_arriving_during_shutdown_is_kept(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    in_flight, release = asyncio.Event(), asyncio.Event()

    async def slow(body: dict[str, Any]) -> dict[str, Any]:
        in_flight.set()
        await release.wait()  # the turn runs until the second message was handled
        return reply("first answered")

    fake.default = slow
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_dm(alice["id"], "first")
        await asyncio.wait_for(in_flight.wait(), 5)
        draining = asyncio.create_task(bot.drain())
        kept = bot.wait_for("message_handled", check=lambda m, _: m.content == "second, sent while stopping", timeout=5)
        await fake_discord.send_dm(alice["id"], "second, sent while stopping")
        assert (await kept)[1] == "recorded"
        release.set()
        await draining
        agent = await bot.engine.agent(f"dm:{alice['id']}")
        kept = await recall.search_messages(bot.engine.db, agent, "stopping")
        assert kept.total == 1
    assert [m["content"] for m in fake_discord.bot_messages(dm["id"])] == ["first answered"]


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, written by hand (offsets and all)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


async def test_pdf_attachment_ingested(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.default = lambda body: reply("got it")
    async with running(settings, fake_discord) as bot:
        pdf = tiny_pdf("The lease of flat 4B ends on 30 June 2031.")
        await fake_discord.send_dm(alice["id"], "my lease", attachments=[("lease.pdf", pdf, "application/pdf")])
        await fake_discord.wait_for(lambda f: any(m["content"] == "got it" for m in f.bot_messages(dm["id"])))
        found = await bot.engine.memory.search(f"dm:{alice['id']}", "lease flat 4B")
    assert [h.text for h in found.passages.hits] == ["The lease of flat 4B ends on 30 June 2031."]
    assert any(
        "Saved `lease.pdf` to my archival memory (1 passages)" in m["content"] for m in fake_discord.bot_messages(dm["id"])
    )
    told = chat_requests(fake)[0]["messages"][-1]["content"]
    assert "my lease" in told and "Document `lease.pdf` (42 characters)" in told


async def test_forget_by_text_asks_first_then_forgets(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    key = f"dm:{alice['id']}"
    fake.push(call("archival_memory_insert", {"content": "Alice's locker code is 4417."}), reply("noted"))
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_dm(alice["id"], "my locker code is 4417")
        await fake_discord.wait_for(lambda f: f.bot_messages(dm["id"]))
        asked = await fake_discord.send_slash(dm["id"], alice["id"], "memory", "forget", {"target": "LOCKER code"})
        await fake_discord.wait_for(
            lambda f: fake_discord.buttons(asked) if asked.get("original_message_id") in f.messages else False
        )
        question = fake_discord.messages[asked["original_message_id"]]["content"]
        # the message and the agent's insert call (its arguments hold the text), and the passage
        assert question == "Forget 2 messages and 1 passages containing “LOCKER code”?"
        before = await bot.engine.memory.find(key, "locker code")
        assert (len(before.message_ids), len(before.passage_ids)) == (2, 1)  # nothing happens before the click
        click = await fake_discord.click_button(asked, fake_discord.buttons(asked)[0]["custom_id"], alice["id"])
        await fake_discord.wait_for(lambda f: len(click["responses"]) >= 2)
        assert fake_discord.messages[asked["original_message_id"]]["content"].startswith("Forgot ")
        after = await bot.engine.memory.find(key, "locker code")
        assert after.message_ids == [] and after.passage_ids == []
        nothing = await fake_discord.send_slash(dm["id"], alice["id"], "memory", "forget", {"target": "locker"})
        await fake_discord.wait_for(lambda f: len(nothing["responses"]) >= 2)
        assert fake_discord.messages[nothing["original_message_id"]]["content"] == "Nothing in memory contains that text."


async def test_forget_reads_only_ascii_digits_as_ids(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    key = f"dm:{alice['id']}"
    fake.default = lambda body: reply("ok")
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_dm(alice["id"], "keep this message")
        await fake_discord.wait_for(lambda f: f.bot_messages(dm["id"]))
        (message_id,) = (await bot.engine.memory.find(key, "keep this")).message_ids
        arabic = "m" + str(message_id).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
        forgot = await fake_discord.send_slash(dm["id"], alice["id"], "memory", "forget", {"target": arabic})
        await fake_discord.wait_for(lambda f: len(forgot["responses"]) >= 2)
        # text to look for, not the id m<n>: nothing contains it, and nothing was deleted
        assert fake_discord.messages[forgot["original_message_id"]]["content"] == "Nothing in memory contains that text."
        assert (await bot.engine.memory.find(key, "keep this")).message_ids == [message_id]


async def test_persona_set_by_managers_only_and_used_next_turn(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, admin = world["general"], world["alice"], world["admin"]
    fake.default = lambda body: reply("arr")
    async with running(settings, fake_discord):
        refused = await fake_discord.send_slash(general["id"], alice["id"], "memory-admin", "persona", {"text": "I am a cat."})
        (r,) = await fake_discord.wait_for(lambda f: refused["responses"])
        assert r["ephemeral"] and "Manage Channels" in r["data"]["content"]
        changed = await fake_discord.send_slash(general["id"], admin["id"], "memory-admin", "persona", {"text": "I am a pirate."})
        await fake_discord.wait_for(lambda f: len(changed["responses"]) >= 2)
        assert fake_discord.messages[changed["original_message_id"]]["content"].startswith("Block 'persona' set")
        await fake_discord.send_message(general["id"], alice["id"], f"<@{fake_discord.bot_user_id}> who are you?")
        await fake_discord.wait_for(lambda f: any(m["content"] == "arr" for m in f.bot_messages(general["id"])))
    (body,) = fake.chat_requests
    assert "I am a pirate." in body["messages"][0]["content"] and "I am a cat." not in body["messages"][0]["content"]


async def test_commands_synced_again_only_when_they_change(
    settings: BotSettings, fake_discord: FakeDiscord, world: dict[str, Any]
) -> None:
    def puts() -> int:
        return len([r for r in fake_discord.requests if r[0] == "PUT" and r[1].endswith("/commands")])

    async def start_and_stop(extra: bool) -> None:
        point_discord_at(settings)
        engine = await open_engine(settings)
        bot = MnemoBot(settings, engine)
        if extra:  # a new release that adds a command

            async def ping(interaction: discord.Interaction) -> None:
                await interaction.response.send_message("pong")

            bot.tree.add_command(discord.app_commands.Command(name="ping", description="Check the bot is up", callback=ping))
        ready = fake_discord.ready_count
        task = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
        try:
            await fake_discord.wait_ready(count=ready + 1)
            await asyncio.wait_for(bot.wait_until_ready(), 5)
        finally:
            await bot.drain()
            await engine.close()
            await bot.close()
            await asyncio.wait_for(task, 5)

    await start_and_stop(extra=False)
    assert puts() == 1
    await start_and_stop(extra=True)
    assert puts() == 2 and "ping" in [c["name"] for c in fake_discord.registered_commands]
    await start_and_stop(extra=True)
    assert puts() == 2
    await start_and_stop(extra=False)
    assert puts() == 3 and "ping" not in [c["name"] for c in fake_discord.registered_commands]
