"""The Celery tasks: the presence operations, run by a worker.

In Celery mode the socket side enqueues ``add_presence``, ``leave_all`` and
batches of ``touch_presences``; celery beat runs the prunes. Each task only
calls the operation of the same meaning, and each is idempotent: a task run
twice, or after a later task of the same socket, changes nothing more, because
``at`` (the UNIX time at which it happened on the socket) orders it.

Tasks whose loss would lose a change are acknowledged late and rejected when
their worker dies, so that the broker delivers them again; they and the
touches retry while the database is unreachable. The prunes do not: beat runs
them again at their next interval, and retries would only pile up during an
outage. The names are public: ``prune_presence`` is 1.0.0's registered name,
kept so that its beat schedules keep working.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import task_success, worker_process_init, worker_process_shutdown
from django.db import InterfaceError, OperationalError
from redis.exceptions import RedisError

from . import (
    broadcast,
    clock,
    groups,
    heartbeat,
    leases,
    operations,
    schedule,
    validation,
)
from .changes import Call, Join, Leave, LeaveAll

logger = logging.getLogger("channels_presence")

# A database that cannot be reached is waited for, with backoff up to a minute.
_RETRY: dict[str, Any] = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": None,
}
# A join or leave also waits for the channel layer: the socket side changed its
# groups already, and only this task writes the row. Its own group changes
# come after commit and are retried in the background, but a layer that fails
# before (the keys' lookups of a visitor's session, say) retries the task,
# which runs again safely, ordered by ``at``.
_RETRY_LAYER: dict[str, Any] = {
    **_RETRY,
    "autoretry_for": (OperationalError, InterfaceError, RedisError, OSError),
}
# Redelivered if the worker dies before it is done: the task would be lost.
_DURABLE: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True}


@shared_task(
    name="channels_presence.tasks.add_presence",
    ignore_result=True,
    **_DURABLE,
    **_RETRY_LAYER,
)
def add_presence(
    room_channel_name: str,
    user_channel_name: str,
    user_id: int | None = None,
    at: float | None = None,
    subscribe: bool | list[str] = False,
    server: str = "",
    key: str | None = None,
) -> None:
    """Put socket ``user_channel_name`` in room ``room_channel_name`` as ``user_id``.

    Nothing happens if the socket left the room, or every room, after ``at``.
    ``subscribe`` is which presence events its consumer handles (True: all,
    as the mixin; or a list of "state", "diff", "expired"). ``server`` is the
    id of the socket's server, whose lease keeps it there; ``key`` its member
    key, when the socket side knew it (a visitor's session). A user that no
    longer exists joins anonymously, with a warning.
    """
    operations.apply_isolated(
        [
            _add(
                room_channel_name,
                user_channel_name,
                user_id,
                at,
                subscribe,
                server,
                key,
            )
        ]
    )


def _add(
    room_channel_name: object,
    user_channel_name: object,
    user_id: object = None,
    at: object = None,
    subscribe: object = False,
    server: object = "",
    key: object = None,
) -> Join:
    if user_id is not None and (
        isinstance(user_id, bool) or not isinstance(user_id, int | str)
    ):
        raise TypeError(
            f"user_id must be a user's primary key or None, not {user_id!r}"
        )
    return operations.checked_join(
        room_channel_name,
        user_channel_name,
        user_id,
        clock.from_timestamp(at),
        subscribe,
        server,
        key,
    )


def _remove(
    room_channel_name: object, user_channel_name: object, at: object = None
) -> Leave:
    return Leave(
        validation.room_name(room_channel_name),
        validation.channel_name(user_channel_name),
        clock.from_timestamp(at),
    )


def _leave_all(user_channel_name: object, at: object = None) -> LeaveAll:
    return LeaveAll(
        validation.channel_name(user_channel_name), clock.from_timestamp(at)
    )


@shared_task(
    name="channels_presence.tasks.remove_presence",
    ignore_result=True,
    **_DURABLE,
    **_RETRY_LAYER,
)
def remove_presence(
    room_channel_name: str, user_channel_name: str, at: float | None = None
) -> None:
    """Take socket ``user_channel_name`` out of room ``room_channel_name``."""
    operations.apply_isolated([_remove(room_channel_name, user_channel_name, at)])


@shared_task(
    name="channels_presence.tasks.leave_all",
    ignore_result=True,
    **_DURABLE,
    **_RETRY_LAYER,
)
def leave_all(user_channel_name: str, at: float | None = None) -> None:
    """Take socket ``user_channel_name`` out of every room (it disconnected)."""
    operations.apply_isolated([_leave_all(user_channel_name, at)])


@shared_task(
    name="channels_presence.tasks.apply_batch",
    ignore_result=True,
    **_DURABLE,
    **_RETRY_LAYER,
)
def apply_batch(calls: list[list[Any]]) -> None:
    """Several joins and leaves, ``[task name, args, kwargs]`` each, in order.

    What one process's outbox sends when more than one join or leave waits:
    one message instead of many, applied as one change set per room. A call
    with bad input is logged and skipped; the others still apply. A call that
    the database refuses (an ``IntegrityError`` from a race, say) costs no
    other: the calls are then applied one by one, the failed one tried once
    more, then logged as given up (``operations.apply_isolated``). A retry
    for an outage applies them all again, which changes nothing for those
    already applied.
    """
    if not isinstance(calls, list | tuple):
        raise TypeError(
            "apply_batch takes a list of [task name, args, kwargs] calls, not "
            f"{type(calls).__name__}"
        )
    checked: list[Call] = []
    for call in calls:
        # A malformed call must not cost the calls after it their turn.
        try:
            name, args, kwargs = call
        except (TypeError, ValueError):
            logger.error(
                "apply_batch: %r is not a [task name, args, kwargs] call; skipped",
                call,
            )
            continue
        parse = BATCHABLE.get(name) if isinstance(name, str) else None
        if parse is None:
            logger.error("apply_batch: %r cannot be batched; skipped", name)
            continue
        try:
            checked.append(parse(*args, **kwargs))
        except (ValueError, TypeError):
            logger.exception(
                "apply_batch: %s with %r %r is bad; skipped", name, args, kwargs
            )
    operations.apply_isolated(checked)


@shared_task(
    name="channels_presence.tasks.touch_presences", ignore_result=True, **_RETRY
)
def touch_presences(
    user_channel_names: list[str],
    at: float | None = None,
    rooms: dict[str, list[str]] | None = None,
    refresh: list[str] | None = None,
) -> int:
    """Mark the sockets as seen at ``at``: one UPDATE for the whole batch.

    Never moves ``last_seen`` backwards, nor past the worker's clock, never
    creates a presence. The group memberships of the sockets of ``refresh``
    (None: all) are kept fresh, and a socket that has no presence in a room
    of ``rooms`` (which rooms each socket believes it is in) is told to join
    again (see ``channels_presence.touches``); a bad entry of ``rooms`` is
    logged and left out. A lost batch costs nothing lasting: each
    socket touches again within TOUCH_INTERVAL.
    """
    if isinstance(user_channel_names, str):
        raise TypeError(
            "touch_presences takes a list of channel names, not one string: "
            f"pass [{user_channel_names!r}]"
        )
    return operations.touch(
        user_channel_names,
        at=clock.from_timestamp(at),
        rooms=rooms,
        refresh=refresh,
        strict=False,
    )


@shared_task(name="channels_presence.tasks.prune_presences", ignore_result=True)
def prune_presences(age: float | None = None) -> int:
    """Remove the presences not touched for ``age`` seconds (default MAX_AGE).

    Stale sockets are told first (``presence.expired``, one message per room),
    then discarded from their groups. Departures old enough to be of no more
    use are forgotten. Then each room changed within the last two prune
    intervals is sent its version (``presence.version``), so that a client
    that missed a diff sees it is behind. Returns how many presences were
    removed.
    """
    operations.forget_departures()
    removed = operations.prune_stale(age)
    operations.send_beacons(2 * schedule.interval(PRUNE_PRESENCES))
    return removed


PRUNE_PRESENCES = "channels_presence.tasks.prune_presences"


@shared_task(name="channels_presence.tasks.prune_presence", ignore_result=True)
def prune_presence(age: float | None = None) -> int:
    """1.0.0's registered name for :func:`prune_presences`."""
    count: int = prune_presences(age)
    return count


@shared_task(name="channels_presence.tasks.prune_servers", ignore_result=True)
def prune_servers() -> int:
    """Remove the presences of the servers whose lease expired; return how many.

    See ``channels_presence.leases``: a crashed server's sockets leave their
    rooms, with the usual group discards and events, within seconds.
    """
    return len(leases.prune_servers())


@shared_task(name="channels_presence.tasks.prune_rooms", ignore_result=True)
def prune_rooms() -> int:
    """Delete the rooms that have no presence; returns how many."""
    return len(operations.prune_rooms())


@worker_process_init.connect
def _keep_event_loops(**kwargs: Any) -> None:
    """In a process that runs a worker's tasks (solo, or a prefork child),
    the async channel-layer calls (layers other than channels_redis) reuse
    one event loop, and its connections."""
    groups.keep_loops()


#: The names of this module's tasks begin so.
PREFIX = "channels_presence.tasks."


@task_success.connect
def _heartbeat(sender: Any = None, **kwargs: Any) -> None:
    """A presence task was applied: the worker heartbeat says so, and which
    publish it applied (see ``channels_presence.heartbeat``)."""
    name = getattr(sender, "name", None) or ""
    if name.startswith(PREFIX):
        heartbeat.beat.applied(getattr(sender.request, heartbeat.HEADER, None))


@worker_process_shutdown.connect
def _flush_diffs(**kwargs: Any) -> None:
    """A worker process that stops sends the diffs its throttle still holds."""
    broadcast.throttle.flush()


#: How ``apply_batch`` reads each task it can run, by name.
BATCHABLE: dict[str, Any] = {
    "channels_presence.tasks.add_presence": _add,
    "channels_presence.tasks.remove_presence": _remove,
    "channels_presence.tasks.leave_all": _leave_all,
}
