"""Decorators for consumer methods, sync or async: 1.0.0's two, and a join.

``add_presence(room)`` goes on ``connect(self)``; ``touch_presence`` goes on
``receive(self, text_data=None, bytes_data=None)`` or on
``receive_json(self, content, **kwargs)``; ``remove_presence`` goes on
``disconnect(self, code)``. Each works on a plain method and on an ``async def``
one, and none lets a database, broker or channel-layer outage reach the handler.

A channel layer that cannot be reached at all kills the consumer in Channels'
own receive, which no method decorator sees: a decorated consumer that puts
``channels_presence.consumers.LayerOutageMixin`` first among its bases closes
the socket with code 4503 instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from asgiref.sync import iscoroutinefunction

from . import dispatch

logger = logging.getLogger("channels_presence")

Handler = TypeVar("Handler", bound=Callable[..., Any])

#: A room: its name, or a callable that takes the consumer and returns it.
RoomSpec = str | Callable[[Any], str]


def add_presence(room: RoomSpec) -> Callable[[Handler], Handler]:
    """Join ``room`` once the decorated ``connect`` has accepted the socket.

    ``room`` is a name, or a callable that takes the consumer and returns one,
    e.g. ``lambda consumer: consumer.scope["url_route"]["kwargs"]["room"]``.
    The socket joins as ``scope["user"]``. A connect that does not accept (it
    closes, or raises ``DenyConnection``) joins nothing. A socket already in
    CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION rooms (stacked decorators) is
    sent an error frame and closed with code 4429 instead.

    The consumer receives each presence event only if it has its handler:
    ``presence_state(self, event)`` (the room's state once the join is
    applied), ``presence_diff(self, event)`` (each change, and then also
    ``presence_version`` beacons, ignored unless it has that handler too) and
    ``presence_expired(self, event)``; without them it never receives a
    message it cannot handle. The events are the frames of wire protocol 2.
    Without ``presence_expired``, a socket that was dropped from the room (a
    prune took it for gone) joins it again at its next message through
    ``touch_presence``.
    """
    if not (isinstance(room, str) or callable(room)):
        raise TypeError(
            "add_presence(room) takes a room name, or a callable that takes the "
            f"consumer and returns one, not {room!r}: write @add_presence('lobby')"
        )
    if iscoroutinefunction(room):
        raise TypeError("add_presence(room): the room callable must not be async")

    def decorate(func: Handler) -> Handler:
        if iscoroutinefunction(func):

            @functools.wraps(func)
            async def connect_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                with _watching_accept(self, is_async=True) as accepted:
                    result = await func(self, *args, **kwargs)
                if accepted:
                    try:
                        await dispatch.ajoin(
                            self,
                            _room_name(room, self),
                            self.scope.get("user"),
                            subscribe=_subscribes(self, is_async=True),
                        )
                    except dispatch.TooManyRooms as error:
                        for message in error.messages():
                            await self.base_send(message)
                return result

            return cast(Handler, connect_async)

        @functools.wraps(func)
        def connect_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
            with _watching_accept(self, is_async=False) as accepted:
                result = func(self, *args, **kwargs)
            if accepted:
                try:
                    dispatch.join(
                        self,
                        _room_name(room, self),
                        self.scope.get("user"),
                        subscribe=_subscribes(self, is_async=False),
                    )
                except dispatch.TooManyRooms as error:
                    for message in error.messages():
                        self.base_send(message)
            return result

        return cast(Handler, connect_sync)

    return decorate


def touch_presence(func: Handler) -> Handler:
    """Touch the socket's presences on each received message.

    Touches closer together than CHANNELS_PRESENCE_TOUCH_INTERVAL are coalesced.
    A heartbeat (a text frame, or JSON content, that is the JSON string
    ``"heartbeat"``) is only a touch: the handler is not called. Binary frames
    reach the handler. A socket that was dropped from a room it joined through
    ``add_presence``, and whose consumer has no ``presence_expired``, joins it
    again first.
    """
    takes_content = _takes_json_content(func)

    if iscoroutinefunction(func):

        @functools.wraps(func)
        async def touch_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            if REJOIN in self.__dict__:
                await _rejoin_async(self)
            await dispatch.atouch(self)
            if _is_heartbeat(takes_content, args, kwargs):
                return None
            return await func(self, *args, **kwargs)

        return cast(Handler, touch_async)

    @functools.wraps(func)
    def touch_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        if REJOIN in self.__dict__:
            _rejoin_sync(self)
        dispatch.touch(self)
        if _is_heartbeat(takes_content, args, kwargs):
            return None
        return func(self, *args, **kwargs)

    return cast(Handler, touch_sync)


def remove_presence(func: Handler) -> Handler:
    """Take the socket out of every room, then call the disconnect handler."""
    if iscoroutinefunction(func):

        @functools.wraps(func)
        async def remove_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            await dispatch.aleave_all(self)
            return await func(self, *args, **kwargs)

        return cast(Handler, remove_async)

    @functools.wraps(func)
    def remove_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        dispatch.leave_all(self)
        return func(self, *args, **kwargs)

    return cast(Handler, remove_sync)


def _takes_json_content(func: Callable[..., Any]) -> bool:
    """Whether ``func`` receives decoded JSON (``receive_json``) or raw frames."""
    parameters = inspect.signature(func).parameters
    return "text_data" not in parameters and "bytes_data" not in parameters


def _is_heartbeat(
    takes_content: bool, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    if "text_data" in kwargs or "bytes_data" in kwargs:
        return dispatch.is_heartbeat(kwargs.get("text_data"))
    if takes_content:
        content = args[0] if args else kwargs.get("content")
        return bool(content == dispatch.HEARTBEAT_CONTENT)
    return bool(args) and dispatch.is_heartbeat(args[0])


class _Accepted:
    """Whether the consumer accepted its socket, and did not close it, so far."""

    def __init__(self) -> None:
        self.value = False

    def __bool__(self) -> bool:
        return self.value


@contextmanager
def _watching_accept(consumer: Any, *, is_async: bool) -> Iterator[_Accepted]:
    # Channels sends the handshake's answer through base_send, for sync and
    # async consumers alike: watch it while connect() runs.
    accepted = _Accepted()
    base_send = consumer.base_send

    def watch(message: dict[str, Any]) -> None:
        if message.get("type") == "websocket.accept":
            accepted.value = True
        elif message.get("type") == "websocket.close":
            accepted.value = False

    if is_async:

        async def send_async(message: dict[str, Any]) -> None:
            watch(message)
            await base_send(message)

        consumer.base_send = send_async
    else:

        def send_sync(message: dict[str, Any]) -> None:
            watch(message)
            base_send(message)

        consumer.base_send = send_sync
    try:
        yield accepted
    finally:
        consumer.base_send = base_send


def _room_name(room: RoomSpec, consumer: Any) -> str:
    name = room(consumer) if callable(room) else room
    if not isinstance(name, str):
        raise TypeError(
            f"add_presence(room): the room callable returned {name!r}; it must "
            "return the room's name, a string"
        )
    return name


def _subscribes(consumer: Any, *, is_async: bool) -> list[str]:
    """The presence events ``consumer`` has handlers for, by name.

    One without ``presence_expired`` is given one of ours, which has it join
    again at its next message (see :func:`touch_presence`).
    """
    if not callable(getattr(consumer, "presence_expired", None)):
        consumer.presence_expired = _rejoin_later(consumer, is_async=is_async)
    events = [
        name
        for name in ("state", "diff", "expired")
        if callable(getattr(consumer, f"presence_{name}", None))
    ]
    if "diff" in events and not callable(getattr(consumer, "presence_version", None)):
        # Beacons go to the same group as diffs: one without a handler of its
        # own is ignored rather than closing the socket.
        if iscoroutinefunction(consumer.presence_diff):
            consumer.presence_version = _ignore_async
        else:
            consumer.presence_version = _ignore
    return events


#: Where a decorated consumer keeps the rooms it joins again at its next message.
REJOIN = "_presence_rejoin"


def _rejoin_later(consumer: Any, *, is_async: bool) -> Callable[..., Any]:
    """A ``presence_expired`` handler: the room is joined again at the next
    message through ``touch_presence``, as the mixin does at the client's."""

    def later(event: dict[str, Any]) -> None:
        room = event.get("room")
        if isinstance(room, str) and room in consumer.__dict__.get(
            "_presence_joined", ()
        ):
            dispatch.forget_room(consumer, room)
            consumer.__dict__.setdefault(REJOIN, set()).add(room)

    if not is_async:
        return later

    async def later_async(event: dict[str, Any]) -> None:
        later(event)

    return later_async


async def _rejoin_async(consumer: Any) -> None:
    for room, user, subscribe in _to_rejoin(consumer, is_async=True):
        try:
            joined: bool | None = await dispatch.ajoin(
                consumer, room, user, subscribe=subscribe
            )
        except dispatch.TooManyRooms:
            joined = None
        _rejoined(consumer, room, joined)


def _rejoin_sync(consumer: Any) -> None:
    for room, user, subscribe in _to_rejoin(consumer, is_async=False):
        try:
            joined: bool | None = dispatch.join(
                consumer, room, user, subscribe=subscribe
            )
        except dispatch.TooManyRooms:
            joined = None
        _rejoined(consumer, room, joined)


def _to_rejoin(consumer: Any, *, is_async: bool) -> list[tuple[str, Any, list[str]]]:
    """The rooms to join again, each with the user and events to join with."""
    user = consumer.scope.get("user")
    subscribe = _subscribes(consumer, is_async=is_async)
    return [
        (room, user, subscribe) for room in sorted(consumer.__dict__.pop(REJOIN, ()))
    ]


def _rejoined(consumer: Any, room: str, joined: bool | None) -> None:
    """After a join again: None, refused (the room limit); False, an outage
    (logged), so it is tried again at the next message."""
    if joined is None:
        logger.warning("presence: %s could not join %r again", consumer, room)
    elif not joined:
        consumer.__dict__.setdefault(REJOIN, set()).add(room)


def _ignore(event: dict[str, Any]) -> None:
    """A presence.version beacon that the consumer has no handler for."""


async def _ignore_async(event: dict[str, Any]) -> None:
    """A presence.version beacon that the consumer has no handler for."""
