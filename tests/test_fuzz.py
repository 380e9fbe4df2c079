# mypy: disallow-subclassing-any=False
"""Fuzzing the public entry points with hypothesis.

Room and channel names (unicode, empty, over-long, control characters, NUL),
task arguments, and websocket frames (text, binary, malformed and deeply nested
JSON, megabytes long) go through the managers and their async twins, the
Celery tasks' bodies, dispatch, the consumer mixin and the decorators. Each
input gets the documented treatment or a ValueError or TypeError that says what
to do, and leaves no row, group membership or queued task half-made behind.

Examples are derandomized (the same on every run) and bounded, so that the file
takes well under a minute; each test prints how many it tried.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
import redis
from asgiref.sync import async_to_sync
from celery import Celery
from channels.generic.websocket import AsyncWebsocketConsumer, WebsocketConsumer
from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings
from django.test import override_settings
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from channels_presence import dispatch, outbox, tasks
from channels_presence.consumers import PresenceConsumerMixin
from channels_presence.decorators import add_presence, remove_presence, touch_presence
from channels_presence.models import Departure, Presence, Room
from channels_presence.outbox import BATCH_TASK, Outbox
from channels_presence.validation import EVENTS_PREFIX
from tasks import app as celery_app
from tests.consumers import Client
from tests.helpers import (
    TIMEOUT,
    closed_port,
    new_channel_layer,
    sqlite_pass_only,
    wait_until,
)
from tests.test_pipeline import drained, queued
from tests.workers import celery_worker, purge_queue

T = TypeVar("T")

# Bad input is refused before any database work: one pass is enough.
pytestmark = [pytest.mark.django_db(transaction=True), sqlite_pass_only]


def fuzz(max_examples: int) -> Any:
    """Hypothesis settings: bounded, the same examples on every run."""
    return hypothesis_settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


@pytest.fixture
def tried() -> Iterator[list[Any]]:
    """Counts the examples a test tried, and prints how many."""
    examples: list[Any] = []
    yield examples
    print(f"\n{len(examples)} examples tried")


# What can be passed as a name.

EDGE_NAMES = [
    "",
    "lobby",
    "a" * 99,
    "a" * 100,
    "a" * 101,
    "x" * 10_000,
    "a\x00b",
    "lobby\n",
    "\nlobby",
    "lob by",
    "lobby\t",
    "ünïcödé",
    "room-\u200b",
    "\ud800",
    EVENTS_PREFIX + "lobby",
    "specific.abc!def",
    "specific.abc!ünï",
    "specific.abc!",
    "specific.abc!de!f",
    "!",
    ".",
]
names = st.one_of(
    st.sampled_from(EDGE_NAMES),
    st.text(max_size=120),
    st.text(alphabet="abcXYZ019-_.!\x00\n ü", max_size=110),
)
not_strings = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.binary(max_size=10),
    st.lists(st.text(max_size=3), max_size=2),
)


def group_keys() -> set[bytes]:
    """Every group key of this run's channel layer, in Redis."""
    layer: Any = get_channel_layer()
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        pattern = layer._group_key("").decode() + "*"
        return set(client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


def state() -> tuple[Any, ...]:
    """The rows and group memberships that a rejected call must leave as they were."""
    return (
        set(Room.objects.values_list("channel_name", flat=True)),
        set(Presence.objects.values_list("room__channel_name", "channel_name")),
        set(Departure.objects.values_list("room_channel_name", "channel_name")),
        group_keys(),
    )


def valid(name: str, kind: str) -> bool:
    """Channels' own rule, restated: what a channel layer accepts as a name."""
    layer = BaseChannelLayer()
    try:
        if kind == "room":
            layer.require_valid_group_name(name)
        else:
            layer.require_valid_channel_name(name)
    except TypeError:
        return False
    if kind == "room" and name.startswith(EVENTS_PREFIX):
        return False
    return not name.endswith("\n")


def rejects_cleanly(call: Callable[[], Any]) -> bool:
    """Run ``call``; if it raises, it is a ValueError or TypeError and changed nothing.

    Returns whether it raised.
    """
    before = state()
    try:
        call()
    except (ValueError, TypeError) as raised:
        error: Exception | None = raised
    else:
        error = None
    if error is None:
        return False
    assert str(error), "an error that does not say what is wrong"
    assert state() == before, f"{error} left something behind"
    return True


# 1. The managers and their async twins.


@fuzz(120)
@given(room=names, socket=names)
@example(room="lobby", socket="specific.abc!ünï")
def test_the_managers_accept_what_channels_accepts_and_reject_the_rest_cleanly(
    tried, room, socket
):
    tried.append((room, socket))
    ok = valid(room, "room") and valid(socket, "channel")
    raised = rejects_cleanly(lambda: Room.objects.add(room, socket))
    assert raised != ok, (room, socket)
    if ok:
        assert Presence.objects.filter(
            room__channel_name=room, channel_name=socket
        ).exists()
        Room.objects.remove(room, socket)
        assert not Presence.objects.filter(channel_name=socket).exists()
        Room.objects.prune_rooms()
        return
    assert rejects_cleanly(lambda: Room.objects.remove(room, socket))
    if not valid(socket, "channel"):
        assert rejects_cleanly(lambda: Presence.objects.touch(socket))
        assert rejects_cleanly(lambda: Presence.objects.leave_all(socket))


@fuzz(40)
@given(room=names, socket=names)
def test_the_async_twins_reject_what_the_managers_reject(tried, room, socket):
    tried.append((room, socket))
    if valid(room, "room") and valid(socket, "channel"):
        return
    assert rejects_cleanly(lambda: async_to_sync(Room.objects.aadd)(room, socket))
    assert rejects_cleanly(lambda: async_to_sync(Room.objects.aremove)(room, socket))


@fuzz(40)
@given(room=not_strings, socket=not_strings)
def test_names_that_are_not_strings_are_a_type_error(tried, room, socket):
    tried.append((room, socket))
    before = state()
    with pytest.raises(TypeError, match="must be a str"):
        Room.objects.add(room, socket)
    with pytest.raises(TypeError, match="must be a str"):
        Room.objects.add("lobby", socket)
    assert state() == before


# 2. The Celery tasks' bodies, called with bad arguments as a worker would.

timestamps = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from(["now", b"1", True, [1.0], {"at": 1}]),
)
user_ids = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from(["1", 1.5, True, [], {}]),
)


@fuzz(120)
@given(room=names, socket=names, user_id=user_ids, at=timestamps)
def test_a_join_task_with_bad_arguments_raises_a_clear_error_and_writes_nothing(
    tried, room, socket, user_id, at
):
    tried.append((room, socket, user_id, at))
    names_ok = valid(room, "room") and valid(socket, "channel")
    at_ok = at is None or (
        isinstance(at, int | float)
        and not isinstance(at, bool)
        and math.isfinite(at)
        and -(10**10) < at < 10**10
    )
    raised = rejects_cleanly(
        lambda: tasks.add_presence(room, socket, user_id, at=at, subscribe=True)
    )
    if not (names_ok and at_ok):
        assert raised, (room, socket, at)
    if not raised:
        # A user that does not exist joins anonymously, as documented.
        tasks.leave_all(socket)
        Room.objects.prune_rooms()


@fuzz(60)
@given(
    calls=st.one_of(
        st.lists(
            st.one_of(
                st.tuples(
                    st.sampled_from(
                        [*tasks.BATCHABLE, "channels_presence.tasks.prune_rooms", ""]
                    ),
                    st.one_of(
                        st.lists(names, max_size=3), st.text(max_size=3), st.none()
                    ),
                    st.one_of(
                        st.dictionaries(
                            st.sampled_from(["at", "subscribe", "bogus"]),
                            st.one_of(st.none(), st.floats(), st.booleans()),
                            max_size=2,
                        ),
                        st.none(),
                        st.lists(st.integers(), max_size=2),
                    ),
                ).map(list),
                st.lists(st.text(max_size=3), max_size=4),
                st.none(),
                st.integers(),
                st.text(max_size=5),
            ),
            max_size=5,
        ),
        st.none(),
        st.text(max_size=5),
        st.integers(),
    )
)
# Regressions: a call that was not a triple stopped the batch there; one with
# args that were not a list failed the logging of its own failure.
@example(calls=[["channels_presence.tasks.leave_all"], ["x", [], {}, 1], None, 7])
@example(calls=[["channels_presence.tasks.add_presence", None, None]])
@example(calls=[[["unhashable"], [], {}]])
def test_a_malformed_batch_runs_its_good_calls_and_logs_the_others(
    tried, caplog, calls
):
    tried.append(calls)
    good = [
        "channels_presence.tasks.add_presence",
        ["lobby", "specific.fuzz!good", None],
        {"at": None},
    ]
    batch = [*calls, good] if isinstance(calls, list) else calls
    if not isinstance(batch, list):
        assert rejects_cleanly(lambda: tasks.apply_batch(batch))
        return
    # Each bad call is logged and skipped; the good one, after them, still runs.
    tasks.apply_batch(batch)
    assert Presence.objects.filter(channel_name="specific.fuzz!good").exists()
    tasks.leave_all("specific.fuzz!good")


@fuzz(60)
@given(
    socket_names=st.one_of(st.lists(names, max_size=4), names, not_strings),
    at=timestamps,
)
# Regression: bytes were taken for a list of names, and b"" touched nothing.
@example(socket_names=b"", at=None)
def test_a_touch_task_with_bad_arguments_raises_a_clear_error(tried, socket_names, at):
    tried.append((socket_names, at))
    listed = isinstance(socket_names, list)
    ok = listed and all(valid(name, "channel") for name in socket_names)
    raised = rejects_cleanly(lambda: tasks.touch_presences(socket_names, at=at))
    if not ok:
        assert raised


def test_a_malformed_message_fails_once_on_a_real_worker_and_the_next_one_runs(
    tried,
):
    """No crash loop, no retry forever: the worker logs it and goes on."""
    bad: list[tuple[str, list[Any], dict[str, Any]]] = [
        ("channels_presence.tasks.add_presence", ["a b", "specific.x!y"], {}),
        ("channels_presence.tasks.add_presence", [], {"nonsense": 1}),
        ("channels_presence.tasks.touch_presences", ["specific.x!y"], {}),
        (BATCH_TASK, ["not a list of calls"], {}),
        ("channels_presence.tasks.leave_all", ["specific.x!y"], {"at": "soon"}),
    ]
    purge_queue()
    with celery_worker("fuzz") as worker:
        for name, args, kwargs in bad:
            tried.append(name)
            celery_app.send_task(name, args=args, kwargs=kwargs)
        celery_app.send_task(
            "channels_presence.tasks.add_presence",
            args=["lobby", "specific.fuzz!after", None],
        )
        async_to_sync(wait_until)(_joined_after, seconds=20)
        async_to_sync(drained)()
        assert queued() == 0
        output = worker.output()
        assert worker.process.poll() is None, "the worker died"
    assert output.count(" raised unexpected: ") == len(bad), output
    assert "Retry in" not in output
    assert Presence.objects.count() == 1


async def _joined_after() -> bool:
    return await Presence.objects.filter(channel_name="specific.fuzz!after").aexists()


# 3. dispatch: bad names raise before any group add or queued task.


@pytest.fixture
def closed_outbox(monkeypatch: pytest.MonkeyPatch) -> Outbox:
    """The process's outbox, closed: what is appended stays there to be counted."""
    box = Outbox(
        Celery("t", broker=f"redis://127.0.0.1:{closed_port()}/0", set_as_current=False)
    )
    box.close()
    monkeypatch.setattr(outbox, "default", box)
    return box


@fuzz(80)
@given(room=names, socket=names)
def test_dispatch_rejects_bad_names_before_any_group_add_or_queued_task(
    tried, closed_outbox, room, socket
):
    tried.append((room, socket))
    if valid(room, "room") and valid(socket, "channel"):
        return
    consumer = SimpleNamespace(channel_name=socket, channel_layer=get_channel_layer())
    for celery in (True, False):
        with override_settings(CHANNELS_PRESENCE_USE_CELERY=celery):
            assert rejects_cleanly(
                lambda: dispatch.join(consumer, room, None, subscribe=True)
            )
            assert closed_outbox.pending() == (0, 0)


@fuzz(200)
@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=80), not_strings))
def test_is_heartbeat_never_raises(tried, text):
    tried.append(text)
    expected = False
    if isinstance(text, str) and len(text) <= dispatch.HEARTBEAT_MAX_LENGTH:
        try:
            expected = json.loads(text) == "heartbeat"
        except ValueError:
            expected = False
    assert dispatch.is_heartbeat(text) is expected


# 4. Room names given by a consumer: the mixin's rooms, add_presence's room.


def mixin_in(room: str) -> Any:
    return type(
        "Mixin",
        (PresenceConsumerMixin, AsyncPlainEcho),
        {"presence_rooms": ["lobby", room]},
    )


def decorated_in(room: str) -> Any:
    class Decorated(AsyncPlainEcho):
        @add_presence(lambda consumer: room)
        async def connect(self):
            await self.accept()

        @remove_presence
        async def disconnect(self, code):
            pass

    return Decorated


@pytest.mark.parametrize(
    "make", [mixin_in, decorated_in], ids=["mixin", "add_presence"]
)
@fuzz(25)
@given(room=names)
def test_a_room_name_a_consumer_gives_joins_or_fails_the_connect_cleanly(
    tried, make, room
):
    tried.append(room)
    before = state()
    joined = on_a_loop_of_its_own(_connect_and_leave, make(room))
    if valid(room, "room"):
        assert joined is True
    else:
        # Nothing joined, not even the mixin's valid first room (names are
        # checked first). The mixin refuses the socket with a bad_room frame
        # (then 4400); add_presence raises the consumer's mistake in connect.
        if make is mixin_in:
            assert isinstance(joined, dict), joined
            assert joined["error"] == "bad_room"
            message = joined["message"]
        else:
            assert isinstance(joined, ValueError), joined
            message = str(joined)
        assert "not a valid Channels group name" in message or EVENTS_PREFIX in message
    Room.objects.prune_rooms()
    assert state() == before


def on_a_loop_of_its_own(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``async_to_sync(function)(*args)``, with a channel layer of its own.

    Each example runs its consumer on a new event loop, as each test does, and
    so it needs a new layer instance as each test gets (``new_channel_layer``
    says why): the last example's consumer may have been cancelled while it
    waited on one of the layer's locks.
    """
    new_channel_layer()
    return async_to_sync(function)(*args)


async def _connect_and_leave(
    consumer: Any,
) -> bool | BaseException | dict[str, Any]:
    """Connect, wait for the joins, disconnect; True if joined, else the
    connect's exception, or the error frame of a refusal."""
    client = Client(consumer.as_asgi())
    await client.connect(TIMEOUT)

    async def settled() -> bool:
        return (
            bool(client.future.done())
            or not client.output_queue.empty()
            or await Presence.objects.aexists()
        )

    await wait_until(settled)
    if client.future.done():
        error: BaseException | None = client.future.exception()
        assert error is not None
        return error
    if not await Presence.objects.aexists():
        frame = json.loads((await client.receive_output(TIMEOUT))["text"])
        close = await client.receive_output(TIMEOUT)
        assert close == {"type": "websocket.close", "code": 4400}, close
        await client.disconnect()
        await client.wait(TIMEOUT)
        assert isinstance(frame, dict)
        return frame
    await client.disconnect()
    await wait_until(_no_presence)
    return True


# 5. Frames, through the mixin and the decorators, sync and async.

DEEP = "[" * 10_000 + "]" * 10_000
LARGE = 4 * 1024 * 1024


def _echo(text_data: str | None, bytes_data: bytes | None) -> str:
    # Frames are echoed as they came, never decoded: what a consumer does with
    # a frame is its own business; what presence does with it is under test.
    if bytes_data is not None:
        return json.dumps({"type": "echo", "bytes": bytes_data.hex()})
    return json.dumps({"type": "echo", "text": text_data})


class PlainEcho(WebsocketConsumer):
    def receive(self, text_data=None, bytes_data=None):
        self.send(text_data=_echo(text_data, bytes_data))


class AsyncPlainEcho(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=_echo(text_data, bytes_data))


class MixinEcho(PresenceConsumerMixin, AsyncPlainEcho):
    presence_rooms = ["lobby"]


class SyncMixinEcho(PresenceConsumerMixin, PlainEcho):
    presence_rooms = ["lobby"]


class DecoratedEcho(PlainEcho):
    @add_presence("lobby")
    def connect(self):
        self.accept()

    @touch_presence
    def receive(self, text_data=None, bytes_data=None):
        super().receive(text_data, bytes_data)

    @remove_presence
    def disconnect(self, code):
        pass


class AsyncDecoratedEcho(AsyncPlainEcho):
    @add_presence("lobby")
    async def connect(self):
        await self.accept()

    @touch_presence
    async def receive(self, text_data=None, bytes_data=None):
        await super().receive(text_data, bytes_data)

    @remove_presence
    async def disconnect(self, code):
        pass


FRAME_CONSUMERS = [MixinEcho, SyncMixinEcho, DecoratedEcho, AsyncDecoratedEcho]

frames = st.one_of(
    st.text(max_size=200).map(lambda text: ("text", text)),
    st.binary(max_size=200).map(lambda data: ("bytes", data)),
    st.sampled_from(
        [
            '"heartbeat"',
            ' "heartbeat"',
            '"heartbeat',
            '{"type": ',
            "\x00",
            '"\\ud800"',
            "[" * 100,
            "null",
            '"heartbeat"'.ljust(65),
        ]
    ).map(lambda text: ("text", text)),
)


def is_heartbeat(kind: str, frame: Any) -> bool:
    """The documented rule: a text frame of 64 characters at most, JSON "heartbeat"."""
    if kind != "text" or len(frame) > 64:
        return False
    try:
        return bool(json.loads(frame) == "heartbeat")
    except ValueError:
        return False


@pytest.mark.parametrize("consumer", FRAME_CONSUMERS, ids=lambda c: c.__name__)
@fuzz(12)
@given(batch=st.lists(frames, min_size=1, max_size=12))
@example(batch=[("text", DEEP)])
@example(batch=[("text", "x" * LARGE), ("bytes", b"\xff" * LARGE)])
@example(batch=[("text", '"heartbeat"'), ("bytes", b'"heartbeat"')])
def test_frames_are_handled_as_documented_and_the_socket_stays(tried, consumer, batch):
    tried.append(batch)
    on_a_loop_of_its_own(_send_frames, consumer, batch)


async def _send_frames(consumer: Any, batch: list[tuple[str, Any]]) -> None:
    client = Client(consumer.as_asgi())
    accepted, _ = await client.connect(TIMEOUT)
    assert accepted
    try:
        await wait_until(_one_presence_in_lobby)
        name = await Presence.objects.filter(room__channel_name="lobby").afirst()
        assert name is not None
        for kind, frame in batch:
            # As daphne passes it on; the communicator's send_to refuses "".
            await client.send_input({"type": "websocket.receive", kind: frame})
            if is_heartbeat(kind, frame):
                continue
            # Every other frame reaches the handler unchanged, in order.
            echo = await client.receive_type("echo")
            expected = (
                {"type": "echo", "text": frame}
                if kind == "text"
                else {"type": "echo", "bytes": frame.hex()}
            )
            assert echo == expected
        # The socket is still there.
        await client.send_to(text_data="still here")
        assert (await client.receive_type("echo"))["text"] == "still here"
        assert [p async for p in Presence.objects.values_list("channel_name")] == [
            (name.channel_name,)
        ]
    finally:
        await client.disconnect()
    await wait_until(lambda: _no_presence())


async def _one_presence_in_lobby() -> bool:
    return await Presence.objects.filter(room__channel_name="lobby").acount() == 1


async def _no_presence() -> bool:
    return not await Presence.objects.aexists()
