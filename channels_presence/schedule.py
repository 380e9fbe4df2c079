"""The beat schedule: django-celery-beat entries for the prunes.

After ``migrate``, django-celery-beat has one periodic task running
``prune_presences`` every CHANNELS_PRESENCE_PRUNE_INTERVAL seconds, one running
``prune_rooms`` every CHANNELS_PRESENCE_ROOM_PRUNE_INTERVAL seconds, and one
running ``prune_servers`` every CHANNELS_PRESENCE_SERVER_PRUNE_INTERVAL seconds.
They are created only when missing: once they exist the admin owns them, and an
interval changed or a task disabled there survives every later ``migrate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from django.apps import apps
from django.db import connections

from .conf import conf

#: (name, task, the names it may also be scheduled under, its interval setting)
ENTRIES: list[tuple[str, str, tuple[str, ...], Callable[[], float]]] = [
    (
        "channels_presence: prune stale presences",
        "channels_presence.tasks.prune_presences",
        # 1.0.0's registered name: a schedule made for it already prunes.
        ("channels_presence.tasks.prune_presence",),
        lambda: conf.PRUNE_INTERVAL,
    ),
    (
        "channels_presence: prune empty rooms",
        "channels_presence.tasks.prune_rooms",
        (),
        lambda: conf.ROOM_PRUNE_INTERVAL,
    ),
    (
        "channels_presence: prune crashed servers",
        "channels_presence.tasks.prune_servers",
        (),
        lambda: conf.SERVER_PRUNE_INTERVAL,
    ),
]


def ensure_schedule(using: str = "default") -> list[str]:
    """Create the prune entries that are missing; return the names created."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    created = []
    for name, task, aliases, interval_setting in ENTRIES:
        tasks = PeriodicTask.objects.using(using)
        made = tasks.filter(task__in=(task, *aliases)) | tasks.filter(name=name)
        if made.exists():
            continue
        every = max(1, math.ceil(interval_setting()))
        schedules = IntervalSchedule.objects.using(using)
        interval = schedules.filter(
            every=every, period=IntervalSchedule.SECONDS
        ).first()
        if interval is None:
            interval = schedules.create(every=every, period=IntervalSchedule.SECONDS)
        tasks.create(
            name=name,
            task=task,
            interval=interval,
            # A prune still queued when the next is due is dropped: after a
            # worker outage, a backlog of prunes run ahead of the touches
            # queued behind them would remove sockets that are alive.
            expire_seconds=every,
            description="Made by channels_presence after migrate. Change the "
            "interval or disable it here: migrate leaves it as you set it.",
        )
        created.append(name)
    return created


def create_schedule(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """post_migrate receiver: the prune entries, if django-celery-beat is here."""
    if not apps.is_installed("django_celery_beat"):
        return
    from django_celery_beat.models import PeriodicTask

    # Migrating only some apps can leave django-celery-beat's tables for later.
    if (
        PeriodicTask._meta.db_table
        not in connections[using].introspection.table_names()
    ):
        return
    ensure_schedule(using)
