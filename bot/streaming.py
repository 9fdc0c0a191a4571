"""A reply shown in Discord while the model writes it.

The engine passes snapshots of the reply text (memory/streaming.py decides which text may be
shown); this posts the reply once there is something worth showing, edits it at most once per
STREAM_EDIT_SECONDS (Discord rate-limits edits: lettabot went from 0.5 s to 1.5 s after hitting
them), and before a message would pass 2,000 characters finishes it (code block closed) and
goes on in a new one (reopened), where split_message would cut. At the end the messages are
made to hold exactly the final reply, the same parts `_send` would post; when that cannot be
done (Discord refused an edit, the person deleted a message being edited), what was shown is
removed and the final reply is sent anew, so no half-written message is left as if complete.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import discord

from .format import first_part, split_message

log = logging.getLogger(__name__)

# a word or two is not worth a message and an edit right after it: one post would do
FIRST_POST_CHARS = 24


class StreamedReply:
    def __init__(self, message: discord.Message, interval: float, on_first_post: Callable[[], object]) -> None:
        self.message = message
        self.interval = interval
        self._on_first_post = on_first_post
        self.sent: list[discord.Message] = []
        self.shown: list[str] = []  # what each sent message holds now
        self.written_at: list[float] = []  # when each was posted or last edited (loop time)
        self.broken = False  # Discord refused a post or an edit: the final reply is sent anew
        self._latest = ""
        self._base = ""  # the part of the snapshot whose text is in finished messages
        self._carry = ""  # what the live message starts with: a reopened code block, carried lines
        self._finished = 0  # messages that are full: never edited again until the final text
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    def update(self, text: str) -> None:
        """A new snapshot of the reply so far (called by the engine: cheap, never waits)."""
        self._latest = text
        self._changed.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.broken:
            await self._changed.wait()
            if self.sent:  # the live message may be edited once per interval
                wait = self.written_at[-1] + self.interval - loop.time()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._stop.wait(), wait)
                    except TimeoutError:
                        pass
            if self._stop.is_set():
                return
            self._changed.clear()
            await self._show(self._latest)

    async def _show(self, text: str) -> None:
        if not text.startswith(self._base):  # the answer started again (a retried call): the final text puts it right
            return
        live = self._carry + text[len(self._base) :]
        if not self.sent and len(live.strip()) < FIRST_POST_CHARS:
            return
        while (cut := first_part(live)) is not None:  # the live message is full: finish it, go on in a new one
            finished, live = cut
            if finished.strip():
                if not await self._write(self._live(), finished):
                    return
                self._finished = len(self.sent)
            self._base, self._carry = text, live
        if live.strip():
            await self._write(self._live(), live)

    def _live(self) -> int | None:
        """The message being written, or None when the next text starts a new one."""
        return len(self.sent) - 1 if len(self.sent) > self._finished else None

    async def _write(self, index: int | None, text: str, **extra: Any) -> bool:
        """Edit message `index` to `text`, or post `text` as a new message (index None)."""
        if index is not None and self.shown[index] == text and not extra:
            return True
        try:
            if index is None:
                if not self.sent:
                    extra["reference"] = self.message.to_reference(fail_if_not_exists=False)
                sent = await self.message.channel.send(text, **extra)
                self.sent.append(sent)
                self.shown.append(text)
                self.written_at.append(asyncio.get_running_loop().time())
                if len(self.sent) == 1:
                    self._on_first_post()
            else:
                await self.sent[index].edit(content=text, **extra)
                self.shown[index] = text
                self.written_at[index] = asyncio.get_running_loop().time()
        # NotFound: the person deleted it; ClientError, OSError: Discord could not be reached
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.warning("could not show the reply being written in channel %s: %s", self.message.channel.id, exc)
            self.broken = True
            return False
        return True

    async def finish(self, final: str, whole: str | None = None) -> bool:
        """Make the messages hold exactly `final` (empty: remove them). `whole`, the text of a reply
        cut at MAX_REPLY_CHARS, goes with the last part as reply.txt. False when the caller has to
        send the reply itself: nothing was shown, or what was shown could not be put right and is removed."""
        self._stop.set()
        self._changed.set()
        await asyncio.gather(self._task, return_exceptions=True)
        if not self.sent:
            return False
        parts = split_message(final)
        if not self.broken:
            loop = asyncio.get_running_loop()
            for i, part in enumerate(parts):
                extra: dict[str, Any] = {}
                if whole and i == len(parts) - 1:
                    file = discord.File(io.BytesIO(whole.encode()), "reply.txt")
                    extra = {"attachments": [file]} if i < len(self.sent) else {"file": file}
                if i < len(self.sent) and (self.shown[i] != part or extra):
                    await asyncio.sleep(max(0.0, self.written_at[i] + self.interval - loop.time()))
                if not await self._write(i if i < len(self.sent) else None, part, **extra):
                    break
            else:
                for extra_message in self.sent[len(parts) :]:
                    if not await self._delete(extra_message):
                        break
                else:
                    return True
        for shown in self.sent:
            await self._delete(shown)
        return not parts

    async def _delete(self, message: discord.Message) -> bool:
        try:
            await message.delete()
        except discord.NotFound:
            pass
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.warning("could not remove a reply that was being written in channel %s: %s", self.message.channel.id, exc)
            return False
        return True
