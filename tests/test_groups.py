"""groups.send and groups.leave of many groups at once, as a prune makes them.

On RedisChannelLayer, at the channels-redis releases of
``groups.FAST_PATH_VERSIONS``, they bypass group_send and group_discard
(pipelines per shard, on channels_redis's own keys); what a socket receives
must be what those would have given it. The same checks run on the public
path: on a real Redis with the fast path forced off (as for a release no test
has pinned), and on a layer without that path (InMemoryChannelLayer).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import BaseChannelLayer, InMemoryChannelLayer, get_channel_layer
from channels_redis.core import RedisChannelLayer
from django.conf import settings

from channels_presence import groups, operations
from channels_presence.groups import events_group
from channels_presence.protocol import DIFF_EVENTS
from channels_presence.testing import channel_messages
from tests.helpers import ago

GROUPS = 30

#: The channels-redis release this run has.
INSTALLED = importlib.metadata.version("channels-redis")


def _two_shards() -> RedisChannelLayer:
    """A layer of two shards on one server: the groups and channels hash to both."""
    layers: dict[str, Any] = settings.CHANNEL_LAYERS
    prefix = layers["default"]["CONFIG"]["prefix"] + "-groups"
    return RedisChannelLayer(hosts=[settings.REDIS_URL] * 2, prefix=prefix)


@pytest.fixture
def public_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path fenced off, as for a channels-redis release no test has pinned.

    Its Redis commands are a trap meanwhile: whatever runs takes channels'
    public API (group_add, group_discard, group_send, send) or fails.
    """
    monkeypatch.setattr(groups, "FAST_PATH_VERSIONS", ((0, 0, 0), (0, 0, 0)))

    def trap(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("channels_redis's internals used off the fast path")

    monkeypatch.setattr(groups, "_pipelined", trap)
    monkeypatch.setattr(groups, "_pipelined_now", trap)


@pytest.fixture(params=["redis, two shards", "redis, public path", "in memory"])
async def layer(request: pytest.FixtureRequest) -> AsyncIterator[BaseChannelLayer]:
    if request.param == "in memory":
        yield InMemoryChannelLayer()
        return
    if request.param == "redis, public path":
        request.getfixturevalue("public_path")
    redis = _two_shards()
    try:
        yield redis
    finally:
        await redis.flush()


async def _received(
    layer: BaseChannelLayer, sockets: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """What each socket has been sent, all of them read at once."""

    async def drain(channel: str) -> list[dict[str, Any]]:
        received = []
        while True:
            try:
                async with asyncio.timeout(0.5):
                    received.append(await layer.receive(channel))
            except TimeoutError:
                return received

    found = await asyncio.gather(*(drain(socket) for socket in sockets))
    return dict(zip(sockets, found, strict=True))


async def _two_in_each_group(layer: BaseChannelLayer) -> list[str]:
    """Sockets, the n-th in group ``room-{n % GROUPS}``."""
    # Sockets of one process share a channel key; each still gets its own.
    sockets = [await layer.new_channel() for _ in range(GROUPS * 2)]
    for number, socket in enumerate(sockets):
        await layer.group_add(f"room-{number % GROUPS}", socket)
    return sockets


async def test_each_member_of_many_groups_gets_each_message_once_in_order(
    layer: BaseChannelLayer,
) -> None:
    sockets = await _two_in_each_group(layer)

    await groups.send(
        layer,
        [(f"room-{n}", {"type": "first", "n": n}) for n in range(GROUPS)]
        + [(f"room-{n}", {"type": "second", "n": n}) for n in range(GROUPS)],
    )

    received = await _received(layer, sockets)
    for number, socket in enumerate(sockets):
        got = [(m["type"], m["n"]) for m in received[socket]]
        assert got == [("first", number % GROUPS), ("second", number % GROUPS)]


async def test_messages_to_one_group_or_channel_arrive_in_the_order_sent(
    layer: BaseChannelLayer,
) -> None:
    # A room's frames in one send: a diff must not overtake the one before it.
    sockets = [await layer.new_channel() for _ in range(2)]
    for socket in sockets:
        await layer.group_add("room", socket)

    await groups.send(layer, [("room", {"type": "group", "n": n}) for n in range(30)])
    await groups.send_to_channels(
        layer, [(sockets, {"type": "direct", "n": n}) for n in range(30)]
    )

    received = await _received(layer, sockets)
    for socket in sockets:
        assert [(m["type"], m["n"]) for m in received[socket]] == [
            *(("group", n) for n in range(30)),
            *(("direct", n) for n in range(30)),
        ]


async def test_leave_of_many_pairs_takes_only_those_sockets_out(
    layer: BaseChannelLayer,
) -> None:
    sockets = await _two_in_each_group(layer)
    gone = sockets[::2]

    await groups.leave(layer, [(f"room-{sockets.index(s) % GROUPS}", s) for s in gone])
    await groups.send(
        layer, [(f"room-{n}", {"type": "after", "n": n}) for n in range(GROUPS)]
    )

    received = await _received(layer, sockets)
    for socket in sockets:
        assert len(received[socket]) == (0 if socket in gone else 1)


async def test_a_send_to_a_group_without_members_does_nothing(
    layer: BaseChannelLayer,
) -> None:
    socket = await layer.new_channel()
    await layer.group_add("room", socket)

    await groups.send(layer, [("empty", {"type": "lost"}), ("room", {"type": "kept"})])

    received = await _received(layer, [socket])
    assert [m["type"] for m in received[socket]] == ["kept"]


def test_channels_are_mapped_to_keys_as_channels_redis_maps_them() -> None:
    # The same keys, shards, messages and capacities as channels_redis's own
    # mapping, for names of several processes, with and without a "!".
    layer = RedisChannelLayer(
        hosts=[settings.REDIS_URL] * 3,
        prefix="mapping",
        capacity=50,
        channel_capacity={"specific.b!*": 7, "plain-*": 3},
    )
    names = [
        *(f"specific.a!{n}" for n in range(5)),
        *(f"specific.b!{n}" for n in range(4)),
        "plain-one",
        "plain-two",
        "other",
        "specific.a!last",
    ]
    message = {"type": "presence.diff", "version": 3}

    ours = groups._by_key(layer, names, message)
    theirs = layer._map_channel_keys_to_connection(names, message)

    assert ours[0] == dict(theirs[0])
    assert {key: layer.deserialize(value) for key, value in ours[1].items()} == {
        key: layer.deserialize(value) for key, value in theirs[1].items()
    }
    assert ours[2] == theirs[2]


async def test_adds_and_leaves_from_sync_code_are_those_of_the_async_path(
    layer: BaseChannelLayer,
) -> None:
    # A sync consumer's thread: channels_redis layers get a blocking client
    # (no hop back to the loop); other layers the async path.
    sockets = [await layer.new_channel() for _ in range(GROUPS * 2)]
    joins = [
        (f"room-{n % GROUPS}", socket, DIFF_EVENTS) for n, socket in enumerate(sockets)
    ]
    await sync_to_async(groups.add_now)(layer, joins)
    gone = sockets[::2]
    await sync_to_async(groups.leave_now)(
        layer, [(f"room-{sockets.index(s) % GROUPS}", s) for s in gone]
    )

    await groups.send(
        layer,
        [(f"room-{n}", {"type": "room", "n": n}) for n in range(GROUPS)]
        + [(events_group(f"room-{n}"), {"type": "events"}) for n in range(GROUPS)],
    )

    received = await _received(layer, sockets)
    for socket in sockets:
        # Two groups' messages: in either order off the fast path.
        got = sorted(m["type"] for m in received[socket])
        assert got == ([] if socket in gone else ["events", "room"])
    assert (groups._blocking_clients(layer) is not None) == groups.fast_path(layer)


async def test_sends_from_sync_code_are_those_of_the_async_path(
    layer: BaseChannelLayer,
) -> None:
    # A worker's sends after commit: a blocking client on channels_redis
    # layers, the async path on others; the same messages, in the same order.
    sockets = await _two_in_each_group(layer)

    await sync_to_async(groups.send_now)(
        layer,
        [(f"room-{n}", {"type": "first", "n": n}) for n in range(GROUPS)]
        + [("empty", {"type": "lost", "n": -1})]
        + [(f"room-{n}", {"type": "second", "n": n}) for n in range(GROUPS)],
    )
    await sync_to_async(groups.send_to_channels_now)(
        layer, [(sockets[:3], {"type": "direct", "n": 0}), ([], {"type": "x"})]
    )

    received = await _received(layer, sockets)
    for number, socket in enumerate(sockets):
        got = [(m["type"], m["n"]) for m in received[socket]]
        expected = [("first", number % GROUPS), ("second", number % GROUPS)]
        assert got == expected + ([("direct", 0)] if number < 3 else [])


async def test_messages_sent_instead_replace_the_groups_ones_for_their_channels(
    layer: BaseChannelLayer,
) -> None:
    # A room's diff, and a joined socket's state instead of it.
    sockets = await _two_in_each_group(layer)

    await sync_to_async(groups.send_now)(
        layer,
        [(f"room-{n}", {"type": "diff", "n": n}) for n in range(GROUPS)],
        [("room-0", sockets[:1], {"type": "state", "n": -1})],
    )

    received = await _received(layer, sockets)
    for number, socket in enumerate(sockets):
        got = [(m["type"], m["n"]) for m in received[socket]]
        if number == 0:
            expected = [("state", -1)]
            if not groups.fast_path(layer):
                # Group sends cannot leave a member out: the state goes first.
                expected.append(("diff", 0))
        else:
            expected = [("diff", number % GROUPS)]
        assert got == expected


async def test_apply_tells_departing_sockets_then_discards_them_then_sends_events(
    layer: BaseChannelLayer,
) -> None:
    # A prune: the stale sockets hear their notice, not their own departure.
    sockets = await _two_in_each_group(layer)
    gone = sockets[:GROUPS]  # one of each group

    await groups.apply(
        layer,
        [(f"room-{n % GROUPS}", s) for n, s in enumerate(gone)],
        [(f"room-{n}", {"type": "event", "n": n}) for n in range(GROUPS)],
        notices=[(f"room-{n}", {"type": "notice", "n": n}) for n in range(GROUPS)],
    )

    received = await _received(layer, sockets)
    for number, socket in enumerate(sockets):
        got = [(m["type"], m["n"]) for m in received[socket]]
        n = number % GROUPS
        assert got == (
            [("notice", n)] if socket in gone else [("notice", n), ("event", n)]
        )


async def test_channel_messages_reads_what_a_channel_was_sent_on_either_path(
    layer: BaseChannelLayer,
) -> None:
    # The test helper, as sync tests call it.
    sockets = [await layer.new_channel() for _ in range(2)]
    await groups.send_to_channels(layer, [(sockets, {"type": "both"})])
    await layer.send(sockets[1], {"type": "second"})

    read = sync_to_async(channel_messages)
    assert await read(sockets[1], layer) == [{"type": "both"}, {"type": "second"}]
    assert await read(sockets[0], layer) == [{"type": "both"}]
    assert await read(sockets[0], layer) == []


# The fast path is fenced: channels_redis's own class, at a pinned release.


async def test_the_pinned_channels_redis_reads_what_the_fast_path_writes_and_back() -> (
    None
):
    """Pins the layout of channels-redis FAST_PATH_VERSIONS (4.0.0 to 4.3.0).

    The fast path writes and reads channels_redis's keys itself: a group's
    sorted set, a channel's messages, the shard each hashes to, a group
    message's one copy per process naming its channels. Here channels_redis's
    own group_add, group_discard, group_send and receive meet it both ways.
    A release outside the range fails the first assertion: read its
    group_add, group_discard, group_send, send and receive against
    groups.py, widen FAST_PATH_VERSIONS to it, and run this again.
    """
    layer = _two_shards()
    low, high = groups.FAST_PATH_VERSIONS
    assert groups.fast_path(layer), (
        f"channels-redis {INSTALLED} is outside FAST_PATH_VERSIONS "
        f"{low} to {high}: it takes the public path until this test pins it"
    )
    rooms = [f"room-{n}" for n in range(10)]
    assert {layer.consistent_hash(room) for room in rooms} == {0, 1}
    ours = [await layer.new_channel() for _ in rooms]
    ours_now = [await layer.new_channel() for _ in rooms]
    theirs = [await layer.new_channel() for _ in rooms]
    everyone = ours + ours_now + theirs
    try:
        await groups.add(
            layer, [(r, s, DIFF_EVENTS) for r, s in zip(rooms, ours, strict=True)]
        )
        await sync_to_async(groups.add_now)(
            layer, [(r, s, DIFF_EVENTS) for r, s in zip(rooms, ours_now, strict=True)]
        )
        for room, socket in zip(rooms, theirs, strict=True):
            await layer.group_add(room, socket)
            await layer.group_add(events_group(room), socket)

        # Our adds are in the keys channels_redis's group_send reads.
        for n, room in enumerate(rooms):
            await layer.group_send(room, {"type": "theirs", "n": n})
            await layer.group_send(events_group(room), {"type": "events", "n": n})
        # Their adds are in the keys we read; our messages are where receive
        # looks for them (one copy per process, naming its channels).
        await sync_to_async(groups.send_now)(
            layer, [(room, {"type": "ours", "n": n}) for n, room in enumerate(rooms)]
        )
        await groups.send(
            layer, [(room, {"type": "async", "n": n}) for n, room in enumerate(rooms)]
        )
        await sync_to_async(groups.send_to_channels_now)(
            layer, [(everyone, {"type": "direct", "n": -1})]
        )
        received = await _received(layer, everyone)
        for n in range(len(rooms)):
            for socket in (ours[n], ours_now[n], theirs[n]):
                assert [(m["type"], m["n"]) for m in received[socket]] == [
                    ("theirs", n),
                    ("events", n),
                    ("ours", n),
                    ("async", n),
                    ("direct", -1),
                ]

        # Each side's discards are seen by the other's sends.
        await sync_to_async(groups.leave_now)(
            layer, list(zip(rooms, theirs, strict=True))
        )
        await groups.leave(layer, list(zip(rooms, ours_now, strict=True)))
        for room, socket in zip(rooms, ours, strict=True):
            await layer.group_discard(room, socket)
            await layer.group_discard(events_group(room), socket)
        for n, room in enumerate(rooms):
            await layer.group_send(room, {"type": "theirs", "n": n})
            await layer.group_send(events_group(room), {"type": "events", "n": n})
        await sync_to_async(groups.send_now)(
            layer, [(room, {"type": "ours", "n": n}) for n, room in enumerate(rooms)]
        )
        received = await _received(layer, everyone)
        assert all(messages == [] for messages in received.values()), received
    finally:
        await layer.flush()


def test_only_channels_redis_itself_at_a_pinned_release_takes_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = RedisChannelLayer(hosts=[settings.REDIS_URL])
    assert groups.fast_path(layer)

    class Instrumented(RedisChannelLayer):  # type: ignore[misc]
        """A subclass may change what group_send does: it keeps its own."""

    assert not groups.fast_path(Instrumented(hosts=[settings.REDIS_URL]))
    assert not groups.fast_path(InMemoryChannelLayer())
    low, high = groups.FAST_PATH_VERSIONS
    for release in [(4, 3, 1), (4, 4, 0), (5, 0, 0), (3, 4, 1), None]:
        monkeypatch.setattr(groups, "_installed_channels_redis", lambda r=release: r)
        assert groups.fast_path(layer) == (
            release is not None and low <= release <= high
        )
    assert low <= (4, 3, 0) <= high


@pytest.mark.parametrize(
    ("version", "release"),
    [
        ("4.3.0", (4, 3, 0)),
        ("4.3", (4, 3, 0)),
        ("10.0.12", (10, 0, 12)),
        ("4.4.0b1", None),
        ("4.3.0rc1", None),
        ("4.3.0.post1", None),
        ("4.3.0.dev0", None),
        ("4.3.0+local", None),
        ("4.3.0.1", None),
    ],
)
def test_only_final_releases_can_be_pinned(
    version: str, release: tuple[int, int, int] | None
) -> None:
    assert groups._release(version) == release


MARKER = {"type": "marker"}


async def _until_marker(layer: BaseChannelLayer, channel: str) -> list[dict[str, Any]]:
    """What ``channel`` got so far: it is sent a marker and read up to it."""
    await layer.send(channel, MARKER)
    found = []
    async with asyncio.timeout(10):
        while (message := await layer.receive(channel)) != MARKER:
            found.append(message)
    return found


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("public_path")
async def test_off_the_fast_path_presence_works_end_to_end_through_the_public_api() -> (
    None
):
    # The project's own layer, on the shared Redis, as at a channels-redis
    # release no test has pinned: joins, a prune's notices, discards and
    # diffs, a leave.
    layer: Any = get_channel_layer()
    assert isinstance(layer, RedisChannelLayer)
    assert not groups.fast_path(layer)
    room = f"public-{uuid.uuid4().hex[:8]}"
    join = database_sync_to_async(operations.join)
    stale, fresh, watcher = [await layer.new_channel() for _ in range(3)]
    await layer.group_add(events_group(room), watcher)
    await join(room, stale, at=ago(45), subscribe=True)
    await join(room, fresh, at=ago(1), subscribe=True)
    joined = await _until_marker(layer, watcher)
    assert [(m["type"], len(m["joins"])) for m in joined] == [
        ("presence.diff", 1),
        ("presence.diff", 1),
    ]
    for socket in (stale, fresh):
        got = await _until_marker(layer, socket)
        assert got[0]["type"] == "presence.state"

    await database_sync_to_async(operations.prune_presences)(30)

    # The stale socket heard its notice, then left both groups before the
    # diff: it does not hear of its own departure.
    assert await _until_marker(layer, stale) == [
        {"type": "presence.expired", "room": room}
    ]
    for socket in (fresh, watcher):
        (diff,) = await _until_marker(layer, socket)
        assert diff["type"] == "presence.diff"
        assert [m["reason"] for v in diff["leaves"].values() for m in v["metas"]] == [
            "expired"
        ]
    await layer.group_send(room, {"type": "room"})
    assert await _until_marker(layer, stale) == []
    assert await _until_marker(layer, fresh) == [{"type": "room"}]

    await database_sync_to_async(operations.leave)(room, fresh)
    (diff,) = await _until_marker(layer, watcher)
    assert len(diff["leaves"]) == 1
    assert diff["joins"] == {}
    await layer.group_send(room, {"type": "room"})
    await layer.group_send(events_group(room), {"type": "events"})
    assert await _until_marker(layer, fresh) == []
    assert await _until_marker(layer, watcher) == [{"type": "events"}]
