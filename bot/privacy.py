"""`/forget-me`: a person erases everything the bot holds from them, after a confirmation button.

Open to everyone everywhere, also where the bot does not answer (ALLOWED_* settings):
a person's right to have their data erased does not depend on being admitted.
"""

from __future__ import annotations

import discord
from discord import app_commands

from memory.engine import Engine
from memory.erasure import Erased


def described(erased: Erased) -> str:
    """What was erased, in counts, for the person."""
    return (
        f"Done. Erased {erased.messages} messages, {erased.passages} archival passages and {erased.person_blocks}"
        f" notes about you in channels{' (your DM memory included)' if erased.agents else ''}."
    )


def register(tree: app_commands.CommandTree, engine: Engine) -> None:
    from .commands import Confirm  # commands imports this module to register it

    @tree.command(name="forget-me", description="Erase everything this bot has stored from you, after a confirmation")
    async def forget_me(interaction: discord.Interaction) -> None:
        user_id = interaction.user.id

        async def erase() -> str:
            return described(await engine.memory.forget_person(str(user_id)))

        await interaction.response.send_message(
            "Erase everything I hold from you? Your DM conversation and its memory, every message you wrote in any"
            " channel I keep, and the documents you attached to them. My own notes and summaries are not rewritten."
            " This cannot be undone.",
            view=Confirm(user_id, erase),
            ephemeral=True,
        )
