# mypy: disallow-subclassing-any=False
"""channels_presence.channels.ws_disconnect, 1.0.0's convenience disconnect handler."""

from __future__ import annotations

import pytest

from channels_presence.channels import ws_disconnect
from channels_presence.models import Presence
from tests.consumers import (
    ROOMS,
    AsyncJsonLegacyConsumer,
    AsyncLegacyConsumer,
    JsonLegacyConsumer,
    LegacyConsumer,
    connected,
)
from tests.helpers import group_members, sockets

pytestmark = pytest.mark.django_db(transaction=True)


class WsDisconnectConsumer(LegacyConsumer):
    disconnect = ws_disconnect


class JsonWsDisconnectConsumer(JsonLegacyConsumer):
    disconnect = ws_disconnect


class AsyncWsDisconnectConsumer(AsyncLegacyConsumer):
    disconnect = ws_disconnect


class AsyncJsonWsDisconnectConsumer(AsyncJsonLegacyConsumer):
    disconnect = ws_disconnect


@pytest.mark.parametrize(
    "consumer",
    [
        WsDisconnectConsumer,
        JsonWsDisconnectConsumer,
        AsyncWsDisconnectConsumer,
        AsyncJsonWsDisconnectConsumer,
    ],
)
async def test_ws_disconnect_as_disconnect_leaves_every_room(consumer):
    async with connected(consumer.as_asgi()) as staying:
        (stayer,) = await sockets()
        async with connected(consumer.as_asgi()) as leaving:
            (leaver,) = await sockets() - {stayer}
            for room in ROOMS:
                assert group_members(room) == {stayer, leaver}

            await leaving.disconnect()

        assert await sockets() == {stayer}
        for room in ROOMS:
            assert group_members(room) == {stayer}
        assert await Presence.objects.filter(channel_name=stayer).acount() == len(ROOMS)
        # The socket that stayed still works.
        await staying.send_to(text_data='"ping"')
        await staying.receive_type("echo")
