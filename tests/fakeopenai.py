"""A scripted OpenAI-compatible server on loopback (chat completions + embeddings).

Tests queue what the "model" answers; the server records every request so a
test can assert on exactly what the engine sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def reply(text: str) -> dict[str, Any]:
    """A plain-text assistant answer."""
    return {"message": {"role": "assistant", "content": text}}


def call(name: str, args: dict[str, Any] | str | None = None, *, content: str = "", call_id: str | None = None) -> dict[str, Any]:
    """An assistant message with one tool call (`args` as a str is sent verbatim)."""
    return calls((name, args, call_id), content=content)


def calls(*items: tuple[str, dict[str, Any] | str | None, str | None], content: str = "") -> dict[str, Any]:
    tool_calls = []
    for n, (name, args, call_id) in enumerate(items):
        raw = args if isinstance(args, str) else json.dumps(args or {})
        tool_calls.append(
            {"id": call_id or f"call_{n}_{time.monotonic_ns()}", "type": "function", "function": {"name": name, "arguments": raw}}
        )
    return {"message": {"role": "assistant", "content": content or None, "tool_calls": tool_calls}}


def with_usage(answer: dict[str, Any], prompt_tokens: int | None) -> dict[str, Any]:
    """`answer` reporting `prompt_tokens` as the provider's count (None: no usage at all)."""
    usage = (
        None
        if prompt_tokens is None
        else {"prompt_tokens": prompt_tokens, "completion_tokens": 10, "total_tokens": prompt_tokens + 10}
    )
    return {**answer, "usage": usage}


def flood(name: str, args: Callable[[int], dict[str, Any]], count: int) -> dict[str, Any]:
    """One assistant answer with `count` calls of the same function, the n-th with `args(n)`."""
    return calls(*((name, args(n), f"call_flood_{n}") for n in range(count)))


def thinking(thought: str, answer: str, *, open_tag: bool = True) -> dict[str, Any]:
    """A reasoning model's answer with its thinking in `<think>` tags in the content; without the
    opening tag when the chat template opened the block (Qwen3, DeepSeek-R1)."""
    return reply(f"{'<think>' if open_tag else ''}{thought}</think>\n\n{answer}")


def reasoning(thought: str, answer: str, field_name: str = "reasoning_content") -> dict[str, Any]:
    """Thinking in a field of its own: `reasoning_content` (DeepSeek, vLLM, llama-server) or `reasoning` (OpenRouter, Ollama)."""
    return {"message": {"role": "assistant", "content": answer, field_name: thought}}


def text_call(form: str, name: str, args: dict[str, Any], *, around: str = "") -> dict[str, Any]:
    """A tool call written in the content, as a server whose parser missed it passes it on (DESIGN.md §8)."""
    raw = json.dumps(args)
    written = {
        "hermes": f'<tool_call>\n{{"name": "{name}", "arguments": {raw}}}\n</tool_call>',
        "llama": f'{{"name": "{name}", "parameters": {raw}}}',
        "mistral": f'[TOOL_CALLS][{{"name": "{name}", "arguments": {raw}}}]',
        "fenced": f'```json\n{{"name": "{name}", "arguments": {raw}}}\n```',
    }[form]
    return reply(f"{around}{written}" if around else written)


# how servers refuse the `tools` parameter (DESIGN.md §8)
REFUSALS: dict[str, tuple[int, dict[str, Any]]] = {
    "ollama": (400, {"error": {"message": "registry.ollama.ai/library/gemma3:4b does not support tools", "type": "api_error"}}),
    "llama-server-jinja": (500, {"error": {"code": 500, "message": "tools param requires --jinja flag", "type": "server_error"}}),
    "llama-server-param": (500, {"error": {"code": 500, "message": "Unsupported param: tools", "type": "server_error"}}),
    "vllm": (
        400,
        {
            "object": "error",
            "message": '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
            "type": "BadRequestError",
            "code": 400,
        },
    ),
}


def refusal(server: str) -> Callable[[dict[str, Any]], Any]:
    """A server that refuses requests carrying `tools` the way `server` does, and answers the rest with `then`."""
    status, body = REFUSALS[server]
    return lambda request: Error(status, body) if "tools" in request else None


# how servers refuse image parts for a model without vision (DESIGN.md §8)
IMAGE_REFUSALS: dict[str, tuple[int, dict[str, Any]]] = {
    "openai": (
        400,
        {
            "error": {
                "message": "Invalid content type. image_url is only supported by certain models.",
                "type": "invalid_request_error",
                "param": "messages.[1].content.[1].type",
                "code": None,
            }
        },
    ),
    "llama-server": (
        500,
        {
            "error": {
                "code": 500,
                "message": "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj",
                "type": "server_error",
            }
        },
    ),
    "vllm": (400, {"object": "error", "message": "fake-model is not a multimodal model", "type": "BadRequestError", "code": 400}),
    "ollama": (500, {"error": {"message": "this model is missing data required for image input", "type": "api_error"}}),
}


def image_parts(request: dict[str, Any]) -> list[str]:
    """The data URLs of the image parts in a recorded chat request, in order."""
    return [
        part["image_url"]["url"]
        for m in request.get("messages", [])
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image_url"
    ]


def image_refusal(server: str) -> Callable[[dict[str, Any]], Any]:
    """A model without vision: refuses requests carrying image parts the way `server` does; the rest go on."""
    status, body = IMAGE_REFUSALS[server]
    return lambda request: Error(status, body) if image_parts(request) else None


@dataclass
class Error:
    status: int
    body: dict[str, Any] | str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Delay:
    seconds: float
    then: Any


@dataclass
class Drip:
    """The headers at once, then the answer's body one byte every `interval` seconds: a stalled
    proxy or a slow-loris, which no per-read timeout ever ends."""

    interval: float
    then: dict[str, Any] = field(default_factory=lambda: reply("dripped"))


@dataclass
class Broken:
    """Streamed, the answer's connection drops after `after` chunks (no finish, no [DONE]);
    a request that does not stream gets the whole answer."""

    after: int
    then: dict[str, Any]


@dataclass
class Events:
    """Streamed as given, to any request: each item a chunk (a dict, sent as `data:` JSON) or a raw
    line ("data: [DONE]", ": keep-alive"), then the connection closes cleanly."""

    items: list[dict[str, Any] | str]


Script = dict[str, Any] | Error | Delay | Drip | Broken | Events | Callable[[dict[str, Any]], Any]


_SKIP = frozenset("a an the is are was were do does did where what who when how to of in and or i you it".split())


def embed_text(text: str, dim: int) -> list[float]:
    """Deterministic bag-of-words vectors: texts sharing words are near each other."""
    v = [0.0] * dim
    for word in re.findall(r"\w+", text.lower()):
        if word in _SKIP:
            continue
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        v[h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v] if any(v) else [1.0 / math.sqrt(dim)] * dim


class FakeOpenAI:
    def __init__(self, *, dim: int = 256, usage: bool = True) -> None:
        self.dim = dim
        self.usage = usage
        self.script: list[Script] = []
        self.default: Script | None = None
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []  # of every request, in order, to echo them back
        self.fail_models: Error | Drip | None = None  # what GET /models answers instead of the model list
        self.dripping = 0  # responses being dripped now
        self.usage_body: Any = None  # sent as the usage instead of the counted one, when set
        self.embedding_inputs: list[str] = []
        self.fail_embeddings: Error | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        # what the server says about itself, by shape (None: the endpoint is absent, 404)
        self.props: dict[str, Any] | None = None  # llama-server GET /props
        self.ollama_show: dict[str, Any] | None = None  # Ollama POST /api/show
        self.lmstudio_models: dict[str, Any] | None = None  # LM Studio GET /api/v0/models
        self.model_fields: dict[str, Any] = {}  # added to the model's /v1/models entry (vLLM: max_model_len)
        self.silent = False  # the self-description endpoints accept the connection and never answer
        # streamed answers (requests with "stream": true): the characters of content or arguments per
        # chunk, and the time the whole answer takes, spread over its chunks
        self.chunk_chars = 8
        self.stream_seconds = 0.0
        self.streams = True  # False: a server that ignores "stream" and answers whole
        self.streamed = 0  # answers sent as server-sent events
        self._runner: web.AppRunner | None = None
        self.url = ""
        self._arrived = asyncio.Event()  # set by every request, for `wait_until`

    async def start(self) -> FakeOpenAI:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/props", self._described(lambda: self.props))
        app.router.add_post("/api/show", self._described(lambda: self.ollama_show))
        app.router.add_get("/api/v0/models", self._described(lambda: self.lmstudio_models))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait, request by request, until `condition` holds."""
        while not condition():
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), timeout)

    def push(self, *items: Script) -> None:
        self.script.extend(items)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if "messages" in r]

    async def _models(self, request: web.Request) -> web.Response:
        self.request_headers.append(dict(request.headers))
        if isinstance(self.fail_models, Drip):
            return await self._drip(self.fail_models, {"messages": []}, request)
        if self.fail_models:
            e = self.fail_models
            payload = e.body if isinstance(e.body, str) else json.dumps(e.body)
            return web.Response(text=payload, status=e.status, headers=e.headers, content_type="application/json")
        if self.silent:
            await asyncio.Event().wait()
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model", **self.model_fields}]})

    def _described(self, document: Callable[[], dict[str, Any] | None]) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            if self.silent:
                await asyncio.Event().wait()
            found = document()
            if found is None:
                return web.Response(status=404, text="Not Found")
            return web.json_response(found)

        return handler

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.request_headers.append(dict(request.headers))
        self._arrived.set()
        item = self.script.pop(0) if self.script else self.default
        if item is None:
            return web.json_response({"error": {"message": "fake: no scripted response left"}}, status=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(item, body, request)
        finally:
            self.in_flight -= 1

    async def _drip(self, drip: Drip, body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        # the whole answer as one JSON body, even to a stream request: what a stalled proxy passes on
        payload = (await self._answer(drip.then, {**body, "stream": False}, request)).body
        assert isinstance(payload, bytes)
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(payload))})
        self.dripping += 1
        try:
            await response.prepare(request)
            for i in range(len(payload)):
                await response.write(payload[i : i + 1])
                await asyncio.sleep(drip.interval)
            await response.write_eof()
        except ConnectionError:  # the client gave up: what the drip is for
            pass
        finally:
            self.dripping -= 1
        return response

    async def _answer(self, item: Script, body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        while True:
            if isinstance(item, Delay):
                await asyncio.sleep(item.seconds)
                item = item.then
            elif callable(item):
                produced = item(body)
                # a script that lets a request through answers it with the next scripted item
                item = produced if produced is not None else (self.script.pop(0) if self.script else self.default)
            elif asyncio.iscoroutine(item):  # an async script can wait for other requests
                item = await item
            else:
                break
        if isinstance(item, Drip):
            return await self._drip(item, body, request)
        if isinstance(item, Events):
            return await self._events(item, request)
        broken_after = None
        if isinstance(item, Broken):
            broken_after, item = item.after, item.then
        if isinstance(item, Error):
            payload = item.body if isinstance(item.body, str) else json.dumps(item.body)
            return web.Response(text=payload, status=item.status, headers=item.headers, content_type="application/json")
        # an answer may carry its own "usage" (None: none at all) instead of the estimate below
        answer = {k: v for k, v in item.items() if k != "usage"}
        choice = {"index": 0, "finish_reason": "tool_calls" if item["message"].get("tool_calls") else "stop", **answer}
        data: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [choice],
        }
        if "usage" in item:
            if item["usage"] is not None:
                data["usage"] = item["usage"]
        elif self.usage:
            prompt = sum(len(json.dumps(m)) for m in body["messages"]) // 4
            data["usage"] = {"prompt_tokens": prompt, "completion_tokens": 10, "total_tokens": prompt + 10}
        if self.usage_body is not None:
            data["usage"] = self.usage_body
        if body.get("stream") and self.streams:
            usage = data.get("usage") if (body.get("stream_options") or {}).get("include_usage") else None
            return await self._stream(data, usage, request, broken_after)
        return web.json_response(data)

    def chunks(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The deltas a streaming server sends for `message`: reasoning, then content, then each tool
        call (its id and name first, its arguments in fragments), `chunk_chars` characters at a time."""
        n = self.chunk_chars
        deltas: list[dict[str, Any]] = [{"role": "assistant"}]
        for key in ("reasoning_content", "reasoning", "content"):
            text = message.get(key) or ""
            deltas += [{key: text[i : i + n]} for i in range(0, len(text), n)]
        for index, tool_call in enumerate(message.get("tool_calls") or []):
            fn = tool_call["function"]
            head = {"index": index, "id": tool_call["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}
            deltas.append({"tool_calls": [head]})
            args = fn["arguments"]
            deltas += [
                {"tool_calls": [{"index": index, "function": {"arguments": args[i : i + n]}}]} for i in range(0, len(args), n)
            ]
        return deltas

    async def _stream(
        self, data: dict[str, Any], usage: dict[str, Any] | None, request: web.Request, broken_after: int | None
    ) -> web.StreamResponse:
        """The answer as server-sent events: deltas, then the finish, the usage when asked for, then [DONE]."""
        self.streamed += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        deltas = self.chunks(data["choices"][0]["message"])
        pause = self.stream_seconds / len(deltas)

        async def send(chunk: dict[str, Any]) -> None:
            await response.write(
                f"data: {json.dumps({'id': data['id'], 'object': 'chat.completion.chunk', **chunk})}\n\n".encode()
            )

        try:
            for i, delta in enumerate(deltas):
                if broken_after is not None and i >= broken_after:
                    return response  # the connection ends without a finish
                await send({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                if pause:
                    await asyncio.sleep(pause)
            await send({"choices": [{"index": 0, "delta": {}, "finish_reason": data["choices"][0].get("finish_reason")}]})
            if usage is not None:
                await send({"choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the client gave up
            pass
        return response

    async def _events(self, events: Events, request: web.Request) -> web.StreamResponse:
        self.streamed += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for item in events.items:
            line = item if isinstance(item, str) else f"data: {json.dumps(item)}"
            await response.write(f"{line}\n\n".encode())
        await response.write_eof()
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self._arrived.set()
        if self.fail_embeddings:
            e = self.fail_embeddings
            return web.Response(text=json.dumps(e.body), status=e.status, content_type="application/json")
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.embedding_inputs.extend(inputs)
        data = [{"object": "embedding", "index": i, "embedding": embed_text(t, self.dim)} for i, t in enumerate(inputs)]
        return web.json_response(
            {"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": 0, "total_tokens": 0}}
        )
