"""Time stamps as stored: ISO-8601 UTC with seconds, sortable as text and readable in prompts."""

from __future__ import annotations

from datetime import UTC, datetime

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def now() -> str:
    return stamp(datetime.now(UTC))


def stamp(moment: datetime) -> str:
    """A datetime as stored; a naive one is taken as UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime(FORMAT)


def minute(value: str) -> str:
    """ "2026-12-02T10:29:07Z" -> "2026-12-02 10:29", as prompts and listings show it."""
    return value[:16].replace("T", " ")
