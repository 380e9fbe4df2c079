"""The ASGI application that bench/e2e.py serves with daphne: one consumer.

``/ws/<room>/``: the project's mixin on an async JSON consumer, as
``example/`` has it, except that each client is told its own channel name at
connect and each presence event names the socket that joined or left, so that
the clients can tell which join an event is for.
"""

import os
from typing import Any

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
from channels_presence.consumers import PresenceConsumerMixin  # noqa: E402


class BenchConsumer(PresenceConsumerMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """Joins the room of its URL; says who joined or left in each event."""

    def get_presence_rooms(self) -> list[str]:
        """The room named by the URL."""
        return [self.scope["url_route"]["kwargs"]["room"]]

    async def connect(self) -> None:
        """Accept, and tell the client its channel name."""
        await self.accept()
        await self.send_json({"type": "hello", "channel": self.channel_name})

    def presence_payload(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Which socket joined or left."""
        if event.get("added") is None and event.get("removed") is None:
            return None
        return {
            "type": "presence",
            "added": (event["added"] or {}).get("channel_name"),
            "removed": (event["removed"] or {}).get("channel_name"),
        }


application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": URLRouter([path("ws/<str:room>/", BenchConsumer.as_asgi())]),
    }
)
