# mypy: disallow-subclassing-any=False
"""The per-process outbox, and what the socket side does while the broker is down.

The broker here is real: a throwaway ``redis-server`` of each test's own, which a
test stops and starts again on the same port, as an outage would. What reached
it is read from the queue list kombu's Redis transport keeps (messages are
pushed on the left and consumed from the right, so the oldest is last).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import kombu
import pytest
import redis
from celery import Celery
from channels.generic.websocket import WebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import override_settings

from channels_presence import broker as broker_module
from channels_presence import dispatch, heartbeat, outbox
from channels_presence.consumers import PresenceConsumerMixin
from channels_presence.decorators import add_presence, remove_presence, touch_presence
from channels_presence.outbox import BATCH_TASK, TOUCH_TASK, Outbox
from tasks import app as celery_app
from tests.consumers import AsyncJsonEchoConsumer, connected
from tests.helpers import closed_port, group_members, sockets
from tests.servers import ThrowawayRedis, throwaway_redis
from tests.workers import CeleryProcess, celery_worker, purge_queue

ROOT = Path(__file__).resolve().parent.parent
ADD = dispatch.ADD_PRESENCE
LEAVE_ALL = dispatch.LEAVE_ALL


# A broker that can go down and come back.


@pytest.fixture
def broker() -> Iterator[ThrowawayRedis]:
    with throwaway_redis() as server:
        yield server


@pytest.fixture
def make_outbox(broker: ThrowawayRedis) -> Iterator[Callable[..., Outbox]]:
    """Outboxes publishing to the throwaway broker; closed when the test ends."""
    made: list[Outbox] = []

    def make(app: Celery | None = None, **options: Any) -> Outbox:
        options.setdefault("exit_timeout", 1.0)
        box = Outbox(app or fail_fast_app(broker.url), **options)
        made.append(box)
        return box

    yield make
    for box in made:
        box.close()
        atexit.unregister(box.close)


def fail_fast_app(url: str) -> Celery:
    """A Celery app of the broker at ``url``, not made current.

    Its publishes to a down broker fail at once even outside an outbox, which
    publishes on a connection of its own that never retries.
    """
    app = Celery("t", broker=url, set_as_current=False)
    app.conf.broker_transport_options = {"max_retries": 0}
    return app


def socket_of(name: str = "") -> Any:
    """A stand-in for a consumer: what dispatch uses of one."""
    return SimpleNamespace(
        channel_name=f"specific.{uuid.uuid4().hex}!{name}",
        channel_layer=get_channel_layer(),
    )


def groups_holding(channel_name: str) -> set[str]:
    """The keys of every group of the channel layer that holds ``channel_name``."""
    layer: Any = get_channel_layer()
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    try:
        return {
            key
            for key in client.scan_iter(layer._group_key("").decode() + "*")
            if client.zscore(key, channel_name) is not None
        }
    finally:
        client.close()


def finishes_without_suspending(coroutine: Any) -> bool:
    """Whether ``coroutine`` runs to its end at its first step: no await on I/O."""
    try:
        coroutine.send(None)
    except StopIteration:
        return True
    coroutine.close()
    return False


# 1. The socket side: what each handler call costs.


@pytest.fixture
def down_outbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[Outbox]:
    """The process's outbox, to a broker that is not there, and closed before use.

    A closed outbox keeps what is appended but never sends it, so what the
    socket side appends stays there to be counted (a sender trying the broker
    takes a touch batch out while it tries).
    """
    box = Outbox(
        Celery(
            "t",
            broker=f"redis://127.0.0.1:{closed_port()}/0",
            set_as_current=False,
        ),
        exit_timeout=0.5,
    )
    box.close()
    monkeypatch.setattr(outbox, "default", box)
    with override_settings(
        CHANNELS_PRESENCE_USE_CELERY=True, CHANNELS_PRESENCE_TOUCH_INTERVAL=30
    ):
        yield box
    atexit.unregister(box.close)


def test_a_heartbeat_inside_the_touch_interval_appends_nothing(
    down_outbox: Outbox,
) -> None:
    sock = socket_of()
    sock._presence_touched_at = time.monotonic()
    for _ in range(1000):
        dispatch.touch(sock)
        assert finishes_without_suspending(dispatch.atouch(sock))
    assert down_outbox.pending() == (0, 0)
    assert down_outbox._thread is None, "the sender was started: something was sent"


def test_a_due_touch_is_one_entry_in_the_touch_set(down_outbox: Outbox) -> None:
    first, second = socket_of("1"), socket_of("2")
    dispatch.touch(first)
    assert down_outbox.pending() == (0, 1)
    # Due again (its interval is over): still the one entry, no task.
    first._presence_touched_at = None
    assert finishes_without_suspending(dispatch.atouch(first))
    assert down_outbox.pending() == (0, 1)
    dispatch.touch(first)  # within the interval now
    assert finishes_without_suspending(dispatch.atouch(second))
    assert down_outbox.pending() == (0, 2)


def test_a_join_is_one_group_add_and_one_pending_task(down_outbox: Outbox) -> None:
    sock = socket_of()
    assert dispatch.join(sock, "lobby", None, subscribe=False)
    assert sock.channel_name in group_members("lobby")
    assert len(groups_holding(sock.channel_name)) == 1
    assert down_outbox.pending() == (1, 0)
    # The join wrote last_seen: a heartbeat right after it appends nothing.
    dispatch.touch(sock)
    assert down_outbox.pending() == (1, 0)


async def test_an_async_join_then_leave_appends_two_tasks(down_outbox: Outbox) -> None:
    sock = socket_of()
    assert await dispatch.ajoin(sock, "lobby", None, subscribe=True)
    assert len(groups_holding(sock.channel_name)) == 2  # the room and its events
    await dispatch.aleave_all(sock)
    assert groups_holding(sock.channel_name) == set()
    assert down_outbox.pending() == (2, 0)
    assert [task[0] for task in down_outbox._tasks] == [ADD, LEAVE_ALL]


@pytest.mark.parametrize(
    ("room", "channel", "user"),
    [
        ("a b", None, None),
        ("presence_events.lobby", None, None),
        ("lobby", "x" * 101, None),
        ("lobby", None, "unsaved"),
    ],
    ids=["room-with-a-space", "reserved-room", "long-channel", "unsaved-user"],
)
def test_bad_input_raises_before_any_group_add_or_append(
    down_outbox: Outbox, room: str, channel: str | None, user: str | None
) -> None:
    sock = socket_of()
    if channel is not None:
        sock.channel_name = channel
    someone = get_user_model()(username="carol") if user else None
    with pytest.raises(ValueError, match=r"not a valid|reserved|has not been saved"):
        dispatch.join(sock, room, someone, subscribe=True)
    assert groups_holding(sock.channel_name) == set()
    assert down_outbox.pending() == (0, 0)
    assert not getattr(sock, "_presence_joined", None)


# 2. What reaches the broker, and in which order.


@override_settings(CHANNELS_PRESENCE_FLUSH_INTERVAL=1.0)
def test_touches_of_many_sockets_reach_the_broker_once_per_flush_interval(
    broker: ThrowawayRedis, make_outbox: Callable[..., Outbox]
) -> None:
    box = make_outbox()
    names = [f"specific.many!{n}" for n in range(500)]
    touched: set[str] = set()
    start = time.monotonic()
    while time.monotonic() - start < 2.9:
        # A different half of the sockets each round, as heartbeats come in.
        for name in names[::2] if len(touched) % 2 else names[1::2]:
            box.touch(name)
            touched.add(name)
        time.sleep(0.05)
    box.touch("specific.many!last")
    touched.add("specific.many!last")
    duration = time.monotonic() - start
    # No flush(): the sender sends the last batch by itself, within an interval.
    deadline = time.monotonic() + 2.5
    while box.pending() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert box.pending() == (0, 0), "touches were left unsent without a flush()"

    batches = broker.messages()
    assert {message.task for message in batches} == {TOUCH_TASK}
    assert len(batches) <= math.ceil(duration / 1.0) + 1
    reached: set[str] = set()
    for batch in batches:
        (sent,) = batch.args
        assert len(sent) == len(set(sent))
        assert isinstance(batch.kwargs["at"], float)
        reached.update(sent)
    assert reached == touched


def test_a_touch_after_a_quiet_spell_is_sent_without_a_flush(
    broker: ThrowawayRedis, make_outbox: Callable[..., Outbox]
) -> None:
    box = make_outbox()
    with override_settings(CHANNELS_PRESENCE_FLUSH_INTERVAL=0.2):
        box.touch("specific.quiet!1")
        time.sleep(0.5)
        assert box.pending() == (0, 0)
        box.touch("specific.quiet!2")
        time.sleep(0.6)
        assert box.pending() == (0, 0), "the sender slept through a touch"
    assert [m.args[0] for m in broker.messages()] == [
        ["specific.quiet!1"],
        ["specific.quiet!2"],
    ]


def test_a_touch_batch_is_pending_until_the_broker_has_it() -> None:
    # Celery's default options: each attempt to reach a down broker lasts ~6 s.
    box = Outbox(
        Celery(
            "t",
            broker=f"redis://127.0.0.1:{closed_port()}/0",
            set_as_current=False,
        )
    )
    try:
        box.touch("specific.flight!1")
        time.sleep(0.1)  # the sender has taken the batch and is trying
        assert box.pending() == (0, 1)
        assert not box.flush(0.5)
    finally:
        box._stop.set()
        atexit.unregister(box.close)


def test_joins_and_leaves_reach_the_broker_in_the_order_appended(
    broker: ThrowawayRedis, make_outbox: Callable[..., Outbox]
) -> None:
    box = make_outbox()
    for n in range(200):
        if n % 3 == 2:
            box.send(LEAVE_ALL, f"specific.order!{n}", at=float(n))
        else:
            box.send(ADD, "lobby", f"specific.order!{n}", None, at=float(n))
        box.touch(f"specific.order!{n}")
    assert box.flush(10)
    tasks = [m for m in broker.messages() if m.task != TOUCH_TASK]
    assert [m.kwargs["at"] for m in tasks] == [float(n) for n in range(200)]
    assert [m.task for m in tasks] == [
        LEAVE_ALL if n % 3 == 2 else ADD for n in range(200)
    ]
    assert tasks[0].args == ["lobby", "specific.order!0", None]
    assert box.sent == len(broker.messages())


def _queued_in_run_queue() -> int:
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        return cast(int, client.llen(f"{prefix}{settings.CELERY_TASK_DEFAULT_QUEUE}"))
    finally:
        client.close()


def test_without_an_app_it_publishes_with_the_default_app_of_the_moment(
    broker: ThrowawayRedis,
) -> None:
    # Celery's Django fixup makes the project's app the default of every
    # thread, the outbox's sender among them.
    box = Outbox(exit_timeout=1.0)
    other = fail_fast_app(broker.url)
    try:
        other.set_default()
        box.send(LEAVE_ALL, "specific.current!other", at=1.0)
        assert box.flush(10)
        assert [m.args for m in broker.messages()] == [["specific.current!other"]]

        celery_app.set_default()
        box.send(LEAVE_ALL, "specific.current!ours", at=2.0)
        assert box.flush(10)
        # Not to the other app's broker any more: to the project's.
        with broker.client() as client:
            assert client.keys("*presence-*") == []
        assert len(broker.messages()) == 1
        assert _queued_in_run_queue() == 1
        assert box.sent == 2
    finally:
        celery_app.set_default()
        box.close()
        purge_queue()


def test_joins_and_leaves_pending_together_go_as_one_message(
    broker: ThrowawayRedis, make_outbox: Callable[..., Outbox]
) -> None:
    box = make_outbox()
    broker.stop()  # they pile up, as behind a busy sender
    for n in range(3):
        box.send(ADD, "lobby", f"specific.batch!{n}", None, at=float(n))
    box.send(LEAVE_ALL, "specific.batch!0", at=3.0)
    broker.start()
    assert box.flush(10)

    (message,) = broker.raw_messages()
    assert message.task == BATCH_TASK
    assert message.args == [
        [
            [ADD, ["lobby", "specific.batch!0", None], {"at": 0.0}],
            [ADD, ["lobby", "specific.batch!1", None], {"at": 1.0}],
            [ADD, ["lobby", "specific.batch!2", None], {"at": 2.0}],
            [LEAVE_ALL, ["specific.batch!0"], {"at": 3.0}],
        ]
    ]
    assert box.sent == 4


def test_while_joins_keep_coming_they_gather_and_a_lone_one_goes_at_once(
    broker: ThrowawayRedis, make_outbox: Callable[..., Outbox]
) -> None:
    box = make_outbox(busy_linger=5.0)
    # A lone join, then a leave once the join is out: neither waits for the
    # busy linger (5 s), since only one went out before each.
    box.send(ADD, "lobby", "specific.lone!0", None, at=0.0)
    assert box.flush(10)
    start = time.monotonic()
    box.send(LEAVE_ALL, "specific.lone!0", at=1.0)
    while box.pending() != (0, 0) and time.monotonic() - start < 4:
        time.sleep(0.01)
    assert box.pending() == (0, 0)
    assert [m.task for m in broker.raw_messages()] == [ADD, LEAVE_ALL]

    # A storm: 100 joins 5 ms apart. Once more than one went out in the
    # busy linger, the rest gather into a few batches.
    box.busy_linger = 0.3
    for n in range(100):
        box.send(ADD, "lobby", f"specific.storm!{n}", None, at=2.0 + n)
        time.sleep(0.005)
    assert box.flush(10)
    storm = broker.raw_messages()[2:]
    assert len(storm) < 15
    assert [m.args[1] for m in broker.messages()[2:]] == [
        f"specific.storm!{n}" for n in range(100)
    ]


# 3. The broker goes down, and comes back.


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "channels_presence" and record.levelno == level
    ]


def test_an_outage_is_logged_once_and_what_was_kept_is_delivered_in_order(
    broker: ThrowawayRedis,
    make_outbox: Callable[..., Outbox],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="channels_presence")
    box = make_outbox(retry_interval=0.05)
    box.send(ADD, "lobby", "specific.before!0", None, at=0.0)
    assert box.flush(5)
    broker.stop()

    for n in range(1, 101):
        box.send(ADD, "lobby", f"specific.during!{n}", None, at=float(n))
        box.touch(f"specific.during!{n}")
        time.sleep(0.005)  # about ten attempts fail meanwhile
    assert not box.flush(0.3)
    assert box.pending() == (100, 100)
    retries = [m for m in _records(caplog, logging.DEBUG) if "still" in m]
    assert len(retries) >= 5, "too few attempts failed to show anything"
    errors = _records(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert f"the broker at {broker.url} is unavailable" in errors[0]
    assert _records(caplog, logging.WARNING) == []

    broker.start()  # empty: what the first server held is gone
    assert box.flush(10)
    deadline = time.monotonic() + 2  # logged just after the last send
    while not _records(caplog, logging.WARNING) and time.monotonic() < deadline:
        time.sleep(0.01)
    warnings = _records(caplog, logging.WARNING)
    assert warnings == [f"presence outbox: the broker at {broker.url} answers again"]
    assert len(_records(caplog, logging.ERROR)) == 1
    messages = broker.messages()
    tasks = [m.kwargs["at"] for m in messages if m.task == ADD]
    assert tasks == [float(n) for n in range(1, 101)]
    touched = {name for m in messages if m.task == TOUCH_TASK for name in m.args[0]}
    assert touched == {f"specific.during!{n}" for n in range(1, 101)}

    # A second outage is a second error.
    broker.stop()
    box.send(LEAVE_ALL, "specific.during!1", at=101.0)
    time.sleep(0.3)
    assert len(_records(caplog, logging.ERROR)) == 2


def test_broker_log_lines_name_the_broker_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="channels_presence")
    port = closed_port()
    app = fail_fast_app(f"redis://:s3cret@127.0.0.1:{port}/0")
    box = Outbox(app, limit=1, retry_interval=0.05, exit_timeout=0.5)
    try:
        box.send(LEAVE_ALL, "specific.secret!1", at=1.0)
        box.send(LEAVE_ALL, "specific.secret!2", at=2.0)  # full: a drop
        time.sleep(0.3)
    finally:
        box.close()  # and what could not be sent at exit
        atexit.unregister(box.close)
    errors = _records(caplog, logging.ERROR)
    # The drop and the sender's first failed publish race (a lone leave is
    # published at once): their lines come in either order.
    assert sorted(m.split(" at ")[0].split(":")[0] for m in errors) == [
        "presence outbox",
        "presence outbox",
        "presence outbox is full (1 items, the broker",
    ], errors
    for message in errors:
        assert f"redis://:**@127.0.0.1:{port}/0" in message, message
        assert "s3cret" not in message, message


# A publish fails for a reason other than an outage: what it held is dropped
# (retrying would fail the same way), and the line says what that was.


def _dropped_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "channels_presence"
        and record.levelno == logging.ERROR
        and "dropped" in record.getMessage()
    ]


def test_a_batch_that_cannot_be_published_is_dropped_with_a_line_naming_it(
    broker: ThrowawayRedis,
    make_outbox: Callable[..., Outbox],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="channels_presence")
    box = make_outbox(retry_interval=0.05)
    broker.stop()  # they pile up, to go as one message
    box.send(ADD, "lobby", "specific.bad!1", None, at=1.0)
    box.send(ADD, "lobby", "specific.bad!2", object(), at=2.0)  # not JSON
    box.send(LEAVE_ALL, "specific.bad!1", at=3.0)
    broker.start()
    assert box.flush(10)

    assert broker.messages() == []
    (line,) = _dropped_lines(caplog)
    message = line.getMessage()
    assert "dropped 2 joins, 1 leaves and 0 touches" in message, message
    assert "not an outage" in message, message
    assert "EncodeError" in message, message
    for shown in ("add_presence('lobby', 'specific.bad!1'", "'specific.bad!2'"):
        assert shown in message, message
    assert "leave_all('specific.bad!1')" in message, message
    assert line.exc_info is not None  # the traceback, for the bug report
    # The sender goes on, and nothing is retried.
    box.send(LEAVE_ALL, "specific.good!1", at=4.0)
    assert box.flush(10)
    assert [m.args for m in broker.messages()] == [["specific.good!1"]]
    assert len(_dropped_lines(caplog)) == 1


def test_touches_that_cannot_be_published_are_dropped_with_a_line_naming_them(
    broker: ThrowawayRedis,
    make_outbox: Callable[..., Outbox],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A kombu error that is not a connection error: no such serializer.
    caplog.set_level(logging.INFO, logger="channels_presence")
    broken = fail_fast_app(broker.url)
    broken.conf.task_serializer = "no-such-serializer"
    box = make_outbox(broken, retry_interval=0.05)
    with override_settings(CHANNELS_PRESENCE_FLUSH_INTERVAL=0.1):
        # As if a batch had just gone: the next waits a flush interval, and
        # holds all twelve, however the sender's thread is scheduled.
        box._last_touch_flush = time.monotonic()
        for n in range(12):
            box.touch(f"specific.untouched!{n}")
        assert box.flush(10)
        (line,) = _dropped_lines(caplog)
        message = line.getMessage()
        assert "dropped 0 joins, 0 leaves and 12 touches" in message, message
        assert "SerializerNotInstalled" in message, message
        assert "'specific.untouched!0'" in message, message
        assert "and 2 more" in message, message  # ten are named
        # No outage was logged, the sender lives on and sends with a good app.
        assert not [m for m in _records(caplog, logging.ERROR) if "unavailable" in m]
        box.app = fail_fast_app(broker.url)
        box.touch("specific.touched!1")
        assert box.flush(10)
    assert [m.args for m in broker.messages()] == [[["specific.touched!1"]]]


def test_what_a_dropped_publish_held_is_counted_and_named_briefly() -> None:
    tasks: list[outbox.Task] = [
        (ADD, ("lobby", f"specific.many!{n}", None), {"at": 1.0}) for n in range(11)
    ]
    tasks += [(LEAVE_ALL, ("x" * 300,), {}), ("other.task", (), {})]
    touches = [f"specific.t!{n}" for n in range(3)]

    assert outbox._counted(tasks, touches) == (
        "11 joins, 1 leaves, 1 other tasks and 3 touches"
    )
    listed = outbox._listed(tasks, touches)
    assert listed.startswith("add_presence('lobby', 'specific.many!0', None), ")
    assert "'specific.many!9', None) and 3 more; " in listed
    assert "specific.many!10" not in listed
    assert listed.endswith(
        "; touches of 'specific.t!0', 'specific.t!1', 'specific.t!2'"
    )
    long_one = outbox._listed(tasks[11:12], [])
    assert len(long_one) == 200
    assert outbox._listed([], []) == ""


def test_each_message_is_stamped_with_the_time_it_was_published(
    broker: ThrowawayRedis, make_outbox: Callable[..., Outbox]
) -> None:
    box = make_outbox()
    before = time.time()
    box.send(LEAVE_ALL, "specific.stamp!1", at=1.0)
    box.touch("specific.stamp!1")
    assert box.flush(5)
    with broker.client() as client:
        raw = [json.loads(body) for body in client.lrange("celery", 0, -1)]
    stamps = [message["headers"][heartbeat.HEADER] for message in raw]
    assert len(stamps) == 2
    assert all(before <= stamp <= time.time() for stamp in stamps)


def test_messages_follow_celerys_routes_unless_the_presence_queue_is_set(
    broker: ThrowawayRedis, make_outbox: Callable[..., Outbox]
) -> None:
    app = fail_fast_app(broker.url)
    app.conf.task_routes = {ADD: {"queue": "routed"}}
    box = make_outbox(app)
    # One at a time: joins and leaves pending together go as one message.
    box.send(ADD, "room", "specific.route!1", None, 1.0)
    assert box.flush(5)
    box.send(LEAVE_ALL, "specific.route!2", at=1.0)
    assert box.flush(5)
    with override_settings(CHANNELS_PRESENCE_QUEUE="presence"):
        box.send(ADD, "room", "specific.route!3", None, 1.0)
        assert box.flush(5)
    with broker.client() as client:
        queues = {
            queue: [json.loads(body)["headers"] for body in client.lrange(queue, 0, -1)]
            for queue in ("routed", "celery", "presence")
        }
    assert [headers["task"] for headers in queues["routed"]] == [ADD]
    assert [headers["task"] for headers in queues["celery"]] == [LEAVE_ALL]
    assert [headers["task"] for headers in queues["presence"]] == [ADD]


def test_messages_ask_for_no_result_and_show_their_arguments_briefly(
    broker: ThrowawayRedis, make_outbox: Callable[..., Outbox]
) -> None:
    box = make_outbox()
    box._publish(ADD, ("room", "specific.show!1", None, 1.0), {})
    box._publish(
        BATCH_TASK, ([[LEAVE_ALL, ["specific.show!1"], {}]] * 300,), {}, carrying=300
    )
    box._publish(TOUCH_TASK, ([f"specific.show!{i}" for i in range(900)],), {"at": 2.0})
    with broker.client() as client:
        raw = [json.loads(body)["headers"] for body in client.lrange("celery", 0, -1)]
    add, batch, touch = raw[::-1]
    assert all(headers["ignore_result"] is True for headers in raw)
    assert add["argsrepr"] == "('room', 'specific.show!1', None, 1.0)"
    assert batch["argsrepr"] == "(300 joins and leaves)"
    assert touch["argsrepr"] == "(900 sockets)"
    assert touch["kwargsrepr"] == "{'at': 2.0}"


DEFAULT_APP_SCRIPT = """
import django
django.setup()
from channels_presence.outbox import Outbox

box = Outbox(exit_timeout=0.5)  # Celery's current app: nobody imported one
box.send("channels_presence.tasks.leave_all", "specific.default!1", at=1.0)
box.flush(1)
print("exiting", flush=True)
"""


def test_a_process_that_never_imported_its_celery_app_says_so_at_first_send() -> None:
    done = _run_until_exit(DEFAULT_APP_SCRIPT)
    assert done.code == 0, done.stderr
    told = [
        line
        for line in done.stderr.splitlines()
        if "sent with Celery's default app" in line
    ]
    assert len(told) == 1, done.stderr
    assert "its broker is amqp://guest:**@localhost:5672//" in told[0]
    assert "add 'from .celery import app as celery_app' to tests/__init__.py" in told[0]


def test_the_projects_own_app_is_not_taken_for_celerys_default() -> None:
    assert not broker_module.is_fallback_app(celery_app)
    assert not broker_module.is_fallback_app(Celery("default"))


def test_a_full_outbox_drops_touches_first_then_the_oldest_joins_and_leaves(
    broker: ThrowawayRedis,
    make_outbox: Callable[..., Outbox],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="channels_presence")
    broker.stop()
    box = make_outbox(limit=10, retry_interval=0.05)
    for n in range(4):
        box.send(ADD, "lobby", f"specific.full!{n}", None, at=float(n))
    for n in range(6):
        box.touch(f"specific.full!t{n}")
    assert box.pending() == (4, 6)
    box.touch("specific.full!t6")  # full: a new touch is the first to go
    assert box.pending() == (4, 6)
    box.send(LEAVE_ALL, "specific.full!4", at=4.0)  # full: the touches go
    assert box.pending() == (5, 0)
    box.touch("specific.full!t7")
    assert box.pending() == (5, 1)
    for n in range(5, 10):
        box.send(ADD, "lobby", f"specific.full!{n}", None, at=float(n))
    assert box.pending() == (10, 0)
    for n in range(10, 12):  # only joins and leaves left: the oldest go
        box.send(ADD, "lobby", f"specific.full!{n}", None, at=float(n))
    assert box.pending() == (10, 0)
    full = [m for m in _records(caplog, logging.ERROR) if "is full" in m]
    assert len(full) == 1, full

    broker.start()
    assert box.flush(10)
    messages = broker.messages()
    # Every touch was dropped (none reached the broker), and the two oldest joins.
    assert [m.kwargs["at"] for m in messages] == [float(n) for n in range(2, 12)]
    assert [m.task for m in messages] == [ADD, ADD, LEAVE_ALL] + [ADD] * 7


def test_the_outbox_is_bounded_when_joins_and_leaves_alone_fill_it(
    broker: ThrowawayRedis, make_outbox: Callable[..., Outbox]
) -> None:
    broker.stop()
    box = make_outbox(limit=10, retry_interval=0.05)
    for n in range(1000):
        box.send(LEAVE_ALL, f"specific.bound!{n}", at=float(n))
        box.touch(f"specific.bound!{n}")
        assert sum(box.pending()) <= 10
    broker.start()
    assert box.flush(10)
    messages = broker.messages()
    assert [m.kwargs["at"] for m in messages if m.task == LEAVE_ALL] == [
        float(n) for n in range(990, 1000)
    ]


# 4. The broker goes down while sockets come and go; a worker converges.


class LobbyConsumer(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    presence_rooms = ["lobby"]


class DecoratedLobbyConsumer(WebsocketConsumer):
    """A plain sync consumer with the three decorators."""

    @add_presence("lobby")
    def connect(self) -> None:
        self.accept()

    @touch_presence
    def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        self.send(text_data=json.dumps({"type": "echo", "text": text_data}))

    @remove_presence
    def disconnect(self, code: int) -> None:
        pass


@pytest.mark.django_db(transaction=True)
async def test_sockets_keep_working_while_the_broker_is_down_and_presence_converges(
    broker: ThrowawayRedis,
    make_outbox: Callable[..., Outbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = Celery("t", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update(broker_url=broker.url)
    box = make_outbox(app, retry_interval=0.1)
    monkeypatch.setattr(outbox, "default", box)
    broker.stop()
    with override_settings(
        CHANNELS_PRESENCE_USE_CELERY=True, CHANNELS_PRESENCE_TOUCH_INTERVAL=0
    ):
        async with (
            connected(LobbyConsumer.as_asgi()) as a,
            connected(DecoratedLobbyConsumer.as_asgi()) as b,
            connected(LobbyConsumer.as_asgi()) as c,
        ):
            for client in (a, b, c):
                await client.answer('{"hello": 1}')
                await client.send_to(text_data='"heartbeat"')
                await client.answer('{"hello": 2}')
            assert len(group_members("lobby")) == 3
            await c.disconnect()
            connected_now = group_members("lobby")
            assert len(connected_now) == 2
            assert box.pending()[0] == 4  # three joins and a leave, kept
            assert await sockets() == set()

            broker.start()
            with celery_worker(CHANNELS_PRESENCE_TEST_BROKER_URL=broker.url) as worker:
                assert box.flush(20)
                # Until c's leave has run, {a, b} is only a passing state.
                # The four kept tasks went as one batch when the broker came back.
                await _until_done(worker, BATCH_TASK)
                await _eventually(connected_now)
                assert group_members("lobby") == connected_now
                # And with everything up, a socket comes and goes.
                async with connected(DecoratedLobbyConsumer.as_asgi()) as d:
                    await d.answer("hi")
                    everyone = group_members("lobby")
                    assert len(everyone) == 3
                    await _eventually(everyone)
                await _eventually(connected_now)
                await a.disconnect()
                await b.disconnect()
                await _eventually(set())
    assert group_members("lobby") == set()


async def _until_done(worker: CeleryProcess, task: str) -> None:
    """Wait until ``worker`` says it has run ``task``."""
    async with asyncio.timeout(20):
        while True:
            if any(f"{task}[" in line and "succeeded" in line for line in worker.lines):
                return
            await asyncio.sleep(0.05)


async def _eventually(expected: set[str]) -> None:
    """Wait until the presences are those of ``expected`` sockets (a worker runs)."""
    found: set[str] = set()
    try:
        async with asyncio.timeout(20):
            while True:
                found = await sockets()
                if found == expected:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"presences {found} != sockets {expected}") from None


# 5. The process exits.

EXIT_SCRIPT = """
import sys, time
import django
django.setup()
from celery import Celery
from django.conf import settings
from channels_presence.outbox import Outbox

app = Celery("t", broker=sys.argv[1])
if sys.argv[2] == "fail-fast":
    app.conf.broker_transport_options = {"max_retries": 0}
box = Outbox(app, exit_timeout=1.0)
box.touch("specific.exit!early")
box.flush(2)
# Not due before the exit: only the exit flush can send this one.
settings.CHANNELS_PRESENCE_FLUSH_INTERVAL = 60
box.touch("specific.exit!late")
box.send("channels_presence.tasks.leave_all", "specific.exit!late", at=1.0)
print("exiting", flush=True)
"""


@dataclass
class Exit:
    """How a script ended: its code, its output, and how long its exit took."""

    code: int
    stdout: str
    stderr: str
    exit_took: float


def _run_until_exit(script: str, *args: str) -> Exit:
    """Run ``script``; time its exit from the moment it prints "exiting"."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        exiting = time.monotonic()
        out, err = process.communicate(timeout=60)
        took = time.monotonic() - exiting
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return Exit(process.returncode, line + out, err, took)


@pytest.mark.parametrize("app", ["default", "fail-fast"])
def test_what_is_pending_at_exit_is_sent(broker: ThrowawayRedis, app: str) -> None:
    done = _run_until_exit(EXIT_SCRIPT, broker.url, app)
    assert done.code == 0, done.stderr
    assert done.stdout.startswith("exiting")
    assert [(m.task, m.args) for m in broker.messages()] == [
        (TOUCH_TASK, [["specific.exit!early"]]),
        (LEAVE_ALL, ["specific.exit!late"]),
        (TOUCH_TASK, [["specific.exit!late"]]),
    ]
    assert "could not be sent" not in done.stderr


LOST = "1 joins and leaves and 2 touches could not be sent at exit"


def test_an_exit_with_the_broker_down_is_quick_and_says_what_was_lost(
    broker: ThrowawayRedis,
) -> None:
    broker.stop()
    done = _run_until_exit(EXIT_SCRIPT, broker.url, "fail-fast")
    assert done.code == 0, done.stderr
    assert done.stdout.startswith("exiting")
    assert done.exit_took < 1.0 + 2, done.exit_took  # exit_timeout, and a margin
    assert LOST in done.stderr, done.stderr


def test_an_exit_with_the_broker_down_is_quick_with_celerys_default_options(
    broker: ThrowawayRedis,
) -> None:
    broker.stop()
    done = _run_until_exit(EXIT_SCRIPT, broker.url, "default")
    assert done.code == 0, done.stderr
    assert LOST in done.stderr, done.stderr
    assert done.exit_took < 1.0 + 2, done.exit_took


@pytest.fixture
def slow_publishes(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Each kombu publish takes half a second; what they did is recorded."""
    seen: dict[str, Any] = {
        "now": 0,
        "most": 0,
        "threads": [],
        "started": threading.Event(),
    }
    lock = threading.Lock()
    publish = kombu.Producer.publish

    def slow(self: kombu.Producer, *args: Any, **kwargs: Any) -> Any:
        with lock:
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
            seen["threads"].append(threading.current_thread().name)
        seen["started"].set()
        try:
            time.sleep(0.5)
            return publish(self, *args, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(kombu.Producer, "publish", slow)
    return seen


def test_close_never_publishes_beside_the_sender_and_loses_nothing(
    broker: ThrowawayRedis,
    make_outbox: Callable[..., Outbox],
    slow_publishes: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # close() is called mid-publish, and gives up waiting (exit_timeout)
    # before the sender is done: the producer is still the sender's.
    box = make_outbox(exit_timeout=0.2)
    box.send(LEAVE_ALL, "specific.close!0", at=0.0)
    assert slow_publishes["started"].wait(5)
    box.send(ADD, "lobby", "specific.close!1", None, at=1.0)
    box.send(LEAVE_ALL, "specific.close!1", at=2.0)
    box.touch("specific.close!1")
    started = time.monotonic()
    box.close()
    closing = time.monotonic() - started
    sender = box._thread
    assert sender is not None
    sender.join(10)  # in a process that goes on, the sender sends the rest

    assert slow_publishes["most"] == 1, "two publishes overlapped"
    assert set(slow_publishes["threads"]) == {"channels-presence-outbox"}
    assert closing < 0.45  # it waited exit_timeout, no more
    assert [(m.task, m.args) for m in broker.messages()] == [
        (LEAVE_ALL, ["specific.close!0"]),
        (ADD, ["lobby", "specific.close!1", None]),
        (LEAVE_ALL, ["specific.close!1"]),
        (TOUCH_TASK, [["specific.close!1"]]),
    ]
    assert box.pending() == (0, 0)
    (busy,) = [m for m in _records(caplog, logging.ERROR) if "still publishing" in m]
    assert "3 joins and leaves and 1 touches" in busy, busy


# 6. A forked child is not its parent.

FORK_SCRIPT = """
import os, sys
import django
django.setup()
from celery import Celery
from channels_presence.outbox import Outbox

app = Celery("t", broker=sys.argv[1])
app.conf.broker_transport_options = {"max_retries": 0}  # no attempt in flight
box = Outbox(app, retry_interval=60, exit_timeout=1.0)
box.send("channels_presence.tasks.leave_all", "specific.fork!parent", at=1.0)
box.flush(0.5)  # the broker is down: it stays pending
print("pending", box.pending(), flush=True)
sys.stdin.readline()  # the broker is up now
pid = os.fork()
if pid == 0:
    if sys.argv[2] == "uses-it":
        box.send("channels_presence.tasks.leave_all", "specific.fork!child", at=2.0)
        box.flush(5)
    print("child pending", box.pending(), flush=True)
    sys.exit(0)  # a normal exit: atexit handlers run
_, status = os.waitpid(pid, 0)
print("child exited", os.waitstatus_to_exitcode(status), flush=True)
os._exit(0)  # the parent never sends its own task
"""


@pytest.mark.parametrize("child", ["uses-it", "leaves-it-alone"])
def test_a_forked_child_does_not_send_its_parents_pending_tasks(
    broker: ThrowawayRedis, child: str
) -> None:
    broker.stop()
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(FORK_SCRIPT), broker.url, child],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdin is not None
        assert process.stdout.readline().strip() == "pending (1, 0)"
        broker.start()
        process.stdin.write("go\n")
        process.stdin.flush()
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "child exited 0" in out, err
    expected = ["specific.fork!child"] if child == "uses-it" else []
    assert [m.args[0] for m in broker.messages()] == expected
