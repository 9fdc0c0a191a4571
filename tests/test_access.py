from __future__ import annotations

import asyncio

import pytest

from bot.access import Arrivals, Members, RateLimiter, allowed
from bot.config import BotSettings
from memory.config import ConfigError, load_settings


def make(**kw: str) -> BotSettings:
    return BotSettings(_env_file=None, **kw)  # type: ignore[arg-type]


def test_allowlists(monkeypatch: pytest.MonkeyPatch) -> None:
    assert allowed(make(), 1, None, None) and allowed(make(), 1, 5, 6)
    monkeypatch.setenv("ALLOWED_USERS", "1, 2")
    monkeypatch.setenv("ALLOWED_GUILDS", "5")
    monkeypatch.setenv("ALLOWED_CHANNELS", "6;7")
    s = load_settings(BotSettings, _env_file=None)
    assert s.allowed_users == {1, 2} and s.allowed_channels == {6, 7}
    assert allowed(s, 1, None, 99)  # a DM from an allowed user: channel lists are for guilds
    assert not allowed(s, 3, None, None)
    assert allowed(s, 2, 5, 7) and not allowed(s, 2, 8, 7) and not allowed(s, 2, 5, 9)


def test_malformed_id_list_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_USERS", "123,alice")
    with pytest.raises(ConfigError, match=r"ALLOWED_USERS: expected comma-separated numeric Discord ids, found \['alice'\]"):
        load_settings(BotSettings, _env_file=None)


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_window() -> None:
    clock = Clock()
    limiter = RateLimiter(2, window=60, clock=clock)
    assert limiter.check(1) == 0 and limiter.check(1) == 0
    clock.now += 10
    assert limiter.check(1) == 50  # until the first hit leaves the window
    assert limiter.check(2) == 0  # per user
    assert limiter.should_warn(1) and not limiter.should_warn(1)
    clock.now += 59
    assert not limiter.should_warn(1)  # one warning per window
    clock.now += 1
    assert limiter.check(1) == 0 and limiter.should_warn(1)


def test_rate_limiter_forgets_quiet_users() -> None:
    clock = Clock()
    limiter = RateLimiter(1, window=60, clock=clock)
    for user in range(1000):
        limiter.check(user)
        limiter.check(user)
        limiter.should_warn(user)
    assert len(limiter) == 1000
    clock.now += 30
    limiter.check(5000)
    assert len(limiter) == 1001  # all still inside their window
    clock.now += 31
    limiter.check(5001)
    assert len(limiter) == 2  # 0..999 went quiet a whole window ago
    assert limiter.check(5000) > 0  # a user inside their window is still limited


async def test_members_asked_once_remembered_for_a_while_and_bounded() -> None:
    clock = Clock()
    asked: list[tuple[int, int]] = []

    async def is_member(guild_id: int, user_id: int) -> bool:
        asked.append((guild_id, user_id))
        return guild_id == 20 and user_id < 100

    members = Members(is_member, ttl=600, refusal_ttl=60, max_users=3, clock=clock)
    assert await members.any_of(1, {10, 20}) and await members.any_of(1, {10, 20})
    assert asked == [(10, 1), (20, 1)]
    assert not await members.any_of(500, {10, 20}) and not await members.any_of(500, {10, 20})
    assert len(asked) == 4
    clock.now += 61  # a refusal is asked again sooner
    assert not await members.any_of(500, {10, 20}) and await members.any_of(1, {10, 20}) and len(asked) == 6
    clock.now += 540
    assert await members.any_of(1, {10, 20}) and len(asked) == 8  # asked again once expired
    assert not await members.any_of(7, set()) and len(asked) == 8 and len(members) == 2  # nothing asked, nothing kept
    for user in (2, 3, 4):
        await members.any_of(user, {20})
    assert len(members) == 3  # the oldest answers went first
    asked.clear()
    assert await members.any_of(4, {20}) and asked == []


async def test_arrivals_keep_order_even_when_a_ticket_is_released_early() -> None:
    arrivals = Arrivals()
    first, second, third = arrivals.take("k"), arrivals.take("k"), arrivals.take("k")
    other = arrivals.take("other")
    await other.wait()  # another conversation never waits for this one
    second.release()  # dropped before its turn: must not let the third pass the first
    third_waiting = asyncio.ensure_future(third.wait())
    await asyncio.sleep(0)  # one loop turn, no time: the waiter runs until it blocks (or finishes)
    assert not third_waiting.done()
    first.release()
    await third_waiting
    third.release()
    other.release()
    assert len(arrivals) == 0


def test_allow_dms(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make().dm_policy == "everyone"
    assert make(allowed_channels="6").dm_policy == "members" and make(allowed_guilds="5").dm_policy == "members"
    assert make(allowed_guilds="5", allow_dms="everyone").dm_policy == "everyone"
    assert not allowed(make(allow_dms="nobody"), 1, None, None) and allowed(make(allow_dms="nobody"), 1, 5, 6)
    monkeypatch.setenv("ALLOW_DMS", "")  # as .env.example has it
    monkeypatch.setenv("ALLOWED_GUILDS", "5")
    assert load_settings(BotSettings, _env_file=None).dm_policy == "members"
    monkeypatch.delenv("ALLOWED_GUILDS")
    monkeypatch.setenv("ALLOW_DMS", "Nobody")
    assert load_settings(BotSettings, _env_file=None).dm_policy == "nobody"
    monkeypatch.setenv("ALLOW_DMS", "members")
    with pytest.raises(ConfigError, match="ALLOW_DMS=members needs ALLOWED_GUILDS or ALLOWED_CHANNELS"):
        load_settings(BotSettings, _env_file=None)
    monkeypatch.setenv("ALLOW_DMS", "friends")
    with pytest.raises(ConfigError, match="ALLOW_DMS: Input should be 'members', 'everyone' or 'nobody'"):
        load_settings(BotSettings, _env_file=None)
