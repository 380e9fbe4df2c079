"""touch_presence and remove_presence on the handlers of real consumers."""

from __future__ import annotations

import asyncio
import atexit
import base64
import functools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from asgiref.sync import sync_to_async
from celery import Celery
from channels.exceptions import DenyConnection
from django.conf import settings
from django.test import override_settings

from channels_presence import operations, outbox, protocol
from channels_presence.consumers import TRY_AGAIN_LATER, LayerOutageMixin
from channels_presence.decorators import add_presence, remove_presence
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from channels_presence.outbox import Outbox
from tests.consumers import (
    ROOMS,
    AsyncDecoratedConsumer,
    AsyncEchoConsumer,
    AsyncJsonDecoratedConsumer,
    AsyncJsonEchoConsumer,
    AsyncJsonJoiningConsumer,
    Client,
    DecoratedConsumer,
    EchoConsumer,
    JsonDecoratedConsumer,
    JsonEchoConsumer,
    JsonJoiningConsumer,
    channel_of,
    connected,
    url_room,
)
from tests.helpers import (
    HEARTBEATS,
    LONG_HEARTBEAT,
    TIMEOUT,
    ago,
    celery_mode,
    closed_port,
    group_members,
    last_seen,
    layer_down,
    layer_outages,
    rooms_of,
    set_last_seen_back,
    sockets,
    touched_since,
    wait_until,
    wait_until_touched,
)

pytestmark = pytest.mark.django_db(transaction=True)

#: Decorated ``receive(self, text_data=None, bytes_data=None)``, sync and async.
ON_RECEIVE = [DecoratedConsumer, AsyncDecoratedConsumer]
#: Decorated ``receive_json(self, content, **kwargs)``, sync and async.
ON_RECEIVE_JSON = [JsonDecoratedConsumer, AsyncJsonDecoratedConsumer]
ALL = ON_RECEIVE + ON_RECEIVE_JSON

HEARTBEAT = '"heartbeat"'


@pytest.mark.parametrize("frame", HEARTBEATS)
@pytest.mark.parametrize("consumer", ALL)
async def test_heartbeat_touches_without_calling_the_handler(consumer, frame):
    async with connected(consumer.as_asgi()) as client:
        before = await set_last_seen_back()

        await client.send_to(text_data=frame)
        await wait_until_touched(before)

        # Frames are handled in order: a handled heartbeat would answer first.
        await client.answer('"ping"')
        assert len(client.texts) == 1


@pytest.mark.parametrize("consumer", ON_RECEIVE_JSON)
async def test_json_content_equal_to_heartbeat_is_a_heartbeat_however_long(consumer):
    # receive_json is handed the content already decoded, whatever its length.
    async with connected(consumer.as_asgi()) as client:
        before = await set_last_seen_back()

        await client.send_to(text_data=LONG_HEARTBEAT)
        await wait_until_touched(before)

        await client.answer('"ping"')
        assert len(client.texts) == 1


@pytest.mark.parametrize("consumer", ALL)
async def test_frames_that_only_look_like_a_heartbeat_reach_the_handler(consumer):
    frames = ['"heartbeats"', '{"heartbeat": 1}', '["heartbeat"]', '"Heartbeat"']
    if consumer in ON_RECEIVE:
        # Too long to be decoded, or not JSON at all: a JSON consumer would
        # take the first as content "heartbeat", and refuse the others.
        frames += [LONG_HEARTBEAT, "heartbeat", '"heartbeat', "'heartbeat'"]
    async with connected(consumer.as_asgi()) as client:
        for frame in frames:
            await client.answer(frame)


@pytest.mark.parametrize("consumer", ON_RECEIVE)
async def test_binary_frames_touch_and_reach_the_handler(consumer):
    async with connected(consumer.as_asgi()) as client:
        before = await set_last_seen_back()

        for frame in (b"\x00\xff", HEARTBEAT.encode()):
            await client.send_to(bytes_data=frame)
            echo = await client.receive_type("echo")
            assert echo == {"type": "echo", "bytes": frame.hex()}

        assert await touched_since(before)


@pytest.mark.parametrize("consumer", ALL)
async def test_touches_within_the_touch_interval_are_coalesced(consumer):
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=60):
        async with connected(consumer.as_asgi()) as client:
            before = await set_last_seen_back()
            await client.answer('"first"')
            assert await touched_since(before)

            before = await set_last_seen_back()
            for n in range(10):
                await client.send_to(text_data=HEARTBEAT)
                await client.answer(json.dumps(f"frame {n}"))

            # No later frame wrote last_seen, however far back it was set.
            assert await last_seen() == [before] * len(ROOMS)


@pytest.mark.parametrize("consumer", ALL)
async def test_the_touch_interval_is_kept_per_socket(consumer):
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=60):
        async with connected(consumer.as_asgi()) as first:
            (first_socket,) = await sockets()
            async with connected(consumer.as_asgi()) as second:
                (second_socket,) = await sockets() - {first_socket}
                before = await set_last_seen_back()

                await first.answer('"ping"')
                await second.answer('"ping"')

                assert await touched_since(before, first_socket)
                assert await touched_since(before, second_socket)


@pytest.mark.parametrize("consumer", ALL)
async def test_every_message_touches_when_the_touch_interval_is_zero(consumer):
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=0):
        async with connected(consumer.as_asgi()) as client:
            for n in range(3):
                before = await set_last_seen_back()
                await client.answer(json.dumps(f"frame {n}"))
                assert await touched_since(before)

            before = await set_last_seen_back()
            await client.send_to(text_data=HEARTBEAT)
            await wait_until_touched(before)


@pytest.mark.parametrize("consumer", ALL)
async def test_remove_presence_leaves_every_room_then_calls_the_handler(consumer):
    async with connected(consumer.as_asgi()) as staying:
        (stayer,) = await sockets()
        async with connected(consumer.as_asgi()) as leaving:
            (leaver,) = await sockets() - {stayer}
            for room in ROOMS:
                assert group_members(room) == {stayer, leaver}

            await leaving.disconnect(code=4001)

        # The handler ran once, with the close code, after the rows were gone.
        assert leaving.calls == [("disconnect", 4001, 0)]
        assert await sockets() == {stayer}
        for room in ROOMS:
            assert group_members(room) == {stayer}
        assert staying.calls == []


# add_presence on connect.

SYNC_BASES = [EchoConsumer, JsonEchoConsumer]
ASYNC_BASES = [AsyncEchoConsumer, AsyncJsonEchoConsumer]
BASES = SYNC_BASES + ASYNC_BASES


def joining(
    base: type,
    room: Any,
    behaviour: str = "accept",
    methods: dict[str, Any] | None = None,
) -> Any:
    """``base`` with a ``connect`` decorated with ``add_presence(room)``.

    ``behaviour`` is what connect does: "accept"; "close" without accepting;
    "deny" (raise DenyConnection); "accept, close". ``methods`` are added.
    """
    if base in ASYNC_BASES:

        async def connect(self: Any) -> None:
            if behaviour == "deny":
                raise DenyConnection
            if behaviour.startswith("accept"):
                await self.accept()
            if behaviour.endswith("close"):
                await self.close()

    else:

        def connect(self: Any) -> None:  # type: ignore[misc]
            if behaviour == "deny":
                raise DenyConnection
            if behaviour.startswith("accept"):
                self.accept()
            if behaviour.endswith("close"):
                self.close()

    name = f"Joining{base.__name__}"
    attributes = {"connect": add_presence(room)(connect), **(methods or {})}
    return type(name, (base,), attributes)


async def _async_handler(self: Any, event: Any) -> None:
    self.scope["calls"].append(("event", event["type"]))


async def _presence_expired(self: Any, event: Any) -> None:
    pass


def _sync_handler(self: Any, event: Any) -> None:
    self.scope["calls"].append(("event", event["type"]))


@pytest.mark.parametrize("base", BASES)
async def test_add_presence_joins_the_room_once_connect_accepted(base):
    consumer = joining(base, "lobby")
    async with connected(consumer.as_asgi()) as client:
        # Handled after connect returned: the join is done by then.
        await client.answer('"ping"')
        (socket,) = await sockets()
        assert await rooms_of(socket) == {"lobby"}
        assert group_members("lobby") == {socket}
    assert await Presence.objects.filter(user__isnull=False).aexists() is False


@pytest.mark.parametrize("base", BASES)
async def test_add_presence_takes_the_room_from_a_callable(base):
    consumer = joining(base, url_room)
    route = {"kwargs": {"room": "kitchen"}}
    async with connected(consumer.as_asgi(), url_route=route) as client:
        await client.answer('"ping"')
        (socket,) = await sockets()
        assert await rooms_of(socket) == {"kitchen"}
        assert group_members("kitchen") == {socket}


@pytest.mark.parametrize("base", BASES)
async def test_add_presence_joins_as_the_user_of_the_scope(base, alice):
    consumer = joining(base, "lobby")
    async with connected(consumer.as_asgi(), user=alice) as client:
        await client.answer('"ping"')
        presence = await Presence.objects.select_related("user").aget()
        assert presence.user == alice


@pytest.mark.parametrize("behaviour", ["close", "deny"])
@pytest.mark.parametrize("base", BASES)
async def test_a_connect_that_refuses_the_socket_joins_nothing(base, behaviour):
    client = Client(joining(base, "lobby", behaviour).as_asgi())
    accepted, _ = await client.connect(TIMEOUT)
    assert not accepted
    # Handled after connect returned, and only then does the consumer stop.
    await client.disconnect()
    assert await sockets() == set()
    assert group_members("lobby") == set()


@pytest.mark.parametrize("base", BASES)
async def test_a_connect_that_accepts_then_closes_joins_nothing(base):
    client = Client(joining(base, "lobby", "accept, close").as_asgi())
    accepted, _ = await client.connect(TIMEOUT)
    assert accepted
    assert (await client.receive_output(TIMEOUT))["type"] == "websocket.close"
    await client.disconnect()
    assert await sockets() == set()
    assert group_members("lobby") == set()


async def _async_room(consumer: Any) -> str:
    return "lobby"


@pytest.mark.parametrize(
    "room",
    [42, None, b"lobby", ["lobby"], _async_room, functools.partial(_async_room)],
    ids=["int", "None", "bytes", "list", "async function", "async partial"],
)
def test_add_presence_refuses_a_bad_room_when_it_decorates(room):
    with pytest.raises(TypeError, match=r"add_presence\(room\)"):
        add_presence(room)


async def _run_to_the_end(client: Client) -> None:
    """Connect, then wait until the application ends; raise what ended it."""
    await client.connect(TIMEOUT)
    await client.wait(TIMEOUT)


@pytest.mark.parametrize("returned", [42, None, b"lobby"], ids=repr)
@pytest.mark.parametrize("base", BASES)
async def test_a_room_callable_that_returns_no_string_is_a_type_error(base, returned):
    client = Client(joining(base, lambda consumer: returned).as_asgi())
    with pytest.raises(TypeError, match="it must return the room's name"):
        await _run_to_the_end(client)
    assert await sockets() == set()
    assert group_members("lobby") == set()


@pytest.mark.parametrize(
    ("handlers", "events"),
    [
        ({}, 0),
        ({"presence_changed": "handler"}, 0),
        ({"presence_state": "handler"}, protocol.STATE_EVENTS),
        ({"presence_diff": "handler"}, protocol.DIFF_EVENTS),
        ({"presence_expired": "handler"}, protocol.EXPIRED_EVENTS),
        (
            {"presence_state": "h", "presence_diff": "h", "presence_expired": "h"},
            protocol.ALL_EVENTS,
        ),
    ],
    ids=["no handler", "1.0.0's name only", "state", "diff", "expired", "all"],
)
@pytest.mark.parametrize("base", BASES)
async def test_a_consumer_is_sent_only_the_events_it_has_handlers_for(
    base, handlers, events
):
    handler = _async_handler if base in ASYNC_BASES else _sync_handler
    methods = {name: handler for name in handlers}
    async with connected(joining(base, "lobby", methods=methods).as_asgi()) as client:
        await client.answer('"ping"')
        (socket,) = await sockets()
        presence = await Presence.objects.aget(channel_name=socket)
        # Expiry notices always: without a handler of its own, one of ours
        # has the socket join again at its next message.
        assert presence.events == events | protocol.EXPIRED_EVENTS
        assert group_members("lobby") == {socket}
        subscribed = {socket} if events & protocol.DIFF_EVENTS else set()
        assert group_members(events_group("lobby")) == subscribed
        # Others come and go, and beat sends its beacon: the consumer gets
        # what it handles, and nothing it cannot (that would close it).
        await Room.objects.aadd("lobby", "specific.other!1")
        await sync_to_async(operations.send_beacons)(60)
        expected = []
        if events & protocol.STATE_EVENTS:
            # Its state, instead of its own join's diff.
            expected.append("presence.state")
        elif events & protocol.DIFF_EVENTS:
            expected.append("presence.diff")
        if events & protocol.DIFF_EVENTS:
            # The other's join: it may wait for the end of the room's
            # throttle interval (0.1 s) after the first.
            expected.append("presence.diff")

        def received() -> list[str]:
            return [call[1] for call in client.calls if call[0] == "event"]

        await wait_until(lambda: len(received()) >= len(expected))
        await client.answer('"pong"')
        assert received() == expected


async def test_a_subscribed_async_consumer_joins_the_events_group_of_its_room():
    methods = {"presence_diff": _async_handler, "presence_expired": _presence_expired}
    consumer = joining(AsyncJsonEchoConsumer, url_room, methods=methods)
    route = {"kwargs": {"room": "kitchen"}}
    async with connected(consumer.as_asgi(), url_route=route) as client:
        await client.answer('"ping"')
        (socket,) = await sockets()
        assert group_members(events_group("kitchen")) == {socket}
        assert group_members(events_group("lobby")) == set()


# add_presence in Celery mode: the group at once, the row left to a worker.


@pytest.fixture
def unreachable_outbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Outbox]:
    """The process's outbox, replaced by one whose broker is not there.

    What the socket side hands to Celery stays pending in it, to be looked at.
    """
    app = Celery(
        "unreachable",
        broker=f"redis://127.0.0.1:{closed_port()}/0",
        # Give up on the first refused connection, not after seconds of retries.
        broker_transport_options={"max_retries": 0},
        # Current, it would be the app every later test sends with.
        set_as_current=False,
    )
    box = Outbox(app=app, exit_timeout=1)
    monkeypatch.setattr(outbox, "default", box)
    try:
        with override_settings(CHANNELS_PRESENCE_USE_CELERY=True):
            yield box
    finally:
        box.close()
        atexit.unregister(box.close)
        app.close()


@pytest.mark.parametrize("base", BASES)
async def test_in_celery_mode_the_socket_is_in_the_group_at_once_and_one_task_waits(
    base, unreachable_outbox
):
    async with connected(joining(base, "lobby").as_asgi()) as client:
        await client.answer('"ping"')
        (socket,) = group_members("lobby")
        assert socket.startswith("specific.")
        # The row is the worker's to write; the broker is down, so it waits.
        assert await sockets() == set()
        assert unreachable_outbox.pending() == (1, 0)


@pytest.fixture
def celery_queue() -> Iterator[None]:
    """Celery mode, with the run's queue empty at the start and at the end."""
    with celery_mode():
        yield


def _queued_tasks() -> list[tuple[str, list[Any], dict[str, Any]]]:
    """(task name, args, kwargs) of each task waiting in the run's queue."""
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        key = f"{prefix}{settings.CELERY_TASK_DEFAULT_QUEUE}"
        raw: list[bytes] = client.lrange(key, 0, -1)  # type: ignore[assignment]
    finally:
        client.close()
    tasks = []
    for item in reversed(raw):  # kombu LPUSHes: the oldest is last
        message = json.loads(item)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        tasks.append((message["headers"]["task"], args, kwargs))
    return tasks


@pytest.mark.parametrize("base", [JsonEchoConsumer, AsyncJsonEchoConsumer])
async def test_in_celery_mode_one_add_presence_task_reaches_the_broker(
    base, celery_queue, alice
):
    handler = _sync_handler if base in SYNC_BASES else _async_handler
    methods = {"presence_diff": handler, "presence_expired": handler}
    consumer = joining(base, "lobby", methods=methods)
    async with connected(consumer.as_asgi(), user=alice) as client:
        await client.answer('"ping"')
        (socket,) = group_members("lobby")
        assert outbox.default.flush(timeout=TIMEOUT)
        ((name, args, kwargs),) = _queued_tasks()
        assert name == "channels_presence.tasks.add_presence"
        assert args == ["lobby", socket, alice.pk]
        assert kwargs["subscribe"] == ["diff", "expired"]
        assert isinstance(kwargs["at"], float)
        assert await sockets() == set()


# A channel-layer outage: LayerOutageMixin closes the socket (4503).


class OutageConsumer(LayerOutageMixin, JsonEchoConsumer):
    """Joins the lobby with add_presence; notes its connect; leaves on disconnect."""

    @add_presence("lobby")
    def connect(self):
        self.scope["calls"].append(("connect",))
        self.accept()

    @remove_presence
    def disconnect(self, code):
        super().disconnect(code)


class AsyncOutageConsumer(LayerOutageMixin, AsyncJsonEchoConsumer):
    """:class:`OutageConsumer`, async."""

    @add_presence("lobby")
    async def connect(self):
        self.scope["calls"].append(("connect",))
        await self.accept()

    @remove_presence
    async def disconnect(self, code):
        await super().disconnect(code)


OUTAGE_CONSUMERS = [OutageConsumer, AsyncOutageConsumer]
CLOSED_FOR_OUTAGE = {"type": "websocket.close", "code": TRY_AGAIN_LATER}


@pytest.mark.parametrize("consumer", OUTAGE_CONSUMERS)
async def test_a_decorated_socket_whose_channel_layer_is_down_is_closed_with_4503(
    consumer, no_outage_yet, caplog
):
    clients = [Client(consumer.as_asgi()) for _ in range(2)]
    with layer_down():
        for client in clients:
            accepted, _ = await client.connect(TIMEOUT)
            assert accepted
            assert await client.receive_output(TIMEOUT) == CLOSED_FOR_OUTAGE
            # What the client sends before its close is dropped.
            await client.send_to(text_data='"late"')
            # Its close ends the consumer, which does not raise.
            await client.disconnect(TRY_AGAIN_LATER)
            assert client.sent_so_far() == []
            # connect() ran, so disconnect() does, after remove_presence.
            assert client.calls == [("connect",), ("disconnect", TRY_AGAIN_LATER, 0)]
    # Two sockets, one line.
    assert len(layer_outages(caplog)) == 1


@pytest.mark.parametrize("consumer", OUTAGE_CONSUMERS)
async def test_a_socket_whose_layer_fails_before_connect_runs_neither_handler(
    consumer, no_outage_yet
):
    with layer_down():
        client = Client(consumer.as_asgi())
        # The consumer starts: its layer receive fails before the handshake.
        client.future  # noqa: B018
        await asyncio.sleep(0.2)
        accepted, _ = await client.connect(TIMEOUT)
        # Accepted only to be closed: a close before it would reach a
        # browser as a refused handshake (1006), which says nothing.
        assert accepted
        assert await client.receive_output(TIMEOUT) == CLOSED_FOR_OUTAGE
        await client.disconnect(TRY_AGAIN_LATER)
    assert client.calls == []
    assert group_members("lobby") == set()


# A socket a prune dropped.


@pytest.mark.parametrize("base", [JsonJoiningConsumer, AsyncJsonJoiningConsumer])
async def test_a_socket_without_presence_expired_joins_again_at_its_next_message(
    base,
):
    # A prune took it for gone (its touches were lost, say): its notice
    # reaches a handler of ours, and its next message joins it again.
    async with connected(base.as_asgi()) as client:
        socket = channel_of(client)
        await client.answer('"ping"')
        assert await rooms_of(socket) == {"lobby"}
        await Presence.objects.filter(channel_name=socket).aupdate(last_seen=ago(3600))
        await sync_to_async(operations.prune_presences)()
        assert await rooms_of(socket) == set()
        assert group_members("lobby") == set()
        # The notice is handled before the next frame.
        await client.answer('"pong"')
        await client.answer('"again"')
        assert await rooms_of(socket) == {"lobby"}
        assert group_members("lobby") == {socket}
