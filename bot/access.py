"""Who may talk to the bot, and how often."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from .config import BotSettings

Clock = Callable[[], float]


def allowed(settings: BotSettings, user_id: int, guild_id: int | None, channel_id: int | None) -> bool:
    """Each allowlist that is set must admit the message; an empty list admits everyone.

    A DM passes here under ALLOW_DMS=members too: membership needs a REST call (`Members`).
    """
    if settings.allowed_users and user_id not in settings.allowed_users:
        return False
    if guild_id is None:
        return settings.dm_policy != "nobody"
    if settings.allowed_guilds and guild_id not in settings.allowed_guilds:
        return False
    if settings.allowed_channels and channel_id not in settings.allowed_channels:
        return False
    return True


class RateLimiter:
    """A sliding window of `per_minute` model-bound messages for each user.

    Users quiet for a whole window are forgotten, so the tables hold only recent senders.
    """

    def __init__(self, per_minute: int, window: float = 60.0, *, clock: Clock = time.monotonic) -> None:
        self.per_minute = per_minute
        self.window = window
        self.clock = clock
        self._hits: dict[int, deque[float]] = {}
        self._warned: dict[int, float] = {}
        self._next_sweep = clock() + window

    def __len__(self) -> int:
        """Users the limiter remembers."""
        return len(self._hits.keys() | self._warned.keys())

    def check(self, user_id: int) -> float:
        """0 if the user may go on, else the seconds until they may."""
        now = self._now()
        hits = self._hits.setdefault(user_id, deque())
        while hits and now - hits[0] >= self.window:
            hits.popleft()
        if len(hits) >= self.per_minute:
            return self.window - (now - hits[0])
        hits.append(now)
        return 0.0

    def should_warn(self, user_id: int) -> bool:
        """One friendly warning per window, not one per message."""
        now = self._now()
        if now - self._warned.get(user_id, now - self.window) >= self.window:
            self._warned[user_id] = now
            return True
        return False

    def _now(self) -> float:
        now = self.clock()
        if now >= self._next_sweep:  # one pass per window keeps the cost per message constant
            self._next_sweep = now + self.window
            self._hits = {u: h for u, h in self._hits.items() if h and now - h[-1] < self.window}
            self._warned = {u: t for u, t in self._warned.items() if now - t < self.window}
        return now


class Members:
    """Whether a user belongs to one of some guilds, asked over REST and remembered a while.

    REST (GET /guilds/{id}/members/{user}) needs no privileged members intent. A "no" is kept
    for less time than a "yes": someone refused usually joins the server next and tries again.
    At most `max_users` answers are kept, the oldest dropped first.
    """

    def __init__(
        self,
        is_member: Callable[[int, int], Awaitable[bool]],
        *,
        ttl: float = 600.0,
        refusal_ttl: float = 60.0,
        max_users: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self._is_member = is_member
        self.ttl = ttl
        self.refusal_ttl = refusal_ttl
        self.max_users = max_users
        self.clock = clock
        self._known: dict[int, tuple[bool, float]] = {}  # user -> (member, expires); oldest first

    def __len__(self) -> int:
        return len(self._known)

    async def any_of(self, user_id: int, guild_ids: Iterable[int]) -> bool:
        known = self._known.get(user_id)
        if known is not None and self.clock() < known[1]:
            return known[0]
        asked = sorted(guild_ids)
        if not asked:  # nothing to ask yet (the guilds of the allowed channels are not loaded): not an answer to keep
            return False
        member = False
        for guild_id in asked:
            if await self._is_member(guild_id, user_id):
                member = True
                break
        self._known.pop(user_id, None)
        self._known[user_id] = (member, self.clock() + (self.ttl if member else self.refusal_ttl))
        while len(self._known) > self.max_users:
            del self._known[next(iter(self._known))]
        return member


class Arrivals:
    """Hands the messages of each conversation to the engine in the order they arrived.

    A handler takes a ticket before its first await (discord.py starts handlers in gateway
    order), does its own awaiting, then waits for the tickets before it and releases its own
    right before calling the engine, which stores a message when called: a message that needs
    fewer awaits (a mention skips the listen-mode lookup) cannot overtake an earlier one.
    """

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Future[None]] = {}  # conversations with a message in hand

    def __len__(self) -> int:
        return len(self._last)

    def take(self, key: str) -> Ticket:
        before = self._last.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last[key] = mine
        return Ticket(self, key, before, mine)


class Ticket:
    def __init__(self, arrivals: Arrivals, key: str, before: asyncio.Future[None] | None, mine: asyncio.Future[None]) -> None:
        self._arrivals = arrivals
        self._key = key
        self._before = before
        self._mine = mine
        self._released = False

    async def wait(self) -> None:
        """Until every earlier message of the conversation was handed over (or dropped)."""
        if self._before is not None:
            await asyncio.shield(self._before)

    async def handover(self) -> None:
        """`wait`, then `release`: the caller calls the engine next, with no await in between."""
        await self.wait()
        self.release()

    def release(self) -> None:
        """Let the next message go; idempotent. A ticket released early still waits for those before it."""
        if self._released:
            return
        self._released = True
        if self._before is not None and not self._before.done():
            self._before.add_done_callback(lambda _: self._finish())
        else:
            self._finish()

    def _finish(self) -> None:
        self._mine.set_result(None)
        if self._arrivals._last.get(self._key) is self._mine:
            del self._arrivals._last[self._key]
