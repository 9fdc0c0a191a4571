"""The Discord client: turns messages into agent turns and replies."""

from __future__ import annotations

import asyncio
import datetime
import gc
import io
import logging
from collections import OrderedDict
from typing import Any

import aiohttp
import discord
from discord import app_commands

from memory import clock, events, images, recall
from memory.db import StorageError, StorageFull
from memory.documents import Unreadable
from memory.engine import Engine

from . import attachments, commands, confirm, wire
from .access import Arrivals, Members, RateLimiter, Ticket, allowed
from .config import BotSettings
from .format import split_message, spoiler
from .routing import agent_key, is_addressed, is_ignored
from .streaming import StreamedReply

log = logging.getLogger(__name__)

# Discord message ids handled by this process, remembered so catch-up and the gateway never both take one
SEEN_IDS = 10_000
# what a reply to a message sent while the bot was down starts with
LATE = "*(late: I was offline when you wrote this)*\n"

# Typing shows only for turns still running after this long: a quick answer needs no
# indicator, and skipping it saves a REST call per turn (a product choice, not a limit).
TYPING_AFTER = 1.0
# allocations between two passes of the garbage collector over young objects (Python's default: 700)
GC_YOUNG_OBJECTS = 50_000
NOT_STORED_FULL = "Sorry, I couldn't keep your message: my storage is full. The bot's operator has to free disk space."
NOT_STORED = "Sorry, I couldn't keep your message because of a storage problem on my side. Please try again later."


class Typing:
    """Discord's typing indicator, for a turn still running after TYPING_AFTER. It runs beside the
    turn, so its REST calls never delay the answer; a timer starts it, as most turns end sooner."""

    def __init__(self, channel: discord.abc.Messageable) -> None:
        self._channel = channel
        self._timer = asyncio.get_running_loop().call_later(TYPING_AFTER, self._start)
        self._task: asyncio.Task[None] | None = None

    def stop(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()

    def _start(self) -> None:
        self._task = asyncio.create_task(self._show())

    async def _show(self) -> None:
        try:
            async with self._channel.typing():
                await asyncio.Event().wait()  # until stopped
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.debug("typing indicator failed in %s: %s", getattr(self._channel, "id", "?"), exc)


class MnemoBot(discord.AutoShardedClient):
    """One process holding every shard (SHARD_COUNT, else as many as Discord recommends): Discord
    refuses a bot in more than 2,500 servers that does not shard."""

    def __init__(self, settings: BotSettings, engine: Engine, *, sync_commands: bool = True) -> None:
        wire.install()
        # the bot never joins voice: discord.py's warnings that voice is unsupported would open every start's log
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
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
            shard_count=settings.shard_count,
        )
        self.settings = settings
        self.engine = engine
        self.sync_commands = sync_commands
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self.members = Members(self._is_member)
        self.arrivals = Arrivals()
        self.tree = app_commands.CommandTree(self)
        commands.register(self.tree, engine, settings, self._takes)
        # confirmation buttons sent by an earlier process still answer
        self.add_dynamic_items(confirm.ConfirmButton)
        self.closing = False
        self.stopped = False
        self._in_flight: set[asyncio.Task[object]] = set()
        self._seen: OrderedDict[int, None] = OrderedDict()
        # Discord message ids deleted lately: a message deleted while its attachments were read is not stored
        self._gone: OrderedDict[int, None] = OrderedDict()
        self._edits: OrderedDict[int, str] = OrderedDict()  # edits of messages not stored yet: id -> text
        self._started = False  # on_ready's start-up done: it happens once, however many shards
        self._catching_up: set[asyncio.Task[None]] = set()  # held here so they are not garbage-collected

    async def setup_hook(self) -> None:
        self._skip_own_messages()
        # start-up's garbage (imports, settings, the database's opening) goes now, before the
        # gateway connects: a full collection takes ~40 ms, which on_ready would add to the first replies
        gc.collect()
        if self.sync_commands:
            try:
                await commands.sync_if_changed(self.tree, self.engine, self.application_id)
            except discord.HTTPException as exc:  # chat still works without slash commands
                log.warning("could not register slash commands (%s); try `mnemocord sync` later", exc)

    def _skip_own_messages(self) -> None:
        """Every message the bot posts comes back from the gateway, and nothing here reads it:
        it is dropped before discord.py builds a Message and schedules on_message for it, which
        cost as much as building the person's message it answered."""
        assert self.user is not None  # setup_hook runs after login
        me = str(self.user.id)
        parsers = self._connection.parsers
        parse = parsers["MESSAGE_CREATE"]

        def parse_message_create(data: Any) -> None:
            author = data.get("author") if isinstance(data, dict) else None
            if not (isinstance(author, dict) and author.get("id") == me):
                parse(data)

        parsers["MESSAGE_CREATE"] = parse_message_create

    async def on_ready(self) -> None:
        # every shard is connected. Later on_ready (every shard had to start a new session at once)
        # change nothing: on_shard_ready catches each one up.
        if self._started:
            return
        self._started = True
        assert self.user is not None
        log.info(
            "connected as %s (%s) to %d guilds on %d shards", self.user, self.user.id, len(self.guilds), self.shard_count or 1
        )
        # here, not in setup_hook: `mnemocord sync` logs in too, and must not fire events.
        # Events that came due while the bot was down fire now.
        await self.engine.events.start(self._deliver_event)
        self._start_catch_up(None)  # messages sent while the bot was down
        # start-up made most of the objects the process keeps (modules, discord.py's caches):
        # frozen, the collector's full passes skip them (they cost 50-70 ms each under load), and a
        # larger young generation lets a reply's short-lived objects go before a pass looks at them
        gc.freeze()
        gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])

    async def on_shard_ready(self, shard_id: int) -> None:
        # after the start, a shard's session that could not resume may have missed its conversations' messages
        if self._started:
            self._start_catch_up(shard_id)

    def _start_catch_up(self, shard_id: int | None) -> None:
        task = asyncio.create_task(self._catch_up(shard_id))
        self._catching_up.add(task)
        task.add_done_callback(self._catching_up.discard)

    async def _takes(self, interaction: discord.Interaction) -> bool:
        """Slash commands: none once shutting down, and in DMs the same rule as messages."""
        if self.closing:
            return False
        return interaction.guild_id is not None or await self._dm_admitted(interaction.user.id)

    def cancel_in_flight(self) -> None:
        """Shutdown's last resort, for handlers stuck on Discord: their messages are stored already."""
        for task in self._in_flight:
            task.cancel()

    async def drain(self) -> None:
        """Stop answering, and wait until the messages being handled are answered or kept."""
        self.closing = True
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        self.stopped = True  # no await since the loop: nothing can slip in before the engine closes

    async def on_message(self, message: discord.Message, late: bool = False) -> None:
        """Handles one message; dispatches `message_handled(message, outcome)` when done with it.

        `late`: read from history by catch-up, sent while the bot was down.
        """
        me = self.user
        if self.stopped or me is None or not self._first_sight(message.id):
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
            outcome = await self._handle(message, me, key, ticket, late)
        except StorageError as exc:  # the message was not accepted: nobody else will say so
            log.error("%s: message %s not stored: %s", key, message.id, exc)
            if is_addressed(message, me):
                full = isinstance(exc, StorageFull)
                await self._send(message, NOT_STORED_FULL if full else NOT_STORED)
        finally:
            ticket.release()
            self.dispatch("message_handled", message, outcome)

    async def _handle(
        self, message: discord.Message, me: discord.ClientUser, key: str, ticket: Ticket, late: bool = False
    ) -> str:
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
        if message.guild is not None:
            await self._note_guild(key, message.guild.id)
        # the engine stores a message at the call only for an agent it has loaded; loaded here, while
        # earlier messages may still be in hand, the call below needs no await before storing
        await self.engine.agent(key)
        if not (is_addressed(message, me) or await self.engine.memory.listening(key)):
            if not (
                self.settings.store_unaddressed_messages
                and (stored.content or any(map(attachments.is_image, message.attachments)))
            ):
                return "dropped"
            return await self._record(key, stored, message, ticket, "recorded")
        if self.closing:  # shutting down: keep it; the first turn after the restart sees it
            return await self._record(key, stored, message, ticket, "recorded")
        wait = self.limiter.check(message.author.id)
        if wait:
            if await self._record(key, stored, message, ticket, "limited") == "deleted":  # kept, just not answered
                return "deleted"
            if self.limiter.should_warn(message.author.id):
                await self._send(message, f"You're sending messages faster than I can think. Try again in {wait:.0f} s.")
            return "limited"
        # documents are read before the message is handed over, as the message's note mentions them;
        # later messages of this conversation wait for that
        await ticket.wait()
        for attachment in message.attachments:
            if attachments.is_image(attachment):
                continue
            note = await self._ingest(message, key, attachment)
            if note:
                stored.content += ("\n" if stored.content else "") + note
        pictures, stand_ins = await self._look(message)
        stored.content = "\n".join(part for part in (stored.content, *stand_ins) if part)
        if message.id in self._gone:  # deleted while its attachments were read: what they left goes too
            await self.engine.memory.message_deleted([str(message.id)])
            return "deleted"
        if message.id in self._edits:  # edited meanwhile: the new text, with the notes of its documents
            notes = stored.content[len(message.clean_content) :].lstrip("\n")
            stored.content = "\n".join(part for part in (self._edits.pop(message.id), notes) if part)
        if not stored.content.strip():
            return "dropped"
        typing = Typing(message.channel)
        streamed = (
            StreamedReply(message, self.settings.stream_edit_seconds, typing.stop) if self.settings.stream_replies else None
        )
        ticket.release()
        try:
            result = await self.engine.send(key, stored, pictures, on_text=streamed.update if streamed else None)
        except BaseException:
            if streamed:  # nothing half-written stays
                await asyncio.shield(streamed.finish(""))
            raise
        finally:
            typing.stop()
        reply = (LATE if late else "") + result.reply if result.reply else ""
        # shielded as above: a handler cancelled at shutdown must not leave the reply half-written
        shown = await asyncio.shield(streamed.finish(reply, result.full_reply)) if streamed else False
        if not shown and reply:
            await self._send(message, reply, whole=result.full_reply)
        if result.thinking and self.settings.show_reasoning != "off":
            await self._show_reasoning(message, result.thinking)
        return "answered late" if late else "answered"

    async def _record(self, key: str, stored: recall.Message, message: discord.Message, ticket: Ticket, outcome: str) -> str:
        """Store a message that is not answered, once the messages before it are in, as it is then:
        one deleted while it waited is not stored, one edited is stored with its new text."""
        await ticket.wait()
        if message.id in self._gone:
            return "deleted"
        text = self._edits.pop(message.id, stored.content)
        unseen = [attachments.stand_in(a, "") for a in filter(attachments.is_image, message.attachments)]
        stored.content = "\n".join(part for part in (text, *unseen) if part)
        ticket.release()
        await self.engine.record(key, stored)  # stores before its first await: nothing slips in between
        return outcome

    async def _deliver_event(self, key: str, result: events.Answer, event: events.Event) -> bool:
        """Post a scheduled event's answer where it was set; False when that place is gone or closed to the bot."""
        kind, _, raw = key.partition(":")
        if kind not in ("dm", "channel") or not raw.isdigit():
            return False
        setter = int(event.set_by_id) if event.set_by_id.isdigit() else 0
        try:
            channel: object
            if kind == "dm":
                user_id = int(raw)
                if not (allowed(self.settings, user_id, None, None) and await self._dm_admitted(user_id)):
                    return False
                user = self.get_user(user_id) or await self.fetch_user(user_id)
                channel = user.dm_channel or await user.create_dm()
            else:
                channel = self.get_channel(int(raw)) or await self.fetch_channel(int(raw))
                guild = getattr(channel, "guild", None)
                parent = getattr(channel, "parent_id", None) or int(raw)  # a thread counts as its channel
                if guild is None or not allowed(self.settings, setter, guild.id, parent):
                    return False
            if not isinstance(channel, discord.abc.Messageable):
                return False
            for part in split_message(result.reply or ""):
                await channel.send(part)
        except (discord.NotFound, discord.Forbidden) as exc:  # gone, or closed to the bot: for good
            log.warning("could not deliver event #%d to %s: %s", event.id, key, exc)
            return False
        return True  # other failures (5xx, rate limits, the network) raise: the scheduler tries again

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
                origin=str(message.id),
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

    async def _look(self, message: discord.Message) -> tuple[list[images.Image], list[str]]:
        """Download the images of a message the model may see; returns them, and the stand-in of each image
        for the message's text. What is not shown is said in one short reply."""
        pictures: list[images.Image] = []
        stand_ins: list[str] = []
        if not any(map(attachments.is_image, message.attachments)):
            return pictures, stand_ins
        problems: list[str] = []
        over: list[str] = []
        busy: list[str] = []
        limit = self.settings.max_images_per_message
        waiting = self.engine.image_bytes_waiting()
        for attachment in filter(attachments.is_image, message.attachments):
            if not self.engine.sees_images:  # no download: the model is told in words
                stand_ins.append(attachments.stand_in(attachment, "this model cannot see images"))
            elif len(pictures) >= limit:
                over.append(f"`{attachment.filename}`")
                stand_ins.append(attachments.stand_in(attachment, f"over the limit of {limit} images per message"))
            elif waiting + sum(len(p.data) for p in pictures) + attachment.size > self.settings.max_images_waiting_bytes:
                # checked before reading: the bytes of images waiting for turns are in memory, all at once
                busy.append(f"`{attachment.filename}`")
                stand_ins.append(attachments.stand_in(attachment, "too many images were waiting to be seen"))
            else:
                try:
                    picture = await attachments.read_image(attachment, self.settings.max_image_bytes)
                except images.Refused as exc:
                    problems.append(str(exc))
                    stand_ins.append(attachments.stand_in(attachment, exc.reason))
                else:
                    pictures.append(picture)
                    stand_ins.append(picture.stand_in())
        if over:
            problems.append(f"I look at up to {limit} images per message; I did not see {', '.join(over)}.")
        if busy:
            again = "it" if len(busy) == 1 else "them"
            problems.append(
                f"Too many images are waiting for me right now; I did not see {', '.join(busy)}. Send {again} again soon."
            )
        if problems:
            await self._send(message, "\n".join(problems))
        return pictures, stand_ins

    async def _send(self, message: discord.Message, text: str, *, whole: str | None = None) -> discord.Message | None:
        """Reply in parts; the reference tolerates a deleted original. `whole`, the text of a reply
        that was cut at MAX_REPLY_CHARS, goes with the last part as reply.txt."""
        first: discord.Message | None = None
        parts = split_message(text)
        try:
            for i, part in enumerate(parts):
                extra: dict[str, Any] = {}
                if first is None:
                    extra["reference"] = message.to_reference(fail_if_not_exists=False)
                if whole and i == len(parts) - 1:
                    extra["file"] = discord.File(io.BytesIO(whole.encode()), "reply.txt")
                sent = await message.channel.send(part, **extra)
                first = first or sent
        except discord.HTTPException as exc:
            log.warning("could not send to channel %s: %s", message.channel.id, exc)
        return first

    # --- stored copies follow Discord: edits, deletes, deleted channels (memory/erasure.py) ---

    async def _note_guild(self, key: str, guild_id: int) -> None:
        """Remember which server a channel agent belongs to, for `mnemocord purge --guild` (once per agent: cached)."""
        if await self.engine.memory.option(key, "guild") != str(guild_id):
            await self.engine.memory.set_option(key, "guild", str(guild_id))

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        # Discord also sends updates without content (link embeds appearing): those change no text
        if "content" not in payload.data or self.stopped:
            return
        message = payload.message
        try:
            changed = await self.engine.memory.message_edited(str(payload.message_id), message.clean_content)
        except Exception:
            log.exception("could not apply the edit of message %s", payload.message_id)
            changed = 0
        if not changed:  # maybe not stored yet (waiting behind earlier messages): it is stored edited
            self._edits[payload.message_id] = message.clean_content
            while len(self._edits) > SEEN_IDS:
                self._edits.popitem(last=False)
        self.dispatch("memory_followed", "edit", changed)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self._deleted([payload.message_id])

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self._deleted(sorted(payload.message_ids))

    async def _deleted(self, ids: list[int]) -> None:
        if self.stopped:
            return
        for i in ids:
            self._gone[i] = None
        while len(self._gone) > SEEN_IDS:
            self._gone.popitem(last=False)
        try:
            erased = await self.engine.memory.message_deleted([str(i) for i in ids])
        except Exception:
            log.exception("could not forget deleted messages %s", ids[:5])
            erased = None
        self.dispatch("memory_followed", "delete", erased)

    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        # its threads: discord.py dispatches raw_thread_delete for each one it knew
        await self._erase([channel.id])

    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        await self._erase([payload.thread_id])

    async def _erase(self, channel_ids: list[int]) -> None:
        if self.stopped:
            return
        erased = None
        try:
            for channel_id in channel_ids:
                erased = await self.engine.memory.erase(f"channel:{channel_id}")
                if erased.agents:
                    log.info("channel %s was deleted: its memory is erased", channel_id)
        except Exception:
            log.exception("could not erase the memory of deleted channels %s", channel_ids)
        self.dispatch("memory_followed", "channel_delete", erased)

    async def on_guild_remove(self, guild: discord.Guild) -> None:
        # kept on purpose: a re-invite resumes; `mnemocord purge --guild` erases it
        log.info(
            "removed from server %s (%s); its memory is kept until `mnemocord purge --guild %s`", guild.name, guild.id, guild.id
        )

    # --- catch-up: messages sent while the bot was down ---

    def _first_sight(self, message_id: int) -> bool:
        """Whether this process has not taken this message yet (the gateway and catch-up may both bring it)."""
        if message_id in self._seen:
            return False
        self._seen[message_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)
        return True

    async def _catch_up(self, shard_id: int | None = None) -> None:
        """Read each conversation's history after the newest message stored from it, oldest first, and take
        each message as if it had just arrived (answers marked late). Dispatches `caught_up(count)`.

        `shard_id`: only the conversations whose messages come on that shard; None: all of them."""
        taken: list[asyncio.Future[None]] = []
        limit, hours = self.settings.catch_up_messages, self.settings.catch_up_hours
        if limit and hours:
            horizon = discord.utils.time_snowflake(discord.utils.utcnow() - datetime.timedelta(hours=hours))
            try:
                points = await self.engine.memory.last_external_ids()
            except Exception:
                log.exception("catch-up: could not read where conversations stopped")
                points = []
            for key, last in points:
                if self.closing:
                    break
                try:
                    taken += await self._catch_up_one(key, max(last, horizon), limit, shard_id)
                except (discord.HTTPException, aiohttp.ClientError, TimeoutError) as exc:  # e.g. no longer allowed to read it
                    log.warning("catch-up: could not read the history of %s (%s)", key, exc)
                except Exception:
                    log.exception("catch-up of %s failed", key)
        # the next conversation's history is read while these are answered
        await asyncio.gather(*taken, return_exceptions=True)
        if taken:
            log.info("catch-up: %d messages sent while the bot was down", len(taken))
        self.dispatch("caught_up", len(taken))

    async def _catch_up_one(self, key: str, after: int, limit: int, shard_id: int | None) -> list[asyncio.Future[None]]:
        """Start handling the messages of one conversation sent after message id `after`, oldest first
        (when it is on shard `shard_id`, if not None)."""
        kind, _, raw_id = key.partition(":")
        if not raw_id.isdigit() or kind not in ("dm", "channel"):
            return []
        channel: discord.abc.Messageable | None
        if kind == "dm":
            if shard_id not in (None, 0):  # DMs come on shard 0
                return []
            user = self.get_user(int(raw_id)) or await self.fetch_user(int(raw_id))
            channel = user.dm_channel or await user.create_dm()
        else:
            found = self.get_channel(int(raw_id))
            guild = getattr(found, "guild", None)
            if shard_id is not None and (guild is None or guild.shard_id != shard_id):
                return []
            channel = found if isinstance(found, discord.abc.Messageable) else None
            # the gateway told us the channel's newest message: nothing newer than ours, no history call
            newest = getattr(found, "last_message_id", None)
            if newest is not None and newest <= after:
                return []
        if channel is None:  # a channel of a server the bot left, or deleted
            return []
        history = [m async for m in channel.history(limit=limit, after=discord.Object(after), oldest_first=True)]
        # stored already: taken live by an earlier process after the newest stored one was written
        stored = await self.engine.memory.stored_external([str(m.id) for m in history])
        me = self.user
        fresh = [m for m in history if str(m.id) not in stored and m.id not in self._seen and me and not is_ignored(m, me)]
        # started in order: each takes its conversation's ticket before the next, as gateway messages do
        return [asyncio.ensure_future(self.on_message(m, late=True)) for m in fresh]
