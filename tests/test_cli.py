"""The mnemocord command as a person runs it: a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tests.fakeopenai import FakeOpenAI, call, reply

ROOT = Path(__file__).parent.parent


async def run_cli(*args: str, env: dict[str, str], stdin: str | bytes = "") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        *args,
        cwd=env.get("CWD", ROOT),
        env={k: v for k, v in {**os.environ, **env}.items() if k != "CWD"},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if isinstance(stdin, str) else stdin), 30)
    return proc.returncode or 0, out.decode(), err.decode()


def base_env(tmp_path: Path, fake: FakeOpenAI) -> dict[str, str]:
    return {
        "DATABASE_PATH": str(tmp_path / "cli.db"),
        "LLM_BASE_URL": fake.url,
        "LLM_MODEL": "m",
        "CWD": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }


async def test_chat_repl_shows_replies_and_with_v_the_inner_workings(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.push(
        call("core_memory_append", {"label": "human", "content": "Likes chess."}, content="I should note that."),
        call("send_message", {"message": "Chess it is!"}),
        reply("Still here."),
    )
    code, out, err = await run_cli("chat", "-v", env=base_env(tmp_path, fake), stdin="I like chess\nhello again\n")
    assert code == 0, err
    assert "bot> Chess it is!" in out and "bot> Still here." in out
    assert "(thinks) I should note that." in out
    assert 'core_memory_append({"label": "human", "content": "Likes chess."})' in out


async def test_missing_and_bad_settings_are_one_clear_line(tmp_path: Path, fake: FakeOpenAI) -> None:
    env = {"CWD": str(tmp_path), "PYTHONPATH": str(ROOT), "LLM_BASE_URL": "", "LLM_MODEL": "", "DISCORD_TOKEN": ""}
    code, out, err = await run_cli("run", env=env)
    assert code == 1 and "Traceback" not in err
    assert "DISCORD_TOKEN: not set" in err and "LLM_BASE_URL: not set" in err
    code, out, err = await run_cli("chat", env={**base_env(tmp_path, fake), "CONTEXT_WINDOW": "big"})
    assert code == 1 and err.strip().startswith("mnemocord: CONTEXT_WINDOW:") and "Traceback" not in err
    bad_url = {**base_env(tmp_path, fake), "LLM_BASE_URL": "http://127.0.0.1:9/v1", "DISCORD_TOKEN": "x"}
    code, out, err = await run_cli("run", env=bad_url)
    assert code == 1 and "cannot reach http://127.0.0.1:9/v1" in err and "Traceback" not in err
    (tmp_path / "junk.db").write_bytes(b"not a database" * 200)
    code, out, err = await run_cli("chat", env={**base_env(tmp_path, fake), "DATABASE_PATH": str(tmp_path / "junk.db")})
    assert code == 1 and "junk.db" in err and "Traceback" not in err


async def test_documents_ingested_from_the_command_line_and_the_chat(tmp_path: Path, fake: FakeOpenAI) -> None:
    from tests.test_bot import tiny_pdf

    env = base_env(tmp_path, fake)
    (tmp_path / "notes.md").write_text("# Garden\n\nThe quince tree was planted in March 2019.", encoding="utf-8")
    (tmp_path / "lease.pdf").write_bytes(tiny_pdf("The lease of flat 4B ends on 30 June 2031."))
    (tmp_path / "photo.png").write_bytes(b"\x89PNG....")
    code, out, err = await run_cli("ingest", "notes.md", "--agent", "local:terminal", env=env)
    assert code == 0, err
    assert out.strip() == "Saved notes.md to the archival memory of local:terminal: 1 passages."
    code, out, err = await run_cli("ingest", "photo.png", "--agent", "local:terminal", env=env)
    assert code == 1 and err.strip().splitlines()[-1].startswith("mnemocord: I can't read `photo.png`: I take text files (")
    assert "Traceback" not in err
    code, out, err = await run_cli("ingest", "missing.txt", "--agent", "local:terminal", env=env)
    assert code == 1 and "cannot read missing.txt" in err and "Traceback" not in err

    fake.default = lambda body: reply("Noted.")
    code, out, err = await run_cli("chat", env=env, stdin="/file lease.pdf\n/file nowhere.txt\nwhen does my lease end?\n")
    assert code == 0, err
    assert "Saved `lease.pdf` to archival memory (1 passages)." in out and "cannot read nowhere.txt" in out
    first, second = fake.chat_requests
    said = json.dumps(first["messages"])
    # the agent was told of both documents: the one ingested before (an event) and the one sent in the chat
    assert "Document `notes.md`" in said and "Document `lease.pdf` (42 characters)" in first["messages"][-1]["content"]
    assert "when does my lease end?" in second["messages"][-1]["content"]
    code, out, err = await run_cli("export", "--agent", "local:terminal", env=env)
    passages = [p["content"] for p in json.loads(out)["passages"]]
    assert passages == ["# Garden\n\nThe quince tree was planted in March 2019.", "The lease of flat 4B ends on 30 June 2031."]


async def test_bytes_that_are_not_utf8_and_half_emoji_from_the_model_keep_the_chat_going(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    fake.push(call("send_message", '{"message": "half \\ud83d an emoji"}'), reply("fine"))
    # a terminal's UTF-8 locale reads stdin strictly (the test's C locale would use surrogateescape)
    env = {**base_env(tmp_path, fake), "PYTHONIOENCODING": "utf-8"}
    code, out, err = await run_cli("chat", env=env, stdin=b"caf\xe9 au lait\nstill ok?\n")
    assert code == 0 and "Traceback" not in err, err
    assert "bot> half \ufffd an emoji" in out and "bot> fine" in out
    assert fake.chat_requests[0]["messages"][-1]["content"].endswith("caf\ufffd au lait")
