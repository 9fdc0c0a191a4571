"""What recall and archival search share: agent-scoped full-text terms, dates, result pages.

Every word goes into the FTS5 index with its agent's mark in front ("x17xotters"
for agent 17), so each term's posting list holds one agent's rows only: a query
reads as much of the index as that agent wrote, not the whole file's, bm25's
document frequencies are the agent's own, and no query can reach another
agent's rows, whatever it contains. The words are cut here, by the same rule the
tokenizer uses (unicode61 with categories 'L* N* Co M*'), so each one stays one
token with its mark; the tokenizer still folds case and diacritics and stems.

Queries are cut the same way and every word is quoted, so FTS5 syntax in the
input (`"`, `*`, `AND`, `NEAR(`, `-`, `:`) is only ever searched for, never
parsed. Stop-words are dropped from queries: on conversational data they drown
the words that carry the meaning (measured in DESIGN.md section 5).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from . import clock

MAX_TERMS = 32

# the FTS5 tokenizer of messages_fts and passages_fts (migration m004)
TOKENIZER = "porter unicode61 remove_diacritics 2 categories 'L* N* Co M*'"


def _word_pattern() -> re.Pattern[str]:
    """Runs of letters, digits, marks and private-use characters: unicode61's tokens.

    Python's \\w lacks marks, which would cut Devanagari words at their vowel signs.
    """
    ranges: list[list[int]] = []
    for cp in range(0x20000):  # the planes where marks live, plus the tags' below
        if unicodedata.category(chr(cp))[0] == "M":
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    ranges += [[0xE0100, 0xE01EF], [0xE000, 0xF8FF], [0xF0000, 0x10FFFD]]  # variation selectors, private use
    extra = "".join(f"{chr(a)}-{chr(b)}" for a, b in ranges)
    return re.compile(f"(?:[^\\W_]|[{extra}])+")


# "_" separates words, as in FTS5's unicode61 tokenizer
_WORD = _word_pattern()

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


def _mark(agent_id: int) -> str:
    # consonants and digits only, so the stemmer's measure of a word is as without it; what the
    # mark does change: words of 1-2 letters get stemmed too ("us" -> "u"), and words near 60
    # letters no longer are; indexing and queries agree on both
    return f"x{agent_id}x"


def scoped(agent_id: int, text: str) -> str:
    """`text` as one agent's rows of an FTS5 index hold it: every word behind the agent's mark."""
    mark = _mark(agent_id)
    return " ".join(mark + w for w in _WORD.findall(text))


def match(agent_id: int, text: str, columns: str) -> str | None:
    """An FTS5 MATCH expression for one agent's rows, or None if `text` has no words.

    `columns` is the FTS5 column filter, e.g. "{content context}".
    """
    words = terms(text)
    if not words:
        return None
    mark = _mark(agent_id)
    return f"{columns} : (" + " OR ".join(f'"{mark}{w}"' for w in words) + ")"


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
            lines.append(f"[#{h.id} {clock.minute(h.created_at)}] {h.label}: {text}")
        if self.page < self.pages:
            lines.append(f"More on page {self.page + 1}.")
        return "\n".join(lines)
