"""`/forget-me`: a person erases everything the bot holds from them, after a confirmation button.

Open to everyone everywhere, also where the bot does not answer (ALLOWED_* settings):
a person's right to have their data erased does not depend on being admitted.
"""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands

from memory.engine import Engine
from memory.erasure import Erased

from . import confirm


def described(erased: Erased) -> str:
    """What was erased, in counts, for the person."""
    return (
        f"Done. Erased {erased.messages} messages, {erased.passages} archival passages, {erased.person_blocks}"
        f" notes about you in channels and {erased.events} reminders you set"
        f"{' (your DM memory included)' if erased.agents else ''}."
    )


def register(tree: app_commands.CommandTree, engine: Engine) -> None:
    @tree.command(name="forget-me", description="Erase everything this bot has stored from you, after a confirmation")
    async def forget_me(interaction: discord.Interaction) -> None:
        user_id = interaction.user.id
        view = await confirm.ask(engine, user_id, "forget-me", {"user_id": str(user_id)})
        await interaction.response.send_message(
            "Erase everything I hold from you? Your DM conversation and its memory, every message you wrote in any"
            " channel I keep, the documents you attached to them, and my notes about you in channels. My summaries"
            " and other notes are my own words and are not rewritten. This cannot be undone. " + confirm.EXPIRY_NOTE,
            view=view,
            ephemeral=True,
        )


@confirm.action("forget-me")
async def _confirmed(engine: Engine, args: dict[str, Any]) -> str:
    return described(await engine.memory.forget_person(str(args["user_id"])))
