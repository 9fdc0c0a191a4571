"""`mnemocord doctor` as an operator runs it: a real subprocess against the fake model server."""

from __future__ import annotations

from pathlib import Path

from tests.fakeopenai import FakeOpenAI, call, refusal, reply
from tests.test_cli import base_env, run_cli

SECRET = "sk-doctor-secret-4321"


async def test_doctor_passes_on_a_working_setup_and_prints_no_secret(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.props = {"default_generation_settings": {"n_ctx": 16384}}
    fake.push(reply("OK"), call("send_message", {"message": "hello"}), reply("OK"))
    env = {**base_env(tmp_path, fake), "LLM_MODEL": "fake-model", "LLM_API_KEY": SECRET, "DISCORD_TOKEN": ""}
    code, out, err = await run_cli("doctor", env=env)
    assert code == 0, out + err
    for expected in (
        "✓ configuration valid",
        "✓ database opens",
        "✓ sqlite-vec loaded",
        "✓ PRAGMA quick_check ok",
        "✓ model endpoint reachable",
        "✓ model fake-model listed",
        "✓ a chat completion works",
        "✓ a native tool call works",
        "✓ streaming works",
        "✓ context window: server 16384",
    ):
        assert expected in out, out
    assert SECRET not in out + err and "✗" not in out


async def test_doctor_names_the_fix_when_tools_are_refused_and_exits_non_zero(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.push(reply("OK"), refusal("llama-server-jinja"), reply("OK"))
    env = {**base_env(tmp_path, fake), "LLM_MODEL": "fake-model", "CONTEXT_WINDOW": "4096", "DISCORD_TOKEN": ""}
    code, out, _ = await run_cli("doctor", env=env)
    assert code == 1 and "✗ native tool calls refused" in out and "--jinja" in out and "TOOL_MODE" in out


async def test_doctor_says_when_the_model_never_calls_the_tool(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.props = {"default_generation_settings": {"n_ctx": 2048}}
    fake.push(reply("OK"), reply("hello"), reply("OK"))
    env = {**base_env(tmp_path, fake), "LLM_MODEL": "fake-model", "CONTEXT_WINDOW": "8192", "DISCORD_TOKEN": ""}
    code, out, _ = await run_cli("doctor", env=env)
    assert code == 1 and "✗ the model answered without calling the tool" in out
    assert "✗ context window: server 2048" in out and "lower CONTEXT_WINDOW" in out


async def test_doctor_with_an_unreachable_model(tmp_path: Path, fake: FakeOpenAI) -> None:
    env = {**base_env(tmp_path, fake), "LLM_BASE_URL": "http://127.0.0.1:9/v1", "DISCORD_TOKEN": ""}
    code, out, _ = await run_cli("doctor", env=env)
    assert code == 1 and "✗ model endpoint unreachable" in out


async def test_doctor_checks_discord_token_application_and_message_content_intent(tmp_path: Path, fake: FakeOpenAI) -> None:
    from tests.fakediscord import FakeDiscord

    async with FakeDiscord() as discord_fake:
        env = {
            **base_env(tmp_path, fake),
            "LLM_MODEL": "fake-model",
            "DISCORD_TOKEN": "fake-token",
            "DISCORD_API_BASE": discord_fake.rest_base,
        }
        fake.default = call("send_message", {"message": "hello"})
        code, out, err = await run_cli("doctor", env=env)
        assert "✓ Discord token valid" in out and f"✓ application id {discord_fake.app_id}" in out, out + err
        assert "✓ Message Content intent enabled" in out
        assert f"client_id={discord_fake.app_id}&scope=bot+applications.commands" in out
        assert "fake-token" not in out + err
        discord_fake.application_flags = 0  # the intent switched off in the Developer Portal
        code, out, err = await run_cli("doctor", env=env)
        assert code == 1 and "✗ Message Content intent off: enable it under Bot → Privileged Gateway Intents" in out
