"""The managers of Room and Presence: 1.0.0's documented methods, and async twins.

They are a thin public face: every method calls the operation of the same
meaning in ``operations``, and every ``a``-prefixed twin runs that same
operation through ``database_sync_to_async``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from channels.db import database_sync_to_async
from channels.layers import BaseChannelLayer
from django.db import models

from . import operations
from .protocol import Counts

if TYPE_CHECKING:
    from .models import Presence, Room


class RoomQuerySet(models.QuerySet["Room"]):
    """Rooms, with the helpers that read their counts (one row each, no join)."""

    def occupied(self) -> RoomQuerySet:
        """The rooms someone is in, fullest first (users and visitors), then by name."""
        return self.filter(sockets__gt=0).order_by(
            models.F("users").desc(), models.F("visitors").desc(), "channel_name"
        )

    def counts(self, room_channel_name: str) -> Counts:
        """A room's users, visitors and sockets, by name: one query on one row.

        A room that does not exist is empty.
        """
        row = (
            self.filter(channel_name=room_channel_name)
            .values_list("users", "visitors", "sockets")
            .first()
        )
        return Counts(*row) if row is not None else Counts()

    async def acounts(self, room_channel_name: str) -> Counts:
        """Async twin of :meth:`counts`."""
        row = await (
            self.filter(channel_name=room_channel_name)
            .values_list("users", "visitors", "sockets")
            .afirst()
        )
        return Counts(*row) if row is not None else Counts()


_RoomManagerBase = models.Manager.from_queryset(RoomQuerySet)


class RoomManager(_RoomManagerBase["Room"]):
    """``Room.objects``: add and remove sockets, prune stale presences and rooms."""

    def add(
        self, room_channel_name: str, user_channel_name: str, user: Any = None
    ) -> Room:
        """Put socket ``user_channel_name`` in room ``room_channel_name``; return it."""
        return operations.join(room_channel_name, user_channel_name, user)

    async def aadd(
        self, room_channel_name: str, user_channel_name: str, user: Any = None
    ) -> Room:
        """Async twin of :meth:`add`."""
        room: Room = await database_sync_to_async(self.add)(
            room_channel_name, user_channel_name, user
        )
        return room

    def remove(self, room_channel_name: str, user_channel_name: str) -> None:
        """Take the socket out of the room; an unknown room or socket is a no-op."""
        operations.leave(room_channel_name, user_channel_name)

    async def aremove(self, room_channel_name: str, user_channel_name: str) -> None:
        """Async twin of :meth:`remove`."""
        await database_sync_to_async(self.remove)(room_channel_name, user_channel_name)

    def prune_presences(
        self, channel_layer: BaseChannelLayer | None = None, age: float | None = None
    ) -> list[Presence]:
        """Remove presences not touched for ``age`` seconds (default MAX_AGE)."""
        return operations.prune_presences(age, channel_layer=channel_layer)

    async def aprune_presences(
        self, channel_layer: BaseChannelLayer | None = None, age: float | None = None
    ) -> list[Presence]:
        """Async twin of :meth:`prune_presences`."""
        removed: list[Presence] = await database_sync_to_async(self.prune_presences)(
            channel_layer, age
        )
        return removed

    def prune_rooms(self) -> list[str]:
        """Delete the rooms that have no presence; return their names."""
        return operations.prune_rooms()

    async def aprune_rooms(self) -> list[str]:
        """Async twin of :meth:`prune_rooms`."""
        names: list[str] = await database_sync_to_async(self.prune_rooms)()
        return names

    def empty(self) -> models.QuerySet[Room]:
        """The rooms that have no presence (what prune_rooms would delete)."""
        return operations.empty_rooms()


class PresenceQuerySet(models.QuerySet["Presence"]):
    """Presences, with the presence operations that apply to a set of them."""

    def stale(self, age: float | None = None) -> PresenceQuerySet:
        """Those not touched for ``age`` seconds (default MAX_AGE)."""
        return cast(PresenceQuerySet, operations.stale_presences(age, self))

    def prune(
        self, age: float | None = None, channel_layer: BaseChannelLayer | None = None
    ) -> list[Presence]:
        """Remove those not touched for ``age`` seconds; return them."""
        return operations.prune_presences(
            age, presences=self, channel_layer=channel_layer
        )

    def remove(self, channel_layer: BaseChannelLayer | None = None) -> list[Presence]:
        """Take their sockets out of their rooms, as leave does; return them."""
        return operations.remove(self, channel_layer=channel_layer)


_PresenceManagerBase = models.Manager.from_queryset(PresenceQuerySet)


class PresenceManager(_PresenceManagerBase["Presence"]):
    """``Presence.objects``: touch a socket, or take it out of every room."""

    def touch(self, channel_name: str) -> None:
        """Mark every presence of the socket as seen now."""
        operations.touch([channel_name])

    async def atouch(self, channel_name: str) -> None:
        """Async twin of :meth:`touch`."""
        await database_sync_to_async(self.touch)(channel_name)

    def leave_all(self, channel_name: str) -> None:
        """Take the socket out of every room it is in."""
        operations.leave_all(channel_name)

    async def aleave_all(self, channel_name: str) -> None:
        """Async twin of :meth:`leave_all`."""
        await database_sync_to_async(self.leave_all)(channel_name)
