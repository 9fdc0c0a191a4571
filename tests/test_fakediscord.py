"""Smoke tests of the fake Discord server, driven by a plain discord.py Client (not our bot)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import discord
import pytest
import pytest_asyncio
import yarl
from discord import app_commands

from tests.fakediscord import EPHEMERAL, FakeDiscord

pytestmark = pytest.mark.asyncio  # explicit, so the file also runs without asyncio_mode=auto


@pytest_asyncio.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        # monkeypatch restores both class attributes after the test.
        monkeypatch.setattr(discord.http.Route, "BASE", server.rest_base)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(server.gateway_url))
        yield server


def make_client() -> discord.Client:
    intents = discord.Intents.default()
    intents.message_content = True
    return discord.Client(intents=intents, guild_ready_timeout=0.05)


@contextlib.asynccontextmanager
async def running(client: discord.Client, fake: FakeDiscord) -> AsyncIterator[discord.Client]:
    """Run ``client`` against the fake until the block ends; fail fast if start() dies."""
    ready_before = fake.ready_count
    task = asyncio.create_task(client.start("fake-token"))
    try:
        waiter = asyncio.create_task(fake.wait_ready(count=ready_before + 1))
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            waiter.cancel()
            task.result()  # re-raise why the client stopped
            raise AssertionError("client stopped before READY")
        waiter.result()
        await asyncio.wait_for(client.wait_until_ready(), 5)
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)


class Ping(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=None)
        self.clicked_by: list[int] = []

    @discord.ui.button(label="OK", custom_id="ping:ok")
    async def ok(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.clicked_by.append(interaction.user.id)
        await interaction.response.edit_message(content="clicked", view=None)


async def test_smoke_dm_guild_slash_button_attachment(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    alice = fake.add_user("alice")
    bob = fake.add_user("bob")
    guild = fake.add_guild("Guild", owner_id=alice["id"])
    general = fake.add_text_channel(guild["id"], "general")
    fake.add_member(guild["id"], bob["id"], permissions=1 << 13)  # MANAGE_MESSAGES via a role
    dm = fake.dm_channel(alice["id"])

    client = make_client()
    tree = app_commands.CommandTree(client)
    seen: list[discord.Message] = []
    views: list[Ping] = []

    memo = app_commands.Group(name="memo", description="memos")

    @memo.command(name="add", description="add a memo")
    async def memo_add(interaction: discord.Interaction, text: str) -> None:
        await interaction.response.send_message(f"noted {text}", ephemeral=True)

    tree.add_command(memo)

    @tree.command(name="ping", description="ping with a button")
    async def ping(interaction: discord.Interaction) -> None:
        view = Ping()
        views.append(view)
        await interaction.response.send_message("pong", view=view)

    async def setup_hook() -> None:
        await tree.sync()

    client.setup_hook = setup_hook  # type: ignore[method-assign]

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author == client.user:
            return  # the fake echoes the bot's own messages, as Discord does
        seen.append(message)
        none = discord.AllowedMentions.none()
        if message.attachments:
            data = await message.attachments[0].read()
            await message.channel.send(
                f"got {len(data)} bytes", file=discord.File(__import__("io").BytesIO(data[::-1]), "reversed.txt")
            )
        elif message.guild is None:
            async with message.channel.typing():
                await message.channel.send(f"echo: {message.content}", allowed_mentions=none)
        elif client.user in message.mentions:
            await message.reply(f"hi <@{alice['id']}>", allowed_mentions=none)

    async with running(client, fake):
        assert [c["name"] for c in fake.registered_commands] == ["memo", "ping"]
        assert client.get_guild(int(guild["id"])).get_member(int(bob["id"])) is None  # no members intent

        # --- a DM, answered with allowed_mentions none (and typing first)
        await fake.send_dm(alice["id"], "hello")
        reply = await fake.wait_for(lambda f: f.bot_messages(dm["id"]))
        assert reply[0]["content"] == "echo: hello"
        assert reply[0]["allowed_mentions"] == {"parse": []}
        assert [t["channel_id"] for t in fake.typing] == [dm["id"]]

        # --- a guild message mentioning the bot; the reply mentions alice but must not ping her
        msg = await fake.send_message(general["id"], bob["id"], f"<@{fake.bot_user_id}> hi there")
        (reply,) = await fake.wait_for(lambda f: f.bot_messages(general["id"]))
        assert seen[-1].guild is not None and client.user in seen[-1].mentions
        assert seen[-1].author.guild_permissions.manage_messages
        assert reply["content"] == f"hi <@{alice['id']}>"
        assert reply["message_reference"]["message_id"] == msg["id"]
        assert reply["allowed_mentions"] == {"parse": []}
        assert reply["mentions"] == []  # nobody pinged

        # --- slash command with a subcommand, ephemeral answer
        interaction = await fake.send_slash(general["id"], bob["id"], "memo", "add", {"text": "milk"})
        (response,) = await fake.wait_for(lambda f: interaction["responses"])
        assert response["type"] == 4 and response["flags"] & EPHEMERAL and response["ephemeral"]
        assert response["data"]["content"] == "noted milk"

        # --- a view with a button in an interaction response; the click comes back to the view
        interaction = await fake.send_slash(dm["id"], alice["id"], "ping")
        await fake.wait_for(lambda f: interaction["responses"])
        assert [b["custom_id"] for b in fake.buttons(interaction)] == ["ping:ok"]
        click = await fake.click_button(interaction, "ping:ok", alice["id"])
        (update,) = await fake.wait_for(lambda f: click["responses"])
        assert update["type"] == 7 and views[0].clicked_by == [int(alice["id"])]
        assert fake.messages[interaction["original_message_id"]]["content"] == "clicked"
        assert fake.buttons(interaction) == []

        # --- an attachment the bot downloads, and a file it uploads
        await fake.send_dm(alice["id"], "", attachments=[("note.txt", b"abc", "text/plain")])
        reply = await fake.wait_for(lambda f: [m for m in f.bot_messages(dm["id"]) if m["files"]])
        assert reply[0]["content"] == "got 3 bytes"
        assert reply[0]["files"] == [{"filename": "reversed.txt", "data": b"cba", "content_type": "text/plain"}]

    assert [s.content for s in seen] == ["hello", f"<@{fake.bot_user_id}> hi there", ""]
    assert not fake.unknown_requests and not fake.errors and not fake.rejected_requests


async def test_defer_followup_and_discord_rules(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    alice = fake.add_user("alice")
    guild = fake.add_guild("Guild", owner_id=alice["id"])
    general = fake.add_text_channel(guild["id"], "general")
    intents = discord.Intents.default()  # no message_content intent
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)
    tree = app_commands.CommandTree(client)
    seen: list[str] = []
    errors: list[int] = []

    @tree.command(name="slow", description="defers", guild=discord.Object(int(guild["id"])))
    async def slow(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send("done")
        await interaction.edit_original_response(content="done!")
        try:
            await interaction.followup.send("x" * 2001)
        except discord.HTTPException as exc:
            errors.append(exc.code)

    async def setup_hook() -> None:
        await tree.sync(guild=discord.Object(int(guild["id"])))

    client.setup_hook = setup_hook  # type: ignore[method-assign]

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author != client.user:
            seen.append(message.content)

    async with running(client, fake):
        assert fake.guild_commands[guild["id"]][0]["name"] == "slow"
        interaction = await fake.send_slash(general["id"], alice["id"], "slow")
        await fake.wait_for(lambda f: errors)
        kinds = [r["kind"] for r in interaction["responses"]]
        assert kinds == ["callback", "followup", "edit_original"]
        assert interaction["responses"][0]["type"] == 5
        (original,) = fake.bot_messages(general["id"])
        assert original["id"] == interaction["original_message_id"]  # first followup became the original
        assert original["ephemeral"] and original["content"] == "done!"
        assert errors == [50035] and fake.rejected_requests[-1]["code"] == 50035

        # Without the message_content intent, guild messages arrive blank unless they mention the bot.
        await fake.send_message(general["id"], alice["id"], "secret")
        await fake.send_message(general["id"], alice["id"], f"<@{fake.bot_user_id}> visible")
        await fake.wait_for(lambda f: len(seen) == 2)
        assert seen == ["", f"<@{fake.bot_user_id}> visible"]


async def test_restart_and_reconnect_keep_state(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    alice = fake.add_user("alice")
    dm = fake.dm_channel(alice["id"])
    received: list[str] = []

    def client_with_echo() -> discord.Client:
        client = make_client()

        async def no_identify_delay(shard_id: int | None, *, initial: bool = False) -> None:
            pass  # discord.py sleeps 5 s before re-IDENTIFYing

        client.before_identify_hook = no_identify_delay  # type: ignore[method-assign]

        @client.event
        async def on_message(message: discord.Message) -> None:
            if message.author != client.user:
                received.append(message.content)
                await message.channel.send(f"ack {message.content}")

        return client

    async with running(client_with_echo(), fake):
        await fake.send_dm(alice["id"], "one")
        await fake.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 1)

        await fake.disconnect_client()  # dropped connection: discord.py RESUMEs
        await fake.wait_for(lambda f: f.resume_count == 1 and f.connected)
        await fake.send_dm(alice["id"], "two")
        await fake.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 2)

        await fake.disconnect_client(resume=False)  # session invalidated: fresh IDENTIFY + READY
        await fake.wait_ready(count=2)

    # A new client process against the same fake: the world and history are still there.
    guild = fake.add_guild("Later", owner_id=alice["id"])
    async with running(client_with_echo(), fake) as client:
        assert fake.ready_count == 3
        assert client.get_guild(int(guild["id"])) is not None
        await fake.send_dm(alice["id"], "three")
        await fake.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 3)

    assert received == ["one", "two", "three"]
    assert [m["content"] for m in fake.bot_messages(dm["id"])] == ["ack one", "ack two", "ack three"]
    assert not fake.unknown_requests and not fake.errors


async def test_threads_components_edits_and_live_world_changes(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    alice = fake.add_user("alice")
    guild = fake.add_guild("Guild", owner_id=alice["id"])
    general = fake.add_text_channel(guild["id"], "general")
    thread = fake.add_thread(general["id"], "notes", owner_id=alice["id"])
    intents = discord.Intents.default()
    intents.message_content = True
    intents.members = True
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)
    tree = app_commands.CommandTree(client)
    events: list[str] = []
    history: list[list[str]] = []

    class Menu(discord.ui.View):
        @discord.ui.select(custom_id="menu:pick", options=[discord.SelectOption(label=x) for x in "ab"])
        async def pick(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
            await interaction.response.defer()  # type 6: deferred update
            await interaction.edit_original_response(content=f"picked {select.values[0]}", view=None)

    @tree.command(name="who", description="user + file options")
    async def who(interaction: discord.Interaction, user: discord.Member, file: discord.Attachment) -> None:
        data = await file.read()
        await interaction.response.send_message(f"{user.name} {data.decode()}")

    async def setup_hook() -> None:
        await tree.sync()

    client.setup_hook = setup_hook  # type: ignore[method-assign]

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author == client.user:
            return
        events.append(f"{type(message.channel).__name__}:{message.webhook_id is not None}:{message.content}")
        if message.content == "menu":
            sent = await message.channel.send("choose", view=Menu())
            await sent.add_reaction("👍")
            # (asserts inside handlers are swallowed by discord.py: record, assert in the test)
            history.append([m.content async for m in message.channel.history(limit=5)])
            await sent.edit(content="choose one")
        elif message.content == "bye":
            gone = await message.channel.send("temporary")
            await gone.delete()

    @client.event
    async def on_member_join(member: discord.Member) -> None:
        events.append(f"join:{member.name}")

    @client.event
    async def on_guild_channel_create(channel: discord.abc.GuildChannel) -> None:
        events.append(f"channel:{channel.name}")

    async with running(client, fake):
        g = client.get_guild(int(guild["id"]))
        assert g is not None and g.get_thread(int(thread["id"])) is not None
        assert g.get_member(int(alice["id"])) is not None  # members intent: cached from GUILD_CREATE

        # a thread message and a webhook message
        await fake.send_message(thread["id"], alice["id"], "in thread")
        await fake.send_message(general["id"], alice["id"], "from hook", webhook=True)

        # components on a normal channel message; select + deferred update + @original edit
        await fake.send_message(general["id"], alice["id"], "menu")
        (menu,) = await fake.wait_for(lambda f: [m for m in f.bot_messages(general["id"]) if m["edits"]])
        assert history == [["choose", "menu", "from hook"]]  # newest first, like Discord
        assert fake.reactions == [{"channel_id": general["id"], "message_id": menu["id"], "emoji": "👍", "action": "add"}]
        pick = await fake.select_option(menu, "menu:pick", alice["id"], ["b"])
        await fake.wait_for(lambda f: len(pick["responses"]) == 2)
        assert [r["kind"] for r in pick["responses"]] == ["callback", "edit_original"]
        assert menu["content"] == "picked b" and fake.buttons(menu) == []

        await fake.send_message(general["id"], alice["id"], "bye")
        await fake.wait_for(lambda f: any(m["deleted"] for m in f.sent_messages))

        # user + attachment options
        bob = fake.add_user("bob")
        fake.add_member(guild["id"], bob["id"])  # live: GUILD_MEMBER_ADD
        interaction = await fake.send_slash(
            general["id"], alice["id"], "who", options={"user": bob["id"], "file": ("a.txt", b"hi", "text/plain")}
        )
        (response,) = await fake.wait_for(lambda f: interaction["responses"])
        assert response["data"]["content"] == "bob hi"

        fake.add_text_channel(guild["id"], "later")  # live: CHANNEL_CREATE
        await fake.wait_for(lambda f: "channel:later" in events)

    assert events[:4] == [
        "Thread:False:in thread",
        "TextChannel:True:from hook",
        "TextChannel:False:menu",
        "TextChannel:False:bye",
    ]
    assert "join:bob" in events
    assert not fake.unknown_requests and not fake.errors and not fake.rejected_requests
