"""Starting and stopping the bot: `mnemocord run` and `mnemocord sync`."""

from __future__ import annotations

import asyncio
import logging
import signal

import aiohttp
import discord
import httpx
import yarl
from httpx_aiohttp import AiohttpTransport

from memory.config import ConfigError, load_settings
from memory.engine import Engine
from memory.llm import LLMClient, Redactor, env_proxied, without_credentials

from .client import MnemoBot
from .commands import sync_if_changed
from .config import BotSettings

log = logging.getLogger("mnemocord")

# how long a stop waits for running turns before it ends their model calls: an endpoint that
# never finishes must not keep the process alive (systemd's default stop timeout is 90 s)
TURN_GRACE_SECONDS = 5.0
# the start-up check of the model endpoint, in all
ENDPOINT_CHECK_SECONDS = 10.0


async def open_engine(settings: BotSettings) -> Engine:
    """The engine with aiohttp (already here for discord.py) under httpx: httpcore's pool
    costs grow with the calls in flight, aiohttp's do not. Through a proxy from the
    environment, httpx's own transport, which goes through it."""
    return await Engine.open(settings, http_transport=None if env_proxied() else AiohttpTransport)


def point_discord_at(settings: BotSettings) -> None:
    """Use the configured Discord (or Discord-compatible) REST and gateway URLs."""
    discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


def _settings() -> BotSettings:
    settings = load_settings(BotSettings)
    settings.require_all()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # discord.py's INFO is its gateway's comings and goings (sessions, resumes, shards), which the bot's
    # "connected" line sums up; they show at LOG_LEVEL=DEBUG, its line per gateway event never does
    root = logging.getLogger().level
    logging.getLogger("discord").setLevel(logging.INFO if root <= logging.DEBUG else max(logging.WARNING, root))
    return settings


async def check_endpoint(settings: BotSettings) -> None:
    """Fail at start, with one line, if the model endpoint can't be reached at all or refuses the key."""
    key = settings.llm_api_key.get_secret_value()
    redact = Redactor(key, settings.llm_base_url)
    shown = without_credentials(settings.llm_base_url)
    url = httpx.URL(settings.llm_base_url.rstrip("/") + "/models")
    # httpx sends a URL's user:password@ as Basic auth, which would replace the key's header
    headers = {"Authorization": f"Bearer {key}"} if key and not (url.username or url.password) else {}
    try:
        # a whole limit: httpx's own is per read, which an endpoint sending a byte at a time never trips
        async with asyncio.timeout(ENDPOINT_CHECK_SECONDS), httpx.AsyncClient(timeout=ENDPOINT_CHECK_SECONDS) as client:
            response = await client.get(url, headers=headers)
    except TimeoutError:
        raise ConfigError(f"LLM_BASE_URL: {shown} did not answer within {ENDPOINT_CHECK_SECONDS:g} s") from None
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"LLM_BASE_URL: cannot reach {shown} ({type(exc).__name__}: {redact(str(exc)) or 'no answer'})"
        ) from None
    if response.status_code in (401, 403):
        raise ConfigError(f"LLM_API_KEY: {shown} refused the key (HTTP {response.status_code})")


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
    except (aiohttp.ClientError, OSError, discord.DiscordServerError, discord.GatewayNotFound) as exc:
        # discord.py retries the gateway by itself; what ends up here is the login's REST call, or GET /gateway/bot's
        raise ConfigError(
            f"DISCORD_API_BASE: cannot reach Discord at {without_credentials(settings.discord_api_base)} ({exc})"
        ) from None
    finally:
        stopper.cancel()
        await _drain(bot, engine)
        await engine.close()
        await bot.close()
        if not runner.done():
            runner.cancel()
        log.info("stopped")


async def _drain(bot: MnemoBot, engine: Engine) -> None:
    """Answer the messages in flight, giving their turns TURN_GRACE_SECONDS before their model calls
    are ended (the turns then fail as usual: the messages are already stored)."""
    draining = asyncio.create_task(bot.drain())
    done, _ = await asyncio.wait({draining}, timeout=TURN_GRACE_SECONDS)
    if not done:
        log.warning("turns still running after %.0f s: ending their model calls", TURN_GRACE_SECONDS)
        for client in _model_clients(engine):
            client.abort()
        done, _ = await asyncio.wait({draining}, timeout=TURN_GRACE_SECONDS)
    if not done:  # stuck on Discord (a long rate limit, a download): their messages are stored
        log.warning("message handlers still running after another %.0f s: cancelling them", TURN_GRACE_SECONDS)
        bot.cancel_in_flight()
    await draining


def _model_clients(engine: Engine) -> set[LLMClient]:
    embedder = engine.archive.embedder
    return {engine.llm, *([embedder.client] if embedder else [])}


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
