from __future__ import annotations

import pytest

from memory.config import ConfigError, EngineSettings, load_settings


def test_malformed_settings_are_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTEXT_WINDOW", "lots")
    monkeypatch.setenv("MAX_STEPS_PER_TURN", "0")
    with pytest.raises(ConfigError) as err:
        load_settings(EngineSettings, _env_file=None)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("CONTEXT_WINDOW:") and "'lots'" in lines[0]
    assert lines[1].startswith("MAX_STEPS_PER_TURN:")


def test_missing_endpoint_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_BASE_URL", raising=False)
    monkeypatch.delenv("LLM_MODEL", raising=False)
    settings = load_settings(EngineSettings, _env_file=None)
    with pytest.raises(ConfigError, match="LLM_BASE_URL: not set"):
        settings.require_llm()


def test_env_file_is_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text("LLM_MODEL=qwen2.5:7b\nCONTEXT_WINDOW=16384\n")
    settings = load_settings(EngineSettings, _env_file=env)
    assert settings.llm_model == "qwen2.5:7b" and settings.context_window == 16384


async def test_default_persona_fits_the_smallest_persona_limit(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memory import agents, core
    from memory.db import Database

    monkeypatch.setenv("PERSONA_LIMIT", "199")
    with pytest.raises(ConfigError, match="PERSONA_LIMIT"):
        load_settings(EngineSettings, _env_file=None)
    settings = EngineSettings(_env_file=None, persona_limit=200)  # type: ignore[call-arg]
    db = await Database.open(tmp_path / "t.db")
    agent = await agents.get_or_create(db, "dm:1", settings)
    (persona, _) = await core.blocks(db, agent)
    assert persona.value == agents.DEFAULT_PERSONA and len(persona.value) <= persona.limit
    # what /memory reset core does
    assert (await core.set_value(db, agent, "persona", agents.DEFAULT_PERSONA)).text.startswith("Block 'persona' set")
    await db.close()
