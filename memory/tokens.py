"""Token counting: an estimate shaped like cl100k_base, the provider's usage as truth.

No tokenizer is loaded: cl100k_base costs about 40 MiB of memory and is not the
tokenizer of most models this talks to anyway (gpt-4o uses o200k; local models
have their own). The estimate follows cl100k's pre-tokenizer (one token per
word, number or punctuation run; more for long words and non-Latin scripts) and
carries a safety margin; when the provider reports more tokens than estimated,
the agent loop scales its estimates up (Letta #3279: an estimate below the real
count overflows local models). tests/test_tokens.py keeps it close to cl100k.
"""

from __future__ import annotations

import json
import re
from typing import Any

SAFETY_MARGIN = 1.1
# chat templates wrap every message in a few tokens of their own
PER_MESSAGE = 4

_PIECE = re.compile(
    r"'(?:s|t|re|ve|m|ll|d)\b|[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", re.IGNORECASE
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_LATIN = re.compile(r"[\u00c0-\u024f]")
_ASTRAL = re.compile(r"[\U00010000-\U0010ffff]")


def _estimate(text: str) -> int:
    pieces = _PIECE.findall(text)
    n = len(pieces) + sum((len(p) - 1) // 8 for p in pieces if len(p) > 10)
    if not text.isascii():
        # BPE vocabularies hold few multi-character pieces of other scripts
        non_ascii = len(_NON_ASCII.findall(text))
        cjk, latin, astral = len(_CJK.findall(text)), len(_LATIN.findall(text)), len(_ASTRAL.findall(text))
        n += int(cjk * 1.2 + latin * 2.0 + (non_ascii - cjk - latin - astral) * 0.35) + astral * 3
    return n


def count(text: str) -> int:
    if not text:
        return 0
    return int(_estimate(text) * SAFETY_MARGIN) + 1


def count_message(message: dict[str, Any]) -> int:
    total = PER_MESSAGE + count(message.get("content") or "")
    if message.get("tool_calls"):
        total += count(json.dumps(message["tool_calls"]))
    return total


def count_tools(tools: list[dict[str, Any]]) -> int:
    return count(json.dumps(tools))
