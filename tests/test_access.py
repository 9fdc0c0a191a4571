from __future__ import annotations


import pytest

from bot.access import RateLimiter, allowed
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


def test_rate_limiter_window() -> None:
    limiter = RateLimiter(2, window=0.2)
    assert limiter.check(1) == 0 and limiter.check(1) == 0
    assert 0 < limiter.check(1) <= 0.2
    assert limiter.check(2) == 0  # per user
    assert limiter.should_warn(1) and not limiter.should_warn(1)
    import time

    time.sleep(0.21)
    assert limiter.check(1) == 0 and limiter.should_warn(1)
