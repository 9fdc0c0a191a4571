"""Which agent a Discord message or interaction belongs to, and whether to answer it.

A DM belongs to its user's agent. A guild channel has one agent, and so does
each thread: a thread is its own conversation, and sharing the parent's
context window would interleave two conversations in one prompt.
"""

from __future__ import annotations

import discord


def agent_key(channel: discord.abc.Messageable | discord.abc.GuildChannel | discord.Thread | None, user: discord.abc.User) -> str:
    if channel is None or isinstance(channel, discord.DMChannel) or getattr(channel, "guild", None) is None:
        return f"dm:{user.id}"
    return f"channel:{channel.id}"  # type: ignore[union-attr]  # a guild channel or thread: it has an id


def is_addressed(message: discord.Message, me: discord.ClientUser) -> bool:
    """A DM, a mention of the bot, or a reply to one of its messages."""
    if message.guild is None:
        return True
    if me in message.mentions:
        return True
    ref = message.reference
    resolved = ref.resolved if ref else None
    return isinstance(resolved, discord.Message) and resolved.author.id == me.id


def is_ignored(message: discord.Message, me: discord.ClientUser) -> bool:
    """Bots (itself included), webhooks and system messages are never stored or answered."""
    return (
        message.author.bot
        or message.author.id == me.id
        or message.webhook_id is not None
        or message.type not in (discord.MessageType.default, discord.MessageType.reply)
    )
