"""Models as people run them (issue 9): thinking, calls written as text, servers without tools,
the server's real window, bounded output, background work giving way to turns."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from memory import core, recall, replies, tokens
from memory.engine import Engine
from memory.llm import ContextOverflowError, LLMClient
from memory.loop import EMPTY_ANSWER
from tests.fakeopenai import (
    REFUSALS,
    Delay,
    Error,
    FakeOpenAI,
    call,
    reasoning,
    refusal,
    reply,
    text_call,
    thinking,
    with_usage,
)
from tests.test_agent_loop import is_summarizer, make_settings, user

TOOLS = ("send_message", "core_memory_append", "archival_memory_search")


@pytest.fixture
async def engine(tmp_path: Path, fake: FakeOpenAI) -> AsyncIterator[Engine]:
    e = await Engine.open(make_settings(tmp_path, fake))
    yield e
    await e.close()


# --- reading an answer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "field", "text", "thought"),
    [
        ("<think>the user greets me</think>\n\nHello!", "", "Hello!", "the user greets me"),
        ("the template opened it</think>Hello!", "", "Hello!", "the template opened it"),
        ("Hello!<think>cut off mid-thought", "", "Hello!", "cut off mid-thought"),
        ("Hello!", "in a field of its own", "Hello!", "in a field of its own"),
        ("<think>only thinking</think>", "", "", "only thinking"),
    ],
)
def test_thinking_is_never_the_reply(content: str, field: str, text: str, thought: str) -> None:
    reading = replies.read(content, TOOLS, field)
    assert (reading.text, reading.thinking) == (text, thought)


@pytest.mark.parametrize("form", ["hermes", "llama", "mistral", "fenced"])
def test_each_textual_call_form_is_a_call(form: str) -> None:
    written = text_call(form, "core_memory_append", {"label": "human", "content": "likes tea"})["message"]["content"]
    reading = replies.read(written, TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in reading.calls] == [
        ("core_memory_append", {"label": "human", "content": "likes tea"})
    ]
    assert reading.text == ""


@pytest.mark.parametrize(
    "content",
    [
        'Use {"name": "value"} in your config file.',
        '```json\n{"name": "make_coffee", "arguments": {}}\n```',
        'JSON looks like {"a": [1, 2]} and that is all.',
    ],
)
def test_json_that_is_not_a_call_of_ours_stays_the_reply(content: str) -> None:
    reading = replies.read(content, TOOLS)
    assert reading.calls == [] and reading.text == content


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nmore", "Hi there"),
        ("[2026-12-02 11:09] you (terminal): Hi there", "Hi there"),
        ("Sure.\n[2026-12-02 11:10] ann (1001): and then I said", "Sure."),
        ("Hi<|eot_id|><|start_header_id|>user<|end_header_id|>", "Hi"),
        ('Done. <tool_call>{"name": "send_message", "arguments": {broken</tool_call>', "Done."),
    ],
)
def test_template_tokens_transcript_prefixes_and_broken_markup_are_removed(content: str, text: str) -> None:
    assert replies.read(content, TOOLS).text == text


def test_text_mode_describes_the_tools_in_fewer_tokens_than_their_schemas() -> None:
    from memory.tools import SCHEMAS

    system = [{"role": "system", "content": "x"}]
    described = replies.as_text_mode(system, SCHEMAS)[0]["content"]
    assert all(name in described for name in TOOLS)
    assert tokens.count(described) < tokens.count_tools(SCHEMAS)


# --- thinking and text calls in a turn ---------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        thinking("she wants tea", "Tea it is."),
        thinking("she wants tea", "Tea it is.", open_tag=False),
        reasoning("she wants tea", "Tea it is."),
        reasoning("she wants tea", "Tea it is.", "reasoning"),
    ],
)
async def test_thinking_stays_private_and_in_recall(engine: Engine, fake: FakeOpenAI, answer: dict[str, Any]) -> None:
    fake.push(answer, reply("ok"))
    result = await engine.send("dm:1", user("tea?"))
    assert result.reply == "Tea it is." and result.thinking == "she wants tea"
    await engine.send("dm:1", user("thanks"))
    sent_back = json.dumps(fake.chat_requests[-1]["messages"])
    assert "she wants tea" not in sent_back and "reasoning" not in sent_back
    found = await recall.search_messages(engine.db, await engine.agent("dm:1"), "wants tea")
    assert any("Private thought:" in hit.text for hit in found.hits)


async def test_an_answer_that_is_only_thinking_is_asked_again(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(thinking("hmm", ""), reply(f"[system event] {EMPTY_ANSWER}\nHere you go."))
    result = await engine.send("dm:1", user("hi"))
    assert result.reply == "Here you go."  # neither the thinking nor the engine's nudge reaches the person
    assert EMPTY_ANSWER in fake.chat_requests[1]["messages"][-1]["content"]


@pytest.mark.parametrize("form", ["hermes", "llama", "mistral", "fenced"])
async def test_a_call_written_as_text_edits_memory(engine: Engine, fake: FakeOpenAI, form: str) -> None:
    fake.push(text_call(form, "core_memory_append", {"label": "human", "content": "Ann likes tea."}), reply("Noted."))
    result = await engine.send("dm:1", user("I like tea"))
    assert result.reply == "Noted."
    human = {b.label: b.value for b in await core.blocks(engine.db, await engine.agent("dm:1"))}["human"]
    assert "Ann likes tea." in human
    # sent back as a structured call with "" (never null) content, and tools offered with tool_choice
    first, second = fake.chat_requests[0], fake.chat_requests[1]
    assert first["tool_choice"] == "auto" and first["max_tokens"] == engine.settings.llm_max_tokens
    assistant = [m for m in second["messages"] if m["role"] == "assistant"][-1]
    assert assistant["content"] == "" and assistant["tool_calls"][0]["function"]["name"] == "core_memory_append"


async def test_a_malformed_call_is_neither_posted_nor_silent(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(reply('<tool_call>{"name": "send_message", "arguments": {oops}</tool_call>'), reply("Hi!"))
    result = await engine.send("dm:1", user("hi"))
    assert result.reply == "Hi!" and "could not be read" in fake.chat_requests[1]["messages"][-1]["content"]


async def test_a_reply_cut_at_the_output_limit_says_so(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push({**reply("The answer is"), "finish_reason": "length"})
    result = await engine.send("dm:1", user("long story please"))
    assert result.reply is not None and result.reply.startswith("The answer is") and "output limit" in result.reply


# --- servers without native tools --------------------------------------------------------------


@pytest.mark.parametrize("server", sorted(REFUSALS))
async def test_a_refusal_of_tools_switches_to_text_mode_once(tmp_path: Path, fake: FakeOpenAI, server: str) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake))
    fake.push(
        refusal(server),
        text_call("hermes", "core_memory_append", {"label": "human", "content": "Ann likes tea."}),
        reply("Noted."),
    )
    result = await engine.send("dm:1", user("I like tea"))
    assert result.reply == "Noted."
    assert "tools" in fake.chat_requests[0] and all("tools" not in r for r in fake.chat_requests[1:])
    text_mode = fake.chat_requests[1]
    assert "<tool_call>" in text_mode["messages"][0]["content"] and "core_memory_append(" in text_mode["messages"][0]["content"]
    # the call and its result go back as text, not as tool messages the server cannot take
    fake.push(reply("Still here."))
    await engine.send("dm:1", user("hello again"))
    again = fake.chat_requests[-1]["messages"]
    assert all(m["role"] != "tool" and "tool_calls" not in m for m in again)
    assert any("[function result]" in m["content"] for m in again)
    await engine.close()


async def test_native_mode_names_the_fix_and_never_retries(tmp_path: Path, fake: FakeOpenAI) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake, tool_mode="native"))
    fake.default = refusal("vllm")
    result = await engine.send("dm:1", user("hi"))
    assert result.outcome == "error" and "--enable-auto-tool-choice" in result.error and len(fake.chat_requests) == 1
    await engine.close()


async def test_text_modes_first_request_is_no_larger_than_natives(tmp_path: Path, fake: FakeOpenAI) -> None:
    sizes = []
    for mode in ("native", "text"):
        engine = await Engine.open(make_settings(tmp_path, fake, tool_mode=mode, database_path=tmp_path / f"{mode}.db"))
        fake.push(reply("hi"))
        await engine.send("dm:1", user("hello"))
        body = fake.chat_requests[-1]
        sizes.append(tokens.count(json.dumps(body["messages"])) + tokens.count(json.dumps(body.get("tools", []))))
        await engine.close()
    assert sizes[1] <= sizes[0], sizes


# --- the real context window -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "window"),
    [
        ("props", 4096),
        ("vllm", 6000),
        ("ollama_num_ctx", 3000),
        ("ollama_arch", 4096),
        ("lmstudio", 5000),
        ("none", 8192),
    ],
)
async def test_the_servers_window_is_learned_at_start(tmp_path: Path, fake: FakeOpenAI, shape: str, window: int) -> None:
    if shape == "props":
        fake.props = {"default_generation_settings": {"n_ctx": 4096}}
    elif shape == "vllm":
        fake.model_fields = {"max_model_len": 6000}
    elif shape == "ollama_num_ctx":
        fake.ollama_show = {
            "parameters": "num_ctx                        3000\nstop <|im_end|>",
            "model_info": {"qwen2.context_length": 32768},
        }
    elif shape == "ollama_arch":
        fake.ollama_show = {"model_info": {"llama.context_length": 131072}}
    elif shape == "lmstudio":
        fake.lmstudio_models = {"data": [{"id": "fake-model", "loaded_context_length": 5000}]}
    engine = await Engine.open(make_settings(tmp_path, fake))
    assert engine.settings.context_window == window
    await engine.close()


async def test_a_configured_window_larger_than_the_servers_gives_way(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.props = {"default_generation_settings": {"n_ctx": 2048}}
    engine = await Engine.open(make_settings(tmp_path, fake, context_window=8192))
    assert engine.settings.context_window == 2048
    await engine.close()
    smaller = await Engine.open(make_settings(tmp_path, fake, context_window=1500))
    assert smaller.settings.context_window == 1500
    await smaller.close()


async def test_a_silent_server_does_not_hold_up_the_start(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.silent = True
    engine = await asyncio.wait_for(Engine.open(make_settings(tmp_path, fake)), 10)
    assert engine.settings.context_window == 8192
    await engine.close()


async def test_an_overflow_that_states_the_limit_teaches_the_window(engine: Engine, fake: FakeOpenAI) -> None:
    for n in range(6):
        fake.push(reply(f"ok {n}"))
        await engine.send("dm:1", user(f"message {n} " + "words " * 300))
    fake.push(
        Error(
            400, {"error": {"message": "This model's maximum context length is 2048 tokens. However, you requested 5000 tokens."}}
        )
    )
    fake.default = lambda body: reply("summary") if is_summarizer(body) else reply("fits now")
    result = await engine.send("dm:1", user("and now?"))
    assert result.reply == "fits now" and engine.settings.context_window == 2048


def test_llama_servers_context_error_is_an_overflow() -> None:
    from memory.llm import is_context_overflow, stated_limit

    assert is_context_overflow(500, '{"error":{"code":500,"message":"Context size has been exceeded.","type":"server_error"}}')
    assert stated_limit('{"error":{"type":"exceed_context_size_error","n_prompt_tokens":5000,"n_ctx":4096}}') == 4096


async def test_silent_truncation_is_reported_in_the_view(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(with_usage(reply("hi"), 100))
    await engine.send("dm:1", user("hello " + "there " * 800))
    view = await engine.memory.view("dm:1")
    assert "dropping the start of the prompt" in view.model_warning and "num_ctx" in view.model_warning


# --- summaries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [reply("<|im_start|>user\nwhat did I say?"), {**reply("Ann said she likes"), "finish_reason": "length"}, thinking("hm", "")],
)
async def test_a_summary_that_is_not_one_is_not_stored(tmp_path: Path, fake: FakeOpenAI, bad: dict[str, Any]) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake, context_window=2048))
    fake.default = lambda body: bad if is_summarizer(body) else reply("ok")
    for n in range(20):
        await engine.send("dm:1", user(f"message {n} " + "words " * 100))
    summary = await engine.db.fetchval("SELECT summary FROM agents WHERE key = ?", ("dm:1",), "")
    assert "<|im_start|>" not in summary and "she likes" not in summary and "hm" not in summary
    assert any(is_summarizer(r) for r in fake.chat_requests)
    await engine.close()


# --- background work gives way ------------------------------------------------------------------


async def test_background_calls_give_way_to_calls_people_wait_for(fake: FakeOpenAI) -> None:
    client = LLMClient(fake.url, max_concurrent=1, timeout=10)
    started = asyncio.Event()

    def answer(body: dict[str, Any]) -> Any:
        if body["messages"][0]["content"] == "background":
            started.set()
            return Delay(2.0, reply("consolidated"))
        return reply("for the person")

    fake.default = answer
    background = asyncio.create_task(client.chat("m", [{"role": "user", "content": "background"}], background=True))
    await asyncio.wait_for(started.wait(), 5)
    person = await asyncio.wait_for(client.chat("m", [{"role": "user", "content": "person"}]), 5)
    assert person.content == "for the person" and not background.done()
    assert (await background).content == "consolidated"
    asked = [r["messages"][0]["content"] for r in fake.chat_requests]
    assert asked == ["background", "person", "background"]  # it gave its slot up and started again
    await client.aclose()


async def test_consolidation_is_background_work_with_bounded_output(tmp_path: Path, fake: FakeOpenAI) -> None:
    engine = await Engine.open(make_settings(tmp_path, fake, context_window=2048))
    fake.default = lambda body: reply("a summary") if is_summarizer(body) else reply("ok")
    for n in range(20):
        await engine.send("dm:1", user(f"message {n} " + "words " * 100))
    await engine.wait_background()
    passes = [r for r in fake.chat_requests if r["messages"][0]["content"].startswith("You maintain")]
    assert passes and all(r["max_tokens"] == engine.settings.consolidation_max_tokens for r in passes)
    assert all("max_tokens" in r for r in fake.chat_requests)
    await engine.close()


async def test_a_tool_call_turn_sends_content_as_empty_text(engine: Engine, fake: FakeOpenAI) -> None:
    fake.push(call("archival_memory_search", {"query": "tea"}), reply("Nothing found."))
    await engine.send("dm:1", user("what do I like?"))
    assistant = [m for m in fake.chat_requests[1]["messages"] if m["role"] == "assistant"]
    assert assistant and all(m["content"] is not None for m in assistant)


def test_overflow_error_carries_the_stated_limit() -> None:
    assert ContextOverflowError("x", limit=4096).limit == 4096


async def test_a_model_that_never_calls_a_function_is_said_in_the_log_once(
    tmp_path: Path, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    from memory import serving
    from memory.config import EngineSettings
    from memory.engine import Engine

    settings = EngineSettings(  # type: ignore[call-arg]
        _env_file=None, database_path=tmp_path / "n.db", llm_base_url=fake.url, llm_model="m", llm_max_retries=0
    )
    engine = await Engine.open(settings)
    fake.default = reply("just chatting")
    with caplog.at_level(logging.WARNING, logger="memory.agent"):
        for i in range(serving.NEVER_CALLED_AFTER + 3):
            await engine.send("dm:1", recall.Message(role="user", content=f"hello {i}", author="ann", author_id="1"))
    await engine.close()
    said = [r for r in caplog.records if "without calling a function" in r.getMessage()]
    assert len(said) == 1 and "--jinja" in said[0].getMessage()
