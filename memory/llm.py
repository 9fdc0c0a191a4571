"""The model client: OpenAI-compatible chat completions and embeddings over httpx.

One long-lived `httpx.AsyncClient`; retries with backoff and jitter on timeouts,
connection errors, 429 and 5xx, bounded in count and in total time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

log = logging.getLogger(__name__)


class LLMError(Exception):
    """The endpoint failed in a way retrying did not fix; str() is short and readable."""


class ContextOverflowError(LLMError):
    """The request was larger than the model's context window."""


# How OpenAI, vLLM, llama.cpp, Ollama, TGI and others say "your prompt is too long".
_OVERFLOW = re.compile(
    r"context_length_exceeded|maximum context length|context length|context window"
    r"|exceeds? the (?:available )?context|exceed_context_size|prompt is too long|prompt too long"
    r"|too many tokens|input is too long|reduce the length|tokens \+ `?max_new_tokens",
    re.IGNORECASE,
)


def is_context_overflow(status: int, body: str) -> bool:
    return status in (400, 413, 422, 500) and bool(_OVERFLOW.search(body))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # raw text as the model produced it; may not be valid JSON

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ChatResult:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage | None = None
    seconds: float = 0.0


class LLMClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "",
        timeout: float = 120.0,
        max_retries: int = 4,
        retry_budget: float = 60.0,
        max_concurrent: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        # parsed once: httpx parses a URL given as text on every request
        self._urls = {path: httpx.URL(self.base_url + path) for path in ("chat/completions", "embeddings")}
        self._headers = httpx.Headers({"Content-Type": "application/json"})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._http = httpx.AsyncClient(timeout=self._timeout, transport=transport)
        self.max_retries = max_retries
        self.retry_budget = retry_budget
        # a global cap on model calls in flight, shared by all agents
        self._slots = asyncio.Semaphore(max_concurrent)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> ChatResult:
        body: dict[str, Any] = {"model": model, "messages": messages}
        if tools:
            body["tools"] = tools
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        started = time.perf_counter()
        data = await self._post("chat/completions", body)
        result = parse_chat(data)
        result.seconds = time.perf_counter() - started
        return result

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        data = await self._post("embeddings", {"model": model, "input": texts})
        try:
            items = sorted(data["data"], key=lambda d: d.get("index", 0))
            vectors = [[float(x) for x in item["embedding"]] for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise LLMError(f"embeddings endpoint returned an unexpected body ({exc!r})") from None
        if len(vectors) != len(texts):
            raise LLMError(f"embeddings endpoint returned {len(vectors)} vectors for {len(texts)} inputs")
        return vectors

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = orjson.dumps(body)
        deadline = time.monotonic() + self.retry_budget
        attempt = 0
        while True:
            try:
                # built here, not by client.post(), which merges URLs, headers and cookies
                # on every call: ~70 of its ~230 µs of CPU per call on loopback
                request = httpx.Request(
                    "POST", self._urls[path], headers=self._headers, content=data,
                    extensions={"timeout": self._timeout.as_dict()},
                )
                async with self._slots:
                    response = await self._http.send(request)
            except httpx.TimeoutException as exc:
                cause = exc.__cause__
                # the aiohttp transport reports a refused connection as a timeout
                if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
                    problem, wait = f"cannot reach {self.base_url} ({cause})", None
                else:
                    problem, wait = f"timed out after {self._timeout.read:.0f} s", None
            except httpx.TransportError as exc:
                problem, wait = f"cannot reach {self.base_url} ({type(exc).__name__}: {exc})", None
            else:
                if response.status_code < 300:
                    try:
                        return orjson.loads(response.content)
                    except ValueError as exc:  # orjson also refuses lone surrogates, which some servers send
                        raise LLMError(f"{path} returned a body that is not valid JSON ({exc}): {response.text[:200]!r}") from None
                text = response.text
                if is_context_overflow(response.status_code, text):
                    raise ContextOverflowError(_short(response.status_code, text))
                if response.status_code != 429 and response.status_code < 500:
                    raise LLMError(_short(response.status_code, text))
                problem, wait = _short(response.status_code, text), _retry_after(response)
            attempt += 1
            backoff = wait if wait is not None else random.uniform(0, min(8.0, 0.5 * 2**attempt))
            if attempt > self.max_retries or time.monotonic() + backoff > deadline:
                raise LLMError(f"{path}: {problem} (gave up after {attempt} attempts)")
            log.warning("%s: %s; retrying in %.1f s", path, problem, backoff)
            await asyncio.sleep(backoff)


def _short(status: int, text: str) -> str:
    try:
        error = json.loads(text).get("error", text)
        message = error.get("message", error) if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = text
    return f"HTTP {status}: {str(message).strip()[:300]}"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_chat(data: dict[str, Any]) -> ChatResult:
    """Read a chat completion, tolerating servers that bend the protocol."""
    try:
        message = data["choices"][0]["message"]
        if not isinstance(message, dict):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise LLMError(f"chat completion without a message: {json.dumps(data)[:200]}") from None
    calls: list[ToolCall] = []
    raw_calls = message.get("tool_calls") or []
    if not raw_calls and isinstance(message.get("function_call"), dict):  # the pre-tools protocol
        raw_calls = [{"function": message["function_call"]}]
    for raw in raw_calls if isinstance(raw_calls, list) else []:
        fn = raw.get("function") if isinstance(raw, dict) else None
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments", "")
        if not isinstance(args, str):  # some servers send an object instead of a JSON string
            args = json.dumps(args)
        calls.append(ToolCall(id=str(raw.get("id") or f"call_{uuid.uuid4().hex[:12]}"), name=str(fn.get("name", "")), arguments=args))
    usage = None
    if isinstance(data.get("usage"), dict):
        try:
            usage = Usage(int(data["usage"].get("prompt_tokens") or 0), int(data["usage"].get("completion_tokens") or 0))
        except (TypeError, ValueError):
            usage = None
    return ChatResult(content=_text(message.get("content")), tool_calls=calls, usage=usage)


def _text(content: Any) -> str:
    """Content as text: some servers send a list of parts ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return content if isinstance(content, str) else str(content)
