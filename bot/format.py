"""Fitting replies into Discord messages (2000 characters, which discord.py does not split)."""

from __future__ import annotations

import re

LIMIT = 2000
_FENCE = re.compile(r"^\s*(```+|~~~+)([\w+#.-]{0,20})")


def split_message(text: str, limit: int = LIMIT) -> list[str]:
    """Split at paragraph ends where possible, else at line ends, else at spaces.

    A code block cut in two is closed at the end of one part and reopened, with
    its language, at the start of the next, so both halves render as code.
    """
    text = text.strip()
    if not text:
        return []
    parts: list[str] = []
    lines: list[str] = []
    fences: list[str | None] = []  # the open fence after each line of `lines`
    fence: str | None = None
    for line in _pieces(text, limit):
        prefer_paragraph = True
        while lines != [fence] and _size(lines) + len(line) + 1 + _reserve(fence) > limit:
            keep = _cut_point(lines, fences) if prefer_paragraph else len(lines)
            prefer_paragraph = False
            carry, lines, fences = lines[keep:], lines[:keep], fences[:keep]
            open_fence = fences[-1] if fences else None
            parts.append("\n".join(lines + ([_closing(open_fence)] if open_fence else [])).strip("\n"))
            reopened: list[str | None] = [open_fence] if open_fence else []
            lines = [open_fence, *carry] if open_fence else carry
            fences = reopened + fences_after(carry, open_fence)
        lines.append(line)
        fence = _toggle(fence, line)
        fences.append(fence)
    if fence:  # the model left a block open: close it
        lines.append(_closing(fence))
    last = "\n".join(lines).strip("\n")
    if last.strip():
        parts.append(last)
    return parts


def fences_after(lines: list[str], fence: str | None) -> list[str | None]:
    out: list[str | None] = []
    for line in lines:
        fence = _toggle(fence, line)
        out.append(fence)
    return out


def _toggle(fence: str | None, line: str) -> str | None:
    """The open fence after `line`: its marker and language, to reopen it with."""
    match = _FENCE.match(line)
    if not match:
        return fence
    return None if fence else match.group(1) + match.group(2)


def _cut_point(lines: list[str], fences: list[str | None]) -> int:
    """How many lines stay in this part: up to the last paragraph break in its second half."""
    for i in range(len(lines) - 1, len(lines) // 2, -1):
        if not lines[i].strip() and fences[i] is None:
            return i + 1
    # don't end a part on a fence that opens a block: it would show as an empty block
    if len(lines) > 1 and fences[-1] is not None and _FENCE.match(lines[-1]):
        return len(lines) - 1
    return len(lines)


def _size(lines: list[str]) -> int:
    return sum(len(line) + 1 for line in lines)


def _reserve(fence: str | None) -> int:
    return len(_closing(fence)) + 1 if fence else 0


def _closing(fence: str | None) -> str:
    match = _FENCE.match(fence or "")
    return match.group(1).strip() if match else ""


def _pieces(text: str, limit: int) -> list[str]:
    """Lines, with any line too long for a part cut at spaces (or hard, if it has none)."""
    room = limit - 40  # space for a closing and a reopening fence around the piece
    out: list[str] = []
    for line in text.split("\n"):
        while len(line) > room:
            cut = line.rfind(" ", room // 2, room)
            cut = cut if cut > 0 else room
            out.append(line[:cut])
            line = line[cut:].lstrip(" ")
        out.append(line)
    return out


def spoiler(text: str, limit: int = LIMIT) -> list[str]:
    """Text as Discord spoilers, each message within `limit`; a `||` inside would end the spoiler early."""
    text = text.replace("||", "| |")
    return [f"||{part}||" for part in split_message(text, limit - 4)]
