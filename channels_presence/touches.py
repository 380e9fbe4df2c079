"""Touches: sockets seen alive again, and what a touch finds out about them.

A batch of touches (the sockets that one server process saw alive since its
last batch) moves their presences' ``last_seen`` forward, in one statement per
chunk of names below the database's limit on parameters, never backwards and
never past the worker's own clock. Then, with no transaction open:

1. The memberships of the touched sockets that are due it (each asks once per
   quarter of the layer's ``group_expiry``, see ``dispatch``) are refreshed in
   their rooms' groups, in one pipeline per shard: channels_redis drops a
   group member whose score is older than ``group_expiry`` (a day by default)
   at the group's next send, so a socket open for longer would stop hearing
   its room while its row says it is present.
2. A socket that believes it is in a room where it has no presence is told
   (``presence.expired``), at most once per socket per MAX_AGE, so that it
   joins again: a prune dropped it, and the notice the prune sent never
   arrived (its channel was full), or it joined while the prune ran. The
   socket side says which rooms each socket believes it is in, once per
   MAX_AGE; only the rows of the sockets that say so, or that are due a
   refresh, are returned by the UPDATE.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from channels.layers import BaseChannelLayer
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, router
from django.utils import timezone
from redis.exceptions import RedisError

from . import broadcast, clock, groups, keystore, protocol, sql, validation
from .conf import conf

if TYPE_CHECKING:
    from .models import Presence

logger = logging.getLogger("channels_presence")

#: Which rooms each socket of a touch believes it is in, by channel name.
Rooms = Mapping[str, Sequence[str]]


def touch(
    channel_names: Iterable[str],
    *,
    at: datetime | None = None,
    rooms: Rooms | None = None,
    refresh: Iterable[str] | None = None,
    channel_layer: BaseChannelLayer | None = None,
    strict: bool = True,
) -> int:
    """Mark the sockets as seen at ``at`` (now when None); return rows moved.

    ``last_seen`` never moves backwards, nor later than now: a server whose
    clock runs ahead must not keep its presences from going stale. No
    presence is created and no room's version changes. ``rooms`` says which
    rooms each socket believes it is in (see the module's docstring); a
    socket missing from it is told nothing. ``refresh`` names the sockets
    whose group memberships are due a refresh (None: every socket touched).
    Raises ValueError or TypeError for bad input, before anything is
    written; with ``strict`` off (a worker's batch), a bad entry of
    ``rooms`` is logged and left out instead. The channel layer's part is
    logged if it fails: the touch itself stands.
    """
    names = validation.channel_names(channel_names)
    believed = _checked_rooms(rooms, names, strict=strict)
    due = None if refresh is None else set(validation.channel_names(refresh))
    moment = min(clock.moment(at), timezone.now())
    _, presence_model = _models()
    using = router.db_for_write(presence_model)
    # The rows of the sockets whose rooms are checked or whose groups are
    # refreshed are returned; the others' are only counted (most touches).
    asked = set(believed) if due is not None else set(names)
    asked |= due or set()
    moved: list[tuple[Any, str, int]] = []
    counted = 0
    # Two parameters besides the names: the moment, twice.
    size = max(1, sql.max_params(connections[using]) - 2)
    for returning in (True, False):
        part = [name for name in names if (name in asked) == returning]
        for start in range(0, len(part), size):
            chunk = part[start : start + size]
            found = _move(presence_model, using, chunk, moment, returning=returning)
            if isinstance(found, int):
                counted += found
            else:
                moved += found
    room_names = _room_names({room_id for room_id, _, _ in moved}, using)
    # A room that prune_rooms deleted since (its presences left): skipped.
    rows = [
        (room_names[room_id], name, events)
        for room_id, name, events in moved
        if room_id in room_names
    ]
    missing = _missing(believed, rows) if believed else []
    joins = [row for row in rows if due is None or row[1] in due]
    if joins or missing:
        layer = groups.get_layer(channel_layer)
        broadcast.guard(
            "the group refresh of touched sockets",
            _refresh,
            layer,
            joins,
            then="the next touch tries again",
        )
        if missing:
            broadcast.guard(
                "the notices to dropped sockets",
                _tell,
                layer,
                missing,
                then="the next touch tries again",
            )
    return len(moved) + counted


def _missing(
    believed: dict[str, list[str]], rows: list[tuple[str, str, int]]
) -> list[tuple[str, str]]:
    """The (room, socket) pairs of ``believed`` that have no presence."""
    found = {(room, name) for room, name, _ in rows}
    wanted = [(room, name) for name, rooms in believed.items() for room in rooms]
    unsure = sorted({name for room, name in wanted if (room, name) not in found})
    if unsure:
        # Not moved: seen later already, or gone.
        found |= set(broadcast.rows_of(unsure))
    return [pair for pair in wanted if pair not in found]


def _checked_rooms(
    rooms: object, names: list[str], *, strict: bool
) -> dict[str, list[str]]:
    """``rooms`` for the sockets of ``names``, each room name checked once."""
    if rooms is None:
        return {}
    if not isinstance(rooms, Mapping):
        raise TypeError(
            "rooms must map channel names to the rooms each socket believes it "
            f"is in, not {type(rooms).__name__}"
        )
    touched = set(names)
    usable: dict[object, bool] = {}
    checked: dict[str, list[str]] = {}
    for name, believed in rooms.items():
        try:
            if name not in touched:
                raise ValueError(
                    f"rooms names socket {name!r}, which is not among the "
                    "sockets touched"
                )
            # list or tuple, as JSON gives them: an ABC check costs a
            # batch of 100,000 sockets a tenth of a second.
            if type(believed) not in (list, tuple):
                raise TypeError(
                    f"rooms[{name!r}] must be a list of room names, not {believed!r}"
                )
            for room in believed:
                if room not in usable:
                    validation.room_name(room)
                    usable[room] = True
        except (TypeError, ValueError):
            if strict:
                raise
            logger.exception("touch_presences: rooms of %r left out", name)
            continue
        checked[name] = list(believed)
    return checked


def _move(
    model: type[Presence],
    using: str,
    names: list[str],
    moment: datetime,
    *,
    returning: bool = True,
) -> list[tuple[Any, str, int]] | int:
    """Move the presences of ``names`` seen before ``moment`` to it: one
    ``UPDATE ... RETURNING`` (room id, socket, events) of each row moved;
    without ``returning``, a plain ``UPDATE`` and how many rows it moved."""
    connection = connections[using]
    quote = connection.ops.quote_name
    meta = model._meta

    def column(name: str) -> str:
        return quote(cast(Any, meta.get_field(name)).column)

    last_seen = cast(Any, meta.get_field("last_seen"))
    value = last_seen.get_db_prep_value(moment, connection)
    params: list[Any]
    if connection.vendor == "postgresql":
        among, params = "= ANY(%s)", [names]
    else:
        among, params = f"IN ({', '.join(['%s'] * len(names))})", list(names)
    returned = (
        f" RETURNING {column('room')}, {column('channel_name')}, {column('events')}"
        if returning
        else ""
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {quote(meta.db_table)} SET {column('last_seen')} = %s "
            f"WHERE {column('channel_name')} {among} AND {column('last_seen')} < %s"
            + returned,
            [value, *params, value],
        )
        if not returning:
            return int(cursor.rowcount)
        return [tuple(row) for row in cursor.fetchall()]


def _room_names(ids: set[Any], using: str) -> dict[Any, str]:
    if not ids:
        return {}
    room_model, _ = _models()
    rooms = room_model.objects.using(using).order_by()
    found: dict[Any, str] = {}
    for part in sql.any_of(rooms, "pk", sorted(ids)):
        found.update(part.values_list("pk", "channel_name"))
    return found


def _refresh(layer: BaseChannelLayer, joins: list[tuple[str, str, int]]) -> None:
    """Refresh the (room, socket, events) memberships, leaving none that is gone.

    Where the layer could only add them again, a socket that left since its
    touch may be back in its groups: the groups are settled against the rows.
    """
    if joins and not groups.refresh_now(layer, joins):
        broadcast.settle_or_retry(layer, joins, [])


#: Where a socket told to join again is remembered, under the leases' prefix.
TOLD = "told"


def _tell(layer: BaseChannelLayer, missing: list[tuple[str, str]]) -> None:
    """``presence.expired`` to each (room, socket) of ``missing``, unless the
    socket was told within MAX_AGE (by any worker)."""
    sockets = sorted({name for _, name in missing})
    first = set(_first_time(sockets))
    by_room: dict[str, list[str]] = {}
    for room, name in missing:
        if name in first:
            by_room.setdefault(room, []).append(name)
    if not by_room:
        return
    logger.info(
        "presence: telling %s sockets that have no presence in rooms they "
        "believe they are in to join again",
        len(first),
    )
    told = [(room, name) for room, names in by_room.items() for name in names]
    # Out of the groups of rooms where they have no presence (invariant 2),
    # unless a row shows up by the time that is checked.
    broadcast.settle_or_retry(layer, [], told)
    try:
        groups.send_to_channels_now(
            layer,
            [
                (names, protocol.expired(room))
                for room, names in sorted(by_room.items())
            ],
        )
    except groups.UNAVAILABLE:
        _forget_told(sorted(first))
        raise


def _first_time(sockets: list[str]) -> list[str]:
    """The sockets not told within MAX_AGE; they are remembered as told now.

    In the Redis of the leases (``keystore``), so that every worker knows. A Redis that
    cannot be reached tells none: the next touch tries again.
    """
    seconds = max(1, math.ceil(float(conf.MAX_AGE)))
    prefix = f"{keystore.key_prefix()}:{TOLD}:"
    try:
        with keystore.client(timeout=groups.BLOCKING_TIMEOUT) as connection:
            pipe = connection.pipeline(transaction=False)
            for name in sockets:
                pipe.set(prefix + name, 1, nx=True, ex=seconds)
            replies = pipe.execute()
    except (ImproperlyConfigured, RedisError, OSError) as error:
        # Not the channel layer's outage: its own line, at most once a minute.
        _KEYSTORE_FAILURES.log(error)
        return []
    return [name for name, first in zip(sockets, replies, strict=True) if first]


class _Throttled:
    """A failure of ``what``, logged at most once per ``interval`` seconds."""

    def __init__(self, what: str, interval: float = 60.0) -> None:
        self.what = what
        self.interval = interval
        self.logged_at = float("-inf")

    def log(self, error: BaseException) -> None:
        now = time.monotonic()
        if now - self.logged_at >= self.interval:
            self.logged_at = now
            logger.warning("presence: %s failed: %s", self.what, error)


#: The Redis of the leases (``keystore``) could not remember who was told:
#: no notice is sent until it can.
_KEYSTORE_FAILURES = _Throttled(
    "remembering which sockets were told to join again (in the leases' Redis)"
)


def _forget_told(sockets: list[str]) -> None:
    """The notices to ``sockets`` were not sent: the next touch tells them."""
    prefix = f"{keystore.key_prefix()}:{TOLD}:"
    try:
        with keystore.client(timeout=groups.BLOCKING_TIMEOUT) as connection:
            connection.delete(*(prefix + name for name in sockets))
    except (ImproperlyConfigured, RedisError, OSError):
        logger.debug("presence: could not forget which sockets were told")


def _models() -> tuple[Any, type[Presence]]:
    return (
        apps.get_model("channels_presence", "Room"),
        apps.get_model("channels_presence", "Presence"),
    )
