"""The ASGI application that bench/e2e.py and bench/scale.py serve with daphne.

``/ws/<room>/`` (e2e, storm): the project's mixin on an async JSON consumer,
as ``example/`` has it, except that each client is told at connect its own
channel name and the ref its presence will have, so that the clients can tell
which join a ``presence.diff`` is for. The frames are the mixin's own, untouched.

``/ws/scale/<room>+<room>/`` (scale): the mixin as it is, in several rooms;
each client is told its channel name at connect.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
http = get_asgi_application()

# After Django is set up: these import models.
from channels.generic.websocket import AsyncJsonWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

# The deployment's Celery app, configured from bench.settings: the one the
# outbox publishes with, as example/__init__.py has it for the example site.
import tasks  # noqa: E402, F401
from channels_presence import dispatch, protocol  # noqa: E402
from channels_presence.consumers import PresenceConsumerMixin  # noqa: E402


class BenchConsumer(PresenceConsumerMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """Joins the room of its URL; tells its client its channel name and ref."""

    def get_presence_rooms(self) -> list[str]:
        """The room named by the URL."""
        return [self.scope["url_route"]["kwargs"]["room"]]

    async def connect(self) -> None:
        """Accept, and tell the client its channel name and its presence's ref."""
        await self.accept()
        room = self.scope["url_route"]["kwargs"]["room"]
        key = dispatch.member_key(self, room, None)
        ref = protocol.presence_ref(room, self.channel_name, key)
        await self.send_json(
            {"type": "hello", "channel": self.channel_name, "ref": ref}
        )


class ScaleConsumer(PresenceConsumerMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """Joins the rooms of its URL, ``+`` between them; sends presence as the mixin does.

    bench/scale.py's clients only look at which room a presence frame is for,
    whatever the frame says of it.
    """

    def get_presence_rooms(self) -> list[str]:
        """The rooms named by the URL, ``/ws/scale/<room>+<room>/``."""
        rooms: str = self.scope["url_route"]["kwargs"]["rooms"]
        return rooms.split("+")

    async def connect(self) -> None:
        """Accept, and tell the client its channel name."""
        await self.accept()
        await self.send_json({"type": "hello", "channel": self.channel_name})


application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": URLRouter(
            [
                path("ws/scale/<str:rooms>/", ScaleConsumer.as_asgi()),
                path("ws/<str:room>/", BenchConsumer.as_asgi()),
            ]
        ),
    }
)
