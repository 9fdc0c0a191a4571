"""Scheduled events: reminders and check-ins that wake an agent at a time, across restarts.

Events are rows in the SQLite file. One timer serves them all: a single task
sleeps until the earliest pending due time (read from an index) and is woken
again whenever events change, so pending events cost a row each and no CPU
while idle. A due event enters its agent's queue through the engine's intake as
a system event and waits its turn like any message. The occurrence is marked as
fired in the same transaction that stores that system event, so a crash never
fires it twice; a repeating event moves to its next due time in that
transaction instead, counted from the due time, not from a late firing.

The place an answer goes is the agent's key: a DM, a channel or a thread. An
adapter (the bot, `mnemocord chat`) starts the timer with the function that
delivers there; without one, nothing fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from . import recall
from .agents import Agent
from .clock import FORMAT, minute, stamp
from .db import Database, sqlite3
from .text import valid

log = logging.getLogger(__name__)

PENDING, FIRED, CANCELLED, FAILED = "pending", "fired", "cancelled", "failed"
STATES = (PENDING, FIRED, CANCELLED, FAILED)
REPEATS = ("none", "daily", "weekly")
PERIODS = {"daily": timedelta(days=1), "weekly": timedelta(weeks=1)}
MAX_AHEAD = timedelta(days=366)
MAX_NOTE_CHARS = 500
# the prompt's memory status shows this many of the next events (the rest by count)
SHOWN_IN_PROMPT = 3
SHOWN_NOTE_CHARS = 80
# fired later than this after its due time (the bot was down): the event says how late
LATE_AFTER = timedelta(seconds=60)
# due events claimed per transaction (one pass of the timer), at most: a pass fires no more than
# the engine has room for turns (Engine.room), the rest follow as turns end
FIRE_BATCH = 100
# after a database error the timer tries again this much later
RETRY_SECONDS = 5.0
MAX_WHEN_CHARS = 100
# pauses before delivering an answer again after a passing failure (a refusal ends it at once)
DELIVERY_RETRIES = (5.0, 30.0, 120.0)


class Answer(Protocol):
    """What the scheduler and its adapter read of a turn's result (memory/agent.py's TurnResult)."""

    @property
    def reply(self) -> str | None: ...

    @property
    def model_seconds(self) -> float: ...

    @property
    def queued_seconds(self) -> float: ...


Deliver = Callable[[str, Answer, "Event"], Awaitable[bool]]
"""(agent key, the turn that answered the event (its reply is set), the event) -> whether it reached its place."""


Claim = Callable[[sqlite3.Connection], bool]


class Engine(Protocol):
    """What the scheduler needs of the engine (memory/engine.py), which owns it."""

    db: Database

    async def agent(self, key: str) -> Agent: ...

    async def room(self) -> int: ...

    async def wake(
        self, batch: list[tuple[Agent, recall.Message, Claim]], *, waited: Sequence[float] = ()
    ) -> Sequence[Awaitable[Answer] | None]: ...


class BadWhen(ValueError):
    """`when` cannot be used; str() says why, for the model."""


@dataclass(frozen=True)
class Event:
    id: int
    agent_id: int
    due_at: str
    note: str
    repeat: str
    set_by: str
    set_by_id: str
    created_at: str
    state: str = PENDING

    def line(self) -> str:
        again = "" if self.repeat == "none" else f", {self.repeat}"
        return f"#{self.id} {minute(self.due_at)} UTC{again}: {self.note}"


_COLUMNS = "id, agent_id, due_at, note, repeat, set_by, set_by_id, created_at, state"


def _event(row: Any) -> Event:
    return Event(*row)


# ---- when -------------------------------------------------------------------------------------

_UNITS = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 604800,
    "week": 604800,
    "weeks": 604800,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)", re.ASCII)
_RELATIVE = re.compile(r"(?:in\s+)?(?:\d+(?:\.\d+)?\s*[a-z]+[\s,]*(?:and\s+)?)+", re.ASCII)
_ISO_DURATION = re.compile(
    r"P(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?",
    re.ASCII,
)


def parse_when(text: str, now: datetime) -> datetime:
    """The UTC moment `text` names: an ISO 8601 time with an offset, an ISO duration ("PT2H") or a
    relative one ("in 20 minutes", "2 days"). Raises BadWhen for anything else, the past, or over a year ahead."""
    raw = text.strip()
    if not raw or len(raw) > MAX_WHEN_CHARS:
        raise BadWhen("when is empty or too long; give an ISO time with offset or a duration like 'in 20 minutes'")
    try:
        due = _absolute(raw) or now + _duration(raw)
    except (OverflowError, ValueError) as exc:  # a duration or date past what a calendar holds
        if isinstance(exc, BadWhen):
            raise
        raise BadWhen(f"{raw!r} is more than a year ahead") from None
    if due <= now:
        raise BadWhen(f"{raw!r} is in the past (now is {now.strftime(FORMAT)})")
    if due - now > MAX_AHEAD:
        raise BadWhen(f"{raw!r} is more than a year ahead")
    return due


def _absolute(raw: str) -> datetime | None:
    if not (raw[:4].isdigit() and raw[4:5] == "-"):  # "1440 minutes" is a duration
        return None
    try:
        moment = datetime.fromisoformat(raw.replace(" ", "T", 1))
    except ValueError:
        raise BadWhen(f"{raw!r} is not an ISO 8601 time like 2026-12-03T09:00:00+01:00") from None
    if moment.tzinfo is None:
        raise BadWhen(f"{raw!r} has no UTC offset; add one (e.g. +01:00 or Z) in the person's time zone")
    return moment.astimezone(UTC)


def _duration(raw: str) -> timedelta:
    text = raw.lower()
    iso = _ISO_DURATION.fullmatch(raw.upper())
    if iso and raw.upper() not in ("P", "PT"):
        weeks, days, hours, minutes, seconds = (float(g) if g else 0.0 for g in iso.groups())
        return timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
    if _RELATIVE.fullmatch(text.strip(" .")):
        total = 0.0
        for amount, unit in _PART.findall(text):
            if unit not in _UNITS:
                raise BadWhen(f"unknown unit {unit!r} in {raw!r}; use minutes, hours, days or weeks")
            total += float(amount) * _UNITS[unit]
        if total > MAX_AHEAD.total_seconds() * 2:
            raise BadWhen(f"{raw!r} is more than a year ahead")
        return timedelta(seconds=total)
    raise BadWhen(
        f"cannot read {raw!r} as a time; use an ISO time with offset (2026-12-03T09:00:00+01:00) "
        "or a duration ('in 20 minutes', 'PT2H', '2 days')"
    )


def parse_stamp(value: str) -> datetime:
    """A stamp as FORMAT reads it ("2026-12-02T10:29:07Z", or "2020-1-2T3:4:5Z" in an import)."""
    # what stamp() writes, by fromisoformat: ~50x faster than strptime (1,000 events fire at once)
    if _STAMP.fullmatch(value):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value[:19]).replace(tzinfo=UTC)
    return datetime.strptime(value, FORMAT).replace(tzinfo=UTC)


_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", re.ASCII)


def next_due(due: datetime, repeat: str, now: datetime) -> datetime | None:
    """The first occurrence after `now`, stepping from the due time (None for a one-off)."""
    period = PERIODS.get(repeat)
    if period is None:
        return None
    missed = max(0, int((now - due) / period))
    following = due + period * (missed + 1)
    return following if following > now else following + period


def _span(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    days, rest = divmod(minutes, 1440)
    hours, minutes = divmod(rest, 60)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "", f"{minutes} min" if minutes else ""]
    return " ".join(p for p in parts if p) or "under a minute"


# ---- storage ----------------------------------------------------------------------------------


async def schedule(db: Database, agent: Agent, when: str, note: str, repeat: str | None) -> tuple[bool, str]:
    """The schedule_event tool: (whether it was set, the result for the model)."""
    service = scheduler_of(db)
    now = service.now() if service else datetime.now(UTC)
    limit = service.max_pending if service else 25
    try:
        due = parse_when(when, now)
    except BadWhen as exc:
        return False, f"Error: {exc}."
    repeat = (repeat or "none").strip().lower()
    if repeat not in REPEATS:
        return False, f"Error: repeat must be one of {', '.join(REPEATS)}, not {repeat[:40]!r}."
    note = valid(note).strip()
    if not note:
        return False, "Error: the note is empty; say what the event is for."
    if len(note) > MAX_NOTE_CHARS:
        return False, f"Error: the note has {len(note)} characters; keep it under {MAX_NOTE_CHARS}."

    def add(c: sqlite3.Connection) -> int | None:
        pending = c.execute("SELECT count(*) FROM events WHERE agent_id = ? AND state = 'pending'", (agent.id,)).fetchone()[0]
        if pending >= limit:
            return None
        # who asked: the newest person's message this turn took in (messages arriving meanwhile wait
        # outside the context window, so a bystander's later chatter is not taken for the asker)
        who = c.execute(
            "SELECT author, author_id FROM messages WHERE agent_id = ? AND in_context = 1 AND role = 'user'"
            " ORDER BY position DESC LIMIT 1",
            (agent.id,),
        ).fetchone()
        author, author_id = who if who else ("", "")
        return int(
            c.execute(
                "INSERT INTO events(agent_id, due_at, note, repeat, set_by, set_by_id, created_at, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending') RETURNING id",
                (agent.id, stamp(due), note, repeat, author, author_id, stamp(now)),
            ).fetchone()[0]
        )

    event_id = await db.transact(add)
    if event_id is None:
        return False, f"Error: {limit} events are already pending here; cancel one first (cancel_event)."
    if service:
        service.changed()
    again = "" if repeat == "none" else f", repeating {repeat}"
    return True, f"Event #{event_id} set for {stamp(due)} (UTC){again}. Confirm it to the person in their time zone."


async def cancel(db: Database, agent: Agent, event_id: int) -> bool:
    """Cancel a pending event of this agent; False when there is none with that id."""
    count = await db.execute(
        "UPDATE events SET state = 'cancelled' WHERE id = ? AND agent_id = ? AND state = 'pending'", (event_id, agent.id)
    )
    if count and (service := scheduler_of(db)):
        service.changed()
    return bool(count)


async def pending(db: Database, agent: Agent, limit: int = 100) -> list[Event]:
    rows = await db.fetchall(
        f"SELECT {_COLUMNS} FROM events WHERE agent_id = ? AND state = 'pending' ORDER BY due_at, id LIMIT ?", (agent.id, limit)
    )
    return [_event(r) for r in rows]


async def get(db: Database, agent: Agent, event_id: int) -> Event | None:
    row = await db.fetchone(f"SELECT {_COLUMNS} FROM events WHERE id = ? AND agent_id = ?", (event_id, agent.id))
    return _event(row) if row else None


def status(c: sqlite3.Connection, agent: Agent) -> str:
    """The agent's pending events as its memory status shows them (inside a transaction)."""
    count = c.execute("SELECT count(*) FROM events WHERE agent_id = ? AND state = 'pending'", (agent.id,)).fetchone()[0]
    if not count:
        return ""
    rows = c.execute(
        f"SELECT {_COLUMNS} FROM events WHERE agent_id = ? AND state = 'pending' ORDER BY due_at, id LIMIT ?",
        (agent.id, SHOWN_IN_PROMPT),
    ).fetchall()
    shown = []
    for e in map(_event, rows):
        note = e.note if len(e.note) <= SHOWN_NOTE_CHARS else e.note[:SHOWN_NOTE_CHARS] + "…"
        shown.append(f"#{e.id} {minute(e.due_at)} UTC{'' if e.repeat == 'none' else ' ' + e.repeat}: {note}")
    more = f" (+{count - len(shown)} more)" if count > len(shown) else ""
    return f"{count} pending events{more}: " + "; ".join(shown)


def export_rows(c: sqlite3.Connection, agent: Agent) -> list[dict[str, Any]]:
    rows = c.execute(f"SELECT {_COLUMNS} FROM events WHERE agent_id = ? ORDER BY id", (agent.id,)).fetchall()
    return [
        {k: v for k, v in zip(_COLUMNS.split(", "), r, strict=True) if k not in ("id", "agent_id")} | {"id": r[0]} for r in rows
    ]


def checked_rows(data: Any) -> list[tuple[str, str, str, str, str, str, str]]:
    """An export's events as (due_at, note, repeat, set_by, set_by_id, created_at, state); ValueError if malformed."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise ValueError("events must be a list")
    rows = []
    for e in data:
        if not isinstance(e, dict):
            raise ValueError("an event is not an object")
        try:
            # stored as stamp() writes them: the timer compares them as text
            due, created = stamp(parse_stamp(e["due_at"])), stamp(parse_stamp(e["created_at"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"an event has no valid due_at / created_at ({FORMAT})") from None
        note = valid(str(e.get("note", ""))).strip()[:MAX_NOTE_CHARS]
        repeat, state = e.get("repeat", "none"), e.get("state", PENDING)
        if repeat not in REPEATS or state not in STATES or not note:
            raise ValueError(f"an event has an unknown repeat or state, or no note: {str(e)[:200]}")
        rows.append((due, note, repeat, valid(str(e.get("set_by", ""))), valid(str(e.get("set_by_id", ""))), created, state))
    return rows


def import_rows(c: sqlite3.Connection, agent: Agent, rows: list[tuple[str, str, str, str, str, str, str]]) -> None:
    c.executemany(
        "INSERT INTO events(agent_id, due_at, note, repeat, set_by, set_by_id, created_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(agent.id, *r) for r in rows],
    )


# ---- the timer --------------------------------------------------------------------------------

# the running timer of each database, for the tools and the import to wake it when events change
_SCHEDULERS: weakref.WeakKeyDictionary[Database, Scheduler] = weakref.WeakKeyDictionary()


def scheduler_of(db: Database) -> Scheduler | None:
    return _SCHEDULERS.get(db)


class Scheduler:
    def __init__(self, engine: Engine, *, max_pending: int, clock: Callable[[], datetime] | None = None) -> None:
        self.engine = engine
        self.max_pending = max_pending
        self.now: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self._changed = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._deliver: Deliver | None = None
        self._only: int | None = None
        self._answers: set[asyncio.Task[None]] = set()
        self._backlog: datetime | None = None  # since when due events wait for the engine's room
        _SCHEDULERS[engine.db] = self

    def changed(self) -> None:
        """Events were added, cancelled or imported, or the clock moved: read the next due time again."""
        self._changed.set()

    async def start(self, deliver: Deliver, *, only: str | None = None) -> None:
        """Fire due events from now on, `deliver` taking each answer to its place; `only` one agent's."""
        self._deliver = deliver
        self._only = (await self.engine.agent(only)).id if only else None
        if self._timer is None:
            self._timer = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Fire nothing more (turns already queued still run and are answered: `finish`)."""
        if self._timer:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
            self._timer = None

    async def finish(self) -> None:
        """Wait until the answers of events that fired are delivered."""
        while self._answers:
            await asyncio.gather(*list(self._answers), return_exceptions=True)

    def _scope(self, column: str = "agent_id") -> tuple[str, tuple[int, ...]]:
        return (f" AND {column} = ?", (self._only,)) if self._only is not None else ("", ())

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            try:
                scope, params = self._scope()
                due = await self.engine.db.fetchval(f"SELECT min(due_at) FROM events WHERE state = 'pending'{scope}", params)
                if due is None:
                    await self._changed.wait()
                    continue
                wait = (parse_stamp(due) - self.now()).total_seconds()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), wait)
                    continue
                # no more than the engine has room for: the rest stay due in the database meanwhile
                since = self._backlog = self._backlog or self.now()
                limit = min(await self.engine.room(), FIRE_BATCH)
                fired = await self._fire_due(limit, since)
                if fired < limit:
                    self._backlog = None  # nothing due is left waiting for room
                if not fired:
                    # due, yet nothing could be claimed (a row the text comparison misses): never spin on it
                    log.warning("scheduled events: event due %s could not be fired; trying again in %.0f s", due, RETRY_SECONDS)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), RETRY_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception:  # a database error must not stop every event for good
                log.exception("scheduled events: the timer failed; trying again in %.0f s", RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)

    async def _fire_due(self, limit: int, since: datetime) -> int:
        """Fire up to `limit` events due now, the engine having room for them; returns how many rows it
        read. `since`: when the timer began firing this backlog (events waited for room from then on,
        or from their due time if later; not while the bot was down)."""
        now = self.now()
        scope, params = self._scope("e.agent_id")
        rows = await self.engine.db.fetchall(
            "SELECT e.id, e.agent_id, e.due_at, e.note, e.repeat, e.set_by, e.set_by_id, e.created_at, e.state, a.key"
            f" FROM events e JOIN agents a ON a.id = e.agent_id WHERE e.state = 'pending' AND e.due_at <= ?{scope}"
            " ORDER BY e.due_at, e.id LIMIT ?",
            (stamp(now), *params, limit),
        )
        fired = [self._occurrence(_event(tuple(r)[:9]), now) for r in rows]
        # one transaction for the whole pass: each occurrence is spent where its system event is stored
        answers = await self.engine.wake(
            [(Agent(e.agent_id, r[9]), message, claim) for (e, message, claim), r in zip(fired, rows, strict=True)],
            # due while the engine had no room for them: their turns' queue time
            waited=[max(0.0, (now - max(since, parse_stamp(e.due_at))).total_seconds()) for e, _, _ in fired],
        )
        for (event, _, _), r, answer in zip(fired, rows, answers, strict=True):
            if answer is not None:
                task = asyncio.create_task(self._answer(r[9], event, answer))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)
        return len(rows)

    def _occurrence(self, event: Event, now: datetime) -> tuple[Event, recall.Message, Callable[[sqlite3.Connection], bool]]:
        """The system event of this occurrence, and the claim that spends it."""
        due = parse_stamp(event.due_at)
        following = next_due(due, event.repeat, now)
        text = (
            f"Scheduled event #{event.id}, set {minute(event.created_at)} UTC"
            f"{' by ' + event.set_by if event.set_by else ''}: {recall.quoted(event.note)}; due {minute(event.due_at)} UTC, now {minute(stamp(now))} UTC"
        )
        if now - due > LATE_AFTER:
            text += f" (late by {_span(now - due)}: I was not running)"
        if following:
            text += f"; repeats {event.repeat}, next {minute(stamp(following))} UTC"
        text += ". Act on it now."

        def claim(c: sqlite3.Connection) -> bool:
            # a cancel or an edit since the read leaves the row unmatched: nothing fires
            args: tuple[str, ...] = ()
            if following is None:
                sql = "UPDATE events SET state = 'fired' WHERE id = ? AND state = 'pending' AND due_at = ?"
            else:
                sql, args = "UPDATE events SET due_at = ? WHERE id = ? AND state = 'pending' AND due_at = ?", (stamp(following),)
            return c.execute(sql, (*args, event.id, event.due_at)).rowcount == 1

        return event, recall.Message(role="system", content=text), claim

    async def _answer(self, key: str, event: Event, answer: Awaitable[Answer]) -> None:
        result = await answer
        if not result.reply or self._deliver is None:  # merged: the turn's other message carried the answer there
            return
        delivered = None
        for pause in (0.0, *DELIVERY_RETRIES):
            await asyncio.sleep(pause)
            try:
                delivered = await self._deliver(key, result, event)
                break
            except Exception as exc:  # a passing failure (a 5xx, a network error): the place is not gone
                log.warning(
                    "%s: delivering event #%d failed (%r); %s",
                    key,
                    event.id,
                    exc,
                    "trying again" if pause != DELIVERY_RETRIES[-1] else "giving up",
                )
        if delivered is None:
            return  # the event stays as it is: a repeating one comes again
        if not delivered:
            # the place is gone or closed to the bot: said once, and a repeating event stops
            log.warning("%s: event #%d could not be delivered; marked failed", key, event.id)
            await self.engine.db.execute("UPDATE events SET state = 'failed' WHERE id = ?", (event.id,))
