"""Discord settings, on top of the engine's."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from memory.config import ConfigError, EngineSettings

IdSet = Annotated[frozenset[int], NoDecode]


class BotSettings(EngineSettings):
    discord_token: SecretStr = SecretStr("")
    # Discord's by default; point these at a Discord-compatible server or a test fake
    discord_api_base: str = "https://discord.com/api/v10"
    discord_gateway_url: str = "wss://gateway.discord.gg/"

    # Channel messages not addressed to the bot are still kept in the channel's recall memory.
    store_unaddressed_messages: bool = True
    # Empty: everyone / every guild / every channel. Comma-separated ids.
    allowed_users: IdSet = frozenset()
    allowed_guilds: IdSet = frozenset()
    allowed_channels: IdSet = frozenset()
    # Who may DM the bot. Unset: members of the allowed guilds (those of the allowed channels)
    # when either list is set, else everyone; an operator who limits the bot to their server
    # expects its DMs limited the same way.
    allow_dms: Literal["members", "everyone", "nobody"] | None = None
    rate_limit_per_minute: int = Field(12, ge=1)
    max_attachment_bytes: int = Field(2_000_000, ge=1_000)
    # Images shown to the model (PNG, JPEG, WebP, GIF): the largest, and how many of one message.
    max_image_bytes: int = Field(5_000_000, ge=1_000)
    max_images_per_message: int = Field(4, ge=1, le=10)
    # Image bytes held in memory for turns not yet run, all conversations together (a small VPS's RAM).
    max_images_waiting_bytes: int = Field(64_000_000, ge=1_000)
    # On start, messages sent while the bot was down are read from each conversation's history:
    # at most this many per conversation, and none older than this many hours (0 turns catch-up off).
    catch_up_messages: int = Field(50, ge=0, le=1000)
    catch_up_hours: float = Field(24.0, ge=0, le=24 * 365)
    # A reasoning model's thinking: never shown (off), under the reply as a spoiler, or as reasoning.txt.
    show_reasoning: Literal["off", "spoiler", "file"] = "off"
    # Gateway connections (shards) of this process. Unset: as many as Discord recommends (GET /gateway/bot).
    shard_count: int | None = Field(None, ge=1)
    # With STREAM_REPLIES, a reply being written is edited at most once per this many seconds.
    stream_edit_seconds: float = Field(1.5, ge=0.2, le=60)

    @field_validator("allowed_users", "allowed_guilds", "allowed_channels", mode="before")
    @classmethod
    def _ids(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.replace(";", ",").split(",") if p.strip()]
            bad = [p for p in parts if not p.isdigit()]
            if bad:
                raise ValueError(f"expected comma-separated numeric Discord ids, found {bad}")
            return frozenset(int(p) for p in parts)
        return value

    @field_validator("allow_dms", mode="before")
    @classmethod
    def _dm_policy(cls, value: object) -> object:
        if isinstance(value, str):  # `ALLOW_DMS=` as in .env.example means unset
            return value.strip().lower() or None
        return value

    @model_validator(mode="after")
    def _dms_need_guilds(self) -> BotSettings:
        if self.allow_dms == "members" and not (self.allowed_guilds or self.allowed_channels):
            raise ValueError(
                "ALLOW_DMS=members needs ALLOWED_GUILDS or ALLOWED_CHANNELS: the servers whose members may DM the bot"
            )
        return self

    @property
    def dm_policy(self) -> Literal["members", "everyone", "nobody"]:
        if self.allow_dms is not None:
            return self.allow_dms
        return "members" if self.allowed_guilds or self.allowed_channels else "everyone"

    def require_all(self) -> None:
        """What `mnemocord run` needs, every missing piece named at once."""
        problems = []
        if not self.discord_token.get_secret_value():
            problems.append("DISCORD_TOKEN: not set (create a bot at https://discord.com/developers/applications; see README)")
        try:
            self.require_llm()
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("\n".join(problems))
