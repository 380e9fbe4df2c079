"""PresenceConsumerMixin: presence for a websocket consumer, with no code to write.

Put it first among the bases of any websocket consumer, sync or async, plain or
JSON::

    class ChatConsumer(PresenceConsumerMixin, AsyncJsonWebsocketConsumer):
        def get_presence_rooms(self):
            return [self.scope["url_route"]["kwargs"]["room"]]

Once ``connect()`` has accepted the socket, it joins each room that
``can_join`` allows (a socket asking for more than
CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION rooms joins none: it is sent
``{"type": "presence.error", "error": "too_many_rooms", ...}`` and closed with
code 4429); every received message touches it (heartbeats stop there);
on disconnect it leaves every room before ``disconnect()`` runs. The room's
presence events reach the client as JSON::

    {"type": "presence", "room": "lobby",
     "members": [{"id": 1, "username": "alice"}], "anonymous": 2}

and a socket that a prune dropped, as stale, is told so
(``{"type": "presence.expired", "room": "lobby"}``) and joins again at its next
message. A join that failed because the database or the channel layer was down
is retried the same way, so presence converges once they are back.

The mixin works at the level of ASGI messages (``dispatch``), which sync and
async consumers share, so one implementation serves both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from asgiref.sync import iscoroutinefunction
from channels.db import database_sync_to_async

from . import dispatch, validation
from .broadcast import EVENT_TYPE, EXPIRED_TYPE
from .conf import conf


class PresenceConsumerMixin:
    """Join rooms on connect, touch on receive, leave on disconnect, forward events.

    Rooms come from ``presence_rooms`` or ``get_presence_rooms()``; ``can_join``
    may refuse one. Both hooks may be plain or ``async def`` methods; plain ones
    run in a thread, so they may use the ORM.
    """

    #: The rooms every socket of this consumer joins.
    presence_rooms: Iterable[str] = ()

    channel_name: str
    channel_layer: Any
    scope: dict[str, Any]

    def get_presence_rooms(self) -> Iterable[str] | Awaitable[Iterable[str]]:
        """The rooms to join, e.g. from ``self.scope["url_route"]["kwargs"]``."""
        return self.presence_rooms

    def can_join(self, room: str) -> bool | Awaitable[bool]:
        """Whether this socket may join ``room``; refused rooms are not joined."""
        return True

    def presence_payload(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """What the client is sent for a presence event; None sends nothing.

        The default lists the members, and never includes channel names.
        """
        if event["type"] == EXPIRED_TYPE:
            return {"type": "presence.expired", "room": event["room"]}
        return {
            "type": "presence",
            "room": event["room"],
            "members": event["members"],
            "anonymous": event["anonymous"],
        }

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the consumer, watching what it sends to learn if it is open."""
        self._presence_open = False
        self._presence_accepted = False
        self._presence_left = False
        self._presence_send = send
        # Rooms to join at the next message: dropped by a prune, or not joined
        # because the database or the channel layer was down.
        self._presence_pending: set[str] = set()
        self._presence_retry_at = 0.0

        async def send_and_watch(message: dict[str, Any]) -> None:
            # Accepting and then closing is how connect() refuses with a code.
            if message.get("type") == "websocket.accept":
                self._presence_open = self._presence_accepted = True
            elif message.get("type") == "websocket.close":
                self._presence_open = False
            await send(message)

        try:
            await super().__call__(scope, receive, send_and_watch)  # type: ignore[misc]
        except Exception:
            # The consumer died (its channel layer went away, say): Channels
            # sends it no disconnect, so its rooms are left here, or its rows
            # would stay until a prune.
            if self._presence_accepted and not self._presence_left:
                await dispatch.aleave_all(self)
            raise

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Do the presence work of each ASGI message around the consumer's own.

        Presence events are handled here and never reach the consumer; a
        heartbeat stops here; a disconnect leaves every room first.
        """
        kind = message.get("type")
        if kind == EVENT_TYPE:
            await self._forward(message)
            return
        if kind == EXPIRED_TYPE:
            await self._expired(message)
            return
        if kind == "websocket.receive":
            await self._join_pending()
            await dispatch.atouch(self)
            if dispatch.is_heartbeat(message.get("text")):
                return
        elif kind == "websocket.disconnect":
            self._presence_open = False
            self._presence_left = True
            await dispatch.aleave_all(self)
        await super().dispatch(message)  # type: ignore[misc]
        if kind == "websocket.connect" and self._presence_open:
            rooms = await _call(self.get_presence_rooms)
            await self._join(rooms)

    async def _join(self, rooms: str | Iterable[str]) -> None:
        # Every name is checked before the first join: a bad one joins nothing.
        names = [
            validation.room_name(room)
            for room in ([rooms] if isinstance(rooms, str) else rooms)
        ]
        allowed = []
        for room in names:
            if await _call(self.can_join, room):
                allowed.append(room)
            else:
                self._presence_pending.discard(room)
        try:
            # Too many rooms joins none of them.
            dispatch.check_room_limit(self, allowed)
            for room in allowed:
                await self._join_one(room)
        except dispatch.TooManyRooms as error:
            self._presence_pending.clear()
            if self._presence_open:
                self._presence_open = False
                for message in error.messages():
                    await self._presence_send(message)

    async def _join_one(self, room: str) -> None:
        user = self.scope.get("user")
        if await dispatch.ajoin(self, room, user, subscribe=True):
            self._presence_pending.discard(room)
        else:
            self._presence_pending.add(room)
            self._presence_retry_at = time.monotonic() + conf.TOUCH_INTERVAL

    async def _join_pending(self) -> None:
        if self._presence_pending and time.monotonic() >= self._presence_retry_at:
            await self._join(sorted(self._presence_pending))

    async def _expired(self, event: dict[str, Any]) -> None:
        if self.channel_name not in event["channel_names"] or not self._presence_open:
            return
        # Joining again at once could race the prune's own group discard;
        # the client's next message comes after it.
        self._presence_pending.add(event["room"])
        self._presence_retry_at = 0.0
        await self._forward(event)

    async def _forward(self, event: dict[str, Any]) -> None:
        payload = self.presence_payload(event)
        if payload is not None and self._presence_open:
            await self._presence_send(
                {"type": "websocket.send", "text": json.dumps(payload)}
            )


async def _call(hook: Callable[..., Any], *args: Any) -> Any:
    if iscoroutinefunction(hook):
        return await hook(*args)
    return await database_sync_to_async(hook)(*args)
