"""``manage.py prune_presences [--age N] [--dry-run]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from channels_presence.models import Presence, Room


class Command(BaseCommand):
    help = (
        "Remove presences not seen for --age seconds (CHANNELS_PRESENCE_MAX_AGE by "
        "default), drop their sockets from the room groups, and say which."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--age",
            type=float,
            default=None,
            help="Seconds without a touch after which a presence is stale.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only list what would be removed; change nothing.",
        )

    def handle(
        self, *args: Any, age: float | None, dry_run: bool, **options: Any
    ) -> None:
        try:
            if dry_run:
                stale = list(Presence.objects.stale(age).select_related("room", "user"))
            else:
                stale = Room.objects.prune_presences(age=age)
        except (TypeError, ValueError) as error:
            raise CommandError(str(error)) from None
        verb = "Would remove" if dry_run else "Removed"
        stale.sort(key=lambda p: (p.room.channel_name, p.channel_name))
        for presence in stale:
            self.stdout.write(f"{verb} {_describe(presence)}")
        self.stdout.write(
            f"{verb} {len(stale)} stale presence{'s' * (len(stale) != 1)}."
        )


def _describe(presence: Presence) -> str:
    seen = presence.last_seen.isoformat(timespec="seconds")
    return f"{presence} (socket {presence.channel_name}, last seen {seen})"
