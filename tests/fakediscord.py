"""A fake Discord REST + gateway server on loopback, for integration tests.

The real, unmodified discord.py library connects to it.  Point discord.py at it with::

    discord.http.Route.BASE = fake.rest_base                                   # str
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)

discord.py 2.7 never asks ``GET /gateway/bot`` for a plain ``Client``: it connects straight to
``DEFAULT_GATEWAY`` (adding ``?v=10&encoding=json&compress=zlib-stream``) and afterwards
resumes against READY's ``resume_gateway_url``.  An ``AutoShardedClient`` without a shard count
asks ``GET /gateway/bot`` first, which answers ``shards`` (``FakeDiscord(shards=N)``, default 1)
and this fake's gateway URL, then opens one connection per shard.  We answer with plain JSON text
frames, which discord.py accepts even though it asked for zlib (it only decompresses binary frames).

Conventions:
* Every dict the fake hands out is Discord wire format: snowflake ids are *strings*.
  Compare with ``str(discord_object.id)``.
* Every method accepts ids as ``int`` or ``str`` (or the entity dict itself).
* World setup (``add_user``, ``add_guild``, ...) works before or after the client connects;
  after IDENTIFY the matching gateway events are queued to the client.
* Events to the client (``send_message``, ``send_slash``, ``click_button``) wait (up to
  ``timeout``) for a connected client, and return once the frame is written to the socket.
* Sharding as Discord does it: each IDENTIFY's ``shard: [id, count]`` gets its own session and a
  READY listing only that shard's guilds; a guild's events go to shard ``(guild_id >> 22) % count``,
  DMs (and everything without a guild) to shard 0.  ``add_guild(..., shard=(k, n))`` picks such an id.
* Observe the bot through ``sent_messages``, ``interaction_responses``, ``typing``,
  ``registered_commands``, ``requests``, and synchronise with ``wait_for``.
* The fake mimics a few Discord rules that catch real bugs: 2000-character content limit,
  empty messages rejected, the MESSAGE_CONTENT / GUILD_MESSAGES / DIRECT_MESSAGES intents,
  ``allowed_mentions`` deciding who actually gets pinged (see each message's ``mentions``),
  and slash commands must have been registered (synced) before they can be invoked.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import mimetypes
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from aiohttp import WSMsgType, web

log = logging.getLogger("fakediscord")

Json = dict[str, Any]
Id = int | str | Json  # a snowflake, or an entity dict with an "id"
Handler = Callable[..., Awaitable[web.StreamResponse]]

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1420070400000
HEARTBEAT_INTERVAL_MS = 41250  # what Discord really sends; discord.py heartbeats from a thread

# Permission bits (https://discord.com/developers/docs/topics/permissions)
ADMINISTRATOR = 1 << 3
ALL_PERMISSIONS = (1 << 51) - 1
DEFAULT_EVERYONE_PERMISSIONS = (
    (1 << 6)  # ADD_REACTIONS
    | (1 << 10)  # VIEW_CHANNEL
    | (1 << 11)  # SEND_MESSAGES
    | (1 << 14)  # EMBED_LINKS
    | (1 << 15)  # ATTACH_FILES
    | (1 << 16)  # READ_MESSAGE_HISTORY
    | (1 << 31)  # USE_APPLICATION_COMMANDS
    | (1 << 38)  # SEND_MESSAGES_IN_THREADS
)

# Message flags
EPHEMERAL = 1 << 6
LOADING = 1 << 7

# Gateway intents the fake honours when delivering MESSAGE_CREATE
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

# Application flags: "gateway intent enabled in the developer portal" bits
APPLICATION_FLAGS = (1 << 12) | (1 << 14) | (1 << 18)

# Channel types
GUILD_TEXT = 0
DM = 1
PUBLIC_THREAD = 11

# Interaction types and callback types
APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
CB_PONG = 1
CB_MESSAGE = 4
CB_DEFERRED_MESSAGE = 5
CB_DEFERRED_UPDATE = 6
CB_UPDATE_MESSAGE = 7
CB_MODAL = 9

MAX_CONTENT = 2000

# Keys we keep on message records for tests; stripped before anything goes on the wire.
_RECORD_ONLY_KEYS = frozenset({"allowed_mentions", "files", "source", "interaction_id", "ephemeral", "deleted", "edits"})

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _sid(value: Id) -> str:
    """Normalise an id given as int, str or entity dict to the wire form (str)."""
    if isinstance(value, dict):
        return str(value["id"])
    return str(int(value))


def _shard_of(guild_id: str | None, shard_count: int) -> int:
    """The shard Discord sends a guild's events to; DMs and the rest go to shard 0."""
    return (int(guild_id) >> 22) % shard_count if guild_id else 0


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py's json_or_text() only parses the body if Content-Type is *exactly*
    # "application/json" -- web.json_response would append "; charset=utf-8".
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def _no_content() -> web.Response:
    return web.Response(status=204)


def _error(status: int, code: int, message: str, **extra: Any) -> web.Response:
    return _json({"code": code, "message": message, **extra}, status)


def _walk_components(components: Iterable[Json]) -> Iterable[Json]:
    """Every component, depth first (action rows, v2 containers and sections nest them)."""
    for comp in components:
        yield comp
        yield from _walk_components(comp.get("components") or [])
        accessory = comp.get("accessory")
        if accessory:
            yield from _walk_components([accessory])


class _Snowflakes:
    """Strictly increasing, time-based snowflakes, so created_at and ordering are realistic."""

    def __init__(self, floor: int) -> None:
        self._last = floor

    def next(self) -> str:
        now = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = max(self._last + 1, now)
        return str(self._last)

    def on_shard(self, shard_id: int, shard_count: int) -> str:
        """The next id whose guild belongs to shard ``shard_id`` of ``shard_count`` (a few ms ahead)."""
        ms = (int(self.next()) >> 22) + 1
        ms += (shard_id - ms) % shard_count
        self._last = ms << 22
        return str(self._last)


@dataclass
class _Outgoing:
    text: str | None  # None: no frame, only run the callbacks (a marker in the queue)
    done: asyncio.Future[None] | None = None
    on_sent: Callable[[], None] | None = None


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    outbox: asyncio.Queue[_Outgoing | None] = field(default_factory=asyncio.Queue)
    session_id: str | None = None
    seq: int = 0
    intents: int = 0
    shard: tuple[int, int] = (0, 1)  # (shard id, shard count) as IDENTIFY gave it
    identified: bool = False  # READY queued: later events are ordered behind it
    ready: bool = False  # READY + GUILD_CREATEs (or RESUMED) actually written
    closed: bool = False


class FakeDiscord:
    def __init__(
        self,
        *,
        bot_user_id: int = 1000000000000000001,
        app_id: int = 1000000000000000002,
        bot_name: str = "fakebot",
        shards: int = 1,
    ) -> None:
        self._ids = _Snowflakes(max(bot_user_id, app_id))
        self.bot_user_id = str(bot_user_id)
        self.app_id = str(app_id)
        self.application_flags = APPLICATION_FLAGS  # the Developer Portal's switches, intents included
        self.shards = shards  # what GET /gateway/bot recommends
        self.port = 0

        # --- world state (wire format) -------------------------------------------------
        self.users: dict[str, Json] = {}
        self.guilds: dict[str, Json] = {}  # guild wire, incl. "roles"; channels/members live apart
        self.members: dict[str, dict[str, Json]] = {}  # guild id -> user id -> member (with "user")
        self.channels: dict[str, Json] = {}  # text channels, threads and DMs
        self.messages: dict[str, Json] = {}  # every message, by id (user- and bot-sent)
        self._dm_by_user: dict[str, str] = {}
        self._blobs: dict[str, tuple[bytes, str]] = {}  # attachment id -> (bytes, content type)

        self.bot_user = self.add_user(bot_name, bot=True, user_id=bot_user_id)
        self.owner = self.add_user("app-owner")  # the application's owner (Client.application.owner)

        # --- observation ---------------------------------------------------------------
        # Every message the bot created, by any route: the wire message plus record-only keys
        # "allowed_mentions" (as sent, None if absent), "files" [{filename, data, content_type}],
        # "source" (channel | interaction | followup), "interaction_id", "ephemeral",
        # "deleted" and "edits" [{kind, body, files, at}] (at: time.monotonic()).  Records are updated in place on edits.
        self.sent_messages: list[Json] = []
        self.interactions: dict[str, Json] = {}  # interaction records by interaction id
        self.interaction_responses: list[Json] = []  # callbacks, followups, @original edits/deletes
        self.typing: list[Json] = []  # {"channel_id", "at": time.monotonic()}
        self.reactions: list[Json] = []  # {"channel_id", "message_id", "emoji", "action"}
        self.registered_commands: list[Json] = []  # global commands (last bulk overwrite)
        self.guild_commands: dict[str, list[Json]] = {}  # guild id -> commands
        self.requests: list[tuple[str, str]] = []  # (method, path without /api/v10) for every request
        self.unknown_requests: list[tuple[str, str]] = []
        self.rejected_requests: list[Json] = []  # 4xx the fake returned on purpose (Discord rules)
        self.errors: list[str] = []  # exceptions inside the fake's handlers (a bug in the fake)
        self.identifies: list[Json] = []  # IDENTIFY payloads (intents, token, ...)
        self.presence_updates: list[Json] = []
        self.connection_count = 0  # websocket connections accepted
        self.ready_count = 0  # READY + GUILD_CREATE sequences written
        self.resume_count = 0  # RESUMED written
        # an unset Event holds attachment downloads until it is set: what happens meanwhile can be tested
        self.cdn_gate: asyncio.Event | None = None
        self.cdn_waiting = 0  # downloads being held
        self.cdn_served: list[str] = []  # ids of the attachments downloaded, in order
        self.refuse_edits = 0  # the next this many PATCHes of channel messages are refused (403 Missing Permissions)
        # the next this many PATCHes and DELETEs of channel messages get their connection closed unanswered
        self.drop_writes = 0

        # --- plumbing ------------------------------------------------------------------
        self._by_token: dict[str, Json] = {}
        self._connections: list[_Connection] = []
        self._active: dict[int, _Connection] = {}  # shard id -> its identified connection
        self._sessions: dict[str, tuple[int, int, tuple[int, int]]] = {}  # session id -> (seq, intents, shard), for RESUME
        self._changed_event = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._register_routes()

    # ================================================================== lifecycle

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._http)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)  # loopback only, any free port
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for conn in list(self._connections):
            await conn.ws.close(code=1001, message=b"fakediscord stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rest_base(self) -> str:
        return f"{self.http_base}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @property
    def connected(self) -> bool:
        """Every shard of the client has an identified connection."""
        live = [c for c in self._active.values() if c.identified and not c.closed]
        return bool(live) and {c.shard[0] for c in live} == set(range(live[0].shard[1]))

    def _conn_for(self, guild_id: str | None) -> _Connection | None:
        """The live connection of the shard that gets this guild's events (a DM's: shard 0)."""
        for conn in self._active.values():
            if conn.identified and not conn.closed and conn.shard[0] == _shard_of(guild_id, conn.shard[1]):
                return conn
        return None

    # ================================================================== world setup

    def add_user(self, username: str, *, bot: bool = False, global_name: str | None = None, user_id: int | None = None) -> Json:
        uid = str(user_id) if user_id is not None else self._ids.next()
        user = {
            "id": uid,
            "username": username,
            "discriminator": "0",
            "global_name": global_name,
            "avatar": None,
            "bot": bot,
            "public_flags": 0,
        }
        self.users[uid] = user
        return user

    def add_guild(
        self,
        name: str,
        *,
        owner_id: Id,
        everyone_permissions: int = DEFAULT_EVERYONE_PERMISSIONS,
        shard: tuple[int, int] | None = None,
    ) -> Json:
        """``shard=(id, count)``: an id whose events go to shard ``id`` of a client with ``count`` shards."""
        gid = self._ids.next() if shard is None else self._ids.on_shard(*shard)
        owner = _sid(owner_id)
        everyone = self._role(gid, "@everyone", everyone_permissions, position=0)
        everyone["id"] = gid  # @everyone's role id is the guild id
        self.guilds[gid] = {
            "id": gid,
            "name": name,
            "owner_id": owner,
            "roles": [everyone],
            "icon": None,
            "features": [],
            "preferred_locale": "en-US",
            "joined_at": _now_iso(),
        }
        self.members[gid] = {}
        # The bot is in every guild the fake knows (READY only lists the bot's guilds).
        self._put_member(gid, self.bot_user_id, [])
        if owner != self.bot_user_id:
            self._put_member(gid, owner, [])
        self._emit("GUILD_CREATE", self._guild_create_payload(gid))
        return self.guilds[gid]

    def add_text_channel(self, guild_id: Id, name: str, *, topic: str | None = None) -> Json:
        gid = _sid(guild_id)
        self._guild(gid)
        position = sum(1 for c in self.channels.values() if c.get("guild_id") == gid and c["type"] == GUILD_TEXT)
        channel = {
            "id": self._ids.next(),
            "type": GUILD_TEXT,
            "guild_id": gid,
            "name": name,
            "position": position,
            "permission_overwrites": [],
            "parent_id": None,
            "topic": topic,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }
        self.channels[channel["id"]] = channel
        self._emit("CHANNEL_CREATE", channel)
        return channel

    def add_thread(self, parent_id: Id, name: str, *, owner_id: Id | None = None) -> Json:
        """A public thread (type 11) under a text channel."""
        parent = self._channel(parent_id)
        assert parent["type"] == GUILD_TEXT, f"threads need a text channel parent, got {parent}"
        thread = {
            "id": self._ids.next(),
            "type": PUBLIC_THREAD,
            "guild_id": parent["guild_id"],
            "parent_id": parent["id"],
            "owner_id": _sid(owner_id) if owner_id is not None else self.bot_user_id,
            "name": name,
            "last_message_id": None,
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "flags": 0,
            "total_message_sent": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _now_iso(),
                "locked": False,
                "create_timestamp": _now_iso(),
            },
        }
        self.channels[thread["id"]] = thread
        self._emit("THREAD_CREATE", {**thread, "newly_created": True})
        return thread

    def add_member(self, guild_id: Id, user_id: Id, *, permissions: int = 0) -> Json:
        """Add a user to a guild; extra ``permissions`` are granted through a role of their own."""
        gid, uid = _sid(guild_id), _sid(user_id)
        guild = self._guild(gid)
        roles: list[str] = []
        if permissions:
            role = self._role(gid, f"{self._user(uid)['username']}-perms", permissions, position=len(guild["roles"]))
            guild["roles"].append(role)
            roles.append(role["id"])
            self._emit("GUILD_ROLE_CREATE", {"guild_id": gid, "role": role})
        member = self._put_member(gid, uid, roles)
        self._emit("GUILD_MEMBER_ADD", {**member, "guild_id": gid})
        return member

    def dm_channel(self, user_id: Id) -> Json:
        """The DM channel between the bot and a user (created on first use)."""
        uid = _sid(user_id)
        user = self._user(uid)
        if uid not in self._dm_by_user:
            channel = {"id": self._ids.next(), "type": DM, "recipients": [user], "last_message_id": None, "flags": 0}
            self.channels[channel["id"]] = channel
            self._dm_by_user[uid] = channel["id"]
        return self.channels[self._dm_by_user[uid]]

    # ================================================================== events to the client

    async def dispatch(self, event: str, data: Json, *, timeout: float = 5.0) -> None:
        """Send any gateway DISPATCH event to the connected client (the shard of ``data``'s guild_id)
        and wait until it is written."""
        # GUILD_CREATE / GUILD_UPDATE / GUILD_DELETE name their guild by `id`
        guild_id = data.get("guild_id") or (data.get("id") if event.startswith("GUILD_") else None)
        conn = await self._connection(timeout, guild_id)
        await self._send(conn, {"op": 0, "t": event, "d": data})

    async def send_raw(self, text: str, *, timeout: float = 5.0) -> None:
        """Write ``text`` as one gateway text frame to shard 0, as is: a broken or hostile Discord's bytes."""
        conn = await self._connection(timeout)
        done = asyncio.get_running_loop().create_future()
        conn.outbox.put_nowait(_Outgoing(text, done))
        await done

    async def send_message(
        self,
        channel_id: Id,
        author_id: Id,
        content: str,
        *,
        mentions: Sequence[Id] = (),
        reply_to: Id | None = None,
        attachments: Sequence[tuple[str, bytes, str]] = (),
        embeds: Sequence[Json] = (),
        webhook: bool = False,
        message_type: int | None = None,
        timeout: float = 5.0,
    ) -> Json:
        """A user (or webhook) posts a message; the client gets MESSAGE_CREATE.

        Mentions are parsed from ``content`` (``<@id>``, ``<@&role>``, ``@everyone``) like Discord
        does; ``mentions`` adds more.  ``reply_to`` makes it a reply (type 19) that pings the
        replied-to author.  ``attachments`` are ``(filename, bytes, content_type)``, served over HTTP.
        """
        conn = await self._connection(timeout, self._channel(channel_id).get("guild_id"))
        channel = self._channel(channel_id)
        author = self._user(author_id)
        if channel["type"] == DM:
            assert channel["recipients"][0]["id"] == author["id"] or author["id"] == self.bot_user_id, (
                f"user {author['id']} is not the recipient of DM channel {channel['id']}"
            )
        reference = self._reference(channel, reply_to) if reply_to is not None else None
        message = self._build_message(
            channel,
            author,
            content,
            message_type=message_type if message_type is not None else (19 if reference else 0),
            reference=reference,
            allowed_mentions=None,
            extra_mentions=[_sid(m) for m in mentions],
            attachments=[self._store_attachment(channel["id"], *a) for a in attachments],
            embeds=list(embeds),
            webhook_id=self._ids.next() if webhook else None,
        )
        self.messages[message["id"]] = message
        event = self._message_event_for(conn, message)
        if event is not None:
            await self._send(conn, {"op": 0, "t": "MESSAGE_CREATE", "d": event})
        return message

    def post_offline(self, channel_id: Id, author_id: Id, content: str) -> Json:
        """A user posts while no client is connected: no MESSAGE_CREATE; only history reads find it.

        Mentions are parsed from ``content`` as in ``send_message``.
        """
        message = self._build_message(
            self._channel(channel_id),
            self._user(author_id),
            content,
            message_type=0,
            reference=None,
            allowed_mentions=None,
            attachments=[],
            embeds=[],
        )
        self.messages[message["id"]] = message
        return message

    async def send_dm(self, user_id: Id, content: str, **kwargs: Any) -> Json:
        """Shortcut: ``user_id`` writes ``content`` in their DM with the bot."""
        return await self.send_message(self.dm_channel(user_id)["id"], user_id, content, **kwargs)

    async def send_slash(
        self,
        channel_id: Id,
        user_id: Id,
        name: str,
        subcommand: str | None = None,
        options: dict[str, Any] | None = None,
        *,
        timeout: float = 5.0,
    ) -> Json:
        """A user invokes ``/name [subcommand] option:value...``; returns the interaction record.

        ``subcommand`` may be ``"group sub"``.  Option types come from the registered command
        (the bot must have synced it).  USER/CHANNEL/ROLE options take ids or entity dicts,
        ATTACHMENT options take ``(filename, bytes, content_type)``.
        """
        conn = await self._connection(timeout, self._channel(channel_id).get("guild_id"))
        channel = self._channel(channel_id)
        user = self._user(user_id)
        guild_id = channel.get("guild_id")
        command, command_guild = self._find_command(name, guild_id)
        resolved: Json = {}
        option_payload = self._command_options(command, subcommand, options or {}, resolved, guild_id)
        data: Json = {"id": command["id"], "name": name, "type": 1, "options": option_payload}
        if command_guild is not None:
            data["guild_id"] = command_guild
        if resolved:
            data["resolved"] = resolved
        record = self._new_interaction(APPLICATION_COMMAND, channel, user, data, name=name)
        await self._send(conn, {"op": 0, "t": "INTERACTION_CREATE", "d": record["payload"]})
        return record

    async def click_button(self, target: Id, custom_id: str, user_id: Id, *, timeout: float = 5.0) -> Json:
        """A user clicks the button ``custom_id`` on a message; returns the new interaction record.

        ``target`` is a message record/id, or an interaction record (its original response).
        """
        return await self._component_interaction(target, custom_id, user_id, {}, timeout)

    async def select_option(
        self, target: Id, custom_id: str, user_id: Id, values: Sequence[str], *, timeout: float = 5.0
    ) -> Json:
        """A user picks ``values`` in the select menu ``custom_id``; returns the interaction record."""
        return await self._component_interaction(target, custom_id, user_id, {"values": list(values)}, timeout)

    async def disconnect_client(self, *, resume: bool = True, shard: int = 0) -> None:
        """Close the client's websocket (4000; of ``shard``) as Discord does when it drops a session.

        discord.py reconnects immediately and sends RESUME; with ``resume=False`` the fake
        answers INVALID_SESSION so the client re-IDENTIFYs and gets a fresh READY -- but
        discord.py's default ``Client.before_identify_hook`` sleeps 5 s before every
        non-initial IDENTIFY, so tests should override it with a no-op.
        """
        conn = self._active.get(shard)
        assert conn is not None, f"no client connected on shard {shard}"
        if not resume and conn.session_id is not None:
            self._sessions.pop(conn.session_id, None)
            conn.session_id = None
        await conn.ws.close(code=4000, message=b"fakediscord: disconnect_client")

    # ================================================================== observation helpers

    async def wait_for(self, predicate: Callable[[FakeDiscord], Any], timeout: float = 5.0, *, what: str | None = None) -> Any:
        """Wait until ``predicate(self)`` is truthy and return its value.

        Re-checked on every fake state change (request, gateway frame, connection) and at
        least every 20 ms, so predicates over bot-side state work too.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self._changed_event  # grab before checking: no await in between
            result = predicate(self)
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                waited_for = what or self._describe_predicate(predicate)
                raise AssertionError(f"fakediscord: timed out after {timeout}s waiting for {waited_for}\n{self.describe()}")
            try:
                await asyncio.wait_for(event.wait(), min(remaining, 0.02))
            except TimeoutError:
                pass

    async def wait_ready(self, *, count: int | None = None, timeout: float = 5.0) -> None:
        """Wait until a client IDENTIFYed and READY + all GUILD_CREATEs were written, on every shard.

        ``count`` waits for the N-th READY overall, one per shard (e.g. ``count=2`` after a restart
        with one shard).
        """
        await self.wait_for(
            lambda f: f.connected and all(c.ready for c in f._active.values()) and (count is None or f.ready_count >= count),
            timeout,
            what=f"client READY (count={count})",
        )

    def delete_message(self, target: Id) -> None:
        """A person deletes a message (the bot's too, as a moderator may): MESSAGE_DELETE goes to the client."""
        self._delete_message(self._message(target))
        self._changed()

    def bot_messages(self, channel_id: Id | None = None, *, include_deleted: bool = False) -> list[Json]:
        """Messages the bot created (optionally in one channel), oldest first."""
        cid = _sid(channel_id) if channel_id is not None else None
        return [
            m for m in self.sent_messages if (cid is None or m["channel_id"] == cid) and (include_deleted or not m["deleted"])
        ]

    def buttons(self, message: Id) -> list[Json]:
        """Interactive components (those with a custom_id) on a message."""
        return [c for c in _walk_components(self._message(message).get("components") or []) if "custom_id" in c]

    def describe(self) -> str:
        """A summary of what happened, for failure messages."""
        shards = " ".join(f"{i}:{'ready' if c.ready else 'open'}{'/closed' if c.closed else ''}" for i, c in self._active.items())
        lines = [
            f"  connection: shards [{shards}] connected={self.connected} "
            f"connections={self.connection_count} ready_count={self.ready_count} resume_count={self.resume_count}",
            f"  last requests: {self.requests[-15:]}",
        ]
        if self.unknown_requests:
            lines.append(f"  UNKNOWN routes (404): {self.unknown_requests[-10:]}")
        if self.rejected_requests:
            lines.append(f"  rejected (Discord rules): {self.rejected_requests[-5:]}")
        if self.errors:
            lines.append(f"  FAKE ERRORS: {self.errors[-5:]}")
        for m in self.sent_messages[-5:]:
            lines.append(f"  bot message {m['id']} in {m['channel_id']} ({m['source']}): {m['content'][:100]!r}")
        for r in self.interaction_responses[-5:]:
            lines.append(f"  interaction response: {r['kind']} type={r['type']} flags={r['flags']}")
        return "\n".join(lines)

    @staticmethod
    def _describe_predicate(predicate: Callable[..., Any]) -> str:
        try:
            return inspect.getsource(predicate).strip()
        except (OSError, TypeError):
            return repr(predicate)

    def _changed(self) -> None:
        event, self._changed_event = self._changed_event, asyncio.Event()
        event.set()

    # ================================================================== entity helpers

    def _user(self, user_id: Id) -> Json:
        uid = _sid(user_id)
        assert uid in self.users, f"unknown user {uid}; add it with add_user()"
        return self.users[uid]

    def _guild(self, guild_id: Id) -> Json:
        gid = _sid(guild_id)
        assert gid in self.guilds, f"unknown guild {gid}; add it with add_guild()"
        return self.guilds[gid]

    def _channel(self, channel_id: Id) -> Json:
        cid = _sid(channel_id)
        assert cid in self.channels, f"unknown channel {cid}; add it with add_text_channel()/add_thread()/dm_channel()"
        return self.channels[cid]

    def _message(self, target: Id) -> Json:
        if isinstance(target, dict) and "token" in target:  # an interaction record
            mid = target.get("original_message_id") or target.get("message_id")
            assert mid, f"interaction {target['id']} has no response message yet"
        else:
            mid = _sid(target)
        assert mid in self.messages, f"unknown message {mid}"
        return self.messages[mid]

    def _role(self, guild_id: str, name: str, permissions: int, *, position: int) -> Json:
        return {
            "id": self._ids.next(),
            "name": name,
            "permissions": str(permissions),
            "position": position,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }

    def _put_member(self, guild_id: str, user_id: str, roles: list[str]) -> Json:
        member = {
            "user": self._user(user_id),
            "roles": roles,
            "joined_at": _now_iso(),
            "flags": 0,  # discord.py requires it
            "deaf": False,
            "mute": False,
            "nick": None,
            "pending": False,
            "premium_since": None,
            "avatar": None,
            "communication_disabled_until": None,
        }
        self.members[guild_id][user_id] = member
        return member

    def _member_permissions(self, guild_id: str, user_id: str) -> int:
        guild = self.guilds[guild_id]
        if guild["owner_id"] == user_id:
            return ALL_PERMISSIONS
        member = self.members[guild_id].get(user_id)
        if member is None:
            return 0
        roles = {r["id"]: int(r["permissions"]) for r in guild["roles"]}
        perms = roles[guild_id]
        for rid in member["roles"]:
            perms |= roles.get(rid, 0)
        return ALL_PERMISSIONS if perms & ADMINISTRATOR else perms

    def _partial_member(self, guild_id: str, user_id: str) -> Json | None:
        """Member object without "user", as embedded in messages."""
        member = self.members.get(guild_id, {}).get(user_id)
        if member is None:
            return None
        return {k: v for k, v in member.items() if k != "user"}

    def _guild_create_payload(self, guild_id: str) -> Json:
        guild = self.guilds[guild_id]
        channels = [c for c in self.channels.values() if c.get("guild_id") == guild_id]
        members = list(self.members[guild_id].values())
        return {
            **guild,
            "unavailable": False,
            "large": False,
            # member_count == len(members) makes discord.py consider the guild chunked
            "member_count": len(members),
            "members": members,
            "channels": [c for c in channels if c["type"] != PUBLIC_THREAD],
            "threads": [c for c in channels if c["type"] == PUBLIC_THREAD],
            "voice_states": [],
            "presences": [],
            "emojis": [],
            "stickers": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "system_channel_flags": 0,
            "afk_timeout": 300,
        }

    def _store_attachment(self, channel_id: str, filename: str, data: bytes, content_type: str | None = None) -> Json:
        aid = self._ids.next()
        ctype = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        self._blobs[aid] = (bytes(data), ctype)
        url = f"{self.http_base}/attachments/{channel_id}/{aid}/{quote(filename)}"
        return {
            "id": aid,
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": ctype,
        }

    def _store_upload(self, channel_id: str, upload: Json) -> Json:
        return self._store_attachment(channel_id, upload["filename"], upload["data"], upload["content_type"])

    def _bot_user_full(self) -> Json:
        """The bot's user as /users/@me and READY show it (a ClientUser)."""
        return {**self.users[self.bot_user_id], "verified": True, "mfa_enabled": False, "flags": 0, "email": None}

    # ================================================================== messages

    def _reference(self, channel: Json, reply_to: Id) -> Json:
        ref = {"message_id": _sid(reply_to), "channel_id": channel["id"], "type": 0}
        if "guild_id" in channel:
            ref["guild_id"] = channel["guild_id"]
        return ref

    def _mentions(
        self, content: str, guild_id: str | None, allowed: Json | None, replied_author: str | None
    ) -> tuple[list[str], list[str], bool]:
        """Who a message really pings, the way Discord applies allowed_mentions."""
        users = [u for u in dict.fromkeys(_USER_MENTION.findall(content)) if u in self.users]
        roles = list(dict.fromkeys(_ROLE_MENTION.findall(content)))
        everyone = "@everyone" in content or "@here" in content
        replied = replied_author is not None
        if allowed is not None:
            parse = allowed.get("parse") or []
            if "users" not in parse:
                allowed_users = {str(u) for u in allowed.get("users") or []}
                users = [u for u in users if u in allowed_users]
            if "roles" not in parse:
                allowed_roles = {str(r) for r in allowed.get("roles") or []}
                roles = [r for r in roles if r in allowed_roles]
            everyone = everyone and "everyone" in parse
            replied = replied and bool(allowed.get("replied_user", False))
        if replied and replied_author not in users:
            users.append(replied_author)  # type: ignore[arg-type]
        return users, roles, everyone

    def _mention_objects(self, user_ids: Iterable[str], guild_id: str | None) -> list[Json]:
        out = []
        for uid in user_ids:
            obj = dict(self.users[uid])
            member = self._partial_member(guild_id, uid) if guild_id else None
            if member is not None:
                obj["member"] = member
            out.append(obj)
        return out

    def _build_message(
        self,
        channel: Json,
        author: Json,
        content: str,
        *,
        message_type: int,
        reference: Json | None,
        allowed_mentions: Json | None,
        extra_mentions: Sequence[str] = (),
        attachments: list[Json],
        embeds: list[Json],
        components: list[Json] | None = None,
        flags: int = 0,
        webhook_id: str | None = None,
        nonce: Any = None,
    ) -> Json:
        guild_id = channel.get("guild_id")
        referenced = self.messages.get(reference["message_id"]) if reference else None
        replied_author = referenced["author"]["id"] if referenced else None
        users, roles, everyone = self._mentions(content, guild_id, allowed_mentions, replied_author)
        users += [u for u in extra_mentions if u not in users]
        if webhook_id is not None:
            author = {**author, "id": webhook_id, "bot": True}  # webhook messages have a fake author
        message: Json = {
            "id": self._ids.next(),
            "channel_id": channel["id"],
            "author": author,
            "content": content,
            "type": message_type,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": everyone,
            "mentions": self._mention_objects(users, guild_id),
            "mention_roles": roles,
            "attachments": attachments,
            "embeds": embeds,
            "components": components or [],
            "pinned": False,
            "flags": flags,
        }
        if guild_id is not None:
            message["guild_id"] = guild_id
            member = self._partial_member(guild_id, author["id"]) if webhook_id is None else None
            if member is not None:
                message["member"] = member
        if reference is not None:
            message["message_reference"] = reference
            message["referenced_message"] = self._wire(referenced) if referenced else None
        if webhook_id is not None:
            message["webhook_id"] = webhook_id
        if nonce is not None:
            message["nonce"] = nonce
        channel["last_message_id"] = message["id"]
        return message

    @staticmethod
    def _wire(message: Json) -> Json:
        return {k: v for k, v in message.items() if k not in _RECORD_ONLY_KEYS}

    def _message_event_for(self, conn: _Connection, message: Json) -> Json | None:
        """MESSAGE_CREATE payload as this connection may see it (intents), or None if not delivered."""
        in_guild = "guild_id" in message
        if not conn.intents & (INTENT_GUILD_MESSAGES if in_guild else INTENT_DIRECT_MESSAGES):
            return None
        event = self._wire(message)
        mentioned = any(u["id"] == self.bot_user_id for u in message["mentions"])
        if (
            in_guild
            and not conn.intents & INTENT_MESSAGE_CONTENT
            and not mentioned
            and message["author"]["id"] != self.bot_user_id
        ):
            # Without the privileged intent, Discord blanks content-bearing fields.
            event.update(content="", embeds=[], attachments=[], components=[])
        return event

    def _validate_body(self, body: Json, files: list[Json], *, editing: bool = False) -> web.Response | None:
        """Reject what Discord rejects; returns an error response, or None when fine."""
        content = body.get("content") or ""
        if len(content) > MAX_CONTENT:
            return self._reject(
                400,
                50035,
                "Invalid Form Body",
                errors={
                    "content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}
                },
            )
        has_payload = any(body.get(k) for k in ("embeds", "components", "sticker_ids", "poll"))
        if not editing and not (content or files or has_payload):
            return self._reject(400, 50006, "Cannot send an empty message")
        return None

    def _reject(self, status: int, code: int, message: str, **extra: Any) -> web.Response:
        self.rejected_requests.append({"status": status, "code": code, "message": message, **extra})
        log.warning("fakediscord rejected a request: %s %s", code, message)
        return _error(status, code, message, **extra)

    def _create_bot_message(
        self,
        channel: Json,
        body: Json,
        files: list[Json],
        *,
        source: str,
        interaction: Json | None = None,
        flags: int | None = None,
        message_id: str | None = None,
    ) -> Json:
        reference = body.get("message_reference")
        if reference is not None:  # discord.py sends ints; keep wire ids as strings
            reference = {k: str(v) if k.endswith("_id") and v is not None else v for k, v in reference.items()}
            reference.setdefault("channel_id", channel["id"])
        is_command = interaction is not None and interaction["type"] == APPLICATION_COMMAND
        message = self._build_message(
            channel,
            self.users[self.bot_user_id],
            body.get("content") or "",
            message_type=20 if is_command else (19 if reference else 0),
            reference=reference,
            allowed_mentions=body.get("allowed_mentions"),
            attachments=[self._store_upload(channel["id"], f) for f in files],
            embeds=body.get("embeds") or [],
            components=body.get("components") or [],
            flags=flags if flags is not None else (body.get("flags") or 0),
            nonce=body.get("nonce"),
        )
        if message_id is not None:  # deferred interaction responses reserved their id earlier
            message["id"] = message_id
        if interaction is not None:
            message["webhook_id"] = self.app_id
            message["application_id"] = self.app_id
            message["interaction_metadata"] = {
                "id": interaction["id"],
                "type": interaction["type"],
                "user": self.users[interaction["user_id"]],
                "authorizing_integration_owners": interaction["payload"]["authorizing_integration_owners"],
            }
        record = {
            **message,
            "allowed_mentions": body.get("allowed_mentions"),
            "files": files,
            "source": source,
            "interaction_id": interaction["id"] if interaction else None,
            "ephemeral": bool(message["flags"] & EPHEMERAL),
            "deleted": False,
            "edits": [],
        }
        self.messages[record["id"]] = record
        self.sent_messages.append(record)
        if not record["ephemeral"]:
            self._emit("MESSAGE_CREATE", self._wire(record))  # bots see their own messages too
        return record

    def _edit_message(self, message: Json, body: Json, files: list[Json], *, kind: str) -> None:
        for key, empty in (("content", ""), ("embeds", []), ("components", []), ("allowed_mentions", None)):
            if key in body:
                message[key] = body[key] if body[key] is not None else empty
        if body.get("flags") is not None:  # ephemeral/loading can't be changed by an edit
            message["flags"] = (message["flags"] & (EPHEMERAL | LOADING)) | body["flags"]
        if "attachments" in body or files:
            keep = {str(a["id"]) for a in body.get("attachments") or []}
            message["attachments"] = [a for a in message["attachments"] if a["id"] in keep] + [
                self._store_upload(message["channel_id"], f) for f in files
            ]
        if "content" in body:
            ref = message.get("message_reference")
            referenced = self.messages.get(ref["message_id"]) if ref else None
            users, roles, everyone = self._mentions(
                message["content"],
                message.get("guild_id"),
                message.get("allowed_mentions"),
                referenced["author"]["id"] if referenced else None,
            )
            message.update(
                mentions=self._mention_objects(users, message.get("guild_id")),
                mention_roles=roles,
                mention_everyone=everyone,
            )
        message["edited_timestamp"] = _now_iso()
        if "edits" in message:
            message["edits"].append({"kind": kind, "body": body, "files": files, "at": time.monotonic()})
        if not message["flags"] & EPHEMERAL:
            self._emit("MESSAGE_UPDATE", self._wire(message))

    def _delete_message(self, message: Json) -> None:
        message["deleted"] = True
        if not message["flags"] & EPHEMERAL:
            event = {"id": message["id"], "channel_id": message["channel_id"]}
            if "guild_id" in message:
                event["guild_id"] = message["guild_id"]
            self._emit("MESSAGE_DELETE", event)

    # ================================================================== interactions

    def _find_command(self, name: str, guild_id: str | None) -> tuple[Json, str | None]:
        if guild_id is not None:
            for cmd in self.guild_commands.get(guild_id, []):
                if cmd["name"] == name and cmd.get("type", 1) == 1:
                    return cmd, guild_id
        for cmd in self.registered_commands:
            if cmd["name"] == name and cmd.get("type", 1) == 1:
                return cmd, None
        known = [c["name"] for c in self.registered_commands] + [c["name"] for c in self.guild_commands.get(guild_id or "", [])]
        raise AssertionError(f"slash command /{name} is not registered (did the bot sync?); registered: {known}")

    def _command_options(
        self, command: Json, subcommand: str | None, options: dict[str, Any], resolved: Json, guild_id: str | None
    ) -> list[Json]:
        schema: list[Json] = command.get("options") or []
        top: list[Json] = []
        current = top
        for part in (subcommand or "").split():
            sub = next((o for o in schema if o["name"] == part and o["type"] in (1, 2)), None)
            assert sub is not None, f"/{command['name']} has no subcommand {part!r}; options: {[o['name'] for o in schema]}"
            node: Json = {"name": part, "type": sub["type"], "options": []}
            current.append(node)
            current = node["options"]
            schema = sub.get("options") or []
        if any(o["type"] in (1, 2) for o in schema):
            raise AssertionError(f"/{command['name']} {subcommand or ''} needs a subcommand: {[o['name'] for o in schema]}")
        for key, value in options.items():
            opt = next((o for o in schema if o["name"] == key), None)
            assert opt is not None, f"/{command['name']} has no option {key!r}; options: {[o['name'] for o in schema]}"
            option_value = self._option_value(opt["type"], value, resolved, guild_id)
            current.append({"name": key, "type": opt["type"], "value": option_value})
        missing = [o["name"] for o in schema if o.get("required") and o["name"] not in options]
        assert not missing, f"/{command['name']}: required options missing: {missing}"
        return top

    def _option_value(self, option_type: int, value: Any, resolved: Json, guild_id: str | None) -> Any:
        if option_type == 3:
            return str(value)
        if option_type == 4:
            return int(value)
        if option_type == 5:
            return bool(value)
        if option_type == 10:
            return float(value)
        if option_type == 11:  # ATTACHMENT: (filename, bytes, content_type)
            attachment = self._store_attachment("options", *value)
            resolved.setdefault("attachments", {})[attachment["id"]] = attachment
            return attachment["id"]
        sid = _sid(value)
        if option_type == 6 or (option_type == 9 and sid in self.users):  # USER / MENTIONABLE user
            resolved.setdefault("users", {})[sid] = self._user(sid)
            member = self._partial_member(guild_id, sid) if guild_id else None
            if member is not None:
                member["permissions"] = str(self._member_permissions(guild_id, sid))  # type: ignore[arg-type]
                resolved.setdefault("members", {})[sid] = member
            return sid
        if option_type == 7:
            channel = self._channel(sid)
            keys = ("id", "type", "name", "guild_id", "parent_id", "thread_metadata")
            partial = {k: channel[k] for k in keys if k in channel}
            partial["permissions"] = str(ALL_PERMISSIONS)
            resolved.setdefault("channels", {})[sid] = partial
            return sid
        if option_type in (8, 9):  # ROLE / MENTIONABLE role
            assert guild_id is not None, "role options need a guild channel"
            role = next((r for r in self.guilds[guild_id]["roles"] if r["id"] == sid), None)
            assert role is not None, f"unknown role {sid}"
            resolved.setdefault("roles", {})[sid] = role
            return sid
        raise AssertionError(f"option type {option_type} not supported by fakediscord")

    def _new_interaction(
        self,
        itype: int,
        channel: Json,
        user: Json,
        data: Json,
        *,
        name: str | None = None,
        custom_id: str | None = None,
        message: Json | None = None,
    ) -> Json:
        iid = self._ids.next()
        token = f"fake-{iid}-{secrets.token_hex(8)}"
        guild_id = channel.get("guild_id")
        channel_payload = {**channel}
        payload: Json = {
            "id": iid,
            "application_id": self.app_id,
            "type": itype,
            "token": token,
            "version": 1,
            "attachment_size_limit": 25 * 1024 * 1024,
            "data": data,
            "channel": channel_payload,
            "channel_id": channel["id"],
            "locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "authorizing_integration_owners": {"0": guild_id} if guild_id else {"1": user["id"]},
            "context": 0 if guild_id else 1,  # GUILD / BOT_DM
        }
        if guild_id is not None:
            user_perms = self._member_permissions(guild_id, user["id"])
            member = self._partial_member(guild_id, user["id"])
            assert member is not None, f"user {user['id']} is not a member of guild {guild_id}; add_member() first"
            payload.update(
                guild_id=guild_id,
                guild_locale="en-US",
                guild={"id": guild_id, "locale": "en-US", "features": []},
                member={**member, "user": user, "permissions": str(user_perms)},
                app_permissions=str(self._member_permissions(guild_id, self.bot_user_id)),
            )
            channel_payload["permissions"] = str(user_perms)
        else:
            payload.update(user=user, app_permissions=str(DEFAULT_EVERYONE_PERMISSIONS))
        if message is not None:
            payload["message"] = self._wire(message)
        record: Json = {
            "id": iid,
            "token": token,
            "type": itype,
            "name": name,
            "custom_id": custom_id,
            "channel_id": channel["id"],
            "guild_id": guild_id,
            "user_id": user["id"],
            "message_id": message["id"] if message is not None else None,  # the component's message
            "payload": payload,
            "callback_type": None,
            "original_message_id": None,
            "responses": [],
        }
        self.interactions[iid] = record
        self._by_token[token] = record
        return record

    async def _component_interaction(self, target: Id, custom_id: str, user_id: Id, extra: Json, timeout: float) -> Json:
        message = self._message(target)
        conn = await self._connection(timeout, message.get("guild_id"))
        assert not message.get("deleted"), f"message {message['id']} was deleted"
        component = next((c for c in self.buttons(message) if c["custom_id"] == custom_id), None)
        assert component is not None, (
            f"no component {custom_id!r} on message {message['id']}; has {[c['custom_id'] for c in self.buttons(message)]}"
        )
        assert not component.get("disabled"), f"component {custom_id!r} on message {message['id']} is disabled"
        data = {"custom_id": custom_id, "component_type": component["type"], **extra}
        record = self._new_interaction(
            MESSAGE_COMPONENT,
            self.channels[message["channel_id"]],
            self._user(user_id),
            data,
            custom_id=custom_id,
            message=message,
        )
        await self._send(conn, {"op": 0, "t": "INTERACTION_CREATE", "d": record["payload"]})
        return record

    def _record_response(
        self,
        record: Json,
        kind: str,
        body: Json,
        files: list[Json],
        message: Json | None,
        *,
        callback_type: int | None = None,
    ) -> Json:
        data = (body.get("data") or {}) if kind == "callback" else body
        flags = (message["flags"] if message is not None else (data or {}).get("flags")) or 0
        entry = {
            "kind": kind,  # callback | followup | edit_original | edit_followup | delete_original | delete_followup
            "interaction_id": record["id"],
            "type": callback_type,
            "data": data,
            "flags": flags,
            "ephemeral": bool(flags & EPHEMERAL),
            "files": files,
            "message_id": message["id"] if message is not None else None,
        }
        record["responses"].append(entry)
        self.interaction_responses.append(entry)
        return entry

    # ================================================================== gateway

    async def _connection(self, timeout: float, guild_id: str | None = None) -> _Connection:
        """The connection of the shard that gets this guild's events (a DM's: shard 0), once identified."""
        conn = await self.wait_for(
            lambda f: f._conn_for(guild_id), timeout, what="a discord client connected to the fake gateway (IDENTIFY)"
        )
        assert isinstance(conn, _Connection)
        return conn

    def _enqueue(
        self, conn: _Connection, frame: Json | None, *, on_sent: Callable[[], None] | None = None, wait: bool = False
    ) -> asyncio.Future[None] | None:
        if conn.closed:
            raise ConnectionError("fakediscord: client connection closed")
        text = None
        if frame is not None:
            if frame.get("op") == 0:
                # Sequence numbers are assigned at enqueue time; the single writer keeps FIFO order.
                conn.seq += 1
                frame = {**frame, "s": conn.seq}
            text = json.dumps(frame)  # serialise now: later mutations of records must not leak
        done = asyncio.get_running_loop().create_future() if wait else None
        conn.outbox.put_nowait(_Outgoing(text, done, on_sent))
        return done

    async def _send(self, conn: _Connection, frame: Json) -> None:
        done = self._enqueue(conn, frame, wait=True)
        assert done is not None
        await done

    def _emit(self, event: str, data: Json) -> None:
        """Queue an event for the connected client's shard of its guild, if any (world changes made after IDENTIFY)."""
        conn = self._conn_for(data["id"] if event == "GUILD_CREATE" else data.get("guild_id"))
        if conn is not None:
            self._enqueue(conn, {"op": 0, "t": event, "d": data})

    async def _writer(self, conn: _Connection) -> None:
        while (item := await conn.outbox.get()) is not None:
            try:
                if item.text is not None:
                    if conn.ws.closed:
                        raise ConnectionError("fakediscord: client connection closed")
                    await conn.ws.send_str(item.text)
                if item.on_sent is not None:
                    item.on_sent()
            except Exception as exc:  # the client went away mid-queue
                if item.done is not None and not item.done.done():
                    item.done.set_exception(ConnectionError(f"fakediscord: event not delivered: {exc!r}"))
                continue
            if item.done is not None and not item.done.done():
                item.done.set_result(None)

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = _Connection(ws=ws)
        self._connections.append(conn)
        self.connection_count += 1
        writer = asyncio.create_task(self._writer(conn))
        self._enqueue(conn, {"op": 10, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}})
        self._changed()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        self._on_gateway_frame(conn, json.loads(msg.data))
                    except Exception as exc:
                        log.exception("fakediscord gateway error")
                        self.errors.append(f"gateway: {exc!r}")
                    self._changed()
        finally:
            conn.closed = True
            if conn.session_id is not None and conn.session_id in self._sessions:
                self._sessions[conn.session_id] = (conn.seq, conn.intents, conn.shard)
            conn.outbox.put_nowait(None)
            await writer
            self._connections.remove(conn)
            if self._active.get(conn.shard[0]) is conn:
                del self._active[conn.shard[0]]
            self._changed()
        return ws

    def _on_gateway_frame(self, conn: _Connection, frame: Json) -> None:
        op, d = frame.get("op"), frame.get("d")
        if op == 1:  # HEARTBEAT
            self._enqueue(conn, {"op": 11})
        elif op == 2:  # IDENTIFY
            self._identify(conn, d)
        elif op == 6:  # RESUME
            self._resume(conn, d)
        elif op == 8:  # REQUEST_GUILD_MEMBERS
            self._request_members(conn, d)
        elif op == 3:  # PRESENCE_UPDATE
            self.presence_updates.append(d)
        else:
            log.info("fakediscord: ignoring gateway op %s", op)

    def _identify(self, conn: _Connection, d: Json) -> None:
        self.identifies.append(d)
        shard_id, count = d.get("shard", [0, 1])
        conn.shard = (int(shard_id), int(count))
        conn.session_id = secrets.token_hex(16)
        conn.intents = int(d.get("intents", 0))
        conn.identified = True
        self._sessions[conn.session_id] = (0, conn.intents, conn.shard)
        self._active[conn.shard[0]] = conn
        guilds = [gid for gid in self.guilds if _shard_of(gid, conn.shard[1]) == conn.shard[0]]
        ready = {
            "v": 10,
            "user": self._bot_user_full(),
            "guilds": [{"id": gid, "unavailable": True} for gid in guilds],
            "session_id": conn.session_id,
            "resume_gateway_url": self.gateway_url,
            "shard": list(conn.shard),
            "application": {"id": self.app_id, "flags": APPLICATION_FLAGS},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "session_type": "normal",
        }
        self._enqueue(conn, {"op": 0, "t": "READY", "d": ready})
        for gid in guilds:
            self._enqueue(conn, {"op": 0, "t": "GUILD_CREATE", "d": self._guild_create_payload(gid)})

        def mark_ready() -> None:
            conn.ready = True
            self.ready_count += 1
            self._changed()

        self._enqueue(conn, None, on_sent=mark_ready)

    def _resume(self, conn: _Connection, d: Json) -> None:
        session = self._sessions.get(d.get("session_id", ""))
        if session is None:
            self._enqueue(conn, {"op": 9, "d": False})  # INVALID_SESSION, not resumable: re-IDENTIFY
            return
        conn.session_id = d["session_id"]
        conn.seq, conn.intents, conn.shard = session
        conn.identified = True
        self._active[conn.shard[0]] = conn

        def mark_resumed() -> None:
            conn.ready = True
            self.resume_count += 1
            self._changed()

        self._enqueue(conn, {"op": 0, "t": "RESUMED", "d": {}}, on_sent=mark_resumed)

    def _request_members(self, conn: _Connection, d: Json) -> None:
        gid = str(d["guild_id"])
        members = list(self.members.get(gid, {}).values())
        if d.get("user_ids"):
            wanted = {str(u) for u in d["user_ids"]}
            members = [m for m in members if m["user"]["id"] in wanted]
        elif d.get("query"):
            members = [m for m in members if m["user"]["username"].startswith(d["query"])]
        if d.get("limit"):
            members = members[: d["limit"]]
        chunk = {"guild_id": gid, "members": members, "chunk_index": 0, "chunk_count": 1, "not_found": []}
        if d.get("nonce") is not None:
            chunk["nonce"] = d["nonce"]
        self._enqueue(conn, {"op": 0, "t": "GUILD_MEMBERS_CHUNK", "d": chunk})

    # ================================================================== HTTP

    async def _http(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/gateway":
            return await self._gateway(request)
        if path.startswith("/attachments/"):
            if self.cdn_gate is not None:
                self.cdn_waiting += 1
                self._changed()
                await self.cdn_gate.wait()
                self.cdn_waiting -= 1
            return self._cdn(path)
        if not path.startswith(API_PREFIX + "/"):
            self.unknown_requests.append((request.method, path))
            log.warning("fakediscord: unknown URL %s %s", request.method, path)
            return _error(404, 0, f"fakediscord: no such URL {path}")
        return await self._rest(request, path[len(API_PREFIX) :])

    def _cdn(self, path: str) -> web.Response:
        parts = path.split("/")  # "", "attachments", channel, attachment id, filename
        blob = self._blobs.get(parts[3]) if len(parts) >= 5 else None
        if blob is None:
            return web.Response(status=404, text="not found")
        data, content_type = blob
        self.cdn_served.append(parts[3])
        return web.Response(body=data, headers={"Content-Type": content_type})

    async def _rest(self, request: web.Request, path: str) -> web.StreamResponse:
        method = request.method
        self.requests.append((method, path))
        try:
            for route_method, pattern, handler in self._routes:
                if route_method == method and (match := pattern.fullmatch(path)):
                    return await handler(request, **match.groupdict())
            self.unknown_requests.append((method, path))
            log.warning("fakediscord: no route for %s %s", method, path)
            return _error(404, 0, f"fakediscord: no route for {method} {path}")
        except Exception as exc:
            # Never 5xx: discord.py would retry with multi-second sleeps.  Tests should check .errors.
            log.exception("fakediscord handler error for %s %s", method, path)
            self.errors.append(f"{method} {path}: {exc!r}")
            return _error(400, 0, f"fakediscord internal error: {exc!r}")
        finally:
            self._changed()

    def _register_routes(self) -> None:
        def route(method: str, template: str, handler: Handler) -> None:
            pattern = re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template))
            self._routes.append((method, pattern, handler))

        # Specific routes first: "{user_id}" would also match "@me".
        route("GET", "/users/@me", self._get_me)
        route("POST", "/users/@me/channels", self._open_dm)
        route("GET", "/users/{user_id}", self._get_user)
        route("GET", "/oauth2/applications/@me", self._get_application)
        route("GET", "/applications/@me", self._get_application)
        route("GET", "/gateway", self._get_gateway)
        route("GET", "/gateway/bot", self._get_gateway)
        route("GET", "/applications/{app_id}/commands", self._get_commands)
        route("PUT", "/applications/{app_id}/commands", self._put_commands)
        route("GET", "/applications/{app_id}/guilds/{guild_id}/commands", self._get_commands)
        route("PUT", "/applications/{app_id}/guilds/{guild_id}/commands", self._put_commands)
        route("GET", "/guilds/{guild_id}", self._get_guild)
        route("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member)
        route("GET", "/channels/{channel_id}", self._get_channel)
        route("POST", "/channels/{channel_id}/typing", self._post_typing)
        route("GET", "/channels/{channel_id}/messages", self._get_messages)
        route("POST", "/channels/{channel_id}/messages", self._post_message)
        route("GET", "/channels/{channel_id}/messages/{message_id}", self._get_message)
        route("PATCH", "/channels/{channel_id}/messages/{message_id}", self._patch_message)
        route("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_message_route)
        route("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._put_reaction)
        route("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._delete_reaction)
        route("POST", "/interactions/{interaction_id}/{token}/callback", self._interaction_callback)
        route("POST", "/webhooks/{app_id}/{token}", self._followup)
        route("GET", "/webhooks/{app_id}/{token}/messages/{message_id}", self._get_webhook_message)
        route("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}", self._patch_webhook_message)
        route("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}", self._delete_webhook_message)

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Json, list[Json]]:
        """JSON body, or multipart (payload_json + files[n]) as discord.py sends with files."""
        if request.content_type.startswith("multipart/"):
            payload: Json = {}
            files: list[Json] = []
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())  # type: ignore[union-attr]
                elif part.filename is not None:  # type: ignore[union-attr]
                    filename = part.filename  # type: ignore[union-attr]
                    data = bytes(await part.read())  # type: ignore[union-attr]
                    # discord.py always says application/octet-stream; Discord sniffs, we guess.
                    ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
                    files.append({"filename": filename, "data": data, "content_type": ctype})
            return payload, files
        raw = await request.read()
        return (json.loads(raw) if raw else {}), []

    # ---------------------------------------------------------------- users, app, gateway

    async def _get_me(self, request: web.Request) -> web.Response:
        return _json(self._bot_user_full())

    async def _get_user(self, request: web.Request, user_id: str) -> web.Response:
        if user_id not in self.users:
            return _error(404, 10013, "Unknown User")
        return _json(self.users[user_id])

    async def _open_dm(self, request: web.Request) -> web.Response:
        body, _ = await self._read_body(request)
        recipient = str(body["recipient_id"])
        if recipient not in self.users:
            return _error(404, 10013, "Unknown User")
        return _json(self.dm_channel(recipient))

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json(
            {
                "id": self.app_id,
                "name": self.users[self.bot_user_id]["username"],
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self.owner,
                "team": None,
                "verify_key": "0" * 64,
                "flags": self.application_flags,
                "interactions_endpoint_url": None,  # non-None makes discord.py warn
                "bot": self.users[self.bot_user_id],
            }
        )

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": self.shards,
                "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1},
            }
        )

    # ---------------------------------------------------------------- application commands

    async def _get_commands(self, request: web.Request, app_id: str, guild_id: str | None = None) -> web.Response:
        return _json(self.guild_commands.get(guild_id, []) if guild_id else self.registered_commands)

    async def _put_commands(self, request: web.Request, app_id: str, guild_id: str | None = None) -> web.Response:
        body, _ = await self._read_body(request)
        current = self.guild_commands.get(guild_id, []) if guild_id else self.registered_commands
        previous = {(c["name"], c.get("type", 1)): c for c in current}
        commands = []
        for cmd in body:
            old = previous.get((cmd["name"], cmd.get("type", 1)))
            registered = {
                "description": "",
                "type": 1,
                "default_member_permissions": None,
                **cmd,
                "id": old["id"] if old else self._ids.next(),  # ids are stable across re-syncs
                "application_id": self.app_id,
                "version": self._ids.next(),
            }
            if guild_id:
                registered["guild_id"] = guild_id
            commands.append(registered)
        if guild_id:
            self.guild_commands[guild_id] = commands
        else:
            self.registered_commands = commands
        return _json(commands)

    # ---------------------------------------------------------------- guilds, channels

    async def _get_guild(self, request: web.Request, guild_id: str) -> web.Response:
        if guild_id not in self.guilds:
            return _error(404, 10004, "Unknown Guild")
        return _json(self.guilds[guild_id])

    async def _get_member(self, request: web.Request, guild_id: str, user_id: str) -> web.Response:
        member = self.members.get(guild_id, {}).get(user_id)
        if member is None:
            return _error(404, 10007, "Unknown Member")
        return _json(member)

    async def _get_channel(self, request: web.Request, channel_id: str) -> web.Response:
        if channel_id not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        return _json(self.channels[channel_id])

    async def _post_typing(self, request: web.Request, channel_id: str) -> web.Response:
        if channel_id not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        self.typing.append({"channel_id": channel_id, "at": time.monotonic()})
        return _no_content()

    # ---------------------------------------------------------------- channel messages

    def _channel_message(self, channel_id: str, message_id: str) -> Json | None:
        message = self.messages.get(message_id)
        if message is None or message["channel_id"] != channel_id or message.get("deleted"):
            return None
        return message

    async def _get_messages(self, request: web.Request, channel_id: str) -> web.Response:
        if channel_id not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        query = request.query
        limit = int(query.get("limit", 50))
        found = [
            m
            for m in self.messages.values()
            if m["channel_id"] == channel_id and not m.get("deleted") and not m["flags"] & (EPHEMERAL | LOADING)
        ]
        if "before" in query:
            found = [m for m in found if int(m["id"]) < int(query["before"])]
        if "after" in query:
            found = [m for m in found if int(m["id"]) > int(query["after"])]
        found.sort(key=lambda m: int(m["id"]), reverse=True)  # Discord returns newest first
        if "after" in query:
            found = found[-limit:]
        return _json([self._wire(m) for m in found[:limit]])

    async def _post_message(self, request: web.Request, channel_id: str) -> web.Response:
        if channel_id not in self.channels:
            return _error(404, 10003, "Unknown Channel")
        body, files = await self._read_body(request)
        if (rejection := self._validate_body(body, files)) is not None:
            return rejection
        record = self._create_bot_message(self.channels[channel_id], body, files, source="channel")
        return _json(self._wire(record))

    async def _get_message(self, request: web.Request, channel_id: str, message_id: str) -> web.Response:
        message = self._channel_message(channel_id, message_id)
        if message is None:
            return _error(404, 10008, "Unknown Message")
        return _json(self._wire(message))

    async def _patch_message(self, request: web.Request, channel_id: str, message_id: str) -> web.Response:
        message = self._channel_message(channel_id, message_id)
        if message is None:
            return _error(404, 10008, "Unknown Message")
        if message["author"]["id"] != self.bot_user_id:
            return self._reject(403, 50005, "Cannot edit a message authored by another user")
        if self.drop_writes:
            return await self._drop(request)
        if self.refuse_edits:
            self.refuse_edits -= 1
            return self._reject(403, 50013, "Missing Permissions")
        body, files = await self._read_body(request)
        if (rejection := self._validate_body(body, files, editing=True)) is not None:
            return rejection
        self._edit_message(message, body, files, kind="edit")
        return _json(self._wire(message))

    async def _delete_message_route(self, request: web.Request, channel_id: str, message_id: str) -> web.Response:
        message = self._channel_message(channel_id, message_id)
        if message is None:
            return _error(404, 10008, "Unknown Message")
        if self.drop_writes:
            return await self._drop(request)
        self._delete_message(message)
        return _no_content()

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        """The connection closed without an answer: Discord unreachable halfway (the client sees aiohttp.ClientError)."""
        self.drop_writes -= 1
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=204)

    async def _put_reaction(self, request: web.Request, channel_id: str, message_id: str, emoji: str) -> web.Response:
        if self._channel_message(channel_id, message_id) is None:
            return _error(404, 10008, "Unknown Message")
        self.reactions.append({"channel_id": channel_id, "message_id": message_id, "emoji": emoji, "action": "add"})
        return _no_content()

    async def _delete_reaction(self, request: web.Request, channel_id: str, message_id: str, emoji: str) -> web.Response:
        if self._channel_message(channel_id, message_id) is None:
            return _error(404, 10008, "Unknown Message")
        self.reactions.append({"channel_id": channel_id, "message_id": message_id, "emoji": emoji, "action": "remove"})
        return _no_content()

    # ---------------------------------------------------------------- interaction responses

    async def _interaction_callback(self, request: web.Request, interaction_id: str, token: str) -> web.Response:
        record = self.interactions.get(interaction_id)
        if record is None or record["token"] != token:
            return _error(404, 10062, "Unknown interaction")
        if record["callback_type"] is not None:
            return self._reject(400, 40060, "Interaction has already been acknowledged.")
        body, files = await self._read_body(request)
        ctype = int(body["type"])
        data = body.get("data") or {}
        flags = data.get("flags") or 0
        channel = self.channels[record["channel_id"]]
        message: Json | None = None
        if ctype == CB_MESSAGE:
            if (rejection := self._validate_body(data, files)) is not None:
                return rejection
            message = self._create_bot_message(channel, data, files, source="interaction", interaction=record)
            record["original_message_id"] = message["id"]
        elif ctype == CB_DEFERRED_MESSAGE:
            # "Thinking...": the message materialises on the first followup or @original edit.
            record["original_message_id"] = self._ids.next()
            record["deferred_flags"] = (flags & EPHEMERAL) | LOADING
        elif ctype in (CB_DEFERRED_UPDATE, CB_UPDATE_MESSAGE):
            if record["message_id"] is None:
                return self._reject(400, 40004, "Update callbacks are only valid for component interactions")
            record["original_message_id"] = record["message_id"]
            message = self.messages[record["message_id"]]
            if ctype == CB_UPDATE_MESSAGE:
                if (rejection := self._validate_body(data, files, editing=True)) is not None:
                    return rejection
                self._edit_message(message, data, files, kind="update_message")
        elif ctype not in (CB_PONG, CB_MODAL):
            return self._reject(400, 50035, f"Invalid interaction callback type {ctype}")
        record["callback_type"] = ctype
        self._record_response(record, "callback", body, files, message, callback_type=ctype)
        ephemeral = bool((message["flags"] if message else flags) & EPHEMERAL)
        response: Json = {
            "interaction": {
                "id": interaction_id,
                "type": record["type"],
                "activity_instance_id": None,
                "response_message_id": record["original_message_id"],
                "response_message_loading": ctype == CB_DEFERRED_MESSAGE,
                "response_message_ephemeral": ephemeral,
            },
            "resource": {"type": ctype},
        }
        if message is not None:
            response["resource"]["message"] = self._wire(message)
        return _json(response)

    def _materialise_deferred(self, record: Json, body: Json, files: list[Json]) -> Json:
        """The first followup / @original edit after a deferral becomes the original response."""
        flags = record.pop("deferred_flags") & EPHEMERAL
        return self._create_bot_message(
            self.channels[record["channel_id"]],
            body,
            files,
            source="interaction",
            interaction=record,
            flags=flags | ((body.get("flags") or 0) & ~EPHEMERAL),
            message_id=record["original_message_id"],
        )

    def _acked_interaction(self, token: str) -> Json | None:
        record = self._by_token.get(token)
        if record is None or record["callback_type"] is None:
            return None  # Discord: followups only exist after the interaction was acknowledged
        return record

    async def _followup(self, request: web.Request, app_id: str, token: str) -> web.Response:
        record = self._acked_interaction(token)
        if record is None:
            return _error(404, 10015, "Unknown Webhook")
        body, files = await self._read_body(request)
        if (rejection := self._validate_body(body, files)) is not None:
            return rejection
        if "deferred_flags" in record:
            message = self._materialise_deferred(record, body, files)
        else:
            message = self._create_bot_message(
                self.channels[record["channel_id"]], body, files, source="followup", interaction=record
            )
        self._record_response(record, "followup", body, files, message)
        return _json(self._wire(message))

    def _webhook_message(self, record: Json, message_id: str) -> Json | None:
        mid = record["original_message_id"] if message_id == "@original" else message_id
        message = self.messages.get(mid or "")
        if message is None or message.get("deleted"):
            return None
        return message

    async def _get_webhook_message(self, request: web.Request, app_id: str, token: str, message_id: str) -> web.Response:
        record = self._acked_interaction(token)
        if record is None:
            return _error(404, 10015, "Unknown Webhook")
        if message_id == "@original" and "deferred_flags" in record:  # still "thinking"
            channel = self.channels[record["channel_id"]]
            placeholder = self._build_message(
                channel,
                self.users[self.bot_user_id],
                "",
                message_type=20,
                reference=None,
                allowed_mentions=None,
                attachments=[],
                embeds=[],
                flags=record["deferred_flags"],
            )
            placeholder["id"] = record["original_message_id"]
            return _json(placeholder)
        message = self._webhook_message(record, message_id)
        if message is None:
            return _error(404, 10008, "Unknown Message")
        return _json(self._wire(message))

    async def _patch_webhook_message(self, request: web.Request, app_id: str, token: str, message_id: str) -> web.Response:
        record = self._acked_interaction(token)
        if record is None:
            return _error(404, 10015, "Unknown Webhook")
        body, files = await self._read_body(request)
        if (rejection := self._validate_body(body, files, editing=True)) is not None:
            return rejection
        kind = "edit_original" if message_id == "@original" else "edit_followup"
        if message_id == "@original" and "deferred_flags" in record:
            message = self._materialise_deferred(record, body, files)
        else:
            message = self._webhook_message(record, message_id)
            if message is None:
                return _error(404, 10008, "Unknown Message")
            self._edit_message(message, body, files, kind=kind)
        self._record_response(record, kind, body, files, message)
        return _json(self._wire(message))

    async def _delete_webhook_message(self, request: web.Request, app_id: str, token: str, message_id: str) -> web.Response:
        record = self._acked_interaction(token)
        if record is None:
            return _error(404, 10015, "Unknown Webhook")
        message = self._webhook_message(record, message_id)
        if message is None:
            return _error(404, 10008, "Unknown Message")
        self._delete_message(message)
        kind = "delete_original" if message_id == "@original" else "delete_followup"
        self._record_response(record, kind, {}, [], message)
        return _no_content()
