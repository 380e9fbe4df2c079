"""1.0.0's side of bench/e2e.py: a consumer as 1.0.0's documentation has one.

A sync consumer: ``connect`` adds the socket to the room of its URL
(``Room.objects.add``), ``receive`` is ``touch_presence``-decorated,
``disconnect`` is ``remove_presence``-decorated, and a ``presence_changed``
receiver sends each change to the room's group (the documentation's
``broadcast_to_room``, on channels 3). Like ours in bench/asgi.py, it tells
each client its channel name, and each event names who joined or left; with
``BASELINE_BROADCAST=members`` (bench/storm.py), each event carries the room's
whole member list instead, the documentation's other form
(``{'presence': [p.channel_name for p in room.presence_set.all()]}``), which
is what lets a client that joins late know who is there.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "baseline_settings")
django.setup()

from asgiref.sync import async_to_sync  # noqa: E402
from channels.generic.websocket import WebsocketConsumer  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.dispatch import receiver  # noqa: E402
from django.urls import path  # noqa: E402

from channels_presence.decorators import remove_presence, touch_presence  # noqa: E402
from channels_presence.models import Room  # noqa: E402
from channels_presence.signals import presence_changed  # noqa: E402

MEMBERS = os.environ.get("BASELINE_BROADCAST") == "members"


@receiver(presence_changed)
def broadcast_to_room(sender, room, added, removed, bulk_change, **kwargs):
    if MEMBERS:
        event = {
            "type": "presence.event",
            "presence": [p.channel_name for p in room.presence_set.all()],
        }
    else:
        event = {
            "type": "presence.event",
            "added": added.channel_name if added else None,
            "removed": removed.channel_name if removed else None,
        }
    async_to_sync(get_channel_layer().group_send)(room.channel_name, event)


class BaselineConsumer(WebsocketConsumer):
    def connect(self):
        self.accept()
        self.send_json({"type": "hello", "channel": self.channel_name})
        Room.objects.add(self.scope["url_route"]["kwargs"]["room"], self.channel_name)

    @touch_presence
    def receive(self, text_data=None, bytes_data=None):
        pass

    @remove_presence
    def disconnect(self, code):
        pass

    def presence_event(self, event):
        self.send_json(
            {"type": "presence", **{k: v for k, v in event.items() if k != "type"}}
        )

    def send_json(self, content):
        import json

        self.send(text_data=json.dumps(content))


application = ProtocolTypeRouter(
    {"websocket": URLRouter([path("ws/<str:room>/", BaselineConsumer.as_asgi())])}
)
