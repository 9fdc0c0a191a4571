"""Slash commands: inspect, search, export, forget and reset an agent's memory.

In a guild the agent belongs to the channel, so changing it (reset, forget,
persona, listen mode) needs Manage Channels or Manage Server. Discord applies
default permissions per top-level command only, so `/memory-admin` carries
them as a default and every command that changes memory checks in code too.
In DMs the user owns their agent.
"""

from __future__ import annotations

import io
import json
import logging
import re
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands

from memory import context, core, portability, recall
from memory.agents import Agent, default_blocks

from .access import allowed
from .routing import agent_key

if TYPE_CHECKING:
    from .client import MnemoBot

EPHEMERAL_LIMIT = 1900
log = logging.getLogger(__name__)


def register(tree: app_commands.CommandTree, bot: MnemoBot) -> None:
    tree.add_command(MemoryCommands(bot))
    tree.add_command(AdminCommands(bot))

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


def _allowed(bot: MnemoBot, interaction: discord.Interaction) -> bool:
    channel = interaction.channel
    return allowed(
        bot.settings, interaction.user.id, interaction.guild_id,
        getattr(channel, "parent_id", None) or interaction.channel_id,
    )


class NotManager(app_commands.CheckFailure):
    """Changing a channel's memory needs Manage Channels or Manage Server."""


def _may_change(interaction: discord.Interaction) -> bool:
    perms = interaction.permissions
    if interaction.guild is None or perms.manage_channels or perms.manage_guild or perms.administrator:
        return True
    raise NotManager()


# in guilds, for commands that change memory; in DMs the user owns their agent
manager_only = app_commands.check(_may_change)


async def _agent(bot: MnemoBot, interaction: discord.Interaction) -> tuple[str, Agent]:
    key = agent_key(interaction.channel, interaction.user)
    return key, await bot.engine.agent(key)


async def _answer(interaction: discord.Interaction, text: str, *, filename: str = "memory.md") -> None:
    """Send after defer(); text too long for a message goes as a file."""
    if len(text) <= EPHEMERAL_LIMIT:
        await interaction.followup.send(text, ephemeral=True)
    else:
        head = text[: EPHEMERAL_LIMIT - 60].rsplit("\n", 1)[0]
        await interaction.followup.send(
            head + "\n… (the whole text is attached)", ephemeral=True,
            file=discord.File(io.BytesIO(text.encode()), filename=filename),
        )


class MemoryCommands(app_commands.Group):
    def __init__(self, bot: MnemoBot) -> None:
        super().__init__(name="memory", description="Look into this conversation's long-term memory")
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return _allowed(self.bot, interaction)

    @app_commands.command(description="Core memory, summary, counts and context usage")
    async def view(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        key, agent = await _agent(self.bot, interaction)
        engine = self.bot.engine
        db = engine.db
        prompt = await context.build(db, agent, engine.settings.context_window)
        row = await db.fetchone("SELECT summary, tokens_in, tokens_out, model_calls FROM agents WHERE id = ?", (agent.id,))
        messages = await recall.count(db, agent)
        passages = await engine.archive.count(agent)
        window = engine.settings.context_window
        lines = [f"**Memory of `{key}`**"]
        for b in await core.blocks(db, agent):
            lines.append(f"__{b.label}__ ({len(b.value)}/{b.limit} characters)\n{b.value or '*(empty)*'}")
        lines.append(f"__summary__\n{row['summary'] or '*(none yet)*'}")
        lines.append(
            f"Recall: {messages} messages ({len(prompt.history)} in context). Archival: {passages} passages.\n"
            f"Context window: {prompt.tokens}/{window} tokens ({prompt.tokens / window:.0%}).\n"
            f"Model usage: {row['model_calls']} calls, {row['tokens_in']} tokens in, {row['tokens_out']} out."
        )
        await _answer(interaction, "\n\n".join(lines))

    @app_commands.command(description="Search past messages and archival memory")
    @app_commands.describe(query="words to look for")
    async def search(self, interaction: discord.Interaction, query: app_commands.Range[str, 1, 500]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        _, agent = await _agent(self.bot, interaction)
        found_messages = await recall.search_messages(self.bot.engine.db, agent, query)
        found_passages = await self.bot.engine.archive.search(agent, query)
        lines = [f"**Messages** ({found_messages.total} matches)"]
        lines += [f"`m{h.id}` {h.created_at[:10]} {h.label}: {_clip(h.text)}" for h in found_messages.hits] or ["*(none)*"]
        lines.append(f"**Archival passages** ({found_passages.total} {'matches' if not found_passages.note else 'best matches'})")
        lines += [f"`p{h.id}` {h.created_at[:10]}: {_clip(h.text)}" for h in found_passages.hits] or ["*(none)*"]
        lines.append("Use `/memory forget m123` or `p45` to delete one.")
        await _answer(interaction, "\n".join(lines))

    @app_commands.command(description="Download this conversation's whole memory as JSON")
    async def export(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        key, agent = await _agent(self.bot, interaction)
        data = await portability.export_agent(self.bot.engine, agent)
        payload = json.dumps(data, ensure_ascii=False, indent=1).encode()
        name = f"mnemocord-{key.replace(':', '-')}.json"
        await interaction.followup.send(
            f"The whole memory of `{key}` ({len(payload) / 1e3:.0f} kB). `mnemocord import {name}` loads it into another bot.",
            file=discord.File(io.BytesIO(payload), filename=name), ephemeral=True,
        )

    @manager_only
    @app_commands.command(description="Delete messages or passages: ids from /memory search (m12, p3) or text")
    @app_commands.describe(target="m<id>, p<id> (several separated by spaces), or text the items contain")
    async def forget(self, interaction: discord.Interaction, target: app_commands.Range[str, 1, 500]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        key, agent = await _agent(self.bot, interaction)
        engine = self.bot.engine
        ids = re.findall(r"\b([mp])#?(\d{1,18})\b", target.lower())
        if ids and re.fullmatch(r"(\s*[mp]#?\d{1,18}\s*,?)+", target.lower()):
            async with engine.lock(key):
                removed_m = await recall.delete(engine.db, agent, [int(n) for k, n in ids if k == "m"])
                removed_p = await engine.archive.delete(agent, [int(n) for k, n in ids if k == "p"])
                engine.forgotten(key)
            await interaction.followup.send(f"Forgot {removed_m} messages and {removed_p} passages.", ephemeral=True)
            return
        pattern = f"%{_escape_like(target)}%"
        # replies live in the arguments of send_message calls, so tool_calls is searched too
        message_ids = [r[0] for r in await engine.db.fetchall(
            "SELECT id FROM messages WHERE agent_id = ?1 AND (content LIKE ?2 ESCAPE '\\' OR tool_calls LIKE ?2 ESCAPE '\\')",
            (agent.id, pattern))]
        passage_ids = [r[0] for r in await engine.db.fetchall(
            "SELECT id FROM passages WHERE agent_id = ? AND content LIKE ? ESCAPE '\\'", (agent.id, pattern))]
        if not message_ids and not passage_ids:
            await interaction.followup.send("Nothing in memory contains that text.", ephemeral=True)
            return

        async def forget_them() -> str:
            async with engine.lock(key):
                m = await recall.delete(engine.db, agent, message_ids)
                p = await engine.archive.delete(agent, passage_ids)
                engine.forgotten(key)
            return f"Forgot {m} messages and {p} passages."

        await interaction.followup.send(
            f"Forget {len(message_ids)} messages and {len(passage_ids)} passages containing “{_clip(target, 80)}”?",
            view=Confirm(interaction.user.id, forget_them), ephemeral=True,
        )

    @manager_only
    @app_commands.command(description="Erase memory, after a confirmation")
    @app_commands.describe(scope="what to erase (default: all)")
    async def reset(
        self, interaction: discord.Interaction, scope: Literal["conversation", "core", "archival", "all"] = "all"
    ) -> None:
        key, agent = await _agent(self.bot, interaction)
        engine = self.bot.engine

        async def do_reset() -> str:
            async with engine.lock(key):
                await erase()
                engine.forgotten(key)
            return f"Done: {EXPLAIN[scope]} of `{key}` erased."

        async def erase() -> None:
            if scope in ("conversation", "all"):
                await recall.clear(engine.db, agent)
            if scope in ("core", "all"):
                for label, value, _, _ in default_blocks(key, engine.settings):
                    await core.set_value(engine.db, agent, label, value)
            if scope in ("archival", "all"):
                await engine.archive.clear(agent)

        await interaction.response.send_message(
            f"Erase {EXPLAIN[scope]} of `{key}`? This cannot be undone (`/memory export` first to keep a copy).",
            view=Confirm(interaction.user.id, do_reset), ephemeral=True,
        )


NOT_ALLOWED = "Changing a channel's memory needs the Manage Channels or Manage Server permission."
EXPLAIN = {
    "conversation": "the conversation history and summary",
    "core": "the core memory blocks",
    "archival": "the archival memory",
    "all": "all memory",
}


class AdminCommands(app_commands.Group):
    def __init__(self, bot: MnemoBot) -> None:
        super().__init__(
            name="memory-admin",
            description="Change how the bot behaves in this conversation",
            default_permissions=discord.Permissions(manage_channels=True),
        )
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return _allowed(self.bot, interaction)

    @manager_only
    @app_commands.command(description="Replace the bot's persona in this conversation")
    @app_commands.describe(text="who the bot is and how it speaks")
    async def persona(self, interaction: discord.Interaction, text: app_commands.Range[str, 1, 2000]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        _, agent = await _agent(self.bot, interaction)
        await interaction.followup.send((await core.set_value(self.bot.engine.db, agent, "persona", text)).text, ephemeral=True)

    @manager_only
    @app_commands.command(description="Answer every message in this channel, not only mentions and replies")
    @app_commands.describe(enabled="on: answer everything; off: only mentions and replies")
    async def listen(self, interaction: discord.Interaction, enabled: bool) -> None:
        if interaction.guild is None:
            await interaction.response.send_message("In DMs I always answer.", ephemeral=True)
            return
        key = agent_key(interaction.channel, interaction.user)
        await self.bot.set_listening(key, enabled)
        state = "every message here" if enabled else "only mentions and replies here"
        await interaction.response.send_message(f"Listen mode {'on' if enabled else 'off'}: I answer {state}.")


class Confirm(discord.ui.View):
    """Confirm / Cancel buttons that only the person who asked can press."""

    def __init__(self, owner_id: int, action, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
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


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
