"""Confirmation buttons that keep working after a restart, and expire.

The request (who asked, what to do, until when) is stored in the database and the
buttons carry only its token in their custom_id, so a new process answers a click
on a message the old one sent: `ConfirmButton` is registered with
`Client.add_dynamic_items` at start. A request is taken once: a second click, or a
click after the expiry, erases nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import discord

from memory.engine import Engine

log = logging.getLogger(__name__)

# how long the buttons work; the question says so
CONFIRM_MINUTES = 15
EXPIRY_NOTE = f"(The buttons work for {CONFIRM_MINUTES} minutes.)"

Action = Callable[[Engine, dict[str, Any]], Awaitable[str]]
# name -> what confirming does; returns the answer for the person
ACTIONS: dict[str, Action] = {}


def action(name: str) -> Callable[[Action], Action]:
    def register(fn: Action) -> Action:
        ACTIONS[name] = fn
        return fn

    return register


class _HasEngine(Protocol):
    engine: Engine


async def ask(engine: Engine, user_id: int, name: str, args: dict[str, Any]) -> discord.ui.View:
    """A stored request for `name(args)` that only `user_id` can confirm; returns its Confirm / Cancel buttons."""
    token = await engine.memory.add_confirmation(str(user_id), name, args, CONFIRM_MINUTES)
    view = discord.ui.View(timeout=None)
    view.add_item(ConfirmButton("yes", token))
    view.add_item(ConfirmButton("no", token))
    return view


class ConfirmButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"mnemo:(?P<verb>yes|no):(?P<token>[0-9a-f]{32})"):
    def __init__(self, verb: str, token: str) -> None:
        yes = verb == "yes"
        super().__init__(
            discord.ui.Button(
                label="Confirm" if yes else "Cancel",
                style=discord.ButtonStyle.danger if yes else discord.ButtonStyle.secondary,
                custom_id=f"mnemo:{verb}:{token}",
            )
        )
        self.verb = verb
        self.token = token

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ConfirmButton:
        return cls(match["verb"], match["token"])

    async def callback(self, interaction: discord.Interaction) -> None:
        engine = cast(_HasEngine, interaction.client).engine
        request = await engine.memory.confirmation(self.token)
        if request is not None and request.user_id != str(interaction.user.id):
            await interaction.response.send_message("Only the person who asked can confirm this.", ephemeral=True)
            return
        if request is None or not await engine.memory.take_confirmation(self.token):  # taken by an earlier click
            # a message of its own: editing would overwrite the answer of the click that took it
            await interaction.response.send_message("This was already answered; nothing more was done.", ephemeral=True)
            return
        if request.expired:
            text = f"This confirmation expired after {CONFIRM_MINUTES} minutes; nothing was erased. Run the command again."
            await interaction.response.edit_message(content=text, view=None)
            return
        if self.verb == "no":
            await interaction.response.edit_message(content="Cancelled; nothing was erased.", view=None)
            return
        run = ACTIONS.get(request.action)
        if run is None:  # stored by a version that had this action
            await interaction.response.edit_message(
                content="This confirmation is no longer valid; nothing was erased.", view=None
            )
            return
        await interaction.response.defer()
        try:
            result = await run(engine, request.args)
        except Exception:  # the click is spent: the person must still learn the outcome
            log.exception("confirmed %s failed", request.action)
            result = "Sorry, that failed on my side, and may be only partly done. Please run the command again."
        await interaction.edit_original_response(content=result, view=None)
