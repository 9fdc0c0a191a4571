"""Slash commands: inspect, search, export, forget and reset an agent's memory.

In a guild the agent belongs to the channel, so changing it (reset, forget,
persona, listen mode) needs Manage Channels or Manage Server. Discord applies
default permissions per top-level command only, so `/memory-admin` carries
them as a default and every command that changes memory checks in code too.
In DMs the user owns their agent.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import discord
from discord import app_commands

from memory import events
from memory.api import parse_ids
from memory.engine import Engine

from . import confirm, privacy
from .access import allowed
from .config import BotSettings
from .routing import agent_key

EPHEMERAL_LIMIT = 1900
# meta key of the synced definitions' hash
COMMANDS_HASH = "discord_commands_hash"
log = logging.getLogger(__name__)


# whether the bot takes this interaction at all (beyond the allowlists): the client's DM rule, shutdown
Gate = Callable[[discord.Interaction], Awaitable[bool]]


async def _open(interaction: discord.Interaction) -> bool:
    return True


def register(tree: app_commands.CommandTree, engine: Engine, settings: BotSettings, gate: Gate = _open) -> None:
    tree.add_command(MemoryCommands(engine, settings, gate))
    tree.add_command(AdminCommands(engine, settings, gate))
    privacy.register(tree, engine)

    @tree.error
    async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        if isinstance(error, NotManager):
            text = NOT_ALLOWED
        elif isinstance(error, app_commands.CheckFailure):
            text = "You can't use this bot here."
        else:
            log.error("/%s failed", interaction.command.qualified_name if interaction.command else "?", exc_info=error)
            text = "Sorry, that command failed on my side."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            pass


def commands_hash(tree: app_commands.CommandTree) -> str:
    payload = [c.to_dict(tree) for c in tree.get_commands()]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


async def sync_if_changed(tree: app_commands.CommandTree, engine: Engine, app_id: int | None, *, force: bool = False) -> bool:
    """Discord rate-limits command creation: sync only when the definitions (or the application) changed."""
    digest = f"{app_id}:{commands_hash(tree)}"
    if not force and await engine.memory.meta(COMMANDS_HASH) == digest:
        return False
    await tree.sync()
    await engine.memory.set_meta(COMMANDS_HASH, digest)
    log.info("slash commands synced")
    return True


def _allowed(settings: BotSettings, interaction: discord.Interaction) -> bool:
    channel = interaction.channel
    return allowed(
        settings,
        interaction.user.id,
        interaction.guild_id,
        getattr(channel, "parent_id", None) or interaction.channel_id,
    )


class NotManager(app_commands.CheckFailure):
    """Changing a channel's memory needs Manage Channels or Manage Server."""


def _may_change(interaction: discord.Interaction) -> bool:
    if _is_manager(interaction):
        return True
    raise NotManager()


def _is_manager(interaction: discord.Interaction) -> bool:
    """The DM's owner, or in a server someone who may manage the channel."""
    perms = interaction.permissions
    return interaction.guild is None or perms.manage_channels or perms.manage_guild or perms.administrator


# in guilds, for commands that change memory; in DMs the user owns their agent
manager_only = app_commands.check(_may_change)


def _manages(interaction: discord.Interaction) -> bool:
    perms = interaction.permissions
    return interaction.guild is None or perms.manage_channels or perms.manage_guild or perms.administrator


def _when(stamp: str) -> str:
    # Discord shows the time in each reader's own time zone
    return f"<t:{int(events.parse_stamp(stamp).timestamp())}:f>"


def _again(repeat: str) -> str:
    return "" if repeat == "none" else f" ({repeat})"


def _key(interaction: discord.Interaction) -> str:
    return agent_key(interaction.channel, interaction.user)


async def _answer(interaction: discord.Interaction, text: str, *, filename: str = "memory.md") -> None:
    """Send after defer(); text too long for a message goes as a file."""
    if len(text) <= EPHEMERAL_LIMIT:
        await interaction.followup.send(text, ephemeral=True)
    else:
        head = text[: EPHEMERAL_LIMIT - 60].rsplit("\n", 1)[0]
        await interaction.followup.send(
            head + "\n… (the whole text is attached)",
            ephemeral=True,
            file=discord.File(io.BytesIO(text.encode()), filename=filename),
        )


class MemoryCommands(app_commands.Group):
    def __init__(self, engine: Engine, settings: BotSettings, gate: Gate) -> None:
        super().__init__(name="memory", description="Look into this conversation's long-term memory")
        self.engine = engine
        self.memory = engine.memory
        self.settings = settings
        self.gate = gate

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return _allowed(self.settings, interaction) and await self.gate(interaction)

    @app_commands.command(description="Core memory, summary, counts and context usage")
    async def view(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        v = await self.memory.view(_key(interaction))
        lines = [f"**Memory of `{v.key}`**"]
        for b in v.blocks:
            lines.append(f"__{b.label}__ ({len(b.value)}/{b.limit} characters)\n{b.value or '*(empty)*'}")
        if interaction.guild is not None:  # the caller's own person block; others' are not shown
            mine = await self.memory.person_block(v.key, str(interaction.user.id))
            lines.append(f"__about you__ (`/memory clear-person` empties it)\n{mine or '*(empty)*'}")
        lines.append(f"__summary__\n{v.summary or '*(none yet)*'}")
        lines.append(
            f"Recall: {v.messages} messages ({v.in_context} in context). Archival: {v.passages} passages.\n"
            f"Context window: {v.context_tokens}/{v.context_window} tokens ({v.context_tokens / v.context_window:.0%}).\n"
            f"Model usage: {v.model_calls} calls, {v.tokens_in} tokens in, {v.tokens_out} out."
            + (f"\n⚠ Model server: {v.model_warning}" if v.model_warning else "")
        )
        await _answer(interaction, "\n\n".join(lines))

    @app_commands.command(description="Search past messages and archival memory")
    @app_commands.describe(query="words to look for")
    async def search(self, interaction: discord.Interaction, query: app_commands.Range[str, 1, 500]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        found = await self.memory.search(_key(interaction), query)
        lines = [f"**Messages** ({found.messages.total} matches)"]
        lines += [f"`m{h.id}` {h.created_at[:10]} {h.label}: {_clip(h.text)}" for h in found.messages.hits] or ["*(none)*"]
        if _is_manager(interaction):
            lines.append(
                f"**Archival passages** ({found.passages.total} {'matches' if not found.passages.note else 'best matches'})"
            )
            lines += [f"`p{h.id}` {h.created_at[:10]}: {_clip(h.text)}" for h in found.passages.hits] or ["*(none)*"]
        else:  # the agent's notes may be about other people
            lines.append("*(Archival passages, the notes I keep, are shown to channel managers only.)*")
        lines.append("Use `/memory forget m123` or `p45` to delete one.")
        await _answer(interaction, "\n".join(lines))

    # a channel's memory holds every stored message with author ids and the agent's notes on people
    @manager_only
    @app_commands.command(description="Download this conversation's whole memory as JSON")
    async def export(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        key = _key(interaction)
        payload = json.dumps(await self.memory.export(key), ensure_ascii=False, indent=1).encode()
        name = f"mnemocord-{key.replace(':', '-')}.json"
        await interaction.followup.send(
            f"The whole memory of `{key}` ({len(payload) / 1e3:.0f} kB). `mnemocord import {name}` loads it into another bot.",
            file=discord.File(io.BytesIO(payload), filename=name),
            ephemeral=True,
        )

    @app_commands.command(description="Scheduled events (reminders) here; cancel one by its number")
    @app_commands.describe(cancel="the number of a pending event to cancel (its setter or channel managers)")
    async def events(self, interaction: discord.Interaction, cancel: app_commands.Range[int, 1, 2**53] | None = None) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        key = _key(interaction)
        if cancel is None:
            pending = await self.memory.events(key)
            lines = [f"**Pending events of `{key}`** ({len(pending)})"]
            lines += [
                f"`#{e.id}` {_when(e.due_at)}{_again(e.repeat)}, set by {e.set_by or '?'}: {_clip(e.note)}" for e in pending
            ]
            if pending:
                lines.append("`/memory events cancel:<number>` cancels one.")
            await _answer(interaction, "\n".join(lines) if pending else "No events are pending here.")
            return
        event = await self.memory.event(key, cancel)
        if event is None or event.state != "pending":
            text = f"There is no pending event #{cancel} here."
        elif event.set_by_id != str(interaction.user.id) and not _manages(interaction):
            text = f"Only the person who set event #{cancel}, or someone with Manage Channels, can cancel it."
        elif await self.memory.cancel_event(key, cancel):
            text = f"Cancelled event #{cancel}: {_clip(event.note)}"
        else:  # it fired or was cancelled meanwhile
            text = f"Event #{cancel} is no longer pending."
        await interaction.followup.send(text, ephemeral=True)

    @app_commands.command(name="clear-person", description="Empty what I keep about you here (managers: about anyone)")
    @app_commands.describe(person="whose block to empty (default: yours; someone else's needs Manage Channels)")
    async def clear_person(self, interaction: discord.Interaction, person: discord.User | None = None) -> None:
        if interaction.guild is None:
            await interaction.response.send_message(
                "In DMs I keep one block about you: `/memory reset core` empties it.", ephemeral=True
            )
            return
        target = person or interaction.user
        if target.id != interaction.user.id:
            _may_change(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        cleared = await self.memory.clear_person(_key(interaction), str(target.id))
        whose = "your" if target.id == interaction.user.id else f"{target.display_name}'s"
        await interaction.followup.send(
            f"Emptied {whose} block here." if cleared else f"{whose.capitalize()} block here was already empty.", ephemeral=True
        )

    @manager_only
    @app_commands.command(description="Delete messages or passages: ids from /memory search (m12, p3) or text")
    @app_commands.describe(target="m<id>, p<id> (several separated by spaces), or text the items contain")
    async def forget(self, interaction: discord.Interaction, target: app_commands.Range[str, 1, 500]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        key = _key(interaction)
        ids = parse_ids(target)
        if ids:
            removed_m, removed_p = await self.memory.forget(key, *ids)
            await interaction.followup.send(f"Forgot {removed_m} messages and {removed_p} passages.", ephemeral=True)
            return
        found = await self.memory.find(key, target)
        if not found.message_ids and not found.passage_ids:
            await interaction.followup.send("Nothing in memory contains that text.", ephemeral=True)
            return

        async def forget_them() -> str:
            m, p = await self.memory.forget(key, found.message_ids, found.passage_ids)
            return f"Forgot {m} messages and {p} passages."

        await interaction.followup.send(
            f"Forget {len(found.message_ids)} messages and {len(found.passage_ids)} passages containing “{_clip(target, 80)}”?",
            view=Confirm(interaction.user.id, forget_them),
            ephemeral=True,
        )

    @manager_only
    @app_commands.command(description="Erase memory, after a confirmation")
    @app_commands.describe(scope="what to erase (default: all)")
    async def reset(
        self, interaction: discord.Interaction, scope: Literal["conversation", "core", "archival", "all"] = "all"
    ) -> None:
        key = _key(interaction)
        done = f"Done: {EXPLAIN[scope]} of `{key}` erased."
        view = await confirm.ask(self.engine, interaction.user.id, "reset", {"key": key, "scope": scope, "done": done})
        await interaction.response.send_message(
            f"Erase {EXPLAIN[scope]} of `{key}`? This cannot be undone (`/memory export` first to keep a copy). "
            + confirm.EXPIRY_NOTE,
            view=view,
            ephemeral=True,
        )


@confirm.action("reset")
async def _confirmed_reset(engine: Engine, args: dict[str, Any]) -> str:
    await engine.memory.reset(args["key"], args["scope"])
    return str(args["done"])


NOT_ALLOWED = "Changing a channel's memory needs the Manage Channels or Manage Server permission."
EXPLAIN = {
    "conversation": "the conversation history and summary",
    "core": "the core memory blocks",
    "archival": "the archival memory",
    "all": "all memory",
}


class AdminCommands(app_commands.Group):
    def __init__(self, engine: Engine, settings: BotSettings, gate: Gate) -> None:
        super().__init__(
            name="memory-admin",
            description="Change how the bot behaves in this conversation",
            default_permissions=discord.Permissions(manage_channels=True),
        )
        self.memory = engine.memory
        self.settings = settings
        self.gate = gate

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return _allowed(self.settings, interaction) and await self.gate(interaction)

    @manager_only
    @app_commands.command(description="Replace the bot's persona in this conversation")
    @app_commands.describe(text="who the bot is and how it speaks")
    async def persona(self, interaction: discord.Interaction, text: app_commands.Range[str, 1, 2000]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send(await self.memory.set_block(_key(interaction), "persona", text), ephemeral=True)

    @manager_only
    @app_commands.command(description="Answer every message in this channel, not only mentions and replies")
    @app_commands.describe(enabled="on: answer everything; off: only mentions and replies")
    async def listen(self, interaction: discord.Interaction, enabled: bool) -> None:
        if interaction.guild is None:
            await interaction.response.send_message("In DMs I always answer.", ephemeral=True)
            return
        await self.memory.set_listening(_key(interaction), enabled)
        state = "every message here" if enabled else "only mentions and replies here"
        await interaction.response.send_message(f"Listen mode {'on' if enabled else 'off'}: I answer {state}.")


class Confirm(discord.ui.View):
    """Confirm / Cancel buttons that only the person who asked can press."""

    def __init__(self, owner_id: int, action: Callable[[], Awaitable[str]], timeout: float = 120) -> None:
        super().__init__(timeout=timeout)
        self.owner_id = owner_id
        self.action = action

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.owner_id:
            await interaction.response.send_message("Only the person who asked can confirm this.", ephemeral=True)
            return False
        return True

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        if self.is_finished():  # a second click while the first is being handled
            return
        self.stop()
        await interaction.response.defer()
        result = await self.action()
        await interaction.edit_original_response(content=result, view=None)

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.stop()
        await interaction.response.edit_message(content="Cancelled; nothing was erased.", view=None)


def _clip(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
