"""touch_presence and remove_presence on the handlers of real consumers."""

from __future__ import annotations

import json

import pytest
from django.test import override_settings

from tests.consumers import (
    ROOMS,
    AsyncDecoratedConsumer,
    AsyncJsonDecoratedConsumer,
    DecoratedConsumer,
    JsonDecoratedConsumer,
    connected,
)
from tests.helpers import (
    HEARTBEATS,
    LONG_HEARTBEAT,
    group_members,
    last_seen,
    set_last_seen_back,
    sockets,
    touched_since,
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
