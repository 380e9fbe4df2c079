"""The beat schedule: django-celery-beat entries for the prunes.

After ``migrate``, django-celery-beat has one periodic task running
``prune_presences`` every CHANNELS_PRESENCE_PRUNE_INTERVAL seconds, one running
``prune_rooms`` every CHANNELS_PRESENCE_ROOM_PRUNE_INTERVAL seconds, and one
running ``prune_servers`` every CHANNELS_PRESENCE_SERVER_PRUNE_INTERVAL seconds.
They are created only when missing: once they exist the admin owns them, and an
interval changed or a task disabled there survives every later ``migrate``,
which says which entries it created.

With CHANNELS_PRESENCE_QUEUE set, the entries are created on that queue, and an
entry whose queue is empty (made before the setting was) is moved to it at
the next ``migrate``; a queue chosen in the admin is kept.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import IO, Any

from django.apps import apps
from django.db import connections
from django.db.models import Q

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


def interval(task: str) -> float:
    """Seconds between the runs of ``task``'s beat entry (its setting if none)."""
    for _, name, aliases, setting in ENTRIES:
        if task != name:
            continue
        if apps.is_installed("django_celery_beat"):
            from django_celery_beat.models import PeriodicTask

            entry = (
                PeriodicTask.objects.filter(task__in=(name, *aliases), enabled=True)
                .exclude(interval=None)
                .values_list("interval__every", "interval__period")
                .first()
            )
            if entry is not None:
                every, period = entry
                return float(every * PERIOD_SECONDS.get(period, 1))
        return float(setting())
    raise ValueError(f"{task!r} has no beat entry")


#: django-celery-beat's interval periods, in seconds.
PERIOD_SECONDS = {
    "days": 86400,
    "hours": 3600,
    "minutes": 60,
    "seconds": 1,
    "microseconds": 1e-6,
}


def ensure_schedule(using: str = "default") -> list[str]:
    """Create the prune entries that are missing; return the names created."""
    return [name for name, _ in _ensure(using)]


def _ensure(using: str) -> list[tuple[str, int]]:
    """Create the missing entries; return each one created with its seconds."""
    from django_celery_beat.models import PeriodicTask

    created = []
    queue = conf.QUEUE or None
    for name, task, aliases, interval_setting in ENTRIES:
        tasks = PeriodicTask.objects.using(using)
        made = tasks.filter(task__in=(task, *aliases)) | tasks.filter(name=name)
        if made.exists():
            if queue:
                # Beat would send these prunes to Celery's default queue,
                # which workers dedicated to presence do not consume.
                unset = made.filter(Q(queue__isnull=True) | Q(queue=""))
                unset.update(queue=queue)
            continue
        every = max(1, math.ceil(interval_setting()))
        tasks.create(
            name=name,
            task=task,
            interval=interval_schedule(every, using),
            # A prune still queued when the next is due is dropped: after a
            # worker outage, a backlog of prunes run ahead of the touches
            # queued behind them would remove sockets that are alive.
            expire_seconds=every,
            queue=queue,
            description="Made by channels_presence after migrate. Change the "
            "interval or disable it here: migrate leaves it as you set it.",
        )
        created.append((name, every))
    return created


def interval_schedule(every: int, using: str = "default") -> Any:
    """The ``IntervalSchedule`` of every ``every`` seconds: one that exists, else new.

    django-celery-beat does not make them unique: the first of several is used.
    """
    from django_celery_beat.models import IntervalSchedule

    schedules = IntervalSchedule.objects.using(using)
    found = schedules.filter(every=every, period=IntervalSchedule.SECONDS).first()
    if found is None:
        found = schedules.create(every=every, period=IntervalSchedule.SECONDS)
    return found


def scheduled(task: str, aliases: tuple[str, ...] = (), using: str = "default") -> Any:
    """The periodic task that runs ``task`` (or an alias of it); None if none does.

    The oldest, if several do.
    """
    from django_celery_beat.models import PeriodicTask

    tasks = PeriodicTask.objects.using(using).select_related(
        "interval", "crontab", "solar", "clocked"
    )
    return tasks.filter(task__in=(task, *aliases)).order_by("pk").first()


def create_schedule(
    sender: Any,
    using: str = "default",
    verbosity: int = 1,
    stdout: IO[str] | None = None,
    **kwargs: Any,
) -> None:
    """post_migrate receiver: the prune entries, if django-celery-beat is here.

    It writes the entries it created to ``stdout`` (migrate's), unless
    ``verbosity`` is 0; nothing when it created none.
    """
    if not apps.is_installed("django_celery_beat"):
        return
    from django_celery_beat.models import PeriodicTask

    # Migrating only some apps can leave django-celery-beat's tables for later.
    if (
        PeriodicTask._meta.db_table
        not in connections[using].introspection.table_names()
    ):
        return
    created = _ensure(using)
    if created and verbosity >= 1:
        out = stdout or sys.stdout
        out.write(
            "Celery beat entries created by channels_presence (edit them in the "
            "admin, under Presence schedule):\n"
        )
        for name, every in created:
            out.write(f"  {name}, every {every} s\n")
