"""A scripted multi-session conversation through the engine against a real model endpoint.

A person states facts, small talk pushes them out of the context window, a later session
asks for them back. What must be zero with any model, however small: protocol errors (a
model call the engine could not complete) and markup leaks (thinking, call markup,
template tokens or engine text in a reply). Recall is the model's own skill.

With --stream every model call streams (Engine.send's on_text) and each snapshot of the reply
is checked too: it holds no markup, and the snapshots of the model call the reply came from are
prefixes of it (each attempt of a model call starts its snapshots again; earlier runs are not compared).

    .venv/bin/python bench/live.py --base-url http://127.0.0.1:8080/v1 --model smollm2 [--tool-mode text] [--stream]

Last line:
live model=<name> turns=<n> protocol_errors=<n> markup_leaks=<n> empty_replies=<n> facts_recalled=<k>/<m> p50_turn_s=<x>
and with --stream: ... stream_snapshots=<n> streamed_turns=<n> snapshot_errors=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import recall  # noqa: E402
from memory.agent import STUCK, TurnOutcome  # noqa: E402
from memory.config import EngineSettings  # noqa: E402
from memory.engine import Engine  # noqa: E402
from memory.loop import EMPTY_ANSWER, EMPTY_LAST_ANSWER, MALFORMED_CALL  # noqa: E402

FACTS = [
    ("My name is Priya and I am a marine biologist.", "What is my job?", "biolog"),
    ("My dog is called Biscuit.", "What is my dog called?", "biscuit"),
    ("I live in Lisbon, near the river.", "Which city do I live in?", "lisbon"),
]
SMALL_TALK = [
    "How are you doing today?",
    "What is a good way to relax after work?",
    "Tell me something interesting about clouds.",
    "Do you like rainy days?",
    "What should I cook for dinner tonight?",
    "Any tips for sleeping better?",
    "What is your favourite season?",
    "Can you recommend a hobby?",
]
# what must never reach a person
LEAK = re.compile(
    r"<\/?think>|<\/?tool_call>|\[TOOL_CALLS\]|<\|[a-z_]+\|>|<(?:start|end)_of_turn>|```json|\{\s*\"name\"\s*:"
    r"|\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}|system event|"
    + "|".join(re.escape(n) for n in (EMPTY_ANSWER, EMPTY_LAST_ANSWER, MALFORMED_CALL)),
    re.IGNORECASE,
)


async def run(args: argparse.Namespace) -> str:
    directory = Path(tempfile.mkdtemp(prefix="live-"))
    values = dict(
        database_path=directory / "live.db",
        llm_base_url=args.base_url,
        llm_model=args.model,
        llm_timeout=args.timeout,
        llm_max_tokens=args.max_tokens,
        consolidation_max_tokens=args.max_tokens,
        tool_mode=args.tool_mode,
    )
    if args.context_window:
        values["context_window"] = args.context_window
    settings = EngineSettings(_env_file=None, **values)  # type: ignore[arg-type]
    engine = await Engine.open(settings)
    print(f"context window {settings.context_window}, tool mode {args.tool_mode}, database {settings.database_path}")
    key = "dm:live"
    turns = errors = leaks = empty = recalled = 0
    snapshots = streamed = snapshot_errors = 0
    seconds: list[float] = []

    async def say(text: str) -> str:
        nonlocal turns, errors, leaks, empty, snapshots, streamed, snapshot_errors
        shown: list[str] = []
        started = time.perf_counter()
        message = recall.Message(role="user", content=text, author="Priya", author_id="42")
        result = await engine.send(key, message, on_text=shown.append if args.stream else None)
        seconds.append(time.perf_counter() - started)
        turns += 1
        reply = result.reply or ""
        if result.outcome in (TurnOutcome.ERROR, TurnOutcome.OVERFLOW):
            errors += 1
        if LEAK.search(reply):
            leaks += 1
        if not reply.strip() or reply == STUCK:
            empty += 1
        if shown:
            streamed += 1
            snapshots += len(shown)
            bad = _snapshot_errors(shown, reply, result.outcome)
            snapshot_errors += bad
            if bad:
                print(f"    {bad} bad snapshots: {[s[:80] for s in shown]!r}")
        flag = f" [{result.outcome}: {result.error}]" if result.error else ""
        print(f"  {text!r} -> {reply[:160]!r} ({result.steps} steps, {seconds[-1]:.1f} s){flag}")
        return reply

    try:
        print("session 1: facts")
        for fact, _, _ in FACTS:
            await say(fact)
        print("session 2: small talk")
        for line in SMALL_TALK:
            await say(line)
        await engine.wait_background()
        print("session 3: questions")
        for _, question, answer in FACTS:
            if answer in (await say(question)).lower():
                recalled += 1
        await engine.wait_background()
    finally:
        await engine.close()
    p50 = statistics.median(seconds) if seconds else 0.0
    line = (
        f"live model={args.model} turns={turns} protocol_errors={errors} markup_leaks={leaks} empty_replies={empty} "
        f"facts_recalled={recalled}/{len(FACTS)} p50_turn_s={p50:.1f}"
    )
    if args.stream:
        line += f" stream_snapshots={snapshots} streamed_turns={streamed} snapshot_errors={snapshot_errors}"
    return line


def _snapshot_errors(shown: list[str], reply: str, outcome: TurnOutcome) -> int:
    """Snapshots that hold markup, or that are no prefix of the reply they lead to.

    Snapshots start again with each model call's attempt (a retried stream, the turn's next
    step); only the last run, the one the turn's reply came from, is checked against the
    reply, and only when the reply is the model's, not a failed turn's apology."""
    bad = sum(1 for text in shown if LEAK.search(text))
    if outcome not in (TurnOutcome.ERROR, TurnOutcome.OVERFLOW):
        first = len(shown) - 1
        while first > 0 and shown[first].startswith(shown[first - 1]):
            first -= 1
        bad += sum(1 for text in shown[first:] if not reply.startswith(text))
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tool-mode", choices=["auto", "native", "text"], default="auto")
    parser.add_argument("--context-window", type=int, default=0, help="default: what the server says, else 8192")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--stream", action="store_true", help="stream every model call and check each snapshot")
    parser.add_argument("-v", action="store_true", help="engine log lines too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.v else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
