"""Admin for rooms and presences: who is where, what is stale, prune it now.

Rooms and presences are made by sockets, not by hand: the admin shows them read
only, and whatever it removes goes through the operations, so the sockets also
leave their groups and the room hears of it.

"Presence schedule" shows the prunes' celery beat entries as plain numbers of
seconds, when each last ran and whether it is enabled, and edits them, for
those who may change django-celery-beat's periodic tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django import forms
from django.apps import apps
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.translation import ngettext

from . import schedule
from .conf import conf
from .models import Presence, PresenceSchedule, Room

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
    """Rooms with their counts (kept on each room's row), version and listing."""

    list_display = [
        "channel_name",
        "users",
        "visitors",
        "member_count",
        "listed",
        "version",
        "changed_at",
    ]
    list_filter = ["listed"]
    search_fields = ["channel_name"]
    ordering = ["channel_name"]

    @admin.display(description="sockets present", ordering="sockets")
    def member_count(self, room: Room) -> int:
        """How many sockets are in the room, from its counts (no join)."""
        return room.sockets

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


# The presence schedule.

#: Seconds an IntervalSchedule can hold (its ``every`` is a 32-bit integer).
MAX_SECONDS = 2**31 - 1


@dataclass
class ScheduleEntry:
    """One prune of the schedule, and the periodic task that runs it, if any."""

    name: str
    task: str
    #: The periodic task running it; None when there is none (migrate makes it).
    periodic_task: Any

    @property
    def key(self) -> str:
        """The form's name for the entry: its task's short name."""
        return self.task.rsplit(".", 1)[-1]

    @property
    def label(self) -> str:
        """ "Prune stale presences", from the entry's name."""
        return self.name.split(": ", 1)[-1].capitalize()

    @property
    def seconds(self) -> int | None:
        """The task's interval in whole seconds; None for another kind of schedule."""
        interval = getattr(self.periodic_task, "interval", None)
        if interval is None:
            return None
        run_every: timedelta = interval.schedule.run_every
        return max(1, math.ceil(run_every.total_seconds()))

    @property
    def other_schedule(self) -> str:
        """The task's schedule when it is not an interval (a crontab...), else ""."""
        if self.periodic_task is None or self.periodic_task.interval is not None:
            return ""
        return str(self.periodic_task.scheduler or "no schedule")


def schedule_entries() -> list[ScheduleEntry]:
    """The prunes of the schedule, in ``schedule.ENTRIES`` order, with their rows."""
    return [
        ScheduleEntry(name, task, schedule.scheduled(task, aliases))
        for name, task, aliases, _ in schedule.ENTRIES
    ]


class ScheduleForm(forms.Form):
    """An interval in seconds and an enabled box for each prune that has a task."""

    def __init__(self, entries: list[ScheduleEntry], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.entries = [entry for entry in entries if entry.periodic_task is not None]
        for entry in self.entries:
            help_text = "seconds"
            if entry.key == "prune_presences":
                help_text += (
                    f"; keep it well under CHANNELS_PRESENCE_MAX_AGE ({conf.MAX_AGE:g} "
                    "s): a dead socket stays listed for MAX_AGE plus this, at most"
                )
            if entry.other_schedule:
                help_text += (
                    f"; now on another schedule ({entry.other_schedule}), which a "
                    "number here replaces"
                )
            self.fields[f"{entry.key}-every"] = forms.IntegerField(
                label=entry.label + " every",
                min_value=1,
                max_value=MAX_SECONDS,
                required=not entry.other_schedule,
                initial=entry.seconds,
                help_text=help_text,
                error_messages={
                    "invalid": "Enter a whole number of seconds.",
                    "min_value": "Enter a number of seconds of 1 or more.",
                    "required": "Enter a number of seconds of 1 or more.",
                },
            )
            self.fields[f"{entry.key}-enabled"] = forms.BooleanField(
                label=entry.label + " enabled",
                required=False,
                initial=entry.periodic_task.enabled,
            )

    def save(self) -> list[str]:
        """Write the changes to the periodic tasks; return what changed, said."""
        changes = []
        with transaction.atomic():
            for entry in self.entries:
                said = self._save_entry(entry)
                if said:
                    changes.append(f"{entry.name}: {said}")
        return changes

    def _save_entry(self, entry: ScheduleEntry) -> str:
        from django_celery_beat.models import PeriodicTask

        every: int | None = self.cleaned_data[f"{entry.key}-every"]
        enabled: bool = self.cleaned_data[f"{entry.key}-enabled"]
        task = (
            PeriodicTask.objects.select_for_update()
            .filter(pk=entry.periodic_task.pk)
            .first()
        )
        if task is None:  # deleted since the page was shown
            return ""
        current = ScheduleEntry(entry.name, entry.task, task)
        said = []
        if every is not None and every != current.seconds:
            # migrate makes a prune expire when the next one is due; a prune
            # whose expiry followed its interval keeps following it.
            if task.expire_seconds is not None and task.expire_seconds == (
                current.seconds
            ):
                task.expire_seconds = every
            task.interval = schedule.interval_schedule(every)
            task.crontab = task.solar = task.clocked = None
            said.append(f"every {every} s")
        if enabled != task.enabled:
            task.enabled = enabled
            said.append("enabled" if enabled else "disabled")
        if said:
            # save(), not update(): django-celery-beat then tells a running
            # beat that the schedule changed.
            task.save()
        return ", ".join(said)


@admin.register(PresenceSchedule)
class PresenceScheduleAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """One page: the prunes' beat entries, in seconds, with when each last ran.

    Seen by those who may view django-celery-beat's periodic tasks, edited by
    those who may change them.
    """

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return apps.is_installed("django_celery_beat") and (
            request.user.has_perm("django_celery_beat.view_periodictask")
            or self.has_change_permission(request)
        )

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return apps.is_installed("django_celery_beat") and request.user.has_perm(
            "django_celery_beat.change_periodictask"
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_module_permission(self, request: HttpRequest) -> bool:
        # The page's permissions are django-celery-beat's, not this app's.
        return self.has_view_permission(request)

    def get_urls(self) -> list[URLPattern]:
        """The one page, where the index links to, as a model's list would be."""
        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        view = self.admin_site.admin_view(self.schedule_view)
        return [path("", view, name=name)]

    def schedule_view(self, request: HttpRequest) -> HttpResponse:
        """Show the schedule; on POST, by a user who may change it, save it."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        can_change = self.has_change_permission(request)
        entries = schedule_entries()
        if request.method == "POST":
            if not can_change:
                raise PermissionDenied
            form = ScheduleForm(entries, request.POST)
            if form.is_valid():
                changes = form.save()
                if changes:
                    self.message_user(
                        request, "Saved: " + "; ".join(changes) + ".", messages.SUCCESS
                    )
                else:
                    self.message_user(request, "Nothing changed.", messages.INFO)
                return HttpResponseRedirect(request.path)
        else:
            form = ScheduleForm(entries)
        rows = [
            {
                "entry": entry,
                "every": form[f"{entry.key}-every"] if entry.periodic_task else None,
                "enabled": form[f"{entry.key}-enabled"]
                if entry.periodic_task
                else None,
                "url": _task_url(entry.periodic_task),
            }
            for entry in entries
        ]
        context = {
            **self.admin_site.each_context(request),
            "title": "Presence schedule",
            "opts": self.opts,
            "form": form,
            "rows": rows,
            "can_change": can_change,
        }
        return TemplateResponse(
            request, "admin/channels_presence/presence_schedule.html", context
        )


def _task_url(task: Any) -> str:
    """The admin page of the periodic task, for its other options ("" if none)."""
    if task is None:
        return ""
    try:
        return reverse("admin:django_celery_beat_periodictask_change", args=[task.pk])
    except NoReverseMatch:
        return ""
