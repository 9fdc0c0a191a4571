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
    parts: list[str] = []
    text = text.strip()
    while (cut := first_part(text, limit)) is not None:
        part, text = cut
        if part.strip():  # a part of blanks only (spaces kept before a long line) is no message
            parts.append(part)
    last = _finished(text).strip("\n")
    return [*parts, last] if last.strip() else parts


def first_part(text: str, limit: int = LIMIT) -> tuple[str, str] | None:
    """When `text` does not fit one message: (its first message, finished, and the text that
    continues in the next, a code block cut in two reopened there); None when it fits.

    For a reply shown while it is written: once a message is full it is finished, and what
    comes after continues in a new message, split where split_message would split it."""
    lines: list[str] = []
    fences: list[str | None] = []  # the open fence after each line of `lines`
    fence: str | None = None
    pieces = _pieces(text, limit)
    for i, line in enumerate(pieces):
        if lines != [fence] and _size(lines) + len(line) + 1 + _reserve(fence) > limit:
            keep = _cut_point(lines, fences)
            carry, kept = lines[keep:], lines[:keep]
            open_fence = fences[keep - 1] if keep else None
            part = "\n".join(kept + ([_closing(open_fence)] if open_fence else [])).strip("\n")
            rest = [open_fence, *carry] if open_fence else carry
            return part, "\n".join(rest + pieces[i:])
        lines.append(line)
        fence = _toggle(fence, line)
        fences.append(fence)
    return None


def _finished(text: str) -> str:
    """The last part: a block the model left open is closed."""
    fence = None
    for line in text.split("\n"):
        fence = _toggle(fence, line)
    return f"{text}\n{_closing(fence)}" if fence else text


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
