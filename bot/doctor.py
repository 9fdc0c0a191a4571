"""`mnemocord doctor`: one line per check, ✓ or ✗ with the fix, for an operator before asking for help.

Every request is bounded, so it finishes in seconds; nothing it prints carries a secret
(errors pass through the model client's redaction, tokens are never printed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memory import serving, tools
from memory.config import ConfigError, EngineSettings
from memory.db import Database, StorageError
from memory.llm import LLMClient, LLMError, ToolsUnsupportedError

# each model request may take this long: a chat answer on a small local model takes a few seconds
REQUEST_SECONDS = 30.0
PROBE_SECONDS = 5.0
# Message Content intent: GATEWAY_MESSAGE_CONTENT or GATEWAY_MESSAGE_CONTENT_LIMITED among the application's flags
MESSAGE_CONTENT_FLAGS = (1 << 18) | (1 << 19)
# View Channels, Send Messages, Send Messages in Threads, Attach Files, Read Message History
PERMISSIONS = 274878008320


@dataclass
class Check:
    ok: bool
    text: str

    def line(self) -> str:
        return f"{'✓' if self.ok else '✗'} {self.text}"


Report = Callable[[Check], None]


async def diagnose(settings: EngineSettings, report: Report) -> bool:
    """Run every check, reporting each as it finishes; True when none failed."""
    failed = False

    def say(ok: bool, text: str) -> None:
        nonlocal failed
        failed = failed or not ok
        report(Check(ok, text))

    try:
        settings.require_llm()
        say(True, "configuration valid")
    except ConfigError as exc:
        say(False, f"configuration: {exc}")
        return False
    await _database(settings, say)
    await _model(settings, say)
    token = getattr(settings, "discord_token", None)
    if token is not None and token.get_secret_value():
        await _discord(settings, token.get_secret_value(), say)
    return not failed


async def _database(settings: EngineSettings, say: Callable[[bool, str], None]) -> None:
    try:
        db = await Database.open(settings.database_path)
    except StorageError as exc:
        say(False, f"database {settings.database_path}: {exc}")
        return
    try:
        say(True, f"database opens, migrations current ({settings.database_path})")
        version = await db.fetchval("SELECT vec_version()")
        say(bool(version), f"sqlite-vec loaded ({version})")
        problems = await db.check()
        say(not problems, "PRAGMA quick_check ok" if not problems else f"PRAGMA quick_check: {'; '.join(problems[:3])}")
        size = settings.database_path.stat().st_size
        say(True, f"database size {size / 2**20:.1f} MiB")
        dims = await db.fetchval("SELECT value FROM meta WHERE key = 'embedding_dim'")
        model = await db.fetchval("SELECT value FROM meta WHERE key = 'embedding_model'")
    finally:
        await db.close()
    await _embeddings(settings, model, int(dims) if dims else None, say)


async def _model(settings: EngineSettings, say: Callable[[bool, str], None]) -> None:
    llm = LLMClient(
        settings.llm_base_url, api_key=settings.llm_api_key.get_secret_value(), timeout=REQUEST_SECONDS, max_retries=0
    )
    where = llm.base_url
    try:
        status, listing = await llm.probe("GET", llm.base_url + "models", PROBE_SECONDS)
        if status == 0:
            say(False, f"model endpoint unreachable at {where}: check LLM_BASE_URL and that the server runs")
            return
        say(True, f"model endpoint reachable at {where}")
        if status in (401, 403):
            say(False, f"API key refused (HTTP {status}): check LLM_API_KEY")
            return
        ids = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)] if isinstance(listing, dict) else []
        if ids:
            listed = settings.llm_model in ids
            say(
                listed,
                f"model {settings.llm_model} listed"
                if listed
                else f"model {settings.llm_model} not among {ids[:5]}: check LLM_MODEL",
            )
        try:
            answer = await llm.chat(settings.llm_model, [{"role": "user", "content": "Say OK."}], max_tokens=32)
            say(True, f"a chat completion works ({answer.seconds:.1f} s)")
        except LLMError as exc:
            say(False, f"a chat completion failed: {exc}")
            return
        await _tool_call(llm, settings, say)
        status, streamed = await llm.probe(
            "POST",
            llm.base_url + "chat/completions",
            REQUEST_SECONDS,
            {"model": settings.llm_model, "messages": [{"role": "user", "content": "Say OK."}], "stream": True, "max_tokens": 16},
        )
        ok = status == 200 and isinstance(streamed, str) and "data:" in streamed
        say(ok, "streaming works" if ok else f"streaming does not work (HTTP {status})")
        window, source = await serving.detect_window(llm, settings.llm_model)
        configured = settings.context_window
        if window is None:
            say(True, f"context window {configured} (the server does not say its own; set CONTEXT_WINDOW to match it)")
        else:
            fits = configured <= window or "context_window" not in settings.model_fields_set
            say(
                fits,
                f"context window: server {window} ({source}), configured {configured}"
                + ("" if fits else f": lower CONTEXT_WINDOW to {window} or raise the server's context size"),
            )
    finally:
        await llm.aclose()


async def _tool_call(llm: LLMClient, settings: EngineSettings, say: Callable[[bool, str], None]) -> None:
    ask = [{"role": "user", "content": 'Call the function send_message with message "hello".'}]
    try:
        answer = await llm.chat(settings.llm_model, ask, [tools.TOOLS["send_message"].schema], max_tokens=128)
    except ToolsUnsupportedError as exc:
        say(
            False,
            f"native tool calls refused ({exc}): TOOL_MODE=auto or text works without them; to get them, start llama-server "
            "with --jinja, vLLM with --enable-auto-tool-choice --tool-call-parser NAME, or use an Ollama model with tools",
        )
        return
    except LLMError as exc:
        say(False, f"a tool call failed: {exc}")
        return
    if answer.tool_calls:
        say(True, "a native tool call works")
    else:
        say(
            False,
            "the model answered without calling the tool: its server may ignore tools (check its chat template, e.g. "
            "llama-server --jinja) or the model is too weak for them; TOOL_MODE=text may do better",
        )


async def _embeddings(
    settings: EngineSettings, stored_model: str | None, stored_dim: int | None, say: Callable[[bool, str], None]
) -> None:
    if not settings.embedding_model:
        say(True, "embeddings off (EMBEDDING_MODEL empty): archival search is keyword-only")
        return
    url = settings.embedding_base_url or settings.llm_base_url
    key = (settings.embedding_api_key or settings.llm_api_key).get_secret_value()
    client = LLMClient(url, api_key=key, timeout=REQUEST_SECONDS, max_retries=0)
    try:
        vectors = await client.embed(settings.embedding_model, ["doctor"])
    except LLMError as exc:
        say(False, f"embeddings endpoint failed: {exc}")
        return
    finally:
        await client.aclose()
    dim = len(vectors[0])
    say(True, f"embeddings work ({settings.embedding_model}, dimension {dim})")
    if stored_model is not None:
        same = stored_model == settings.embedding_model and stored_dim == dim
        say(
            same,
            "embeddings match the space stored in the database"
            if same
            else f"the database holds {stored_model} vectors of dimension {stored_dim}: passages will be embedded again at start",
        )


async def _discord(settings: EngineSettings, token: str, say: Callable[[bool, str], None]) -> None:
    base = str(getattr(settings, "discord_api_base", "https://discord.com/api/v10")).rstrip("/")
    client = LLMClient(base, timeout=PROBE_SECONDS, max_retries=0)
    auth = {"Authorization": f"Bot {token}"}  # Discord's scheme, not Bearer
    try:
        status, me = await client.probe("GET", base + "/users/@me", PROBE_SECONDS, headers=auth)
        if status != 200 or not isinstance(me, dict):
            say(False, f"Discord token refused (HTTP {status}): reset it on the Bot page and set DISCORD_TOKEN")
            return
        say(True, f"Discord token valid (bot {me.get('username')})")
        status, app = await client.probe("GET", base + "/applications/@me", PROBE_SECONDS, headers=auth)
        if status != 200 or not isinstance(app, dict):
            say(False, f"could not read the application (HTTP {status})")
            return
        app_id = app.get("id")
        say(True, f"application id {app_id}")
        flags = int(app.get("flags") or 0)
        intent = bool(flags & MESSAGE_CONTENT_FLAGS)
        say(
            intent,
            "Message Content intent enabled"
            if intent
            else "Message Content intent off: enable it under Bot → Privileged Gateway Intents",
        )
        say(
            True,
            f"invite: https://discord.com/oauth2/authorize?client_id={app_id}&scope=bot+applications.commands&permissions={PERMISSIONS}",
        )
    finally:
        await client.aclose()
