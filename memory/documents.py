"""Documents (text files and PDFs) as text for archival memory (the paper's document analysis).

Shared by the Discord bot (attachments) and the CLI (`mnemocord ingest`, `/file` in `mnemocord chat`).
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import PurePath

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {
    ".txt",
    ".md",
    ".markdown",
    ".rst",
    ".csv",
    ".tsv",
    ".json",
    ".jsonl",
    ".yaml",
    ".yml",
    ".toml",
    ".ini",
    ".cfg",
    ".log",
    ".xml",
    ".html",
    ".htm",
    ".css",
    ".py",
    ".js",
    ".ts",
    ".tsx",
    ".jsx",
    ".java",
    ".kt",
    ".c",
    ".h",
    ".cpp",
    ".hpp",
    ".cs",
    ".go",
    ".rs",
    ".rb",
    ".php",
    ".swift",
    ".sh",
    ".bash",
    ".sql",
    ".lua",
    ".r",
    ".scala",
    ".hs",
    ".ex",
    ".exs",
    ".erl",
    ".clj",
    ".dart",
    ".vue",
    ".svelte",
    ".tex",
}
SUPPORTED = ", ".join(sorted(s.lstrip(".") for s in TEXT_SUFFIXES | {".pdf"}))
# a document far longer than this is mostly noise for a chat agent's memory
MAX_DOCUMENT_CHARS = 2_000_000


class Unreadable(Exception):
    """The file can't be ingested; str() is the answer for the person who sent it."""


def kind(name: str, content_type: str | None = None) -> str | None:
    """ "pdf", "text", or None for a file this module cannot read."""
    suffix = PurePath(name).suffix.lower()
    if suffix == ".pdf":
        return "pdf"
    if suffix in TEXT_SUFFIXES or (content_type or "").startswith("text/"):
        return "text"
    return None


def check_kind(name: str, content_type: str | None = None) -> None:
    if kind(name, content_type) is None:
        raise Unreadable(f"I can't read `{name}`: I take text files ({SUPPORTED}).")


async def extract(name: str, data: bytes, content_type: str | None = None) -> str:
    """The text of a document, at most MAX_DOCUMENT_CHARS; Unreadable when there is none."""
    check_kind(name, content_type)
    if kind(name, content_type) == "pdf":
        text = await asyncio.to_thread(_pdf_text, data, name)
    else:
        text = data.decode("utf-8-sig", errors="replace")
    text = text.replace("\x00", "").strip()
    if not text:
        raise Unreadable(f"`{name}` has no text I could read.")
    return text[:MAX_DOCUMENT_CHARS]


def _pdf_text(data: bytes, name: str) -> str:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception as exc:  # pypdf raises many kinds on damaged or encrypted files
        log.info("unreadable PDF %s: %r", name, exc)
        raise Unreadable(f"`{name}` is not a PDF I can read.") from None
