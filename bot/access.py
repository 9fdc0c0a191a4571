"""Who may talk to the bot, and how often."""

from __future__ import annotations

import time
from collections import deque

from .config import BotSettings


def allowed(settings: BotSettings, user_id: int, guild_id: int | None, channel_id: int | None) -> bool:
    """Each allowlist that is set must admit the message; an empty list admits everyone."""
    if settings.allowed_users and user_id not in settings.allowed_users:
        return False
    if guild_id is not None and settings.allowed_guilds and guild_id not in settings.allowed_guilds:
        return False
    if guild_id is not None and settings.allowed_channels and channel_id not in settings.allowed_channels:
        return False
    return True


class RateLimiter:
    """A sliding window of `per_minute` model-bound messages for each user."""

    def __init__(self, per_minute: int, window: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window = window
        self._hits: dict[int, deque[float]] = {}
        self._warned: dict[int, float] = {}

    def check(self, user_id: int) -> float:
        """0 if the user may go on, else the seconds until they may."""
        now = time.monotonic()
        hits = self._hits.setdefault(user_id, deque())
        while hits and now - hits[0] >= self.window:
            hits.popleft()
        if len(hits) >= self.per_minute:
            return self.window - (now - hits[0])
        hits.append(now)
        return 0.0

    def should_warn(self, user_id: int) -> bool:
        """One friendly warning per window, not one per message."""
        now = time.monotonic()
        if now - self._warned.get(user_id, -self.window) >= self.window:
            self._warned[user_id] = now
            return True
        return False
