"""Documents sent to the bot go into the agent's archival memory (the paper's document analysis)."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import PurePath

import discord

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {
    ".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".ini",
    ".cfg", ".log", ".xml", ".html", ".htm", ".css", ".py", ".js", ".ts", ".tsx", ".jsx", ".java", ".kt", ".c",
    ".h", ".cpp", ".hpp", ".cs", ".go", ".rs", ".rb", ".php", ".swift", ".sh", ".bash", ".sql", ".lua", ".r",
    ".scala", ".hs", ".ex", ".exs", ".erl", ".clj", ".dart", ".vue", ".svelte", ".tex",
}
SUPPORTED = ", ".join(sorted(s.lstrip(".") for s in TEXT_SUFFIXES | {".pdf"}))
# a document far longer than this is mostly noise for a chat agent's memory
MAX_DOCUMENT_CHARS = 2_000_000


class Unreadable(Exception):
    """The file can't be ingested; str() is the reply for the user."""


def kind(attachment: discord.Attachment) -> str | None:
    suffix = PurePath(attachment.filename).suffix.lower()
    if suffix == ".pdf":
        return "pdf"
    if suffix in TEXT_SUFFIXES or (attachment.content_type or "").startswith("text/"):
        return "text"
    return None


def check(attachment: discord.Attachment, max_bytes: int) -> None:
    """Refuse before downloading anything."""
    if kind(attachment) is None:
        raise Unreadable(f"I can't read `{attachment.filename}`: I take text files ({SUPPORTED}).")
    if attachment.size > max_bytes:
        raise Unreadable(
            f"`{attachment.filename}` is {attachment.size / 1e6:.1f} MB; I can read files up to {max_bytes / 1e6:.1f} MB."
        )


async def extract_text(attachment: discord.Attachment, data: bytes) -> str:
    if kind(attachment) == "pdf":
        text = await asyncio.to_thread(_pdf_text, data, attachment.filename)
    else:
        text = data.decode("utf-8-sig", errors="replace")
    text = text.replace("\x00", "").strip()
    if not text:
        raise Unreadable(f"`{attachment.filename}` has no text I could read.")
    return text[:MAX_DOCUMENT_CHARS]


def _pdf_text(data: bytes, filename: str) -> str:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception as exc:  # pypdf raises many kinds on damaged or encrypted files
        log.info("unreadable PDF %s: %r", filename, exc)
        raise Unreadable(f"`{filename}` is not a PDF I can read.") from None
