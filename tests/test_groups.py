"""groups.send and groups.leave of many groups at once, as a prune makes them.

On RedisChannelLayer they bypass group_send and group_discard (pipelines per
shard); what a socket receives must be what those would have given it. The
same checks run on a layer without that path (InMemoryChannelLayer).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import BaseChannelLayer, InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer
from django.conf import settings

from channels_presence import groups
from channels_presence.groups import events_group
from channels_presence.protocol import DIFF_EVENTS

GROUPS = 30


@pytest.fixture(params=["redis, two shards", "in memory"])
async def layer(request: pytest.FixtureRequest) -> AsyncIterator[BaseChannelLayer]:
    if request.param == "in memory":
        yield InMemoryChannelLayer()
        return
    # Two shards on one server: the groups and channels hash to both.
    layers: dict[str, Any] = settings.CHANNEL_LAYERS
    prefix = layers["default"]["CONFIG"]["prefix"] + "-groups"
    redis = RedisChannelLayer(hosts=[settings.REDIS_URL] * 2, prefix=prefix)
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
        got = [m["type"] for m in received[socket]]
        assert got == ([] if socket in gone else ["room", "events"])
    if isinstance(layer, RedisChannelLayer):
        assert groups._blocking_clients(layer) is not None


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
            if not isinstance(layer, RedisChannelLayer):
                # Group sends cannot leave a member out: the state goes first.
                expected.append(("diff", 0))
        else:
            expected = [("diff", number % GROUPS)]
        assert got == expected
