"""JSON to and from Discord, where every frame is untrusted input.

discord.py decodes gateway frames and REST bodies with orjson when it is installed, and orjson
refuses a lone surrogate escape ("\\ud83d") that Discord relays from a client: the error ends the
gateway reader, and with it `mnemocord run`. These hooks replace discord.py's own, so one bad frame
costs at most that frame and bad characters become U+FFFD where they enter.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import discord.utils

from memory.text import without_surrogates_in as valid

log = logging.getLogger(__name__)

_strict_loads = discord.utils._from_json
_strict_dumps = discord.utils._to_json


def loads(text: str | bytes | bytearray | memoryview) -> Any:
    if isinstance(text, memoryview):
        text = text.tobytes()
    try:
        return _strict_loads(text)
    except ValueError:
        pass
    try:
        # the standard decoder reads lone surrogate escapes as characters, which valid() then replaces
        return valid(json.loads(text))
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python recurses
        # a gateway frame that is no JSON at all: the reader ignores an empty payload (no op code)
        log.warning("ignored %d characters from Discord that are not JSON", len(text))
        return {}


def dumps(obj: Any) -> str:
    try:
        return _strict_dumps(obj)
    except TypeError:  # orjson: "str is not valid UTF-8: surrogates not allowed"
        return _strict_dumps(valid(obj))


def install() -> None:
    """Make discord.py use these hooks; it looks them up on each call, so this covers every client."""
    discord.utils._from_json = loads
    discord.utils._to_json = dumps
