"""Core, recall and archival memory against a real SQLite file and a loopback embeddings server."""

from __future__ import annotations

import pytest

from memory import agents, core, fulltext, recall, search
from memory.agents import Agent
from memory.archival import CONTEXT_CHARS, MAX_INSERT_CHARS, Archive, chunk
from memory.config import EngineSettings
from memory.db import Database
from tests.fakeopenai import Error, FakeOpenAI

# --- core memory -------------------------------------------------------------


async def test_core_append_and_replace(db: Database, agent: Agent) -> None:
    assert "Appended" in (await core.append(db, agent, "human", "Name: Ann.")).text
    assert (await core.append(db, agent, "human", "Likes tea.")).ok
    assert "Replaced" in (await core.replace(db, agent, "human", "Likes tea.", "Likes green tea.")).text
    block = {b.label: b for b in await core.blocks(db, agent)}["human"]
    assert block.value == "Name: Ann.\nLikes green tea."
    assert '<human chars="27/2000"' in core.render(await core.blocks(db, agent))


async def test_core_refusals_tell_the_model_what_to_do(db: Database, agent: Agent) -> None:
    await core.append(db, agent, "human", "likes cats. likes cats.")
    refusals = {
        "occurs 2 times": await core.replace(db, agent, "human", "likes cats.", "x"),
        "does not occur": await core.replace(db, agent, "human", "dogs", "x"),
        "core_memory_append": await core.replace(db, agent, "human", "", "x"),
        "Use one of: persona, human": await core.append(db, agent, "nope", "x"),
        "archival_memory_insert": await core.append(db, agent, "human", "y" * 3000),
        "limit is 2000": await core.replace(db, agent, "human", "likes cats. likes", "z" * 2500),
    }
    for expected, edit in refusals.items():
        assert not edit.ok and expected in edit.text, (expected, edit)
    value = {b.label: b.value for b in await core.blocks(db, agent)}["human"]
    assert value == "likes cats. likes cats."  # every refusal left the block untouched


# --- recall memory -----------------------------------------------------------


async def _say(db: Database, agent: Agent, *texts: str, when: str | None = None, role: str = "user") -> None:
    msgs = [recall.Message(role=role, content=t, author="ann", author_id="1001") for t in texts]
    if when:
        for m in msgs:
            m.created_at = when
    await recall.append(db, agent, msgs)


async def test_conversation_search_ranks_pages_and_counts(db: Database, agent: Agent) -> None:
    for i in range(33):
        await _say(db, agent, f"note {i} about the garden and tomatoes")
    await _say(db, agent, "tomatoes tomatoes tomatoes everywhere, I love tomatoes")
    await _say(db, agent, "something unrelated about trains")
    page = await recall.search_messages(db, agent, "tomatoes", page=2)
    assert (page.total, page.page, page.pages) == (34, 2, 7)
    assert len(page.hits) == 5
    assert page.render("messages").startswith("Page 2 of 7, 34 messages matched")
    first = await recall.search_messages(db, agent, "tomatoes")
    assert "everywhere" in first.hits[0].text  # ranked, not chronological
    past_end = await recall.search_messages(db, agent, "tomatoes", page=9)
    assert past_end.hits == [] and "past the end" in past_end.render("messages")


async def test_conversation_search_dates_and_roles_filter(db: Database, agent: Agent) -> None:
    await _say(db, agent, "we planned the trip to Lisbon", when="2024-03-01T10:00:00Z")
    await _say(db, agent, "booked the Lisbon hotel", when="2024-03-05T10:00:00Z")
    await _say(db, agent, "Lisbon was lovely", when="2024-04-02T10:00:00Z")
    await _say(db, agent, "Lisbon tips from the assistant", when="2024-03-03T10:00:00Z", role="assistant")
    march = await recall.search_messages(db, agent, "Lisbon", start_date="2024-03-01", end_date="2024-03-31")
    assert march.total == 3
    users_in_march = await recall.search_messages(
        db, agent, "Lisbon", start_date="2024-03-01", end_date="2024-03-05", roles=["user"]
    )
    assert sorted(h.text for h in users_in_march.hits) == ["booked the Lisbon hotel", "we planned the trip to Lisbon"]
    by_date_only = await recall.search_messages(db, agent, "", start_date="2024-04-01")
    assert [h.text for h in by_date_only.hits] == ["Lisbon was lovely"]
    with pytest.raises(search.BadArgument, match="YYYY-MM-DD"):
        await recall.search_messages(db, agent, "Lisbon", start_date="last tuesday")
    with pytest.raises(search.BadArgument, match="unknown role"):
        await recall.search_messages(db, agent, "Lisbon", roles=["wizard"])


# query -> (messages it matches, passages it matches by keyword), for the message and passage below
HOSTILE = {
    '"': (0, 0),
    '""': (0, 0),
    "*": (0, 0),
    "AND": (1, 1),
    "OR NOT": (0, 0),
    "NEAR(": (0, 0),
    "NEAR(a b": (0, 0),
    "-": (0, 0),
    "-foo": (0, 0),
    ":": (0, 0),
    "content:x": (0, 0),
    "agent:a1": (0, 0),
    "a1": (0, 0),
    "{content}: x": (0, 0),
    "^start": (0, 0),
    "(((": (0, 0),
    "')--": (0, 0),
    "x' OR '1'='1": (0, 0),
    "\x00": (0, 0),
    "tea\x00cup": (1, 1),
    "": (1, 1),
    "   ": (1, 1),
    "🍵🐈": (0, 0),
    "чай и кошки": (1, 1),
    "お茶と猫": (1, 0),
    "شاي": (0, 0),
    "a" * 5000: (0, 0),
    " ".join(["word"] * 2000): (0, 0),
    "AND OR NOT NEAR": (0, 0),
    '"tea" * -cats': (1, 1),
}


async def test_hostile_queries_never_raise(db: Database, agent: Agent, archive: Archive) -> None:
    """Query syntax in the input is searched for as words, never parsed; an empty query lists the newest."""
    await _say(db, agent, "I like tea and cats 🍵🐈 чай и кошки お茶と猫")
    await archive.insert(agent, "Ann likes tea and cats. чай и кошки")
    keyword_only = Archive(db, None)
    for q, (messages, passages) in HOSTILE.items():
        assert ((await recall.search_messages(db, agent, q)).total, (await keyword_only.search(agent, q)).total) == (
            messages,
            passages,
        ), q
        hybrid = await archive.search(agent, q)  # meaning may add the passage, never anything else
        assert [h.text for h in hybrid.hits] in ([], ["Ann likes tea and cats. чай и кошки"]), q


async def test_odd_message_content_is_stored(db: Database, agent: Agent) -> None:
    await _say(db, agent, "nul\x00byte", "x" * 200_000, "mixed 中文 English عربى 🙂")
    stored = await recall.in_context(db, agent)
    assert stored[0].content == "nulbyte" and len(stored[1].content) == 200_000
    assert (await recall.search_messages(db, agent, "中文")).total == 1


# --- archival memory ---------------------------------------------------------


def test_chunking_is_sentence_aware_with_overlap() -> None:
    sentences = [f"Sentence number {i} talks about topic {i % 7}." for i in range(200)]
    pieces = chunk(" ".join(sentences), size=400, overlap=100)
    assert all(len(p) <= 400 for p in pieces)
    assert all(p.endswith(".") for p in pieces)  # never cut mid-sentence
    for a, b in zip(pieces, pieces[1:]):
        assert a.split(". ")[-1] in b  # the next piece repeats the last sentence
    text = " ".join(pieces)
    assert all(s in text for s in sentences)
    assert chunk("word " * 1000, size=300)  # no sentence ends at all: cut at spaces
    assert all(len(p) <= 300 for p in chunk("word " * 1000, size=300))


async def test_archival_insert_and_hybrid_search(archive: Archive, agent: Agent, fake: FakeOpenAI) -> None:
    await archive.insert(agent, "Ann's sister Mia lives in Porto and works as a nurse.", tags=["family"])
    await archive.insert(agent, "Ann is allergic to peanuts.", tags=["health"])
    await archive.insert(agent, "The team standup is at 9:30 every weekday.", tags=["work"])
    page = await archive.search(agent, "where does the sister live")
    assert "Porto" in page.hits[0].text
    assert "keyword and meaning" in page.note
    family_only = await archive.search(agent, "peanuts", tags=["family"])
    assert [h.label for h in family_only.hits] == ["tags family"]  # meaning may match, the tag filter holds
    tagged = await archive.search(agent, "peanuts", tags=["Health"])
    assert [h.text for h in tagged.hits] == ["Ann is allergic to peanuts."]
    # a vector-only match: no shared word survives stop-words for keyword search
    assert (await archive.search(agent, "nurse porto")).hits[0].text.startswith("Ann's sister")


async def test_identical_text_is_embedded_once(archive: Archive, agent: Agent, fake: FakeOpenAI) -> None:
    await archive.insert(agent, "The wifi password is hunter2.")
    await archive.insert(agent, "The wifi password is hunter2.")
    assert fake.embedding_inputs.count("The wifi password is hunter2.") == 1
    assert await archive.count(agent) == 2


async def test_embedding_outage_keeps_passage_and_catches_up(
    archive: Archive, agent: Agent, fake: FakeOpenAI, db: Database
) -> None:
    await archive.insert(agent, "first passage about kayaks")  # creates the vector space
    fake.fail_embeddings = Error(400, {"error": {"message": "model not loaded"}})
    await archive.insert(agent, "second passage about canoes")
    assert await db.fetchval("SELECT count(*) FROM passages WHERE embedded = 0") == 1
    found = await archive.search(agent, "canoes")  # keyword search still works
    assert found.note == "" and found.hits[0].text == "second passage about canoes"
    fake.fail_embeddings = None
    assert await archive.embed_pending() == 1
    assert await db.fetchval("SELECT count(*) FROM passage_vectors") == 2
    assert await db.fetchval("SELECT count(*) FROM passage_bits") == 2


async def test_model_change_reembeds_instead_of_mixing(db: Database, client, agent: Agent, fake: FakeOpenAI) -> None:
    from memory.embeddings import Embedder

    first = Embedder(db, client, "model-a")
    await first.prepare()
    arch = Archive(db, first)
    await arch.insert(agent, "a passage about violins")
    fake.dim = 32  # the new model has another dimension
    second = Embedder(db, client, "model-b")
    await second.prepare()
    assert await db.fetchval("SELECT count(*) FROM passages WHERE embedded = 1") == 0
    arch2 = Archive(db, second)
    assert await arch2.embed_pending() == 1
    assert second.dim == 32
    assert await db.fetchval("SELECT value FROM meta WHERE key = 'embedding_model'") == "model-b"
    assert (await arch2.search(agent, "violins")).hits[0].text == "a passage about violins"


async def test_the_query_cache_keeps_the_newest_vectors(
    db: Database, client, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memory import embeddings

    monkeypatch.setattr(embeddings, "CACHE_ROWS", 5)
    embedder = embeddings.Embedder(db, client, "fake-embed")
    await embedder.prepare()
    queries = [f"where did query {n} go" for n in range(8)]
    for q in queries:
        await embedder.embed([q])
    cached = {r[0] for r in await db.fetchall("SELECT text_hash FROM embedding_cache")}
    assert cached == {embeddings.text_hash(q) for q in queries[3:]}
    fake.embedding_inputs.clear()
    await embedder.embed([queries[7], queries[0]])
    assert fake.embedding_inputs == [queries[0]]  # the newest came from the cache, the oldest was trimmed


async def test_keyword_only_without_embedder(db: Database, agent: Agent) -> None:
    arch = Archive(db, None)
    await arch.insert(agent, "The boat is called Seagull.")
    page = await arch.search(agent, "what is the boat called")
    assert page.total == 1 and page.note == ""


async def test_oversized_insert_is_refused_and_long_text_chunked(archive: Archive, agent: Agent) -> None:
    with pytest.raises(ValueError, match="at most 20000"):
        await archive.insert(agent, "x" * (MAX_INSERT_CHARS + 1))
    with pytest.raises(ValueError, match="empty"):
        await archive.insert(agent, "   ")
    ids = await archive.insert(agent, "A fact about otters. " * 500, max_chars=50_000)
    assert len(ids) > 5


# --- isolation ---------------------------------------------------------------


async def test_agents_never_see_each_others_rows(db: Database, settings: EngineSettings, archive: Archive) -> None:
    alice = await agents.get_or_create(db, "dm:1", settings)
    bob = await agents.get_or_create(db, "channel:2", settings)
    await recall.append(db, alice, [recall.Message(role="user", content="my secret is swordfish", author="alice", author_id="1")])
    await archive.insert(alice, "alice secret swordfish passage", tags=["secret"])
    await core.append(db, alice, "human", "secret: swordfish")
    mark = f"x{alice.id}x"  # the prefix of alice's index terms (memory/search.py)
    probes = ["swordfish", "secret", f"{mark}swordfish", f'content:"{mark}swordfish"', f"{mark}secret OR swordfish", "*", ""]
    for q in probes:
        assert (await recall.search_messages(db, bob, q)).total == 0, q
        assert (await archive.search(bob, q)).total == 0, q
        assert (await archive.search(bob, q, tags=["secret"])).total == 0, q
    assert await recall.delete(db, bob, [m.id for m in await recall.in_context(db, alice)]) == 0
    alice_passages = [r[0] for r in await db.fetchall("SELECT id FROM passages WHERE agent_id = ?", (alice.id,))]
    assert await archive.delete(bob, alice_passages) == 0
    assert "swordfish" not in core.render(await core.blocks(db, bob))
    await recall.clear(db, bob)
    await archive.clear(bob)
    assert (await recall.search_messages(db, alice, "swordfish")).total == 1
    assert (await archive.search(alice, "swordfish")).total == 1


async def test_bm25_statistics_stay_exact_through_updates_and_deletes(db: Database, agent: Agent, tmp_path) -> None:
    """Inserting rewrites the previous passage's index row; deleting removes rows. bm25 must not drift."""
    arch = Archive(db, None)
    texts = [f"note {i}: the {'zebra' if i % 3 == 0 else 'lion'} sleeps near pond {i}" for i in range(12)]
    for t in texts:
        await arch.insert(agent, t)
    doomed = [
        r[0] for r in await db.fetchall("SELECT id FROM passages WHERE agent_id = ? AND content LIKE '%pond 4'", (agent.id,))
    ]
    assert await arch.delete(agent, doomed) == 1
    query = fulltext.match(agent.id, "zebra pond sleeps", "{content context date}")
    scores = await db.fetchall(
        "SELECT rowid, bm25(passages_fts, 1, 0.5, 0.5) FROM passages_fts WHERE passages_fts MATCH ? ORDER BY rowid", (query,)
    )
    # the same final rows, indexed once each into a fresh table
    fresh = await Database.open(tmp_path / "fresh.db")
    rows = await db.fetchall("SELECT id, content, context, created_at FROM passages ORDER BY id")
    await fresh.transact(
        lambda c: c.executemany(
            "INSERT INTO passages_fts(rowid, content, context, date) VALUES (?, ?, ?, ?)",
            [(r[0], *fulltext.passage_row(agent.id, r[1], r[2], r[3])) for r in rows],
        )
    )
    expected = await fresh.fetchall(
        "SELECT rowid, bm25(passages_fts, 1, 0.5, 0.5) FROM passages_fts WHERE passages_fts MATCH ? ORDER BY rowid", (query,)
    )
    await fresh.close()
    assert [r[0] for r in scores] == [r[0] for r in expected] and len(scores) == 11
    assert [r[1] for r in scores] == pytest.approx([r[1] for r in expected], rel=1e-9)


async def test_each_passages_context_holds_its_neighbours_and_a_document_is_indexed_in_one_segment(
    db: Database, agent: Agent, tmp_path
) -> None:
    arch = Archive(db, None)
    document = " ".join(f"Paragraph {i} tells of herons, reeds and the slow river." for i in range(400))
    ids = await arch.insert(agent, document, max_chars=len(document))
    assert len(ids) == len(chunk(document)) > 10
    # rowids rising in one transaction: FTS5 writes the terms out once, as one segment, as a fresh
    # table given the same rows at once holds them (rewriting a row after the next one splits it)
    rows = await db.fetchall("SELECT id, content, context, created_at FROM passages ORDER BY id")
    fresh = await Database.open(tmp_path / "fresh.db")
    await fresh.transact(
        lambda c: c.executemany(
            "INSERT INTO passages_fts(rowid, content, context, date) VALUES (?, ?, ?, ?)",
            [(r[0], *fulltext.passage_row(agent.id, r[1], r[2], r[3])) for r in rows],
        )
    )
    assert await db.fetchval("SELECT count(*) FROM passages_fts_data") == await fresh.fetchval(
        "SELECT count(*) FROM passages_fts_data"
    )
    await fresh.close()
    await arch.insert(agent, "a short note about otters")  # the document's last passage gets its beginning
    rows = await db.fetchall("SELECT content, context FROM passages WHERE agent_id = ? ORDER BY id", (agent.id,))
    contents = [r[0] for r in rows]
    expected = [
        f"{contents[i - 1][-CONTEXT_CHARS:] if i else ''} {contents[i + 1][:CONTEXT_CHARS] if i + 1 < len(rows) else ''}".strip()
        for i in range(len(rows))
    ]
    assert [r[1] for r in rows] == expected
    await db.transact(lambda c: c.execute("INSERT INTO passages_fts(passages_fts, rank) VALUES ('integrity-check', 0)"))


async def test_forgetting_never_separates_a_call_from_its_result(db: Database, agent: Agent) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "send_message", "arguments": '{"message": "your pin is 4242"}'}}
    stored = await recall.append(
        db,
        agent,
        [
            recall.Message(role="user", content="what's my pin?"),
            recall.Message(role="assistant", content="", tool_calls=[call]),
            recall.Message(role="tool", content="Sent.", tool_call_id="c1"),
            recall.Message(role="tool", content="an unrelated result", tool_call_id="zz"),
        ],
    )
    user_msg, assistant, result, lonely = stored
    assert await recall.delete(db, agent, [lonely.id]) == 1
    left = {m.id: m for m in await recall.in_context(db, agent)}
    assert left[lonely.id].content == "[forgotten]"  # blanked, not removed
    assert await recall.delete(db, agent, [assistant.id]) == 1
    left = {m.id: m for m in await recall.in_context(db, agent)}
    assert assistant.id not in left and result.id not in left  # the call took its result along
    assert (await recall.search_messages(db, agent, "4242")).total == 0
    assert user_msg.id in left


async def test_odd_tool_arguments_come_back_as_errors(db: Database, agent: Agent, archive: Archive) -> None:
    from memory import tools

    cases = [
        ("conversation_search", '{"query": "x", "end_date": "9999-12-31"}', "No messages matched"),
        ("conversation_search", '{"query": "x", "start_date": "0001-01-01T00:00:00+05:00"}', "is not a date"),
        ("conversation_search", '{"query": "x", "page": 1e309}', "not a number"),
        ("archival_memory_search", '{"query": "x", "page": 100000000000000000000}', "too far"),
        ("archival_memory_search", '{"query": "x", "page": 480}', "No passages matched"),
        ("archival_memory_insert", '{"content": "\\u0000"}', "no text"),
        ("archival_memory_insert", '{"content": ["a", "list"]}', "Saved"),
        ("core_memory_append", '{"label": 5, "content": "x"}', "no core memory block"),
        ("send_message", "[1, 2]", "must be a JSON object"),
    ]
    for name, args, expected in cases:
        outcome = await tools.execute(db, archive, agent, name, args)
        assert expected in outcome.text, (name, args, outcome.text)


async def test_vector_search_ranks_sign_bit_candidates_by_exact_cosine(archive: Archive, agent: Agent, db: Database) -> None:
    from tests.fakeopenai import embed_text

    animals, colours = ["otter", "heron", "badger", "stoat", "vole", "newt"], ["red", "blue", "green", "grey", "gold"]
    texts = [f"the {colours[i % 5]} {animals[i % 6]} number{i} sleeps at site{i % 7}" for i in range(60)]
    for i, t in enumerate(texts):
        await archive.insert(agent, t, created_at=f"{2023 + i % 2}-03-01T10:00:00Z")
    ids = {t: r[0] for t, r in zip(texts, await db.fetchall("SELECT id FROM passages ORDER BY id"))}
    for probe in texts[::7]:
        # k=3: 12 candidates by sign bits out of 60, then exact distances
        found = await archive.nearest(agent, probe, k=3)
        assert found[0] == ids[probe]  # its own vector: hamming distance 0, cosine 1
        q = embed_text(probe, 256)
        by_id = {ids[t]: sum(a * b for a, b in zip(q, embed_text(t, 256))) for t in texts}
        assert [by_id[i] for i in found] == sorted((by_id[i] for i in found), reverse=True)
    # with a date filter the vector side searches only the rows left, exactly
    page = await archive.search(agent, texts[0], start_date="2024-01-01", page_size=10)
    assert page.hits and all(h.created_at.startswith("2024") for h in page.hits)
    assert ids[texts[0]] not in [h.id for h in page.hits]
    await archive.delete(agent, [ids[texts[0]], ids[texts[1]]])
    assert await db.fetchval("SELECT count(*) FROM passage_vectors") == 58
    assert await db.fetchval("SELECT count(*) FROM passage_bits") == 58
    assert ids[texts[0]] not in await archive.nearest(agent, texts[0], k=5)


async def test_a_dimension_that_is_not_a_multiple_of_8_is_padded(db: Database, client, agent: Agent, fake: FakeOpenAI) -> None:
    from memory.embeddings import Embedder

    fake.dim = 20
    embedder = Embedder(db, client, "odd-model")
    await embedder.prepare()
    arch = Archive(db, embedder)
    await arch.insert(agent, "a passage about lighthouses")
    await arch.insert(agent, "a passage about tractors")
    assert embedder.dim == 20
    assert await db.fetchval("SELECT length(vector) FROM passage_vectors LIMIT 1") == 24 * 4
    assert (await arch.nearest(agent, "lighthouses", k=1)) == [await db.fetchval("SELECT min(id) FROM passages")]
