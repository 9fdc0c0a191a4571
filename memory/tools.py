"""The functions the model calls: one registry entry per tool, and how a call is carried out.

Adding a tool is one `Tool(...)` in `TOOLS`: its schema, its handler, whether it
edits memory and whether the background consolidation may use it. Every failure
comes back as an `Outcome` the model can act on; nothing raises.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any

from . import core, events, people, recall, search
from .agents import Agent
from .archival import Archive
from .core import quote
from .db import Database, StorageError

log = logging.getLogger(__name__)

# an error result's length, whatever went into it
MAX_ERROR_CHARS = 1000
# deeper arguments are no real call (json and everything after it would recurse without bound)
MAX_ARGUMENT_DEPTH = 32
# a search page shows whole chunks: the answer may be at a chunk's end
SEARCH_RESULT_CHARS = 1200


class Status(Enum):
    OK = "ok"
    REFUSED = "refused"  # the model can correct the call and try again
    FAILED = "failed"  # something broke on our side


@dataclass(frozen=True)
class Outcome:
    status: Status
    text: str  # the tool result the model reads
    reply: str | None = None  # set by send_message

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


def ok(text: str, reply: str | None = None) -> Outcome:
    return Outcome(Status.OK, text, reply)


def refused(text: str) -> Outcome:
    return Outcome(Status.REFUSED, text)


@dataclass(frozen=True)
class Call:
    """What a handler works with."""

    db: Database
    archive: Archive
    agent: Agent
    args: dict[str, Any]


Handler = Callable[[Call], Awaitable[Outcome]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema properties
    required: tuple[str, ...]
    handler: Handler
    edits_memory: bool = False
    consolidation: bool = False  # the background consolidation pass may use it

    @cached_property  # built once: a turn sends it on every step
    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {"type": "object", "properties": self.parameters, "required": list(self.required)},
            },
        }


class BadArguments(ValueError):
    """The arguments are not a usable JSON object; str() is the result for the model."""


def parse_arguments(raw: str) -> dict[str, Any]:
    """The arguments of a call as a dict, or BadArguments saying why not."""
    try:
        args = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise BadArguments(f"the arguments are not valid JSON ({exc}): {quote(raw)}") from None
    except RecursionError:
        raise BadArguments(f"the arguments are nested too deeply (more than {MAX_ARGUMENT_DEPTH} levels)") from None
    if not isinstance(args, dict):
        raise BadArguments(f"the arguments must be a JSON object, got {quote(raw)}")
    if _depth(args) > MAX_ARGUMENT_DEPTH:
        raise BadArguments(f"the arguments are nested too deeply (more than {MAX_ARGUMENT_DEPTH} levels)")
    return args


def _depth(value: Any) -> int:
    """Nesting depth, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_ARGUMENT_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _str(args: dict[str, Any], name: str, default: str | None = None) -> str:
    value = args.get(name, default)
    if value is None:
        raise search.BadArgument(f"missing argument {name!r}")
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _list(args: dict[str, Any], name: str) -> list[str] | None:
    value = args.get(name)
    if value in (None, "", []):
        return None
    if isinstance(value, str):  # models often send "a, b" for an array
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        return [str(v) for v in value]
    raise search.BadArgument(f"{name} must be a list of strings")


def _edited(edit: core.Edit) -> Outcome:
    return Outcome(Status.OK if edit.ok else Status.REFUSED, edit.text)


async def _send_message(c: Call) -> Outcome:
    message = _str(c.args, "message").strip()
    if not message:
        return refused("Error: the message is empty. Call send_message with the text for the user.")
    return ok("Sent.", reply=message)


async def _core_memory_append(c: Call) -> Outcome:
    label = _str(c.args, "label")
    if people.is_person_label(label):
        return _edited(await people.append(c.db, c.agent, label, _str(c.args, "content")))
    return _edited(await core.append(c.db, c.agent, label, _str(c.args, "content")))


async def _core_memory_replace(c: Call) -> Outcome:
    args = c.args
    label = _str(args, "label")
    if people.is_person_label(label):
        return _edited(await people.replace(c.db, c.agent, label, _str(args, "old_content"), _str(args, "new_content", "")))
    return _edited(await core.replace(c.db, c.agent, label, _str(args, "old_content"), _str(args, "new_content", "")))


async def _conversation_search(c: Call) -> Outcome:
    args = c.args
    page = await recall.search_messages(
        c.db,
        c.agent,
        _str(args, "query", ""),
        start_date=args.get("start_date"),
        end_date=args.get("end_date"),
        roles=_list(args, "roles"),
        page=args.get("page", 1),
    )
    return ok(page.render("messages"))


async def _archival_memory_insert(c: Call) -> Outcome:
    try:
        ids = await c.archive.insert(c.agent, _str(c.args, "content"), tags=_list(c.args, "tags"))
    except ValueError as exc:
        return refused(f"Error: {exc}.")
    return ok(f"Saved to archival memory as {len(ids)} passage(s) (#{ids[0]}).")


async def _archival_memory_search(c: Call) -> Outcome:
    args = c.args
    page = await c.archive.search(
        c.agent,
        _str(args, "query", ""),
        tags=_list(args, "tags"),
        start_date=args.get("start_date"),
        end_date=args.get("end_date"),
        page=args.get("page", 1),
    )
    return ok(page.render("passages", max_chars=SEARCH_RESULT_CHARS))


async def _schedule_event(c: Call) -> Outcome:
    repeat = c.args.get("repeat")
    done, text = await events.schedule(
        c.db, c.agent, _str(c.args, "when"), _str(c.args, "note"), repeat if isinstance(repeat, str) else None
    )
    return ok(text) if done else refused(text)


async def _cancel_event(c: Call) -> Outcome:
    raw = c.args.get("event_id")
    try:
        event_id = int(str(raw).lstrip("#"))
    except ValueError:
        event_id = 0
    if not 0 < event_id < 2**63:  # SQLite's integers
        return refused(f"Error: event_id must be an event's number, not {quote(str(raw))}.")
    if await events.cancel(c.db, c.agent, event_id):
        return ok(f"Event #{event_id} cancelled.")
    return refused(f"Error: no pending event #{event_id} here; your memory status lists the pending ones.")


_STR = {"type": "string"}
_DATE = {"type": "string", "description": "YYYY-MM-DD"}
_PAGE = {"type": "integer", "description": "1-based"}
_TAGS = {"type": "array", "items": _STR}

TOOLS: dict[str, Tool] = {
    t.name: t
    for t in [
        Tool("send_message", "Send a message to the user. This ends your turn.", {"message": _STR}, ("message",), _send_message),
        Tool(
            "core_memory_append",
            "Add a line to a core memory block.",
            {"label": _STR, "content": _STR},
            ("label", "content"),
            _core_memory_append,
            edits_memory=True,
            consolidation=True,
        ),
        Tool(
            "core_memory_replace",
            "Replace exact text in a core memory block (empty new_content deletes it).",
            {"label": _STR, "old_content": _STR, "new_content": _STR},
            ("label", "old_content", "new_content"),
            _core_memory_replace,
            edits_memory=True,
            consolidation=True,
        ),
        Tool(
            "conversation_search",
            "Search all past messages of this conversation.",
            {
                "query": _STR,
                "start_date": _DATE,
                "end_date": _DATE,
                "roles": {"type": "array", "items": {"enum": ["user", "assistant", "system"]}},
                "page": _PAGE,
            },
            ("query",),
            _conversation_search,
        ),
        Tool(
            "archival_memory_insert",
            "Save text to long-term archival memory.",
            {"content": _STR, "tags": _TAGS},
            ("content",),
            _archival_memory_insert,
            edits_memory=True,
            consolidation=True,
        ),
        Tool(
            "archival_memory_search",
            "Search archival memory by keywords and meaning.",
            {"query": _STR, "tags": _TAGS, "start_date": _DATE, "end_date": _DATE, "page": _PAGE},
            ("query",),
            _archival_memory_search,
        ),
        # kept short: every schema token is paid on every step
        Tool(
            "schedule_event",
            "Wake yourself later (reminders). when: ISO time with offset, or 'in 20 minutes', 'PT2H'.",
            {"when": _STR, "note": _STR, "repeat": {"enum": list(events.REPEATS)}},
            ("when", "note"),
            _schedule_event,
        ),
        Tool("cancel_event", "Cancel a pending event.", {"event_id": {"type": "integer"}}, ("event_id",), _cancel_event),
    ]
}

SCHEMAS: list[dict[str, Any]] = [t.schema for t in TOOLS.values()]
CONSOLIDATION_TOOLS: dict[str, Tool] = {name: t for name, t in TOOLS.items() if t.consolidation}


async def execute(
    db: Database, archive: Archive, agent: Agent, name: str, raw_arguments: str, available: dict[str, Tool] = TOOLS
) -> Outcome:
    """Run one call of the model against the tools `available` to it."""
    outcome = await _execute(db, archive, agent, name, raw_arguments, available)
    if not outcome.ok and len(outcome.text) > MAX_ERROR_CHARS:
        outcome = Outcome(outcome.status, outcome.text[:MAX_ERROR_CHARS] + "…")
    return outcome


async def _execute(
    db: Database, archive: Archive, agent: Agent, name: str, raw_arguments: str, available: dict[str, Tool]
) -> Outcome:
    tool = available.get(name)
    if tool is None:
        return refused(f"Error: there is no function {quote(name)} here. Valid functions: {', '.join(available)}.")
    try:
        args = parse_arguments(raw_arguments)
    except BadArguments as exc:
        return refused(f"Error: {exc}. Call {name} again with a JSON object.")
    try:
        return await tool.handler(Call(db, archive, agent, args))
    except search.BadArgument as exc:
        return refused(f"Error: {exc}. Call {name} again with corrected arguments.")
    except StorageError:  # not the model's doing: the turn says so to the person
        raise
    except Exception as exc:  # a bug or an input nobody foresaw must not end the turn
        log.exception("%s: %s failed", agent.key, name)
        return Outcome(Status.FAILED, f"Error: {name} failed ({type(exc).__name__}). Try other arguments or another function.")
