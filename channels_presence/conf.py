"""The settings of channels_presence, read from Django settings at call time.

Every property looks its setting up on each access, so ``override_settings``
works and nothing is read at import. Values are returned as configured;
``checks.py`` reports a setting of the wrong type or range at startup.
"""

from __future__ import annotations

from typing import cast

from django.conf import settings

PREFIX = "CHANNELS_PRESENCE_"

#: Settings that hold a number of seconds, and those that hold a flag.
NUMBER_SETTINGS = (
    "MAX_AGE",
    "TOUCH_INTERVAL",
    "FLUSH_INTERVAL",
    "PRUNE_INTERVAL",
    "ROOM_PRUNE_INTERVAL",
)
FLAG_SETTINGS = ("USE_CELERY", "BROADCAST")


class Settings:
    """Typed, lazy access to the ``CHANNELS_PRESENCE_*`` settings."""

    @property
    def MAX_AGE(self) -> float:
        """Seconds without a touch after which a presence is stale (1.0.0's name)."""
        return cast(float, getattr(settings, PREFIX + "MAX_AGE", 60))

    @property
    def USE_CELERY(self) -> bool:
        """False runs every operation inline instead of as a Celery task."""
        return cast(bool, getattr(settings, PREFIX + "USE_CELERY", True))

    @property
    def TOUCH_INTERVAL(self) -> float:
        """A socket's touches closer together than this are coalesced; 0 keeps all."""
        value = getattr(settings, PREFIX + "TOUCH_INTERVAL", None)
        if value is None:
            return self.MAX_AGE / 4
        return cast(float, value)

    @property
    def FLUSH_INTERVAL(self) -> float:
        """Seconds between the batched touch tasks that one process sends."""
        return cast(float, getattr(settings, PREFIX + "FLUSH_INTERVAL", 1.0))

    @property
    def PRUNE_INTERVAL(self) -> float:
        """Initial interval of the prune_presences beat entry, in seconds."""
        return cast(float, getattr(settings, PREFIX + "PRUNE_INTERVAL", 10))

    @property
    def ROOM_PRUNE_INTERVAL(self) -> float:
        """Initial interval of the prune_rooms beat entry, in seconds."""
        return cast(float, getattr(settings, PREFIX + "ROOM_PRUNE_INTERVAL", 600))

    @property
    def BROADCAST(self) -> bool:
        """Whether the built-in receiver sends each change to the room's group."""
        return cast(bool, getattr(settings, PREFIX + "BROADCAST", True))


conf = Settings()
