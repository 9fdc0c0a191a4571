"""Discord attachments: what can be refused before downloading. Reading them is memory/documents.py's."""

from __future__ import annotations

import discord

from memory.documents import Unreadable, check_kind


def check(attachment: discord.Attachment, max_bytes: int) -> None:
    """Refuse before downloading anything."""
    check_kind(attachment.filename, attachment.content_type)
    if attachment.size > max_bytes:
        raise Unreadable(
            f"`{attachment.filename}` is {attachment.size / 1e6:.1f} MB; I can read files up to {max_bytes / 1e6:.1f} MB."
        )
