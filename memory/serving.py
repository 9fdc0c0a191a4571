"""What the engine learns about the model server: its real context window, whether it takes
native tools, whether it silently drops the start of long prompts.

Servers say their window in different places (DESIGN.md §8): llama-server `GET /props`,
vLLM `GET /v1/models` (`max_model_len`), Ollama `POST /api/show`, LM Studio
`GET /api/v0/models` (`loaded_context_length`), OpenRouter `GET /api/v1/models`
(`context_length`: its base URL's own model list). All are asked at once at start, each bounded, so a silent server
costs well under a second.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .llm import LLMClient

log = logging.getLogger(__name__)

# the whole detection at start: a server that answers none of the probes costs this at most
PROBE_SECONDS = 0.8
DEFAULT_WINDOW = 8192
# a provider count below this share of our estimate: the server dropped part of the prompt
TRUNCATION_SHARE = 0.35
# ...judged only on prompts this large, where the estimate's own error cannot explain it
TRUNCATION_MIN_TOKENS = 600
SMALLEST_WINDOW = 512
# answers without a single function call before the log says the model does not use its tools
NEVER_CALLED_AFTER = 10
LARGEST_WINDOW = 10_000_000


@dataclass
class ModelState:
    """Shared by every turn of an engine (it calls one model)."""

    text_tools: bool = False  # tools are described in the prompt, calls read from the text
    no_vision: bool = False  # the server refused images: they are described in words instead
    server_window: int | None = None  # the window the server stated, if it did
    truncation: str = ""  # why the provider's token count suggests the prompt was cut, once seen
    logged: set[str] = field(default_factory=set)
    called_a_tool: bool = False
    answers_without_calls: int = 0

    def answered(self, called: bool) -> bool:
        """Count an answer; True once, when the model has answered NEVER_CALLED_AFTER times and never
        called a function: memory is then never saved, which nothing else would show."""
        self.called_a_tool = self.called_a_tool or called
        self.answers_without_calls += not called
        return not self.called_a_tool and self.answers_without_calls >= NEVER_CALLED_AFTER and self.once("never_called")

    def once(self, what: str) -> bool:
        """True the first time `what` is asked: for log lines that must not repeat every turn."""
        if what in self.logged:
            return False
        self.logged.add(what)
        return True


def _window(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = int(str(value))
        except ValueError:
            return None
    value = int(value)
    return value if SMALLEST_WINDOW <= value <= LARGEST_WINDOW else None


def _model_entry(data: Any, model: str) -> dict[str, Any] | None:
    """The entry of `model` in an OpenAI-style model list ({"data": [...]})."""
    items = data.get("data") if isinstance(data, dict) else None
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and model in (item.get("id"), item.get("name")):
            return item
    return None


def _from_props(data: Any) -> int | None:  # llama-server
    settings = data.get("default_generation_settings") if isinstance(data, dict) else None
    return _window(settings.get("n_ctx")) if isinstance(settings, dict) else None


def _from_listing(data: Any, model: str) -> int | None:  # vLLM, LM Studio, OpenRouter
    entry = _model_entry(data, model)
    if entry is None:
        return None
    for key in ("max_model_len", "loaded_context_length", "context_length"):
        if key in entry:
            return _window(entry[key])
    return None


def _from_ollama(data: Any) -> int | None:
    """`num_ctx` in the model's parameters wins (it is what runs); else the architecture's length
    capped by Ollama's default, which it applies when nothing sets num_ctx."""
    if not isinstance(data, dict):
        return None
    for line in str(data.get("parameters") or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "num_ctx":
            return _window(parts[1])
    info = data.get("model_info")
    if isinstance(info, dict):
        for key, value in info.items():
            if str(key).endswith(".context_length"):
                found = _window(value)
                return min(found, OLLAMA_DEFAULT_NUM_CTX) if found else None
    return None


# Ollama's num_ctx when the Modelfile does not set one (2048 before 0.6, 4096 since)
OLLAMA_DEFAULT_NUM_CTX = 4096


async def detect_window(llm: LLMClient, model: str, timeout: float = PROBE_SECONDS) -> tuple[int | None, str]:
    """(the server's context window, which endpoint said it), or (None, "") when none did."""
    base = llm.base_url.rstrip("/")
    parts = urlsplit(base)
    root = f"{parts.scheme}://{parts.netloc}"

    async def ask(name: str, probe: Any, read: Any) -> tuple[int | None, str]:
        return read(await probe), name

    probes = [
        ask("llama-server /props", llm.get_json(root + "/props", timeout), _from_props),
        ask("/v1/models", llm.get_json(base + "/models", timeout), lambda d: _from_listing(d, model)),
        ask("Ollama /api/show", llm.post_json(root + "/api/show", {"model": model, "name": model}, timeout), _from_ollama),
        ask("LM Studio /api/v0/models", llm.get_json(root + "/api/v0/models", timeout), lambda d: _from_listing(d, model)),
    ]
    for window, name in await asyncio.gather(*probes):
        if window:
            return window, name
    return None, ""


def truncation_warning(estimate: int, reported: int) -> str | None:
    """A sentence when the provider counted far fewer prompt tokens than were sent."""
    if estimate < TRUNCATION_MIN_TOKENS or reported <= 0 or reported >= TRUNCATION_SHARE * estimate:
        return None
    return (
        f"the model server counted {reported} prompt tokens where about {estimate} were sent: it is probably dropping "
        "the start of the prompt (core memory). Raise its context size (Ollama: num_ctx in a Modelfile or the "
        "OLLAMA_CONTEXT_LENGTH variable; llama-server: -c) or lower CONTEXT_WINDOW, or fix its chat template."
    )
