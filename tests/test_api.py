"""engine.memory, the public memory API the bot and the CLI use, on a real engine, database and fake model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from memory import api, archival, recall
from memory.api import parse_ids
from memory.config import EngineSettings
from memory.documents import MAX_DOCUMENT_CHARS, Unreadable
from memory.engine import Engine
from tests.fakeopenai import Error, FakeOpenAI, call, reply


@pytest.fixture
async def engine(tmp_path: Path, fake: FakeOpenAI) -> AsyncIterator[Engine]:
    settings = EngineSettings(  # type: ignore[call-arg]
        _env_file=None,
        database_path=tmp_path / "api.db",
        llm_base_url=fake.url,
        llm_model="m",
        llm_timeout=5,
        llm_max_retries=1,
        llm_retry_budget=5,
    )
    opened = await Engine.open(settings)
    yield opened
    await opened.close()


def user(text: str) -> recall.Message:
    return recall.Message(role="user", content=text, author="ann", author_id="1001")


def is_consolidation(body: dict[str, Any]) -> bool:
    return body["messages"][0]["content"].startswith("You maintain the long-term memory")


def test_ids_are_ascii_digits_only() -> None:
    assert parse_ids("m12 p3, m4") == ([12, 4], [3])
    assert parse_ids("M12") == ([12], [])
    assert parse_ids("m١٢") is None  # Arabic-Indic digits: text to look for, not m12
    assert parse_ids("m１２") is None  # fullwidth digits
    assert parse_ids("m12 and more") is None


@pytest.mark.parametrize("erase", ["reset", "forget"])
async def test_consolidation_running_when_memory_is_erased_drops_its_notes(engine: Engine, fake: FakeOpenAI, erase: str) -> None:
    for i in range(20):
        await engine.record("dm:1", user(f"old message {i} about the secret plans"))
    consolidating, erased = asyncio.Event(), asyncio.Event()

    async def slow_consolidation(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] == "tool":
            return reply("done")
        consolidating.set()
        await erased.wait()  # the model answers only after the memory it was shown is gone
        return call("archival_memory_insert", {"content": "Notes: Ann's secret plans."})

    overflow = Error(400, {"error": {"message": "maximum context length exceeded", "code": "context_length_exceeded"}})
    fake.push(overflow, reply("SUMMARY: old messages"), reply("fits now"))
    fake.default = lambda body: slow_consolidation(body) if is_consolidation(body) else reply("ok")
    assert (await engine.send("dm:1", user("new"))).reply == "fits now"
    await consolidating.wait()
    if erase == "reset":
        await engine.memory.reset("dm:1", "all")
    else:
        found = await engine.memory.find("dm:1", "secret plans")
        assert len(found.message_ids) == 20
        assert await engine.memory.forget("dm:1", found.message_ids, found.passage_ids) == (20, 0)
    erased.set()
    await engine.wait_background()
    assert (await engine.memory.view("dm:1")).passages == 0
    assert (await engine.memory.search("dm:1", "consolidation")).messages.total == 0


async def test_a_long_ingest_lets_other_writes_commit_between_its_transactions(engine: Engine) -> None:
    sentence = "The warranty for model X{} lasts {} years and covers the hinge. "
    text = "".join(sentence.format(i, i % 7) for i in range(40_000))[:MAX_DOCUMENT_CHARS]
    await engine.agent("dm:1")
    other = await engine.agent("dm:2")
    ingest = asyncio.create_task(engine.memory.ingest("dm:1", "manual.txt", text.encode()))
    # the first of the ingest's transactions committed (readers see committed data only)
    while not await engine.db.fetchval("SELECT count(*) FROM passages"):
        await asyncio.sleep(0)

    def unrelated(c: Any) -> int:  # e.g. another person's message, queued while the ingest runs
        recall.insert(c, other, _prepared("hello"))
        return int(c.execute("SELECT count(*) FROM passages").fetchone()[0])

    passages_then = await engine.db.transact(unrelated)
    assert not ingest.done()
    done = await ingest
    assert passages_then < done.passages
    assert done.passages == await engine.db.fetchval("SELECT count(*) FROM passages") > archival.TRANSACTION_PIECES * 10
    assert (await engine.memory.search("dm:1", "X39999 hinge")).passages.hits


def _prepared(text: str) -> list[recall.Message]:
    messages = [user(text)]
    recall.prepare(messages)
    return messages


async def test_ingest_refuses_what_it_cannot_read(engine: Engine) -> None:
    with pytest.raises(Unreadable, match="can't read `photo.png`"):
        await engine.memory.ingest("dm:1", "photo.png", b"\x89PNG....")
    with pytest.raises(Unreadable, match="no text"):
        await engine.memory.ingest("dm:1", "empty.txt", b"  \x00 \n")
    with pytest.raises(Unreadable, match="not a PDF I can read"):
        await engine.memory.ingest("dm:1", "broken.pdf", b"%PDF-1.4 nothing else")
    assert (await engine.memory.view("dm:1")).passages == 0


async def test_listen_option_persists_and_its_cache_stays_bounded(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "OPTION_CACHE", 3)
    assert await engine.memory.listening("channel:1") is False
    await engine.memory.set_listening("channel:1", True)
    assert await engine.memory.listening("channel:1") is True
    for i in range(2, 8):
        assert await engine.memory.listening(f"channel:{i}") is False
    assert len(engine.memory._options) == 3
    assert await engine.memory.listening("channel:1") is True  # left the cache: read from the database
    await engine.memory.set_meta("discord_commands_hash", "abc")
    assert await engine.memory.meta("discord_commands_hash") == "abc"
    assert await engine.memory.meta("nothing") is None


async def test_messages_since_and_set_block(engine: Engine, fake: FakeOpenAI) -> None:
    start = await engine.memory.last_message_id("dm:1")
    fake.push(call("send_message", {"message": "Hi Ann!"}))
    await engine.send("dm:1", user("hello"))
    shown = await engine.memory.messages_since("dm:1", start)
    assert [m.role for m in shown] == ["user", "assistant", "tool"]
    assert await engine.memory.messages_since("dm:1", shown[-1].id) == []
    assert "set" in await engine.memory.set_block("dm:1", "persona", "I am a pirate.")
    assert "limit" in await engine.memory.set_block("dm:1", "persona", "x" * 100_000)
    assert "no core memory block" in await engine.memory.set_block("dm:1", "nonsense", "x")
    assert (await engine.memory.view("dm:1")).blocks[0].value == "I am a pirate."
    with pytest.raises(ValueError, match="unknown scope"):
        await engine.memory.reset("dm:1", "everything")  # type: ignore[arg-type]


async def _consolidation_pending(engine: Engine, fake: FakeOpenAI, answer: Any) -> None:
    """A turn that evicts, so a consolidation pass starts; `answer` scripts that pass's model."""
    for i in range(20):
        await engine.record("dm:1", user(f"old message {i} about the secret plans"))
    overflow = Error(400, {"error": {"message": "maximum context length exceeded", "code": "context_length_exceeded"}})
    fake.push(overflow, reply("SUMMARY: old messages"), reply("fits now"))
    fake.default = lambda body: answer(body) if is_consolidation(body) else reply("ok")
    assert (await engine.send("dm:1", user("new"))).reply == "fits now"


async def test_notes_arriving_while_an_erase_is_under_way_are_dropped(
    engine: Engine, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    erasing, notes_sent = asyncio.Event(), asyncio.Event()
    real_transact = engine.db.transact

    async def paused(fn: Any, **options: Any) -> Any:  # the erase has begun, its transaction not yet run, when the notes come
        if getattr(fn, "__name__", "") == "erase":
            erasing.set()
            await notes_sent.wait()
        return await real_transact(fn, **options)

    async def consolidation(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] == "tool":
            return reply("done")
        await erasing.wait()
        notes_sent.set()
        return call("archival_memory_insert", {"content": "Notes: Ann's secret plans."})

    monkeypatch.setattr(engine.db, "transact", paused)
    await _consolidation_pending(engine, fake, consolidation)
    await engine.memory.reset("dm:1", "conversation")
    await engine.wait_background()
    assert (await engine.memory.view("dm:1")).passages == 0  # before, the note was written mid-erase and kept


async def test_the_consolidation_event_is_not_written_after_an_erase(engine: Engine, fake: FakeOpenAI) -> None:
    last_call, erased = asyncio.Event(), asyncio.Event()

    async def consolidation(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["role"] != "tool":
            return call("archival_memory_insert", {"content": "Notes: the plans."})
        last_call.set()  # the notes are in; the erase comes while the model says it is done
        await erased.wait()
        return reply("done")

    await _consolidation_pending(engine, fake, consolidation)
    await last_call.wait()
    await engine.memory.reset("dm:1", "conversation")
    erased.set()
    await engine.wait_background()
    assert (await engine.memory.search("dm:1", "consolidation")).messages.total == 0


async def test_a_caller_cancelled_while_an_agent_is_made_leaves_it_usable(engine: Engine, fake: FakeOpenAI) -> None:
    first = asyncio.create_task(engine.agent("dm:77"))
    second = asyncio.create_task(engine.agent("dm:77"))
    await asyncio.sleep(0)  # both wait for the one creation
    first.cancel()
    agent = await second
    assert (await engine.agent("dm:77")) == agent
    fake.default = reply("hi")
    assert (await engine.send("dm:77", user("hello"))).reply == "hi"


async def test_a_reset_failing_midway_erases_nothing(engine: Engine, fake: FakeOpenAI) -> None:
    fake.default = reply("ok")
    await engine.send("dm:1", user("remember the blue door"))
    await engine.memory.ingest("dm:1", "notes.txt", b"The blue door is at the end of the hall.")
    await engine.memory.set_block("dm:1", "human", "Ann likes blue doors.")
    # the archival part fails, as a full disk would, after the conversation and core were erased in the transaction
    await engine.db.execute("CREATE TRIGGER no_delete BEFORE DELETE ON passages BEGIN SELECT RAISE(ABORT, 'disk trouble'); END")
    with pytest.raises(Exception, match="disk trouble"):
        await engine.memory.reset("dm:1", "all")
    await engine.db.execute("DROP TRIGGER no_delete")
    view = await engine.memory.view("dm:1")
    assert view.messages >= 2 and view.passages == 1
    assert any(b.value == "Ann likes blue doors." for b in view.blocks)


async def test_forget_by_text_finds_replies_with_accents_and_quotes(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(call("send_message", {"message": 'Your "café au lait" order is noted.'}))
    await engine.send("dm:1", user("one coffee please"))
    found = await engine.memory.find("dm:1", 'Café au lait" order')
    assert len(found.message_ids) == 1  # the assistant message holding the reply (its JSON escapes é and ")
    assert await engine.memory.forget("dm:1", found.message_ids, []) == (1, 0)
    assert (await engine.memory.search("dm:1", "lait")).messages.total == 0


async def test_search_shows_people_what_was_said_never_the_agents_private_thoughts(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(
        call(
            "core_memory_append", {"label": "human", "content": "Ann's diagnosis is private"}, content="Ann told me her diagnosis"
        ),
        call("send_message", {"message": "Noted, Ann."}, content="I will keep the diagnosis to myself"),
    )
    await engine.send("dm:1", user("about my diagnosis"))
    found = (await engine.memory.search("dm:1", "diagnosis")).messages
    texts = [h.text for h in found.hits]
    assert texts and all("told me" not in t and "to myself" not in t and "private" not in t for t in texts)
    assert found.total == len(texts)  # the person's own message and the reply, nothing else
