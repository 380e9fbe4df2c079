"""Admin for rooms and presences: who is where, what is stale, prune it now."""

from __future__ import annotations

from datetime import timedelta

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import ngettext

from . import operations
from .conf import conf
from .models import Presence, Room

# How many pruned presences the admin names in its message.
SHOWN = 10


@admin.register(Room)
class RoomAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Rooms with how many sockets are in each."""

    list_display = ["channel_name", "member_count"]
    search_fields = ["channel_name"]
    ordering = ["channel_name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Room]:
        rooms: QuerySet[Room] = super().get_queryset(request)
        return rooms.annotate(_members=Count("presence"))

    @admin.display(description="sockets present", ordering="_members")
    def member_count(self, room: Room) -> int:
        count: int = getattr(room, "_members", 0)
        return count


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
        cutoff = timezone.now() - timedelta(seconds=conf.MAX_AGE)
        if self.value() == "yes":
            return queryset.filter(last_seen__lt=cutoff)
        if self.value() == "no":
            return queryset.filter(last_seen__gte=cutoff)
        return queryset


@admin.register(Presence)
class PresenceAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Presences by room, searchable by socket and user, with stale ones marked."""

    list_display = ["channel_name", "room", "user", "last_seen", "stale"]
    list_filter = [StaleFilter, ("room", admin.RelatedOnlyFieldListFilter)]
    list_select_related = ["room", "user"]
    raw_id_fields = ["room", "user"]
    ordering = ["room__channel_name", "channel_name"]
    actions = ["prune_stale"]

    def get_search_fields(self, request: HttpRequest) -> list[str]:
        return ["channel_name", "room__channel_name", _username_lookup()]

    @admin.display(description="stale", boolean=True)
    def stale(self, presence: Presence) -> bool:
        return presence.is_stale

    @admin.action(
        description="Prune the selected presences that are stale",
        permissions=["change"],
    )
    def prune_stale(self, request: HttpRequest, queryset: QuerySet[Presence]) -> None:
        """Remove the selected presences older than MAX_AGE, as prune_presences does."""
        removed = operations.prune_presences(presences=queryset)
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


def _username_lookup() -> str:
    return "user__" + get_user_model().USERNAME_FIELD
