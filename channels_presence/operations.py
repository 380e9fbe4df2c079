"""The presence operations: join, leave, remove, touch and the two prunes.

Each exists once, here. The managers and querysets, the model methods, their
``a``-prefixed async twins, the management commands and the admin all call
these functions.

Every operation is a database transaction first, and Django's transactions are
synchronous, so the operations are synchronous; async callers reach them through
``database_sync_to_async``. What must happen in the channel layer happens around
the transaction, in an order that never leaves a presence row for a socket that
is not in its room's group:

* joining puts the socket in the group *before* the row is written, and takes
  it out again if the write fails;
* leaving and pruning delete rows first and drop the sockets from their groups
  *after* commit, together with presence_changed and the broadcast. A prune
  tells the stale sockets first (``presence.expired``), so that a live one can
  join again.

Nothing is written before every argument has been checked.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, cast, overload

from channels.layers import BaseChannelLayer
from django.apps import apps
from django.conf import settings
from django.db import (
    DatabaseError,
    IntegrityError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import Exists, OuterRef, QuerySet
from django.db.models.deletion import Collector
from django.utils import timezone

from . import broadcast, clock, groups, validation
from .broadcast import Change
from .conf import conf
from .signals import presence_changed

if TYPE_CHECKING:
    from .models import Departure, Presence, Room

logger = logging.getLogger("channels_presence")

# Rows or sockets named per query: bounded so that SQLite's limit on query
# parameters is never reached, however many presences a prune removes.
DELETE_BATCH = 10_000

# The advisory lock that each socket's lock is held under (PostgreSQL).
EVERY_SOCKET = 0x6368616E6E656C73  # "channels"

# Departures are remembered for this many times MAX_AGE (ten minutes by default).
DEPARTURE_RETENTION = 10


@overload
def join(
    room_name: str,
    channel_name: str,
    user: Any = None,
    *,
    at: None = None,
    subscribe: bool = False,
    channel_layer: BaseChannelLayer | None = None,
    server: str = "",
) -> Room: ...


@overload
def join(
    room_name: str,
    channel_name: str,
    user: Any = None,
    *,
    at: datetime | None,
    subscribe: bool = False,
    channel_layer: BaseChannelLayer | None = None,
    server: str = "",
) -> Room | None: ...


def join(
    room_name: str,
    channel_name: str,
    user: Any = None,
    *,
    at: datetime | None = None,
    subscribe: bool = False,
    channel_layer: BaseChannelLayer | None = None,
    server: str = "",
) -> Room | None:
    """Put a socket in a room, as ``user`` (anonymous when None), and return the room.

    A socket already in the room keeps its row: its user is updated when it
    differs (a real change, announced as ``added``), else it only counts as a
    touch. ``subscribe`` also puts the socket in the room's events group.

    ``at`` is when the socket joined, by its server's clock. Given, the join is
    ordered against the socket's leaves: if the socket left this room, or every
    room, at or after ``at``, the join is late and changes nothing (returns
    None). Without ``at`` the join happens now, unconditionally.

    ``server`` is the id of the server process the socket is on (see
    ``leases``): its presence goes when that server's lease does.
    """
    room_name = validation.room_name(room_name)
    channel_name = validation.channel_name(channel_name)
    user_id = validation.user_id(user)
    server = validation.server(server)
    layer = groups.get_layer(channel_layer)
    moment = clock.moment(at)
    in_caller_transaction = transaction.get_connection().in_atomic_block
    grouped = False
    try:
        # A concurrent prune_rooms can delete the room between our read and
        # our insert; the foreign key then fails at commit, and one retry
        # recreates it.
        for attempt in (1, 2):
            try:
                with transaction.atomic():
                    _lock_socket(channel_name)
                    if at is not None and _departed(room_name, channel_name, moment):
                        return None
                    if not grouped:
                        # In the group before the row exists (invariant 2),
                        # and under the socket's lock, so that a leave
                        # ordered after this join discards after this add.
                        groups.run_sync(
                            groups.join,
                            layer,
                            room_name,
                            channel_name,
                            subscribe=subscribe,
                        )
                        grouped = True
                    room, changes = _write_join(
                        room_name, channel_name, user, user_id, moment, server
                    )
                break
            except IntegrityError:
                if attempt == 2 or in_caller_transaction:
                    raise
    except BaseException:
        # Undo the group add, unless the socket was already in the room: its
        # row is still there, and must keep its group membership.
        if grouped and not _is_present(room_name, channel_name):
            groups.run_sync(groups.leave, layer, [(room_name, channel_name)])
        raise
    if changes:
        _on_commit(partial(_after_commit, layer, changes))
    return room


def _write_join(
    room_name: str,
    channel_name: str,
    user: Any,
    user_id: int | None,
    at: datetime,
    server: str,
) -> tuple[Room, list[Change]]:
    room_model, presence_model = _models()
    room, _ = room_model.objects.get_or_create(channel_name=room_name)
    presence, created = presence_model.objects.get_or_create(
        room=room,
        channel_name=channel_name,
        defaults={
            "user_id": user_id,
            "last_seen": at,
            "joined_at": at,
            "server": server,
        },
    )
    # A join older than the one that made the row (a late or repeated task)
    # must not undo what the newer one wrote.
    newer = not created and at >= presence.joined_at
    changed = created or (newer and presence.user_id != user_id)
    if changed and not created:
        presence.user_id = user_id
        presence.last_seen = max(presence.last_seen, at)
        presence.joined_at = at
        presence.server = server
        presence.save(update_fields=["user", "last_seen", "joined_at", "server"])
    elif newer:
        presence_model.objects.filter(pk=presence.pk).update(
            joined_at=at, server=server
        )
        _touch(presence_model.objects.filter(pk=presence.pk), at)
    if user_id is not None and presence.user_id == user_id:
        presence.user = user
    return room, [Change(room, added=presence)] if changed else []


def _is_present(room_name: str, channel_name: str) -> bool:
    """Whether the socket has a row in the room; False when that cannot be told."""
    _, presence_model = _models()
    presences = presence_model.objects.filter(
        room__channel_name=room_name, channel_name=channel_name
    )
    try:
        present: bool = presences.exists()
    except DatabaseError:
        return False
    return present


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
    room_name = validation.room_name(room_name)
    channel_name = validation.channel_name(channel_name)
    layer = groups.get_layer(channel_layer)
    _, presence_model = _models()
    presences = presence_model.objects.filter(
        room__channel_name=room_name, channel_name=channel_name
    )
    stays = False
    with transaction.atomic():
        _lock_socket(channel_name)
        if at is not None:
            moment = clock.moment(at)
            _remember_departure(channel_name, room_name, moment)
            stays = presences.filter(joined_at__gt=moment).exists()
            presences = presences.filter(joined_at__lte=moment)
        removed = _delete(presences)
    departed = [] if stays else [(room_name, channel_name)]
    _after_removal(layer, removed, departed)
    return removed[0] if removed else None


def remove(
    presences: QuerySet[Presence], *, channel_layer: BaseChannelLayer | None = None
) -> list[Presence]:
    """Take the sockets of ``presences`` out of their rooms; return those removed.

    A constant number of queries however many rooms; one ``removed`` signal
    per presence.
    """
    layer = groups.get_layer(channel_layer)
    removed = _delete(presences)
    _after_removal(layer, removed)
    return removed


def leave_all(
    channel_name: str,
    *,
    at: datetime | None = None,
    channel_layer: BaseChannelLayer | None = None,
) -> list[Presence]:
    """Take a socket out of every room it is in; return the presences removed.

    ``at`` orders the leave against the socket's joins, as for :func:`leave`.
    """
    channel_name = validation.channel_name(channel_name)
    layer = groups.get_layer(channel_layer)
    _, presence_model = _models()
    presences = presence_model.objects.filter(channel_name=channel_name)
    with transaction.atomic():
        _lock_socket(channel_name)
        if at is not None:
            moment = clock.moment(at)
            _remember_departure(channel_name, "", moment)
            presences = presences.filter(joined_at__lte=moment)
        removed = _delete(presences)
    _after_removal(layer, removed)
    return removed


def _after_removal(
    layer: BaseChannelLayer,
    removed: list[Presence],
    departed: Sequence[tuple[str, str]] = (),
) -> None:
    pairs = {(p.room.channel_name, p.channel_name) for p in removed} | set(departed)
    changes = [Change(presence.room, removed=presence) for presence in removed]
    _on_commit(partial(_after_commit, layer, changes, departed=sorted(pairs)))


def _lock_socket(channel_name: str) -> None:
    """Serialize the joins and leaves of one socket, until the transaction ends.

    Without it, a join and a leave of one socket run by two workers at once
    could each miss the other's uncommitted row. PostgreSQL takes an advisory
    lock, under a shared hold of the lock of every socket (see
    :func:`_lock_every_socket`); SQLite already lets one writer in at a time.
    """
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        # Evaluated in order: the shared lock first, as everywhere, so that
        # no two transactions wait for each other's locks.
        cursor.execute(
            "SELECT pg_advisory_xact_lock_shared(%s), pg_advisory_xact_lock(%s)",
            [EVERY_SOCKET, _lock_key(channel_name)],
        )


def _lock_every_socket() -> None:
    """Wait until no socket's join or leave is running, and hold them off.

    For the group discards of a removal of many sockets (a prune), which
    cannot take thousands of socket locks at once.
    """
    connection = transaction.get_connection()
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [EVERY_SOCKET])


def _lock_key(name: str) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _departed(room_name: str, channel_name: str, at: datetime) -> bool:
    """Whether the socket left the room, or every room, at or after ``at``."""
    found: bool = (
        _departures()
        .filter(
            channel_name=channel_name,
            room_channel_name__in=[room_name, ""],
            left_at__gte=at,
        )
        .exists()
    )
    return found


def _remember_departure(channel_name: str, room_name: str, at: datetime) -> None:
    departure, created = _departures().get_or_create(
        channel_name=channel_name, room_channel_name=room_name, defaults={"left_at": at}
    )
    if not created and departure.left_at < at:
        _departures().filter(pk=departure.pk).update(left_at=at)


def forget_departures() -> int:
    """Forget the departures older than :func:`departure_retention`; return how many."""
    cutoff = timezone.now() - timedelta(seconds=departure_retention())
    old = _departures().filter(left_at__lt=cutoff)
    deleted: int = old._raw_delete(router.db_for_write(old.model))
    return deleted


def departure_retention() -> float:
    """Seconds a departure is remembered: DEPARTURE_RETENTION times MAX_AGE.

    A join that arrives later than that is older than MAX_AGE: its presence
    is stale when it is written, and the next prune removes it.
    """
    return DEPARTURE_RETENTION * conf.MAX_AGE


def touch(channel_names: Iterable[str], *, at: datetime | None = None) -> int:
    """Mark the sockets as seen at ``at`` (now when None); return rows updated.

    One UPDATE on the indexed socket column. It never moves ``last_seen``
    backwards and never creates a presence.
    """
    names = validation.channel_names(channel_names)
    _, presence_model = _models()
    presences = presence_model.objects.filter(channel_name__in=names)
    return _touch(presences, clock.moment(at))


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
) -> list[Presence]:
    """Remove the stale presences (of ``presences``, else all); return them.

    A constant number of queries however many rooms. After commit, each room
    that lost presences gets one ``presence.expired`` notice naming its stale
    sockets (so a live one can join again), then the sockets leave the room's
    groups, then one ``bulk_change`` signal per room is sent.
    """
    stale = stale_presences(age, presences)
    layer = groups.get_layer(channel_layer)
    removed = _delete(stale)
    by_room: dict[int, list[Presence]] = {}
    for presence in removed:
        by_room.setdefault(presence.room_id, []).append(presence)
    notices = [
        broadcast.expired(gone[0].room, [p.channel_name for p in gone])
        for gone in by_room.values()
    ]
    departed = [(p.room.channel_name, p.channel_name) for p in removed]
    changes = [Change(gone[0].room, bulk_change=True) for gone in by_room.values()]
    _on_commit(
        partial(_after_commit, layer, changes, departed=departed, notices=notices)
    )
    return removed


def empty_rooms() -> QuerySet[Room]:
    """The rooms that have no presence."""
    room_model, presence_model = _models()
    return room_model.objects.filter(
        ~Exists(presence_model.objects.filter(room=OuterRef("pk")))
    )


def prune_rooms() -> list[str]:
    """Delete the rooms that have no presence; return their names, sorted."""
    room_model, _ = _models()
    with transaction.atomic():
        empty = empty_rooms()
        names = sorted(empty.values_list("channel_name", flat=True))
        if not names:
            return []
        # One DELETE that checks emptiness again. QuerySet.delete() would first
        # read the rooms, then cascade to their presences by room id, deleting
        # a presence that joined in between without a signal or group discard.
        using = router.db_for_write(room_model)
        deleted = empty.filter(channel_name__in=names)._raw_delete(using)
        if deleted != len(names):
            kept = set(
                room_model.objects.filter(channel_name__in=names).values_list(
                    "channel_name", flat=True
                )
            )
            names = [name for name in names if name not in kept]
    return names


def _delete(presences: QuerySet[Presence]) -> list[Presence]:
    """Delete ``presences`` in one transaction and return them, pk intact.

    The presences are built from plain rows, their rooms and users read in
    one query each: a queryset's per-row machinery (``select_related``) was
    most of a prune's time, measured.
    """
    _, presence_model = _models()
    meta = presence_model._meta
    names = [field.attname for field in meta.concrete_fields]
    # Locking the rows first (PostgreSQL) makes each removal happen exactly
    # once when a leave, a prune and a touch race for the same presence: the
    # lock waits for the others and checks the filter again on what they left.
    locked = presences.select_for_update(of=("self",))
    using = locked.db
    with transaction.atomic(using=using):
        if Collector(using, origin=None).can_fast_delete(locked):
            rows = _delete_returning(locked, names)
        else:
            # pre_delete or post_delete receivers, or rows that cascade:
            # QuerySet.delete() runs them.
            rows = list(locked.values_list(*names))
            pk = names.index(meta.pk.attname)
            for start in range(0, len(rows), DELETE_BATCH):
                batch = [row[pk] for row in rows[start : start + DELETE_BATCH]]
                presence_model.objects.filter(pk__in=batch).delete()
    removed = sorted(
        (presence_model.from_db(using, names, row) for row in rows),
        key=lambda presence: presence.pk,
    )
    _attach(removed, "room", using)
    _attach(removed, "user", using)
    return removed


def _delete_returning(locked: QuerySet[Presence], names: list[str]) -> list[Any]:
    """``DELETE ... RETURNING`` the rows of ``locked``: one statement."""
    meta = locked.model._meta
    connection = connections[locked.db]
    quote = connection.ops.quote_name
    fields = [cast("models.Field[Any, Any]", meta.get_field(name)) for name in names]
    # On PostgreSQL, timestamps as microseconds since the epoch: psycopg reads
    # a bigint in C, while Django reads a timestamptz in Python whenever the
    # server's TimeZone is not exactly "UTC" (Debian's is "Etc/UTC"), and
    # that was most of the time spent reading a prune's rows, measured.
    in_epoch = {
        number
        for number, field in enumerate(fields)
        if connection.vendor == "postgresql"
        and settings.USE_TZ
        and field.get_internal_type() == "DateTimeField"
    }
    columns = [
        f"(EXTRACT(EPOCH FROM {quote(field.column)}) * 1000000)::bigint"
        if number in in_epoch
        else quote(field.column)
        for number, field in enumerate(fields)
    ]
    compiler = locked.values("pk").query.get_compiler(locked.db)
    select, params = compiler.as_sql()
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {quote(meta.db_table)} WHERE {quote(meta.pk.column)}"
            f" IN ({select}) RETURNING {', '.join(columns)}",
            params,
        )
        rows: list[Any] = cursor.fetchall()
    if in_epoch:
        rows = [
            [
                _EPOCH + timedelta(microseconds=value)
                if number in in_epoch and value is not None
                else value
                for number, value in enumerate(row)
            ]
            for row in rows
        ]
    # What a queryset does to each other value read (e.g. SQLite's datetimes).
    converters = {
        number: converter
        for number, converter in compiler.get_converters(
            [field.get_col(meta.db_table) for field in fields]
        ).items()
        if number not in in_epoch
    }
    if converters:
        rows = list(compiler.apply_converters(rows, converters))
    return rows


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _attach(presences: list[Presence], name: str, using: str) -> None:
    """Cache each presence's ``name`` object (None if none), as select_related.

    One query for all of them, in batches of DELETE_BATCH ids.
    """
    if not presences:
        return
    field = cast("models.ForeignKey[Any, Any]", presences[0]._meta.get_field(name))
    ids = sorted({getattr(p, field.attname) for p in presences} - {None})
    model = cast("type[models.Model]", field.related_model)
    found: dict[Any, Any] = {}
    for start in range(0, len(ids), DELETE_BATCH):
        batch = ids[start : start + DELETE_BATCH]
        found.update(
            (obj.pk, obj)
            for obj in model._base_manager.using(using).filter(pk__in=batch)
        )
    for presence in presences:
        field.set_cached_value(presence, found.get(getattr(presence, field.attname)))


def _on_commit(work: Callable[[], None]) -> None:
    # Outside a transaction the work runs now, and a channel layer that is
    # down raises to the caller. Inside the caller's transaction it runs at
    # their commit, where raising would skip their own on_commit callbacks:
    # there Django logs the failure instead.
    def after_commit() -> None:
        # A plain function: Django names a failed robust callback by its
        # __qualname__, which a functools.partial lacks.
        work()

    robust = transaction.get_connection().in_atomic_block
    transaction.on_commit(after_commit, robust=robust)


def _after_commit(
    layer: BaseChannelLayer,
    changes: list[Change],
    departed: Sequence[tuple[str, str]] = (),
    notices: Sequence[tuple[str, dict[str, Any]]] = (),
) -> None:
    """Fire presence_changed for each change, then update the channel layer."""
    room_model, _ = _models()
    with broadcast.collecting() as collected:
        for change in changes:
            responses = presence_changed.send_robust(
                sender=room_model,
                room=change.room,
                added=change.added,
                removed=change.removed,
                bulk_change=change.bulk_change,
            )
            for receiver, response in responses:
                if isinstance(response, Exception):
                    logger.error(
                        "presence_changed receiver %r failed",
                        receiver,
                        exc_info=response,
                    )
    messages = broadcast.messages(collected)
    if departed:
        # Another worker may have applied a newer join of a departed socket
        # since our commit, group add included: discarding it now would leave
        # that presence outside its group for good. Check and discard under
        # the socket's lock (or every socket's, for many), which a join holds
        # from its group add to its commit.
        with transaction.atomic():
            sockets = sorted({channel_name for _, channel_name in departed})
            if len(sockets) == 1:
                _lock_socket(sockets[0])
            else:
                _lock_every_socket()
            departed = _still_gone(departed, sockets)
            groups.run_sync(groups.apply, layer, departed, messages, notices=notices)
    elif notices or messages:
        groups.run_sync(groups.apply, layer, departed, messages, notices=notices)


def _still_gone(
    departed: Sequence[tuple[str, str]], sockets: list[str]
) -> list[tuple[str, str]]:
    """The (room, socket) pairs of ``departed`` that have no presence again."""
    _, presence_model = _models()
    presences = presence_model.objects.all()
    connection = connections[presences.db]
    if connection.vendor == "postgresql":
        # One array parameter for any number of sockets: an IN list of tens
        # of thousands costs more to build and send than the lookup itself.
        column = connection.ops.quote_name(presence_model._meta.db_table) + "."
        column += connection.ops.quote_name("channel_name")
        chunks = [presences.extra(where=[f"{column} = ANY(%s)"], params=[sockets])]
    else:
        chunks = [
            presences.filter(channel_name__in=sockets[start : start + DELETE_BATCH])
            for start in range(0, len(sockets), DELETE_BATCH)
        ]
    back: set[tuple[str, str]] = set()
    for chunk in chunks:
        back.update(chunk.values_list("room__channel_name", "channel_name"))
    return [pair for pair in departed if pair not in back]


def _touch(presences: QuerySet[Presence], at: datetime) -> int:
    return presences.filter(last_seen__lt=at).update(last_seen=at)


def _departures() -> models.Manager[Departure]:
    departures: models.Manager[Departure] = apps.get_model(
        "channels_presence", "Departure"
    ).objects
    return departures


def _models() -> tuple[type[Room], type[Presence]]:
    # Looked up at call time: models import the managers, which import us.
    return (
        apps.get_model("channels_presence", "Room"),
        apps.get_model("channels_presence", "Presence"),
    )
