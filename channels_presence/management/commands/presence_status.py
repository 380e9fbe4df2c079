"""``manage.py presence_status``: is presence applied? A health check."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from channels_presence import heartbeat, leases, schedule
from channels_presence.conf import conf
from channels_presence.models import Presence, Room


class Command(BaseCommand):
    help = (
        "Print the rooms, presences and servers with a live lease; the age of the "
        "oldest presence task waiting for a worker and when a worker last applied "
        "one (its heartbeat in Redis); and when each celery beat entry of "
        "channels_presence last ran. In Celery mode it exits with status 1 when "
        "presence is not being applied: no worker heartbeat was ever seen, or a "
        "presence task has waited longer than CHANNELS_PRESENCE_WORKER_TIMEOUT "
        "(or the heartbeat's Redis cannot be read). It exits with 0 otherwise, "
        "so that it can serve as a health check."
    )
    # A health check runs every few seconds: it reports, `check` checks.
    requires_system_checks: list[str] = []

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(f"Rooms: {Room.objects.count()}")
        self.stdout.write(f"Presences: {Presence.objects.count()}")
        self.stdout.write(f"Servers with a live lease: {_servers()}")
        problem = self._workers()
        self._beat()
        if problem:
            raise CommandError(
                f"presence is not being applied: {problem}", returncode=1
            )
        self.stdout.write("Presence is being applied.")

    def _workers(self) -> str:
        # What is wrong with the workers, "" if nothing.
        if not conf.USE_CELERY:
            self.stdout.write(
                "Workers: none needed, presence runs inline "
                "(CHANNELS_PRESENCE_USE_CELERY = False)"
            )
            return ""
        try:
            found = heartbeat.read()
        except heartbeat.UNREACHABLE as error:
            self.stdout.write(f"Worker heartbeat: cannot be read ({error})")
            return f"the worker heartbeat cannot be read from Redis ({error})"
        oldest = found.oldest_waiting()
        if oldest is None:
            self.stdout.write("Oldest waiting presence task: none waiting")
        else:
            self.stdout.write(
                "Oldest waiting presence task: published "
                f"{found.now - oldest:.0f} s ago"
            )
        if found.applied is None:
            self.stdout.write("Worker heartbeat: none seen")
            return "no worker heartbeat was ever seen: is a worker running?"
        self.stdout.write(
            "Worker heartbeat: a worker applied a presence task "
            f"{found.now - found.applied:.0f} s ago"
        )
        if found.stalled(conf.WORKER_TIMEOUT):
            return (
                "a presence task has waited longer than "
                f"CHANNELS_PRESENCE_WORKER_TIMEOUT ({conf.WORKER_TIMEOUT} s)"
            )
        return ""

    def _beat(self) -> None:
        if not apps.is_installed("django_celery_beat"):
            self.stdout.write("Beat entries: django_celery_beat is not installed")
            return
        self.stdout.write("Beat entries, last run:")
        for name, task, aliases, _ in schedule.ENTRIES:
            entry = schedule.scheduled(task, aliases)
            if entry is None:
                ran = "no entry (run migrate)"
            elif not entry.enabled:
                ran = f"{_when(entry.last_run_at)}, disabled"
            else:
                ran = _when(entry.last_run_at)
            self.stdout.write(f"  {name}: {ran}")


def _when(at: datetime | None) -> str:
    if at is None:
        return "never"
    ago = (timezone.now() - at).total_seconds()
    return f"{at.isoformat(timespec='seconds')} ({ago:.0f} s ago)"


def _servers() -> str:
    if conf.SERVER_LEASE is None:
        return "leases are off (CHANNELS_PRESENCE_SERVER_LEASE = None)"
    servers = sorted(
        set(
            Presence.objects.exclude(server="")
            .values_list("server", flat=True)
            .distinct()
        )
    )
    try:
        with leases.client(timeout=5.0) as connection:
            pipe = connection.pipeline(transaction=False)
            for server in servers:
                pipe.exists(leases.lease_key(server))
            live = sum(1 for found in pipe.execute() if found)
    except heartbeat.UNREACHABLE as error:
        return f"unknown, Redis cannot be reached ({error})"
    return f"{live} (of {len(servers)} with presences)"
