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
# calls one answer may hold: more than any answer has run (MAX_TOOL_CALLS_PER_ANSWER is at most 100);
# fragments for further calls are dropped, so numbering them 10**9 + i costs nothing
MAX_STREAMED_CALLS = 128
# a function name longer than this is no tool's: the rest is dropped (it still counts toward the size)
MAX_NAME_CHARS = 256


class StreamBroken(Exception):
    """The stream ended before the answer did (no finish and no [DONE]) or held no chunk at all."""


class NotAStream(Exception):
    """The server answered a stream request with events that are not chat completion chunks."""


class StreamFailed(Exception):
    """The server reported an error inside the stream. `body` is the event as sent; `status` the code
    it gave, or 400 when it gave none (an error event has no HTTP status of its own)."""

    def __init__(self, body: str, status: int) -> None:
        super().__init__(body)
        self.body = body
        self.status = status


def is_event_stream(response: httpx.Response) -> bool:
    return "text/event-stream" in response.headers.get("content-type", "")


@dataclass
class _Call:
    id: str = ""
    name: str = ""
    # in the pieces they came in: adding to one string would copy all of it with every fragment
    arguments: list[str] = field(default_factory=list)
    reply: PartialString | None = None  # its `message` read so far; None: a call past those run, never shown
    unread: list[str] = field(default_factory=list)  # pieces of the arguments `reply` has not read yet
    shown: str = ""  # that text as it may be shown


@dataclass
class StreamReader:
    """Gathers one streamed answer; `on_text` gets each new snapshot of the reply text so far.

    `max_chars`: the reply's limit; once the text shown reaches it, no more snapshots are read (the
    rest is never shown). `max_calls`: the answer's calls that are run; only theirs are shown."""

    on_text: Callable[[str], None]
    max_chars: int | None = None
    max_calls: int = MAX_STREAMED_CALLS
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    usage: Any = None
    finish_reason: str | None = None
    done: bool = False  # an answer was read from a stream (not a whole response)
    _size: int = 0
    _shown: str = ""
    _shown_at: int = 0  # _size when the snapshot was last read
    _changed: set[int] = field(default_factory=set)  # calls whose arguments grew since the last snapshot

    def reset(self) -> None:
        """A new attempt: what an earlier one gathered is dropped (the snapshots start again)."""
        self.content, self.reasoning, self.calls, self._changed = [], [], {}, set()
        self.usage, self.finish_reason, self.done, self._size, self._shown, self._shown_at = None, None, False, 0, "", 0

    @property
    def _full(self) -> bool:
        return self.max_chars is not None and len(self._shown) >= self.max_chars

    async def read(self, response: httpx.Response) -> None:
        self.reset()
        chunks = strange = 0
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
                    strange += 1
                    continue
            if not isinstance(chunk, dict) or not {"choices", "usage", "error"} & chunk.keys():
                strange += 1
                continue
            error = chunk.get("error")
            if isinstance(error, dict | str) and error:  # some servers report a failure inside the stream
                code = error.get("code") if isinstance(error, dict) else None
                status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600 else 400
                raise StreamFailed(data, status)
            chunks += 1
            self._take(chunk)
            if self._size > MAX_STREAMED_CHARS:
                raise StreamBroken("the answer grew past the size one answer may have")
        if not chunks:
            # nothing at all ([DONE] or keep-alives alone: a proxy that gave up) is a broken stream, tried again
            if strange:
                raise NotAStream
            raise StreamBroken("the stream held no chunk")
        if not ended and self.finish_reason is None:
            raise StreamBroken("the stream ended before the answer did")
        if not self._full:
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
            if self._size - self._shown_at >= SNAPSHOT_EVERY and not self._full:
                self._show()

    def _fragment(self, position: int, fragment: dict[str, Any]) -> None:
        # servers that send each call whole in one chunk leave out `index`
        index = fragment.get("index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else len(self.calls) + position
        call = self.calls.get(index)
        if call is None:
            if len(self.calls) >= MAX_STREAMED_CALLS:
                return
            call = self.calls[index] = _Call(reply=self._reading() if len(self.calls) < self.max_calls else None)
        # everything the server sends counts toward the size: names, ids and arguments sent as objects too
        call_id = fragment.get("id")
        if isinstance(call_id, str) and call_id and call_id != call.id:
            call.id = call_id
            self._size += len(call_id)
        fn = fragment.get("function")
        if not isinstance(fn, dict):
            return
        name = fn.get("name")
        if isinstance(name, str):
            # servers send the name once, whole; llama.cpp may send it again whole with more of it
            # (common_chat_msg_diff), which appending would double: "send_messagesend_message"
            call.name = (name if call.name and name.startswith(call.name) else call.name + name)[:MAX_NAME_CHARS]
            self._size += len(name)
        args = fn.get("arguments")
        if isinstance(args, str):
            call.arguments.append(args)
            self._size += len(args)
        elif isinstance(args, dict):  # sent as an object, not a JSON string
            args = json.dumps(args, ensure_ascii=False)
            call.arguments = [args]
            self._size += len(args)
            if call.reply is not None:  # read again from the start
                call.reply, call.unread = self._reading(), []
        else:
            return
        if call.reply is not None:
            call.unread.append(args)
            self._changed.add(index)

    def _reading(self) -> PartialString:
        return PartialString(REPLY_ARGUMENT, self.max_chars)

    def _show(self) -> None:
        """Read what arrived of the reply calls that changed, and pass the text on if it changed. Each
        call's text is decoded where it left off, so a reply costs time in proportion to its length,
        not to its length times the number of snapshots. (A call named after its arguments came is
        not shown while it arrives: servers send the name first.)"""
        self._shown_at = self._size
        changed, self._changed = self._changed, set()
        grew = False
        for index in changed:
            call = self.calls[index]
            assert call.reply is not None
            unread, call.unread = "".join(call.unread), []
            if call.name == REPLY_TOOL and call.reply.feed(unread):
                call.shown = replies.clean_text(replies.split_thinking(call.reply.value)[0])
                grew = True
        if not grew:
            return
        shown = "\n\n".join(c.shown for _, c in sorted(self.calls.items()) if c.shown)
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
                {"id": c.id or None, "type": "function", "function": {"name": c.name, "arguments": "".join(c.arguments)}}
                for _, c in sorted(self.calls.items())
            ]
        data: dict[str, Any] = {"choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}]}
        if self.usage is not None:
            data["usage"] = self.usage
        return data


# at most 32 spaces around the colon: the key is then searched for only near where text arrived
_KEY = r'"{}"\s{{0,32}}:\s{{0,32}}"'
# what an escape cut off at the end of what arrived may look like after its backslash
_ESCAPE_SO_FAR = re.compile(r"(?:u[0-9a-fA-F]{0,3})?")
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")


class PartialString:
    """The value of the string `key` in a JSON object that is still arriving, decoded as it comes:
    `feed` is given each new piece of the object and reads only that (a reply read again every few
    characters must not be scanned from its start each time). `value` holds as much as has arrived,
    decoded, up to `limit` characters; "" before the value starts."""

    def __init__(self, key: str, limit: int | None = None) -> None:
        self.value = ""
        self._key = re.compile(_KEY.format(re.escape(key)))
        self._longest = len(key) + 2 * 32 + 4  # the longest text the key pattern matches
        self._limit = limit
        # what arrived and was not read: before the value, the end of the text, where the key may be
        # starting; in it, an escape cut off
        self._held = ""
        self._started = False
        self._ended = False

    def feed(self, piece: str) -> bool:
        """Read the next piece of the object; True when `value` grew."""
        if self._ended:
            return False
        raw, self._held = self._held + piece, ""
        if not self._started:
            match = self._key.search(raw)
            if match is None:
                self._held = raw[-self._longest :]
                return False
            self._started, raw = True, raw[match.end() :]
        # it starts where an escape ended or the value began: its backslashes and quotes are its own
        end = _closing_quote(raw)
        if end is not None:
            raw, self._ended = raw[:end], True
        else:
            complete = _without_cut_escape(raw)
            raw, self._held = complete, raw[len(complete) :]
        if not raw:
            return False
        try:
            text = json.loads(f'"{raw}"', strict=False)
        except ValueError:  # not a JSON string: nothing more of it is shown
            self._ended = True
            return False
        self.value += without_surrogates(text)
        if self._limit is not None and len(self.value) >= self._limit:
            self._ended = True
        return True


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
