"""The Discord side as a hostile world: bad frames, DMs from strangers, racing messages, threads."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import discord

from bot import wire
from bot.client import MnemoBot
from bot.config import BotSettings
from tests.fakediscord import FakeDiscord
from tests.fakeopenai import FakeOpenAI, reply
from tests.test_bot import chat_requests, fake_discord, last_user_text, running, settings, world  # noqa: F401  (fixtures)


async def outcome_of(bot: MnemoBot, content: str, send: Callable[[], Awaitable[Any]]) -> str:
    """What the bot did with the message `send` posts: the outcome its `message_handled` event names."""
    handled = bot.wait_for("message_handled", check=lambda m, _: m.content == content, timeout=5)
    await send()
    _, outcome = await handled
    return outcome


async def stored_contents(bot: MnemoBot, key: str) -> list[str]:
    agent = await bot.engine.agent(key)
    rows = await bot.engine.db.fetchall(
        "SELECT content FROM messages WHERE agent_id = ? AND role = 'user' ORDER BY id", (agent.id,)
    )
    return [r[0] for r in rows]


async def test_lone_surrogate_in_a_gateway_message_is_replaced_and_the_bot_keeps_running(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.default = lambda body: reply("got: " + last_user_text(body)[-12:])
    async with running(settings, fake_discord) as bot:
        # the fake writes frames and REST bodies with json.dumps, which escapes the lone surrogate as
        # "\ud83d"; the answer's REST response quotes the message it replies to, so it holds one too
        sent = lambda: fake_discord.send_dm(alice["id"], "broken emoji \ud83d here")  # noqa: E731
        assert await outcome_of(bot, "broken emoji \ufffd here", sent) == "answered"
        (answer,) = fake_discord.bot_messages(dm["id"])
        assert answer["content"] == "got: emoji \ufffd here"
        await fake_discord.send_dm(alice["id"], "still there?")
        await fake_discord.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 2)
        assert await stored_contents(bot, f"dm:{alice['id']}") == ["broken emoji \ufffd here", "still there?"]


async def test_the_bots_own_messages_from_the_gateway_are_dropped_before_discord_py_builds_them(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.default = lambda body: reply("noted")
    async with running(settings, fake_discord) as bot:
        built: list[discord.Message] = []  # every message discord.py builds and dispatches
        watch = asyncio.ensure_future(bot.wait_for("message", check=lambda m: built.append(m) or False))
        assert await outcome_of(bot, "first", lambda: fake_discord.send_dm(alice["id"], "first")) == "answered"
        (answer,) = fake_discord.bot_messages(dm["id"])
        # the gateway keeps order: the reply's MESSAGE_CREATE came before this message's
        assert await outcome_of(bot, "second", lambda: fake_discord.send_dm(alice["id"], "second")) == "answered"
        watch.cancel()
        assert [m.content for m in built] == ["first", "second"]
        assert answer["content"] == "noted"


def test_wire_hooks_read_and_write_what_orjson_refuses() -> None:
    assert wire.loads('{"content": "a\\ud83d", "\\udc00k": ["\\ud83d\\ude00"]}') == {
        "content": "a\ufffd",
        "\ufffdk": ["\U0001f600"],
    }
    assert wire.loads("not json {") == {}  # a frame the gateway reader ignores
    assert wire.loads(b'{"op": 11}') == {"op": 11}
    assert wire.dumps({"content": "b\udc00"}) == '{"content":"b\ufffd"}'


async def test_dms_limited_to_members_of_the_allowed_guild(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice, guild = world["alice"], world["guild"]
    stranger = fake_discord.add_user("stranger")
    fake.default = lambda body: reply("hello")
    limited = settings.model_copy(update={"allowed_guilds": frozenset({int(guild["id"])})})
    member_lookups = lambda: [r for r in fake_discord.requests if r[0] == "GET" and "/members/" in r[1]]  # noqa: E731
    async with running(limited, fake_discord) as bot:
        assert (
            await outcome_of(bot, "hi from outside", lambda: fake_discord.send_dm(stranger["id"], "hi from outside")) == "refused"
        )
        assert (
            await outcome_of(bot, "hi from a member", lambda: fake_discord.send_dm(alice["id"], "hi from a member")) == "answered"
        )
        assert await outcome_of(bot, "again", lambda: fake_discord.send_dm(alice["id"], "again")) == "answered"
        assert await stored_contents(bot, f"dm:{stranger['id']}") == []
    assert fake_discord.bot_messages(fake_discord.dm_channel(stranger["id"])["id"]) == []
    # asked once per person, then remembered
    assert sorted(r[1] for r in member_lookups()) == sorted(f"/guilds/{guild['id']}/members/{u['id']}" for u in (stranger, alice))

    # ALLOWED_CHANNELS alone limits DMs to the members of the channels' guilds; ALLOW_DMS overrides
    by_channel = settings.model_copy(update={"allowed_channels": frozenset({int(world["general"]["id"])})})
    async with running(by_channel, fake_discord) as bot:
        assert await outcome_of(bot, "knock", lambda: fake_discord.send_dm(stranger["id"], "knock")) == "refused"
    everyone = by_channel.model_copy(update={"allow_dms": "everyone"})
    async with running(everyone, fake_discord) as bot:
        assert await outcome_of(bot, "knock knock", lambda: fake_discord.send_dm(stranger["id"], "knock knock")) == "answered"
    nobody = settings.model_copy(update={"allow_dms": "nobody"})
    async with running(nobody, fake_discord) as bot:
        assert await outcome_of(bot, "hi?", lambda: fake_discord.send_dm(alice["id"], "hi?")) == "refused"


async def test_unaddressed_message_and_mention_right_after_keep_their_order_in_every_channel(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    channels = [fake_discord.add_text_channel(world["guild"]["id"], f"room-{i}") for i in range(10)]
    fake.default = lambda body: reply("ok")
    async with running(settings, fake_discord) as bot:
        for i, channel in enumerate(channels):
            await fake_discord.send_message(channel["id"], alice["id"], f"aside {i}")
            await fake_discord.send_message(channel["id"], alice["id"], f"<@{fake_discord.bot_user_id}> question {i}")
        await fake_discord.wait_for(lambda f: all(f.bot_messages(c["id"]) for c in channels), timeout=15)
        orders = [await stored_contents(bot, f"channel:{c['id']}") for c in channels]
        assert len(bot.arrivals) == 0  # nothing left in hand
    assert orders == [[f"aside {i}", f"@fakebot question {i}"] for i in range(10)]


async def test_thread_is_its_own_agent_and_allowed_through_its_parent_channel(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice = world["general"], world["alice"]
    other = fake_discord.add_text_channel(world["guild"]["id"], "other")
    thread = fake_discord.add_thread(general["id"], "planning", owner_id=alice["id"])
    elsewhere = fake_discord.add_thread(other["id"], "offtopic", owner_id=alice["id"])
    fake.default = lambda body: reply("in the thread")
    only_general = settings.model_copy(update={"allowed_channels": frozenset({int(general["id"])})})
    mention = f"<@{fake_discord.bot_user_id}>"
    async with running(only_general, fake_discord) as bot:
        await fake_discord.send_message(general["id"], alice["id"], "channel chatter")
        outcome = await outcome_of(
            bot,
            f"{mention} thread question",
            lambda: fake_discord.send_message(thread["id"], alice["id"], f"{mention} thread question"),
        )
        assert outcome == "answered"
        (answer,) = fake_discord.bot_messages(thread["id"])
        assert answer["content"] == "in the thread"
        outcome = await outcome_of(
            bot, f"{mention} over here", lambda: fake_discord.send_message(elsewhere["id"], alice["id"], f"{mention} over here")
        )
        assert outcome == "refused"
        assert await stored_contents(bot, f"channel:{thread['id']}") == ["@fakebot thread question"]
        assert await stored_contents(bot, f"channel:{general['id']}") == ["channel chatter"]
        assert await stored_contents(bot, f"channel:{elsewhere['id']}") == []
    (prompt,) = chat_requests(fake)
    assert "channel chatter" not in str(prompt["messages"])  # the thread's context is its own
    assert fake_discord.bot_messages(elsewhere["id"]) == []


async def test_a_frame_that_is_not_json_is_skipped_without_reconnecting(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.default = lambda body: reply("fine")
    async with running(settings, fake_discord):
        connections = fake_discord.connection_count
        await fake_discord.send_raw("{not json")
        await fake_discord.send_dm(alice["id"], "after the garbage")
        await fake_discord.wait_for(lambda f: f.bot_messages(dm["id"]))
        assert fake_discord.connection_count == connections  # no reconnect either


async def test_a_full_disk_is_told_to_the_person_and_the_bot_keeps_running(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.default = lambda body: reply("noted")
    async with running(settings, fake_discord) as bot:
        db = bot.engine.db
        pages = await db.fetchval("PRAGMA page_count")
        await db.transact(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"))
        long = "a long message to store " * 900
        assert await outcome_of(bot, long, lambda: fake_discord.send_dm(alice["id"], long)) == "failed"
        (answer,) = fake_discord.bot_messages(dm["id"])
        assert "storage is full" in answer["content"]
        await db.transact(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        await fake_discord.send_dm(alice["id"], "and now?")
        await fake_discord.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 2)
        assert fake_discord.bot_messages(dm["id"])[-1]["content"] == "noted"
        assert await stored_contents(bot, f"dm:{alice['id']}") == ["and now?"]


async def test_a_reply_over_the_limit_is_cut_and_the_whole_text_attached(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    long = "".join(f"line {i} of a very long answer.\n" for i in range(600))
    fake.default = lambda body: reply(long)
    async with running(settings.model_copy(update={"max_reply_chars": 3000}), fake_discord) as bot:
        assert (
            await outcome_of(bot, "tell me everything", lambda: fake_discord.send_dm(alice["id"], "tell me everything"))
            == "answered"
        )
        sent = fake_discord.bot_messages(dm["id"])
        assert len(sent) == 2 and all(len(m["content"]) <= 2000 for m in sent)
        assert "cut: the reply has" in sent[-1]["content"]
        (attached,) = sent[-1]["files"]
        assert attached["filename"] == "reply.txt" and attached["data"].decode() == long.strip()


async def test_slash_commands_in_dms_follow_the_dm_rule(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice, guild = world["alice"], world["guild"]
    stranger = fake_discord.add_user("stranger")
    limited = settings.model_copy(update={"allowed_guilds": frozenset({int(guild["id"])})})
    async with running(limited, fake_discord) as bot:
        outside = await fake_discord.send_slash(fake_discord.dm_channel(stranger["id"])["id"], stranger["id"], "memory", "view")
        member = await fake_discord.send_slash(fake_discord.dm_channel(alice["id"])["id"], alice["id"], "memory", "view")
        await fake_discord.wait_for(lambda f: outside["responses"] and len(member["responses"]) >= 2)
        assert "can't use this bot here" in outside["responses"][0]["data"]["content"]
        assert "__persona__" in fake_discord.messages[member["original_message_id"]]["content"]
        assert not await bot.engine.memory.exists(f"dm:{stranger['id']}")  # nothing was made for the stranger
