"""Streamed replies: the model's SSE read into the same answer, and the reply shown in Discord
while it is written (posted, edited at most once per interval, continued past 2,000 characters),
through the real discord.py against the fake Discord."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.client import MnemoBot
from bot.config import BotSettings
from bot.format import split_message
from bot.streaming import StreamedReply
from memory import recall, replies
from memory.agent import APOLOGY
from memory.engine import Engine
from memory.llm import ContextOverflowError, LLMClient, LLMError
from memory.streaming import MAX_STREAMED_CALLS, MAX_STREAMED_CHARS, SNAPSHOT_EVERY, PartialString
from tests.fakediscord import FakeDiscord
from tests.fakeopenai import Broken, Error, Events, FakeOpenAI, call, calls, reasoning, reply, thinking, with_usage
from tests.test_agent_loop import make_settings
from tests.test_bot import bot_settings, fake_discord, running  # noqa: F401  (fixture)
from tests.test_cli import base_env, run_cli
from tests.test_intake import occupy_turn_slots

SEND = [{"type": "function", "function": {"name": "send_message", "parameters": {"type": "object"}}}]
LONG = "Here is a longer answer, written a few words at a time so that it streams. " * 4
MONOLOGUE = "I should look this up in my memory before I answer."


def seen(result: Any) -> tuple[Any, ...]:
    return (
        result.content,
        [(c.name, c.arguments) for c in result.tool_calls],
        result.reasoning,
        result.finish_reason,
        result.usage,
    )


@pytest.mark.parametrize(
    "answer",
    [
        call("send_message", {"message": LONG}, content=MONOLOGUE),
        calls(
            ("core_memory_append", {"label": "human", "content": "Likes tea."}, None),
            ("send_message", {"message": "Noted!"}, None),
        ),
        reply(LONG),
        reasoning("Let me think about tea.", "Tea it is."),
        thinking("Hidden thought.", "Shown answer."),
        with_usage(reply("no usage sent"), None),
    ],
)
async def test_a_streamed_answer_reads_as_the_whole_one(fake: FakeOpenAI, client: LLMClient, answer: dict[str, Any]) -> None:
    fake.push(answer, answer)
    whole = await client.chat("m", [{"role": "user", "content": "hi"}], SEND)
    streamed = await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=lambda _: None)
    assert fake.streamed == 1 and fake.requests[-1]["stream"] is True
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}
    assert seen(streamed) == seen(whole)


async def test_only_the_send_message_text_is_passed_on_while_it_arrives(fake: FakeOpenAI, client: LLMClient) -> None:
    fake.chunk_chars = 3
    answer = call("send_message", {"message": 'He said "hi" \\ é😀 ' + LONG}, content=MONOLOGUE)
    answer["message"]["reasoning_content"] = "private reasoning"
    snapshots: list[str] = []
    fake.push(answer)
    await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=snapshots.append)
    final = json.loads(answer["message"]["tool_calls"][0]["function"]["arguments"])["message"].strip()
    assert len(snapshots) > 10 and snapshots[-1] == final
    assert all(final.startswith(s) for s in snapshots)  # only ever the reply, growing


async def test_text_written_before_a_tool_call_is_never_passed_on(fake: FakeOpenAI, client: LLMClient) -> None:
    """The model writes text first, then calls a tool: that text was inner monologue."""
    snapshots: list[str] = []
    fake.push(call("conversation_search", {"query": "tea"}, content=MONOLOGUE), reply(LONG))
    first = await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=snapshots.append)
    second = await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=snapshots.append)
    assert first.content == MONOLOGUE and first.tool_calls[0].name == "conversation_search"
    assert second.content == LONG  # a plain answer is shown when the turn ends, not while it arrives
    assert snapshots == []


async def test_a_broken_stream_is_asked_again_and_its_snapshots_start_over(fake: FakeOpenAI, client: LLMClient) -> None:
    snapshots: list[str] = []
    fake.push(Broken(6, call("send_message", {"message": "The first try, which breaks off halfway through."})))
    fake.push(call("send_message", {"message": "The second try."}))
    result = await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=snapshots.append)
    assert json.loads(result.tool_calls[0].arguments) == {"message": "The second try."}
    assert any(s.startswith("The first") for s in snapshots) and snapshots[-1] == "The second try."


@pytest.mark.parametrize("how", ["whole", "refused"])
async def test_a_server_that_does_not_stream_gets_whole_requests_from_then_on(
    fake: FakeOpenAI, client: LLMClient, how: str
) -> None:
    if how == "whole":
        fake.streams = False  # it ignores "stream" and answers with one JSON body
    else:
        fake.push(
            lambda body: Error(400, {"error": {"message": "Unsupported param: stream_options"}}) if body.get("stream") else None
        )
    fake.push(reply("one"), reply("two"))
    assert (await client.chat("m", [{"role": "user", "content": "hi"}], on_text=lambda _: None)).content == "one"
    assert (await client.chat("m", [{"role": "user", "content": "hi"}], on_text=lambda _: None)).content == "two"
    assert "stream" not in fake.chat_requests[-1] and fake.streamed == 0


async def test_an_unrelated_error_that_echoes_the_request_keeps_streaming_on(fake: FakeOpenAI, client: LLMClient) -> None:
    echo = {"detail": [{"type": "missing", "loc": ["body", "model"], "input": {"stream": True}}]}
    fake.push(Error(422, echo))
    with pytest.raises(LLMError):
        await client.chat("m", [{"role": "user", "content": "hi"}], on_text=lambda _: None)
    assert client.whole_only == set() and len(fake.chat_requests) == 1


@pytest.fixture
def cleaned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every text the reply snapshots clean (the real replies.clean_text, counted)."""
    lengths: list[int] = []
    clean_text = replies.clean_text

    def counted(text: str) -> str:
        lengths.append(len(text))
        return clean_text(text)

    monkeypatch.setattr(replies, "clean_text", counted)
    return lengths


async def test_a_long_streamed_reply_costs_time_in_proportion_to_its_length(
    fake: FakeOpenAI, client: LLMClient, cleaned: list[int]
) -> None:
    """Every snapshot used to read every reply from its start: 128k characters held the event loop 8 s.
    Each is now read where it left off, and not at all once the text shown reaches the reply's limit."""
    fake.chunk_chars = 16
    text = "".join(f"word{i} " for i in range(40_000))[:200_000]
    snapshots: list[str] = []
    fake.push(call("send_message", {"message": text}))
    result = await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=snapshots.append, shown_chars=3000)
    assert json.loads(result.tool_calls[0].arguments)["message"] == text  # the answer itself is whole
    assert text.startswith(snapshots[-1]) and len(snapshots[-1]) >= 3000
    assert len(snapshots) <= 3000 // SNAPSHOT_EVERY + 3
    assert sum(cleaned) < 10 * len(text)


async def test_many_reply_calls_at_once_cost_time_in_proportion_to_what_arrived(
    fake: FakeOpenAI, client: LLMClient, cleaned: list[int]
) -> None:
    """Thousands of send_message calls, each in one fragment: only the calls an answer runs are shown,
    only the one that changed is read again, and no more calls are kept than any answer may run."""
    fragments = [
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": i, "function": {"name": "send_message", "arguments": '{"message": "' + f"part {i:05} " * 3}}
                        ]
                    },
                }
            ]
        }
        for i in range(2000)
    ]
    snapshots: list[str] = []
    fake.push(Events([*fragments, {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}, "data: [DONE]"]))
    result = await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=snapshots.append, shown_calls=8)
    assert len(result.tool_calls) == MAX_STREAMED_CALLS
    assert snapshots[-1].count("part") == 8 * 3
    assert sum(cleaned) < 10 * sum(len(json.dumps(f)) for f in fragments)


def tool_chunk(**fragment: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, **fragment}]}}]}


@pytest.mark.parametrize(
    "flood",
    [
        [tool_chunk(function={"name": "n" * (MAX_STREAMED_CHARS + 1)})],  # a name
        [tool_chunk(id=f"{i}" + "c" * 100_000) for i in range(MAX_STREAMED_CHARS // 100_000 + 1)],  # ids
        [tool_chunk(function={"arguments": {"message": "x" * 100_000}}) for _ in range(MAX_STREAMED_CHARS // 100_000 + 1)],
    ],
    ids=["name", "ids", "object arguments"],
)
async def test_everything_a_stream_holds_counts_toward_the_size_of_an_answer(
    fake: FakeOpenAI, client: LLMClient, flood: list[dict[str, Any]]
) -> None:
    fake.default = Events([*flood, {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}, "data: [DONE]"])
    with pytest.raises(LLMError, match="past the size"):
        await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=lambda _: None)


async def test_a_function_name_is_cut_at_a_length_no_tool_has(fake: FakeOpenAI, client: LLMClient) -> None:
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    fake.push(Events([tool_chunk(function={"name": "n" * 10_000, "arguments": "{}"}), finish, "data: [DONE]"]))
    result = await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=lambda _: None)
    assert 0 < len(result.tool_calls[0].name) <= 256


@pytest.mark.parametrize("empty", [["data: [DONE]"], [": keep-alive", ": keep-alive"], []], ids=["done", "comments", "nothing"])
async def test_a_stream_that_carries_no_chunk_is_asked_again_and_streaming_stays_on(
    fake: FakeOpenAI, client: LLMClient, empty: list[str]
) -> None:
    """A proxy that timed out closes the stream cleanly with nothing in it: that says nothing about
    whether the server streams."""
    fake.push(Events(list(empty)), reply("answered"))
    result = await client.chat("m", [{"role": "user", "content": "hi"}], on_text=lambda _: None)
    assert result.content == "answered" and client.whole_only == set()
    assert fake.streamed == 2 and fake.chat_requests[-1]["stream"] is True


async def test_a_stream_of_events_that_are_not_chunks_turns_streaming_off(fake: FakeOpenAI, client: LLMClient) -> None:
    fake.push(Events([{"status": "working"}, "data: not json", "data: [DONE]"]), reply("whole"))
    assert (await client.chat("m", [{"role": "user", "content": "hi"}], on_text=lambda _: None)).content == "whole"
    assert client.whole_only == {"m"} and "stream" not in fake.chat_requests[-1]


async def test_an_overflow_reported_inside_the_stream_is_an_overflow(fake: FakeOpenAI, client: LLMClient) -> None:
    """vLLM and llama-server may report an error as an event of a stream already begun: an overflow
    must reach the turn as one, so it compacts, instead of being asked again as it is."""
    too_long = {"message": "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.", "code": 400}
    fake.default = Events([{"error": too_long}])
    with pytest.raises(ContextOverflowError) as raised:
        await client.chat("m", [{"role": "user", "content": "hi"}], on_text=lambda _: None)
    assert raised.value.limit == 4096 and len(fake.chat_requests) == 1


async def test_in_a_merged_turn_only_the_caller_whose_message_carries_the_reply_is_shown_it(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    """A's turn waits to begin behind other conversations' turns; B arrives meanwhile and the same
    turn answers both. B's result carries the reply: B's caller is shown it, A's (merged) nothing."""
    release = asyncio.Event()

    async def answer(body: dict[str, Any]) -> dict[str, Any]:
        if "others" in json.dumps(body["messages"][-1]):
            await release.wait()
            return reply("ok")
        return call("send_message", {"message": LONG})

    fake.default = answer
    engine = await Engine.open(make_settings(tmp_path, fake, max_concurrent_llm_calls=1))
    try:
        others = await occupy_turn_slots(engine)  # every turn slot is taken
        shown: dict[str, list[str]] = {"A": [], "B": []}
        first = asyncio.create_task(
            engine.send(
                "dm:1", recall.Message(role="user", content="first", author="u", author_id="1"), on_text=shown["A"].append
            )
        )
        agent = await engine.agent("dm:1")
        while await recall.count(engine.db, agent) < 1:  # stored; its turn waits to begin
            await asyncio.sleep(0.01)
        second = asyncio.create_task(
            engine.send(
                "dm:1", recall.Message(role="user", content="second", author="u", author_id="1"), on_text=shown["B"].append
            )
        )
        while await recall.count(engine.db, agent) < 2:
            await asyncio.sleep(0.01)
        release.set()
        a, b, *_ = await asyncio.gather(first, second, *others)
    finally:
        await engine.close()
    assert a.outcome == "merged" and b.reply == LONG.strip()
    assert shown["A"] == [] and shown["B"] and shown["B"][-1] == LONG.strip()


def test_a_json_string_is_read_while_it_arrives() -> None:
    arguments = json.dumps({"message": 'quote " slash \\ newline \n é 😀 tab\t'}, ensure_ascii=True)
    final = json.loads(arguments)["message"]
    reading = PartialString("message")
    for character in arguments:
        reading.feed(character)
        assert final.startswith(reading.value)
    assert reading.value == final
    other = PartialString("message")
    assert not other.feed('{"other": 1') and other.value == ""


# ---------------------------------------------------------------- in Discord


@pytest.fixture
def settings(tmp_path: Path, fake_discord: FakeDiscord, fake: FakeOpenAI) -> BotSettings:  # noqa: F811
    fake.chunk_chars = 6
    fake.stream_seconds = 1.0
    return bot_settings(tmp_path, fake_discord, fake, llm_retry_budget=5, llm_timeout=10, stream_edit_seconds=0.25)


@contextlib.asynccontextmanager
async def dm_bot(settings: BotSettings, fake_discord: FakeDiscord) -> AsyncIterator[tuple[MnemoBot, dict[str, Any], Any, str]]:
    user = fake_discord.add_user("alice")
    async with running(settings, fake_discord) as bot:
        dm = fake_discord.dm_channel(user["id"])

        async def ask(text: str) -> None:
            handled = bot.wait_for("message_handled", check=lambda m, _: m.content == text, timeout=15)
            await fake_discord.send_dm(user["id"], text)
            await handled

        yield bot, dm, ask, f"dm:{user['id']}"


def everything_shown(fake_discord: FakeDiscord, channel: dict[str, Any]) -> list[str]:
    """Every text the bot ever put in the channel: each post's first content and every edit."""
    shown = []
    for m in fake_discord.bot_messages(channel["id"], include_deleted=True):
        edits = [e["body"]["content"] for e in m["edits"] if "content" in e["body"]]
        shown += [*edits, m["content"]]
    return shown


def contents(fake_discord: FakeDiscord, channel: dict[str, Any]) -> list[str]:
    return [m["content"] for m in fake_discord.bot_messages(channel["id"])]


async def test_a_reply_is_edited_into_place_at_most_once_per_interval(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI
) -> None:
    fake.push(call("send_message", {"message": LONG}, content=MONOLOGUE))
    async with dm_bot(settings, fake_discord) as (bot, dm, ask, key):
        await ask("tell me something long")
        (message,) = fake_discord.bot_messages(dm["id"])
        assert message["content"] == LONG.strip()
        times = [e["at"] for e in message["edits"]]
        assert len(times) >= 2, "the reply was not shown while it was written"
        assert all(b - a >= settings.stream_edit_seconds for a, b in zip(times, times[1:]))
        assert message["edits"][0]["body"]["content"] != LONG.strip()  # posted before the model finished
        assert not any(MONOLOGUE in text for text in everything_shown(fake_discord, dm))
        stored = await bot.engine.memory.messages_since(key, 0)
        assert [m.tool_calls[0]["function"]["name"] for m in stored if m.tool_calls] == ["send_message"]


async def test_text_before_a_tool_call_never_reaches_discord(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI
) -> None:
    fake.push(
        call("conversation_search", {"query": "tea"}, content=MONOLOGUE + " " + LONG),
        call("send_message", {"message": "Found it: " + LONG}),
    )
    async with dm_bot(settings, fake_discord) as (_, dm, ask, _key):
        await ask("what did I say about tea?")
        assert contents(fake_discord, dm) == [("Found it: " + LONG).strip()]
        assert not any(MONOLOGUE in text for text in everything_shown(fake_discord, dm))


async def test_a_long_reply_goes_on_in_new_messages_with_its_code_block_reopened(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI
) -> None:
    fake.chunk_chars = 40
    code = "\n".join(f"    line_{i} = compute({i})  # a line of code" for i in range(70))
    text = "Here is the script:\n\n```python\n" + code + "\n```\n\n" + "And that is all of it. " * 40
    fake.push(call("send_message", {"message": text}))
    async with dm_bot(settings, fake_discord) as (_, dm, ask, _key):
        await ask("write me a long script")
        assert contents(fake_discord, dm) == split_message(text)
        assert len(contents(fake_discord, dm)) >= 3
        assert all(len(t) <= 2000 for t in everything_shown(fake_discord, dm)) and not fake_discord.rejected_requests
        first, second = fake_discord.bot_messages(dm["id"])[:2]
        assert first["content"].endswith("```") and second["content"].startswith("```python")


async def test_a_stream_that_breaks_is_answered_whole_and_stored_once(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI
) -> None:
    fake.push(Broken(25, call("send_message", {"message": "A first answer that never finishes " + LONG})))
    fake.push(call("send_message", {"message": "The answer that arrived whole. " + LONG}))
    async with dm_bot(settings, fake_discord) as (bot, dm, ask, key):
        await ask("hello")
        assert contents(fake_discord, dm) == [("The answer that arrived whole. " + LONG).strip()]
        stored = await bot.engine.memory.messages_since(key, 0)
        sends = [m for m in stored if m.tool_calls and m.tool_calls[0]["function"]["name"] == "send_message"]
        assert len(sends) == 1 and "arrived whole" in sends[0].tool_calls[0]["function"]["arguments"]


async def test_an_endpoint_failing_midway_leaves_a_short_error_not_half_a_reply(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI
) -> None:
    fake.push(
        Broken(25, call("send_message", {"message": "An answer cut off " + LONG})), Error(500, {"error": {"message": "down"}})
    )
    async with dm_bot(settings, fake_discord) as (_, dm, ask, _key):
        await ask("hello")
        assert contents(fake_discord, dm) == [APOLOGY]


@pytest.mark.parametrize("how", ["refused", "deleted"])
async def test_when_the_message_being_edited_is_refused_or_deleted_the_reply_is_sent_whole(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, how: str
) -> None:
    fake.push(call("send_message", {"message": LONG}))
    async with dm_bot(settings, fake_discord) as (_, dm, ask, _key):
        if how == "refused":
            fake_discord.refuse_edits = 1000
            await ask("hello")
        else:
            asking = asyncio.create_task(ask("hello"))
            (first,) = await fake_discord.wait_for(lambda f: f.bot_messages(dm["id"]))
            fake_discord.delete_message(first["id"])
            await asking
        assert contents(fake_discord, dm) == [LONG.strip()]  # one complete reply, nothing half-written beside it


async def test_with_streaming_off_the_reply_is_posted_once_and_never_edited(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI
) -> None:
    settings.stream_replies = False
    fake.push(call("send_message", {"message": LONG}))
    async with dm_bot(settings, fake_discord) as (_, dm, ask, _key):
        await ask("hello")
        (message,) = fake_discord.bot_messages(dm["id"])
        assert message["content"] == LONG.strip() and message["edits"] == []
        assert "stream" not in fake.chat_requests[-1]


async def test_chat_prints_the_reply_as_it_streams(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.push(call("send_message", {"message": LONG}))
    code, out, err = await run_cli("chat", env=base_env(tmp_path, fake), stdin="hello\n")
    assert code == 0, err
    assert f"bot> {LONG.strip()}\n" in out and fake.streamed == 1


async def test_typing_shows_until_the_first_text(settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI) -> None:
    fake.stream_seconds = 2.5  # the turn outlasts TYPING_AFTER by far; its first text comes well before it
    fake.push(call("send_message", {"message": LONG}))
    async with dm_bot(settings, fake_discord) as (_, dm, ask, _key):
        await ask("hello")
        assert contents(fake_discord, dm) == [LONG.strip()]
        assert fake_discord.typing == []  # stopped at the first text, before it was due


async def test_a_streamed_reply_cut_at_max_reply_chars_ends_with_the_whole_text_attached(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI
) -> None:
    fake.chunk_chars = 40
    long = "".join(f"line {i} of a very long answer.\n" for i in range(150))
    fake.push(call("send_message", {"message": long}))
    async with dm_bot(settings.model_copy(update={"max_reply_chars": 3000}), fake_discord) as (_, dm, ask, _key):
        await ask("tell me everything")
        sent = fake_discord.bot_messages(dm["id"])
        assert len(sent) == 2 and "cut: the reply has" in sent[-1]["content"]
        assert all(len(t) <= 2000 for t in everything_shown(fake_discord, dm)) and not fake_discord.rejected_requests
        (attached,) = sent[-1]["attachments"]
        assert attached["filename"] == "reply.txt"
        assert fake_discord.messages[sent[-1]["id"]]["edits"], "the reply was not streamed"


async def test_a_handler_cancelled_while_it_finishes_a_streamed_reply_still_finishes_it(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown's last resort cancels handlers: one that is putting the final text in place must not
    leave the reply half-written."""
    settings.stream_edit_seconds = 2.0  # the final edit waits this long after the last one
    finishing = asyncio.Event()
    finish = StreamedReply.finish

    async def watched(self: StreamedReply, final: str, whole: str | None = None) -> bool:
        if final:
            finishing.set()
        return await finish(self, final, whole)

    monkeypatch.setattr(StreamedReply, "finish", watched)
    fake.push(call("send_message", {"message": LONG}))
    async with dm_bot(settings, fake_discord) as (bot, dm, ask, _key):
        asking = asyncio.create_task(ask("hello"))
        await asyncio.wait_for(finishing.wait(), 15)
        bot.cancel_in_flight()
        await asking
        await fake_discord.wait_for(lambda f: contents(f, dm) == [LONG.strip()], timeout=10)


async def test_when_discord_cannot_be_reached_for_the_edits_the_reply_is_still_sent_whole(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI
) -> None:
    fake.push(call("send_message", {"message": LONG}))
    async with dm_bot(settings, fake_discord) as (_, dm, ask, _key):
        fake_discord.drop_writes = 1000  # every edit and every delete: the connection closes unanswered
        await ask("hello")
        shown = contents(fake_discord, dm)
        assert shown[-1] == LONG.strip() and len(shown) == 2  # what was shown could not be removed either


async def test_llama_servers_stream_shape_reads_as_its_whole_answer(fake: FakeOpenAI, client: LLMClient) -> None:
    """As llama-server (llama-cpp-python 0.3.36's) streams a call, captured: a role delta with
    content null, the name and the first argument text in one chunk, a usage chunk with no choices;
    and a name sent again whole, as llama.cpp's diffing may do, which must not be doubled."""
    first = {
        "index": 0,
        "id": "69k99",
        "type": "function",
        "function": {"name": "send_message", "arguments": '{"message": "Hello there'},
    }
    fake.push(
        Events(
            [
                {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}]},
                tool_chunk(function={"name": "send_message", "arguments": '!"'}),
                tool_chunk(function={"arguments": "}"}),
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
                {"choices": [], "usage": {"completion_tokens": 9, "prompt_tokens": 41, "total_tokens": 50}},
                "data: [DONE]",
            ]
        )
    )
    snapshots: list[str] = []
    result = await client.chat("m", [{"role": "user", "content": "hi"}], SEND, on_text=snapshots.append)
    (called,) = result.tool_calls
    assert (called.name, json.loads(called.arguments)) == ("send_message", {"message": "Hello there!"})
    assert snapshots[-1] == "Hello there!" and all("Hello there!".startswith(s) for s in snapshots)
    assert result.usage is not None and result.usage.prompt_tokens == 41
