"""Export and import of one agent's memory (what `/memory export` and `mnemocord import` use)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from memory import core, recall
from memory.config import EngineSettings
from memory.db import StorageError
from memory.engine import Engine
from tests.fakeopenai import FakeOpenAI


@pytest.fixture
async def engine(settings: EngineSettings, fake: FakeOpenAI) -> AsyncIterator[Engine]:
    opened = await Engine.open(settings.model_copy(update={"llm_base_url": fake.url, "llm_model": "m"}))
    yield opened
    await opened.close()


async def _exported(engine: Engine) -> dict[str, Any]:
    agent = await engine.agent("dm:1")
    await core.set_value(engine.db, agent, "human", "Noor keeps bees.")
    await recall.append(engine.db, agent, [recall.Message(role="user", content="the hive swarmed in June", author="noor")])
    await engine.archive.insert(agent, "Noor's hives stand by the orchard wall.")
    return await engine.memory.export(agent.key)


async def test_import_loads_an_export_into_another_agent(engine: Engine) -> None:
    data = await _exported(engine)
    assert await engine.memory.import_data(data, "dm:2") == {
        "agent": "dm:2",
        "blocks": 2,
        "messages": 1,
        "passages": 1,
        "events": 0,
    }
    other = await engine.agent("dm:2")
    assert "Noor keeps bees." in core.render(await core.blocks(engine.db, other))
    assert (await recall.search_messages(engine.db, other, "swarmed")).total == 1
    assert (await engine.archive.search(other, "orchard")).total == 1
    data["passages"].append({"content": "\x00", "created_at": "2024-01-01T00:00:00Z"})  # no text: skipped
    assert (await engine.memory.import_data(data, "dm:4"))["agent"] == "dm:4"


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["passages"][-1].pop("created_at"),
        lambda d: d["passages"][-1].update(created_at="last Tuesday"),
        lambda d: d["messages"][-1].update(role="narrator"),
        lambda d: d["messages"][-1].update(tool_calls="not a list"),
        lambda d: d["blocks"][-1].update(value="x" * 100_000),
        lambda d: d["blocks"].append(["not", "a", "block"]),
        lambda d: d["blocks"].append(dict(d["blocks"][-1])),  # a label twice
        lambda d: d["messages"][-1].update(tool_calls=[{"function": "x"}]),
        lambda d: d["messages"][-1].update(
            tool_calls=[{"id": "c1", "function": {"name": "send_message", "arguments": {"message": "hi"}}}]
        ),
        lambda d: d["messages"][-1].update(
            tool_calls=[{"id": "c1", "function": {"name": "f", "arguments": "{}"}, "x": float("nan")}]
        ),
        lambda d: d["messages"][-1].update(tool_call_id={"not": "a string"}),
    ],
)
async def test_a_malformed_export_changes_nothing(engine: Engine, damage: Any) -> None:
    data = copy.deepcopy(await _exported(engine))
    damage(data)
    target = await engine.agent("dm:3")
    before = await engine.memory.export(target.key)
    with pytest.raises(ValueError):
        await engine.memory.import_data(data, "dm:3")
    after = await engine.memory.export(target.key)
    assert {k: v for k, v in after.items() if k != "exported_at"} == {k: v for k, v in before.items() if k != "exported_at"}


async def test_an_import_failing_midway_leaves_nothing(engine: Engine) -> None:
    data = await _exported(engine)
    data["passages"].append({"content": "poison: its insert fails", "tags": [], "created_at": "2024-01-01T00:00:00Z"})
    # a real failing statement, after the blocks, the summary and the messages were written
    await engine.db.execute(
        "CREATE TRIGGER poison BEFORE INSERT ON passages WHEN NEW.content LIKE 'poison%'"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    target = await engine.agent("dm:3")
    before = await engine.memory.export(target.key)
    with pytest.raises(StorageError, match="changed nothing: injected failure"):
        await engine.memory.import_data(data, "dm:3")
    after = await engine.memory.export(target.key)
    assert {k: v for k, v in after.items() if k != "exported_at"} == {k: v for k, v in before.items() if k != "exported_at"}
    assert after["passages"] == [] and after["messages"] == []


async def test_an_export_with_half_an_emoji_imports(engine: Engine) -> None:
    data = await _exported(engine)
    data["messages"][0]["content"] = "half \ud83d emoji"
    await engine.memory.import_data(data, "dm:8")
    assert any(m.content == "half \ufffd emoji" for m in await engine.memory.messages_since("dm:8", 0))
