"""The context window: what the model sees on each step, and keeping it within bounds.

The system part (instructions, core memory, memory status, summary) changes only
when memory changes, so providers' prompt caches hit from turn to turn; the time
travels in the messages instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, NamedTuple

from . import core, events, people, recall, replies, tokens, tools
from .agents import Agent
from .clock import minute, now
from .config import EngineSettings
from .db import Database, marks, sqlite3
from .llm import ChatResult, LLMClient, LLMError

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
You are a companion with long-term memory (MemGPT-style), talking with people on Discord.
Your context window is small. It holds these instructions, your core memory, a summary of older conversation, and the latest messages. Older messages move out of context into recall memory, where conversation_search finds them. Archival memory is your unlimited store: archival_memory_insert and archival_memory_search.
- Answer with send_message or with plain text; either ends your turn. Text you write next to other function calls is private thought that nobody sees.
- When you learn something lasting about a person, the channel or yourself, save it right away: short facts with core_memory_append or core_memory_replace, longer details with archival_memory_insert.
- Before saying you do not know or remember something, search recall and archival memory.
- Each user message starts with its time and its author's name and id. In channels many people talk: keep them apart.
- Messages marked "system event" come from the memory system, not from a person."""

SUMMARY_INSTRUCTIONS = """\
You keep the running summary of a long conversation for an assistant whose context window is limited.
Fold the messages that are leaving the context into the previous summary. Keep names, facts about people, dates, decisions, promises and open questions; drop greetings and small talk. Write plain prose in the past tense, at most {words} words. Answer with the summary only."""

TOOL_TOKENS = tokens.count_tools(tools.SCHEMAS)

# one message may take at most 1/CLIP_SHARE of the window; a longer one is shown clipped
CLIP_SHARE = 4
# characters of text kept per token of budget when clipping (low: clipped text must fit)
CHARS_PER_TOKEN = 3
# each clipped function call keeps at least this many characters of its arguments
MIN_ARGUMENT_CHARS = 40
# a function name the model made up is shown cut to this length
MAX_NAME_CHARS = 64
# the summary may take 1/SUMMARY_SHARE of the window, the messages to fold in 1/PIECE_SHARE
SUMMARY_SHARE = 10
PIECE_SHARE = 2
# words asked of the summarizer per token of its budget (English runs ~0.75 words a token)
WORDS_PER_TOKEN = 0.7
# a summary this short is judged on its own, however much markup came with it
SHORTEST_SUMMARY_CHARS = 200
# the bounds of the provider's correction to our token estimate
MIN_SCALE, MAX_SCALE = 0.5, 3.0


@dataclass
class TokenScale:
    """The provider's token count / our estimate, for one model: learned from each reported usage, both ways."""

    factor: float = 1.0

    def apply(self, estimate: int) -> int:
        return int(estimate * self.factor)

    def learn(self, estimate: int, reported: int) -> None:
        if estimate > 0 and reported > 0:
            self.factor = min(MAX_SCALE, max(MIN_SCALE, reported / estimate))

    def at_least(self, factor: float) -> None:
        self.factor = min(MAX_SCALE, max(self.factor, factor))


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, Any]]
    history: list[recall.Message]
    tokens: int  # the estimate corrected by the model's TokenScale: what the window checks use
    pressure_warned: bool = False
    estimate: int = 0  # our own count, before that correction


@lru_cache(maxsize=256)
def _count_system(text: str) -> int:
    return tokens.count(text) + tokens.PER_MESSAGE


class Snapshot(NamedTuple):
    """What a prompt is made of, read in one transaction."""

    blocks: list[core.Block]
    summary: str
    pressure_warned: bool
    out_of_context: int  # messages in recall only
    passages: int
    core_changed: str | None  # when a core block last changed
    history: list[recall.Message]  # the in-context messages
    events: str = ""  # the pending scheduled events, as the memory status shows them
    people: list[people.Person] | None = None  # channel agents: the blocks of the people in the context window


async def build(db: Database, agent: Agent, window: int) -> Prompt:
    # on the writer, in one transaction: each trip to a reader's thread costs more CPU than these small queries
    return assemble(await db.transact(lambda c: read(c, agent), quick=True), window)


def read(c: sqlite3.Connection, agent: Agent) -> Snapshot:
    """The prompt's parts, read inside a transaction."""
    row = c.execute(
        "SELECT summary, pressure_warned,"
        " (SELECT count(*) FROM messages WHERE agent_id = a.id AND in_context = 0),"
        " (SELECT count(*) FROM passages WHERE agent_id = a.id),"
        " (SELECT max(updated_at) FROM blocks WHERE agent_id = a.id)"
        " FROM agents a WHERE id = ?",
        (agent.id,),
    ).fetchone()
    summary, pressure_warned, out_of_context, passages, changed = row
    return Snapshot(
        core.read_blocks(c, agent),
        summary or "",
        bool(pressure_warned),
        out_of_context,
        passages,
        changed,
        history := recall.read_in_context(c, agent),
        events.status(c, agent),
        people.present(c, agent, _speakers(history)) if people.for_channel(agent) else None,
    )


def _speakers(history: list[recall.Message]) -> list[tuple[str, str]]:
    """(user id, current name) of the people with messages in the context window, most recent first."""
    seen: dict[str, str] = {}
    for m in reversed(history):
        if m.role == "user" and m.author_id and m.author_id not in seen:
            seen[m.author_id] = m.author
    return list(seen.items())


def assemble(snapshot: Snapshot, window: int) -> Prompt:
    changed = snapshot.core_changed
    parts = [
        INSTRUCTIONS,
        "### Core memory",
        core.render(snapshot.blocks),
        *([people.render(snapshot.people, window // people.PROMPT_SHARE)] if snapshot.people is not None else []),
        "### Memory status",
        f"{snapshot.out_of_context} older messages are in recall memory; {snapshot.passages} passages in archival memory; "
        f"core memory last changed {minute(changed) if changed else 'never'} UTC.",
    ]
    if snapshot.events:
        parts.append(snapshot.events)
    if snapshot.summary:
        parts += ["### Summary of earlier conversation", snapshot.summary]
    system = "\n".join(parts)
    history = [_clipped(m, window // CLIP_SHARE) for m in snapshot.history]
    messages = [{"role": "system", "content": system}] + [m.to_openai() for m in history]
    total = _count_system(system) + TOOL_TOKENS + sum(m.tokens for m in history)
    return Prompt(messages, history, total, snapshot.pressure_warned, total)


def _clipped(message: recall.Message, max_tokens: int) -> recall.Message:
    """A huge message as the model is shown it: the head of its text and of its calls' arguments.

    The whole message stays in recall; the stored one is never changed.
    """
    if message.tokens <= max_tokens:
        return message
    chars = max_tokens * CHARS_PER_TOKEN
    calls = message.tool_calls or []
    content = message.content
    if calls:
        share = max(MIN_ARGUMENT_CHARS, chars // (len(calls) + 1))
        calls = [_clipped_call(call, share) for call in calls]
        chars = share
    if len(content) > chars:
        content = content[:chars] + f"\n[… cut: this message has {len(content)} characters; conversation_search finds the rest]"
    shown = replace(message, content=content, tool_calls=calls or message.tool_calls)
    return replace(shown, tokens=tokens.count_message(shown.to_openai()))


def _clipped_call(call: dict[str, Any], limit: int) -> dict[str, Any]:
    """A function call with its arguments cut to about `limit` characters, still a JSON object for the provider."""
    fn = call.get("function") or {}
    raw = fn.get("arguments") or ""
    name = str(fn.get("name") or "")
    if len(name) > MAX_NAME_CHARS:  # no tool has such a name: what matters is that it was wrong
        fn = {**fn, "name": name[:MAX_NAME_CHARS]}
    if len(raw) <= limit:
        return {**call, "function": fn}
    try:
        args: dict[str, Any] | None = tools.parse_arguments(raw)
    except tools.BadArguments:
        args = None
    text = ""
    if args:
        each = max(1, limit // len(args))
        text = json.dumps(
            {
                k: v[:each] + f"[… cut: {len(v)} characters]" if isinstance(v, str) and len(v) > each else v
                for k, v in args.items()
            },
            ensure_ascii=False,
        )
    if not text or len(text) > 2 * limit:  # not an object, or its bulk is not in strings
        text = json.dumps(
            {"arguments_cut": raw[:limit], "note": f"cut: the arguments had {len(raw)} characters"}, ensure_ascii=False
        )
    return {**call, "function": {**fn, "arguments": text}}


async def warn_if_pressured(db: Database, agent: Agent, prompt: Prompt, settings: EngineSettings) -> bool:
    """Once per crossing of the warning line, tell the model to save what matters."""
    share = prompt.tokens / settings.context_window
    if share < settings.memory_warning_fraction:
        if prompt.pressure_warned:
            await db.execute("UPDATE agents SET pressure_warned = 0 WHERE id = ?", (agent.id,))
        return False
    if prompt.pressure_warned:
        return False
    event = recall.Message(
        role="system",
        content=(
            f"Memory pressure: the context is {share:.0%} full. The oldest messages will soon move out of "
            "context into a summary. Save anything important now: facts with core_memory_append or "
            "core_memory_replace, details with archival_memory_insert."
        ),
    )
    await recall.append(db, agent, [event])
    await db.execute("UPDATE agents SET pressure_warned = 1 WHERE id = ?", (agent.id,))
    return True


def _cut(history: list[recall.Message], excess: int, keep_last: int) -> int:
    """Index of the first message to keep: frees at least `excess` tokens when it can.

    Never separates a tool result from the assistant call before it, and always
    keeps the last `keep_last` messages.
    """
    limit = max(0, len(history) - keep_last)
    freed, cut = 0, 0
    while cut < limit and freed < excess:
        freed += history[cut].tokens
        cut += 1
    while cut < len(history) and history[cut].role == "tool":
        cut += 1  # the call left: its results leave with it
    if cut > limit:  # ...unless that would evict the protected tail; keep the whole group
        cut -= 1
        while cut > 0 and history[cut].role == "tool":
            cut -= 1
    return cut


def transcript(messages: list[recall.Message], max_tool_chars: int = 300, max_tokens: int | None = None) -> str:
    """The messages as lines for the summarizer and consolidation, cut to `max_tokens` if given.

    A person's text is quoted as in the prompt (recall.Message.to_openai), so a line they paste
    cannot pass for another author's, and through the summary reach the system prompt.
    """
    lines = []
    for m in messages:
        when = minute(m.created_at)
        if m.role == "user":
            lines.append(m.to_openai()["content"])
        elif m.role == "system":
            lines.append(f"[{when}] (system) {recall.quoted(m.content)}")
        elif m.role == "tool":
            lines.append(f"[{when}] (function result) {recall.quoted(m.content[:max_tool_chars])}")
        else:
            if m.content:  # text beside function calls is private thought; alone it is the reply
                who = "assistant (thinking)" if m.tool_calls else "assistant"
                lines.append(f"[{when}] {who}: {recall.quoted(m.content)}")
            for call in m.tool_calls or []:
                fn = call.get("function", {})
                lines.append(
                    f"[{when}] assistant called {fn.get('name')}({recall.quoted(str(fn.get('arguments', ''))[:max_tool_chars])})"
                )
    text = "\n".join(lines)
    if max_tokens is not None and tokens.count(text) > max_tokens:  # one huge message: its head is enough
        text = text[: max_tokens * CHARS_PER_TOKEN]
    return text


async def summarize(
    llm: LLMClient,
    model: str,
    previous: str,
    evicted: list[recall.Message],
    settings: EngineSettings,
    calls: list[ChatResult],
) -> str:
    """Fold `evicted` into `previous`, in pieces when the span is larger than the window allows.

    Each model call's result is appended to `calls` (for time and token accounting).
    """
    budget = settings.context_window // SUMMARY_SHARE  # tokens for the summary itself
    piece_budget = settings.context_window // PIECE_SHARE
    pieces: list[list[recall.Message]] = [[]]
    size = 0
    for m in evicted:
        if pieces[-1] and size + m.tokens > piece_budget:
            pieces.append([])
            size = 0
        pieces[-1].append(m)
        size += m.tokens
    summary = previous
    for piece in pieces:
        text = transcript(piece, max_tokens=piece_budget)
        result = await llm.chat(
            model,
            [
                {"role": "system", "content": SUMMARY_INSTRUCTIONS.format(words=int(budget * WORDS_PER_TOKEN))},
                {"role": "user", "content": f"Previous summary:\n{summary or '(none)'}\n\nMessages leaving the context:\n{text}"},
            ],
            max_tokens=budget,
        )
        calls.append(result)
        summary = _checked_summary(result)
    return summary


def _checked_summary(result: ChatResult) -> str:
    """The summarizer's answer if it is a summary: not cut off, not thinking alone, not the model
    writing the next turn of a chat (one small model's began with `<|im_start|>user`)."""
    if result.finish_reason == "length":
        raise LLMError("the summarizer's answer was cut off at its output limit")
    new = replies.read(result.content, (), result.reasoning).text
    if not new:
        raise LLMError("the summarizer returned no summary")
    if len(new) < len(replies.split_thinking(result.content)[0].strip()) / 2 and len(new) < SHORTEST_SUMMARY_CHARS:
        raise LLMError("the summarizer's answer was mostly chat markup, not a summary")
    return new


@dataclass
class Eviction:
    messages: list[recall.Message]
    calls: list[ChatResult]  # the summarizer's


async def compact(
    db: Database,
    llm: LLMClient,
    model: str,
    agent: Agent,
    prompt: Prompt,
    settings: EngineSettings,
    *,
    target: float,
    force: bool = False,
) -> Eviction | None:
    """Evict the oldest messages until the prompt is under `target` × window.

    `force`: the provider said the prompt overflowed, whatever our estimate says.
    A summarizer failure keeps the messages in context unless the prompt no longer
    fits the window at all; then they leave without a summary (they stay in recall)
    and the summary says so.
    """
    overflowing = force or prompt.tokens > settings.context_window
    size = max(prompt.tokens, settings.context_window + 1) if force else prompt.tokens
    excess = size - int(target * settings.context_window)
    cut = _cut(prompt.history, excess, settings.keep_last_messages)
    if cut == 0:
        return None
    evicted = prompt.history[:cut]
    previous = await db.fetchval("SELECT summary FROM agents WHERE id = ?", (agent.id,), "")
    calls: list[ChatResult] = []
    try:
        summary = await summarize(llm, model, previous, evicted, settings, calls)
    except LLMError as exc:
        if not overflowing:
            log.warning("summarizer failed for %s, keeping messages in context for now: %s", agent.key, exc)
            return None
        log.warning("summarizer failed for %s and the window is full; evicting without a summary: %s", agent.key, exc)
        note = (
            f"(Messages from {minute(evicted[0].created_at)} to {minute(evicted[-1].created_at)} left the context "
            "without a summary; find them with conversation_search.)"
        )
        summary = f"{previous}\n{note}" if previous else note
    ids = [m.id for m in evicted]

    def evict(c: sqlite3.Connection) -> None:
        c.execute("UPDATE agents SET summary = ?, summary_updated_at = ? WHERE id = ?", (summary, now(), agent.id))
        c.execute(f"UPDATE messages SET in_context = 0 WHERE agent_id = ? AND id IN ({marks(len(ids))})", (agent.id, *ids))

    await db.transact(evict)
    # the turn's own log line counts them
    log.debug("%s: evicted %d messages (%d tokens)", agent.key, len(evicted), sum(m.tokens for m in evicted))
    return Eviction(evicted, calls)
