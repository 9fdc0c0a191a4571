"""An agent's whole memory as JSON, and back: a user's data is theirs to take along."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from . import core, recall
from .agents import Agent, now

if TYPE_CHECKING:
    from .engine import Engine

FORMAT = "mnemocord-export"
VERSION = 1


async def export_agent(engine: Engine, agent: Agent) -> dict[str, Any]:
    db = engine.db
    row = await db.fetchone("SELECT created_at, summary, options FROM agents WHERE id = ?", (agent.id,))
    blocks = await core.blocks(db, agent)
    messages = await db.fetchall(
        "SELECT id, role, content, author, author_id, tool_calls, tool_call_id, created_at, in_context"
        " FROM messages WHERE agent_id = ? ORDER BY id",
        (agent.id,),
    )
    passages = await db.fetchall(
        "SELECT id, content, tags, source, created_at FROM passages WHERE agent_id = ? ORDER BY id", (agent.id,)
    )
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": now(),
        "agent": {"key": agent.key, "created_at": row["created_at"], "summary": row["summary"], "options": json.loads(row["options"])},
        "blocks": [{"label": b.label, "value": b.value, "limit": b.limit, "description": b.description} for b in blocks],
        "messages": [
            {
                "id": m["id"], "role": m["role"], "content": m["content"], "author": m["author"],
                "author_id": m["author_id"], "tool_calls": json.loads(m["tool_calls"]) if m["tool_calls"] else None,
                "tool_call_id": m["tool_call_id"], "created_at": m["created_at"], "in_context": m["in_context"] == recall.IN_CONTEXT,
            }
            for m in messages
        ],
        "passages": [
            {"id": p["id"], "content": p["content"], "tags": json.loads(p["tags"]), "source": p["source"], "created_at": p["created_at"]}
            for p in passages
        ],
    }


async def import_agent(engine: Engine, data: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """Load an export into agent `key` (default: the exported key).

    Blocks and the summary are replaced; messages and passages are added.
    Raises ValueError when `data` is not an export.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"missing \"format\": \"{FORMAT}\"")
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported version {data.get('version')!r}")
    try:
        key = key or data["agent"]["key"]
        agent = await engine.agent(str(key))
        for b in data["blocks"]:
            current = {x.label for x in await core.blocks(engine.db, agent)}
            if b["label"] not in current:
                await engine.db.execute(
                    "INSERT INTO blocks(agent_id, label, value, char_limit, description, updated_at) VALUES (?, ?, '', ?, ?, ?)",
                    (agent.id, b["label"], int(b["limit"]), b.get("description", ""), now()),
                )
            result = await core.set_value(engine.db, agent, b["label"], str(b["value"]))
            if result.startswith("Error"):
                raise ValueError(result)
        await engine.db.execute("UPDATE agents SET summary = ? WHERE id = ?", (str(data["agent"].get("summary", "")), agent.id))
        messages = [
            recall.Message(
                role=m["role"], content=m.get("content") or "", author=m.get("author", ""), author_id=m.get("author_id", ""),
                tool_calls=m.get("tool_calls"), tool_call_id=m.get("tool_call_id"), created_at=m["created_at"],
            )
            for m in data["messages"]
        ]
        # in-context messages go last and in order, so tool calls keep their results
        evicted = [m for m, raw in zip(messages, data["messages"]) if not raw.get("in_context")]
        current = [m for m, raw in zip(messages, data["messages"]) if raw.get("in_context")]
        await recall.append(engine.db, agent, evicted, state=recall.EVICTED)
        await recall.append(engine.db, agent, current, state=recall.IN_CONTEXT)
        for p in data["passages"]:
            await engine.archive.insert(
                agent, p["content"], tags=p.get("tags"), source=p.get("source", ""), created_at=p["created_at"], max_chars=10**7
            )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"missing or malformed field {exc}") from None
    return {"agent": agent.key, "blocks": len(data["blocks"]), "messages": len(messages), "passages": len(data["passages"])}
