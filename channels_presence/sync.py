"""The socket side's answers to ``presence.sync``: a room's state, cached briefly.

A client that sees a gap in a room's versions asks for the room's state. That is
the only database read on the socket path: it is rare, and goes through
``database_sync_to_async``. Every socket of a process that asks within
:data:`CACHE_AGE` of a read gets that read's state, so a storm of syncs after
a lost diff costs one query per room per second.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

from channels.db import database_sync_to_async

from . import operations, protocol

#: Seconds a room's state read for one sync serves the others.
CACHE_AGE = 1.0
#: Seconds between two answers to one socket's syncs, at least.
SYNC_INTERVAL = 1.0
#: Seconds from a socket's join during which a sync it asks before the join's
#: own state reached it waits for that state, which answers it: a client with
#: no state two seconds after joining asks, and a busy worker's state would
#: then be the second copy of the room it receives. A worker slow beyond
#: this (or down) gets the sync answered from the database.
JOIN_STATE_WAIT = 5.0
# Rooms whose state is kept at once, at most.
_CACHE_SIZE = 1_000
# A sync frame is {"type": "presence.sync", "room": "..."}: under this length.
_MAX_FRAME = 256


class States:
    """A per-process cache of rooms' states, each at most CACHE_AGE old."""

    def __init__(self) -> None:
        self._cache: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    async def get(self, room: str, at_least: int | None = None) -> dict[str, Any]:
        """The room's ``presence.state``, read now unless a recent read serves.

        A cached state older than ``at_least`` (the version the asking socket
        was sent already) does not serve.
        """
        now = time.monotonic()
        cached = self._cache.get(room)
        if (
            cached is not None
            and now - cached[0] <= CACHE_AGE
            and (at_least is None or cached[1]["version"] >= at_least)
        ):
            return cached[1]
        state: dict[str, Any] = await database_sync_to_async(operations.read_state)(
            room
        )
        self._cache[room] = (time.monotonic(), state)
        self._cache.move_to_end(room)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return state

    def clear(self) -> None:
        """Forget every cached state."""
        self._cache.clear()


#: This process's cache.
states = States()


def requested_room(text: object) -> str | None:
    """The room a text frame asks to sync, or None if it is not a sync request.

    Cheap for every other frame: only a short one that names the sync type
    is decoded. A sync request whose room is not a string asks for "".
    """
    if not isinstance(text, str) or len(text) > _MAX_FRAME or protocol.SYNC not in text:
        return None
    try:
        content = json.loads(text)
    except ValueError:
        return None
    return room_of(content)


def room_of(content: object) -> str | None:
    """:func:`requested_room` for decoded JSON content."""
    if not isinstance(content, dict) or content.get("type") != protocol.SYNC:
        return None
    room = content.get("room")
    return room if isinstance(room, str) else ""


def not_in_room(room: str) -> dict[str, Any]:
    """The answer to a sync of a room the socket is not in."""
    return protocol.error(
        "not_in_room",
        "This connection is not in that room: it can only sync its own rooms.",
        room=room,
    )
