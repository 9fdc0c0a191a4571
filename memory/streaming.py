"""Reading a streamed chat completion (server-sent events) as it arrives.

A streamed answer is gathered into the body a whole response would have been, so
`llm.parse_chat` reads both and the rest of the turn cannot tell them apart: content and
reasoning deltas joined, tool calls assembled by `index` from their fragments, the
finish reason, and usage from the chunk that carries it (servers sent with
`stream_options.include_usage` put it in the last one; some send none).

While it arrives, only reply text is passed on: the `message` argument of `send_message`,
read from its JSON while the JSON is still incomplete. Plain content is never passed on
before the answer ends: content that comes before a tool call is the agent's inner
monologue, and a reasoning model whose chat template opened `<think>` writes its thinking
with no opening tag, so neither can be told from a reply until the stream is over. A plain
answer is shown once it is known to be one, when the turn ends; `send_message`, the reply
by definition, is shown as it is written. Reasoning (`reasoning_content`, `reasoning`,
`<think>`) is never passed on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from httpx_sse import EventSource

from . import replies
from .text import without_surrogates

# the tool whose argument is the reply
REPLY_TOOL = "send_message"
REPLY_ARGUMENT = "message"
# a chat template writing "data:" lines of a megabyte would still be bounded by the call's deadline;
# this bounds what one answer may hold in memory
MAX_STREAMED_CHARS = 4_000_000
# the reply text is read again after this many more characters arrived (and at the end): reading it
# costs time in the event loop, and a reply shown every 1.5 s needs no snapshot per 4-character fragment
SNAPSHOT_EVERY = 24


class StreamBroken(Exception):
    """The stream ended before the answer did (no finish and no [DONE]) or held no chunk at all."""


class NotAStream(Exception):
    """The server answered a stream request with events that are not chat completion chunks."""


def is_event_stream(response: httpx.Response) -> bool:
    return "text/event-stream" in response.headers.get("content-type", "")


@dataclass
class _Call:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class StreamReader:
    """Gathers one streamed answer; `on_text` gets each new snapshot of the reply text so far."""

    on_text: Callable[[str], None]
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    usage: Any = None
    finish_reason: str | None = None
    done: bool = False  # an answer was read from a stream (not a whole response)
    _size: int = 0
    _shown: str = ""
    _shown_at: int = 0  # _size when the snapshot was last read

    def reset(self) -> None:
        """A new attempt: what an earlier one gathered is dropped (the snapshots start again)."""
        self.content, self.reasoning, self.calls = [], [], {}
        self.usage, self.finish_reason, self.done, self._size, self._shown, self._shown_at = None, None, False, 0, "", 0

    async def read(self, response: httpx.Response) -> None:
        self.reset()
        chunks = 0
        ended = False
        async for event in EventSource(response).aiter_sse():
            data = event.data.strip()
            if not data:
                continue
            if data == "[DONE]":
                ended = True
                break
            try:
                chunk = orjson.loads(data)
            except ValueError:
                try:  # orjson refuses lone surrogate escapes, which some servers send
                    chunk = json.loads(data)
                except (ValueError, RecursionError):
                    continue
            if not isinstance(chunk, dict):
                continue
            if isinstance(chunk.get("error"), dict | str):  # some servers report a failure inside the stream
                raise StreamBroken("the server reported an error inside the stream")
            chunks += 1
            self._take(chunk)
            if self._size > MAX_STREAMED_CHARS:
                raise StreamBroken("the answer grew past the size one answer may have")
        if not chunks:
            raise NotAStream
        if not ended and self.finish_reason is None:
            raise StreamBroken("the stream ended before the answer did")
        self._show()
        self.done = True

    def _take(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        if choice is None:
            return
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        for key, into in (("content", self.content), ("reasoning_content", self.reasoning), ("reasoning", self.reasoning)):
            piece = delta.get(key)
            if isinstance(piece, str) and piece:
                into.append(piece)
                self._size += len(piece)
        fragments = delta.get("tool_calls")
        if isinstance(fragments, list):
            for position, fragment in enumerate(fragments):
                if isinstance(fragment, dict):
                    self._fragment(position, fragment)
            if self._size - self._shown_at >= SNAPSHOT_EVERY:
                self._show()

    def _fragment(self, position: int, fragment: dict[str, Any]) -> None:
        # servers that send each call whole in one chunk leave out `index`
        index = fragment.get("index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else len(self.calls) + position
        call = self.calls.setdefault(index, _Call())
        if isinstance(fragment.get("id"), str) and fragment["id"]:
            call.id = fragment["id"]
        fn = fragment.get("function")
        if not isinstance(fn, dict):
            return
        if isinstance(fn.get("name"), str):
            call.name += fn["name"]
        args = fn.get("arguments")
        if isinstance(args, str):
            call.arguments += args
            self._size += len(args)
        elif isinstance(args, dict):  # sent as an object, not a JSON string
            call.arguments = json.dumps(args, ensure_ascii=False)

    def _show(self) -> None:
        self._shown_at = self._size
        texts = [partial_string(c.arguments, REPLY_ARGUMENT) for _, c in sorted(self.calls.items()) if c.name == REPLY_TOOL]
        shown = "\n\n".join(t for t in (replies.clean_text(replies.split_thinking(t)[0]) for t in texts if t) if t)
        if shown != self._shown:
            self._shown = shown
            self.on_text(shown)

    def body(self) -> dict[str, Any]:
        """The answer in the shape of a whole chat completion, for `llm.parse_chat`."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [
                {"id": c.id or None, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for _, c in sorted(self.calls.items())
            ]
        data: dict[str, Any] = {"choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}]}
        if self.usage is not None:
            data["usage"] = self.usage
        return data


_KEY = r'"{}"\s*:\s*"'
# what an escape cut off at the end of what arrived may look like after its backslash
_ESCAPE_SO_FAR = re.compile(r"(?:u[0-9a-fA-F]{0,3})?")
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")


def partial_string(arguments: str, key: str) -> str:
    """The value of the string `key` in a JSON object that may still be arriving: as much of it
    as has arrived, decoded; "" before the value starts. (Read again with every fragment, so it
    only ever scans with str methods: a loop in Python over 8,000 characters each time adds up.)"""
    match = re.search(_KEY.format(re.escape(key)), arguments)
    if match is None:
        return ""
    raw = arguments[match.end() :]
    end = _closing_quote(raw)
    raw = raw[:end] if end is not None else _without_cut_escape(raw)
    try:
        value = json.loads(f'"{raw}"')
    except ValueError:
        return ""
    return without_surrogates(value) if isinstance(value, str) else ""


def _escaped(raw: str, position: int) -> bool:
    """Whether the character at `position` follows an odd run of backslashes."""
    start = position
    while start > 0 and raw[start - 1] == "\\":
        start -= 1
    return (position - start) % 2 == 1


def _closing_quote(raw: str) -> int | None:
    position = raw.find('"')
    while position >= 0 and _escaped(raw, position):
        position = raw.find('"', position + 1)
    return position if position >= 0 else None


def _without_cut_escape(raw: str) -> str:
    """`raw` without an escape cut off at its end, nor a high surrogate whose pair has not arrived."""
    slash = raw.rfind("\\", max(0, len(raw) - 5))
    if slash >= 0 and _ESCAPE_SO_FAR.fullmatch(raw, slash + 1) and not _escaped(raw, slash):
        raw = raw[:slash]
    tail = len(raw) - 6
    if tail >= 0 and _HIGH_SURROGATE.fullmatch(raw, tail) and not _escaped(raw, tail):
        raw = raw[:tail]
    return raw
