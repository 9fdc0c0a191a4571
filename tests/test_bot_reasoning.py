"""A reasoning model behind the Discord bot: its thinking is shown only as the operator chose."""

from __future__ import annotations

from typing import Any

import pytest

from bot.config import BotSettings
from tests.fakediscord import FakeDiscord
from tests.fakeopenai import FakeOpenAI, thinking
from tests.test_bot import chat_requests, fake_discord, running, settings, world  # noqa: F401  (fixtures)


@pytest.mark.parametrize("mode", ["off", "spoiler", "file"])
async def test_thinking_reaches_discord_only_as_the_operator_chose(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any], mode: str
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    settings.show_reasoning = mode  # type: ignore[assignment]
    fake.default = lambda body: thinking("she || asked about tea", "Tea is lovely.")
    async with running(settings, fake_discord) as bot:
        handled = bot.wait_for("message_handled", check=lambda m, _: m.content == "tea?", timeout=5)
        await fake_discord.send_dm(alice["id"], "tea?")
        await handled
        sent = fake_discord.bot_messages(dm["id"])
    assert sent[0]["content"] == "Tea is lovely."
    assert all("asked about tea" not in m["content"] for m in sent[:1])
    if mode == "off":
        assert len(sent) == 1
    elif mode == "spoiler":
        assert sent[1]["content"] == "||she | | asked about tea||"
    else:
        assert sent[1]["files"][0]["filename"] == "reasoning.txt" and b"asked about tea" in sent[1]["files"][0]["data"]
