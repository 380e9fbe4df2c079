"""The presence operations: join, leave, remove, touch, the prunes, and batches.

Each exists once, here. The managers and querysets, the model methods, their
``a``-prefixed async twins, the Celery tasks, the management commands and the
admin all call these functions. These check their arguments, then hand them to
``changes``, which applies any number of joins and leaves as one change set per
room and delivers its signals and frames after commit (``broadcast``).

Every operation is a database transaction first, and Django's transactions are
synchronous, so the operations are synchronous; async callers reach them through
``database_sync_to_async``. Nothing is written before every argument has been
checked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, overload

from channels.layers import BaseChannelLayer
from django.apps import apps
from django.contrib.auth import get_user_model
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    connections,
    router,
    transaction,
)
from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from . import broadcast, changes, clock, groups, protocol, sql, validation
from .changes import Call, Join, Leave, LeaveAll
from .conf import conf
from .protocol import Counts, Entry

# One implementation, with what a touch finds out: ``channels_presence.touches``.
from .touches import touch as touch

if TYPE_CHECKING:
    from .models import Presence, Room

logger = logging.getLogger("channels_presence")

# Departures are remembered for this many times MAX_AGE (ten minutes by default).
DEPARTURE_RETENTION = 10


@overload
def join(
    room_name: str,
    channel_name: str,
    user: Any = None,
    *,
    at: None = None,
    subscribe: bool | Iterable[str] = False,
    channel_layer: BaseChannelLayer | None = None,
    server: str = "",
    key: str | None = None,
) -> Room: ...


@overload
def join(
    room_name: str,
    channel_name: str,
    user: Any = None,
    *,
    at: datetime | None,
    subscribe: bool | Iterable[str] = False,
    channel_layer: BaseChannelLayer | None = None,
    server: str = "",
    key: str | None = None,
) -> Room | None: ...


def join(
    room_name: str,
    channel_name: str,
    user: Any = None,
    *,
    at: datetime | None = None,
    subscribe: bool | Iterable[str] = False,
    channel_layer: BaseChannelLayer | None = None,
    server: str = "",
    key: str | None = None,
) -> Room | None:
    """Put a socket in a room, as ``user`` (anonymous when None), and return the room.

    A socket already in the room keeps its row: its user is updated when it
    differs (a real change, announced as ``added``), else it only counts as a
    touch. ``subscribe`` says which presence events the socket's consumer
    handles: True for all (as the mixin), or a list of "state", "diff" and
    "expired"; a socket that handles diffs also joins the room's events group.

    ``at`` is when the socket joined, by its server's clock. Given, the join is
    ordered against the socket's leaves: if the socket left this room, or every
    room, at or after ``at``, the join is late and changes nothing (returns
    None). Without ``at`` the join happens now, unconditionally.

    ``server`` is the id of the server process the socket is on (see
    ``leases``): its presence goes when that server's lease does. ``key`` is
    the socket's member key if the caller knows it (a visitor's session, see
    ``protocol.member_key``); else it is the user's, or the socket's own.
    """
    call = checked_join(
        room_name, channel_name, validation.user_id(user), at, subscribe, server, key
    )
    result = changes.apply([call], channel_layer=channel_layer, presences=True)
    if result.late:
        return None
    return result.rooms[call.room]


def checked_join(
    room_name: object,
    channel_name: object,
    user_id: Any,
    at: datetime | None,
    subscribe: object,
    server: object,
    key: object,
) -> Join:
    """A join call, every argument checked: ValueError or TypeError if one is bad."""
    if key is not None and not (
        isinstance(key, str) and 0 < len(key) <= 100 and key.isprintable()
    ):
        raise ValueError(
            "key must be a member key (protocol.member_key makes one) or None, "
            f"not {key!r}"
        )
    if not isinstance(subscribe, bool | list | tuple):
        raise TypeError(
            f"subscribe takes True, False or a list of event names, not {subscribe!r}"
        )
    return Join(
        room=validation.room_name(room_name),
        channel_name=validation.channel_name(channel_name),
        user_id=user_id,
        at=None if at is None else clock.moment(at),
        events=protocol.event_mask(subscribe),
        server=validation.server(server),
        key=key,
    )


def leave(
    room_name: str,
    channel_name: str,
    *,
    at: datetime | None = None,
    channel_layer: BaseChannelLayer | None = None,
) -> Presence | None:
    """Take a socket out of a room; return the presence removed, if there was one.

    The socket leaves the room's groups even when it had no row. ``at`` is
    when it left, by its server's clock: given, a presence that joined after
    ``at`` stays (and keeps its groups), and the departure is remembered so
    that a join from before ``at`` that arrives later changes nothing.
    """
    call = Leave(
        validation.room_name(room_name),
        validation.channel_name(channel_name),
        None if at is None else clock.moment(at),
    )
    result = changes.apply([call], channel_layer=channel_layer, presences=True)
    return result.removed[0] if result.removed else None


def leave_all(
    channel_name: str,
    *,
    at: datetime | None = None,
    channel_layer: BaseChannelLayer | None = None,
) -> list[Presence]:
    """Take a socket out of every room it is in; return the presences removed.

    ``at`` orders the leave against the socket's joins, as for :func:`leave`.
    """
    call = LeaveAll(
        validation.channel_name(channel_name), None if at is None else clock.moment(at)
    )
    return changes.apply([call], channel_layer=channel_layer, presences=True).removed


def apply(
    calls: Sequence[Call],
    *,
    channel_layer: BaseChannelLayer | None = None,
    presences: bool = False,
) -> changes.Result:
    """Apply many joins and leaves, checked already, as one change set per room.

    ``presences`` fills the result's ``added`` and ``removed`` (see
    ``changes.apply``).
    """
    return changes.apply(calls, channel_layer=channel_layer, presences=presences)


#: What a database that is down or overloaded raises: the whole batch waits
#: for it (the task retries). Any other database error is the batch's own.
OUTAGE = (OperationalError, InterfaceError)


def apply_isolated(
    calls: Sequence[Call], *, channel_layer: BaseChannelLayer | None = None
) -> list[Call]:
    """:func:`apply`, such that one call the database refuses costs no other.

    When the change set fails with a database error that is not an outage
    (an ``IntegrityError`` from a race, say), nothing of it was written; each
    call is then applied on its own, in order (socket time orders them as
    before), and a call that fails is tried once more. Returns the calls
    given up, each logged with its error. An outage (``OUTAGE``) is raised.
    """
    try:
        apply(calls, channel_layer=channel_layer)
        return []
    except OUTAGE:
        raise
    except DatabaseError as error:
        if len(calls) == 1:
            failed = [(calls[0], error)]
        else:
            logger.warning(
                "presence: a batch of %s calls failed (%s); applying each on its own",
                len(calls),
                error,
            )
            failed = _each(calls, channel_layer)
    given_up = []
    for call, _ in failed:
        try:
            apply([call], channel_layer=channel_layer)
        except OUTAGE:
            raise
        except DatabaseError as again:
            logger.error("presence: gave up %r: %s", call, again)
            given_up.append(call)
    joins = [(c.room, c.channel_name) for c in given_up if isinstance(c, Join)]
    if joins:
        # The socket side put them in the groups: out, unless a row says
        # otherwise (an earlier join of the same socket and room).
        broadcast.settle_or_retry(groups.get_layer(channel_layer), [], joins)
    return given_up


def _each(
    calls: Sequence[Call], channel_layer: BaseChannelLayer | None
) -> list[tuple[Call, DatabaseError]]:
    """Apply each call on its own; return those that failed, with their errors."""
    failed = []
    for call in calls:
        try:
            apply([call], channel_layer=channel_layer)
        except OUTAGE:
            raise
        except DatabaseError as error:
            failed.append((call, error))
    return failed


def remove(
    presences: QuerySet[Presence], *, channel_layer: BaseChannelLayer | None = None
) -> list[Presence]:
    """Take the sockets of ``presences`` out of their rooms; return those removed.

    A constant number of queries however many rooms; one ``removed`` signal
    per presence; their diffs give the reason ``removed``.
    """
    return changes.remove(presences, protocol.REMOVED, channel_layer=channel_layer)


def remove_user(
    user: Any,
    *,
    using: str | None = None,
    channel_layer: BaseChannelLayer | None = None,
) -> list[Presence]:
    """Take every socket of ``user`` out of its rooms; return the presences removed.

    What deleting a user does first (``receivers``), in the transaction that
    deletes it, on its database (``using``): as :func:`remove`, one change
    set per room, but the diffs' leaves and ``user_left_room`` give the
    reason ``user_deleted``. The user's row is left to the caller; where the
    database can, it stays locked until the caller's transaction ends, so that
    no join of the user commits behind the removal.
    """
    _, presence_model = _models()
    db = using or router.db_for_write(presence_model)
    presences = presence_model.objects.using(db).filter(user_id=user.pk)
    # Inside the delete's transaction, whose failure this is: no savepoint.
    with transaction.atomic(using=db, savepoint=False):
        removed = changes.remove(
            presences, protocol.USER_DELETED, channel_layer=channel_layer
        )
        if connections[db].features.has_select_for_update:
            # A join of the user that another worker commits now, in a room
            # the removal did not lock, would be deleted by the cascade with
            # no change set. Once the user's row is locked, a join's
            # foreign key check waits for it (and fails if the user goes);
            # those that committed before are removed here. The room locks
            # come first, as in a join, whose check comes at its commit.
            # (SQLite lets one transaction write at a time.)
            locked = get_user_model()._base_manager.using(db).select_for_update()
            list(locked.filter(pk=user.pk).values_list("pk", flat=True))
            removed += changes.remove(
                presences, protocol.USER_DELETED, channel_layer=channel_layer
            )
    return removed


def stale_presences(
    age: float | None = None, presences: QuerySet[Presence] | None = None
) -> QuerySet[Presence]:
    """The presences (of ``presences``, else all) not seen for ``age`` seconds."""
    cutoff = clock.stale_before(age)
    if presences is None:
        _, presence_model = _models()
        presences = presence_model.objects.all()
    return presences.filter(last_seen__lt=cutoff)


def prune_presences(
    age: float | None = None,
    *,
    presences: QuerySet[Presence] | None = None,
    channel_layer: BaseChannelLayer | None = None,
    reason: str = protocol.EXPIRED_REASON,
) -> list[Presence]:
    """Remove the stale presences (of ``presences``, else all); return them.

    A constant number of queries however many rooms. After commit, the stale
    sockets are told (``presence.expired``, so a live one can join again),
    then they leave the room's groups, then one ``bulk_change`` signal per
    room is sent, and one diff per room whose leaves give ``reason``.
    """
    stale = stale_presences(age, presences)
    return changes.remove(
        stale, reason, notify=True, bulk=True, channel_layer=channel_layer
    )


def prune_stale(age: float | None = None) -> int:
    """:func:`prune_presences` of every presence, returning how many it removed.

    What beat's prune task runs: it builds no model instance of what it
    removes (unless ``presence_changed`` has receivers), which a prune of
    tens of thousands would otherwise spend most of its time on.
    """
    return changes.remove_counted(
        stale_presences(age), protocol.EXPIRED_REASON, notify=True, bulk=True
    )


def send_beacons(
    within: float, *, channel_layer: BaseChannelLayer | None = None
) -> int:
    """``presence.version`` to every room changed in the last ``within`` seconds.

    A client that missed a diff (a lost message, a failed send) sees that it
    is behind, and syncs. Returns how many rooms were told.
    """
    room_model, _ = _models()
    since = timezone.now() - timedelta(seconds=within)
    rooms = list(
        room_model.objects.filter(changed_at__gte=since).values_list(
            "channel_name", "version"
        )
    )
    broadcast.send_beacons(groups.get_layer(channel_layer), rooms)
    return len(rooms)


def read_state(room_name: str) -> dict[str, Any]:
    """The room's ``presence.state`` frame now, read in one snapshot.

    One statement gives the version, the counts and the members together; a
    room that does not exist (yet) is empty at version 0.
    """
    room_name = validation.room_name(room_name)
    room_model, _ = _models()
    rooms = room_model.objects.filter(channel_name=room_name)
    head = rooms.values_list("version", "users", "visitors", "sockets", "listed")
    found = head.first()
    if found is None:
        return protocol.state(room_name, 0, [], Counts())
    version, users, visitors, sockets, listed = found
    if not listed:
        counts = Counts(users, visitors, sockets)
        return protocol.state(room_name, version, None, counts)
    fields = broadcast.member_fields()
    rows = rooms.values_list(
        "version",
        "users",
        "visitors",
        "sockets",
        "listed",
        "presence__key",
        "presence__ref",
        "presence__joined_at",
        "presence__user_id",
        *("presence__user__" + path for path in fields.values()),
    )
    entries = []
    for row in rows:
        version, users, visitors, sockets, listed = row[:5]
        key, ref, joined_at, user_id, *values = row[5:]
        if key is None:
            continue
        user = None
        if user_id is not None:
            user = dict(zip(fields, map(broadcast.plain, values), strict=True))
        entries.append(Entry(key, user, protocol.meta(ref, joined_at)))
    counts = Counts(users, visitors, sockets)
    return protocol.state(room_name, version, entries if listed else None, counts)


def empty_rooms() -> QuerySet[Room]:
    """The rooms that have no presence."""
    room_model, presence_model = _models()
    return room_model.objects.filter(
        ~Exists(presence_model.objects.filter(room=OuterRef("pk")))
    )


def prune_rooms() -> list[str]:
    """Delete the rooms that have no presence; return their names, sorted."""
    room_model, _ = _models()
    with transaction.atomic(using=router.db_for_write(room_model)):
        # One DELETE ... RETURNING that checks emptiness as it deletes.
        # QuerySet.delete() would first read the rooms, then cascade to their
        # presences by room id, deleting a presence that joined in between
        # without a signal or group discard.
        empty = empty_rooms().using(router.db_for_write(room_model))
        deleted = sql.delete_returning(empty, ["channel_name"])
    return sorted(name for (name,) in deleted)


def forget_departures() -> int:
    """Forget the departures older than :func:`departure_retention`; return how many."""
    cutoff = timezone.now() - timedelta(seconds=departure_retention())
    departures = apps.get_model("channels_presence", "Departure").objects
    deleted: int = departures.filter(left_at__lt=cutoff).delete()[0]
    return deleted


def departure_retention() -> float:
    """Seconds a departure is remembered: DEPARTURE_RETENTION times MAX_AGE.

    A join that arrives later than that is older than MAX_AGE: its presence
    is stale when it is written, and the next prune removes it.
    """
    return DEPARTURE_RETENTION * conf.MAX_AGE


def _models() -> tuple[type[Room], type[Presence]]:
    # Looked up at call time: models import the managers, which import us.
    return (
        apps.get_model("channels_presence", "Room"),
        apps.get_model("channels_presence", "Presence"),
    )
