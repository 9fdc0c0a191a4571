"""The Discord client: turns messages into agent turns and replies."""

from __future__ import annotations

import asyncio
import io
import logging

import aiohttp
import discord
from discord import app_commands

from memory import clock, recall
from memory.documents import Unreadable
from memory.engine import Engine

from . import attachments, commands, wire
from .access import Arrivals, Members, RateLimiter, Ticket, allowed
from .config import BotSettings
from .format import split_message, spoiler
from .routing import agent_key, is_addressed, is_ignored

log = logging.getLogger(__name__)

# Typing shows only for turns still running after this long: a quick answer needs no
# indicator, and skipping it saves a REST call per turn (a product choice, not a limit).
TYPING_AFTER = 1.0


class MnemoBot(discord.Client):
    def __init__(self, settings: BotSettings, engine: Engine, *, sync_commands: bool = True) -> None:
        wire.install()
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
        self.members = Members(self._is_member)
        self.arrivals = Arrivals()
        self.tree = app_commands.CommandTree(self)
        commands.register(self.tree, engine, settings)
        self.closing = False
        self.stopped = False
        self._in_flight: set[asyncio.Task[object]] = set()

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
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        self.stopped = True  # no await since the loop: nothing can slip in before the engine closes

    async def on_message(self, message: discord.Message) -> None:
        """Handles one message; dispatches `message_handled(message, outcome)` when done with it."""
        me = self.user
        if self.stopped or me is None:
            return
        if is_ignored(message, me):
            self.dispatch("message_handled", message, "ignored")
            return
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        key = agent_key(message.channel, message.author)
        ticket = self.arrivals.take(key)  # before any await: handlers start in gateway order
        outcome = "failed"
        try:
            outcome = await self._handle(message, me, key, ticket)
        finally:
            ticket.release()
            self.dispatch("message_handled", message, outcome)

    async def _handle(self, message: discord.Message, me: discord.ClientUser, key: str, ticket: Ticket) -> str:
        channel_id = getattr(message.channel, "parent_id", None) or message.channel.id  # a thread counts as its channel
        if not allowed(self.settings, message.author.id, message.guild.id if message.guild else None, channel_id):
            return "refused"
        if message.guild is None and not await self._dm_admitted(message.author.id):
            return "refused"
        stored = recall.Message(
            role="user",
            content=message.clean_content,
            author=message.author.display_name,
            author_id=str(message.author.id),
            external_id=str(message.id),
            created_at=clock.stamp(message.created_at),
        )
        # the engine stores a message at the call only for an agent it has loaded; loaded here, while
        # earlier messages may still be in hand, the call below needs no await before storing
        await self.engine.agent(key)
        if not (is_addressed(message, me) or await self.engine.memory.listening(key)):
            if not (self.settings.store_unaddressed_messages and stored.content):
                return "dropped"
            await ticket.handover()
            await self.engine.record(key, stored)
            return "recorded"
        if self.closing:  # shutting down: keep it; the first turn after the restart sees it
            await ticket.handover()
            await self.engine.record(key, stored)
            return "recorded"
        wait = self.limiter.check(message.author.id)
        if wait:
            await ticket.handover()
            await self.engine.record(key, stored)  # kept, just not answered
            if self.limiter.should_warn(message.author.id):
                await self._send(message, f"You're sending messages faster than I can think. Try again in {wait:.0f} s.")
            return "limited"
        # documents are read before the message is handed over, as the message's note mentions them;
        # later messages of this conversation wait for that
        await ticket.wait()
        for attachment in message.attachments:
            note = await self._ingest(message, key, attachment)
            if note:
                stored.content += ("\n" if stored.content else "") + note
        if not stored.content.strip():
            return "dropped"
        # the indicator runs beside the turn: its REST calls must not delay the answer
        typing = asyncio.create_task(self._typing(message.channel))
        ticket.release()
        try:
            result = await self.engine.send(key, stored)
        finally:
            typing.cancel()
        if result.reply:
            await self._send(message, result.reply)
        if result.thinking and self.settings.show_reasoning != "off":
            await self._show_reasoning(message, result.thinking)
        return "answered"

    async def _show_reasoning(self, message: discord.Message, thinking: str) -> None:
        """The model's thinking, on the operator's request (SHOW_REASONING)."""
        try:
            if self.settings.show_reasoning == "file":
                await message.channel.send(file=discord.File(io.BytesIO(thinking.encode()), filename="reasoning.txt"))
            else:
                for part in spoiler(thinking):
                    await message.channel.send(part)
        except discord.HTTPException as exc:
            log.warning("could not send the reasoning to channel %s: %s", message.channel.id, exc)

    async def _dm_admitted(self, user_id: int) -> bool:
        if self.settings.dm_policy != "members":
            return True
        guild_ids = set(self.settings.allowed_guilds)
        for channel_id in self.settings.allowed_channels:  # the servers an allowed channel is in
            channel = self.get_channel(channel_id)
            if isinstance(channel, discord.abc.GuildChannel):
                guild_ids.add(channel.guild.id)
        try:
            return await self.members.any_of(user_id, guild_ids)
        except (TimeoutError, discord.HTTPException, aiohttp.ClientError) as exc:
            # not remembered: the next DM asks again
            log.warning("could not check whether DM sender %s is a member (%s); not answering", user_id, exc)
            return False

    async def _is_member(self, guild_id: int, user_id: int) -> bool:
        try:
            await self.http.get_member(guild_id, user_id)
        except (discord.NotFound, discord.Forbidden):  # not a member, or a guild the bot is not in
            return False
        return True

    async def _ingest(self, message: discord.Message, key: str, attachment: discord.Attachment) -> str:
        """Read an attachment into archival memory; returns the note for the agent."""
        try:
            attachments.check(attachment, self.settings.max_attachment_bytes)
            progress = await self._send(message, f"Reading `{attachment.filename}`…")
            ingested = await self.engine.memory.ingest(
                key,
                attachment.filename,
                await attachment.read(),
                content_type=attachment.content_type,
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
                await progress.edit(
                    content=f"Saved `{attachment.filename}` to my archival memory ({ingested.passages} passages)."
                )
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
            for part in split_message(text):
                if first is None:
                    first = await message.channel.send(part, reference=message.to_reference(fail_if_not_exists=False))
                else:
                    await message.channel.send(part)
        except discord.HTTPException as exc:
            log.warning("could not send to channel %s: %s", message.channel.id, exc)
        return first
