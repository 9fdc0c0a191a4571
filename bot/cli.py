"""The `mnemocord` command: run the bot, chat in a terminal, sync commands, ingest documents, import and export memory."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
from pathlib import Path

from memory import events, recall
from memory.api import Ingested
from memory.config import ConfigError, EngineSettings, load_settings
from memory.db import StorageError
from memory.documents import Unreadable
from memory.engine import Engine
from memory.llm import without_credentials


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mnemocord", description="A Discord bot with MemGPT-style long-term memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the Discord bot (reads .env)")
    sub.add_parser("sync", help="register the slash commands with Discord now")
    chat = sub.add_parser("chat", help="talk to an agent in the terminal, without Discord")
    chat.add_argument("--agent", default="local:terminal", help="agent key, e.g. dm:<user id> (default local:terminal)")
    chat.add_argument("-v", "--verbose", action="store_true", help="also show inner monologue, function calls and events")
    imp = sub.add_parser("import", help="load a /memory export file into an agent")
    imp.add_argument("file", type=Path)
    imp.add_argument("--agent", help="agent key to import into (default: the key in the file)")
    exp = sub.add_parser("export", help="write an agent's whole memory as JSON")
    exp.add_argument("--agent", required=True)
    exp.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    ing = sub.add_parser("ingest", help="read a document (text or PDF) into an agent's archival memory")
    ing.add_argument("file", type=Path)
    ing.add_argument("--agent", required=True, help="agent key, e.g. dm:<user id> or local:terminal")
    forget = sub.add_parser("forget-user", help="erase everything stored from one Discord user (a data-deletion request)")
    forget.add_argument("user_id", type=_discord_id, help="the person's Discord user id")
    purge = sub.add_parser("purge", help="erase the memory of every channel and thread of a server the bot left")
    purge.add_argument("--guild", type=_discord_id, required=True, help="the server's Discord id")
    sub.add_parser("doctor", help="check configuration, database, model, embeddings and Discord; one line each")
    args = parser.parse_args(argv)

    try:
        if args.command == "doctor":
            sys.exit(0 if asyncio.run(_doctor()) else 1)
        if args.command in ("run", "sync"):
            from bot.main import run, sync  # discord.py is imported only for these

            asyncio.run(run() if args.command == "run" else sync())
        else:
            settings = load_settings(EngineSettings)
            logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            if args.command == "chat":
                asyncio.run(_chat(settings, args.agent, args.verbose))
            elif args.command == "import":
                asyncio.run(_import(settings, args.file, args.agent))
            elif args.command == "ingest":
                asyncio.run(_ingest(settings, args.file, args.agent))
            elif args.command in ("forget-user", "purge"):
                asyncio.run(_erase(settings, args.command, args.user_id if args.command == "forget-user" else args.guild))
            else:
                asyncio.run(_export(settings, args.agent, args.output))
    except (ConfigError, StorageError) as exc:
        sys.exit(f"mnemocord: {exc}")
    except KeyboardInterrupt:
        pass


async def _chat(settings: EngineSettings, key: str, verbose: bool) -> None:
    # bytes that are not UTF-8 become U+FFFD where they enter, instead of ending the chat with a traceback
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")
    engine = await Engine.open(settings)
    print(
        f"Chatting with agent {key} via {settings.llm_model} at {without_credentials(settings.llm_base_url)}. "
        "`/file PATH` reads a document. Ctrl-D to quit."
    )
    seen = await engine.memory.last_message_id(key)

    async def deliver(_: str, result: events.Answer, event: events.Event) -> bool:
        # printed between prompts: the input line stays where it is
        print(f"\nbot> (event #{event.id}) {result.reply}\nyou> ", end="", flush=True)
        return True

    await engine.events.start(deliver, only=key)
    try:
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                print()
                break
            if not line.strip():
                continue
            if line.startswith("/file "):
                # as the bot does with an attachment: stored, then the agent is told in this message
                try:
                    ingested = await _read_document(engine, key, Path(line[len("/file ") :].strip()).expanduser())
                except DocumentError as exc:
                    print(f"     {exc}")
                    continue
                print(f"     Saved `{ingested.name}` to archival memory ({ingested.passages} passages).")
                line = ingested.note
            printed = ""

            def stream(text: str) -> None:
                # the reply as it is written; a snapshot that does not go on from what is printed
                # (a retried call) waits for the final text
                nonlocal printed
                if text.startswith(printed):
                    print(("" if printed else "bot> ") + text[len(printed) :], end="", flush=True)
                    printed = text

            message = recall.Message(role="user", content=line, author="you", author_id="terminal")
            result = await engine.send(key, message, on_text=stream)
            reply = result.reply or ""
            if printed and reply.startswith(printed):
                print(reply[len(printed) :])
            else:
                print(f"\nbot> {reply}" if printed else f"bot> {reply}")
            if verbose:
                for m in await engine.memory.messages_since(key, seen):
                    _show(m)
                    seen = max(seen, m.id)
            if verbose:
                print(
                    f"     ({result.steps} steps, {result.tokens_in} tokens in, {result.tokens_out} out, {result.model_seconds:.1f} s model)"
                )
    finally:
        await engine.close()


class DocumentError(Exception):
    """A document could not be read or ingested; str() says why in one line."""


async def _read_document(engine: Engine, key: str, path: Path) -> Ingested:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return await engine.memory.ingest(key, path.name, data, source=f"file {path.name}")
    except (Unreadable, ValueError) as exc:
        raise DocumentError(str(exc)) from None


async def _ingest(settings: EngineSettings, path: Path, key: str) -> None:
    engine = await Engine.open(settings)
    try:
        try:
            ingested = await _read_document(engine, key, path)
        except DocumentError as exc:
            sys.exit(f"mnemocord: {exc}")
        # the agent learns of it in its next turn, as the bot tells it of an attachment
        await engine.record(key, recall.Message(role="system", content=ingested.note))
    finally:
        await engine.close()
    print(f"Saved {path.name} to the archival memory of {key}: {ingested.passages} passages.")


def _show(m: recall.Message) -> None:
    if m.role == "assistant":
        if m.content and m.tool_calls:
            print(f"  (thinks) {m.content}")
        for call in m.tool_calls or []:
            print(f"  (calls) {call['function']['name']}({call['function']['arguments']})")
    elif m.role == "tool":
        print("  (result) " + m.content.replace("\n", "\n           "))
    elif m.role == "system":
        print(f"  (event) {m.content}")


async def _import(settings: EngineSettings, path: Path, key: str | None) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        sys.exit(f"mnemocord: cannot read {path}: {exc}")
    engine = await Engine.open(settings)
    try:
        counts = await engine.memory.import_data(data, key)
    except ValueError as exc:
        sys.exit(f"mnemocord: {path} is not a mnemocord export: {exc}")
    finally:
        await engine.close()
    print(
        f"Imported into {counts['agent']}: {counts['blocks']} blocks, {counts['messages']} messages, {counts['passages']} passages, {counts['events']} events."
    )


async def _export(settings: EngineSettings, key: str, output: Path | None) -> None:
    engine = await Engine.open(settings)
    try:
        if not await engine.memory.exists(key):
            sys.exit(
                f"mnemocord: no agent {key!r} in {settings.database_path} (keys look like dm:<user id> or channel:<channel id>)"
            )
        data = await engine.memory.export(key)
    finally:
        await engine.close()
    text = json.dumps(data, ensure_ascii=False, indent=1)
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        print(text)


def _discord_id(text: str) -> str:
    """A Discord id (a snowflake): digits only, as argparse's type check."""
    text = text.strip()
    if not (text.isascii() and text.isdigit() and 0 < len(text) <= 20):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a Discord id (digits, e.g. 123456789012345678)")
    return text


async def _erase(settings: EngineSettings, command: str, target: str) -> None:
    engine = await Engine.open(settings)
    try:
        if command == "forget-user":
            erased = await engine.memory.forget_person(target)
            what = f"user {target}: {erased.messages} messages, {erased.passages} passages, {erased.person_blocks} person blocks"
            what += ", and their DM agent's whole memory" if erased.agents else ""
        else:
            erased = await engine.memory.purge_guild(target)
            what = f"server {target}: {erased.agents} channel agents, {erased.messages} messages, {erased.passages} passages"
    finally:
        await engine.close()
    print(f"Erased for {what}.")


async def _doctor() -> bool:
    from bot.config import BotSettings
    from bot.doctor import diagnose

    try:
        settings: EngineSettings = load_settings(BotSettings)
    except ConfigError as exc:
        print(f"✗ configuration: {exc}")
        return False
    return await diagnose(settings, lambda check: print(check.line(), flush=True))


if __name__ == "__main__":
    main()
