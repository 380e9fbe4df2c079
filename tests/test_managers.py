"""The 1.0.0 API on Room and Presence, and its ``a``-prefixed async twins.

Names, argument names and return values are those of django-channels-presence
1.0.0 (see the reference table); each twin must do what its sync method does.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import redis
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.test import override_settings
from django.utils import timezone

from channels_presence import operations
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from channels_presence.signals import presence_changed
from tests.helpers import ago, group_members

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = "lobby"
OTHER_ROOM = "kitchen"
SOCKET = "specific.test!alpha"
OTHER_SOCKET = "specific.test!beta"
THIRD_SOCKET = "specific.test!gamma"


def _sockets(room_name: str) -> set[str]:
    return set(
        Presence.objects.filter(room__channel_name=room_name).values_list(
            "channel_name", flat=True
        )
    )


@pytest.fixture
def explicit_layer() -> Iterator[Any]:
    """A Redis channel layer that is not the configured default one."""
    default: Any = get_channel_layer()
    layer = RedisChannelLayer(
        hosts=[settings.REDIS_URL], prefix=f"{default.prefix}-explicit"
    )
    yield layer
    # Deleted with a plain client: the layer's own flush() would close
    # connections that may belong to an async test's event loop.
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{layer.prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# Room.objects.add


def test_add_returns_the_room_and_creates_room_presence_and_group_membership(alice):
    room = Room.objects.add(ROOM, SOCKET, alice)

    assert isinstance(room, Room)
    assert room.pk == Room.objects.get(channel_name=ROOM).pk
    presence = Presence.objects.get()
    assert (presence.room_id, presence.channel_name) == (room.pk, SOCKET)
    assert presence.user_id == alice.pk
    assert group_members(ROOM) == {SOCKET}


def test_add_accepts_the_keyword_argument_names_of_1_0_0(alice):
    room = Room.objects.add(
        room_channel_name=ROOM, user_channel_name=SOCKET, user=alice
    )

    assert room.channel_name == ROOM
    assert Presence.objects.get(room=room, channel_name=SOCKET).user_id == alice.pk
    assert group_members(ROOM) == {SOCKET}


def test_add_without_user_stores_an_anonymous_presence():
    Room.objects.add(ROOM, SOCKET)

    assert Presence.objects.get(channel_name=SOCKET).user_id is None


def test_add_of_a_second_socket_reuses_the_room():
    first = Room.objects.add(ROOM, SOCKET)
    second = Room.objects.add(ROOM, OTHER_SOCKET)

    assert first.pk == second.pk
    assert Room.objects.count() == 1
    assert _sockets(ROOM) == {SOCKET, OTHER_SOCKET}
    assert group_members(ROOM) == {SOCKET, OTHER_SOCKET}


# Room.objects.remove


def test_remove_takes_the_socket_out_of_the_room_and_its_group():
    Room.objects.add(ROOM, SOCKET)
    Room.objects.add(ROOM, OTHER_SOCKET)

    result = Room.objects.remove(ROOM, SOCKET)  # type: ignore[func-returns-value]

    assert result is None
    assert _sockets(ROOM) == {OTHER_SOCKET}
    assert group_members(ROOM) == {OTHER_SOCKET}


def test_remove_accepts_the_keyword_argument_names_of_1_0_0():
    Room.objects.add(ROOM, SOCKET)

    Room.objects.remove(room_channel_name=ROOM, user_channel_name=SOCKET)

    assert not Presence.objects.exists()


def test_remove_from_an_unknown_room_is_a_no_op(signals):
    Room.objects.add(ROOM, SOCKET)
    signals.clear()

    assert Room.objects.remove(OTHER_ROOM, SOCKET) is None  # type: ignore[func-returns-value]

    assert not Room.objects.filter(channel_name=OTHER_ROOM).exists()
    assert _sockets(ROOM) == {SOCKET}
    assert group_members(ROOM) == {SOCKET}
    assert signals == []


def test_remove_of_an_unknown_socket_is_a_no_op(signals):
    Room.objects.add(ROOM, SOCKET)
    signals.clear()

    assert Room.objects.remove(ROOM, OTHER_SOCKET) is None  # type: ignore[func-returns-value]

    assert _sockets(ROOM) == {SOCKET}
    assert group_members(ROOM) == {SOCKET}
    assert signals == []


# Room.objects.prune_presences and prune_rooms


def test_prune_presences_removes_presences_older_than_age():
    operations.join(ROOM, SOCKET, at=ago(45))
    operations.join(ROOM, OTHER_SOCKET, at=ago(15))

    Room.objects.prune_presences(age=30)

    assert _sockets(ROOM) == {OTHER_SOCKET}
    assert group_members(ROOM) == {OTHER_SOCKET}


def test_prune_presences_defaults_to_the_max_age_setting():
    operations.join(ROOM, SOCKET, at=ago(45))
    operations.join(ROOM, OTHER_SOCKET, at=ago(15))

    Room.objects.prune_presences()
    assert _sockets(ROOM) == {SOCKET, OTHER_SOCKET}  # 60 s by default

    with override_settings(CHANNELS_PRESENCE_MAX_AGE=30):
        Room.objects.prune_presences()
    assert _sockets(ROOM) == {OTHER_SOCKET}


def test_prune_presences_discards_sockets_from_the_layer_passed_in(explicit_layer):
    operations.join(
        ROOM, SOCKET, at=ago(45), subscribe=True, channel_layer=explicit_layer
    )
    assert group_members(ROOM, explicit_layer) == {SOCKET}

    Room.objects.prune_presences(explicit_layer, 30)

    assert not Presence.objects.exists()
    assert group_members(ROOM, explicit_layer) == set()
    assert group_members(events_group(ROOM), explicit_layer) == set()


def test_prune_presences_accepts_channel_layer_as_a_keyword(explicit_layer):
    operations.join(ROOM, SOCKET, at=ago(45), channel_layer=explicit_layer)

    Room.objects.prune_presences(channel_layer=explicit_layer, age=30)

    assert not Presence.objects.exists()
    assert group_members(ROOM, explicit_layer) == set()


def test_prune_rooms_deletes_only_empty_rooms():
    Room.objects.add(ROOM, SOCKET)
    Room.objects.create(channel_name=OTHER_ROOM)

    assert Room.objects.prune_rooms() == [OTHER_ROOM]

    assert list(Room.objects.values_list("channel_name", flat=True)) == [ROOM]


# Presence.objects.touch and leave_all


def test_touch_marks_every_presence_of_the_socket_as_seen_now():
    operations.join(ROOM, SOCKET, at=ago(45))
    operations.join(OTHER_ROOM, SOCKET, at=ago(45))
    operations.join(ROOM, OTHER_SOCKET, at=ago(45))
    before = timezone.now()

    Presence.objects.touch(SOCKET)

    touched = Presence.objects.filter(channel_name=SOCKET)
    assert touched.count() == 2
    assert all(p.last_seen >= before for p in touched)
    assert Presence.objects.get(channel_name=OTHER_SOCKET).last_seen < before


def test_leave_all_takes_the_socket_out_of_every_room():
    Room.objects.add(ROOM, SOCKET)
    Room.objects.add(OTHER_ROOM, SOCKET)
    Room.objects.add(ROOM, OTHER_SOCKET)

    Presence.objects.leave_all(SOCKET)

    assert list(Presence.objects.values_list("channel_name", flat=True)) == [
        OTHER_SOCKET
    ]
    assert group_members(ROOM) == {OTHER_SOCKET}
    assert group_members(OTHER_ROOM) == set()


# The querysets: stale, prune and remove on any set of presences; empty rooms


def _signalled(signals: list[dict[str, Any]]) -> list[tuple[str, str | None, bool]]:
    """Each signal's room, removed socket and bulk_change, in a stable order."""
    return sorted(
        (
            s["room"].channel_name,
            s["removed"] and s["removed"].channel_name,
            s["bulk_change"],
        )
        for s in signals
    )


def test_operations_remove_takes_the_sockets_of_a_queryset_out_of_their_rooms(
    alice, signals
):
    operations.join(ROOM, SOCKET, alice, subscribe=True)
    operations.join(OTHER_ROOM, OTHER_SOCKET, alice, subscribe=True)
    operations.join(ROOM, THIRD_SOCKET, subscribe=True)
    signals.clear()

    removed = operations.remove(Presence.objects.filter(user=alice))

    assert sorted(p.channel_name for p in removed) == [SOCKET, OTHER_SOCKET]
    assert _sockets(ROOM) == {THIRD_SOCKET}
    assert _sockets(OTHER_ROOM) == set()
    assert Room.objects.count() == 2
    assert group_members(ROOM) == {THIRD_SOCKET}
    assert group_members(events_group(ROOM)) == {THIRD_SOCKET}
    assert group_members(OTHER_ROOM) == set()
    assert group_members(events_group(OTHER_ROOM)) == set()
    assert _signalled(signals) == [
        (OTHER_ROOM, OTHER_SOCKET, False),
        (ROOM, SOCKET, False),
    ]


def test_queryset_remove_uses_the_channel_layer_passed_in(explicit_layer, signals):
    for socket in (SOCKET, OTHER_SOCKET):
        operations.join(ROOM, socket, subscribe=True, channel_layer=explicit_layer)
    operations.join(OTHER_ROOM, THIRD_SOCKET, channel_layer=explicit_layer)
    signals.clear()

    removed = Presence.objects.filter(room__channel_name=ROOM).remove(explicit_layer)

    assert sorted(p.channel_name for p in removed) == [SOCKET, OTHER_SOCKET]
    assert _sockets(ROOM) == set()
    assert _sockets(OTHER_ROOM) == {THIRD_SOCKET}
    assert group_members(ROOM, explicit_layer) == set()
    assert group_members(events_group(ROOM), explicit_layer) == set()
    assert group_members(OTHER_ROOM, explicit_layer) == {THIRD_SOCKET}
    assert _signalled(signals) == [(ROOM, SOCKET, False), (ROOM, OTHER_SOCKET, False)]


def test_queryset_stale_narrows_the_queryset_and_changes_nothing(signals):
    operations.join(ROOM, SOCKET, at=ago(45))
    operations.join(ROOM, OTHER_SOCKET, at=ago(75))
    operations.join(ROOM, THIRD_SOCKET, at=ago(15))
    operations.join(OTHER_ROOM, "specific.test!elsewhere", at=ago(75))
    signals.clear()
    in_room = Presence.objects.filter(room__channel_name=ROOM)

    stale = set(in_room.stale(30).values_list("channel_name", flat=True))
    stale_by_default = set(in_room.stale().values_list("channel_name", flat=True))

    assert stale == {SOCKET, OTHER_SOCKET}
    assert stale_by_default == {OTHER_SOCKET}  # MAX_AGE is 60 s
    assert _sockets(ROOM) == {SOCKET, OTHER_SOCKET, THIRD_SOCKET}
    assert group_members(ROOM) == {SOCKET, OTHER_SOCKET, THIRD_SOCKET}
    assert signals == []


def test_queryset_prune_removes_only_its_stale_presences(
    alice, explicit_layer, signals
):
    join = partial(operations.join, subscribe=True, channel_layer=explicit_layer)
    join(ROOM, SOCKET, alice, at=ago(45))
    join(OTHER_ROOM, SOCKET, alice, at=ago(45))
    join(ROOM, OTHER_SOCKET, alice, at=ago(15))
    join(ROOM, THIRD_SOCKET, at=ago(45))
    signals.clear()

    removed = Presence.objects.filter(user=alice).prune(30, explicit_layer)

    assert sorted((p.room.channel_name, p.channel_name) for p in removed) == [
        (OTHER_ROOM, SOCKET),
        (ROOM, SOCKET),
    ]
    assert _sockets(ROOM) == {OTHER_SOCKET, THIRD_SOCKET}
    assert _sockets(OTHER_ROOM) == set()
    for group in (ROOM, events_group(ROOM)):
        assert group_members(group, explicit_layer) == {OTHER_SOCKET, THIRD_SOCKET}
    for group in (OTHER_ROOM, events_group(OTHER_ROOM)):
        assert group_members(group, explicit_layer) == set()
    assert _signalled(signals) == [(OTHER_ROOM, None, True), (ROOM, None, True)]


def test_room_presence_set_prune_prunes_only_that_room(signals):
    room = operations.join(ROOM, SOCKET, at=ago(45), subscribe=True)
    assert room is not None
    operations.join(ROOM, OTHER_SOCKET, at=ago(15), subscribe=True)
    operations.join(OTHER_ROOM, THIRD_SOCKET, at=ago(45), subscribe=True)
    signals.clear()

    removed = room.presence_set.prune(30)

    assert [p.channel_name for p in removed] == [SOCKET]
    assert _sockets(ROOM) == {OTHER_SOCKET}
    assert _sockets(OTHER_ROOM) == {THIRD_SOCKET}
    assert group_members(ROOM) == {OTHER_SOCKET}
    assert group_members(events_group(ROOM)) == {OTHER_SOCKET}
    assert group_members(OTHER_ROOM) == {THIRD_SOCKET}
    assert _signalled(signals) == [(ROOM, None, True)]


def test_room_objects_empty_lists_the_rooms_without_presences_and_deletes_none():
    Room.objects.add(ROOM, SOCKET)
    Room.objects.create(channel_name=OTHER_ROOM)
    Room.objects.create(channel_name="attic")

    empty = Room.objects.empty()

    assert sorted(empty.values_list("channel_name", flat=True)) == [
        "attic",
        OTHER_ROOM,
    ]
    assert Room.objects.count() == 3
    Presence.objects.get().delete()
    assert empty.count() == 3  # a queryset: evaluated afresh


# Room instance methods


def test_add_presence_puts_the_socket_in_the_room(alice):
    room = Room.objects.create(channel_name=ROOM)

    assert room.add_presence(SOCKET, user=alice) is None  # type: ignore[func-returns-value]

    assert Presence.objects.get(room=room, channel_name=SOCKET).user_id == alice.pk
    assert group_members(ROOM) == {SOCKET}


def test_remove_presence_by_channel_name():
    room = Room.objects.add(ROOM, SOCKET)
    Room.objects.add(ROOM, OTHER_SOCKET)

    room.remove_presence(channel_name=SOCKET)

    assert _sockets(ROOM) == {OTHER_SOCKET}
    assert group_members(ROOM) == {OTHER_SOCKET}


def test_remove_presence_by_presence():
    room = Room.objects.add(ROOM, SOCKET)
    Room.objects.add(ROOM, OTHER_SOCKET)

    room.remove_presence(presence=Presence.objects.get(channel_name=SOCKET))

    assert _sockets(ROOM) == {OTHER_SOCKET}
    assert group_members(ROOM) == {OTHER_SOCKET}


def test_remove_presence_with_neither_name_nor_presence_raises_type_error():
    room = Room.objects.add(ROOM, SOCKET)

    with pytest.raises(TypeError, match="channel_name or a presence"):
        room.remove_presence()

    assert _sockets(ROOM) == {SOCKET}
    assert group_members(ROOM) == {SOCKET}


def test_room_prune_presences_prunes_only_that_room():
    room = operations.join(ROOM, SOCKET, at=ago(45))
    assert room is not None
    operations.join(ROOM, OTHER_SOCKET, at=ago(15))
    operations.join(OTHER_ROOM, THIRD_SOCKET, at=ago(45))

    room.prune_presences(age_in_seconds=30)

    assert _sockets(ROOM) == {OTHER_SOCKET}
    assert _sockets(OTHER_ROOM) == {THIRD_SOCKET}
    assert group_members(ROOM) == {OTHER_SOCKET}
    assert group_members(OTHER_ROOM) == {THIRD_SOCKET}


def test_room_prune_presences_defaults_to_the_max_age_setting():
    room = operations.join(ROOM, SOCKET, at=ago(45))
    assert room is not None

    room.prune_presences()
    assert _sockets(ROOM) == {SOCKET}

    with override_settings(CHANNELS_PRESENCE_MAX_AGE=30):
        room.prune_presences()
    assert _sockets(ROOM) == set()


def test_get_users_counts_a_user_with_two_sockets_once(alice, bob, django_user_model):
    carol = django_user_model.objects.create_user(username="carol")
    room = Room.objects.add(ROOM, SOCKET, alice)
    Room.objects.add(ROOM, OTHER_SOCKET, alice)
    Room.objects.add(ROOM, THIRD_SOCKET, bob)
    Room.objects.add(ROOM, "specific.test!anonymous")
    Room.objects.add(OTHER_ROOM, SOCKET, carol)

    users = room.get_users()

    assert sorted(user.pk for user in users) == sorted([alice.pk, bob.pk])
    assert users.count() == 2


def test_get_anonymous_count_counts_sockets_without_a_logged_in_user(alice):
    room = Room.objects.add(ROOM, SOCKET)
    Room.objects.add(ROOM, OTHER_SOCKET, AnonymousUser())
    Room.objects.add(ROOM, THIRD_SOCKET, alice)
    Room.objects.add(OTHER_ROOM, "specific.test!elsewhere")

    assert room.get_anonymous_count() == 2


def test_broadcast_changed_sends_presence_changed_with_the_room_class_as_sender(
    signals,
):
    room = Room.objects.add(ROOM, SOCKET)
    presence = Presence.objects.get()
    signals.clear()

    room.broadcast_changed(added=presence)
    room.broadcast_changed(removed=presence)
    room.broadcast_changed(bulk_change=True)

    assert signals == [
        {
            "sender": Room,
            "signal": presence_changed,
            "room": room,
            "added": presence,
            "removed": None,
            "bulk_change": False,
        },
        {
            "sender": Room,
            "signal": presence_changed,
            "room": room,
            "added": None,
            "removed": presence,
            "bulk_change": False,
        },
        {
            "sender": Room,
            "signal": presence_changed,
            "room": room,
            "added": None,
            "removed": None,
            "bulk_change": True,
        },
    ]


def test_receiver_written_for_1_0_0_keeps_working():
    calls: list[tuple[Any, str, Any, Any, bool]] = []

    def handler(sender, room, added, removed, bulk_change, **kwargs):
        calls.append(
            (
                sender,
                room.channel_name,
                added and added.channel_name,
                removed and removed.channel_name,
                bulk_change,
            )
        )

    presence_changed.connect(handler)
    try:
        Room.objects.add(ROOM, SOCKET)
        Room.objects.remove(ROOM, SOCKET)
        operations.join(ROOM, OTHER_SOCKET, at=ago(45))
        Room.objects.prune_presences(age=30)
    finally:
        presence_changed.disconnect(handler)

    assert calls == [
        (Room, ROOM, SOCKET, None, False),
        (Room, ROOM, None, SOCKET, False),
        (Room, ROOM, OTHER_SOCKET, None, False),
        (Room, ROOM, None, None, True),
    ]


# The async twins


async def test_aadd_returns_the_room_and_creates_room_presence_and_group_membership(
    alice,
):
    room = await Room.objects.aadd(ROOM, SOCKET, alice)

    assert isinstance(room, Room)
    assert room.pk == (await Room.objects.aget(channel_name=ROOM)).pk
    presence = await Presence.objects.aget()
    assert (presence.room_id, presence.channel_name) == (room.pk, SOCKET)
    assert presence.user_id == alice.pk
    assert group_members(ROOM) == {SOCKET}


async def test_aadd_accepts_the_keyword_argument_names_of_1_0_0():
    room = await Room.objects.aadd(
        room_channel_name=ROOM, user_channel_name=SOCKET, user=None
    )

    assert room.channel_name == ROOM
    assert await Presence.objects.filter(room=room, user=None).acount() == 1


async def test_aremove_takes_the_socket_out_of_the_room_and_its_group(signals):
    await Room.objects.aadd(ROOM, SOCKET)
    await Room.objects.aadd(ROOM, OTHER_SOCKET)
    signals.clear()

    assert await Room.objects.aremove(ROOM, SOCKET) is None  # type: ignore[func-returns-value]

    assert [
        name async for name in Presence.objects.values_list("channel_name", flat=True)
    ] == [OTHER_SOCKET]
    assert group_members(ROOM) == {OTHER_SOCKET}
    assert [s["removed"].channel_name for s in signals] == [SOCKET]


async def test_aremove_of_an_unknown_room_or_socket_is_a_no_op(signals):
    await Room.objects.aadd(ROOM, SOCKET)
    signals.clear()

    await Room.objects.aremove(OTHER_ROOM, SOCKET)
    await Room.objects.aremove(ROOM, OTHER_SOCKET)

    assert not await Room.objects.filter(channel_name=OTHER_ROOM).aexists()
    assert await Presence.objects.filter(channel_name=SOCKET).aexists()
    assert group_members(ROOM) == {SOCKET}
    assert signals == []


async def test_aprune_presences_removes_stale_presences(explicit_layer):
    join = database_sync_to_async(operations.join)
    await join(ROOM, SOCKET, at=ago(45), channel_layer=explicit_layer)
    await join(ROOM, OTHER_SOCKET, at=ago(15), channel_layer=explicit_layer)

    await Room.objects.aprune_presences(explicit_layer, 30)

    assert [
        name async for name in Presence.objects.values_list("channel_name", flat=True)
    ] == [OTHER_SOCKET]
    assert group_members(ROOM, explicit_layer) == {OTHER_SOCKET}


async def test_aprune_presences_defaults_to_the_default_layer_and_max_age():
    join = database_sync_to_async(operations.join)
    await join(ROOM, SOCKET, at=ago(45))
    await join(ROOM, OTHER_SOCKET, at=ago(75))

    await Room.objects.aprune_presences()

    assert [
        name async for name in Presence.objects.values_list("channel_name", flat=True)
    ] == [SOCKET]
    assert group_members(ROOM) == {SOCKET}


async def test_aprune_rooms_deletes_only_empty_rooms():
    await Room.objects.aadd(ROOM, SOCKET)
    await Room.objects.acreate(channel_name=OTHER_ROOM)

    assert await Room.objects.aprune_rooms() == [OTHER_ROOM]

    assert [
        name async for name in Room.objects.values_list("channel_name", flat=True)
    ] == [ROOM]


async def test_atouch_marks_every_presence_of_the_socket_as_seen_now():
    join = database_sync_to_async(operations.join)
    await join(ROOM, SOCKET, at=ago(45))
    await join(OTHER_ROOM, SOCKET, at=ago(45))
    await join(ROOM, OTHER_SOCKET, at=ago(45))
    before = timezone.now()

    await Presence.objects.atouch(SOCKET)

    assert await Presence.objects.filter(last_seen__gte=before).acount() == 2
    assert not await Presence.objects.filter(
        channel_name=OTHER_SOCKET, last_seen__gte=before
    ).aexists()


async def test_aleave_all_takes_the_socket_out_of_every_room(signals):
    await Room.objects.aadd(ROOM, SOCKET)
    await Room.objects.aadd(OTHER_ROOM, SOCKET)
    await Room.objects.aadd(ROOM, OTHER_SOCKET)
    signals.clear()

    await Presence.objects.aleave_all(SOCKET)

    assert [
        name async for name in Presence.objects.values_list("channel_name", flat=True)
    ] == [OTHER_SOCKET]
    assert group_members(ROOM) == {OTHER_SOCKET}
    assert group_members(OTHER_ROOM) == set()
    assert sorted(s["room"].channel_name for s in signals) == [OTHER_ROOM, ROOM]


async def test_room_aadd_presence_puts_the_socket_in_the_room(alice):
    room = await Room.objects.acreate(channel_name=ROOM)

    assert await room.aadd_presence(SOCKET, alice) is None  # type: ignore[func-returns-value]

    presence = await Presence.objects.aget(room=room, channel_name=SOCKET)
    assert presence.user_id == alice.pk
    assert group_members(ROOM) == {SOCKET}


async def test_room_aremove_presence_by_channel_name_and_by_presence():
    room = await Room.objects.aadd(ROOM, SOCKET)
    await Room.objects.aadd(ROOM, OTHER_SOCKET)
    await Room.objects.aadd(ROOM, THIRD_SOCKET)

    await room.aremove_presence(channel_name=SOCKET)
    await room.aremove_presence(
        presence=await Presence.objects.aget(channel_name=OTHER_SOCKET)
    )

    assert [
        name async for name in Presence.objects.values_list("channel_name", flat=True)
    ] == [THIRD_SOCKET]
    assert group_members(ROOM) == {THIRD_SOCKET}


async def test_room_aremove_presence_with_neither_name_nor_presence_raises_type_error():
    room = await Room.objects.aadd(ROOM, SOCKET)

    with pytest.raises(TypeError, match="channel_name or a presence"):
        await room.aremove_presence()

    assert await Presence.objects.acount() == 1


async def test_room_aprune_presences_prunes_only_that_room():
    join = database_sync_to_async(operations.join)
    room = await join(ROOM, SOCKET, at=ago(45))
    await join(ROOM, OTHER_SOCKET, at=ago(15))
    await join(OTHER_ROOM, THIRD_SOCKET, at=ago(45))

    await room.aprune_presences(30)

    assert {
        name async for name in Presence.objects.values_list("channel_name", flat=True)
    } == {OTHER_SOCKET, THIRD_SOCKET}
    assert group_members(ROOM) == {OTHER_SOCKET}
    assert group_members(OTHER_ROOM) == {THIRD_SOCKET}


async def test_room_get_users_can_be_iterated_asynchronously(alice, bob):
    room = await Room.objects.aadd(ROOM, SOCKET, alice)
    await Room.objects.aadd(ROOM, OTHER_SOCKET, alice)
    await Room.objects.aadd(OTHER_ROOM, THIRD_SOCKET, bob)

    assert [user.pk async for user in room.get_users()] == [alice.pk]


async def test_room_aget_anonymous_count_counts_sockets_without_a_logged_in_user(
    alice,
):
    room = await Room.objects.aadd(ROOM, SOCKET)
    await Room.objects.aadd(ROOM, OTHER_SOCKET, AnonymousUser())
    await Room.objects.aadd(ROOM, THIRD_SOCKET, alice)
    await Room.objects.aadd(OTHER_ROOM, "specific.test!elsewhere")

    assert await room.aget_anonymous_count() == 2


async def test_room_abroadcast_changed_sends_presence_changed(signals):
    room = await Room.objects.aadd(ROOM, SOCKET)
    presence = await Presence.objects.aget()
    signals.clear()

    await room.abroadcast_changed(added=presence)
    await room.abroadcast_changed(None, presence)
    await room.abroadcast_changed(bulk_change=True)

    assert [
        (s["sender"], s["room"], s["added"], s["removed"], s["bulk_change"])
        for s in signals
    ] == [
        (Room, room, presence, None, False),
        (Room, room, None, presence, False),
        (Room, room, None, None, True),
    ]
