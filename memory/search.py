"""What recall and archival search share: safe FTS5 queries, dates, result pages.

Any text becomes a safe FTS5 query: it is cut into words and every word is quoted, so FTS5 syntax in the
input (`"`, `*`, `AND`, `NEAR(`, `-`, `:`) is only ever searched for, never
parsed. Stop-words are dropped: on conversational data they drown the words
that carry the meaning (measured in DESIGN.md section 5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MAX_TERMS = 32

# letters and digits; "_" separates words, as in FTS5's unicode61 tokenizer
_WORD = re.compile(r"[^\W_]+")

# NLTK's English list plus question fillers; not "may", which is also a month.
STOP_WORDS = frozenset(
    """
    a about above after again against ain all also am an and any anything are aren as at be because been
    before being below between both but by can could couldn d did didn do does doesn doing don down during
    each ever few for from further had hadn has hasn have haven having he her here hers herself him himself
    his how i if in into is isn it its itself just kind kinds likely ll m ma many me might mightn more most
    much mustn my myself needn no nor not now o of off on once one ones only or other our ours ourselves out
    over own re s same shan she should shouldn so some something sort such t than that the their theirs
    them themselves then there these they thing things this those through to too type types under until up
    ve very was wasn we were weren what when where which while who whom why will with won would wouldn y
    you your yours yourself yourselves
    """.split()
)


def terms(text: str) -> list[str]:
    """Meaningful lower-case words of `text`, in order, without repeats."""
    seen: dict[str, None] = {}
    words = _WORD.findall(text.lower())
    for word in words:
        if word not in STOP_WORDS and word not in seen and len(word) < 64:
            seen[word] = None
    if not seen:  # a query of only stop-words ("who is it?") still searches for them
        seen = dict.fromkeys(w for w in words if len(w) < 64)
    return list(seen)[:MAX_TERMS]


def match(agent_token: str, text: str, columns: str) -> str | None:
    """An FTS5 MATCH expression limited to one agent, or None if `text` has no words.

    `columns` is the FTS5 column filter for the text terms, e.g. "{content context}".
    """
    words = terms(text)
    if not words:
        return None
    ored = " OR ".join(f'"{w}"' for w in words)
    return f'agent : "{agent_token}" AND {columns} : ({ored})'


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
            return day.strftime("%Y-%m-%dT%H:%M:%SZ")
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError):
        raise BadArgument(f"{name} {value!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None


def base_filters(alias: str, agent_id: int, start_date: object, end_date: object) -> tuple[list[str], list[object]]:
    """SQL conditions (and their parameters) for one agent's rows in a date range."""
    filters, params = [f"{alias}.agent_id = ?"], [agent_id]
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
            lines.append(f"[#{h.id} {h.created_at[:16].replace('T', ' ')}] {h.label}: {text}")
        if self.page < self.pages:
            lines.append(f"More on page {self.page + 1}.")
        return "\n".join(lines)
