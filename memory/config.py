"""Engine settings, read from the environment and `.env`.

Every setting has an environment variable of the same name in upper case;
`.env.example` documents them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """Settings are missing or malformed; str() is one readable line per problem."""


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    database_path: Path = Path("data/mnemocord.db")

    llm_base_url: str = Field("", description="OpenAI-compatible base URL, e.g. http://localhost:11434/v1")
    llm_api_key: SecretStr = SecretStr("")
    llm_model: str = ""
    llm_timeout: float = Field(120.0, gt=0)
    llm_max_retries: int = Field(4, ge=0, le=20)
    # Total seconds a call may spend retrying before the error reaches the user.
    llm_retry_budget: float = Field(60.0, gt=0)
    max_concurrent_llm_calls: int = Field(4, ge=1)

    # Empty: archival search is keyword-only.
    embedding_model: str = ""
    embedding_base_url: str = Field("", description="defaults to LLM_BASE_URL")
    embedding_api_key: SecretStr = SecretStr("")
    embedding_batch_size: int = Field(64, ge=1, le=2048)

    context_window: int = Field(8192, ge=1024)
    memory_warning_fraction: float = Field(0.75, gt=0, lt=1)
    memory_flush_fraction: float = Field(0.9, gt=0, le=1)
    # Messages always kept in context when older ones are evicted.
    keep_last_messages: int = Field(4, ge=1)
    max_steps_per_turn: int = Field(8, ge=1, le=50)
    # Function calls carried out per model answer; the rest are answered "not run".
    max_tool_calls_per_answer: int = Field(8, ge=1, le=100)
    # A longer reply is cut with a note (TurnResult.full_reply keeps the whole text).
    max_reply_chars: int = Field(8000, ge=100)
    # Scheduled events (reminders) one agent may have pending at once.
    max_pending_events: int = Field(25, ge=1, le=10_000)
    # Output bounds: without them a small model rambles for minutes and the server keeps writing
    # for a request already abandoned.
    llm_max_tokens: int = Field(1024, ge=16)
    consolidation_max_tokens: int = Field(512, ge=16)
    # native: the `tools` parameter; text: tools described in the prompt, calls read from the text;
    # auto: native until the server refuses tools, then text.
    tool_mode: Literal["auto", "native", "text"] = "auto"
    # Images people send: on: always sent to the model; off: never (the model is told one came);
    # auto: sent until the server refuses them once, then described in words (memory/images.py).
    vision: Literal["auto", "on", "off"] = "auto"
    # Stream model answers (SSE) and show the reply while it is written; off: whole answers only.
    # A server that does not stream is asked for whole answers without this.
    stream_replies: bool = True

    # the default persona (agents.DEFAULT_PERSONA) must fit, or creating and resetting an agent could not write it
    persona_limit: int = Field(2000, ge=200)
    human_limit: int = Field(2000, ge=100)
    channel_limit: int = Field(3000, ge=100)
    # a channel agent's block about each person (memory/people.py); a new limit applies to blocks made after it
    person_limit: int = Field(600, ge=100, le=20_000)

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _fractions_ordered(self) -> EngineSettings:
        if self.memory_warning_fraction >= self.memory_flush_fraction:
            raise ValueError("MEMORY_WARNING_FRACTION must be below MEMORY_FLUSH_FRACTION")
        return self

    def require_llm(self) -> None:
        """Raise ConfigError unless a model endpoint is configured."""
        missing = [name for name, value in (("LLM_BASE_URL", self.llm_base_url), ("LLM_MODEL", self.llm_model)) if not value]
        if missing:
            raise ConfigError("\n".join(f"{m}: not set (see .env.example)" for m in missing))
        if not self.llm_base_url.startswith(("http://", "https://")):
            # not quoted back: it may hold user:password@
            raise ConfigError("LLM_BASE_URL: must start with http:// or https://, e.g. http://localhost:11434/v1")


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings, turning pydantic's ValidationError into ConfigError."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper() or "settings"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{name}: {msg} (got {err.get('input')!r})" if err["loc"] else msg)
        raise ConfigError("\n".join(lines)) from None
