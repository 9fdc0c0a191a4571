"""What recall and archival search share besides full text (memory/fulltext.py): dates, arguments, result pages."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from . import clock

PAGE_SIZE = 5


class BadArgument(ValueError):
    """A search argument the model can correct; str() tells it how."""


def parse_date(value: object, name: str, *, end: bool = False) -> str | None:
    """ISO date or date-time to a timestamp comparable with stored ones.

    A bare end date includes that whole day.
    """
    if not value:
        return None
    value = str(value).strip()
    try:
        if len(value) == 10:
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
            if end:
                if day.date() == day.date().max:  # "9999-12-31": no end at all
                    return None
                day += timedelta(days=1)
            return clock.stamp(day)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return clock.stamp(moment)
    except (ValueError, OverflowError):
        raise BadArgument(f"{name} {value!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None


def base_filters(alias: str, agent_id: int, start_date: object, end_date: object) -> tuple[list[str], list[object]]:
    """SQL conditions (and their parameters) for one agent's rows in a date range."""
    filters: list[str] = [f"{alias}.agent_id = ?"]
    params: list[object] = [agent_id]
    start = parse_date(start_date, "start_date")
    end = parse_date(end_date, "end_date", end=True)
    if start:
        filters.append(f"{alias}.created_at >= ?")
        params.append(start)
    if end:
        filters.append(f"{alias}.created_at < ?")
        params.append(end)
    return filters, params


MAX_PAGE = 500


def page_number(page: object) -> int:
    try:
        number = int(page) if page not in (None, "") else 1  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise BadArgument(f"page {page!r} is not a number; pages start at 1") from None
    if number > MAX_PAGE:
        raise BadArgument(f"page {number} is too far; refine the query instead (pages go up to {MAX_PAGE})")
    return max(1, number)


@dataclass
class Hit:
    id: int
    created_at: str
    text: str
    label: str  # who said it, or the passage's tags


@dataclass
class Page:
    hits: list[Hit]
    total: int
    page: int
    page_size: int = PAGE_SIZE
    note: str = ""

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))

    def render(self, what: str, max_chars: int = 400) -> str:
        if self.total == 0:
            return f"No {what} matched.{' ' + self.note if self.note else ''}"
        if not self.hits:
            return f"Page {self.page} is past the end: {self.total} {what} matched ({self.pages} pages)."
        head = f"Page {self.page} of {self.pages}, {self.total} {what} matched"
        head += f" ({self.note})." if self.note else "."
        lines = [head]
        for h in self.hits:
            text = h.text if len(h.text) <= max_chars else h.text[: max_chars - 1] + "…"
            lines.append(f"[#{h.id} {clock.minute(h.created_at)}] {h.label}: {text}")
        if self.page < self.pages:
            lines.append(f"More on page {self.page + 1}.")
        return "\n".join(lines)
