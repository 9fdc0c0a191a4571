"""Stored data follows Discord: edits, deletes (single, bulk, in the context window), deleted channels and
threads, a server the bot left, "forget me" by slash command and by CLI, who may export a channel's memory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bot.client import MnemoBot
from bot.config import BotSettings
from memory import people, recall, tokens, tools
from memory.config import EngineSettings
from memory.engine import Engine
from tests.fakediscord import FakeDiscord
from tests.fakeopenai import FakeOpenAI, call, reply
from tests.test_bot import (  # noqa: F401  (fixtures)
    chat_requests,
    eventually,
    fake_discord,
    last_user_text,
    running,
    settings,
    world,
)
from tests.test_bot_edges import outcome_of
from tests.test_cli import base_env, run_cli


async def followed(bot: MnemoBot, fake_discord: FakeDiscord, event: str, data: dict[str, Any]) -> Any:
    """Send a gateway event and wait until the bot has applied it to memory."""
    done = bot.wait_for("memory_followed", timeout=5)
    await fake_discord.dispatch(event, data)
    return await done


async def texts(bot: MnemoBot, key: str) -> list[str]:
    agent = await bot.engine.agent(key)
    rows = await bot.engine.db.fetchall(
        "SELECT content FROM messages WHERE agent_id = ? AND role = 'user' ORDER BY id", (agent.id,)
    )
    return [r[0] for r in rows]


async def hits(bot: MnemoBot, key: str, query: str) -> tuple[int, int]:
    """How many recall and archival matches `query` has, as `/memory search` finds them."""
    found = await bot.engine.memory.search(key, query)
    return found.messages.total, found.passages.total


async def post(
    bot: MnemoBot, fake_discord: FakeDiscord, channel: dict[str, Any], user: dict[str, Any], text: str, **kw: Any
) -> Any:
    handled = bot.wait_for("message_handled", check=lambda m, _: m.content == text, timeout=5)
    message = await fake_discord.send_message(channel["id"], user["id"], text, **kw)
    await handled
    return message


async def test_edit_replaces_the_text_and_its_index_entry_and_deletes_remove_them(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, bob = world["general"], world["alice"], world["bob"]
    key = f"channel:{general['id']}"
    async with running(settings, fake_discord) as bot:
        first = await post(bot, fake_discord, general, alice, "my locker code is 4417")
        otters = await post(bot, fake_discord, general, bob, "otters hold hands while sleeping")
        walrus = await post(bot, fake_discord, general, bob, "walrus tusks grow forever")
        narwhal = await post(bot, fake_discord, general, alice, "narwhal tusks are teeth")
        assert await hits(bot, key, "locker 4417") == (1, 0)

        edited = {**FakeDiscord._wire(first), "content": "my locker code is secret"}
        await followed(bot, fake_discord, "MESSAGE_UPDATE", edited)
        assert await hits(bot, key, "4417") == (0, 0)
        assert await hits(bot, key, "secret") == (1, 0)
        assert (await texts(bot, key))[0] == "my locker code is secret"

        await followed(bot, fake_discord, "MESSAGE_DELETE", {"id": otters["id"], "channel_id": general["id"]})
        assert await hits(bot, key, "otters") == (0, 0)
        await followed(
            bot, fake_discord, "MESSAGE_DELETE_BULK", {"ids": [walrus["id"], narwhal["id"]], "channel_id": general["id"]}
        )
        assert await hits(bot, key, "tusks") == (0, 0)
        assert await texts(bot, key) == ["my locker code is secret"]
        # the index forgot exactly what it held: an integrity check of the contentless index passes
        await bot.engine.db.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")


async def test_a_deleted_message_leaves_the_context_window_and_takes_its_attachment_passages(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    key = f"dm:{alice['id']}"
    fake.default = lambda body: reply("noted")
    async with running(settings, fake_discord) as bot:
        doc = ("The quokka recipe: flour, sugar and zucchini. " * 40).encode()
        with_doc = await post(
            bot, fake_discord, dm, alice, "my secret quokka recipe", attachments=[("recipe.txt", doc, "text/plain")]
        )
        await post(bot, fake_discord, dm, alice, "and something else")
        assert (await hits(bot, key, "quokka"))[1] > 0
        # an edit changes her words; the note that the document arrived stays
        await followed(bot, fake_discord, "MESSAGE_UPDATE", {**FakeDiscord._wire(with_doc), "content": "my recipe"})
        (edited, *_) = await texts(bot, key)
        assert edited.startswith("my recipe\n[Document `recipe.txt` (") and "secret" not in edited
        await followed(bot, fake_discord, "MESSAGE_DELETE", {"id": with_doc["id"], "channel_id": dm["id"]})
        assert await hits(bot, key, "quokka zucchini") == (0, 0)
        assert await bot.engine.archive.count(await bot.engine.agent(key)) == 0
        await post(bot, fake_discord, dm, alice, "what did I tell you?")
    prompt = str(chat_requests(fake)[-1]["messages"])
    assert "something else" in prompt and "quokka" not in prompt


async def test_deleted_channel_and_thread_erase_their_agents_and_a_server_left_is_kept(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, guild = world["general"], world["alice"], world["guild"]
    other = fake_discord.add_text_channel(guild["id"], "other")
    async with running(settings, fake_discord) as bot:
        thread = fake_discord.add_thread(general["id"], "plans", owner_id=alice["id"])
        side = fake_discord.add_thread(other["id"], "side", owner_id=alice["id"])
        await fake_discord.wait_for(lambda f: bot.get_channel(int(thread["id"])) and bot.get_channel(int(side["id"])))
        for channel in (general, other, thread, side):
            await post(bot, fake_discord, channel, alice, f"hello in {channel['name']}")
        await followed(
            bot,
            fake_discord,
            "THREAD_DELETE",
            {"id": thread["id"], "guild_id": guild["id"], "parent_id": general["id"], "type": 11},
        )
        assert await texts(bot, f"channel:{thread['id']}") == []
        assert await texts(bot, f"channel:{general['id']}") == ["hello in general"]
        erasures: list[str] = []
        both = bot.wait_for("memory_followed", check=lambda kind, _: erasures.append(kind) or len(erasures) == 2, timeout=5)
        await fake_discord.dispatch("CHANNEL_DELETE", {**other, "guild_id": guild["id"]})
        await both
        assert await texts(bot, f"channel:{other['id']}") == []
        assert await texts(bot, f"channel:{side['id']}") == []  # its threads go with it
        assert await texts(bot, f"channel:{general['id']}") == ["hello in general"]

        removed = bot.wait_for("guild_remove", timeout=5)
        await fake_discord.dispatch("GUILD_DELETE", {"id": guild["id"]})
        await removed
        assert await texts(bot, f"channel:{general['id']}") == ["hello in general"]
        erased = await bot.engine.memory.purge_guild(str(guild["id"]))
        assert (erased.agents, erased.messages) == (1, 1)
        assert await texts(bot, f"channel:{general['id']}") == []


async def test_forget_me_erases_a_persons_data_everywhere_after_confirmation(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, bob = world["general"], world["alice"], world["bob"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.default = lambda body: reply("ok")
    async with running(settings, fake_discord) as bot:
        await post(bot, fake_discord, dm, alice, "my DM secret is heron")
        doc = b"Alice's flamingo diary, page one. " * 20
        await post(
            bot,
            fake_discord,
            general,
            alice,
            f"<@{fake_discord.bot_user_id}> read my diary",
            attachments=[("diary.txt", doc, "text/plain")],
        )
        await post(bot, fake_discord, general, alice, "alice likes pelicans")
        await post(bot, fake_discord, general, bob, "bob likes pelicans too")
        channel_key = f"channel:{general['id']}"
        assert (await hits(bot, channel_key, "flamingo"))[1] > 0

        asked = await fake_discord.send_slash(general["id"], alice["id"], "forget-me")
        await fake_discord.wait_for(lambda f: asked["responses"])
        assert [b["label"] for b in fake_discord.buttons(asked)] == ["Confirm", "Cancel"]
        assert len(await texts(bot, channel_key)) == 3  # nothing happens before the click
        by_bob = await fake_discord.click_button(asked, fake_discord.buttons(asked)[0]["custom_id"], bob["id"])
        await fake_discord.wait_for(lambda f: by_bob["responses"])
        assert len(await texts(bot, channel_key)) == 3
        click = await fake_discord.click_button(asked, fake_discord.buttons(asked)[0]["custom_id"], alice["id"])
        await fake_discord.wait_for(lambda f: len(click["responses"]) >= 2)
        answer = fake_discord.messages[asked["original_message_id"]]["content"]

        assert await texts(bot, channel_key) == ["bob likes pelicans too"]
        assert await hits(bot, channel_key, "flamingo diary") == (0, 0)
        assert await texts(bot, f"dm:{alice['id']}") == []
        assert await hits(bot, f"dm:{alice['id']}", "heron") == (0, 0)
    # her DM (message + reply), her 2 channel messages, the diary's passages
    assert answer.startswith("Done. Erased 4 messages, ") and "DM memory" in answer


async def test_exporting_a_channels_memory_needs_manage_channels_and_search_hides_notes_from_members(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, admin = world["general"], world["alice"], world["admin"]
    async with running(settings, fake_discord) as bot:
        assert (
            await outcome_of(bot, "chatter", lambda: fake_discord.send_message(general["id"], alice["id"], "chatter"))
            == "recorded"
        )
        refused = await fake_discord.send_slash(general["id"], alice["id"], "memory", "export")
        (r,) = await fake_discord.wait_for(lambda f: refused["responses"])
        assert "Manage Channels" in r["data"]["content"] and not r["data"].get("attachments")
        allowed = await fake_discord.send_slash(general["id"], admin["id"], "memory", "export")
        await fake_discord.wait_for(lambda f: len(allowed["responses"]) >= 2)
        assert fake_discord.messages[allowed["original_message_id"]]["attachments"]

        # search: a member sees the channel's messages, not the agent's notes (which may be about others)
        await bot.engine.archive.insert(await bot.engine.agent(f"channel:{general['id']}"), "chatter note about bob")
        for user, sees_notes in ((alice, False), (admin, True)):
            searched = await fake_discord.send_slash(general["id"], user["id"], "memory", "search", {"query": "chatter"})
            await fake_discord.wait_for(lambda f, asked=searched: len(asked["responses"]) >= 2)
            shown = fake_discord.messages[searched["original_message_id"]]["content"]
            assert "chatter" in shown.split("**Archival")[0]
            assert ("note about bob" in shown) is sees_notes


async def test_cli_forget_user_and_purge_guild(tmp_path: Path, fake: FakeOpenAI) -> None:
    env = base_env(tmp_path, fake)
    settings = EngineSettings(_env_file=None, database_path=tmp_path / "cli.db", llm_base_url=fake.url, llm_model="m")  # type: ignore[call-arg]

    def said(text: str, author_id: str) -> recall.Message:
        return recall.Message(role="user", content=text, author="x", author_id=author_id, external_id=text)

    engine = await Engine.open(settings)
    await engine.record("dm:111", said("dm words", "111"))
    await engine.record("channel:5", said("from 111", "111"))
    await engine.record("channel:5", said("from 222", "222"))
    await engine.record("channel:6", said("kept", "222"))
    await engine.memory.set_option("channel:5", "guild", "900")
    await engine.close()

    code, out, err = await run_cli("forget-user", "111", env=env)
    assert code == 0, err
    assert "2 messages" in out and "DM agent" in out
    code, out, err = await run_cli("purge", "--guild", "900", env=env)
    assert code == 0, err
    assert "1 channel agents, 1 messages" in out
    code, _, err = await run_cli("purge", "--guild", "nine hundred", env=env)
    assert code != 0 and "not a Discord id" in err and "Traceback" not in err

    engine = await Engine.open(settings)
    try:
        left = await engine.db.fetchall(
            "SELECT a.key, m.content FROM messages m JOIN agents a ON a.id = m.agent_id ORDER BY m.id"
        )
        assert [tuple(r) for r in left] == [("channel:6", "kept")]
        plan = await engine.db.fetchall("EXPLAIN QUERY PLAN SELECT id FROM messages WHERE external_id IN ('1', '2')")
        assert "messages_external" in str([tuple(r) for r in plan])
    finally:
        await engine.close()


def person_model(body: dict[str, Any]) -> dict[str, Any]:
    """NOTE <label>|<text> appends to a block, FIX <label> rewrites "Alice keeps"; tool results are sent back as the answer."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return call("send_message", {"message": "result: " + last["content"]})
    text = last_user_text(body)
    if "NOTE " in text:
        label, content = text.split("NOTE ", 1)[1].split("|", 1)
        return call("core_memory_append", {"label": label.strip(), "content": content})
    if "FIX " in text:
        label = text.split("FIX ", 1)[1].strip()
        return call("core_memory_replace", {"label": label, "old_content": "Alice keeps", "new_content": "Alice kept"})
    return reply("ok")


async def test_person_blocks_stay_in_their_channel_and_only_their_person_sees_them(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, bob, admin, guild = world["general"], world["alice"], world["bob"], world["admin"], world["guild"]
    other = fake_discord.add_text_channel(guild["id"], "other")
    dm = fake_discord.dm_channel(alice["id"])
    me = f"<@{fake_discord.bot_user_id}>"
    fake.default = person_model

    def last_system() -> str:
        return str(chat_requests(fake)[-1]["messages"][0]["content"])

    async def answer(channel: dict[str, Any]) -> str:
        return str(fake_discord.bot_messages(channel["id"])[-1]["content"])

    async def view(user: dict[str, Any]) -> str:
        asked = await fake_discord.send_slash(general["id"], user["id"], "memory", "view")
        await fake_discord.wait_for(lambda f: len(asked["responses"]) >= 2)
        return str(fake_discord.messages[asked["original_message_id"]]["content"])

    async with running(settings, fake_discord) as bot:
        thread = fake_discord.add_thread(general["id"], "plans", owner_id=alice["id"])
        await fake_discord.wait_for(lambda f: bot.get_channel(int(thread["id"])) is not None)
        await post(bot, fake_discord, general, alice, f"{me} NOTE person:alice|Alice keeps honeybees.")
        assert f"Appended to 'person:{alice['id']}'" in await answer(general)
        await post(bot, fake_discord, general, bob, f"{me} hi")
        assert f'<person id="{alice["id"]}" name="alice"' in last_system() and "Alice keeps honeybees." in last_system()

        # the same person elsewhere: another channel, a thread of the same channel, her DM
        await post(bot, fake_discord, thread, alice, f"{me} hello from the thread")
        assert "honeybees" not in str(chat_requests(fake)[-1]) and "person:<id>" in last_system()
        await post(bot, fake_discord, other, alice, f"{me} FIX person:{alice['id']}")
        assert "does not occur" in await answer(other)
        await post(bot, fake_discord, dm, alice, "NOTE person:alice|Alice's DM secret.")
        assert "channels only" in await answer(dm)
        assert "honeybees" not in str(chat_requests(fake)[-2:])
        for key in (f"channel:{other['id']}", f"channel:{thread['id']}", f"dm:{alice['id']}"):
            assert "honeybees" not in json.dumps(await bot.engine.memory.export(key))
            assert await hits(bot, key, "honeybees") == (0, 0)

        # a member sees their own block, not others'; clearing someone else's needs Manage Channels
        assert "honeybees" in await view(alice)
        assert "honeybees" not in await view(bob)
        refused = await fake_discord.send_slash(general["id"], bob["id"], "memory", "clear-person", {"person": alice["id"]})
        (r,) = await fake_discord.wait_for(lambda f: refused["responses"])
        assert "Manage Channels" in r["data"]["content"]
        assert "honeybees" in await view(alice)
        cleared = await fake_discord.send_slash(general["id"], alice["id"], "memory", "clear-person")
        await fake_discord.wait_for(lambda f: len(cleared["responses"]) >= 2)
        assert "honeybees" not in await view(alice)

        # "forget me" takes her blocks in every channel
        await post(bot, fake_discord, general, alice, f"{me} NOTE person:{alice['id']}|Alice keeps wasps.")
        await post(bot, fake_discord, other, admin, f"{me} NOTE person:alice|Alice keeps wasps too.")
        erased = await bot.engine.memory.forget_person(str(alice["id"]))
        assert erased.person_blocks == 2
        assert await bot.engine.memory.person_block(f"channel:{general['id']}", str(alice["id"])) == ""


def test_person_blocks_in_the_prompt_most_recent_first_within_their_budget() -> None:
    blocks = [people.Person(str(i), f"p{i}", f"fact {i} " * 30, 600) for i in range(6)]
    shown = people.render(blocks, budget=300)
    assert shown.startswith(people.HEADER)
    assert shown.index('id="0"') < shown.index('id="1"')  # in the order given: most recent speakers first
    assert 'id="5"' not in shown and "person:5" in shown.splitlines()[-1]  # named, for the model to read
    assert tokens.count(shown) < 300 + tokens.count(shown.splitlines()[-1]) + tokens.count(people.HEADER)


async def test_messages_sent_while_down_are_caught_up_on_start_once(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, bob, guild = world["general"], world["alice"], world["bob"], world["guild"]
    unseen = fake_discord.add_text_channel(guild["id"], "unseen")
    dm = fake_discord.dm_channel(alice["id"])
    me = f"<@{fake_discord.bot_user_id}>"
    fake.default = lambda body: reply("answer to: " + last_user_text(body).rsplit(": ", 1)[-1])
    async with running(settings, fake_discord) as bot:
        await post(bot, fake_discord, dm, alice, "hello")
        await post(bot, fake_discord, general, bob, "first chatter")
    # while the bot is down
    fake_discord.post_offline(dm["id"], alice["id"], "are you there?")
    fake_discord.post_offline(general["id"], bob["id"], "chatter while down")
    fake_discord.post_offline(general["id"], alice["id"], f"{me} what did bob say?")
    fake_discord.post_offline(unseen["id"], alice["id"], f"{me} nobody stored anything here")

    async def no_wait(*args: Any, **kwargs: Any) -> None:
        return None

    async with running(settings, fake_discord) as bot:
        await fake_discord.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 2 and len(f.bot_messages(general["id"])) == 1)
        late_dm = fake_discord.bot_messages(dm["id"])[-1]["content"]
        assert late_dm.startswith("*(late") and late_dm.endswith("answer to: are you there?")
        assert fake_discord.bot_messages(general["id"])[0]["content"].endswith("what did bob say?")
        assert fake_discord.bot_messages(unseen["id"]) == []
        channel_texts = await texts(bot, f"channel:{general['id']}")
        assert channel_texts[:2] == ["first chatter", "chatter while down"] and len(channel_texts) == 3

        # the gateway bringing a message catch-up already took (a replay) is not answered again
        replayed = next(m for m in fake_discord.messages.values() if m["content"] == "are you there?")
        await fake_discord.dispatch("MESSAGE_CREATE", FakeDiscord._wire(replayed))
        await post(bot, fake_discord, dm, alice, "and now?")
        answers = [m["content"] for m in fake_discord.bot_messages(dm["id"])]
        assert len(answers) == 3 and answers[-1] == "answer to: and now?"

        # a session that could not resume reads history again: nothing is taken twice
        bot.before_identify_hook = no_wait  # type: ignore[method-assign]
        again = bot.wait_for("caught_up", timeout=10)
        await fake_discord.disconnect_client(resume=False)
        assert await again == 0
        assert len(await texts(bot, f"channel:{general['id']}")) == 3
        assert len(await texts(bot, f"dm:{alice['id']}")) == 3
    assert len(fake_discord.bot_messages(dm["id"])) == 3 and len(fake_discord.bot_messages(general["id"])) == 1


async def test_confirmation_buttons_work_after_a_restart_once_and_expire(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, admin = world["general"], world["alice"], world["admin"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.default = lambda body: reply("ok")

    def shown(asked: dict[str, Any]) -> str:
        return str(fake_discord.messages[asked["original_message_id"]]["content"])

    async with running(settings, fake_discord) as bot:
        await post(bot, fake_discord, dm, alice, "my DM secret is heron")
        await post(bot, fake_discord, general, alice, "chatter to keep")
        forget = await fake_discord.send_slash(dm["id"], alice["id"], "forget-me")
        reset = await fake_discord.send_slash(general["id"], admin["id"], "memory", "reset", {"scope": "conversation"})
        stale = await fake_discord.send_slash(general["id"], admin["id"], "memory", "reset", {"scope": "all"})
        await fake_discord.wait_for(lambda f: forget["responses"] and reset["responses"] and stale["responses"])
        assert "15 minutes" in shown(forget)

    async with running(settings, fake_discord) as bot:  # a new process: the buttons still answer
        # the stale request's time ran out (its stored expiry, as a clock would see it later)
        await bot.engine.db.execute(
            "UPDATE confirmations SET expires_at = '2000-01-01T00:00:00Z' WHERE action = 'reset' AND args LIKE '%\"all\"%'"
        )
        click = await fake_discord.click_button(stale, fake_discord.buttons(stale)[0]["custom_id"], admin["id"])
        await fake_discord.wait_for(lambda f: click["responses"])
        assert "expired" in shown(stale)
        assert await texts(bot, f"channel:{general['id']}") == ["chatter to keep"]

        # two clicks before the buttons are gone: one erases, the other is told it was answered
        button = fake_discord.buttons(forget)[0]["custom_id"]
        first, second = await asyncio.gather(
            fake_discord.click_button(forget, button, alice["id"]), fake_discord.click_button(forget, button, alice["id"])
        )
        await fake_discord.wait_for(lambda f: first["responses"] and second["responses"] and "Done" in shown(forget))
        answers = [str(r.get("data", {}).get("content")) for r in first["responses"] + second["responses"]]
        assert sum("already answered" in a for a in answers) == 1
        assert shown(forget).startswith("Done. Erased 3 messages")
        assert await texts(bot, f"dm:{alice['id']}") == [] and await texts(bot, f"channel:{general['id']}") == []

        click = await fake_discord.click_button(reset, fake_discord.buttons(reset)[0]["custom_id"], admin["id"])
        await fake_discord.wait_for(lambda f: len(click["responses"]) >= 2)
        assert "erased" in shown(reset)


async def test_person_blocks_go_with_a_channel_export_and_come_back_on_import(tmp_path: Path, fake: FakeOpenAI) -> None:
    settings = EngineSettings(_env_file=None, database_path=tmp_path / "e.db", llm_base_url=fake.url, llm_model="m")  # type: ignore[call-arg]
    engine = await Engine.open(settings)
    try:
        agent = await engine.agent("channel:7")
        assert (await people.append(engine.db, agent, "person:42", "Sam bakes bread.")).ok
        data = await engine.memory.export("channel:7")
        assert data["people"] == [{"user_id": "42", "value": "Sam bakes bread.", "limit": settings.person_limit}]
        await engine.memory.import_data(data, "channel:8")
        assert await engine.memory.person_block("channel:8", "42") == "Sam bakes bread."
        data["people"][0]["user_id"] = "not an id"
        with pytest.raises(ValueError, match="not a Discord id"):
            await engine.memory.import_data(data, "channel:9")
        assert await engine.memory.person_block("channel:9", "42") == ""
    finally:
        await engine.close()


async def test_catch_up_does_not_read_back_what_forget_me_erased(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, bob = world["general"], world["alice"], world["bob"]
    key = f"channel:{general['id']}"
    async with running(settings, fake_discord) as bot:
        await post(bot, fake_discord, general, bob, "bob was here")
        await post(bot, fake_discord, general, alice, "alice was here")
        await bot.engine.memory.forget_person(str(alice["id"]))
        assert await texts(bot, key) == ["bob was here"]
    fake_discord.post_offline(general["id"], bob["id"], "bob again while down")
    async with running(settings, fake_discord) as bot:
        # caught up once bob's message is back (catch-up goes oldest first: alice's would come before it)
        stored = await eventually(lambda: _count_at_least(bot, key, 2))
        assert stored == ["bob was here", "bob again while down"]


async def _count_at_least(bot: MnemoBot, key: str, n: int) -> list[str] | None:
    found = await texts(bot, key)
    return found if len(found) >= n else None


async def test_the_model_reads_a_person_block_not_shown_by_appending_nothing(tmp_path: Path, fake: FakeOpenAI) -> None:
    settings = EngineSettings(_env_file=None, database_path=tmp_path / "e.db", llm_base_url=fake.url, llm_model="m")  # type: ignore[call-arg]
    engine = await Engine.open(settings)
    try:
        agent = await engine.agent("channel:7")
        await people.append(engine.db, agent, "person:42", "Sam bakes bread.")
        read = await tools.execute(
            engine.db, engine.archive, agent, "core_memory_append", '{"label": "person:42", "content": ""}'
        )
        assert read.status is tools.Status.REFUSED  # not an edit: consolidation does not log it as one
        assert read.text.endswith("person:42 holds (16/600 characters):\nSam bakes bread.")
        unknown = await tools.execute(
            engine.db, engine.archive, agent, "core_memory_append", '{"label": "person:Nobody", "content": "x"}'
        )
        assert "nobody named 'Nobody'" in unknown.text
    finally:
        await engine.close()


async def test_a_message_deleted_while_its_attachment_is_read_leaves_nothing(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    key = f"dm:{alice['id']}"
    fake.default = lambda body: reply("ok")
    gate = fake_discord.cdn_gate = asyncio.Event()
    async with running(settings, fake_discord) as bot:
        handled = bot.wait_for("message_handled", check=lambda m, _: m.content == "my diary", timeout=5)
        doc = b"Dear diary, the pelican stole my sandwich. " * 30
        sent = await fake_discord.send_message(dm["id"], alice["id"], "my diary", attachments=[("diary.txt", doc, "text/plain")])
        await fake_discord.wait_for(lambda f: f.cdn_waiting == 1)
        await followed(bot, fake_discord, "MESSAGE_DELETE", {"id": sent["id"], "channel_id": dm["id"]})
        gate.set()
        _, outcome = await handled
        assert outcome == "deleted"
        assert await texts(bot, key) == []
        assert await bot.engine.archive.count(await bot.engine.agent(key)) == 0


async def test_messages_deleted_or_edited_while_they_wait_their_turn_are_stored_as_they_are_then(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    general, alice, bob = world["general"], world["alice"], world["bob"]
    key = f"channel:{general['id']}"
    fake.default = lambda body: reply("ok")
    gate = fake_discord.cdn_gate = asyncio.Event()
    async with running(settings, fake_discord) as bot:
        outcomes: dict[str, str] = {}

        def seen(message: Any, outcome: str) -> bool:
            outcomes[message.content] = outcome
            return len(outcomes) == 3

        all_handled = bot.wait_for("message_handled", check=seen, timeout=10)
        doc = ("diary.txt", b"A page of the diary. " * 30, "text/plain")
        await fake_discord.send_message(general["id"], alice["id"], f"<@{fake_discord.bot_user_id}> read this", attachments=[doc])
        await fake_discord.wait_for(lambda f: f.cdn_waiting == 1)  # the first message holds the conversation
        secret = await fake_discord.send_message(general["id"], bob["id"], "my secret plans")
        typo = await fake_discord.send_message(general["id"], bob["id"], "teh typo")
        await followed(bot, fake_discord, "MESSAGE_DELETE", {"id": secret["id"], "channel_id": general["id"]})
        await followed(bot, fake_discord, "MESSAGE_UPDATE", {**FakeDiscord._wire(typo), "content": "the typo"})
        gate.set()
        await all_handled
        assert outcomes["my secret plans"] == "deleted"
        stored = await texts(bot, key)
        assert "the typo" in stored and not any("secret" in t or "teh" in t for t in stored)
