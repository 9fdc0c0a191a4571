"""The Discord client: turns messages into agent turns and replies."""

from __future__ import annotations

import asyncio
import logging

import discord
from discord import app_commands

from memory import clock, recall
from memory.documents import Unreadable
from memory.engine import Engine

from . import attachments, commands
from .access import RateLimiter, allowed
from .config import BotSettings
from .format import split_message
from .routing import agent_key, is_addressed, is_ignored

log = logging.getLogger(__name__)

# Typing shows only for turns still running after this long: a quick answer needs no
# indicator, and skipping it saves a REST call per turn (a product choice, not a limit).
TYPING_AFTER = 1.0


class MnemoBot(discord.Client):
    def __init__(self, settings: BotSettings, engine: Engine, *, sync_commands: bool = True) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = True
        super().__init__(
            intents=intents,
            # model output must never ping @everyone, roles or users
            allowed_mentions=discord.AllowedMentions.none(),
            guild_ready_timeout=0.5,
            # replies come from the gateway payload; the message cache would only cost memory
            max_messages=None,
        )
        self.settings = settings
        self.engine = engine
        self.sync_commands = sync_commands
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self.tree = app_commands.CommandTree(self)
        commands.register(self.tree, engine, settings)
        self.closing = False
        self.stopped = False
        self._handlers: set[asyncio.Task[object]] = set()

    async def setup_hook(self) -> None:
        if self.sync_commands:
            try:
                await commands.sync_if_changed(self.tree, self.engine, self.application_id)
            except discord.HTTPException as exc:  # chat still works without slash commands
                log.warning("could not register slash commands (%s); try `mnemocord sync` later", exc)

    async def on_ready(self) -> None:
        assert self.user is not None
        log.info("connected as %s (%s) to %d guilds", self.user, self.user.id, len(self.guilds))

    async def drain(self) -> None:
        """Stop answering, and wait until the messages being handled are answered or kept."""
        self.closing = True
        while self._handlers:
            await asyncio.gather(*list(self._handlers), return_exceptions=True)
        self.stopped = True  # no await since the loop: nothing can slip in before the engine closes

    async def on_message(self, message: discord.Message) -> None:
        me = self.user
        if self.stopped or me is None or is_ignored(message, me):
            return
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        channel_id = getattr(message.channel, "parent_id", None) or message.channel.id  # a thread counts as its channel
        if not allowed(self.settings, message.author.id, message.guild.id if message.guild else None, channel_id):
            return
        key = agent_key(message.channel, message.author)
        stored = recall.Message(
            role="user",
            content=message.clean_content,
            author=message.author.display_name,
            author_id=str(message.author.id),
            external_id=str(message.id),
            created_at=clock.stamp(message.created_at),
        )
        if not (is_addressed(message, me) or await self.engine.memory.listening(key)):
            if self.settings.store_unaddressed_messages and stored.content:
                await self.engine.record(key, stored)
            return
        if self.closing:  # shutting down: keep it; the first turn after the restart sees it
            await self.engine.record(key, stored)
            return
        wait = self.limiter.check(message.author.id)
        if wait:
            await self.engine.record(key, stored)  # kept, just not answered
            if self.limiter.should_warn(message.author.id):
                await self._send(message, f"You're sending messages faster than I can think. Try again in {wait:.0f} s.")
            return
        for attachment in message.attachments:
            note = await self._ingest(message, key, attachment)
            if note:
                stored.content += ("\n" if stored.content else "") + note
        if not stored.content.strip():
            return
        # the indicator runs beside the turn: its REST calls must not delay the answer
        typing = asyncio.create_task(self._typing(message.channel))
        try:
            result = await self.engine.send(key, stored)
        finally:
            typing.cancel()
        if result.reply:
            await self._send(message, result.reply)

    async def _ingest(self, message: discord.Message, key: str, attachment: discord.Attachment) -> str:
        """Read an attachment into archival memory; returns the note for the agent."""
        try:
            attachments.check(attachment, self.settings.max_attachment_bytes)
            progress = await self._send(message, f"Reading `{attachment.filename}`…")
            ingested = await self.engine.memory.ingest(
                key, attachment.filename, await attachment.read(), content_type=attachment.content_type,
                source=f"discord attachment {attachment.id}",
            )
        except Unreadable as exc:
            await self._send(message, str(exc))
            return f"[{message.author.display_name} attached `{attachment.filename}`, which could not be read: {exc}]"
        except discord.HTTPException as exc:
            await self._send(message, f"I couldn't download `{attachment.filename}`; please try again.")
            log.warning("attachment download failed: %s", exc)
            return ""
        if progress:
            try:
                await progress.edit(content=f"Saved `{attachment.filename}` to my archival memory ({ingested.passages} passages).")
            except discord.HTTPException:
                pass
        return ingested.note

    async def _typing(self, channel: discord.abc.Messageable) -> None:
        await asyncio.sleep(TYPING_AFTER)
        try:
            async with channel.typing():
                await asyncio.Event().wait()  # until cancelled
        except discord.HTTPException as exc:
            log.debug("typing indicator failed in %s: %s", getattr(channel, "id", "?"), exc)

    async def _send(self, message: discord.Message, text: str) -> discord.Message | None:
        """Reply in parts; the reference tolerates a deleted original."""
        first: discord.Message | None = None
        try:
            for i, part in enumerate(split_message(text)):
                sent = await message.channel.send(
                    part, reference=message.to_reference(fail_if_not_exists=False) if i == 0 else None
                )
                first = first or sent
        except discord.HTTPException as exc:
            log.warning("could not send to channel %s: %s", message.channel.id, exc)
        return first

