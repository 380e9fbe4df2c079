"""Deleting a user: its sockets leave their rooms, as ``user_deleted``.

Without this, the user's presences went with the foreign key's cascade: their
rows deleted with no change set, so their sockets stayed in the rooms' groups,
the rooms' counts and versions stood still, and nobody heard of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, transaction
from django.db.models.signals import pre_delete
from django.test.utils import isolate_apps
from django.urls import reverse

from channels_presence import broadcast, changes, operations, protocol, receivers
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from channels_presence.protocol import Counts
from channels_presence.signals import user_left_room
from tests.helpers import celery_mode, group_members, in_background, layer_down

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = "lobby"
OTHER_ROOM = "kitchen"
SOCKET = "specific.test!alpha"
OTHER_SOCKET = "specific.test!beta"
BOBS_SOCKET = "specific.test!gamma"
MARKER = {"type": "test.marker"}

T = TypeVar("T")

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="SQLite lets one transaction write at a time (BEGIN IMMEDIATE): "
    "another cannot commit while a user is being deleted",
)


class Rollback(Exception):
    """Raised by a test to roll back its transaction."""


@pytest.fixture
def left() -> Iterator[list[tuple[str, Any, str, str]]]:
    """(room, user pk, key, reason) of each ``user_left_room`` sent."""
    seen: list[tuple[str, Any, str, str]] = []

    def receiver(sender: Any, room: Room, user: Any, key: str, reason: str, **kw: Any):
        seen.append((room.channel_name, user.pk if user else None, key, reason))

    user_left_room.connect(receiver, dispatch_uid="tests.users.left")
    yield seen
    user_left_room.disconnect(dispatch_uid="tests.users.left")


def _rooms() -> dict[str, tuple[int, Counts]]:
    """Each room's version and counts, by name."""
    return {
        room.channel_name: (room.version, room.counts()) for room in Room.objects.all()
    }


def _everything() -> tuple[Any, ...]:
    """Rooms, presences, users and group memberships: what a delete may change."""
    presences = sorted(
        Presence.objects.values_list("room__channel_name", "channel_name", "user_id")
    )
    users = sorted(get_user_model().objects.values_list("pk", flat=True))
    memberships = {
        group: group_members(group)
        for room in (ROOM, OTHER_ROOM)
        for group in (room, events_group(room))
    }
    return _rooms(), presences, users, memberships


def _in_two_rooms(user: Any, sockets: tuple[str, str] = (SOCKET, OTHER_SOCKET)) -> None:
    """``user`` with a subscribed socket in ROOM and another socket in OTHER_ROOM."""
    operations.join(ROOM, sockets[0], user, subscribe=True)
    operations.join(OTHER_ROOM, sockets[1], user)


async def _next(layer: Any, channel: str) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), 10)
    return message


async def _drain(layer: Any, channel: str) -> None:
    """Read what ``channel`` got so far."""
    await layer.send(channel, MARKER)
    while await _next(layer, channel) != MARKER:
        pass


def _leaves(user: dict[str, Any], presences: list[Presence]) -> dict[str, Any]:
    """The ``leaves`` of a diff in which ``presences`` of a user (its member
    payload: ``user``) left, deleted."""
    return {
        presences[0].key: {
            "user": user,
            "metas": [
                {
                    **protocol.meta(p.ref, p.joined_at),
                    "reason": protocol.USER_DELETED,
                }
                for p in presences
            ],
        }
    }


# A deleted user's sockets leave every room they are in.


async def test_deleting_a_user_takes_its_sockets_out_of_every_room_as_user_deleted(
    alice, bob, signals, left
):
    layer: Any = get_channel_layer()
    await database_sync_to_async(_in_two_rooms)(alice)
    bobs_socket = await layer.new_channel()
    await database_sync_to_async(operations.join)(
        ROOM, bobs_socket, bob, subscribe=True
    )
    watchers = {room: await layer.new_channel() for room in (ROOM, OTHER_ROOM)}
    for room, watcher in watchers.items():
        await layer.group_add(events_group(room), watcher)
    await _drain(layer, bobs_socket)
    before = await database_sync_to_async(_rooms)()
    gone = {
        p.room.channel_name: p
        async for p in Presence.objects.filter(user=alice).select_related("room")
    }
    pk, key = alice.pk, protocol.user_key(alice.pk)
    # As it was: the instance deleted loses its pk.
    payload = broadcast.user_payload(alice)
    assert payload == {"id": alice.pk, "username": "alice"}
    signals.clear()

    deleted = await database_sync_to_async(alice.delete)()

    for room in watchers:
        await layer.group_send(events_group(room), MARKER)
    await layer.send(bobs_socket, MARKER)
    # The presences are not in the count: the cascade found none left to delete.
    assert deleted == (1, {"auth.User": 1})
    assert not await Presence.objects.filter(user_id=pk).aexists()
    assert await Presence.objects.filter(user=bob).acount() == 1
    after = await database_sync_to_async(_rooms)()
    for room in (ROOM, OTHER_ROOM):
        version, _ = before[room]
        stays = Counts(users=1, sockets=1) if room == ROOM else Counts()
        assert after[room] == (version + 1, stays)
        diff = await _next(layer, watchers[room])
        assert diff == {
            "type": "presence.diff",
            "room": room,
            "from": version,
            "version": version + 1,
            "joins": {},
            "leaves": _leaves(payload, [gone[room]]),
            "counts": stays._asdict(),
        }
        assert await _next(layer, watchers[room]) == MARKER
    # Bob, subscribed, heard of it too.
    assert (await _next(layer, bobs_socket))["leaves"] == _leaves(payload, [gone[ROOM]])
    assert await _next(layer, bobs_socket) == MARKER
    # Invariant 2: the sockets left the rooms' groups, events groups included.
    assert group_members(ROOM) == {bobs_socket}
    assert group_members(events_group(ROOM)) == {bobs_socket, watchers[ROOM]}
    assert group_members(OTHER_ROOM) == set()
    assert sorted(left) == [
        (OTHER_ROOM, pk, key, "user_deleted"),
        (ROOM, pk, key, "user_deleted"),
    ]
    removed = sorted(
        (s["room"].channel_name, s["removed"].channel_name, s["removed"].pk)
        for s in signals
    )
    assert removed == sorted((room, p.channel_name, p.pk) for room, p in gone.items())
    assert all(s["added"] is None and not s["bulk_change"] for s in signals)


def test_a_users_tabs_in_one_room_leave_in_one_change_set(alice, left):
    operations.join(ROOM, SOCKET, alice)
    operations.join(ROOM, OTHER_SOCKET, alice)
    (version, _) = _rooms()[ROOM]

    alice.delete()

    assert _rooms()[ROOM] == (version + 1, Counts())
    assert group_members(ROOM) == set()
    assert [(room, reason) for room, _, _, reason in left] == [(ROOM, "user_deleted")]


def test_deleting_users_by_queryset_takes_each_ones_sockets_out(alice, bob, left):
    _in_two_rooms(alice)
    operations.join(ROOM, BOBS_SOCKET, bob, subscribe=True)
    versions = {room: version for room, (version, _) in _rooms().items()}

    deleted, _ = get_user_model().objects.filter(pk__in=[alice.pk, bob.pk]).delete()

    assert deleted == 2
    assert not Presence.objects.exists()
    # One change set per room per user.
    assert _rooms() == {
        ROOM: (versions[ROOM] + 2, Counts()),
        OTHER_ROOM: (versions[OTHER_ROOM] + 1, Counts()),
    }
    for room in (ROOM, OTHER_ROOM):
        assert group_members(room) == set()
        assert group_members(events_group(room)) == set()
    assert sorted((room, key, reason) for room, _, key, reason in left) == [
        (OTHER_ROOM, protocol.user_key(alice.pk), "user_deleted"),
        (ROOM, protocol.user_key(alice.pk), "user_deleted"),
        (ROOM, protocol.user_key(bob.pk), "user_deleted"),
    ]


def test_a_user_without_presences_is_deleted_as_before(alice, bob, signals, left):
    operations.join(ROOM, BOBS_SOCKET, bob)
    before = _rooms()
    signals.clear()

    assert alice.delete() == (1, {"auth.User": 1})

    assert _rooms() == before
    assert signals == []
    assert left == []


def test_in_celery_mode_the_deleting_process_removes_them_itself(alice, left):
    # No worker runs here: a task would leave the rows where they are.
    _in_two_rooms(alice)
    with celery_mode():
        alice.delete()

    assert not Presence.objects.exists()
    assert group_members(ROOM) == group_members(OTHER_ROOM) == set()
    assert len(left) == 2


# Inside the caller's transaction.


def test_a_user_deleted_in_the_callers_transaction_leaves_at_its_commit(
    alice, signals, left
):
    _in_two_rooms(alice)
    signals.clear()

    with transaction.atomic():
        alice.delete()
        assert not Presence.objects.exists()
        # Nothing is told, nor does any socket leave, before the commit.
        assert signals == []
        assert left == []
        assert group_members(ROOM) == {SOCKET}
        assert group_members(OTHER_ROOM) == {OTHER_SOCKET}

    assert len(signals) == len(left) == 2
    assert group_members(ROOM) == group_members(events_group(ROOM)) == set()
    assert group_members(OTHER_ROOM) == set()


async def test_a_user_deleted_in_a_transaction_rolled_back_stays_in_its_rooms(
    alice, signals, left
):
    layer: Any = get_channel_layer()
    sockets = (await layer.new_channel(), await layer.new_channel())
    await database_sync_to_async(_in_two_rooms)(alice, sockets)
    await _drain(layer, sockets[0])
    watcher = await layer.new_channel()
    await layer.group_add(events_group(ROOM), watcher)
    before = await database_sync_to_async(_everything)()
    signals.clear()

    def delete_then_roll_back() -> None:
        with transaction.atomic():
            alice.delete()
            raise Rollback

    with pytest.raises(Rollback):
        await database_sync_to_async(delete_then_roll_back)()

    await layer.group_send(events_group(ROOM), MARKER)
    assert await _next(layer, watcher) == MARKER
    await layer.send(sockets[0], MARKER)
    assert await _next(layer, sockets[0]) == MARKER
    assert await database_sync_to_async(_everything)() == before
    assert signals == []
    assert left == []


# The channel layer down.


def test_a_user_deleted_while_the_channel_layer_is_down_is_deleted_all_the_same(
    alice, signals, left, caplog
):
    _in_two_rooms(alice)
    signals.clear()

    with layer_down():
        alice.delete()

    assert not get_user_model().objects.exists()
    assert not Presence.objects.exists()
    assert {room: counts for room, (_, counts) in _rooms().items()} == {
        ROOM: Counts(),
        OTHER_ROOM: Counts(),
    }
    assert len(signals) == len(left) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("retried in the background" in message for message in errors)
    assert broadcast.retries.pending() == 2


# The paths that reach a user's delete.


def test_deleting_a_user_through_a_proxy_model_takes_it_out_of_its_rooms(alice, left):
    _in_two_rooms(alice)

    # The proxy's deletes send pre_delete with the proxy as sender.
    with isolate_apps("tests") as registry:
        assert registry is not None

        class Member(get_user_model()):  # type: ignore[misc]
            class Meta:
                proxy = True
                app_label = "tests"

        assert receivers.user_models(registry) == [Member]
        receivers.connect(registry)
        try:
            Member.objects.get(pk=alice.pk).delete()
        finally:
            pre_delete.disconnect(sender=Member, dispatch_uid=receivers.DISPATCH_UID)

    assert not Presence.objects.exists()
    assert group_members(ROOM) == group_members(OTHER_ROOM) == set()
    assert len(left) == 2


@pytest.fixture
def admin_user(db: None) -> Any:
    """The superuser of ``admin_client``, without a password: hashing one is slow."""
    return get_user_model().objects.create_superuser("admin", password=None)


def test_a_user_deleted_in_the_admin_leaves_its_rooms(admin_client, alice, left):
    _in_two_rooms(alice)

    response = admin_client.post(
        reverse("admin:auth_user_delete", args=[alice.pk]), {"post": "yes"}
    )

    assert response.status_code == 302
    assert not get_user_model().objects.filter(username="alice").exists()
    assert not Presence.objects.exists()
    assert group_members(ROOM) == group_members(OTHER_ROOM) == set()
    assert sorted((room, reason) for room, _, _, reason in left) == [
        (OTHER_ROOM, "user_deleted"),
        (ROOM, "user_deleted"),
    ]


def test_the_user_model_is_connected_by_the_app(alice):
    assert get_user_model() in receivers.user_models()
    assert pre_delete.has_listeners(get_user_model())


@postgresql_only
def test_a_join_committed_while_its_user_is_deleted_leaves_as_user_deleted_too(
    alice, left, monkeypatch
):
    operations.join(ROOM, SOCKET, alice)
    remove = changes.remove
    joined: list[bool] = []

    def remove_then_join(*args: Any, **kwargs: Any) -> list[Presence]:
        removed = remove(*args, **kwargs)
        if not joined:
            # Another worker applies a join of the user, in a room it was not
            # in, and commits, after the user's presences were read and
            # before the cascade: the cascade would delete it silently.
            _elsewhere(lambda: operations.join(OTHER_ROOM, OTHER_SOCKET, alice))
            joined.append(True)
        return removed

    monkeypatch.setattr(changes, "remove", remove_then_join)

    alice.delete()

    assert joined
    assert not Presence.objects.exists()
    assert {room: counts for room, (_, counts) in _rooms().items()} == {
        ROOM: Counts(),
        OTHER_ROOM: Counts(),
    }
    assert group_members(OTHER_ROOM) == set()
    assert sorted((room, reason) for room, _, _, reason in left) == [
        (OTHER_ROOM, "user_deleted"),
        (ROOM, "user_deleted"),
    ]


def _elsewhere(call: Callable[[], T]) -> T:
    """Run ``call`` in another thread, so on another database connection."""
    return in_background(call).result(timeout=10)


@postgresql_only
def test_a_join_of_a_user_being_deleted_cannot_commit_behind_the_removal(
    alice, left, monkeypatch
):
    operations.join(ROOM, SOCKET, alice)
    remove = changes.remove
    calls: list[str] = []
    joins: list[Future[Any]] = []

    def remove_then_join(*args: Any, **kwargs: Any) -> list[Presence]:
        removed = remove(*args, **kwargs)
        calls.append("remove")
        if len(calls) == 2:
            # The user's presences were removed; only the cascade is to come.
            joins.append(in_background(lambda: _join_elsewhere(alice)))
            with contextlib.suppress(TimeoutError):
                joins[0].result(timeout=1)
        return removed

    monkeypatch.setattr(changes, "remove", remove_then_join)

    alice.delete()

    # The join waited for the user's row, then failed on its foreign key: it
    # neither committed behind the removal (for the cascade to delete it
    # silently) nor left its socket in the room's group.
    with pytest.raises(IntegrityError):
        joins[0].result(timeout=10)
    assert not Presence.objects.exists()
    # The room the join made went with it.
    assert {room: counts for room, (_, counts) in _rooms().items()} == {ROOM: Counts()}
    assert group_members(OTHER_ROOM) == set()
    assert [(room, reason) for room, _, _, reason in left] == [(ROOM, "user_deleted")]


def _join_elsewhere(user: Any) -> Any:
    return operations.join(OTHER_ROOM, OTHER_SOCKET, user)
