"""The bot running several shards in one process, against a fake Discord that shards as Discord does:
a session per shard, a guild's events on shard (guild_id >> 22) % count, DMs on shard 0."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pytest

from bot.client import MnemoBot
from bot.config import BotSettings
from tests.fakediscord import FakeDiscord
from tests.fakeopenai import FakeOpenAI, reply
from tests.test_bot import fake_discord, last_user_text, running, settings  # noqa: F401  (fixtures)


@pytest.fixture
def dispatched(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The bot's events (ready, shard_ready, caught_up, ...) counted as discord.py dispatches them.
    Also drops discord.py's 5 s wait before each IDENTIFY after the first (Discord's rate, not the fake's)."""
    counts: Counter[str] = Counter()
    dispatch = MnemoBot.dispatch

    def counting(self: MnemoBot, event: str, /, *args: Any, **kwargs: Any) -> None:
        counts[event] += 1
        dispatch(self, event, *args, **kwargs)

    async def no_wait(self: MnemoBot, shard_id: int | None, *, initial: bool = False) -> None:
        return None

    monkeypatch.setattr(MnemoBot, "dispatch", counting)
    monkeypatch.setattr(MnemoBot, "before_identify_hook", no_wait)
    return counts


def world(fake_discord: FakeDiscord, fake: FakeOpenAI) -> dict[str, Any]:
    """alice, her DM, and a channel of a server whose events come on shard 1 of 2."""
    f = fake_discord
    alice, admin = f.add_user("alice"), f.add_user("admin")
    guild = f.add_guild("Big", owner_id=admin["id"], shard=(1, 2))
    f.add_member(guild["id"], alice["id"])
    fake.default = lambda body: reply("answer to: " + last_user_text(body).rsplit(" ", 1)[-1])
    return {
        "alice": alice,
        "guild": guild,
        "general": f.add_text_channel(guild["id"], "general"),
        "dm": f.dm_channel(alice["id"]),
    }


def answers(fake_discord: FakeDiscord, channel: dict[str, Any]) -> list[str]:
    return [m["content"] for m in fake_discord.bot_messages(channel["id"])]


@pytest.mark.parametrize("by", ["discord", "setting"])
async def test_two_shards_answer_a_dm_and_a_guild_message_once_each(
    settings: BotSettings,
    fake_discord: FakeDiscord,
    fake: FakeOpenAI,
    dispatched: Counter[str],
    caplog: pytest.LogCaptureFixture,
    by: str,
) -> None:
    if by == "discord":
        fake_discord.shards = 2  # what GET /gateway/bot recommends
    else:
        settings.shard_count = 2  # SHARD_COUNT wins over Discord's recommendation of 1
    w = world(fake_discord, fake)
    dm, general, alice = w["dm"], w["general"], w["alice"]
    me = f"<@{fake_discord.bot_user_id}>"
    caplog.set_level(logging.INFO, logger="bot")
    async with running(settings, fake_discord) as bot:
        assert [i["shard"] for i in fake_discord.identifies] == [[0, 2], [1, 2]]
        assert (("GET", "/gateway/bot") in fake_discord.requests) == (by == "discord")
        guild = bot.get_guild(int(w["guild"]["id"]))
        assert guild is not None and guild.shard_id == 1

        await fake_discord.send_dm(alice["id"], "one")
        await fake_discord.send_message(general["id"], alice["id"], f"{me} uno")
        await fake_discord.wait_for(lambda f: answers(f, dm) and answers(f, general))
        # a duplicate of either answer would come before the answer to the next message
        await fake_discord.send_dm(alice["id"], "two")
        await fake_discord.send_message(general["id"], alice["id"], f"{me} dos")
        await fake_discord.wait_for(lambda f: len(answers(f, dm)) == 2 and len(answers(f, general)) == 2)
        assert answers(fake_discord, dm) == ["answer to: one", "answer to: two"]
        assert answers(fake_discord, general) == ["answer to: uno", "answer to: dos"]

    # the start-up happened once, not once per shard
    assert dispatched["shard_ready"] == 2 and dispatched["ready"] == 1 and dispatched["caught_up"] == 1
    assert len([r for r in fake_discord.requests if r[0] == "PUT" and r[1].endswith("/commands")]) == 1
    (started,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("connected as")]
    assert started.endswith("to 1 guilds on 2 shards")


async def test_a_shard_starting_a_new_session_catches_up_its_own_conversations_only(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, dispatched: Counter[str]
) -> None:
    fake_discord.shards = 2
    w = world(fake_discord, fake)
    dm, general, alice = w["dm"], w["general"], w["alice"]
    me = f"<@{fake_discord.bot_user_id}>"
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_dm(alice["id"], "one")
        await fake_discord.send_message(general["id"], alice["id"], f"{me} uno")
        await fake_discord.wait_for(lambda f: answers(f, dm) and answers(f, general))

        # shard 1's session ends and cannot resume; a message in its server never came through the gateway
        fake_discord.post_offline(general["id"], alice["id"], f"{me} missed")
        since = len(fake_discord.requests)
        caught_up = bot.wait_for("caught_up", timeout=10)
        await fake_discord.disconnect_client(resume=False, shard=1)
        assert await caught_up == 1
        assert answers(fake_discord, general)[-1] == "*(late: I was offline when you wrote this)*\nanswer to: missed"
        # shard 0 kept its session: its conversations' history is not read, nothing starts again
        reads = [path for method, path in fake_discord.requests[since:] if method == "GET" and path.endswith("/messages")]
        assert reads == [f"/channels/{general['id']}/messages"]
        assert dispatched["ready"] == 1 and dispatched["shard_ready"] == 3

        await fake_discord.send_dm(alice["id"], "two")
        await fake_discord.send_message(general["id"], alice["id"], f"{me} dos")
        await fake_discord.wait_for(lambda f: len(answers(f, dm)) == 2 and len(answers(f, general)) == 3)
        assert answers(fake_discord, dm) == ["answer to: one", "answer to: two"]
        assert answers(fake_discord, general)[-1] == "answer to: dos"
    assert dispatched["caught_up"] == 2
