"""What a socket handler calls: hand presence work to where it runs.

Decorators and the consumer mixin come here rather than to the operations, so a
socket handler never fails because the database, the broker or the channel
layer is down: the failure is logged once per outage and the handler goes on.

In Celery mode (``CHANNELS_PRESENCE_USE_CELERY``, the default) a join or a
leave changes the socket's group membership at once, since that is what makes
messages flow, and appends the database work, stamped with the time it
happened, to the process's outbox; a touch only appends. With Celery mode off,
every operation runs inline (awaited from async code).

Touches are coalesced per socket: a socket touched less than TOUCH_INTERVAL ago
is not touched again, and deciding that costs no I/O.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.db import Error as DatabaseError
from redis.exceptions import RedisError

from . import broadcast, groups, leases, operations, outbox, protocol, validation
from .conf import conf
from .outages import CHANNEL_LAYER, DATABASE, outage

logger = logging.getLogger("channels_presence")

#: A client says it is alive, and nothing else, with the JSON string "heartbeat".
HEARTBEAT_CONTENT = "heartbeat"
#: The heartbeat's usual text frame.
HEARTBEAT_FRAME = json.dumps(HEARTBEAT_CONTENT)
# Longer frames are not decoded to look for a heartbeat.
HEARTBEAT_MAX_LENGTH = 64

# What a down database or channel layer raises; anything else is a bug or bad
# input, and is raised to the caller.
UNAVAILABLE = (DatabaseError, RedisError, OSError, TimeoutError)


#: The close code of a socket that asked for more rooms than it may be in
#: (CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION), after its error frame.
TOO_MANY_ROOMS = 4429


class TooManyRooms(Exception):
    """A socket asked to join more rooms than it may be in at once.

    The limit is CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION. Nothing of the join
    was done. The mixin and the decorators answer it by sending
    :meth:`messages` to the socket: an error frame, then a close with code
    :data:`TOO_MANY_ROOMS`.
    """

    def __init__(self, room: str, limit: int) -> None:
        self.room = room
        self.limit = limit
        super().__init__(
            f"a socket may be in {limit} rooms at most "
            "(CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION): it was refused when "
            f"it asked for one more, {room!r}"
        )

    def messages(self) -> list[dict[str, Any]]:
        """The ASGI messages that tell the client, then close its socket."""
        frame = protocol.error(
            "too_many_rooms",
            f"This connection may be in {self.limit} rooms at most.",
            limit=self.limit,
        )
        return refusal(frame, TOO_MANY_ROOMS)


def refusal(frame: dict[str, Any], code: int) -> list[dict[str, Any]]:
    """The ASGI messages that send an error ``frame``, then close with ``code``."""
    return [
        {"type": "websocket.send", "text": json.dumps(frame)},
        {"type": "websocket.close", "code": code},
    ]


def check_room_limit(consumer: Any, rooms: list[str]) -> None:
    """Raise :class:`TooManyRooms` if joining ``rooms`` would pass the limit."""
    limit = conf.MAX_ROOMS_PER_CONNECTION
    if limit is None:
        return
    joined: set[str] = consumer.__dict__.get("_presence_joined", set())
    new = [room for room in dict.fromkeys(rooms) if room not in joined]
    if len(joined) + len(new) > limit:
        raise TooManyRooms(new[max(limit - len(joined), 0)], limit)


def forget_room(consumer: Any, room_name: str) -> None:
    """The socket is no longer in ``room_name`` (a prune dropped it)."""
    consumer.__dict__.get("_presence_joined", set()).discard(room_name)


def _joined(consumer: Any, room_name: str) -> None:
    # Remembered for the room limit, and for the Celery-mode leave, which
    # discards the groups at once too; its groups were joined just now.
    consumer.__dict__.setdefault("_presence_joined", set()).add(room_name)
    consumer._presence_refreshed_at = consumer._presence_rooms_at = time.monotonic()


def is_heartbeat(text: object) -> bool:
    """Whether a text frame is a heartbeat: JSON that decodes to "heartbeat"."""
    if text == HEARTBEAT_FRAME:
        return True
    if not isinstance(text, str) or len(text) > HEARTBEAT_MAX_LENGTH:
        return False
    try:
        return bool(json.loads(text) == HEARTBEAT_CONTENT)
    except ValueError:
        return False


def touch_due(consumer: Any) -> bool:
    """Whether ``consumer``'s socket is due a touch; if so, the clock restarts.

    The interval is read from the settings when the clock restarts, not at
    every message: looking up an unset Django setting costs microseconds, a
    heartbeat's whole budget.
    """
    now = time.monotonic()
    last: float | None = getattr(consumer, "_presence_touched_at", None)
    if last is not None:
        interval = getattr(consumer, "_presence_touch_interval", None)
        if now - last < (conf.TOUCH_INTERVAL if interval is None else interval):
            return False
    _touched(consumer, now)
    return True


def _touched(consumer: Any, now: float) -> None:
    """Restart the socket's touch clock at ``now`` (a ``time.monotonic()``)."""
    consumer._presence_touched_at = now
    consumer._presence_touch_interval = conf.TOUCH_INTERVAL


def member_key(consumer: Any, room_name: str, user_id: Any) -> str:
    """The socket's member key in ``room_name``: its user's, else its session's.

    A visitor's tabs share a session, so they are one member; a socket
    without a session is a member of its own.
    """
    scope = getattr(consumer, "scope", None) or {}
    session = scope.get("session")
    session_key = getattr(session, "session_key", None) if session is not None else None
    return protocol.member_key(
        room_name,
        consumer.channel_name,
        user_id,
        session_key if isinstance(session_key, str) else None,
    )


#: Which presence events a consumer handles: True for all, or their names.
Subscribe = bool | list[str]


def join(consumer: Any, room_name: str, user: Any, *, subscribe: Subscribe) -> bool:
    """Put the consumer's socket in a room; False if the room could not be joined.

    ``subscribe`` is which presence events the consumer handles: True for
    all, or a list of "state", "diff" and "expired". Raises
    :class:`TooManyRooms`, having done nothing, if the socket is in as many
    rooms as it may be.
    """
    check_room_limit(consumer, [room_name])
    if conf.USE_CELERY:
        joining = _Joining.of(consumer, room_name, user, subscribe)
        try:
            # In the consumer's thread: no hop back to its event loop.
            groups.add_now(consumer.channel_layer, [joining.groups()])
        except UNAVAILABLE as error:
            outage.failed("join", error)
            return False
        joining.done(consumer)
        return True
    room_name = validation.room_name(room_name)
    key = member_key(consumer, room_name, validation.user_id(user))
    layer = consumer.channel_layer
    try:
        # The socket joins its groups first, as in Celery mode (the change
        # set adds it again after commit): a layer that is down writes nothing.
        groups.add_now(
            layer, [(room_name, consumer.channel_name, protocol.event_mask(subscribe))]
        )
    except UNAVAILABLE as error:
        outage.failed("join", error)
        return False
    try:
        operations.join(
            room_name,
            consumer.channel_name,
            user,
            subscribe=subscribe,
            channel_layer=layer,
            server=leases.default.server(),
            key=key,
        )
    except BaseException as error:
        unavailable = isinstance(error, UNAVAILABLE)
        if unavailable:
            outage.failed("join", error)
        if room_name not in consumer.__dict__.get("_presence_joined", ()):
            # Not in the room before, and no presence now: out of its groups
            # (unless a row says otherwise by the time that is checked).
            broadcast.settle_or_retry(layer, [], [(room_name, consumer.channel_name)])
        if not unavailable:
            raise
        return False
    outage.recovered(DATABASE, CHANNEL_LAYER)
    _joined(consumer, room_name)
    # The join wrote last_seen: the next touch can wait a whole interval.
    _touched(consumer, time.monotonic())
    return True


def leave_all(consumer: Any) -> None:
    """Take the consumer's socket out of every room."""
    if conf.USE_CELERY:
        at, pairs = _leaving(consumer)
        failure: BaseException | None = None
        try:
            groups.leave_now(consumer.channel_layer, pairs)
        except UNAVAILABLE as error:
            failure = error
        _left(consumer, at, pairs, failure)
        return
    consumer.__dict__.pop("_presence_joined", None)
    try:
        operations.leave_all(
            consumer.channel_name, channel_layer=consumer.channel_layer
        )
    except UNAVAILABLE as error:
        outage.failed("leave", error)
    else:
        # The channel layer's part comes after commit, and reports for itself.
        outage.recovered(DATABASE)


def touch(consumer: Any) -> None:
    """Touch the consumer's socket, unless it was touched within TOUCH_INTERVAL."""
    if touch_due(consumer):
        _touch_now(consumer)


def _touch_now(consumer: Any) -> None:
    name = consumer.channel_name
    joined: set[str] | None = consumer.__dict__.get("_presence_joined")
    # The rooms it believes it is in, once per MAX_AGE: told to join again
    # those it is not in (a prune dropped it, and its notice was lost).
    rooms = tuple(sorted(joined)) if joined and _rooms_due(consumer) else ()
    refresh = _refresh_due(consumer)
    if conf.USE_CELERY:
        outbox.default.touch(name, rooms, refresh=refresh)
        return
    try:
        operations.touch(
            [name],
            rooms={name: list(rooms)} if rooms else None,
            refresh=[name] if refresh else [],
            channel_layer=consumer.channel_layer,
        )
    except UNAVAILABLE as error:
        # Try again at the next message rather than a whole interval later.
        consumer._presence_touched_at = None
        outage.failed("touch", error)
    else:
        outage.recovered(DATABASE)


#: A socket's group memberships are refreshed by its touch once per this
#: fraction of the layer's group_expiry (a day for channels_redis).
REFRESH_FRACTION = 1 / 4
#: The group_expiry of a layer that has none.
GROUP_EXPIRY = 86_400


def _rooms_due(consumer: Any) -> bool:
    """Whether the socket's touch is due to say which rooms it is in: once per
    MAX_AGE from its last join (a join in flight is not taken for lost)."""
    now = time.monotonic()
    last: float | None = consumer.__dict__.get("_presence_rooms_at")
    if last is not None and now - last < conf.MAX_AGE:
        return False
    consumer._presence_rooms_at = now
    return True


def _refresh_due(consumer: Any) -> bool:
    """Whether the socket's touch is due to refresh its group memberships.

    channels_redis forgets a group member group_expiry after it was added: a
    touch refreshes them once per quarter of that since the socket joined (a
    socket joined some other way, at its first touch), not at every touch.
    """
    now = time.monotonic()
    last: float | None = consumer.__dict__.get("_presence_refreshed_at")
    expiry = getattr(consumer.channel_layer, "group_expiry", GROUP_EXPIRY)
    if last is not None and now - last < expiry * REFRESH_FRACTION:
        return False
    consumer._presence_refreshed_at = now
    return True


async def ajoin(
    consumer: Any, room_name: str, user: Any, *, subscribe: Subscribe
) -> bool:
    """Async twin of :func:`join`."""
    check_room_limit(consumer, [room_name])
    if conf.USE_CELERY:
        joining = _Joining.of(consumer, room_name, user, subscribe)
        try:
            await groups.add(consumer.channel_layer, [joining.groups()])
        except UNAVAILABLE as error:
            outage.failed("join", error)
            return False
        joining.done(consumer)
        return True
    joined: bool = await database_sync_to_async(join)(
        consumer, room_name, user, subscribe=subscribe
    )
    return joined


async def aleave_all(consumer: Any) -> None:
    """Async twin of :func:`leave_all`."""
    if not conf.USE_CELERY:
        await database_sync_to_async(leave_all)(consumer)
        return
    at, pairs = _leaving(consumer)
    failure: BaseException | None = None
    try:
        await groups.leave(consumer.channel_layer, pairs)
    except UNAVAILABLE as error:
        failure = error
    _left(consumer, at, pairs, failure)


async def atouch(consumer: Any) -> None:
    """Async twin of :func:`touch`; a coalesced touch does not leave the loop.

    In Celery mode a due touch does not leave it either: it is an append.
    """
    if not touch_due(consumer):
        return
    if conf.USE_CELERY:
        _touch_now(consumer)
    else:
        await database_sync_to_async(_touch_now)(consumer)


# Celery mode.

ADD_PRESENCE = "channels_presence.tasks.add_presence"
LEAVE_ALL = "channels_presence.tasks.leave_all"


@dataclass(frozen=True)
class _Joining:
    """A Celery-mode join, its arguments checked before the first I/O."""

    room_name: str
    channel_name: str
    user_id: int | None
    subscribe: Subscribe
    events: int
    key: str
    at: float

    @classmethod
    def of(
        cls, consumer: Any, room_name: str, user: Any, subscribe: Subscribe
    ) -> _Joining:
        room_name = validation.room_name(room_name)
        user_id = validation.user_id(user)
        return cls(
            room_name,
            validation.channel_name(consumer.channel_name),
            user_id,
            subscribe,
            protocol.event_mask(subscribe),
            member_key(consumer, room_name, user_id),
            _socket_time(consumer),
        )

    def groups(self) -> tuple[str, str, int]:
        """What ``groups.add`` takes: the room, the socket, its events."""
        return self.room_name, self.channel_name, self.events

    def done(self, consumer: Any) -> None:
        """The socket is in the room's groups: hand the join to a worker."""
        outage.recovered(CHANNEL_LAYER)
        _joined(consumer, self.room_name)
        outbox.default.send(
            ADD_PRESENCE,
            self.room_name,
            self.channel_name,
            self.user_id,
            at=self.at,
            subscribe=self.subscribe,
            server=leases.default.server(),
            key=self.key,
        )
        # The join writes last_seen: the next touch can wait a whole interval.
        _touched(consumer, time.monotonic())


def _left(
    consumer: Any,
    at: float,
    pairs: list[tuple[str, str]],
    error: BaseException | None = None,
) -> None:
    """The socket's groups were left (or ``error`` stopped it): tell a worker."""
    if error is not None:
        # The worker discards the groups of the presences it removes.
        outage.failed("leave", error)
    elif pairs:
        outage.recovered(CHANNEL_LAYER)
    outbox.default.send(LEAVE_ALL, consumer.channel_name, at=at)


def _leaving(consumer: Any) -> tuple[float, list[tuple[str, str]]]:
    """When the socket leaves, and the (room, socket) pairs it joined."""
    at = _socket_time(consumer)
    joined: set[str] = consumer.__dict__.pop("_presence_joined", set())
    return at, [(room, consumer.channel_name) for room in sorted(joined)]


def _socket_time(consumer: Any) -> float:
    """Now, as UNIX time; never earlier than the socket's previous operation.

    The workers order a socket's tasks by these times, so a clock stepped back
    between a join and a leave must not reverse them.
    """
    last: float = getattr(consumer, "_presence_last_at", 0.0)
    at = max(time.time(), last + 1e-6)
    consumer._presence_last_at = at
    return at
