"""Admin for rooms and presences: who is where, what is stale, prune it now.

Rooms and presences are made by sockets, not by hand: the admin shows them read
only, and whatever it removes goes through the operations, so the sockets also
leave their groups and the room hears of it.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.translation import ngettext

from .models import Presence, Room

# How many pruned presences the admin names in its message.
SHOWN = 10


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Shows rows without an add form; every field is read only."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in self.model._meta.fields]


@admin.register(Room)
class RoomAdmin(ReadOnlyAdmin):
    """Rooms with how many sockets are in each."""

    list_display = ["channel_name", "member_count"]
    search_fields = ["channel_name"]
    ordering = ["channel_name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Room]:
        rooms: QuerySet[Room] = super().get_queryset(request)
        return rooms.annotate(_members=Count("presence"))

    @admin.display(description="sockets present", ordering="_members")
    def member_count(self, room: Room) -> int:
        """How many sockets are in the room."""
        count: int = getattr(room, "_members", 0)
        return count

    def delete_model(self, request: HttpRequest, obj: Room) -> None:
        """Take the room's sockets out of it properly, then delete it."""
        self.delete_queryset(request, Room.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Room]) -> None:
        """Take the rooms' sockets out of them properly, then delete them."""
        Presence.objects.filter(room__in=queryset).remove()
        queryset.delete()


class StaleFilter(admin.SimpleListFilter):
    """Filter presences by whether they have gone silent for MAX_AGE."""

    title = "staleness"
    parameter_name = "stale"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Presence]
    ) -> list[tuple[str, str]]:
        return [("yes", "Stale"), ("no", "Live")]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[Presence]
    ) -> QuerySet[Presence]:
        stale = Presence.objects.stale()
        if self.value() == "yes":
            return queryset.filter(pk__in=stale.values("pk"))
        if self.value() == "no":
            return queryset.exclude(pk__in=stale.values("pk"))
        return queryset


@admin.register(Presence)
class PresenceAdmin(ReadOnlyAdmin):
    """Presences by room, searchable by socket and user, with stale ones marked."""

    list_display = ["channel_name", "room", "user", "last_seen", "stale"]
    list_filter = [StaleFilter, ("room", admin.RelatedOnlyFieldListFilter)]
    list_select_related = ["room", "user"]
    ordering = ["room__channel_name", "channel_name"]
    actions = ["prune_stale"]

    def get_search_fields(self, request: HttpRequest) -> list[str]:
        return [
            "channel_name",
            "room__channel_name",
            "user__" + get_user_model().USERNAME_FIELD,
        ]

    @admin.display(description="stale", boolean=True)
    def stale(self, presence: Presence) -> bool:
        """Whether the socket has gone silent for MAX_AGE."""
        return presence.is_stale

    def delete_model(self, request: HttpRequest, obj: Presence) -> None:
        """Take the socket out of its room, as a leave does."""
        Presence.objects.filter(pk=obj.pk).remove()

    def delete_queryset(
        self, request: HttpRequest, queryset: QuerySet[Presence]
    ) -> None:
        """Take the sockets out of their rooms, as a leave does."""
        Presence.objects.filter(pk__in=queryset.values("pk")).remove()

    @admin.action(
        description="Prune the selected presences that are stale",
        permissions=["change"],
    )
    def prune_stale(self, request: HttpRequest, queryset: QuerySet[Presence]) -> None:
        """Remove the selected presences older than MAX_AGE, as prune_presences does."""
        removed = Presence.objects.filter(pk__in=queryset.values("pk")).prune()
        if not removed:
            self.message_user(
                request, "None of the selected presences is stale.", messages.INFO
            )
            return
        shown = ", ".join(map(str, removed[:SHOWN]))
        if len(removed) > SHOWN:
            shown += f" and {len(removed) - SHOWN} more"
        self.message_user(
            request,
            ngettext(
                "Pruned %(count)d stale presence: %(which)s.",
                "Pruned %(count)d stale presences: %(which)s.",
                len(removed),
            )
            % {"count": len(removed), "which": shown},
            messages.SUCCESS,
        )
