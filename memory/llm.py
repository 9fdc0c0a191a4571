"""The model client: OpenAI-compatible chat completions and embeddings over httpx.

One long-lived `httpx.AsyncClient`; retries with backoff and jitter on timeouts,
connection errors, 429 and 5xx, bounded in count and in total time. Everything the
endpoint sends is untrusted: a body may drip forever, echo the API key, carry numbers
SQLite cannot store or text that is not valid Unicode.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies

import httpx
import orjson

from .images import carries_images
from .streaming import MAX_STREAMED_CALLS, NotAStream, StreamBroken, StreamFailed, StreamReader, is_event_stream
from .text import without_surrogates, without_surrogates_in

log = logging.getLogger(__name__)
# httpx logs every request's full URL at INFO, user:password@ included; its warnings are enough
logging.getLogger("httpx").setLevel(logging.WARNING)

# what a provider may plausibly report as a token count; beyond it the count is not believed
MAX_TOKEN_COUNT = 10**7
# the part of an endpoint's error message kept in LLMError (it is stored in memory and shown to the model)
ERROR_MESSAGE_CHARS = 200
# the part of an endpoint's error body written to the log
LOGGED_BODY_CHARS = 2000
# the most bytes one answer of an endpoint may have (decompressed): its time limit does not bound it, since a
# LAN carries gigabytes within LLM_TIMEOUT; the largest real ones, batches of embeddings, are a few MB
MAX_BODY_BYTES = 32 << 20
# shorter secrets would blank out ordinary words wherever they occur
MIN_SECRET_CHARS = 4
SHUTTING_DOWN = "shutting down"


class LLMError(Exception):
    """The endpoint failed in a way retrying did not fix.

    str() is one short sentence without secrets, for the log and the person's error; `brief` is
    the same without the endpoint's own words (an error body may quote anything), fit to store
    in memory and show the model; `seconds` is the time the call spent, all attempts and pauses
    between them included; `status` the endpoint's HTTP status when it answered with an error.
    """

    def __init__(self, message: str, *, seconds: float = 0.0, brief: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.seconds = seconds
        self.brief = brief if brief is not None else message
        self.status = status


class ContextOverflowError(LLMError):
    """The request was larger than the model's context window; `limit` is the window the
    server stated in its error, when it did."""

    def __init__(
        self, message: str, *, seconds: float = 0.0, brief: str | None = None, limit: int | None = None, status: int | None = None
    ) -> None:
        super().__init__(message, seconds=seconds, brief=brief, status=status)
        self.limit = limit


class _GaveWay(Exception):
    """A background attempt was ended so that a person's call could have the slot."""


class ToolsUnsupportedError(LLMError):
    """The server refuses the `tools` parameter (the model's template has none, or the server
    was started without tool parsing): retrying never helps; text tool mode does."""


class ImagesUnsupportedError(LLMError):
    """The server refuses image parts (a model without vision, or a server without image support):
    the same request without them goes through (memory/images.py)."""


class TooSlowError(LLMError):
    """The model did not finish within the timeout: usually it was still writing."""


# How OpenAI, vLLM, llama.cpp, Ollama, TGI and others say "your prompt is too long".
_OVERFLOW = re.compile(
    r"context_length_exceeded|maximum context length|context length|context window"
    r"|exceeds? the (?:available )?context|exceed_context_size|prompt is too long|prompt too long"
    r"|too many tokens|input is too long|reduce the length|tokens \+ `?max_new_tokens"
    r"|context size has been exceeded|exceeds? the context size",
    re.IGNORECASE,
)
# the window an overflow error states: OpenAI and vLLM in words, llama-server as "n_ctx"
_STATED_LIMIT = re.compile(
    r"(?:maximum context length|context length|context window|context size)\D{0,20}?(\d{3,8})\s*tokens"
    r'|"n_ctx"\s*:\s*(\d{3,8})',
    re.IGNORECASE,
)
# How Ollama, llama-server and vLLM refuse tools (DESIGN.md §8), and any message saying tools are unsupported.
_NO_TOOLS = re.compile(
    r"does not support tools|tools param requires --jinja|unsupported param: tools"
    r"|tool choice requires --enable-auto-tool-choice|tools? (?:are |is )?not supported|does not support (?:function|tool)"
    r"|tool[_ ]choice (?:is )?not supported",
    re.IGNORECASE,
)


# How OpenAI, llama-server (no --mmproj; HTTP 500), vLLM, Ollama (HTTP 500 or 400), LM Studio and older servers
# that take only text content refuse image parts (DESIGN.md §8).
_NO_IMAGES = re.compile(
    r"image_url is only supported by certain models|image input is not supported|not a multimodal model"
    r"|missing data required for image input|does not support (?:images?|image input|vision|multimodal)"
    r"|(?:images?|vision|multimodal)(?: input)? (?:are |is )?not (?:supported|enabled)"
    r"|cannot unmarshal array into [^\n]{0,80}content of type string",
    re.IGNORECASE,
)


# How a server refuses `stream` or `stream_options`: then it is asked for whole answers. Not any
# mention of "stream": validation errors (FastAPI's 422) echo the request, "stream": true included.
_NO_STREAMING = re.compile(
    r"stream(?:ing|_options)?['\"`]?\s*(?:is |are )?(?:not (?:supported|allowed|implemented|permitted)|unsupported)"
    r"|(?:unsupported|unknown|unrecognized|invalid|extra)\s+(?:param(?:eter)?|field|argument|key|option)s?\W{0,5}stream"
    r"|does not support stream|streaming is disabled"
    r'|extra_forbidden"\W+loc"\W+\[\W*body"\W*,\W*"stream',
    re.IGNORECASE,
)


class _NoStreaming(Exception):
    """The server does not stream, or streams in a way that cannot be read: ask it for whole answers."""


def is_context_overflow(status: int, body: str) -> bool:
    return status in (400, 413, 422, 500) and bool(_OVERFLOW.search(body))


def stated_limit(body: str) -> int | None:
    """The context window an overflow error names, if it names one."""
    match = _STATED_LIMIT.search(body)
    return int(match.group(1) or match.group(2)) if match else None


def refuses_tools(status: int, body: str) -> bool:
    return 400 <= status < 600 and bool(_NO_TOOLS.search(body))


def refuses_images(status: int, body: str) -> bool:
    return 400 <= status < 600 and bool(_NO_IMAGES.search(body))


# scheme://user:password@ (up to the last @ before the host's end: passwords may hold an @)
_URL_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")
REDACTED = "[redacted]"


def basic_auth(url: httpx.URL) -> str:
    """The credentials of `url` as an Authorization: Basic header carries them."""
    return base64.b64encode(f"{url.username}:{url.password}".encode()).decode()


def without_credentials(url: str) -> str:
    """The URL as it may be shown: user:password@ removed."""
    return _URL_CREDENTIALS.sub(r"\1", url)


class Redactor:
    """Removes the API key and the credentials of the endpoint URLs from a text: error bodies can
    echo the key, and transport errors can quote the URL."""

    def __init__(self, api_key: str = "", *urls: str) -> None:
        secrets = {api_key}
        for url in urls:
            parts = urlsplit(url)
            for part in (parts.username, parts.password):
                if part:
                    secrets.update((part, unquote(part)))
            if parts.username or parts.password:  # as the Authorization header carries them
                secrets.add(basic_auth(httpx.URL(url)))
        # longest first: a secret containing another is removed whole
        self._secrets = sorted((x for x in secrets if len(x) >= MIN_SECRET_CHARS), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _URL_CREDENTIALS.sub(r"\1", text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


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
    seconds: float = 0.0  # the whole call: waiting for a slot, every attempt and the pauses between them
    reasoning: str = ""  # `reasoning_content` or `reasoning`: private, never sent back
    finish_reason: str = ""  # "length": the answer was cut at max_tokens


def env_proxied() -> bool:
    """Whether the environment names an HTTP proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY)."""
    return any(scheme in getproxies() for scheme in ("http", "https", "all"))


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
        # credentials leave the URL, which is logged and quoted in errors, for the header: the
        # aiohttp transport also refuses a URL with credentials beside an Authorization header
        self.base_url = without_credentials(base_url.rstrip("/") + "/")
        self.redact = Redactor(api_key, base_url)
        # parsed once: httpx parses a URL given as text on every request
        self._urls = {path: httpx.URL(self.base_url + path) for path in ("chat/completions", "embeddings")}
        self._headers = httpx.Headers({"Content-Type": "application/json"})
        given = httpx.URL(base_url)
        if given.username or given.password:  # as httpx itself does, they win over the key
            self._headers["Authorization"] = "Basic " + basic_auth(given)
        elif api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # the limit of one attempt, from sending to the body's last byte: httpx's own timeouts are
        # per read, and an endpoint sending a byte at a time never trips them
        self.timeout = timeout
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        # model calls go to the transport itself: the client's layers (cookies, redirects, auth
        # flows, hooks), which an API call does not use, cost a fifth of a call's CPU. Through a
        # proxy from the environment they take the client, which knows how to reach it (when
        # it makes its own transport: httpx ignores the environment's proxies beside a given one).
        proxied = env_proxied()
        if transport is None and not proxied:
            transport = httpx.AsyncHTTPTransport()
        self._http = httpx.AsyncClient(timeout=self._timeout, transport=transport)
        self._direct = None if proxied else transport
        self.max_retries = max_retries
        self.retry_budget = retry_budget
        # a global cap on model calls in flight, shared by all agents
        self._slots = asyncio.Semaphore(max_concurrent)
        self._aborting = asyncio.Event()
        self._attempts: set[asyncio.Timeout] = set()
        # calls a person waits for (queued or in flight); background calls run only when there are none
        self._foreground = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._background_attempts: set[asyncio.Timeout] = set()
        self._preempted: set[asyncio.Timeout] = set()
        # models whose server does not stream (or streams unreadably): asked for whole answers from then on
        self.whole_only: set[str] = set()

    async def aclose(self) -> None:
        await self._http.aclose()

    def abort(self) -> None:
        """End the calls in flight and refuse new ones: each raises LLMError("shutting down").
        For shutdown, which must not wait on an endpoint that never finishes."""
        self._aborting.set()
        now = asyncio.get_running_loop().time()
        for attempt in self._attempts:
            attempt.reschedule(now)

    async def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        max_tokens: int | None = None,
        background: bool = False,
        on_text: Callable[[str], None] | None = None,
        shown_chars: int | None = None,
        shown_calls: int = MAX_STREAMED_CALLS,
    ) -> ChatResult:
        """One chat completion. `background`: work nobody waits for (consolidation); it runs only
        while no call a person waits for is queued or in flight, and gives way to one that comes.

        `on_text`: stream the answer, passing on each snapshot of its reply text as it grows
        (memory/streaming.py says which text that is). A server that does not stream is asked
        for whole answers, for this model from then on; the result is the same either way.
        `shown_chars`, `shown_calls`: the reply's length limit and the calls of an answer that are
        run; text past the one and calls past the other are never passed on."""
        body: dict[str, Any] = {"model": model, "messages": messages}
        if tools:
            # explicit: llama-cpp-python's server ignores tools without it (abetlen/llama-cpp-python#1338)
            body["tools"], body["tool_choice"] = tools, "auto"
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        started = time.perf_counter()
        try:
            reader = (
                StreamReader(on_text, shown_chars, shown_calls) if on_text is not None and model not in self.whole_only else None
            )
            try:
                data = await self._post("chat/completions", body, background=background, reader=reader)
            except _NoStreaming as exc:
                self._stop_streaming(model, str(exc))
                data = await self._post("chat/completions", body, background=background)
            else:
                if reader is not None and not reader.done:
                    self._stop_streaming(model, "it answered a stream request with a whole response")
            result = parse_chat(data)
        except LLMError as exc:
            exc.seconds = time.perf_counter() - started
            raise
        result.seconds = time.perf_counter() - started
        return result

    def _stop_streaming(self, model: str, why: str) -> None:
        if model not in self.whole_only:
            log.info("the model server does not stream %s (%s): asking for whole answers from now on", model, why)
            self.whole_only.add(model)

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        started = time.perf_counter()
        try:
            data = await self._post("embeddings", {"model": model, "input": texts})
            try:
                items = sorted(data["data"], key=lambda d: d.get("index", 0))
                vectors = [[float(x) for x in item["embedding"]] for item in items]
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise LLMError(f"the embeddings endpoint returned an unexpected body ({type(exc).__name__})") from None
            if len(vectors) != len(texts):
                raise LLMError(f"the embeddings endpoint returned {len(vectors)} vectors for {len(texts)} inputs")
        except LLMError as exc:
            exc.seconds = time.perf_counter() - started
            raise
        return vectors

    async def probe(
        self, method: str, url: str, timeout: float, body: dict[str, Any] | None = None, *, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """One request, within `timeout`, without retries: for asking a server about itself.
        (status, decoded JSON or the text); status 0 when it did not answer, or answered past MAX_BODY_BYTES."""
        try:
            async with asyncio.timeout(timeout):
                content = None if body is None else orjson.dumps(body)
                sent = self._headers if headers is None else httpx.Headers({**self._headers, **headers})
                async with self._http.stream(method, url, headers=sent, content=content) as response:
                    answer = await _body(response)
        except (TimeoutError, httpx.HTTPError, LLMError):
            return 0, None
        try:
            return response.status_code, orjson.loads(answer)
        except ValueError:
            return response.status_code, without_surrogates(answer.decode("utf-8", "replace"))

    async def get_json(self, url: str, timeout: float) -> Any:
        """A JSON document the server gives at `url`, or None."""
        status, data = await self.probe("GET", url, timeout)
        return data if 200 <= status < 300 else None

    async def post_json(self, url: str, body: dict[str, Any], timeout: float) -> Any:
        """As get_json (Ollama's /api/show is a POST)."""
        status, data = await self.probe("POST", url, timeout, body)
        return data if 200 <= status < 300 else None

    @contextlib.asynccontextmanager
    async def _slot(self, background: bool) -> AsyncIterator[None]:
        if background:
            while True:
                await self._idle.wait()
                await self._slots.acquire()
                if self._idle.is_set():
                    break
                self._slots.release()  # a person's call came while this one waited for the slot
            try:
                yield
            finally:
                self._slots.release()
            return
        self._foreground += 1
        self._idle.clear()
        now = asyncio.get_running_loop().time()
        for attempt in self._background_attempts:  # give way: the background call starts again later
            self._preempted.add(attempt)
            attempt.reschedule(now)
        try:
            async with self._slots:
                yield
        finally:
            self._foreground -= 1
            if not self._foreground:
                self._idle.set()

    async def _post(
        self, path: str, body: dict[str, Any], *, background: bool = False, reader: StreamReader | None = None
    ) -> dict[str, Any]:
        """The endpoint's answer; with `reader`, streamed (SSE) and gathered into the same shape.
        Raises _NoStreaming when the server refuses or garbles the stream."""
        if reader is not None:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        data = orjson.dumps(body)
        deadline = time.monotonic() + self.retry_budget
        attempt = 0
        while True:
            try:
                # built here, not by client.post(), which merges URLs, headers and cookies on every call
                request = httpx.Request(
                    "POST",
                    self._urls[path],
                    headers=self._headers,
                    content=data,
                    extensions={"timeout": self._timeout.as_dict()},
                )
                async with self._slot(background):
                    response, content = await self._attempt(request, background, reader)
            except _GaveWay:
                continue
            except NotAStream:
                raise _NoStreaming("its stream held no chat completion chunk") from None
            except StreamBroken as exc:
                # retried like a dropped connection: the next attempt's snapshots start again
                problem, wait = f"the answer's stream broke off ({exc})", None
                brief = problem
            except StreamFailed as exc:
                log.warning(
                    "%s: error inside the stream from %s: %s", path, self.base_url, self.redact(exc.body[:LOGGED_BODY_CHARS])
                )
                problem = f"the model endpoint reported an error inside the stream: {self._message(exc.body)}"
                brief = "the model endpoint reported an error inside the stream"
                # a refusal is one whether it came as a status or inside the stream; anything else is retried
                refused = _refusal(exc.status, exc.body, body, problem, brief)
                if refused is not None:
                    raise refused from None
                wait = None
            except TimeoutError:
                if path == "chat/completions":
                    # the model was still writing: a retry would queue behind the abandoned request
                    raise TooSlowError(f"the model took too long to answer (timed out after {self.timeout:g} s)") from None
                problem, wait = f"timed out after {self.timeout:g} s", None
                brief = problem
            except httpx.TimeoutException as exc:
                cause = exc.__cause__
                # the aiohttp transport reports a refused connection as a timeout
                if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
                    problem, wait = f"cannot reach {self.base_url} ({self.redact(str(cause))})", None
                else:
                    problem, wait = f"timed out after {self.timeout:g} s", None
                brief = problem
            except httpx.HTTPError as exc:
                problem, wait = f"cannot reach {self.base_url} ({type(exc).__name__}: {self.redact(str(exc))})", None
                brief = problem
            else:
                if response.status_code < 300:
                    return reader.body() if reader is not None and reader.done else _json(content, path)
                text = content.decode("utf-8", "replace")
                # the raw body only goes to the log: it may echo the request, key included
                log.warning(
                    "%s: HTTP %d from %s: %s", path, response.status_code, self.base_url, self.redact(text[:LOGGED_BODY_CHARS])
                )
                problem = self._status(response.status_code, text)
                brief = f"HTTP {response.status_code} from the model endpoint"
                refused = _refusal(response.status_code, text, body, problem, brief)
                if refused is not None:
                    raise refused
                if (
                    reader is not None
                    and 400 <= response.status_code < 500
                    and response.status_code != 429
                    and _NO_STREAMING.search(text)
                ):
                    raise _NoStreaming(problem)
                if response.status_code != 429 and response.status_code < 500:
                    raise LLMError(problem, brief=brief, status=response.status_code)
                wait = _retry_after(response)
            attempt += 1
            backoff = wait if wait is not None else random.uniform(0, min(8.0, 0.5 * 2**attempt))
            if attempt > self.max_retries or time.monotonic() + backoff > deadline:
                gave_up = f"(gave up after {attempt} attempts)"
                raise LLMError(f"{path}: {problem} {gave_up}", brief=f"{path}: {brief} {gave_up}")
            log.warning("%s: %s; retrying in %.1f s", path, problem, backoff)
            await self._pause(backoff)

    async def _attempt(
        self, request: httpx.Request, background: bool = False, reader: StreamReader | None = None
    ) -> tuple[httpx.Response, bytes]:
        """One request within `timeout` in all, and its body; abort() ends it at once, a person's call ends a
        background one. With `reader`, a streamed answer is read into it within the same limit (the body is then b"")."""
        if self._aborting.is_set():
            raise LLMError(SHUTTING_DOWN)
        limit = asyncio.timeout(self.timeout)
        try:
            async with limit:
                self._attempts.add(limit)
                if background:
                    self._background_attempts.add(limit)
                try:
                    response = await self._send(request)
                    content = b""
                    try:
                        if reader is not None and response.status_code < 300 and is_event_stream(response):
                            await reader.read(response)
                        else:
                            content = await _body(response)
                    finally:
                        await response.aclose()
                    return response, content
                finally:
                    self._attempts.discard(limit)
                    self._background_attempts.discard(limit)
        except TimeoutError:
            if self._aborting.is_set():
                raise LLMError(SHUTTING_DOWN) from None
            if limit in self._preempted:
                self._preempted.discard(limit)
                raise _GaveWay from None
            raise

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """The response to `request`, its body not read yet."""
        if self._direct is None:
            return await self._http.send(request, stream=True)
        return await self._direct.handle_async_request(request)

    async def _pause(self, seconds: float) -> None:
        """The wait before a retry; abort() ends it at once."""
        try:
            async with asyncio.timeout(seconds):
                await self._aborting.wait()
        except TimeoutError:
            return
        raise LLMError(SHUTTING_DOWN)

    def _status(self, status: int, text: str) -> str:
        """An error status as a short sentence: the endpoint's message, redacted, on one line, clipped."""
        message = self._message(text)
        return f"HTTP {status} from the model endpoint: {message}" if message else f"HTTP {status} from the model endpoint"

    def _message(self, text: str) -> str:
        """The message of an error body, redacted, on one line, clipped."""
        try:
            error = json.loads(text).get("error", text)
            message = error.get("message", error) if isinstance(error, dict) else error
        except (ValueError, AttributeError, RecursionError):
            message = text
        message = " ".join(self.redact(without_surrogates(str(message))).split())
        if len(message) > ERROR_MESSAGE_CHARS:
            message = message[:ERROR_MESSAGE_CHARS] + "…"
        return message


def _refusal(status: int, text: str, body: dict[str, Any], problem: str, brief: str) -> LLMError | None:
    """The error for a refusal that retrying never fixes and the caller has a way around: the
    request too large for the window, tools or images refused. None for any other error."""
    if is_context_overflow(status, text):
        return ContextOverflowError(
            problem,
            brief=f"{brief}: the request is larger than the model's context window",
            limit=stated_limit(text),
            status=status,
        )
    if "tools" in body and refuses_tools(status, text):
        return ToolsUnsupportedError(problem, brief=brief)
    if refuses_images(status, text) and carries_images(body.get("messages", [])):
        return ImagesUnsupportedError(problem, brief=brief)
    return None


async def _body(response: httpx.Response) -> bytes:
    """The response's body, refused past MAX_BODY_BYTES (not retried: it would come as large again)."""
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise LLMError(f"the model endpoint's answer is larger than {MAX_BODY_BYTES >> 20} MiB")
        parts.append(part)
    return b"".join(parts)


def _json(content: bytes, path: str) -> Any:
    try:
        return orjson.loads(content)
    except ValueError:
        pass
    # orjson refuses lone surrogate escapes ("\ud83d"), which some servers send; json accepts
    # them and parse_chat replaces them
    try:
        return json.loads(content.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        raise LLMError(f"{path} returned a body that is not valid JSON") from None


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


# a \uD800-\uDFFF escape inside a JSON text: decoding it may give a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _arguments(args: Any) -> str:
    """Tool arguments as valid text whose JSON, once decoded, is valid text too."""
    try:
        if not isinstance(args, str):  # some servers send an object instead of a JSON string
            return json.dumps(without_surrogates_in(args), ensure_ascii=False)
        args = without_surrogates(args)
        if _SURROGATE_ESCAPE.search(args):
            try:
                return json.dumps(without_surrogates_in(json.loads(args)), ensure_ascii=False)
            except ValueError:  # not JSON: the tool reports that to the model
                pass
        return args
    except RecursionError:  # nested deeper than Python recurses: no tool takes such arguments
        return "(arguments nested too deeply)"


def _tokens(value: Any) -> int | None:
    """A provider's token count, if believable: a whole number from 0 to MAX_TOKEN_COUNT."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if 0 <= value <= MAX_TOKEN_COUNT else None


def parse_chat(data: dict[str, Any]) -> ChatResult:
    """Read a chat completion, tolerating servers that bend the protocol."""
    try:
        message = data["choices"][0]["message"]
        if not isinstance(message, dict):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise LLMError("the model endpoint sent a chat completion without a message") from None
    calls: list[ToolCall] = []
    raw_calls = message.get("tool_calls") or []
    if not raw_calls and isinstance(message.get("function_call"), dict):  # the pre-tools protocol
        raw_calls = [{"function": message["function_call"]}]
    for raw in raw_calls if isinstance(raw_calls, list) else []:
        fn = raw.get("function") if isinstance(raw, dict) else None
        if not isinstance(fn, dict):
            continue
        calls.append(
            ToolCall(
                id=without_surrogates(str(raw.get("id") or f"call_{uuid.uuid4().hex[:12]}")),
                name=without_surrogates(str(fn.get("name", ""))),
                arguments=_arguments(fn.get("arguments", "")),
            )
        )
    usage = None
    if isinstance(data.get("usage"), dict):
        prompt, completion = _tokens(data["usage"].get("prompt_tokens")), _tokens(data["usage"].get("completion_tokens"))
        if prompt is not None and completion is not None:
            usage = Usage(prompt, completion)
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    finish = data["choices"][0].get("finish_reason") if isinstance(data["choices"][0], dict) else None
    return ChatResult(
        content=without_surrogates(_text(message.get("content"))),
        tool_calls=calls,
        usage=usage,
        reasoning=without_surrogates(_text(reasoning)),
        finish_reason=finish if isinstance(finish, str) else "",
    )


def _text(content: Any) -> str:
    """Content as text: some servers send a list of parts ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return content if isinstance(content, str) else str(content)
