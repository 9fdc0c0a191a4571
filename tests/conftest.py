from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from memory import agents
from memory.archival import Archive
from memory.config import EngineSettings
from memory.db import Database
from memory.embeddings import Embedder
from memory.llm import LLMClient
from tests.fakeopenai import FakeOpenAI


@pytest.fixture
def settings(tmp_path: Path) -> EngineSettings:
    # _env_file=None: a developer's own .env must not leak into tests
    return EngineSettings(_env_file=None, database_path=tmp_path / "test.db")  # type: ignore[call-arg]


@pytest.fixture
async def db(settings: EngineSettings) -> AsyncIterator[Database]:
    database = await Database.open(settings.database_path)
    yield database
    await database.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    yield server
    await server.stop()


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[LLMClient]:
    c = LLMClient(fake.url, timeout=5, max_retries=2, retry_budget=5)
    yield c
    await c.aclose()


@pytest.fixture
async def archive(db: Database, client: LLMClient) -> Archive:
    embedder = Embedder(db, client, "fake-embed", batch_size=16)
    await embedder.prepare()
    return Archive(db, embedder)


@pytest.fixture
async def agent(db: Database, settings: EngineSettings) -> agents.Agent:
    return await agents.get_or_create(db, "dm:1001", settings)
