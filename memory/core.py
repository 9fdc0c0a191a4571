"""Core memory: labelled, size-limited blocks that are always in the prompt.

Edits return an `Edit`: whether it was made, and a sentence for the model. A
refusal says what to do instead and never raises: the model reads it as a tool
result and tries again.
"""

from __future__ import annotations

from dataclasses import dataclass

from .agents import Agent
from .clock import now
from .db import Database, sqlite3

# how much of the model's text a refusal quotes back
QUOTE_CHARS = 120


@dataclass(frozen=True)
class Edit:
    ok: bool
    text: str


def _refused(text: str) -> Edit:
    return Edit(False, text)


def quote(text: str) -> str:
    """A bounded quotation of untrusted text for an error result: a 1 MB input must not make a 1 MB result."""
    return repr(text) if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]!r}… ({len(text)} characters)"


@dataclass(frozen=True)
class Block:
    label: str
    value: str
    limit: int
    description: str


_BLOCKS = "SELECT label, value, char_limit, description FROM blocks WHERE agent_id = ? ORDER BY rowid"


async def blocks(db: Database, agent: Agent) -> list[Block]:
    return [Block(*row) for row in await db.fetchall(_BLOCKS, (agent.id,))]


def read_blocks(c: sqlite3.Connection, agent: Agent) -> list[Block]:
    """`blocks` inside a transaction."""
    return [Block(*row) for row in c.execute(_BLOCKS, (agent.id,))]


def render(blocks: list[Block]) -> str:
    parts = []
    for b in blocks:
        parts.append(f'<{b.label} chars="{len(b.value)}/{b.limit}" about="{b.description}">\n{b.value}\n</{b.label}>')
    return "\n".join(parts)


async def _get(db: Database, agent: Agent, label: str) -> Block | Edit:
    all_blocks = await blocks(db, agent)
    for b in all_blocks:
        if b.label == label:
            return b
    labels = ", ".join(b.label for b in all_blocks)
    return _refused(f"Error: there is no core memory block {quote(label)}. Use one of: {labels}.")


async def _store(db: Database, agent: Agent, block: Block, value: str, expected: str) -> bool:
    """Write only if nobody changed the block meanwhile (consolidation runs beside turns)."""
    changed = await db.execute(
        "UPDATE blocks SET value = ?, updated_at = ? WHERE agent_id = ? AND label = ? AND value = ?",
        (value, now(), agent.id, block.label, expected),
    )
    return changed == 1


def _too_long(block: Block, new_len: int) -> Edit:
    return _refused(
        f"Error: block {block.label!r} would hold {new_len} characters; its limit is {block.limit} "
        f"(now {len(block.value)}). Shorten it first with core_memory_replace (condense or drop old "
        "details), or save long details with archival_memory_insert."
    )


def _changed_meanwhile(block: Block) -> Edit:
    return _refused(f"Error: block {block.label!r} changed while you edited it; read it again and retry.")


async def append(db: Database, agent: Agent, label: str, content: str) -> Edit:
    content = content.strip()
    if not content:
        return _refused("Error: content is empty; nothing was appended.")
    block = await _get(db, agent, label)
    if isinstance(block, Edit):
        return block
    value = f"{block.value}\n{content}" if block.value else content
    if len(value) > block.limit:
        return _too_long(block, len(value))
    if not await _store(db, agent, block, value, block.value):
        return _changed_meanwhile(block)
    return Edit(True, f"Appended to {label!r} ({len(value)}/{block.limit} characters).")


async def replace(db: Database, agent: Agent, label: str, old: str, new: str) -> Edit:
    block = await _get(db, agent, label)
    if isinstance(block, Edit):
        return block
    if not old:
        return _refused("Error: old_content is empty. Quote the exact text to change; to add text use core_memory_append.")
    count = block.value.count(old)
    if count == 0:
        return _refused(
            f"Error: {quote(old)} does not occur in block {label!r}. Copy the exact text from the block "
            "as shown in your core memory (same spelling, spacing and case)."
        )
    if count > 1:
        return _refused(
            f"Error: {quote(old)} occurs {count} times in block {label!r}. Quote more surrounding text so it matches once."
        )
    value = block.value.replace(old, new, 1)
    if len(value) > block.limit:
        return _too_long(block, len(value))
    if not await _store(db, agent, block, value, block.value):
        return _changed_meanwhile(block)
    action = "Deleted the text from" if not new else "Replaced the text in"
    return Edit(True, f"{action} {label!r} ({len(value)}/{block.limit} characters).")


def write_defaults(c: sqlite3.Connection, agent: Agent, blocks: list[tuple[str, str, int, str]]) -> None:
    """Blocks back to their defaults, inside a transaction; (label, value, limit, description)
    as agents.default_blocks gives them, which always fit."""
    c.executemany(
        "UPDATE blocks SET value = ?, updated_at = ? WHERE agent_id = ? AND label = ?",
        [(value, now(), agent.id, label) for label, value, _, _ in blocks],
    )


async def set_value(db: Database, agent: Agent, label: str, value: str) -> Edit:
    """Overwrite a whole block (persona edits by admins, consolidation, resets)."""
    block = await _get(db, agent, label)
    if isinstance(block, Edit):
        return block
    if len(value) > block.limit:
        return _too_long(block, len(value))
    await db.execute(
        "UPDATE blocks SET value = ?, updated_at = ? WHERE agent_id = ? AND label = ?", (value, now(), agent.id, label)
    )
    return Edit(True, f"Block {label!r} set ({len(value)}/{block.limit} characters).")
