"""Touches: sockets seen alive again, and what a touch finds out about them.

A batch of touches (the sockets that one server process saw alive since its
last batch) moves their presences' ``last_seen`` forward, in one statement per
chunk of names below the database's limit on parameters, never backwards and
never past the worker's own clock. Then, with no transaction open:

1. The touched sockets' memberships of their rooms' groups are refreshed, in one
   pipeline per shard: channels_redis drops a group member whose score is
   older than the layer's ``group_expiry`` (a day by default) at the group's
   next send, so a socket open for longer would stop hearing its room while
   its row says it is present.
2. A socket that believes it is in a room where it has no presence is told
   (``presence.expired``), at most once per socket per MAX_AGE, so that it
   joins again: a prune dropped it, and the notice the prune sent never
   arrived (its channel was full), or it joined while the prune ran. The
   socket side says which rooms each socket believes it is in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from channels.layers import BaseChannelLayer
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, router
from django.utils import timezone
from redis.exceptions import RedisError

from . import clock, groups, keystore, protocol, sql, validation
from .conf import conf
from .outages import CHANNEL_LAYER, outage

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
    channel_layer: BaseChannelLayer | None = None,
) -> int:
    """Mark the sockets as seen at ``at`` (now when None); return rows moved.

    ``last_seen`` never moves backwards, nor later than now: a server whose
    clock runs ahead must not keep its presences from going stale. No
    presence is created and no room's version changes. ``rooms`` says which
    rooms each socket believes it is in (see the module's docstring); a
    socket missing from it is told nothing. Raises ValueError or TypeError
    for bad input, before anything is written. The channel layer's part is
    logged if it fails: the touch itself stands.
    """
    names = validation.channel_names(channel_names)
    believed = _checked_rooms(rooms, names)
    moment = min(clock.moment(at), timezone.now())
    _, presence_model = _models()
    using = router.db_for_write(presence_model)
    moved: list[tuple[Any, str, int]] = []
    # Two parameters besides the names: the moment, twice.
    size = max(1, sql.max_params(connections[using]) - 2)
    for start in range(0, len(names), size):
        moved += _move(presence_model, using, names[start : start + size], moment)
    room_names = _room_names({room_id for room_id, _, _ in moved}, using)
    found = {(room_names[room_id], name) for room_id, name, _ in moved}
    wanted = [(room, name) for name, rooms in believed.items() for room in rooms]
    unsure = sorted({name for room, name in wanted if (room, name) not in found})
    if unsure:
        found |= _present(presence_model, using, unsure)
    missing = [pair for pair in wanted if pair not in found]
    if moved or missing:
        layer = groups.get_layer(channel_layer)
        joins = [(room_names[room_id], name, events) for room_id, name, events in moved]
        _guard(
            "refreshing the group memberships of touched sockets",
            _refresh,
            layer,
            joins,
            using,
        )
        if missing:
            _guard("telling dropped sockets to join again", _tell, layer, missing)
    return len(moved)


def _checked_rooms(rooms: object, names: list[str]) -> dict[str, list[str]]:
    """``rooms`` for the sockets of ``names``, each room name checked."""
    if rooms is None:
        return {}
    if not isinstance(rooms, Mapping):
        raise TypeError(
            "rooms must map channel names to the rooms each socket believes it "
            f"is in, not {type(rooms).__name__}"
        )
    touched = set(names)
    checked: dict[str, list[str]] = {}
    for name, believed in rooms.items():
        if name not in touched:
            raise ValueError(
                f"rooms names socket {name!r}, which is not among the sockets touched"
            )
        if isinstance(believed, str) or not isinstance(believed, Sequence):
            raise TypeError(
                f"rooms[{name!r}] must be a list of room names, not {believed!r}"
            )
        checked[name] = [validation.room_name(room) for room in believed]
    return checked


def _move(
    model: type[Presence], using: str, names: list[str], moment: datetime
) -> list[tuple[Any, str, int]]:
    """Move the presences of ``names`` seen before ``moment`` to it: one
    ``UPDATE ... RETURNING`` (room id, socket, events) of each row moved."""
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
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {quote(meta.db_table)} SET {column('last_seen')} = %s "
            f"WHERE {column('channel_name')} {among} AND {column('last_seen')} < %s "
            f"RETURNING {column('room')}, {column('channel_name')}, "
            f"{column('events')}",
            [value, *params, value],
        )
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


def _present(
    model: type[Presence], using: str, names: list[str]
) -> set[tuple[str, str]]:
    """The (room, socket) pairs of ``names`` that have a presence."""
    presences = model.objects.using(using).order_by()
    found: set[tuple[str, str]] = set()
    for part in sql.any_of(presences, "channel_name", names):
        found.update(part.values_list("room__channel_name", "channel_name"))
    return found


def _refresh(
    layer: BaseChannelLayer, joins: list[tuple[str, str, int]], using: str
) -> None:
    """Refresh the (room, socket, events) memberships, leaving none that is gone.

    Where the layer could only add them again, a socket that left since its
    touch may be back in its groups: those without a presence now leave them.
    """
    if not joins or groups.refresh_now(layer, joins):
        return
    _, presence_model = _models()
    present = _present(presence_model, using, sorted({name for _, name, _ in joins}))
    gone = [(room, name) for room, name, _ in joins if (room, name) not in present]
    if gone:
        groups.leave_now(layer, gone)


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
    groups.send_to_channels_now(
        layer,
        [(names, protocol.expired(room)) for room, names in sorted(by_room.items())],
    )


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
        outage.failed("remembering which sockets were told to join again", error)
        return []
    return [name for name, first in zip(sockets, replies, strict=True) if first]


def _guard(what: str, call: Any, *args: Any) -> None:
    try:
        call(*args)
    except groups.UNAVAILABLE as error:
        outage.failed(what, error, "the next touch tries again")
    else:
        outage.recovered(CHANNEL_LAYER)


def _models() -> tuple[Any, type[Presence]]:
    return (
        apps.get_model("channels_presence", "Room"),
        apps.get_model("channels_presence", "Presence"),
    )
