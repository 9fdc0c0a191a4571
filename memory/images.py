"""Images for vision models: checked by their bytes, sent once as base64 parts, remembered as text.

An image reaches the model only in the request of the turn it arrived in, as an OpenAI image part
on its own user message. Recall keeps a text stand-in instead (name, type, size, beside the
message's text): searches and summaries know it was there, and the bytes are never stored, nor
sent again on later steps or turns. A model that cannot see images is told so in words instead.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

# what vision models take (OpenAI, Ollama, vLLM, llama.cpp): by the file's first bytes
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WebP", "image/gif": "GIF"}
SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif"}
KINDS = "PNG, JPEG, WebP or GIF"
# said to the model, in the request, beside an image it was not shown after all
CANNOT_SEE = "(an image came with this message, but this model cannot see images: only its name and size reached you)"


class Refused(Exception):
    """An image that is not passed on: str() is the short note for the person who sent it,
    `reason` the words its stand-in gives the model."""

    def __init__(self, note: str, reason: str) -> None:
        super().__init__(note)
        self.reason = reason


@dataclass(frozen=True)
class Image:
    name: str
    mime: str  # read from the bytes
    data: bytes

    def part(self) -> dict[str, Any]:
        """The OpenAI content part: a data URL, as local servers want (no remote URLs; Discord's expire)."""
        url = f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"
        return {"type": "image_url", "image_url": {"url": url}}

    def stand_in(self) -> str:
        """What recall keeps of it."""
        return stand_in(self.name, FORMATS[self.mime], len(self.data))


def sniff(data: bytes) -> str | None:
    """The image type its first bytes say (PNG, JPEG, WebP, GIF), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return None


def claimed(name: str, content_type: str | None) -> str | None:
    """The type a file's content type or name claims, if one the model takes (its bytes decide later)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    return ctype if ctype in FORMATS else SUFFIXES.get(PurePath(name).suffix.lower())


def looks_like_image(name: str, content_type: str | None) -> bool:
    """Sent as a picture: its content type or name says image, whatever kind."""
    return (content_type or "").lower().startswith("image/") or claimed(name, content_type) is not None


def check(name: str, content_type: str | None, size: int, max_bytes: int) -> None:
    """Refuse before downloading: a kind the model does not take, or too large."""
    if claimed(name, content_type) is None:
        raise Refused(f"I can look at {KINDS} images; `{name}` is not one.", f"not a {KINDS} image")
    if size > max_bytes:
        raise _too_large(name, size, max_bytes)


def read(name: str, data: bytes, max_bytes: int) -> Image:
    """The image in `data`, its type read from the bytes, not from the name."""
    if len(data) > max_bytes:  # the size announced was not the size sent
        raise _too_large(name, len(data), max_bytes)
    mime = sniff(data)
    if mime is None:
        raise Refused(f"`{name}` is not a {KINDS} image I can read.", f"its bytes are not a {KINDS} image")
    return Image(name, mime, data)


def _too_large(name: str, size: int, max_bytes: int) -> Refused:
    limit = _size(max_bytes)
    return Refused(f"`{name}` is {_size(size)}; I look at images up to {limit}.", f"larger than {limit}")


def kind(name: str, content_type: str | None) -> str:
    """An image's type for its stand-in, when its bytes were not read."""
    mime = claimed(name, content_type)
    return FORMATS[mime] if mime else (content_type or "unknown type")[:60]


def stand_in(name: str, kind: str, size: int, unseen: str | None = None) -> str:
    """The text recall keeps for an image. `unseen`: not shown to the model, and why ("": no reason given)."""
    text = f"[image `{name}`, {kind}, {_size(size)}"
    if unseen is None:
        return text + "]"
    return text + (f", not shown to you: {unseen}]" if unseen else ", not shown to you]")


def _size(size: int) -> str:
    if size >= 1_000_000:
        return f"{size / 1e6:.1f} MB"
    return f"{size / 1000:.0f} KB" if size >= 1000 else f"{size} bytes"


def attach(messages: list[dict[str, Any]], parts: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A request with image parts after the text of the messages at those indexes (the others shared, not copied)."""
    if not parts:
        return messages
    out = list(messages)
    for i, added in parts.items():
        out[i] = {**out[i], "content": [{"type": "text", "text": out[i]["content"]}, *added]}
    return out


def carries_images(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) for m in messages)


def without_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same request for a model that cannot see: each image part gone, its message telling so in words."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            text = "\n".join(p["text"] for p in content if p.get("type") == "text")
            m = {**m, "content": f"{text}\n{CANNOT_SEE}"}
        out.append(m)
    return out
