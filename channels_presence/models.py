"""Room and Presence: which sockets, and which users, are in which rooms."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import models
from django.utils import timezone

from . import clock, protocol
from .managers import PresenceManager, RoomManager
from .protocol import Counts
from .signals import presence_changed

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser


class Room(models.Model):
    """A room: a Channels group whose sockets are tracked as presences."""

    channel_name = models.CharField(
        "group name",
        max_length=255,
        unique=True,
        help_text="The Channels group that the room's sockets are added to.",
    )
    version = models.BigIntegerField(
        "version",
        default=clock.micros,
        help_text="Goes up by one with each change set of the room's presences; "
        "starts at the room's creation time in microseconds, so that a room "
        "made again under the same name never repeats a version.",
    )
    users = models.PositiveIntegerField(
        "users",
        default=0,
        help_text="How many distinct logged-in users are in the room.",
    )
    visitors = models.PositiveIntegerField(
        "visitors",
        default=0,
        help_text="How many distinct anonymous visitors (browser sessions) are "
        "in the room.",
    )
    sockets = models.PositiveIntegerField(
        "sockets",
        default=0,
        help_text="How many sockets (presences) are in the room.",
    )
    listed = models.BooleanField(
        "listed",
        default=True,
        help_text="Whether the room's events list its members; above "
        "CHANNELS_PRESENCE_MAX_LISTED_MEMBERS they carry counts only.",
    )
    changed_at = models.DateTimeField(
        "changed at",
        null=True,
        blank=True,
        help_text="When the room's presences last changed (its version went up).",
    )

    objects = RoomManager()

    class Meta:
        verbose_name = "room"
        verbose_name_plural = "rooms"
        indexes = [
            # The prune's version beacons go to the recently changed rooms.
            models.Index(fields=["changed_at"], name="channels_presence_changed_idx"),
        ]

    def __str__(self) -> str:
        return self.channel_name

    def counts(self) -> Counts:
        """The room's users, visitors and sockets now: one query on its row.

        Kept in the same transaction as its presences, so they always agree
        with the rows, whatever the room's size.
        """
        return type(self).objects.counts(self.channel_name)

    async def acounts(self) -> Counts:
        """Async twin of :meth:`counts`."""
        return await type(self).objects.acounts(self.channel_name)

    def add_presence(self, channel_name: str, user: Any = None) -> None:
        """Put a socket in this room as ``user`` (anonymous when None)."""
        type(self).objects.add(self.channel_name, channel_name, user)

    async def aadd_presence(self, channel_name: str, user: Any = None) -> None:
        """Async twin of :meth:`add_presence`."""
        await database_sync_to_async(self.add_presence)(channel_name, user)

    def remove_presence(
        self, channel_name: str | None = None, presence: Presence | None = None
    ) -> None:
        """Take a socket, given by name or by presence, out of this room."""
        if presence is not None:
            channel_name = presence.channel_name
        if channel_name is None:
            raise TypeError("remove_presence() needs a channel_name or a presence")
        type(self).objects.remove(self.channel_name, channel_name)

    async def aremove_presence(
        self, channel_name: str | None = None, presence: Presence | None = None
    ) -> None:
        """Async twin of :meth:`remove_presence`."""
        await database_sync_to_async(self.remove_presence)(channel_name, presence)

    def prune_presences(self, age_in_seconds: float | None = None) -> None:
        """Remove this room's presences not touched for ``age_in_seconds``."""
        self.presence_set.prune(age_in_seconds)

    async def aprune_presences(self, age_in_seconds: float | None = None) -> None:
        """Async twin of :meth:`prune_presences`."""
        await database_sync_to_async(self.prune_presences)(age_in_seconds)

    def get_users(self) -> models.QuerySet[AbstractBaseUser]:
        """The distinct users present; a lazy queryset (``async for`` works)."""
        return get_user_model().objects.filter(presence__room=self).distinct()

    async def aget_users(self) -> list[AbstractBaseUser]:
        """Async twin of :meth:`get_users`, evaluated: the users, as a list."""
        return [user async for user in self.get_users()]

    def get_anonymous_count(self) -> int:
        """How many sockets are in this room without a logged-in user."""
        return self.presence_set.filter(user=None).count()

    async def aget_anonymous_count(self) -> int:
        """Async twin of :meth:`get_anonymous_count`."""
        count: int = await database_sync_to_async(self.get_anonymous_count)()
        return count

    def broadcast_changed(
        self,
        added: Presence | None = None,
        removed: Presence | None = None,
        bulk_change: bool = False,
    ) -> None:
        """Send presence_changed for this room now."""
        presence_changed.send(
            sender=type(self),
            room=self,
            added=added,
            removed=removed,
            bulk_change=bulk_change,
        )

    async def abroadcast_changed(
        self,
        added: Presence | None = None,
        removed: Presence | None = None,
        bulk_change: bool = False,
    ) -> None:
        """Async twin of :meth:`broadcast_changed`."""
        await database_sync_to_async(self.broadcast_changed)(
            added, removed, bulk_change
        )


class Presence(models.Model):
    """One socket in one room, with its user (if logged in) and when last seen."""

    room = models.ForeignKey(
        Room,
        on_delete=models.CASCADE,
        verbose_name="room",
        help_text="The room the socket is in.",
    )
    channel_name = models.CharField(
        "socket",
        max_length=255,
        help_text="The socket's reply channel name (the consumer's channel_name).",
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        verbose_name="user",
        help_text="The socket's logged-in user; empty for an anonymous visitor.",
    )
    last_seen = models.DateTimeField(
        "last seen",
        default=timezone.now,
        help_text="When the socket last showed it was alive; it is stale once "
        "older than CHANNELS_PRESENCE_MAX_AGE seconds.",
    )
    joined_at = models.DateTimeField(
        "joined at",
        default=timezone.now,
        help_text="When the socket joined the room, by the clock of its server: "
        "a leave that happened before this does not remove it.",
    )

    server = models.CharField(
        "server",
        max_length=100,
        blank=True,
        default="",
        help_text="The id of the server process the socket is on, whose lease "
        "keeps it here; empty when it joined through the managers, and then "
        "only the ordinary prune removes it.",
    )
    key = models.CharField(
        "member key",
        max_length=100,
        blank=True,
        default="",
        help_text="Who the socket is in the room's events: 'u:<user id>', or "
        "'v:' and a digest of the room and the visitor's session.",
    )
    ref = models.CharField(
        "ref",
        max_length=40,
        blank=True,
        default="",
        help_text="Names this socket in the room's events without its channel "
        "name: 'r:' and a digest of the room, the socket and its key.",
    )
    events = models.PositiveSmallIntegerField(
        "events",
        default=0,
        help_text="Which presence events the socket's consumer handles: 1 "
        "states, 2 diffs, 4 expiry notices (added up).",
    )

    objects = PresenceManager()

    class Meta:
        verbose_name = "presence"
        verbose_name_plural = "presences"
        constraints = [
            models.UniqueConstraint(
                fields=["room", "channel_name"],
                name="channels_presence_room_socket_unique",
            )
        ]
        indexes = [
            # touch() and leave_all() look a socket up by its name alone.
            # last_seen has no index, on purpose: a touch, the most frequent
            # write by far, then updates no index and PostgreSQL can make it a
            # HOT update (see 0007); prune_presences() scans the table instead,
            # a few milliseconds per 100,000 presences (bench/).
            models.Index(fields=["channel_name"], name="channels_presence_socket_idx"),
            # prune_servers() lists the servers that hold presences.
            models.Index(fields=["server"], name="channels_presence_server_idx"),
            # A change set counts the sockets of each member key it changed.
            models.Index(fields=["room", "key"], name="channels_presence_key_idx"),
        ]

    def __str__(self) -> str:
        who = self.user.get_username() if self.user is not None else "anonymous"
        return f"{who} in {self.room}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save; a presence made by hand gets its key and ref as a join would."""
        if not self.key or not self.ref:
            room = self.room.channel_name
            self.key = self.key or protocol.member_key(
                room, self.channel_name, self.user_id
            )
            self.ref = protocol.presence_ref(room, self.channel_name, self.key)
        super().save(*args, **kwargs)

    @property
    def is_stale(self) -> bool:
        """Whether the socket has gone silent for longer than MAX_AGE."""
        return self.last_seen < clock.stale_before()


class Departure(models.Model):
    """A socket that left a room, or every room, remembered for a while.

    Celery workers may run a socket's tasks out of order: a leave can reach the
    database before the join it follows. The departure makes the late join a
    no-op. Departures are forgotten by ``prune_presences`` once older than
    ``operations.DEPARTURE_RETENTION``.
    """

    channel_name = models.CharField(
        "socket",
        max_length=255,
        help_text="The reply channel name of the socket that left.",
    )
    room_channel_name = models.CharField(
        "room",
        max_length=255,
        blank=True,
        help_text="The group name of the room it left; empty when it left every "
        "room (it disconnected).",
    )
    left_at = models.DateTimeField(
        "left at",
        help_text="When the socket left, by the clock of its server.",
    )

    class Meta:
        verbose_name = "departure"
        verbose_name_plural = "departures"
        constraints = [
            models.UniqueConstraint(
                fields=["channel_name", "room_channel_name"],
                name="channels_presence_departure_unique",
            )
        ]
        indexes = [
            # prune_presences() forgets the oldest departures.
            models.Index(fields=["left_at"], name="channels_presence_left_idx"),
        ]

    def __str__(self) -> str:
        where = self.room_channel_name or "every room"
        return f"{self.channel_name} left {where}"


class PresenceSchedule(Room):
    """The admin's "Presence schedule" page, which edits the prunes' beat entries.

    A proxy without rows or permissions of its own: it gives the page a place in
    the admin index. The page edits django-celery-beat's periodic tasks, and
    who may see or change them is who may see or change those (see ``admin``).
    """

    class Meta:
        proxy = True
        verbose_name = "presence schedule"
        verbose_name_plural = "presence schedule"
        default_permissions = ()
