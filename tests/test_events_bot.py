"""Scheduled events through the real discord.py and the fake Discord: reminders across a restart, /memory events."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from bot.config import BotSettings
from memory import events
from tests.fakediscord import FakeDiscord
from tests.fakeopenai import FakeOpenAI, call, reply
from tests.test_bot import MANAGE_CHANNELS, eventually, fake_discord, last_user_text, running, settings, world  # noqa: F401  (fixtures)
from tests.test_cli import base_env


async def test_dm_reminder_arrives_in_that_dm_after_a_restart(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    key = f"dm:{alice['id']}"
    dm = fake_discord.dm_channel(alice["id"])
    fake.push(
        call("schedule_event", {"when": "in 2 minutes", "note": "stretch"}),
        call("send_message", {"message": "Sure, in 2 minutes."}),
    )
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_dm(alice["id"], "remind me in 2 minutes to stretch")
        await fake_discord.wait_for(lambda f: f.bot_messages(dm["id"]))
        (event,) = await bot.engine.memory.events(key)
    assert event.note == "stretch" and event.set_by == "alice"
    seen: list[str] = []

    def remind(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(last_user_text(body))
        return call("send_message", {"message": "Time to stretch!"})

    fake.push(remind)
    async with running(settings, fake_discord) as bot:  # a new process: the event is still there
        assert await bot.engine.memory.events(key) == [event]
        # two minutes pass: the timer's clock moves past the due time
        due = events.parse_stamp(event.due_at)
        bot.engine.events.now = lambda: due + timedelta(seconds=1)
        bot.engine.events.changed()
        await fake_discord.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 2)
        assert await bot.engine.memory.events(key) == []
    reminder = fake_discord.bot_messages(dm["id"])[-1]
    assert reminder["content"] == "Time to stretch!" and reminder.get("message_reference") is None
    assert reminder["allowed_mentions"] == {"parse": []}
    (prompt,) = seen
    assert "system event] Scheduled event #1" in prompt and "by alice: stretch" in prompt


async def answer_of(fake_discord: FakeDiscord, interaction: dict[str, Any]) -> str:
    await fake_discord.wait_for(lambda f: len(interaction["responses"]) >= 2)
    return str(fake_discord.messages[interaction["original_message_id"]]["content"])


async def test_events_listed_and_cancelled_by_their_setter_or_a_manager_and_a_vanished_channel_fails(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, bob, guild = world["general"], world["alice"], world["bob"], world["guild"]
    mod = fake_discord.add_user("mod")
    fake_discord.add_member(guild["id"], mod["id"], permissions=MANAGE_CHANNELS)
    mention = f"<@{fake_discord.bot_user_id}>"
    fake.push(
        call("schedule_event", {"when": "in 1 hour", "note": "standup", "repeat": "daily"}),
        call("schedule_event", {"when": "in 2 hours", "note": "retro"}),
        reply("Both set."),
    )
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_message(general["id"], alice["id"], f"{mention} schedule standup and retro")
        await fake_discord.wait_for(lambda f: f.bot_messages(general["id"]))
        listing = await answer_of(fake_discord, await fake_discord.send_slash(general["id"], bob["id"], "memory", "events"))
        assert "Pending events" in listing and "`#1`" in listing and "(daily), set by alice: standup" in listing
        assert "`#2`" in listing and "retro" in listing
        refused = await fake_discord.send_slash(general["id"], bob["id"], "memory", "events", {"cancel": 1})
        assert "Only the person who set event #1" in await answer_of(fake_discord, refused)
        by_mod = await fake_discord.send_slash(general["id"], mod["id"], "memory", "events", {"cancel": 1})
        assert await answer_of(fake_discord, by_mod) == "Cancelled event #1: standup"
        again = await fake_discord.send_slash(general["id"], alice["id"], "memory", "events", {"cancel": 1})
        assert await answer_of(fake_discord, again) == "There is no pending event #1 here."

        # the channel is deleted before the retro is due: the event fails instead of firing forever
        key = f"channel:{general['id']}"
        (retro,) = await bot.engine.memory.events(key)
        fake.push(reply("Retro time!"))
        fake_discord.channels.pop(general["id"])
        bot.engine.events.now = lambda: events.parse_stamp(retro.due_at) + timedelta(seconds=1)
        bot.engine.events.changed()

        async def failed() -> bool:
            found = await bot.engine.memory.event(key, retro.id)
            return found is not None and found.state == "failed"

        await eventually(failed)
    assert "Retro time!" not in str(fake_discord.bot_messages())


async def test_events_fire_in_the_terminal_chat(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.push(
        call("schedule_event", {"when": "PT1S", "note": "stretch"}),
        call("send_message", {"message": "In a second."}),
        call("send_message", {"message": "Stretch now!"}),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "chat",
        cwd=tmp_path,
        env={**os.environ, **base_env(tmp_path, fake)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"remind me in a second to stretch\n")
    await proc.stdin.drain()
    lines = []
    while not any("(event #1)" in line for line in lines):
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line, "the chat ended before the event fired"
        lines.append(line)
    proc.stdin.close()
    await asyncio.wait_for(proc.wait(), 10)
    assert "bot> (event #1) Stretch now!" in "".join(lines)
    assert "Scheduled event #1" in str(fake.chat_requests[-1]["messages"])
