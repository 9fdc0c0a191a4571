"""Scheduled events: parsing `when`, the tools, the one timer, firing through the intake, restarts, export."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from memory import events
from memory.agent import TurnResult
from memory.engine import Engine
from memory.events import BadWhen, next_due, parse_when
from tests.fakeopenai import FakeOpenAI, call, reply
from tests.test_agent_loop import make_settings, system_of, user

NOW = datetime(2026, 12, 2, 16, 0, 0, tzinfo=UTC)


def test_when_reads_iso_times_and_durations() -> None:
    assert parse_when("2026-12-03T09:00:00+01:00", NOW) == datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    assert parse_when("2026-12-03 09:00Z", NOW) == datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    assert parse_when("PT2H", NOW) == NOW + timedelta(hours=2)
    assert parse_when("P1DT30M", NOW) == NOW + timedelta(days=1, minutes=30)
    assert parse_when("in 20 minutes", NOW) == NOW + timedelta(minutes=20)
    assert parse_when("2 days", NOW) == NOW + timedelta(days=2)
    assert parse_when("in 1 hour and 30 min", NOW) == NOW + timedelta(hours=1, minutes=30)


@pytest.mark.parametrize(
    ("when", "says"),
    [
        ("2026-12-01T09:00:00+00:00", "in the past"),
        ("2026-12-03T09:00:00", "no UTC offset"),
        ("P400D", "more than a year"),
        ("in 2 fortnights", "unknown unit"),
        ("tomorrow-ish", "cannot read"),
        ("2026-13-45T09:00Z", "not an ISO 8601 time"),
        ("", "empty"),
    ],
)
def test_when_refuses_with_a_reason(when: str, says: str) -> None:
    with pytest.raises(BadWhen, match=says):
        parse_when(when, NOW)


def test_repeats_step_from_the_due_time_not_from_a_late_firing() -> None:
    due = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
    assert next_due(due, "daily", due + timedelta(seconds=1)) == datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
    # three days and five minutes late: the next one is still at 09:00
    assert next_due(due, "daily", due + timedelta(days=3, minutes=5)) == datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    assert next_due(due, "weekly", due + timedelta(days=1)) == datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    assert next_due(due, "none", due) is None


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
async def engine(tmp_path: Path, fake: FakeOpenAI, clock: Clock) -> AsyncIterator[Engine]:
    e = await Engine.open(make_settings(tmp_path, fake, max_pending_events=3))
    e.events.now = clock
    yield e
    await e.close()


class Inbox:
    """Where the adapter delivers events' answers; `ok` False plays a place that is gone."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
        self.ok = True

    async def __call__(self, key: str, result: events.Answer, event: events.Event) -> bool:
        await self.got.put((key, result.reply or "", event.id))
        return self.ok


async def schedule(engine: Engine, fake: FakeOpenAI, args: dict[str, Any], key: str = "dm:1") -> str:
    """One turn in which the model calls schedule_event; returns the tool's result."""
    fake.push(call("schedule_event", args), reply("ok"))
    await engine.send(key, user("remind me please"))
    return str(fake.chat_requests[-1]["messages"][-1]["content"])


async def test_schedule_event_says_the_exact_utc_time_and_id_and_refuses_what_it_cannot_keep(
    engine: Engine, fake: FakeOpenAI, clock: Clock
) -> None:
    result = await schedule(engine, fake, {"when": "in 2 hours", "note": "call the dentist"})
    due = (clock.now + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert result == f"Event #1 set for {due} (UTC). Confirm it to the person in their time zone."
    assert "in the past" in await schedule(engine, fake, {"when": "2020-01-01T00:00:00Z", "note": "x"})
    assert "repeat must be one of" in await schedule(engine, fake, {"when": "PT1H", "note": "x", "repeat": "hourly"})
    await schedule(engine, fake, {"when": "PT3H", "note": "water plants", "repeat": "daily"})
    await schedule(engine, fake, {"when": "PT4H", "note": "stretch"})
    assert "3 events are already pending here" in await schedule(engine, fake, {"when": "PT5H", "note": "one too many"})
    (listed,) = [await engine.memory.events("dm:1")]
    assert [(e.id, e.note, e.repeat, e.set_by) for e in listed] == [
        (1, "call the dentist", "none", "ann"),
        (2, "water plants", "daily", "ann"),
        (3, "stretch", "none", "ann"),
    ]
    # the memory status lists them, so the model can cancel without a tool to list them
    fake.push(call("cancel_event", {"event_id": 2}), reply("cancelled"))
    await engine.send("dm:1", user("drop the plants one"))
    before, after = [system_of(r) for r in fake.chat_requests[-2:]]
    assert "3 pending events: #1 " in before and "#2 " in before and "daily: water plants" in before
    assert "2 pending events: " in after and "water plants" not in after
    assert fake.chat_requests[-1]["messages"][-1]["content"] == "Event #2 cancelled."
    for wrong in ("two", 10**30, 2):
        fake.push(call("cancel_event", {"event_id": wrong}), reply("hm"))
        await engine.send("dm:1", user("cancel it again"))
        assert fake.chat_requests[-1]["messages"][-1]["content"].startswith("Error: ")
    # the system part stays the same from request to request while events do not change
    fake.push(reply("fine"))
    await engine.send("dm:1", user("thanks"))
    assert system_of(fake.chat_requests[-1]) == after


async def test_a_due_event_waits_its_turn_then_its_answer_is_delivered_once(
    engine: Engine, fake: FakeOpenAI, clock: Clock
) -> None:
    await schedule(engine, fake, {"when": "in 10 minutes", "note": "stretch"})
    inbox = Inbox()
    await engine.events.start(inbox)
    # a turn is running when the event comes due: the event waits behind it in the queue
    release = asyncio.Event()
    asked = asyncio.Event()

    async def slow(body: dict[str, Any]) -> dict[str, Any]:
        asked.set()
        await release.wait()
        return reply("slow answer")

    fake.push(slow, call("send_message", {"message": "Time to stretch!"}))
    busy = asyncio.create_task(engine.send("dm:1", user("a long question")))
    await asked.wait()
    clock.now += timedelta(minutes=10)
    engine.events.changed()
    agent = await engine.agent("dm:1")
    stored = await _wait_for_event_message(engine, agent.id)
    assert "Scheduled event #1" in stored and "by ann: stretch" in stored and "late" not in stored
    assert len(fake.chat_requests) == 3  # the event's turn has not started: the other turn holds the agent
    release.set()
    assert (await busy).reply == "slow answer"
    key, text, event_id = await asyncio.wait_for(inbox.got.get(), 5)
    assert (key, text, event_id) == ("dm:1", "Time to stretch!", 1)
    assert "Scheduled event #1" in str(fake.chat_requests[-1]["messages"])
    assert (await engine.memory.event("dm:1", 1)).state == "fired"  # type: ignore[union-attr]
    assert await engine.memory.events("dm:1") == []


async def _wait_for_event_message(engine: Engine, agent_id: int) -> str:
    for _ in range(500):
        found = await engine.db.fetchval(
            "SELECT content FROM messages WHERE agent_id = ? AND role = 'system' AND content LIKE 'Scheduled event%'", (agent_id,)
        )
        if found:
            return str(found)
        await asyncio.sleep(0.01)
    raise AssertionError("the event never fired")


async def test_late_repeating_event_fires_once_says_how_late_and_keeps_its_time_of_day(
    engine: Engine, fake: FakeOpenAI, clock: Clock
) -> None:
    await schedule(engine, fake, {"when": "PT1H", "note": "post the plan", "repeat": "daily"}, key="channel:7")
    due = clock.now + timedelta(hours=1)
    clock.now = due + timedelta(days=3, minutes=5)  # down for three days
    inbox = Inbox()
    fake.push(reply("Here is the plan."))
    await engine.events.start(inbox)
    assert await asyncio.wait_for(inbox.got.get(), 5) == ("channel:7", "Here is the plan.", 1)
    prompt = str(fake.chat_requests[-1]["messages"])
    assert "late by 3 d 5 min" in prompt
    (event,) = await engine.memory.events("channel:7")
    assert event.due_at == (due + timedelta(days=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert len(fake.chat_requests) == 3  # one occurrence, one turn


async def test_an_undeliverable_event_is_marked_failed_and_stops_repeating(
    engine: Engine, fake: FakeOpenAI, clock: Clock
) -> None:
    await schedule(engine, fake, {"when": "PT1M", "note": "ping", "repeat": "weekly"}, key="channel:9")
    inbox = Inbox()
    inbox.ok = False
    fake.push(reply("ping!"))
    await engine.events.start(inbox)
    clock.now += timedelta(minutes=1)
    engine.events.changed()
    await asyncio.wait_for(inbox.got.get(), 5)
    await engine.events.finish()
    assert (await engine.memory.event("channel:9", 1)).state == "failed"  # type: ignore[union-attr]
    assert await engine.memory.events("channel:9") == []


async def test_fired_once_even_when_the_process_stops_during_its_turn(tmp_path: Path, fake: FakeOpenAI, clock: Clock) -> None:
    settings = make_settings(tmp_path, fake, llm_max_retries=0)
    engine = await Engine.open(settings)
    engine.events.now = clock
    await schedule(engine, fake, {"when": "PT1M", "note": "stretch"})
    asked = asyncio.Event()

    async def hang(body: dict[str, Any]) -> dict[str, Any]:
        asked.set()
        await asyncio.Event().wait()
        raise AssertionError

    fake.push(hang)
    await engine.events.start(Inbox())
    clock.now += timedelta(minutes=1)
    engine.events.changed()
    await asked.wait()
    # the occurrence is spent and its system event stored while the turn still runs
    assert (await engine.memory.event("dm:1", 1)).state == "fired"  # type: ignore[union-attr]
    engine.llm.abort()  # as a stop that cannot wait ends the turn's model call
    await engine.close()

    engine = await Engine.open(settings)
    engine.events.now = clock
    inbox = Inbox()
    await engine.events.start(inbox)
    fake.push(reply("you asked me to remind you: stretch"))
    result: TurnResult = await engine.send("dm:1", user("anything for me?"))
    assert result.reply == "you asked me to remind you: stretch"
    agent = await engine.agent("dm:1")
    fired = await engine.db.fetchval(
        "SELECT count(*) FROM messages WHERE agent_id = ? AND content LIKE 'Scheduled event #1%'", (agent.id,)
    )
    assert fired == 1 and inbox.got.empty()
    await engine.close()


async def test_export_and_import_carry_events(engine: Engine, fake: FakeOpenAI) -> None:
    await schedule(engine, fake, {"when": "P2D", "note": "exam check-in", "repeat": "weekly"})
    data = await engine.memory.export("dm:1")
    assert [(e["note"], e["repeat"], e["state"]) for e in data["events"]] == [("exam check-in", "weekly", "pending")]
    counts = await engine.memory.import_data(data, "dm:2")
    assert counts["events"] == 1
    (copied,) = await engine.memory.events("dm:2")
    assert (copied.note, copied.due_at, copied.set_by) == ("exam check-in", data["events"][0]["due_at"], "ann")
    with pytest.raises(ValueError, match="repeat or state"):
        await engine.memory.import_data({**data, "events": [{**data["events"][0], "repeat": "hourly"}]}, "dm:3")


async def test_forget_me_and_reset_all_take_the_events_with_them(engine: Engine, fake: FakeOpenAI) -> None:
    await schedule(engine, fake, {"when": "in 2 hours", "note": "take the pills"})  # set by user() 1001, in dm:1
    await schedule(engine, fake, {"when": "in 3 hours", "note": "water the plants"}, key="channel:9")
    await schedule(engine, fake, {"when": "in 4 hours", "note": "call mum"}, key="dm:2")
    erased = await engine.memory.forget_person("1001")
    assert erased.events == 3  # every reminder they set, in any agent
    assert await engine.memory.events("dm:1") == [] and await engine.memory.events("channel:9") == []
    await schedule(engine, fake, {"when": "in 5 hours", "note": "stretch"}, key="dm:7")
    await engine.memory.reset("dm:7", "conversation")
    assert len(await engine.memory.events("dm:7")) == 1  # only "all" erases them
    await engine.memory.reset("dm:7", "all")
    assert await engine.memory.events("dm:7") == []


async def test_an_imported_time_in_another_spelling_is_stored_as_the_timer_reads_it(engine: Engine, fake: FakeOpenAI) -> None:
    data = await engine.memory.export("dm:1")
    data["events"] = [{"due_at": "2020-1-2T3:4:5Z", "note": "old one", "created_at": "2020-1-1T0:0:0Z"}]
    await engine.memory.import_data(data, "dm:3")
    (event,) = await engine.memory.events("dm:3")
    assert event.due_at == "2020-01-02T03:04:05Z"  # as stamp() writes it: the timer compares the text


async def test_the_setter_is_the_person_the_turn_answered_not_who_spoke_meanwhile(engine: Engine, fake: FakeOpenAI) -> None:
    asked = asyncio.Event()

    async def scheduling(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] == "tool":
            return reply("ok")
        # a bystander speaks while the turn runs: stored, waiting for the next turn
        await engine.record("channel:4", user("unrelated chatter", author="bob", author_id="2002"))
        asked.set()
        return call("schedule_event", {"when": "in 1 hour", "note": "stand-up"})

    fake.default = scheduling
    await engine.send("channel:4", user("remind me of the stand-up"))
    assert asked.is_set()
    (event,) = await engine.memory.events("channel:4")
    assert (event.set_by, event.set_by_id) == ("ann", "1001")


async def test_a_passing_delivery_failure_is_tried_again_and_never_ends_a_repeating_event(
    engine: Engine, fake: FakeOpenAI, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "DELIVERY_RETRIES", (0.0, 0.0))
    await schedule(engine, fake, {"when": "PT1M", "note": "ping", "repeat": "weekly"}, key="channel:9")
    inbox = Inbox()
    failures = [RuntimeError("HTTP 503 from Discord")]

    async def flaky(key: str, result: events.Answer, event: events.Event) -> bool:
        if failures:
            raise failures.pop()
        return await inbox(key, result, event)

    fake.push(reply("ping!"))
    await engine.events.start(flaky)
    clock.now += timedelta(minutes=1)
    engine.events.changed()
    assert await asyncio.wait_for(inbox.got.get(), 5) == ("channel:9", "ping!", 1)
    await engine.events.finish()
    (event,) = await engine.memory.events("channel:9")  # still pending: its next week comes
    assert event.state == "pending"


@pytest.mark.parametrize("when", ["P99999999999W", "P500000W", "9999-12-31T23:59:59-23:59"])
def test_when_past_what_a_calendar_holds_is_refused_with_a_reason(when: str) -> None:
    with pytest.raises(BadWhen, match="more than a year ahead"):
        parse_when(when, NOW)


def test_a_duration_in_four_digits_is_a_duration() -> None:
    assert parse_when("1440 minutes", NOW) == NOW + timedelta(days=1)


async def test_due_events_fire_only_as_the_engine_has_room_and_a_person_goes_before_the_backlog(
    tmp_path: Path, fake: FakeOpenAI, clock: Clock
) -> None:
    from memory.engine import TURNS_PER_CALL_SLOT

    engine = await Engine.open(make_settings(tmp_path, fake, max_concurrent_llm_calls=1))
    engine.events.now = clock
    for i in range(6):
        agent = await engine.agent(f"dm:{100 + i}")
        ok, _ = await events.schedule(engine.db, agent, "in 10 minutes", f"task {i}", None)
        assert ok
    asked: list[str] = []
    person: list[asyncio.Task[TurnResult]] = []

    async def answer(body: dict[str, Any]) -> dict[str, Any]:
        text = str(body["messages"][-1]["content"])
        asked.append("person" if "hello there" in text else "event")
        clock.now += timedelta(minutes=1)  # each answer takes a minute of the timer's clock
        if len(asked) == 1:  # a person writes while the events are backed up
            person.append(asyncio.create_task(engine.send("dm:7", user("hello there"))))
        return reply("done")

    fake.default = answer
    delivered: asyncio.Queue[float] = asyncio.Queue()

    async def deliver(key: str, result: events.Answer, event: events.Event) -> bool:
        await delivered.put(result.queued_seconds)
        return True

    await engine.events.start(deliver)
    clock.now += timedelta(minutes=10)
    engine.events.changed()
    queued = [await asyncio.wait_for(delivered.get(), 10) for _ in range(6)]
    assert (await person[0]).reply == "done"
    await engine.close()
    # only TURNS_PER_CALL_SLOT events had fired when the person wrote: the person's turn came next
    assert asked.index("person") == TURNS_PER_CALL_SLOT, asked
    # the events that stayed due while there was no room count that wait as their turns' queue time:
    # at least the minute of the answer they waited for
    assert all(q >= 60 for q in queued[TURNS_PER_CALL_SLOT:]), queued
    assert all(q < 60 for q in queued[:TURNS_PER_CALL_SLOT]), queued
