"""Images: shown to the model once, in the turn they arrive, and remembered as text."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import BotSettings
from memory import images, recall
from memory.engine import Engine
from tests.fakediscord import FakeDiscord
from tests.fakeopenai import IMAGE_REFUSALS, Error, FakeOpenAI, call, image_parts, image_refusal, reply
from tests.test_agent_loop import make_settings
from tests.test_bot import chat_requests, fake_discord, running, settings, world  # noqa: F401  (fixtures)
from tests.test_intake import occupy_turn_slots

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
WEBP = b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00/\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88\xfe\x07\x00"


def png(width: int = 1, height: int = 1, *, padding: int = 0) -> bytes:
    """A real PNG; `padding` bytes of an ancillary chunk make it as large as a test needs."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xc0\x30\x30" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    extra = chunk(b"tEXt", b"pad\x00" + b"x" * padding) if padding else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user_texts(request: dict[str, Any]) -> list[str]:
    """The text of each user message of a request, image parts left out."""
    out = []
    for m in request["messages"]:
        if m["role"] == "user":
            content = m["content"]
            out.append(content if isinstance(content, str) else "".join(p.get("text", "") for p in content))
    return out


# --- through Discord: the real discord.py against the fake Discord ---


async def test_dm_image_reaches_the_model_once_and_recall_keeps_its_stand_in(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    photo = png(3, 2)
    fake.push(
        call("core_memory_append", {"label": "human", "content": "Has a red boat."}),
        call("send_message", {"message": "What a red boat!"}),
        call("conversation_search", {"query": "boat.png"}),
        reply("You sent me boat.png."),
    )
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_dm(alice["id"], "look at my boat", attachments=[("boat.png", photo, "image/png")])
        await fake_discord.wait_for(lambda f: any(m["content"] == "What a red boat!" for m in f.bot_messages(dm["id"])))
        await fake_discord.send_dm(alice["id"], "what did I send you?")
        await fake_discord.wait_for(lambda f: any(m["content"] == "You sent me boat.png." for m in f.bot_messages(dm["id"])))
        exported = await bot.engine.memory.export(f"dm:{alice['id']}")
    first, second_step, next_turn, after_search = chat_requests(fake)
    stand_in = f"[image `boat.png`, PNG, {len(photo)} bytes]"
    # the first request of its turn: the bytes, as a part of that very user message
    assert image_parts(first) == [data_url("image/png", photo)]
    assert first["messages"][-1]["content"][0]["text"].endswith(f"look at my boat\n> {stand_in}")
    # later steps of that turn and later turns: the stand-in only
    assert image_parts(second_step) == image_parts(next_turn) == image_parts(after_search) == []
    assert any(text.endswith(stand_in) for text in user_texts(next_turn))
    found = [m for m in after_search["messages"] if m["role"] == "tool"][-1]["content"]
    assert "look at my boat" in found and stand_in in found  # conversation_search knows it was there
    assert len(fake_discord.cdn_served) == 1
    # the export carries the stand-in, never the bytes
    dumped = json.dumps(exported)
    assert stand_in in dumped and base64.b64encode(photo).decode() not in dumped


async def test_oversized_mistyped_and_surplus_images_get_one_short_note(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    settings = settings.model_copy(update={"max_image_bytes": 2000, "max_images_per_message": 2})
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    fake.default = lambda body: reply("seen")
    sent = [
        ("big.png", png(padding=3000), "image/png"),  # refused by its announced size: never downloaded
        ("fake.png", b"just some text, not a picture", "image/png"),  # its bytes are not an image
        ("pic.heic", b"\x00\x00\x00\x18ftypheic", "image/heic"),  # a kind models do not take: never downloaded
        ("real.jpg", png(), "image/jpeg"),  # a PNG named .jpg: the bytes decide
        ("small.gif", GIF, "image/gif"),
        ("third.webp", WEBP, "image/webp"),  # over the count: never downloaded
    ]
    async with running(settings, fake_discord):
        message = await fake_discord.send_dm(alice["id"], "my pictures", attachments=sent)
        await fake_discord.wait_for(lambda f: any(m["content"] == "seen" for m in f.bot_messages(dm["id"])))
    (note,) = [m["content"] for m in fake_discord.bot_messages(dm["id"]) if m["content"] != "seen"]
    assert note.splitlines() == [
        "`big.png` is 3 KB; I look at images up to 2 KB.",
        "`fake.png` is not a PNG, JPEG, WebP or GIF image I can read.",
        "I can look at PNG, JPEG, WebP or GIF images; `pic.heic` is not one.",
        "I look at up to 2 images per message; I did not see `third.webp`.",
    ]
    ids = {a["filename"]: a["id"] for a in message["attachments"]}
    assert fake_discord.cdn_served == [ids["fake.png"], ids["real.jpg"], ids["small.gif"]]
    (request,) = chat_requests(fake)
    assert image_parts(request) == [data_url("image/png", sent[3][1]), data_url("image/gif", GIF)]
    text = user_texts(request)[-1]
    assert text.splitlines()[1:] == [
        "> [image `big.png`, PNG, 3 KB, not shown to you: larger than 2 KB]",
        "> [image `fake.png`, PNG, 29 bytes, not shown to you: its bytes are not a PNG, JPEG, WebP or GIF image]",
        "> [image `pic.heic`, image/heic, 12 bytes, not shown to you: not a PNG, JPEG, WebP or GIF image]",
        f"> [image `real.jpg`, PNG, {len(sent[3][1])} bytes]",
        f"> [image `small.gif`, GIF, {len(GIF)} bytes]",
        f"> [image `third.webp`, WebP, {len(WEBP)} bytes, not shown to you: over the limit of 2 images per message]",
    ]


async def test_a_model_without_vision_is_told_in_words_and_later_images_are_not_downloaded(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    alice = world["alice"]
    dm = fake_discord.dm_channel(alice["id"])
    refuse = image_refusal("openai")
    fake.default = lambda body: refuse(body) or reply("I can't see pictures, sorry.")
    async with running(settings, fake_discord) as bot:
        await fake_discord.send_dm(alice["id"], "what is this?", attachments=[("cat.png", png(), "image/png")])
        await fake_discord.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 1)
        assert bot.engine.model.no_vision and not bot.engine.sees_images
        await fake_discord.send_dm(alice["id"], "and this?", attachments=[("dog.png", png(2, 2), "image/png")])
        await fake_discord.wait_for(lambda f: len(f.bot_messages(dm["id"])) == 2)
    assert [m["content"] for m in fake_discord.bot_messages(dm["id"])] == ["I can't see pictures, sorry."] * 2
    refused, again, later = chat_requests(fake)
    assert len(image_parts(refused)) == 1 and image_parts(again) == image_parts(later) == []
    assert user_texts(again)[-1].endswith(images.CANNOT_SEE)
    assert (
        "`dog.png`, PNG, " in user_texts(later)[-1] and "not shown to you: this model cannot see images]" in user_texts(later)[-1]
    )
    assert len(fake_discord.cdn_served) == 1  # dog.png was never downloaded


async def test_an_image_in_a_channel_message_not_for_the_bot_is_kept_as_a_stand_in(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    bob, general = world["bob"], world["general"]
    async with running(settings, fake_discord) as bot:
        handled = bot.wait_for("message_handled", timeout=5)
        await fake_discord.send_message(general["id"], bob["id"], "", attachments=[("sunset.jpg", JPEG, "image/jpeg")])
        _, outcome = await handled
        agent = await bot.engine.agent(f"channel:{general['id']}")
        found = await recall.search_messages(bot.engine.db, agent, "sunset")
    assert outcome == "recorded" and fake_discord.cdn_served == []
    assert [h.text for h in found.hits] == [f"[image `sunset.jpg`, JPEG, {len(JPEG)} bytes, not shown to you]"]
    assert chat_requests(fake) == []


# --- the engine: one intake, turns, and what the model server answers ---


@contextlib.asynccontextmanager
async def engine_for(tmp_path: Path, fake: FakeOpenAI, **overrides: Any) -> AsyncIterator[Engine]:
    settings = make_settings(
        tmp_path, fake, database_path=tmp_path / "images.db", llm_max_retries=0, llm_retry_budget=5, **overrides
    )
    engine = await Engine.open(settings)
    try:
        yield engine
    finally:
        await engine.close()


def with_image(text: str, name: str, data: bytes) -> tuple[recall.Message, list[images.Image]]:
    """A message as the bot hands it over: its text with the stand-in, and the image beside it."""
    image = images.read(name, data, 10**7)
    return recall.Message(role="user", content=f"{text}\n{image.stand_in()}", author="ann", author_id="1001"), [image]


def parts_by_message(request: dict[str, Any]) -> dict[str, list[str]]:
    """Each user message's first text line's end → the data URLs of its image parts."""
    out = {}
    for m in request["messages"]:
        if m["role"] == "user" and isinstance(m["content"], list):
            text = m["content"][0]["text"].split("\n")[0].rsplit(": ", 1)[-1]
            out[text] = [p["image_url"]["url"] for p in m["content"][1:]]
    return out


async def test_messages_answered_together_each_carry_their_own_images(tmp_path: Path, fake: FakeOpenAI) -> None:
    first_turn, release = asyncio.Event(), asyncio.Event()

    async def answer(body: dict[str, Any]) -> dict[str, Any]:
        if user_texts(body)[-1].split("\n")[0].endswith("first"):
            first_turn.set()
            await release.wait()
        return reply("ok")

    fake.default = answer
    # large enough that learning the provider's count from it would push the token scale to its bound
    a, b, c = png(padding=40_000), png(2, 1, padding=40_000), png(1, 2, padding=40_000)
    async with engine_for(tmp_path, fake) as engine:
        first = asyncio.create_task(engine.send("dm:1", *with_image("first", "a.png", a)))
        await first_turn.wait()
        second = asyncio.create_task(engine.send("dm:1", *with_image("second", "b.png", b)))
        message, pictures = with_image("third", "c.png", c)
        third = asyncio.create_task(engine.send("dm:1", message, [*pictures, images.read("d.gif", GIF, 10**7)]))
        agent = await engine.agent("dm:1")
        while await recall.count(engine.db, agent) < 3:  # both stored while the first turn runs
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, second, third)
        assert engine.token_scale.factor == 1.0  # image tokens are not ours to estimate
        await engine.send("dm:1", recall.Message(role="user", content="fourth", author="ann", author_id="1001"))
    one, together, after = fake.chat_requests
    assert parts_by_message(one) == {"first": [data_url("image/png", a)]}
    assert parts_by_message(together) == {
        "second": [data_url("image/png", b)],
        "third": [data_url("image/png", c), data_url("image/gif", GIF)],
    }
    assert image_parts(after) == []


@pytest.mark.parametrize("server", sorted(IMAGE_REFUSALS))
async def test_each_servers_image_refusal_is_answered_in_words_and_remembered(
    tmp_path: Path, fake: FakeOpenAI, server: str
) -> None:
    refuse = image_refusal(server)
    fake.default = lambda body: refuse(body) or reply("answered")
    async with engine_for(tmp_path, fake) as engine:
        result = await engine.send("dm:1", *with_image("look", "a.png", png()))
        assert result.reply == "answered" and engine.model.no_vision
        result = await engine.send("dm:1", *with_image("and this", "b.png", png()))
        assert result.reply == "answered"
    refused, again, later = fake.chat_requests
    assert len(image_parts(refused)) == 1 and image_parts(again) == image_parts(later) == []
    assert user_texts(again)[-1].endswith(images.CANNOT_SEE) and user_texts(later)[-1].endswith(images.CANNOT_SEE)
    assert user_texts(later)[-2].endswith(f"[image `a.png`, PNG, {len(png())} bytes]")  # the stored stand-in, not the note


async def test_vision_on_keeps_sending_images_and_off_never_sends_them(tmp_path: Path, fake: FakeOpenAI) -> None:
    refuse = image_refusal("vllm")
    fake.default = lambda body: refuse(body) or reply("answered")
    async with engine_for(tmp_path / "on", fake, vision="on") as engine:
        for name in ("a.png", "b.png"):
            assert (await engine.send("dm:1", *with_image("look", name, png()))).reply == "answered"
        assert not engine.model.no_vision and engine.sees_images
    assert [len(image_parts(r)) for r in fake.chat_requests] == [1, 0, 1, 0]
    fake.requests.clear()
    async with engine_for(tmp_path / "off", fake, vision="off") as engine:
        assert not engine.sees_images
        assert (await engine.send("dm:1", *with_image("look", "a.png", png()))).reply == "answered"
    (request,) = fake.chat_requests
    assert image_parts(request) == [] and user_texts(request)[-1].endswith(images.CANNOT_SEE)


async def test_a_failed_turn_lets_its_images_go_and_the_next_turn_has_the_stand_in(tmp_path: Path, fake: FakeOpenAI) -> None:
    fake.push(Error(503, {"error": {"message": "overloaded"}}), reply("back"))
    async with engine_for(tmp_path, fake) as engine:
        failed = await engine.send("dm:1", *with_image("look", "a.png", png()))
        assert failed.outcome == "error"
        answered = await engine.send("dm:1", recall.Message(role="user", content="again?", author="ann", author_id="1001"))
        assert answered.reply == "back"
    tried, retried = fake.chat_requests
    assert len(image_parts(tried)) == 1 and image_parts(retried) == []
    assert any(text.endswith(f"[image `a.png`, PNG, {len(png())} bytes]") for text in user_texts(retried))


def test_the_type_is_read_from_the_bytes() -> None:
    for data, mime in ((png(), "image/png"), (JPEG, "image/jpeg"), (GIF, "image/gif"), (WEBP, "image/webp")):
        assert images.sniff(data) == mime
        assert images.read("renamed.png", data, 1000).mime == mime
    for wrong in (b"", b"\x89PNG", b"RIFF\x00\x00\x00\x00WAVE", b"<svg xmlns='http://www.w3.org/2000/svg'/>"):
        assert images.sniff(wrong) is None
        with pytest.raises(images.Refused):
            images.read("x.png", wrong, 1000)
    assert images.looks_like_image("photo", "image/heic") and images.looks_like_image("a.JPG", None)
    assert not images.looks_like_image("notes.txt", "text/plain")


async def test_an_image_sent_while_the_turn_waits_to_begin_goes_with_that_turn(tmp_path: Path, fake: FakeOpenAI) -> None:
    """The turn waits behind others (one call slot, TURNS_PER_CALL_SLOT turns): a message with an
    image that arrives meanwhile is admitted by that turn, and so are its images."""

    release = asyncio.Event()

    async def answer(body: dict[str, Any]) -> dict[str, Any]:
        if "others" in user_texts(body)[-1]:
            await release.wait()
        return reply("ok")

    fake.default = answer
    picture = png(padding=100)
    async with engine_for(tmp_path, fake, max_concurrent_llm_calls=1) as engine:
        others = await occupy_turn_slots(engine)  # every turn slot is taken
        text = asyncio.create_task(
            engine.send("dm:1", recall.Message(role="user", content="words", author="ann", author_id="1001"))
        )
        agent = await engine.agent("dm:1")
        while await recall.count(engine.db, agent) < 1:  # stored; its turn waits to begin
            await asyncio.sleep(0.01)
        with_picture = asyncio.create_task(engine.send("dm:1", *with_image("picture", "p.png", picture)))
        while await recall.count(engine.db, agent) < 2:
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*others, text, with_picture)
    (request,) = [r for r in fake.chat_requests if "picture" in "".join(user_texts(r))]
    assert parts_by_message(request) == {"picture": [data_url("image/png", picture)]}


async def test_a_refusal_of_too_many_images_is_answered_without_them_and_vision_stays_on(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    # vLLM with --limit-mm-per-prompt: a refusal of this request's images, not of images
    too_many = Error(400, {"object": "error", "message": "At most 1 image(s) may be provided in one request.", "code": 400})
    fake.default = lambda body: too_many if len(image_parts(body)) > 1 else reply("answered")
    async with engine_for(tmp_path, fake) as engine:
        message, pictures = with_image("two", "a.png", png())
        result = await engine.send("dm:1", message, [*pictures, images.read("b.gif", GIF, 10**7)])
        assert result.reply == "answered"
        assert (await engine.send("dm:1", *with_image("one", "c.png", png(2, 2)))).reply == "answered"
        assert not engine.model.no_vision
    refused, again, later = fake.chat_requests
    assert len(image_parts(refused)) == 2 and image_parts(again) == [] and len(image_parts(later)) == 1
    assert user_texts(again)[-1].endswith(images.CANNOT_SEE)


async def test_images_waiting_in_memory_past_the_budget_are_not_downloaded(
    settings: BotSettings, fake_discord: FakeDiscord, fake: FakeOpenAI, world: dict[str, Any]
) -> None:
    """The bytes of images waiting for their turns are all in memory at once: past
    MAX_IMAGES_WAITING_BYTES a new one is described in words and the person told to send it again."""
    first, second = png(padding=3000), png(2, 2, padding=3000)
    settings = settings.model_copy(update={"max_images_waiting_bytes": len(first) + len(second) // 2})
    alice, bob = world["alice"], world["bob"]
    held, release = asyncio.Event(), asyncio.Event()

    async def answer(body: dict[str, Any]) -> dict[str, Any]:
        if "alice's" in user_texts(body)[-1]:
            held.set()
            await release.wait()
        return reply("seen")

    fake.default = answer
    async with running(settings, fake_discord):
        await fake_discord.send_dm(alice["id"], "alice's picture", attachments=[("a.png", first, "image/png")])
        await held.wait()  # alice's image is held for her turn, which is running
        await fake_discord.send_dm(bob["id"], "bob's picture", attachments=[("b.png", second, "image/png")])
        bob_dm = fake_discord.dm_channel(bob["id"])
        await fake_discord.wait_for(lambda f: any("waiting for me" in m["content"] for m in f.bot_messages(bob_dm["id"])))
        release.set()
        await fake_discord.wait_for(lambda f: sum(m["content"] == "seen" for m in f.bot_messages()) == 2)
    (note,) = [m["content"] for m in fake_discord.bot_messages(bob_dm["id"]) if "waiting" in m["content"]]
    assert note == "Too many images are waiting for me right now; I did not see `b.png`. Send it again soon."
    assert len(fake_discord.cdn_served) == 1  # bob's image was never read
    (bobs,) = [r for r in chat_requests(fake) if "bob's" in user_texts(r)[-1]]
    assert image_parts(bobs) == [] and "too many images were waiting to be seen" in user_texts(bobs)[-1]
