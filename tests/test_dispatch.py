"""dispatch: a socket handler never fails because the database or the layer is down.

The outages here are real: the channel layer is pointed at a Redis port nothing
listens on, and the database connection at a server or file that cannot be
opened. Bad input, on the other hand, is still raised to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.db import OperationalError
from django.test import override_settings
from django.utils import timezone

from channels_presence import dispatch, leases, operations, outages
from channels_presence.models import Presence, Room
from tests.helpers import adatabase_down, database_down, group_members, layer_down

pytestmark = pytest.mark.django_db(transaction=True)

LOGGER = "channels_presence"


@dataclass
class Consumer:
    """What dispatch needs of a consumer: its channel name and channel layer."""

    channel_name: str
    channel_layer: Any


@pytest.fixture(autouse=True)
def _no_outage_in_progress() -> Iterator[None]:
    """Each test starts, and leaves, with no outage remembered."""
    outages.outage.failing.clear()
    yield
    outages.outage.failing.clear()


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


def loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The level of each WARNING-or-worse record of channels_presence, in order."""
    return [
        record.levelname
        for record in caplog.records
        if record.name == LOGGER and record.levelno >= logging.WARNING
    ]


def live_consumer(name: str = "specific.a!1") -> Consumer:
    return Consumer(name, get_channel_layer())


# The channel layer is down.


def test_join_returns_false_when_the_channel_layer_is_down(
    log: pytest.LogCaptureFixture,
) -> None:
    # The process's lease, held from its first join on, is kept in the
    # layer's Redis: taken now, its thread does not see this layer.
    leases.default.server()
    with layer_down() as layer:
        joined = dispatch.join(
            Consumer("specific.a!1", layer), "lobby", None, subscribe=True
        )
    assert joined is False
    # Nothing is written for a socket that is not in the group.
    assert not Presence.objects.exists()
    assert loud(log) == ["ERROR"]


def test_leave_all_does_not_raise_when_the_channel_layer_is_down(
    log: pytest.LogCaptureFixture,
) -> None:
    room = Room.objects.create(channel_name="lobby")
    Presence.objects.create(room=room, channel_name="specific.a!1")
    with layer_down() as layer:
        dispatch.leave_all(Consumer("specific.a!1", layer))
    assert loud(log) == ["ERROR"]


def test_touch_stands_while_the_channel_layer_is_down(
    log: pytest.LogCaptureFixture,
) -> None:
    # Its group refresh fails, and is logged once for the outage.
    room = Room.objects.create(channel_name="lobby")
    old = timezone.now() - timedelta(minutes=5)
    Presence.objects.create(room=room, channel_name="specific.a!1", last_seen=old)
    with layer_down() as layer:
        dispatch.touch(Consumer("specific.a!1", layer))
        dispatch.touch(Consumer("specific.a!1", layer))
    assert Presence.objects.get().last_seen > old
    assert loud(log) == ["ERROR"]


async def test_async_twins_do_not_raise_when_the_channel_layer_is_down(
    log: pytest.LogCaptureFixture,
) -> None:
    room = await Room.objects.acreate(channel_name="lobby")
    await Presence.objects.acreate(room=room, channel_name="specific.a!2")
    with layer_down() as layer:
        assert (
            await dispatch.ajoin(
                Consumer("specific.a!1", layer), "lobby", None, subscribe=False
            )
            is False
        )
        await dispatch.aleave_all(Consumer("specific.a!2", layer))
    assert loud(log) == ["ERROR"]


# The database is down.


def test_join_returns_false_when_the_database_is_down(
    log: pytest.LogCaptureFixture,
) -> None:
    consumer = live_consumer()
    with database_down():
        joined = dispatch.join(consumer, "lobby", None, subscribe=True)
    assert joined is False
    # The socket went into the group first; it must not stay there without
    # a presence row.
    assert group_members("lobby") == set()
    assert not Presence.objects.exists()
    assert loud(log) == ["ERROR"]


def test_leave_all_does_not_raise_when_the_database_is_down(
    log: pytest.LogCaptureFixture,
) -> None:
    consumer = live_consumer()
    assert dispatch.join(consumer, "lobby", None, subscribe=False)
    with database_down():
        dispatch.leave_all(consumer)
    assert loud(log) == ["ERROR"]


def test_touch_does_not_raise_when_the_database_is_down(
    log: pytest.LogCaptureFixture,
) -> None:
    with database_down():
        dispatch.touch(live_consumer())
    assert loud(log) == ["ERROR"]


def test_a_failed_touch_is_retried_at_the_next_message(
    log: pytest.LogCaptureFixture,
) -> None:
    room = Room.objects.create(channel_name="lobby")
    old = timezone.now() - timedelta(minutes=5)
    Presence.objects.create(room=room, channel_name="specific.a!1", last_seen=old)
    consumer = live_consumer()
    with override_settings(CHANNELS_PRESENCE_TOUCH_INTERVAL=3600):
        with database_down():
            dispatch.touch(consumer)
        # Well within the touch interval, but the last touch never landed.
        dispatch.touch(consumer)
        assert Presence.objects.get().last_seen > old
        # Now the interval applies again.
        Presence.objects.update(last_seen=old)
        dispatch.touch(consumer)
        assert Presence.objects.get().last_seen == old
    assert loud(log) == ["ERROR", "WARNING"]


async def test_async_twins_do_not_raise_when_the_database_is_down(
    log: pytest.LogCaptureFixture,
) -> None:
    consumer = live_consumer()
    # Async presence work runs in asgiref's thread, and so do these, so that
    # it is that thread's connection which has to reconnect.
    async with adatabase_down():
        assert await dispatch.ajoin(consumer, "lobby", None, subscribe=False) is False
        await dispatch.atouch(consumer)
        await dispatch.aleave_all(consumer)
    assert group_members("lobby") == set()
    assert loud(log) == ["ERROR"]


# One ERROR per outage, a WARNING when it ends.


def test_an_outage_is_logged_once_however_many_calls_fail(
    log: pytest.LogCaptureFixture,
) -> None:
    with database_down():
        consumer = live_consumer()
        assert dispatch.join(consumer, "lobby", None, subscribe=False) is False
        assert dispatch.join(consumer, "lobby", None, subscribe=False) is False
        dispatch.leave_all(consumer)
        dispatch.touch(consumer)
    assert loud(log) == ["ERROR"]
    (error,) = [r for r in log.records if r.levelno == logging.ERROR]
    assert "join failed" in error.getMessage()
    assert error.exc_info is not None
    assert isinstance(error.exc_info[1], OperationalError)


def test_a_recovery_is_logged_and_the_next_outage_is_logged_again(
    log: pytest.LogCaptureFixture,
) -> None:
    consumer = live_consumer()
    # A success with no outage before it says nothing.
    assert dispatch.join(consumer, "lobby", None, subscribe=False)
    assert loud(log) == []

    with layer_down() as layer:
        down = Consumer("specific.a!2", layer)
        assert dispatch.join(down, "lobby", None, subscribe=False) is False
        assert dispatch.join(down, "lobby", None, subscribe=False) is False
    assert loud(log) == ["ERROR"]

    assert dispatch.join(live_consumer("specific.a!2"), "lobby", None, subscribe=False)
    assert loud(log) == ["ERROR", "WARNING"]
    (warning,) = [r for r in log.records if r.levelno == logging.WARNING]
    assert "works again" in warning.getMessage()

    with layer_down() as layer:
        down = Consumer("specific.a!3", layer)
        assert dispatch.join(down, "lobby", None, subscribe=False) is False
        assert dispatch.join(down, "lobby", None, subscribe=False) is False
    assert loud(log) == ["ERROR", "WARNING", "ERROR"]
    assert group_members("lobby") == {"specific.a!1", "specific.a!2"}


def test_a_touch_while_the_layer_is_down_does_not_end_the_layer_outage(
    log: pytest.LogCaptureFixture,
) -> None:
    room = Room.objects.create(channel_name="lobby")
    Presence.objects.create(room=room, channel_name="specific.a!1")
    with layer_down() as layer:
        # Joins fail while heartbeats (database only) go through: this is one
        # outage of the channel layer, and is logged as one.
        assert (
            dispatch.join(
                Consumer("specific.a!2", layer), "lobby", None, subscribe=False
            )
            is False
        )
        dispatch.touch(Consumer("specific.a!1", layer))
        assert (
            dispatch.join(
                Consumer("specific.a!3", layer), "lobby", None, subscribe=False
            )
            is False
        )
        dispatch.touch(Consumer("specific.a!1", layer))
    assert loud(log) == ["ERROR"]


def test_a_database_outage_ends_at_the_next_successful_operation(
    log: pytest.LogCaptureFixture,
) -> None:
    with database_down():
        dispatch.touch(live_consumer())
    dispatch.leave_all(live_consumer())
    assert loud(log) == ["ERROR", "WARNING"]


def test_a_joined_socket_is_in_the_room_after_an_outage(
    log: pytest.LogCaptureFixture,
) -> None:
    consumer = live_consumer()
    with database_down():
        assert dispatch.join(consumer, "lobby", None, subscribe=False) is False
    assert dispatch.join(consumer, "lobby", None, subscribe=False) is True
    assert group_members("lobby") == {"specific.a!1"}
    assert Presence.objects.get().room.channel_name == "lobby"


# Bad input is not an outage.


def test_a_bad_room_name_is_raised_not_swallowed(
    log: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ValueError, match="not a valid Channels group name"):
        dispatch.join(live_consumer(), "no spaces please", None, subscribe=False)
    assert outages.outage.failing == set()
    assert loud(log) == []


def test_bad_input_is_raised_even_while_the_layer_is_down(
    log: pytest.LogCaptureFixture,
) -> None:
    with layer_down() as layer, pytest.raises(ValueError, match="'a b'"):
        dispatch.join(Consumer("specific.a!1", layer), "a b", None, subscribe=False)
    assert loud(log) == []


def test_a_bad_channel_name_is_raised_by_every_operation(
    log: pytest.LogCaptureFixture,
) -> None:
    consumer = Consumer("not a channel", get_channel_layer())
    with pytest.raises(ValueError, match="not a valid Channels channel name"):
        dispatch.join(consumer, "lobby", None, subscribe=False)
    with pytest.raises(ValueError, match="not a valid Channels channel name"):
        dispatch.leave_all(consumer)
    with pytest.raises(ValueError, match="not a valid Channels channel name"):
        dispatch.touch(consumer)
    assert loud(log) == []
    assert not Room.objects.exists()


def test_a_user_that_is_not_a_saved_user_is_raised(
    log: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ValueError, match="has not been saved"):
        dispatch.join(
            live_consumer(), "lobby", get_user_model()(username="x"), subscribe=False
        )
    with pytest.raises(TypeError):
        dispatch.join(live_consumer(), "lobby", "alice", subscribe=False)
    assert loud(log) == []
    assert group_members("lobby") == set()


async def test_async_twins_raise_bad_input_too() -> None:
    with pytest.raises(ValueError, match="not a valid Channels group name"):
        await dispatch.ajoin(live_consumer(), "a b", None, subscribe=False)
    with pytest.raises(ValueError, match="not a valid Channels channel name"):
        await dispatch.aleave_all(Consumer("a b", get_channel_layer()))
    with pytest.raises(ValueError, match="not a valid Channels channel name"):
        await dispatch.atouch(Consumer("a b", get_channel_layer()))


def test_join_still_works_end_to_end() -> None:
    # The helpers above must not leave the real database or layer broken.
    alice = get_user_model().objects.create_user("alice")
    consumer = live_consumer()
    assert dispatch.join(consumer, "lobby", alice, subscribe=False) is True
    assert group_members("lobby") == {"specific.a!1"}
    assert str(Presence.objects.get()) == "alice in lobby"
    operations.leave_all("specific.a!1")
    assert group_members("lobby") == set()
