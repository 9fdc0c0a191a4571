"""Discord attachments: what can be refused before downloading, and downloading images.
Reading documents is memory/documents.py's; what an image is, memory/images.py's."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import discord

from memory import images
from memory.documents import Unreadable, check_kind

log = logging.getLogger(__name__)

# a CDN that stops sending must not hold the message (and those after it) forever
DOWNLOAD_SECONDS = 30.0


def check(attachment: discord.Attachment, max_bytes: int) -> None:
    """Refuse before downloading anything."""
    check_kind(attachment.filename, attachment.content_type)
    if attachment.size > max_bytes:
        raise Unreadable(
            f"`{attachment.filename}` is {attachment.size / 1e6:.1f} MB; I can read files up to {max_bytes / 1e6:.1f} MB."
        )


def is_image(attachment: discord.Attachment) -> bool:
    return images.looks_like_image(attachment.filename, attachment.content_type)


def stand_in(attachment: discord.Attachment, unseen: str) -> str:
    """The stand-in of an image the model is not shown, from what Discord says of it (its bytes unread)."""
    kind = images.kind(attachment.filename, attachment.content_type)
    return images.stand_in(attachment.filename, kind, attachment.size, unseen)


async def read_image(attachment: discord.Attachment, max_bytes: int) -> images.Image:
    """Download an image (its size checked first: CDN links expire, so the bytes travel, not the URL).
    Raises images.Refused."""
    images.check(attachment.filename, attachment.content_type, attachment.size, max_bytes)
    try:
        async with asyncio.timeout(DOWNLOAD_SECONDS):
            data = await attachment.read()
    except (discord.HTTPException, aiohttp.ClientError, TimeoutError) as exc:
        log.warning("image download failed: %s", exc)
        raise images.Refused(
            f"I couldn't download `{attachment.filename}`; please send it again.", "it could not be downloaded"
        ) from None
    return images.read(attachment.filename, data, max_bytes)
