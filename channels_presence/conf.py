"""The settings of channels_presence, read from Django settings at call time.

Every property looks its setting up on each access, so ``override_settings``
works and nothing is read at import. Values are returned as configured;
``checks.py`` reports a setting of the wrong type or range at startup.
"""

from __future__ import annotations

from typing import Any, cast

from django.conf import settings

PREFIX = "CHANNELS_PRESENCE_"

#: Settings that hold a number of seconds, and those that hold a flag.
NUMBER_SETTINGS = (
    "MAX_AGE",
    "TOUCH_INTERVAL",
    "FLUSH_INTERVAL",
    "PRUNE_INTERVAL",
    "ROOM_PRUNE_INTERVAL",
    "SERVER_PRUNE_INTERVAL",
    "EVENT_INTERVAL",
    "WORKER_TIMEOUT",
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
    def SERVER_LEASE(self) -> float | None:
        """Seconds a server's lease lives unrefreshed; None turns leases off."""
        return cast("float | None", getattr(settings, PREFIX + "SERVER_LEASE", 10))

    @property
    def SERVER_PRUNE_INTERVAL(self) -> float:
        """Initial interval of the prune_servers beat entry, in seconds."""
        return cast(float, getattr(settings, PREFIX + "SERVER_PRUNE_INTERVAL", 5))

    @property
    def WORKER_TIMEOUT(self) -> float | None:
        """Seconds a published presence task may wait unapplied before the web
        process logs that no worker applies it; None turns the watch off."""
        return cast("float | None", getattr(settings, PREFIX + "WORKER_TIMEOUT", 30))

    @property
    def REDIS_URL(self) -> str | dict[str, Any] | None:
        """Where server leases live; None: the channel layer's first host.

        A Redis URL, a ``redis+sentinel://`` URL, or a dict naming Sentinels as
        channels_redis takes them (``{"sentinels": [...], "master_name": ...}``).
        """
        value: Any = getattr(settings, PREFIX + "REDIS_URL", None)
        return cast("str | dict[str, Any] | None", value)

    @property
    def QUEUE(self) -> str | None:
        """The Celery queue every presence task goes to; None: Celery's routing."""
        return cast("str | None", getattr(settings, PREFIX + "QUEUE", None))

    @property
    def MAX_ROOMS_PER_CONNECTION(self) -> int | None:
        """How many rooms one socket may be in at once; None for no limit."""
        return cast(
            "int | None", getattr(settings, PREFIX + "MAX_ROOMS_PER_CONNECTION", 100)
        )

    @property
    def MEMBER_FIELDS(self) -> dict[str, str] | None:
        """What a member of a room is sent as: {payload key: user field}.

        None: ``{"id": "pk", "username": USERNAME_FIELD}``, without the username
        when the user model's USERNAME_FIELD is an email field.
        """
        value: Any = getattr(settings, PREFIX + "MEMBER_FIELDS", None)
        return cast("dict[str, str] | None", value)

    @property
    def EVENT_INTERVAL(self) -> float:
        """A room's diffs go out at most once per interval per worker, merged."""
        return cast(float, getattr(settings, PREFIX + "EVENT_INTERVAL", 0.1))

    @property
    def EVENT_SOCKETS(self) -> int | None:
        """Sockets a room may have before its diffs go out less often, in
        proportion; None keeps every room at EVENT_INTERVAL."""
        return cast("int | None", getattr(settings, PREFIX + "EVENT_SOCKETS", 300))

    @property
    def MAX_LISTED_MEMBERS(self) -> int:
        """Above this many member keys, a room's frames carry counts only."""
        return cast(int, getattr(settings, PREFIX + "MAX_LISTED_MEMBERS", 1_000))

    @property
    def BROADCAST(self) -> bool:
        """Whether workers send each room's states and diffs to its sockets."""
        return cast(bool, getattr(settings, PREFIX + "BROADCAST", True))


conf = Settings()


def task_queue() -> str | None:
    """The queue every presence task is published to, None to let Celery route it.

    CHANNELS_PRESENCE_QUEUE when it is set: a queue given at publish time wins
    over the project's ``task_routes``, so that dedicated workers (``celery -A
    tasks worker -Q presence``) get every presence task. None otherwise, and
    Celery routes them as any other task (``task_routes``, else
    ``task_default_queue``).
    """
    return conf.QUEUE or None
