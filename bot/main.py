"""Starting and stopping the bot: `mnemocord run` and `mnemocord sync`."""

from __future__ import annotations

import asyncio
import logging
import signal

import discord
import httpx
import yarl
from httpx_aiohttp import AiohttpTransport

from memory.config import ConfigError, load_settings
from memory.engine import Engine

from .client import MnemoBot
from .commands import sync_if_changed
from .config import BotSettings

log = logging.getLogger("mnemocord")


async def open_engine(settings: BotSettings) -> Engine:
    """The engine with aiohttp (already here for discord.py) under httpx: httpcore's pool
    costs grow with the calls in flight (bench/bot_load.py: p50 811 -> 530 ms at 100 users)."""
    return await Engine.open(settings, http_transport=AiohttpTransport)


def point_discord_at(settings: BotSettings) -> None:
    """Use the configured Discord (or Discord-compatible) REST and gateway URLs."""
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


def _settings() -> BotSettings:
    settings = load_settings(BotSettings)
    settings.require_all()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # discord.py logs every gateway event at DEBUG; its INFO is enough
    logging.getLogger("discord").setLevel(max(logging.INFO, logging.getLogger().level))
    return settings


async def check_endpoint(settings: BotSettings) -> None:
    """Fail at start, with one line, if the model endpoint can't be reached at all."""
    url = settings.llm_base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {settings.llm_api_key.get_secret_value()}"} if settings.llm_api_key.get_secret_value() else {}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise ConfigError(f"LLM_BASE_URL: cannot reach {settings.llm_base_url} ({type(exc).__name__}: {exc or 'no answer'})") from None
    if response.status_code in (401, 403):
        raise ConfigError(f"LLM_API_KEY: {settings.llm_base_url} refused the key (HTTP {response.status_code})")


async def run() -> None:
    settings = _settings()
    await check_endpoint(settings)
    point_discord_at(settings)
    engine = await open_engine(settings)
    bot = MnemoBot(settings, engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()))
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            runner.result()  # raises what ended the connection
        log.info("shutting down: finishing running turns")
    except discord.LoginFailure:
        raise ConfigError("DISCORD_TOKEN: Discord rejected the token (reset it in the Developer Portal, Bot tab)") from None
    except discord.PrivilegedIntentsRequired:
        raise ConfigError(
            "Discord: enable the Message Content intent (Developer Portal → your app → Bot → Privileged Gateway Intents)"
        ) from None
    finally:
        stopper.cancel()
        await bot.drain()  # answers messages in flight
        await engine.close()
        await bot.close()
        if not runner.done():
            runner.cancel()
        log.info("stopped")


async def sync() -> None:
    settings = _settings()
    point_discord_at(settings)
    engine = await open_engine(settings)
    bot = MnemoBot(settings, engine, sync_commands=False)
    try:
        await bot.login(settings.discord_token.get_secret_value())
        await sync_if_changed(bot.tree, engine, bot.application_id, force=True)
        names = ", ".join("/" + c.name for c in bot.tree.get_commands())
        print(f"Synced the slash commands: {names}")
    except discord.LoginFailure:
        raise ConfigError("DISCORD_TOKEN: Discord rejected the token") from None
    finally:
        await bot.close()
        await engine.close()
