"""The model client's protocol edges, against the loopback fake."""

from __future__ import annotations

import asyncio
import time

import pytest

from memory.llm import ContextOverflowError, LLMClient, LLMError, is_context_overflow, parse_chat
from tests.fakeopenai import Delay, Error, FakeOpenAI, reply


@pytest.mark.parametrize(
    "status, body",
    [
        (400, '{"error": {"message": "This model\'s maximum context length is 4096 tokens. However, you requested 5000 tokens", "code": "context_length_exceeded"}}'),  # OpenAI
        (400, '{"object": "error", "message": "This model\'s maximum context length is 8192 tokens. However, you requested 9000 tokens (8000 in the messages, 1000 in the completion).", "code": 400}'),  # vLLM
        (400, '{"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it", "type": "exceed_context_size_error"}}'),  # llama.cpp
        (500, '{"error": {"message": "prompt too long; exceeded max context length by 120 tokens"}}'),  # Ollama
        (422, '{"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096"}'),  # TGI
    ],
)
def test_context_overflow_wordings(status: int, body: str) -> None:
    assert is_context_overflow(status, body)


def test_other_errors_are_not_overflow() -> None:
    assert not is_context_overflow(400, '{"error": {"message": "invalid model"}}')
    assert not is_context_overflow(401, '{"error": {"message": "context length fine, bad key"}}')


def test_lenient_parsing() -> None:
    legacy = parse_chat({"choices": [{"message": {"role": "assistant", "content": None, "function_call": {"name": "send_message", "arguments": {"message": "hi"}}}}]})
    assert legacy.tool_calls[0].name == "send_message" and legacy.tool_calls[0].arguments == '{"message": "hi"}'
    assert legacy.tool_calls[0].id.startswith("call_") and legacy.usage is None
    with pytest.raises(LLMError, match="without a message"):
        parse_chat({"choices": []})


async def test_no_usage_and_concurrency_cap() -> None:
    fake = await FakeOpenAI(usage=False).start()
    fake.default = lambda body: Delay(0.2, reply("ok"))
    client = LLMClient(fake.url, max_concurrent=2)
    results = await asyncio.gather(*(client.chat("m", [{"role": "user", "content": "x"}]) for _ in range(4)))
    assert all(r.content == "ok" and r.usage is None for r in results)
    assert fake.max_in_flight == 2
    await client.aclose()
    await fake.stop()


async def test_retry_budget_bounds_total_time(fake: FakeOpenAI) -> None:
    fake.default = lambda body: Error(503, "overloaded", {"Retry-After": "5"})
    client = LLMClient(fake.url, max_retries=10, retry_budget=1.0)
    started = time.monotonic()
    with pytest.raises(LLMError, match="HTTP 503"):
        await client.chat("m", [{"role": "user", "content": "x"}])
    assert time.monotonic() - started < 1.0  # a Retry-After past the budget is not waited for
    fake.default = lambda body: Error(400, {"error": {"message": "maximum context length is 10 tokens"}})
    with pytest.raises(ContextOverflowError):
        await client.chat("m", [{"role": "user", "content": "x"}])
    await client.aclose()


def test_odd_message_shapes_are_normalised() -> None:
    parts = parse_chat({"choices": [{"message": {"content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}}]})
    assert parts.content == "Hello"
    odd = parse_chat({"choices": [{"message": {"content": 42, "tool_calls": ["junk", {"function": "nope"}, {"function": {"name": "send_message", "arguments": [1]}}]}}],
                      "usage": {"prompt_tokens": "many"}})
    assert odd.content == "42" and [c.name for c in odd.tool_calls] == ["send_message"] and odd.usage is None
    with pytest.raises(LLMError):
        parse_chat({"choices": [{"message": None}]})


async def test_aiohttp_transport_keeps_errors_readable(fake: FakeOpenAI) -> None:
    from httpx_aiohttp import AiohttpTransport

    down = LLMClient("http://127.0.0.1:9/v1", max_retries=1, retry_budget=2, transport=AiohttpTransport())
    with pytest.raises(LLMError, match="cannot reach http://127.0.0.1:9/v1"):
        await down.chat("m", [{"role": "user", "content": "x"}])
    await down.aclose()
    slow = LLMClient(fake.url, timeout=0.2, max_retries=0, transport=AiohttpTransport())
    fake.push(Delay(1.0, reply("late")))
    with pytest.raises(LLMError, match="timed out"):
        await slow.chat("m", [{"role": "user", "content": "x"}])
    await slow.aclose()
