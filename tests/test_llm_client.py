"""The model client's protocol edges, against the loopback fake."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from memory import recall
from memory.config import EngineSettings
from memory.engine import Engine
from memory.llm import MAX_BODY_BYTES, ContextOverflowError, LLMClient, LLMError, is_context_overflow, parse_chat
from tests.fakeopenai import Delay, Drip, Error, FakeOpenAI, call, reply

ASK = [{"role": "user", "content": "x"}]
TRANSPORTS: dict[str, Callable[[], httpx.AsyncBaseTransport | None]] = {"httpx": lambda: None, "aiohttp": AiohttpTransport}


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait for a condition the test cannot await directly (a request reaching the fake, a log line)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "status, body",
    [
        (
            400,
            '{"error": {"message": "This model\'s maximum context length is 4096 tokens. However, you requested 5000 tokens", "code": "context_length_exceeded"}}',
        ),  # OpenAI
        (
            400,
            '{"object": "error", "message": "This model\'s maximum context length is 8192 tokens. However, you requested 9000 tokens (8000 in the messages, 1000 in the completion).", "code": 400}',
        ),  # vLLM
        (
            400,
            '{"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it", "type": "exceed_context_size_error"}}',
        ),  # llama.cpp
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
    legacy = parse_chat(
        {
            "choices": [
                {
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "function_call": {"name": "send_message", "arguments": {"message": "hi"}},
                    }
                }
            ]
        }
    )
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
    odd = parse_chat(
        {
            "choices": [
                {
                    "message": {
                        "content": 42,
                        "tool_calls": ["junk", {"function": "nope"}, {"function": {"name": "send_message", "arguments": [1]}}],
                    }
                }
            ],
            "usage": {"prompt_tokens": "many"},
        }
    )
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


async def test_a_proxy_from_the_environment_is_used(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    # the model calls skip httpx's client for speed, except through a proxy: the base URL here
    # cannot be reached, and the fake answers as the proxy (it reads the absolute-form target's path)
    monkeypatch.setenv("HTTP_PROXY", fake.url.removesuffix("/v1"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    fake.push(reply("through the proxy"))
    proxied = LLMClient("http://model.invalid/v1", max_retries=0)
    try:
        result = await proxied.chat("m", [{"role": "user", "content": "x"}])
    finally:
        await proxied.aclose()
    assert result.content == "through the proxy"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_answer_past_the_size_limit_is_refused_once_not_read_whole(fake: FakeOpenAI, transport: str) -> None:
    # valid JSON, all of it padding: read whole, it would parse (and fail later for holding no answer)
    padded = " " * MAX_BODY_BYTES + "{}"
    fake.push(Error(200, padded), Error(500, padded), reply("next"))
    client = LLMClient(fake.url, max_retries=2, retry_budget=5, transport=TRANSPORTS[transport]())
    for _ in range(2):  # an answer and an error page alike
        with pytest.raises(LLMError, match=f"^the model endpoint's answer is larger than {MAX_BODY_BYTES >> 20} MiB$"):
            await client.chat("m", ASK)
    assert len(fake.requests) == 2  # not asked again: it would come as large
    assert (await client.chat("m", ASK)).content == "next"
    fake.fail_models = Error(200, padded)
    assert await client.get_json(fake.url + "/models", 5) is None  # nor read whole when the server describes itself
    await client.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dripping_endpoint_hits_the_whole_call_deadline_and_frees_its_slot(fake: FakeOpenAI, transport: str) -> None:
    # a byte every 0.05 s never trips a per-read timeout of 0.5 s; the answer would take ~10 s
    fake.push(Drip(0.05), reply("next"))
    client = LLMClient(fake.url, timeout=0.5, max_retries=0, max_concurrent=1, transport=TRANSPORTS[transport]())
    with pytest.raises(LLMError, match="timed out after 0.5 s") as failed:
        await asyncio.wait_for(client.chat("m", ASK), 5)
    assert failed.value.seconds >= 0.5
    assert (await asyncio.wait_for(client.chat("m", ASK), 5)).content == "next"  # the only slot is free again
    await client.aclose()


async def test_abort_ends_calls_in_flight_queued_and_pausing(fake: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    fake.push(Drip(0.5))
    client = LLMClient(fake.url, timeout=60, max_concurrent=1)
    in_flight = asyncio.create_task(client.chat("m", ASK))
    await until(lambda: fake.dripping)
    queued = asyncio.create_task(client.chat("m", ASK))  # waits for the only slot
    pausing_client = LLMClient(fake.url, timeout=60, max_retries=5, retry_budget=120)
    fake.push(Error(503, "overloaded", {"Retry-After": "30"}))
    pausing = asyncio.create_task(pausing_client.chat("m", ASK))
    await until(lambda: "retrying in 30.0 s" in caplog.text)
    client.abort()
    pausing_client.abort()
    for task in (in_flight, queued, pausing):
        with pytest.raises(LLMError, match="^shutting down$"):
            await asyncio.wait_for(task, 5)
    with pytest.raises(LLMError, match="^shutting down$"):
        await client.chat("m", ASK)
    assert len(fake.chat_requests) == 2  # the queued call and the late one never reached the endpoint
    await client.aclose()
    await pausing_client.aclose()


SECRET_KEY = "sk-live-0123456789abcdef"


def echo_key(fake: FakeOpenAI) -> Callable[[dict[str, Any]], Error]:
    """What some gateways do: quote the credentials they refused."""
    return lambda body: Error(
        401, {"error": {"message": f"Incorrect API key provided: {fake.request_headers[-1].get('Authorization')}"}}
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_secrets_stay_out_of_errors_and_the_log(fake: FakeOpenAI, caplog: pytest.LogCaptureFixture, transport: str) -> None:
    caplog.set_level(logging.DEBUG)
    fake.default = echo_key(fake)
    client = LLMClient(fake.url, api_key=SECRET_KEY, transport=TRANSPORTS[transport]())
    with pytest.raises(LLMError) as refused:
        await client.chat("m", ASK)
    assert str(refused.value) == "HTTP 401 from the model endpoint: Incorrect API key provided: Bearer [redacted]"
    assert "Bearer [redacted]" in caplog.text  # the body is logged, redacted
    await client.aclose()

    # credentials in the URL: in the httpx request line when the endpoint answers, in the error when it is down
    fake.default = lambda body: reply("ok")
    with_user = LLMClient(fake.url.replace("http://", "http://alice:pa55-w0rd@"), transport=TRANSPORTS[transport]())
    assert (await with_user.chat("m", ASK)).content == "ok"
    assert fake.request_headers[-1]["Authorization"] == "Basic " + base64.b64encode(b"alice:pa55-w0rd").decode()
    await with_user.aclose()
    down = LLMClient(
        "http://alice:pa55-w0rd@127.0.0.1:9/v1",
        api_key=SECRET_KEY,
        max_retries=1,
        retry_budget=2,
        transport=TRANSPORTS[transport](),
    )
    with pytest.raises(LLMError, match="cannot reach http://127.0.0.1:9/v1/") as unreachable:
        await down.chat("m", ASK)
    await down.aclose()
    for text in (str(unreachable.value), caplog.text):
        assert SECRET_KEY not in text and "pa55-w0rd" not in text and "alice" not in text


def settings_for(tmp_path: Path, fake: FakeOpenAI, **over: Any) -> EngineSettings:
    values: dict[str, Any] = dict(
        database_path=tmp_path / "engine.db",
        llm_base_url=fake.url,
        llm_model="fake-model",
        llm_timeout=5,
        llm_max_retries=1,
        llm_retry_budget=5,
    )
    return EngineSettings(_env_file=None, **(values | over))  # type: ignore[call-arg]


@pytest.mark.parametrize("credentials", ["key", "url"])
async def test_an_echoed_key_never_reaches_memory_the_prompt_or_the_export(
    tmp_path: Path, fake: FakeOpenAI, credentials: str
) -> None:
    if credentials == "key":
        engine = await Engine.open(settings_for(tmp_path, fake, llm_api_key=SECRET_KEY))
        secrets = [SECRET_KEY]
    else:  # user:password@ in the URL travels as a Basic header, which the gateway quotes in base64
        url = fake.url.replace("http://", f"http://ann:{SECRET_KEY}@")
        engine = await Engine.open(settings_for(tmp_path, fake, llm_base_url=url))
        secrets = [SECRET_KEY, base64.b64encode(f"ann:{SECRET_KEY}".encode()).decode()]
    fake.push(echo_key(fake))
    failed = await engine.send("dm:1", recall.Message(role="user", content="hello", author="ann", author_id="1"))
    assert failed.outcome == "error" and "HTTP 401" in failed.error
    fake.push(reply("back again"))
    assert (
        await engine.send("dm:1", recall.Message(role="user", content="again", author="ann", author_id="1"))
    ).reply == "back again"
    prompt = json.dumps(fake.chat_requests[-1])
    assert "HTTP 401 from the model endpoint" in prompt  # the failure is in the prompt, the key is not
    exported = json.dumps(await engine.memory.export("dm:1"))
    await engine.close()
    # the endpoint's own words are for the log only: memory keeps the status
    assert "Incorrect API key provided" not in exported and "Incorrect API key provided" not in prompt
    for text in (failed.error, prompt, exported):
        for secret in secrets:
            assert secret not in text


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 1e20, "completion_tokens": 5},
        {"prompt_tokens": -3, "completion_tokens": 5},
        {"prompt_tokens": 12, "completion_tokens": "lots"},
        {"prompt_tokens": 12, "completion_tokens": True},
    ],
)
async def test_unbelievable_usage_is_dropped_and_the_answer_kept(tmp_path: Path, fake: FakeOpenAI, usage: dict[str, Any]) -> None:
    engine = await Engine.open(settings_for(tmp_path, fake))
    fake.usage_body = usage
    fake.push(reply("a valid answer"))
    result = await engine.send("dm:1", recall.Message(role="user", content="hello", author="ann", author_id="1"))
    await engine.close()
    assert (result.reply, result.outcome, result.tokens_in, result.tokens_out) == ("a valid answer", "reply", 0, 0)


def test_token_counts_are_bounded_whole_numbers() -> None:
    def usage(prompt: Any, completion: Any = 1) -> Any:
        return parse_chat(
            {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
        ).usage

    assert usage(10**7) is not None and usage(10**7).prompt_tokens == 10**7 and usage(12.0).prompt_tokens == 12
    assert usage(None).prompt_tokens == 0
    assert [usage(v) for v in (10**7 + 1, 1e20, float("inf"), float("nan"), -1, "12", [3], False)] == [None] * 8


async def test_lone_surrogates_from_the_model_become_replacement_characters(fake: FakeOpenAI, client: LLMClient) -> None:
    # json.dumps in the fake sends each lone surrogate as a \ud83d escape, which orjson refuses
    fake.push(reply("broken emoji \ud83d"))
    assert (await client.chat("m", ASK)).content == "broken emoji \ufffd"
    fake.push(call("send_message\ud83d", '{"message": "outer \ud83d"}'), call("send_message", {"message": "inner \udc00"}))
    outer = (await client.chat("m", ASK)).tool_calls[0]
    inner = (await client.chat("m", ASK)).tool_calls[0]
    assert outer.name == "send_message\ufffd"
    assert json.loads(outer.arguments) == {"message": "outer \ufffd"}
    assert json.loads(inner.arguments) == {"message": "inner \ufffd"}  # escaped inside the arguments' own JSON
    for text in (outer.name, outer.arguments, inner.arguments, json.loads(inner.arguments)["message"]):
        text.encode("utf-8")  # raises on a lone surrogate


async def test_seconds_count_every_attempt(fake: FakeOpenAI) -> None:
    client = LLMClient(fake.url, max_retries=1, retry_budget=5)
    fake.push(Error(503, "busy", {"Retry-After": "0.3"}), reply("ok"))
    assert (await client.chat("m", ASK)).seconds >= 0.3
    fake.push(Error(503, "busy", {"Retry-After": "0.3"}), Error(503, "still busy"))
    with pytest.raises(LLMError, match="HTTP 503") as failed:
        await client.chat("m", ASK)
    assert failed.value.seconds >= 0.3
    await client.aclose()


async def test_bodies_nested_beyond_recursion_fail_as_llm_errors(fake: FakeOpenAI, client: LLMClient) -> None:
    deep: Any = None
    for _ in range(5000):
        deep = {"a": deep}
    parsed = parse_chat(
        {"choices": [{"message": {"content": "", "tool_calls": [{"function": {"name": "f", "arguments": deep}}]}}]}
    )
    assert parsed.tool_calls[0].arguments == "(arguments nested too deeply)"
    fake.push(Error(400, "[" * 100_000 + "]" * 100_000))
    with pytest.raises(LLMError, match=r"^HTTP 400 from the model endpoint: \[\[\[") as refused:
        await client.chat("m", ASK)
    assert len(str(refused.value)) < 300
