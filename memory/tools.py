"""The functions the model calls, their schemas, and how a call is carried out.

Every failure comes back as text the model can act on; nothing raises.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from . import core, recall, search
from .agents import Agent
from .archival import Archive
from .db import Database

log = logging.getLogger(__name__)


def _fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


_STR = {"type": "string"}
_DATE = {"type": "string", "description": "YYYY-MM-DD"}
_PAGE = {"type": "integer", "description": "1-based"}
_TAGS = {"type": "array", "items": _STR}

SCHEMAS: list[dict[str, Any]] = [
    _fn("send_message", "Send a message to the user. This ends your turn.", {"message": _STR}, ["message"]),
    _fn(
        "core_memory_append",
        "Add a line to a core memory block.",
        {"label": _STR, "content": _STR},
        ["label", "content"],
    ),
    _fn(
        "core_memory_replace",
        "Replace exact text in a core memory block (empty new_content deletes it).",
        {"label": _STR, "old_content": _STR, "new_content": _STR},
        ["label", "old_content", "new_content"],
    ),
    _fn(
        "conversation_search",
        "Search all past messages of this conversation.",
        {"query": _STR, "start_date": _DATE, "end_date": _DATE, "roles": {"type": "array", "items": {"enum": ["user", "assistant", "system"]}}, "page": _PAGE},
        ["query"],
    ),
    _fn("archival_memory_insert", "Save text to long-term archival memory.", {"content": _STR, "tags": _TAGS}, ["content"]),
    _fn(
        "archival_memory_search",
        "Search archival memory by keywords and meaning.",
        {"query": _STR, "tags": _TAGS, "start_date": _DATE, "end_date": _DATE, "page": _PAGE},
        ["query"],
    ),
]

NAMES = [s["function"]["name"] for s in SCHEMAS]
# what the background consolidation pass may use
MEMORY_EDIT_SCHEMAS = [s for s in SCHEMAS if s["function"]["name"] in ("core_memory_append", "core_memory_replace", "archival_memory_insert")]


@dataclass
class Outcome:
    text: str  # the tool result the model reads
    reply: str | None = None  # set by send_message
    changed_memory: bool = False


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


async def execute(db: Database, archive: Archive, agent: Agent, name: str, raw_arguments: str) -> Outcome:
    if name not in NAMES:
        return Outcome(f"Error: there is no function {name!r}. Valid functions: {', '.join(NAMES)}.")
    try:
        args = json.loads(raw_arguments) if raw_arguments.strip() else {}
    except ValueError as exc:
        return Outcome(
            f"Error: the arguments are not valid JSON ({exc.msg} at position {exc.pos}): {raw_arguments[:500]!r}. "
            f"Call {name} again with a JSON object."
        )
    if not isinstance(args, dict):
        return Outcome(f"Error: the arguments must be a JSON object, got {raw_arguments[:200]!r}.")
    try:
        return await _run(db, archive, agent, name, args)
    except search.BadArgument as exc:
        return Outcome(f"Error: {exc}. Call {name} again with corrected arguments.")
    except Exception as exc:  # a bug or an input nobody foresaw must not end the turn
        log.exception("%s: %s failed", agent.key, name)
        return Outcome(f"Error: {name} failed ({type(exc).__name__}). Try other arguments or another function.")


async def _run(db: Database, archive: Archive, agent: Agent, name: str, args: dict[str, Any]) -> Outcome:
    if name == "send_message":
        message = _str(args, "message").strip()
        if not message:
            return Outcome("Error: the message is empty. Call send_message with the text for the user.")
        return Outcome("Sent.", reply=message)
    if name == "core_memory_append":
        text = await core.append(db, agent, _str(args, "label"), _str(args, "content"))
        return Outcome(text, changed_memory=not text.startswith("Error"))
    if name == "core_memory_replace":
        text = await core.replace(db, agent, _str(args, "label"), _str(args, "old_content"), _str(args, "new_content", ""))
        return Outcome(text, changed_memory=not text.startswith("Error"))
    if name == "conversation_search":
        page = await recall.search_messages(
            db, agent, _str(args, "query", ""),
            start_date=args.get("start_date"), end_date=args.get("end_date"),
            roles=_list(args, "roles"), page=args.get("page", 1),
        )
        return Outcome(page.render("messages"))
    if name == "archival_memory_insert":
        try:
            ids = await archive.insert(agent, _str(args, "content"), tags=_list(args, "tags"))
        except ValueError as exc:
            return Outcome(f"Error: {exc}.")
        return Outcome(f"Saved to archival memory as {len(ids)} passage(s) (#{ids[0]}).", changed_memory=True)
    # archival_memory_search
    page = await archive.search(
        agent, _str(args, "query", ""), tags=_list(args, "tags"),
        start_date=args.get("start_date"), end_date=args.get("end_date"), page=args.get("page", 1),
    )
    return Outcome(page.render("passages", max_chars=1200))  # a whole chunk: the answer may be at its end
