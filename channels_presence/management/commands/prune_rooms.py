"""``manage.py prune_rooms [--dry-run]``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from channels_presence.models import Room


class Command(BaseCommand):
    help = "Delete the rooms that have no presence, and say which."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only list what would be deleted; change nothing.",
        )

    def handle(self, *args: Any, dry_run: bool, **options: Any) -> None:
        if dry_run:
            empty = Room.objects.empty().order_by("channel_name")
            names = list(empty.values_list("channel_name", flat=True))
        else:
            names = Room.objects.prune_rooms()
        verb = "Would delete" if dry_run else "Deleted"
        for name in names:
            self.stdout.write(f"{verb} room {name}")
        self.stdout.write(f"{verb} {len(names)} empty room{'s' * (len(names) != 1)}.")
