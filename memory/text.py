"""Text from outside made valid once, where it enters.

Python strings can hold lone surrogates ("\\ud83d" from a JSON escape, bytes read
with surrogateescape) that no UTF-8 encoder accepts: SQLite, orjson and
Discord's API would each fail on them later, far from where they came in.
"""

from __future__ import annotations

import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def valid(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD and NUL bytes dropped."""
    return without_surrogates(text).replace("\x00", "")


def without_surrogates(text: str) -> str:
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def without_surrogates_in(value: Any) -> Any:
    """Decoded JSON with lone surrogates replaced in every string, keys included."""
    if isinstance(value, str):
        return without_surrogates(value)
    if isinstance(value, list):
        return [without_surrogates_in(v) for v in value]
    if isinstance(value, dict):
        return {without_surrogates(str(k)): without_surrogates_in(v) for k, v in value.items()}
    return value
