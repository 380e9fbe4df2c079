"""PresenceConsumerMixin: presence for a websocket consumer, with no code to write.

Put it first among the bases of any websocket consumer, sync or async, plain or
JSON::

    class ChatConsumer(PresenceConsumerMixin, AsyncJsonWebsocketConsumer):
        def get_presence_rooms(self):
            return [self.scope["url_route"]["kwargs"]["room"]]

The rooms are named and checked before ``connect()`` runs: a name Channels
cannot use refuses the socket (a ``bad_room`` error frame, then close code
4400; neither ``connect()`` nor ``disconnect()`` runs). Once ``connect()`` has
accepted the socket, it joins each room that ``can_join`` allows, and is sent
a ``forbidden`` error frame for each it refuses (and closed with code 4403 if
the consumer sets ``close_on_refusal``). A socket asking for more than
CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION rooms joins none: it is sent
``{"type": "presence.error", "error": "too_many_rooms", ...}`` and closed with
code 4429. Every received message touches it (heartbeats stop there); on
disconnect it leaves every room before ``disconnect()`` runs.

The rooms' presence reaches the client as wire protocol 2 (DESIGN.md; the
README shows each frame): a ``presence.state`` once its join is applied, then
``presence.diff`` frames, ``presence.version`` beacons, and ``presence.expired``
when a prune dropped the socket, after which it joins again at its next
message. Diffs that arrive before the socket's first state are held back until
that state is sent. A client's ``{"type": "presence.sync", "room": ...}`` is
answered with the room's state (at most once a second per socket), or with a
``presence.error`` (``not_in_room``) for a room this socket is not in. A join
that failed because the database or the channel layer was down is told to the
client once (an ``unavailable`` error frame) and retried at the next message,
so presence converges once they are back.

A socket whose channel layer cannot be reached at all is closed with code 4503,
"try again later" (:class:`LayerOutageMixin`, which the mixin includes and a
decorated consumer can add to its bases), rather than left to Channels, whose
consumer dies of it with a traceback per socket.

The mixins work at the level of ASGI messages (``dispatch``), which sync and
async consumers share, so one implementation serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from asgiref.sync import iscoroutinefunction
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer

from . import dispatch, groups, protocol, sync, validation
from .conf import conf
from .outages import outage

logger = logging.getLogger("channels_presence")

#: Diffs held back for a room until the socket's first state, at most.
MAX_HELD = 1_000


@dataclass
class _View:
    """What the socket was sent of one room.

    ``version``: the version its client is at, reducing what it was sent as
    DESIGN.md's client does (its last state, then the diffs that followed it
    without a gap); None before its first state.
    """

    version: int | None = None
    held: list[dict[str, Any]] = field(default_factory=list)
    joined_at: float = field(default_factory=time.monotonic)
    # Set once a state of the room was sent to the socket.
    stated: asyncio.Event = field(default_factory=asyncio.Event)


#: The close code of a socket whose channel layer cannot be reached: 4503, as
#: HTTP's 503 (Service Unavailable), the way 4400, 4403 and 4429 follow HTTP.
#: presence.js connects again with backoff. Not the WebSocket registry's 1013
#: ("Try Again Later"): daphne cannot send it (autobahn lets an application
#: close with 1000 or 3000-4999 only; django/daphne#374).
TRY_AGAIN_LATER = 4503

# What the socket's channel-layer receive hands dispatch() once the layer failed.
# Recognised by identity: a message that came through the layer is a new dict,
# so nothing sent to the socket can pass for it.
_LAYER_LOST: dict[str, Any] = {"type": "channels_presence.layer_lost"}


class LayerOutageMixin:
    """Close the socket with code 4503 (try again later) when the channel layer is down.

    Channels receives each socket's messages from the channel layer beside its
    websocket frames; when the layer cannot be reached, that receive raises and
    the consumer dies: a traceback per socket ("Exception inside application")
    and a close with 1011, or an HTTP 500 for a handshake not yet answered.
    With this mixin first among a consumer's bases, the socket is closed with
    :data:`TRY_AGAIN_LATER` instead, accepted first if ``connect()`` had not
    answered the handshake yet (a close before that reaches a browser as a
    refused handshake, code 1006, which says nothing). The outage is logged
    once per process (logger ``channels_presence``, at ERROR) and its end when
    a join reaches the layer again, as every other presence call's outage.

    The consumer then handles only the client's disconnect, which runs
    ``disconnect()`` as any close does (so ``remove_presence`` leaves the
    rooms), unless the layer failed before ``connect()`` ran: then neither
    runs. Frames that arrive meanwhile are dropped.

    :class:`PresenceConsumerMixin` includes it; a decorated consumer adds it::

        class ChatConsumer(LayerOutageMixin, WebsocketConsumer):
            @add_presence("lobby")
            def connect(self):
                self.accept()

    Calls that the consumer's own code makes on the layer (a ``group_send``)
    raise as before, and so do Channels' ``groups`` adds and discards.
    """

    # Its attributes are named "_presence_...", as PresenceConsumerMixin's,
    # which reads the socket state this one keeps.

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the consumer, watching what it sends to learn if it is open."""
        self._presence_send = send
        # Accepted and not closed since.
        self._presence_open = False
        self._presence_accepted = False
        # Accepted or closed: the handshake is over.
        self._presence_answered = False
        self._presence_connected = False
        self._presence_layer_lost = False

        # The consumer keeps this function (Channels' ``base_send``): holding
        # the consumer strongly in turn would make each closed socket's
        # objects a cycle that only the cyclic collector frees, and its full
        # passes (a tenth of a second for a daphne of a thousand sockets)
        # would come more often.
        consumer = weakref.ref(self)

        async def send_and_watch(message: dict[str, Any]) -> None:
            # Accepting and then closing is how connect() refuses with a code.
            kind = message.get("type")
            if kind in ("websocket.accept", "websocket.close"):
                # Alive: it is the consumer that sends.
                watched = cast(LayerOutageMixin, consumer())
                watched._presence_answered = True
                if kind == "websocket.accept":
                    watched._presence_open = watched._presence_accepted = True
                else:
                    watched._presence_open = False
            await send(message)

        await super().__call__(scope, receive, send_and_watch)  # type: ignore[misc]

    # Channels' AsyncConsumer.__call__ sets ``self.channel_receive`` to the
    # layer's receive for this socket and hands it straight to
    # ``await_many_dispatch``, where its failure would end the consumer: this
    # property is the one place to catch it. The name is not documented;
    # Channels 4.3 uses it, as earlier ones did, and tests/test_consumers.py
    # and tests/test_decorators.py run consumers whose layer is down. Were it
    # renamed, the setter would never run, and a consumer would die of an
    # outage as Channels has it do.
    @property
    def channel_receive(self) -> Callable[[], Awaitable[dict[str, Any]]]:
        """The socket's receive from the channel layer, its outage caught."""
        return self._presence_receive_layer

    @channel_receive.setter
    def channel_receive(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._presence_layer_receive = receive

    async def _presence_receive_layer(self) -> dict[str, Any]:
        if self._presence_layer_lost:
            # The socket is closing: nothing more from the layer, until
            # Channels cancels this as the consumer stops.
            await asyncio.get_running_loop().create_future()
        try:
            return await self._presence_layer_receive()
        except groups.UNAVAILABLE as error:
            # Told to dispatch() in turn: what the client sent before is
            # handled as usual.
            outage.failed(
                "receive",
                error,
                "sockets are closed with code 4503 (try again later) until it answers",
            )
            return _LAYER_LOST

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Close the socket once its channel layer failed; else pass the message on."""
        if message is _LAYER_LOST:
            self._presence_layer_lost = True
            await self._presence_close_for_outage()
            return
        kind = message.get("type")
        if self._presence_layer_lost:
            if kind != "websocket.disconnect":
                return
            if not self._presence_connected:
                # Closed before connect() ran: neither it nor disconnect() does.
                raise StopConsumer()
        elif kind == "websocket.connect":
            self._presence_connected = True
        await super().dispatch(message)  # type: ignore[misc]

    async def _presence_close_for_outage(self) -> None:
        close = {"type": "websocket.close", "code": TRY_AGAIN_LATER}
        if not self._presence_answered:
            messages = [{"type": "websocket.accept"}, close]
        elif self._presence_open:
            messages = [close]
        else:
            return
        self._presence_open = False
        self._presence_answered = True
        for message in messages:
            await self._presence_send(message)


class PresenceConsumerMixin(LayerOutageMixin):
    """Join rooms on connect, touch on receive, leave on disconnect, forward events.

    Rooms come from ``presence_rooms`` or ``get_presence_rooms()``; ``can_join``
    may refuse one. Both hooks may be plain or ``async def`` methods; plain ones
    run in a thread, so they may use the ORM.
    """

    # The mixin's own attributes and methods are named "_presence_..." or
    # "_on_...": a consumer's namespace is shared with Channels' (which reads
    # ``self._sync``, say) and with the handlers it looks up by message type.

    #: The rooms every socket of this consumer joins.
    presence_rooms: Iterable[str] = ()

    #: Whether a socket that ``can_join`` refuses a room is closed (code
    #: 4403) after its ``forbidden`` error frame; by default it stays open,
    #: in the rooms it may join.
    close_on_refusal: bool = False

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
        """What the client is sent for a presence frame; None sends nothing.

        The default sends the frame as it is: frames never hold channel names.
        """
        return event

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the consumer; if it dies, leave its rooms."""
        self._presence_left = False
        # Refused at connect for a bad room name: its consumer never ran.
        self._presence_refused = False
        # Rooms the client was told are unavailable, until they are joined.
        self._presence_told: set[str] = set()
        # Rooms to join at the next message: dropped by a prune, or not joined
        # because the database or the channel layer was down.
        self._presence_pending: set[str] = set()
        self._presence_retry_at = 0.0
        # The rooms this socket is in (joined, applied or not), and what it
        # was sent of each.
        self._presence_views: dict[str, _View] = {}
        self._presence_synced_at = float("-inf")
        self._presence_syncing: set[str] = set()
        self._presence_tasks: set[asyncio.Task[None]] = set()
        try:
            await super().__call__(scope, receive, send)
        except Exception:
            # The consumer died (a handler raised): Channels sends it no
            # disconnect, so its rooms are left here, or its rows would stay
            # until a prune.
            if self._presence_accepted and not self._presence_left:
                await dispatch.aleave_all(self)
            raise
        finally:
            for task in list(self._presence_tasks):
                task.cancel()

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Do the presence work of each ASGI message around the consumer's own.

        Presence frames are handled here and never reach the consumer; a
        heartbeat or a sync request stops here; a disconnect leaves every
        room first.
        """
        kind = message.get("type")
        if self._presence_layer_lost and kind != "websocket.disconnect":
            # Closing for a channel-layer outage: LayerOutageMixin's to handle.
            await super().dispatch(message)
            return
        handle = _FRAMES.get(kind) if isinstance(kind, str) else None
        if handle is not None:
            await handle(self, message)
            return
        if kind == "websocket.receive":
            await self._join_pending()
            await dispatch.atouch(self)
            text = message.get("text")
            if dispatch.is_heartbeat(text):
                return
            room = sync.requested_room(text)
            if room is not None:
                await self._presence_sync(room)
                return
        elif kind == "websocket.connect":
            # The rooms are named and checked before the consumer's connect()
            # can accept: a name Channels cannot use is refused first.
            try:
                rooms = _checked(await _call(self.get_presence_rooms))
            except BadRoom as error:
                await self._presence_refuse(error)
                return
            await super().dispatch(message)
            if self._presence_open:
                await self._join(rooms)
            return
        elif kind == "websocket.disconnect":
            self._presence_open = False
            self._presence_left = True
            if self._presence_refused:
                # connect() never ran: neither does disconnect().
                raise StopConsumer()
            await dispatch.aleave_all(self)
        await super().dispatch(message)

    async def _presence_refuse(self, error: BadRoom) -> None:
        """Tell the client its room name is unusable, and close (4400)."""
        logger.warning("presence: a socket was refused: %s", error.message)
        self._presence_refused = True
        self._presence_answered = True
        # Accepted only to be told: a frame cannot go before the handshake.
        await self._presence_send({"type": "websocket.accept"})
        for message in dispatch.refusal(error.frame(), BAD_ROOM):
            await self._presence_send(message)

    async def _join(self, names: list[str]) -> None:
        allowed, refused = [], []
        for room in names:
            if await _call(self.can_join, room):
                allowed.append(room)
            else:
                self._presence_pending.discard(room)
                refused.append(room)
        for room in refused:
            await self._send_frame(
                protocol.error(
                    "forbidden", f"This socket may not join room {room!r}.", room
                )
            )
        if refused and self.close_on_refusal and self._presence_open:
            self._presence_open = False
            self._presence_pending.clear()
            await self._presence_send({"type": "websocket.close", "code": FORBIDDEN})
            return
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
        # Diffs that arrive from now on wait for this join's state.
        self._presence_views[room] = _View()
        if await dispatch.ajoin(self, room, user, subscribe=True):
            self._presence_pending.discard(room)
            self._presence_told.discard(room)
            return
        self._presence_views.pop(room, None)
        self._presence_pending.add(room)
        self._presence_retry_at = time.monotonic() + conf.TOUCH_INTERVAL
        if room not in self._presence_told:
            # Once per room until it is joined: the retries are silent.
            self._presence_told.add(room)
            await self._send_frame(
                protocol.error(
                    "unavailable",
                    "Presence is unavailable for now; this socket joins the "
                    "room at its next message once it is back.",
                    room,
                )
            )

    async def _join_pending(self) -> None:
        if self._presence_pending and time.monotonic() >= self._presence_retry_at:
            await self._join(sorted(self._presence_pending))

    # Presence frames, from the workers or from a sync.

    async def _on_state(self, event: dict[str, Any], *, asked: bool = False) -> None:
        """A state: the join's own from the worker, or (``asked``) a sync's.

        The client drops a state older than its view. A join's state that is
        not newer than what the socket was sent since (a sync answered while
        it was on its way, and the diffs after it) is not sent at all: in a
        storm it is the room's whole member list, again. A sync's answer at
        the client's own version is sent, since the client asked for it.
        """
        view = self._presence_views.get(event["room"])
        if view is None:
            return
        version = event["version"]
        if view.version is not None and (
            version < view.version or (version == view.version and not asked)
        ):
            view.stated.set()
            return
        view.version = version
        view.stated.set()
        await self._forward(event)
        held, view.held = view.held, []
        for diff in held:
            if diff["version"] > version:
                await self._forward(diff)

    async def _on_diff(self, event: dict[str, Any]) -> None:
        view = self._presence_views.get(event["room"])
        if view is None:
            return
        if view.version is None:
            view.held.append(event)
            if len(view.held) > MAX_HELD:
                # The client finds the gap and syncs.
                del view.held[0]
        elif event["version"] > view.version:
            if event["from"] <= view.version:
                view.version = event["version"]
            await self._forward(event)

    async def _on_beacon(self, event: dict[str, Any]) -> None:
        view = self._presence_views.get(event["room"])
        if view is not None and view.version is not None:
            await self._forward(event)

    async def _on_expired(self, event: dict[str, Any]) -> None:
        room = event["room"]
        if self._presence_views.pop(room, None) is None or not self._presence_open:
            return
        dispatch.forget_room(self, room)
        # Joined again at the client's next message, which shows that it is
        # alive: a prune took it for gone.
        self._presence_pending.add(room)
        self._presence_retry_at = 0.0
        await self._forward(event)

    # Syncs from the client.

    async def _presence_sync(self, room: str) -> None:
        if room not in self._presence_views:
            await self._send_frame(sync.not_in_room(room))
            return
        if room in self._presence_syncing:
            return
        now = time.monotonic()
        view = self._presence_views[room]
        if view.version is None and now - view.joined_at < sync.JOIN_STATE_WAIT:
            # The join's own state is on its way, and answers this.
            wait = view.joined_at + sync.JOIN_STATE_WAIT - now
            self._presence_later(room, wait, unless_answered=True)
            return
        wait = self._presence_synced_at + sync.SYNC_INTERVAL - now
        self._presence_synced_at = now + max(wait, 0)
        if wait <= 0:
            await self._presence_answer(room)
            return
        # Too soon after the last: the next allowed state, later.
        self._presence_later(room, wait)

    def _presence_later(
        self, room: str, wait: float, *, unless_answered: bool = False
    ) -> None:
        """Answer the sync of ``room`` in ``wait`` seconds.

        ``unless_answered``: only if the socket has still had no state of
        the room by then.
        """
        self._presence_syncing.add(room)
        task = asyncio.create_task(
            self._presence_answer_later(room, wait, unless_answered)
        )
        self._presence_tasks.add(task)
        task.add_done_callback(self._presence_tasks.discard)

    async def _presence_answer_later(
        self, room: str, wait: float, unless_answered: bool
    ) -> None:
        view = self._presence_views.get(room)
        if unless_answered and view is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(view.stated.wait(), wait)
        else:
            await asyncio.sleep(wait)
        self._presence_syncing.discard(room)
        if unless_answered and view is not None and view.stated.is_set():
            return
        self._presence_synced_at = max(self._presence_synced_at, time.monotonic())
        await self._presence_answer(room)

    async def _presence_answer(self, room: str) -> None:
        if room not in self._presence_views:
            await self._send_frame(sync.not_in_room(room))
            return
        try:
            state = await sync.states.get(room, self._presence_views[room].version)
        except dispatch.UNAVAILABLE as error:
            outage.failed("sync", error)
            return
        await self._on_state(state, asked=True)

    async def _forward(self, event: dict[str, Any]) -> None:
        payload = self.presence_payload(event)
        if payload is not None:
            await self._send_frame(payload, memo=payload is event)

    async def _send_frame(self, frame: dict[str, Any], memo: bool = False) -> None:
        if self._presence_open:
            text = _encoded(frame) if memo else json.dumps(frame)
            await self._presence_send({"type": "websocket.send", "text": text})


_FRAMES: dict[str, Callable[[Any, dict[str, Any]], Awaitable[None]]] = {
    protocol.STATE: PresenceConsumerMixin._on_state,
    protocol.DIFF: PresenceConsumerMixin._on_diff,
    protocol.VERSION: PresenceConsumerMixin._on_beacon,
    protocol.EXPIRED: PresenceConsumerMixin._on_expired,
}

# A room's diff reaches every socket of a process as one message: encoded once,
# not once per socket. Keyed by what makes a frame's content unique.
_TEXTS: OrderedDict[tuple[Any, ...], str] = OrderedDict()
_TEXTS_SIZE = 256


def _encoded(frame: dict[str, Any]) -> str:
    key = (frame["type"], frame["room"], frame.get("from"), frame.get("version"))
    text = _TEXTS.get(key)
    if text is None:
        text = _TEXTS[key] = json.dumps(frame)
        if len(_TEXTS) > _TEXTS_SIZE:
            _TEXTS.popitem(last=False)
    return text


#: The close code of a socket refused for a room name Channels cannot use,
#: after its ``bad_room`` error frame.
BAD_ROOM = 4400
#: The close code of a socket that ``can_join`` refused, after its
#: ``forbidden`` error frame, when the consumer sets ``close_on_refusal``.
FORBIDDEN = 4403


class BadRoom(Exception):
    """A room named by ``get_presence_rooms`` that Channels cannot use."""

    def __init__(self, room: object, message: str) -> None:
        self.room = room
        self.message = message
        super().__init__(message)

    def frame(self) -> dict[str, Any]:
        """The ``presence.error`` frame that tells the client."""
        room = self.room if isinstance(self.room, str) else None
        return protocol.error("bad_room", self.message, room)


def _checked(rooms: object) -> list[str]:
    """The rooms as a list of names Channels can use, else :class:`BadRoom`."""
    if isinstance(rooms, str):
        rooms = [rooms]
    if not isinstance(rooms, Iterable):
        raise BadRoom(
            rooms,
            f"get_presence_rooms() must return room names, not {type(rooms).__name__}",
        )
    names = []
    for room in rooms:
        try:
            names.append(validation.room_name(room))
        except (TypeError, ValueError) as error:
            raise BadRoom(room, str(error)) from None
    return names


async def _call(hook: Callable[..., Any], *args: Any) -> Any:
    if iscoroutinefunction(hook):
        return await hook(*args)
    return await database_sync_to_async(hook)(*args)
