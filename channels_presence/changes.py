"""Change sets: many joins and leaves applied at once, one change set per room.

Every path that changes presences comes here: a batch of socket calls (join,
leave, leave every room), ordered by when they happened on their sockets; or a
removal of presences chosen by a query (a prune, a crashed server's sockets,
the admin). In one transaction, with a number of queries that does not grow
with the number of calls or rooms, it

1. takes the locks, in the order ``locks`` describes: the sockets of the
   calls, then the rows of the rooms they change (made first if new);
2. reads what those sockets have, and the departures that order late joins;
3. plays the calls in order against that, in memory: a join older than the
   socket's departure changes nothing, a leave older than a join leaves it
   (invariant 1);
4. writes the difference: presences deleted, departures and presences
   upserted, each in one statement, then counts each changed member key's
   sockets, which decides who arrived and who left (invariant 8);
5. moves each changed room's counts, version (by exactly one), listing and
   ``changed_at``, in one statement;
6. reads the state of each room that a subscribed socket joined and that
   this process does not know, once per room, in the same transaction as
   its version.

After commit, with no lock held, ``broadcast.deliver`` puts the sockets that
joined in the rooms' groups and takes those that left out (invariant 2), then
sends the signals and the frames, then checks those groups against the rows.

On PostgreSQL (``sql.atomic``) steps 1 and 2 are one round trip with the
transaction's BEGIN, step 4 a second, and step 5 a third with its COMMIT
(unless step 6 must read): a lone join waits for each round trip with its
locks held, and is on the path of every join that a room sees. Elsewhere
the statements run one after another, in Django's ``atomic()``.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from channels.layers import BaseChannelLayer
from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import models, router
from django.db.models import F, QuerySet
from django.db.models.deletion import Collector
from django.utils import timezone

from . import broadcast, clock, groups, locks, protocol, sql
from .conf import conf
from .protocol import Counts, Entry
from .signals import presence_changed

if TYPE_CHECKING:
    from .models import Departure, Presence, Room

logger = logging.getLogger("channels_presence")

# The presence columns a change set reads and writes, by attname.
PRESENCE_FIELDS = [
    "id",
    "room_id",
    "channel_name",
    "user_id",
    "last_seen",
    "joined_at",
    "server",
    "key",
    "ref",
    "events",
]
# The departure columns a change set reads.
DEPARTURE_FIELDS = ["channel_name", "room_channel_name", "left_at"]
# Times a join retries making and locking its rooms while prune_rooms deletes them.
ROOM_ATTEMPTS = 5
# Change sets of at most this many calls count their member keys' sockets
# with their locks, so that their writes and the rooms' update are one round
# trip: a lone join or leave waits on each round trip. Larger ones count
# after their writes, by (room, key) values, which PostgreSQL looks up in the
# index even where its statistics are stale (a table that grew fast): by
# pairs found by a subquery, it scanned the table (a batch of 500 in 110,000
# presences took 43 ms).
COUNT_FIRST_CALLS = 8


@dataclass(frozen=True)
class Join:
    """Put a socket in a room: the argument of one ``add_presence``.

    ``at`` is when it happened on the socket (None: now, unconditionally);
    ``events`` which presence events its consumer handles (``protocol``'s
    mask); ``key`` its member key when the socket side knew it (a visitor's
    session), else computed here.
    """

    room: str
    channel_name: str
    user_id: Any = None
    at: datetime | None = None
    events: int = 0
    server: str = ""
    key: str | None = None


@dataclass(frozen=True)
class Leave:
    """Take a socket out of one room."""

    room: str
    channel_name: str
    at: datetime | None = None


@dataclass(frozen=True)
class LeaveAll:
    """Take a socket out of every room it is in."""

    channel_name: str
    at: datetime | None = None


Call = Join | Leave | LeaveAll


@dataclass
class _Row:
    """A presence as the change set sees it: None id for one not yet written."""

    id: int | None
    room: str
    channel_name: str
    user_id: Any
    last_seen: datetime
    joined_at: datetime
    server: str
    key: str
    ref: str
    events: int

    def values(self, room_id: int) -> list[Any]:
        return [
            room_id,
            self.channel_name,
            self.user_id,
            self.last_seen,
            self.joined_at,
            self.server,
            self.key,
            self.ref,
            self.events,
        ]


@dataclass
class Result:
    """What a change set did: the rooms it locked, the presences it added and
    removed, and the joins that came too late (their socket had left)."""

    rooms: dict[str, Room] = field(default_factory=dict)
    removed: list[Presence] = field(default_factory=list)
    added: list[Presence] = field(default_factory=list)
    late: set[int] = field(default_factory=set)


@dataclass
class _Pair:
    """One (room, socket) of a batch: its row before, its row after, and why."""

    before: _Row | None
    after: _Row | None
    reason: str = protocol.LEFT
    # A join was applied to it: the socket is (again) in the room's groups.
    joined: bool = False
    # A leave named it: it leaves the room's groups unless it is still there.
    departed: bool = False
    # The row after is a new one (the old one, if any, is deleted).
    new_row: bool = False


@contextmanager
def _collecting_later() -> Iterator[None]:
    """Hold Python's cycle collector off while a change set is built.

    A change set of tens of thousands of presences makes hundreds of
    thousands of small objects, nearly none of them in a cycle; the collector
    ran over the whole heap again and again meanwhile (almost half of a
    prune's own time, measured). Reference counting still frees them; any
    cycle is collected after.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# Batches of socket calls.


@_collecting_later()
def apply(
    calls: Sequence[Call],
    *,
    channel_layer: BaseChannelLayer | None = None,
    presences: bool = False,
) -> Result:
    """Apply ``calls``, in their order, as one change set per room.

    Each call is assumed checked (``operations`` does that). A join whose
    socket left its room, or every room, at or after its ``at`` changes
    nothing, and its index is in ``Result.late``; a join older than the
    presence's own changes nothing either. The presences added and removed
    are built (as model instances, in ``Result``) when ``presences`` asks
    for them or ``presence_changed`` has receivers; else a batch spends
    nothing on them.
    """
    result = Result()
    if not calls:
        return result
    layer = groups.get_layer(channel_layer)
    _, presence_model = _models()
    sockets = sorted({call.channel_name for call in calls})
    now = timezone.now()
    using = router.db_for_write(presence_model)
    # Each join's key, made once: the locks' round trip counts its sockets.
    calls = [_keyed(call) for call in calls]
    # Group changes left to do once the transaction (and its locks) is over,
    # when it failed (see _apply): (joined, departed).
    left_over: list[tuple[list[Any], list[tuple[str, str]]]] = []
    try:
        return _apply(calls, sockets, layer, now, using, presences, result, left_over)
    finally:
        for joined, departed in left_over:
            # What the layer or the database fails is retried (logged).
            broadcast.settle_or_retry(layer, joined, departed)


def _apply(
    calls: Sequence[Call],
    sockets: list[str],
    layer: BaseChannelLayer,
    now: datetime,
    using: str,
    presences: bool,
    result: Result,
    left_over: list[tuple[list[Any], list[tuple[str, str]]]],
) -> Result:
    room_model, _ = _models()
    with sql.atomic(using) as current:
        read = _lock_and_read(current, calls, sockets)
        rooms = read.rooms
        users = _users({call.user_id for call in calls if isinstance(call, Join)})
        left: dict[tuple[str, str], datetime] = {}
        pairs = _play(calls, read.rows, read.departures, left, users, now, result)
        result.rooms = rooms
        joined = [
            (room, socket, pair.after.events)
            for (room, socket), pair in sorted(pairs.items())
            if pair.joined and pair.after is not None
        ]
        departed = sorted(
            (room, socket)
            for (room, socket), pair in pairs.items()
            if pair.departed and pair.after is None
        )
        try:
            changes = _changes(
                pairs,
                rooms,
                presences=presences or presence_changed.has_listeners(room_model),
            )
            written = _commit(
                current,
                changes,
                rooms,
                layer,
                writes=_writes(current, pairs, rooms, left),
                joined=joined,
                departed=departed,
                users=users,
                members=read.members,
                counted=read.counted,
            )
        except BaseException:
            if current.committed:
                # The rows stand (a bug after COMMIT, before the delivery was
                # set up): so must their groups.
                left_over.append((joined, departed))
            else:
                # The socket side put the sockets in their rooms' groups
                # before it handed their joins over: those new to their
                # rooms leave them again.
                fresh = [(r, s) for r, s, _ in joined if not pairs[r, s].before]
                left_over.append(([], fresh))
            raise
        # Before the deliveries that name them go out, after commit.
        _number(changes, written)
        result.added = [p for change in changes.values() for p in change.added]
        result.removed = [p for change in changes.values() for p in change.removed]
    return result


def _number(
    changes: dict[str, RoomChange], results: list[list[tuple[Any, ...]]]
) -> None:
    """Give the presences added their ids, from the rows that writing them
    returned: (id, room id, socket)."""
    ids = {(room_id, socket): pk for rows in results for pk, room_id, socket in rows}
    for change in changes.values():
        for presence in change.added:
            if presence.pk is None:
                presence.pk = ids[change.room.pk, presence.channel_name]


def _play(
    calls: Sequence[Call],
    rows: dict[tuple[str, str], _Row],
    departures: dict[tuple[str, str], datetime],
    left: dict[tuple[str, str], datetime],
    users: dict[Any, Any],
    now: datetime,
    result: Result,
) -> dict[tuple[str, str], _Pair]:
    """Play ``calls`` in order on the rows; return each named pair's before and after.

    ``departures`` is updated in place with the leaves' times, and the
    changed ones are also put in ``left``.
    """
    pairs: dict[tuple[str, str], _Pair] = {}
    current = dict(rows)
    # The rooms each socket is in, as the calls play out.
    rooms_of: dict[str, set[str]] = {}
    for room, socket in rows:
        rooms_of.setdefault(socket, set()).add(room)

    def pair(room: str, socket: str) -> _Pair:
        found = pairs.get((room, socket))
        if found is None:
            found = pairs[room, socket] = _Pair(rows.get((room, socket)), None)
            found.after = found.before
        return found

    def remove(room: str, socket: str, at: datetime | None) -> None:
        target = pair(room, socket)
        row = target.after
        target.departed = True
        if row is not None and (at is None or row.joined_at <= at):
            target.after = None
            target.new_row = False
            current.pop((room, socket), None)
            rooms_of.get(socket, set()).discard(room)

    for index, call in enumerate(calls):
        at = call.at
        if isinstance(call, Join):
            moment = at if at is not None else now
            # Seen no later than now: a server whose clock runs ahead must
            # not keep its presences from going stale.
            seen = min(moment, now)
            if at is not None and _departed(departures, call, at):
                result.late.add(index)
                continue
            target = pair(call.room, call.channel_name)
            row = target.after
            if row is not None and at is not None and at < row.joined_at:
                # An older join, run late or again: the newer one stands.
                continue
            user_id = call.user_id
            if user_id is not None and user_id not in users:
                logger.warning(
                    "add_presence: user %r does not exist (deleted since the "
                    "socket joined?); the socket joins anonymously",
                    user_id,
                )
                user_id = None
            key = call.key
            if key is None or (user_id is None and protocol.is_user_key(key)):
                # Made by apply(); but a user deleted since joins anonymously.
                key = protocol.member_key(call.room, call.channel_name, user_id)
            if row is None or row.key != key:
                target.new_row = row is None or target.new_row
                row = _Row(
                    id=row.id if row is not None else None,
                    room=call.room,
                    channel_name=call.channel_name,
                    user_id=user_id,
                    last_seen=max(row.last_seen, seen) if row else seen,
                    joined_at=moment,
                    server=call.server,
                    key=key,
                    ref=protocol.presence_ref(call.room, call.channel_name, key),
                    events=call.events,
                )
            else:
                row = _Row(
                    **{
                        **row.__dict__,
                        "joined_at": moment,
                        "last_seen": max(row.last_seen, seen),
                        "server": call.server,
                        "events": call.events,
                    }
                )
            target.after = row
            target.joined = True
            target.departed = False
            current[call.room, call.channel_name] = row
            rooms_of.setdefault(call.channel_name, set()).add(call.room)
        elif isinstance(call, Leave):
            if at is not None:
                _remember(departures, left, call.channel_name, call.room, at)
            remove(call.room, call.channel_name, at)
        else:
            if at is not None:
                _remember(departures, left, call.channel_name, "", at)
            for room in sorted(rooms_of.get(call.channel_name, ())):
                remove(room, call.channel_name, at)
    return pairs


def _departed(
    departures: dict[tuple[str, str], datetime], join: Join, at: datetime
) -> bool:
    """Whether the socket left the room, or every room, at or after ``at``."""
    return any(
        (left := departures.get((join.channel_name, room))) is not None and left >= at
        for room in (join.room, "")
    )


def _remember(
    departures: dict[tuple[str, str], datetime],
    left: dict[tuple[str, str], datetime],
    socket: str,
    room: str,
    at: datetime,
) -> None:
    known = departures.get((socket, room))
    if known is None or known < at:
        departures[socket, room] = left[socket, room] = at


@dataclass
class _Counted:
    """The sockets of each (room id, member key) of ``pairs`` before a change
    set's writes, read under its locks: its joins' pairs, and those of its
    sockets' presences."""

    pairs: set[tuple[int, str]]
    counts: dict[tuple[int, str], int]

    def after(self, changes: Iterable[RoomChange]) -> dict[tuple[int, str], int] | None:
        """The counts once the change sets are written; None if a key they
        change was not counted (a join whose user was deleted since)."""
        counted = {}
        for change in changes:
            for key, delta in change.keys.items():
                pair = (change.room.pk, key)
                if pair not in self.pairs:
                    return None
                counted[pair] = self.counts.get(pair, 0) + delta
        return counted


@dataclass
class _Read:
    """What a change set read under its locks (steps 1 and 2)."""

    #: The locked rooms, by name.
    rooms: dict[str, Room]
    #: The sockets' presences in them, by (room, socket).
    rows: dict[tuple[str, str], _Row]
    #: The sockets' departures, by (socket, room).
    departures: dict[tuple[str, str], datetime]
    #: The members of the listed rooms that sockets join for their state,
    #: by room id, where this process did not know them and read them here.
    members: dict[Any, protocol.Members]
    #: The sockets of the member keys it may change (None: counted after).
    counted: _Counted | None


def _keyed(call: Call) -> Call:
    """A join with its member key made (from its user, else its socket)."""
    if not isinstance(call, Join) or call.key is not None:
        return call
    key = protocol.member_key(call.room, call.channel_name, call.user_id)
    return replace(call, key=key)


def _lock_and_read(
    current: sql.Transaction, calls: Sequence[Call], sockets: list[str]
) -> _Read:
    """Steps 1 and 2: lock the sockets and the rooms, then read what they have.

    The locked rooms by name, the sockets' presences in them, the sockets'
    departures, and the members of the listed rooms that sockets join for
    their state, by room id, where this process did not know them (read
    here, as the change set starts: else a later round trip reads them). On
    PostgreSQL in one round trip, BEGIN included (a lone join waits for each
    one with its locks held); else, or when a room that already existed when
    the join made sure of it was deleted before it was locked (a concurrent
    prune_rooms), one statement after another, as its retries always went,
    and the members are read later. On PostgreSQL, last, the sockets of the
    member keys the change set may change (:class:`_Counted`; None on the
    other path, which counts them after its writes).
    """
    _, presence_model = _models()
    names = {call.room for call in calls if not isinstance(call, LeaveAll)}
    everywhere = sorted({c.channel_name for c in calls if isinstance(c, LeaveAll)})
    joining = {call.room for call in calls if isinstance(call, Join)}
    connection = current.connection
    using = connection.alias
    if sql.can_combine(connection):
        found = _read_at_once(current, calls, sockets, names, everywhere, joining)
        if found is not None:
            return found
    locks.lock_sockets(sockets)
    if everywhere:
        # The rooms the leave_all sockets are in: those to lock too.
        everyone = presence_model.objects.using(using).all()
        for part in sql.any_of(everyone, "channel_name", everywhere):
            names.update(part.values_list("room__channel_name", flat=True))
    rooms = _lock_rooms(current, names, create=joining)
    presences, departures = _reads(sockets, using)
    results = current.run(presences + departures)
    read = results[: len(presences)], results[len(presences) :]
    return _Read(rooms, *_read(rooms, *read, using), {}, None)


def _read_at_once(
    current: sql.Transaction,
    calls: Sequence[Call],
    sockets: list[str],
    names: set[str],
    everywhere: list[str],
    joining: set[str],
) -> _Read | None:
    """:func:`_lock_and_read` as one round trip of statements (PostgreSQL).

    What the step-by-step reads do, in the same lock order: the socket locks,
    the new rooms, the rooms locked in name order (with those that the
    leave_all sockets are in, found by a subquery here), then every presence
    of the sockets (those in rooms not locked are dropped here, not by the
    query), their departures, the sockets of the member keys that the change
    set may change (so that its writes and the rooms' update can be one round
    trip), and the members of the rooms that subscribed sockets join and this
    process does not know. None if a room that already existed was deleted
    between the upsert and its lock (a committed prune_rooms).
    """
    room_model, presence_model = _models()
    connection = current.connection
    using = connection.alias
    quote = connection.ops.quote_name

    def columns(model: type[models.Model], attnames: Sequence[str]) -> str:
        meta = model._meta
        return ", ".join(
            f"{quote(meta.db_table)}.{quote(cast(Any, meta.get_field(name)).column)}"
            for name in attnames
        )

    room_fields = [field.attname for field in room_model._meta.concrete_fields]
    room_table = quote(room_model._meta.db_table)
    statements: list[sql.Statement] = []
    lock = locks.sockets_statement(sockets)
    if lock is not None:
        statements.append(lock)
    if joining:
        statements += _new_rooms(sorted(joining), using)
    where = f"{columns(room_model, ['channel_name'])} = ANY(%s)"
    params: list[Any] = [sorted(names)]
    if everywhere:
        where += (
            # ANY(ARRAY(...)): the subquery runs once and both sides of the
            # OR use an index (an IN subquery under an OR is a filter, a scan).
            f" OR {columns(room_model, ['id'])} = ANY(ARRAY(SELECT "
            f"{columns(presence_model, ['room_id'])} FROM "
            f"{quote(presence_model._meta.db_table)} WHERE "
            f"{columns(presence_model, ['channel_name'])} = ANY(%s)))"
        )
        params.append(everywhere)
    room_at = len(statements)
    statements.append(
        (
            f"SELECT {columns(room_model, room_fields)} FROM {room_table} "
            f"WHERE {where} ORDER BY {columns(room_model, ['channel_name'])} "
            "FOR UPDATE",
            params,
        )
    )
    presences, departures = _reads(sockets, using)
    # The sockets of each member key that the change set may change, in its
    # room: each join's, and each of the sockets' presences'. By pairs, so
    # that each is a lookup in the (room, key) index, whatever the room's size.
    presence_table = quote(presence_model._meta.db_table)
    room_id, key, socket = (
        quote(cast(Any, presence_model._meta.get_field(name)).column)
        for name in ("room", "key", "channel_name")
    )
    joins = sorted({(c.room, c.key) for c in calls if isinstance(c, Join) and c.key})
    count_first = len(calls) <= COUNT_FIRST_CALLS
    counted: list[sql.Statement] = []
    if count_first:
        counted.append(
            (
                f"SELECT p.{room_id}, p.{key}, COUNT(*) FROM {presence_table} AS p "
                f"WHERE (p.{room_id}, p.{key}) IN (SELECT "
                f"{columns(room_model, ['id'])}, j.key FROM {room_table} JOIN "
                "unnest(%s::varchar[], %s::varchar[]) AS j(room, key) ON "
                f"{columns(room_model, ['channel_name'])} = j.room UNION SELECT "
                f"q.{room_id}, q.{key} FROM {presence_table} AS q WHERE "
                f"q.{socket} = ANY(%s)) GROUP BY 1, 2",
                [[room for room, _ in joins], [key for _, key in joins], sockets],
            )
        )
    stating = sorted(
        {
            call.room
            for call in calls
            if isinstance(call, Join) and call.events & protocol.STATE_EVENTS
        }
    )
    unknown = [name for name in stating if not known.fresh(name)]
    members = _member_statements(unknown, using) if conf.BROADCAST else []
    results = current.run([*statements, *presences, *departures, *counted, *members])
    room_rows = results[room_at]
    at = room_at + 1
    found_presences = results[at : at + len(presences)]
    at += len(presences)
    found_departures = results[at : at + len(departures)]
    at += len(departures)
    counts = {(pk, key): n for pk, key, n in results[at]} if count_first else {}
    found_members = [row for rows in results[at + len(counted) :] for row in rows]
    rooms = {
        room.channel_name: room
        for room in sql.instances(
            room_model,
            using,
            room_fields,
            sql.convert(room_model, using, room_fields, room_rows),
        )
    }
    if not joining <= rooms.keys():
        return None
    read = [rooms[name] for name in unknown if name in rooms and rooms[name].listed]
    rows, departed = _read(rooms, found_presences, found_departures, using)
    return _Read(
        rooms,
        rows,
        departed,
        _members(read, found_members, using) if members else {},
        _Counted(
            {(rooms[room].pk, key) for room, key in joins if room in rooms}
            | {(rooms[row.room].pk, row.key) for row in rows.values()},
            counts,
        )
        if count_first
        else None,
    )


def _new_rooms(names: list[str], using: str) -> list[sql.Statement]:
    """The statement that makes the rooms of ``names`` that do not exist."""
    version = clock.micros()
    return sql.upsert_statements(
        _models()[0],
        using,
        ["channel_name", "version", "users", "visitors", "sockets", "listed"],
        [[name, version, 0, 0, 0, True] for name in names],
        conflict=["channel_name"],
    )


def _lock_rooms(
    current: sql.Transaction, names: Iterable[str], *, create: set[str]
) -> dict[str, Room]:
    """Lock the rooms' rows, sorted by name; make those of ``create`` first.

    A room that prune_rooms deleted between the two is made again.
    """
    room_model, _ = _models()
    wanted = sorted(set(names))
    if not wanted:
        return {}
    using = current.connection.alias
    for _attempt in range(ROOM_ATTEMPTS):
        missing = sorted(create)
        if missing:
            current.run(_new_rooms(missing, using))
        found = {
            room.channel_name: room
            for room in room_model.objects.using(using)
            .select_for_update()
            .filter(channel_name__in=wanted)
            .order_by("channel_name")
        }
        if create <= found.keys():
            return found
        create = create - found.keys()
    raise RuntimeError(
        f"rooms {sorted(create)!r} were deleted {ROOM_ATTEMPTS} times while "
        "being joined"
    )


def _reads(
    sockets: list[str], using: str
) -> tuple[list[sql.Statement], list[sql.Statement]]:
    """Step 2's statements, for either path: the presences of ``sockets``,
    and their departures (each cut at the database's limit on parameters)."""
    _, presence_model = _models()

    def presences(sockets: Any) -> list[QuerySet[Any]]:
        found = presence_model.objects.using(using).order_by()
        return [
            part.values_list(*PRESENCE_FIELDS)
            for part in sql.any_of(found, "channel_name", sockets)
        ]

    def departures(sockets: Any) -> list[QuerySet[Any]]:
        found = _departures().using(using).order_by()
        return [
            part.values_list(*DEPARTURE_FIELDS)
            for part in sql.any_of(found, "channel_name", sockets)
        ]

    return (
        sql.compiled("changes.presences", using, presences, sockets),
        sql.compiled("changes.departures", using, departures, sockets),
    )


def _read(
    rooms: dict[str, Room],
    presences: list[list[tuple[Any, ...]]],
    departures: list[list[tuple[Any, ...]]],
    using: str,
) -> tuple[dict[tuple[str, str], _Row], dict[tuple[str, str], datetime]]:
    """What :func:`_reads` found: the presences in the locked ``rooms``, by
    (room, socket), and the departures, by (socket, room)."""
    _, presence_model = _models()
    by_id = {room.pk: room for room in rooms.values()}
    rows: dict[tuple[str, str], _Row] = {}
    for result in presences:
        for values in sql.convert(presence_model, using, PRESENCE_FIELDS, result):
            row = dict(zip(PRESENCE_FIELDS, values, strict=True))
            # A socket's presences in rooms that this change set does not
            # lock are not its to change.
            room = by_id.get(row.pop("room_id"))
            if room is not None:
                rows[room.channel_name, row["channel_name"]] = _Row(
                    room=room.channel_name, **row
                )
    left: dict[tuple[str, str], datetime] = {}
    model = _departures().model
    for result in departures:
        for socket, room_name, at in sql.convert(
            model, using, DEPARTURE_FIELDS, result
        ):
            left[socket, room_name] = at
    return rows, left


def _writes(
    current: sql.Transaction,
    pairs: dict[tuple[str, str], _Pair],
    rooms: dict[str, Room],
    departures: dict[tuple[str, str], datetime],
) -> list[sql.Statement]:
    """Step 4's statements: delete the presences gone, remember the
    ``departures`` (left at, by (socket, room)), upsert the presences
    written, returning their ids, rooms and sockets.

    With signal receivers or cascades on presences' deletes, the deletes run
    now, through ``QuerySet.delete()``, which runs them.
    """
    _, presence_model = _models()
    using = current.connection.alias
    gone = [
        pair.before.id
        for pair in pairs.values()
        if pair.before is not None
        and pair.before.id is not None
        and (pair.after is None or pair.new_row)
    ]
    statements: list[sql.Statement] = []
    every = presence_model._base_manager.using(using).all()
    if gone and Collector(using, origin=None).can_fast_delete(every):
        statements += sql.delete_statements(presence_model, using, gone)
    elif gone:
        _delete_ids(gone, using)
    written = [
        pair.after
        for pair in pairs.values()
        if pair.after is not None and pair.after != pair.before
    ]
    statements += sql.upsert_statements(
        _departures().model,
        using,
        DEPARTURE_FIELDS,
        [[socket, room, at] for (socket, room), at in sorted(departures.items())],
        conflict=["channel_name", "room_channel_name"],
        keep_latest=["left_at"],
    )
    statements += sql.upsert_statements(
        presence_model,
        using,
        PRESENCE_FIELDS[1:],
        [row.values(rooms[row.room].pk) for row in written],
        conflict=["room_id", "channel_name"],
        replace=["user_id", "joined_at", "server", "key", "ref", "events"],
        keep_latest=["last_seen"],
        returning=["id", "room_id", "channel_name"],
    )
    return statements


# Removals chosen by a query.


def remove(
    presences: QuerySet[Presence],
    reason: str,
    *,
    notify: bool = False,
    bulk: bool = False,
    channel_layer: BaseChannelLayer | None = None,
) -> list[Presence]:
    """Delete ``presences`` as one change set per room; return them, pk intact.

    ``notify`` tells their sockets first (``presence.expired``), ``bulk``
    sends one ``presence_changed(bulk_change=True)`` per room instead of one
    per presence, as a prune does.
    """
    _, removed = _remove(presences, reason, notify, bulk, channel_layer, build=True)
    return removed


def remove_counted(
    presences: QuerySet[Presence],
    reason: str,
    *,
    notify: bool = False,
    bulk: bool = False,
    channel_layer: BaseChannelLayer | None = None,
) -> int:
    """:func:`remove`, returning how many it removed, not the presences.

    No model instance is built for a prune task that only counts them,
    unless ``presence_changed`` has receivers.
    """
    count, _ = _remove(presences, reason, notify, bulk, channel_layer, build=False)
    return count


@_collecting_later()
def _remove(
    presences: QuerySet[Presence],
    reason: str,
    notify: bool,
    bulk: bool,
    channel_layer: BaseChannelLayer | None,
    *,
    build: bool,
) -> tuple[int, list[Presence]]:
    layer = groups.get_layer(channel_layer)
    room_model, presence_model = _models()
    with sql.atomic(presences.db) as current:
        room_ids = set(
            presences.order_by().values_list("room_id", flat=True).distinct()
        )
        if not room_ids:
            return 0, []
        names = room_model.objects.filter(pk__in=room_ids).values_list(
            "channel_name", flat=True
        )
        rooms = _lock_rooms(current, names, create=set())
        by_id = {room.pk: room for room in rooms.values()}
        rows = _delete(presences.filter(room_id__in=list(by_id)))
        gone = [
            _Row(room=by_id[values["room_id"]].channel_name, **_fields(values))
            for values in rows
        ]
        pairs = {
            (row.room, row.channel_name): _Pair(row, None, reason=reason, departed=True)
            for row in gone
        }
        changes = _changes(pairs, rooms, bulk=bulk, presences=False)
        removed: list[Presence] = []
        if build or presence_changed.has_listeners(room_model):
            removed = sql.instances(
                presence_model,
                presences.db,
                list(rows[0]) if rows else [],
                [list(values.values()) for values in rows],
            )
            removed.sort(key=lambda presence: presence.pk)
            for presence in removed:
                room = by_id[presence.room_id]
                type(presence).room.field.set_cached_value(presence, room)
                changes[room.channel_name].removed.append(presence)
        notices = []
        if notify:
            told: dict[str, list[str]] = {}
            for row in sorted(gone, key=lambda row: row.id or 0):
                if row.events & protocol.EXPIRED_EVENTS:
                    told.setdefault(row.room, []).append(row.channel_name)
            notices = sorted(told.items())
        _commit(current, changes, rooms, layer, departed=sorted(pairs), notices=notices)
    return len(gone), removed


def _fields(values: dict[str, Any]) -> dict[str, Any]:
    """A deleted row's values, as a _Row takes them (all but room_id)."""
    return {name: values[name] for name in PRESENCE_FIELDS if name != "room_id"}


def _delete(presences: QuerySet[Presence]) -> list[dict[str, Any]]:
    """Delete ``presences`` and return their rows: ``{attname: value}``.

    One ``DELETE ... RETURNING`` whose rows are locked first (PostgreSQL), so
    that each removal happens once when a leave, a prune and a touch race
    for one presence: the lock waits for the others and checks the filter
    again on what they left. With delete signal receivers or cascades,
    ``QuerySet.delete()`` runs them instead.
    """
    _, presence_model = _models()
    meta = presence_model._meta
    names = [field.attname for field in meta.concrete_fields]
    locked = presences.select_for_update(of=("self",))
    using = locked.db
    if Collector(using, origin=None).can_fast_delete(locked):
        rows = sql.delete_returning(locked, names)
    else:
        rows = list(locked.values_list(*names))
        pk = names.index(meta.pk.attname)
        ids = [row[pk] for row in rows]
        for part in sql.any_of(presence_model.objects.all(), "pk", ids):
            part.delete()
    return [dict(zip(names, row, strict=True)) for row in rows]


def _delete_ids(ids: list[int], using: str) -> None:
    """Delete the presences of ``ids`` through ``QuerySet.delete()``, which
    runs their delete signals' receivers and cascades (else a change set
    deletes them with its other writes: ``sql.delete_statements``)."""
    _, presence_model = _models()
    for part in sql.any_of(presence_model.objects.using(using).all(), "pk", ids):
        part.delete()


# What every change set does with what it changed.


@dataclass
class RoomChange:
    """One room's change set: its entries, its presences added and removed."""

    room: Room
    entries: dict[str, Entry] = field(default_factory=dict)
    # Sockets per member key, after minus before.
    keys: Counter[str] = field(default_factory=Counter)
    # Why each key's last socket to go went.
    reasons: dict[str, str] = field(default_factory=dict)
    added: list[Presence] = field(default_factory=list)
    removed: list[Presence] = field(default_factory=list)
    # Subscribed sockets that joined: each is sent the state.
    joiners: list[str] = field(default_factory=list)
    bulk: bool = False
    start: int = 0
    counts: Counts = field(default_factory=Counts)
    state: dict[str, Any] | None = None
    arrived: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.entries) or bool(self.added) or bool(self.removed)


def _changes(
    pairs: dict[tuple[str, str], _Pair],
    rooms: dict[str, Room],
    *,
    bulk: bool = False,
    presences: bool = True,
) -> dict[str, RoomChange]:
    """Each room's change set, from the pairs' rows before and after.

    ``presences``: build the presences added and removed (for the caller, or
    for presence_changed's receivers); those not written yet have no pk.
    """
    _, presence_model = _models()
    changes: dict[str, RoomChange] = {}
    for (room_name, socket), pair in sorted(pairs.items()):
        before, after = pair.before, pair.after
        if before is None and after is None:
            continue
        room = rooms[room_name]
        change = changes.get(room_name)
        if change is None:
            change = changes[room_name] = RoomChange(room, bulk=bulk)
        replaced = after is None or pair.new_row
        if before is not None and (
            after is None or replaced or after.key != before.key
        ):
            # The presence before is gone, or is another presence now: a
            # socket that joined again as another user keeps its row (and is
            # announced as added, as 1.0.0 did), but not its key and ref.
            change.keys[before.key] -= 1
            if replaced and presences:
                change.removed.append(_presence(presence_model, before, room))
            if after is None or after.ref != before.ref:
                change.entries[before.ref] = Entry(
                    before.key,
                    None,
                    protocol.meta(before.ref, before.joined_at),
                    pair.reason,
                )
                change.reasons[before.key] = pair.reason
        if after is not None and (
            before is None or pair.new_row or after.key != before.key
        ):
            change.keys[after.key] += 1
            if presences:
                change.added.append(_presence(presence_model, after, room))
            change.entries[after.ref] = Entry(
                after.key, None, protocol.meta(after.ref, after.joined_at)
            )
        if (
            after is not None
            and pair.joined
            and after.events & protocol.STATE_EVENTS
            and (
                before is None
                or after.joined_at > before.joined_at
                or after.key != before.key
                or pair.new_row
            )
        ):
            change.joiners.append(socket)
    return {
        name: change
        for name, change in changes.items()
        if change.changed or change.joiners
    }


def _presence(model: type[Presence], row: _Row, room: Room) -> Presence:
    presence = model(
        id=row.id,
        room=room,
        channel_name=row.channel_name,
        user_id=row.user_id,
        last_seen=row.last_seen,
        joined_at=row.joined_at,
        server=row.server,
        key=row.key,
        ref=row.ref,
        events=row.events,
    )
    presence._state.adding = False
    presence._state.db = room._state.db
    return presence


def _commit(
    current: sql.Transaction,
    changes: dict[str, RoomChange],
    rooms: dict[str, Room],
    layer: BaseChannelLayer,
    *,
    writes: Sequence[sql.Statement] = (),
    joined: Sequence[tuple[str, str, int]] = (),
    departed: Sequence[tuple[str, str]] = (),
    notices: Sequence[tuple[str, list[str]]] = (),
    users: dict[Any, Any] | None = None,
    members: dict[Any, protocol.Members] | None = None,
    counted: _Counted | None = None,
) -> list[list[tuple[Any, ...]]]:
    """Write, count, version and describe the change sets; deliver them
    after commit. Returns the rows that ``writes`` returned.

    ``writes``: the change sets' own statements. ``counted``: their member
    keys' sockets before them, read with the locks; then the writes and the
    rooms' update are one round trip. Else the writes go with a count of
    those sockets after them, and the rooms' update follows. ``COMMIT`` goes
    with the rooms' update unless a room's state must be read after it.
    ``users``: users already read in this transaction, by pk (the joins'
    own). ``members``: rooms' members read in it as it started (before the
    change sets), by room id.
    """
    room_model, _ = _models()
    changed = [change for change in changes.values() if change.changed]
    now = timezone.now()
    updated = []
    after = counted.after(changed) if counted is not None else None
    # The writes not run yet, and the rows of those run.
    pending, written = list(writes), []
    if after is None:
        # The keys of every row before and after (more than changed, which
        # the count filters), counted once written.
        wanted = {(change.room.pk, key) for change in changed for key in change.keys}
        counting = _key_count_statements(wanted, current.connection.alias)
        results = current.run([*writes, *counting]) if writes or counting else []
        after = _tally((row for rows in results[len(writes) :] for row in rows), wanted)
        pending, written = [], results[: len(writes)]
    for change in changed:
        room = change.room
        change.start = room.version
        _transitions(change, after)
        if not change.entries:
            change.counts = Counts(room.users, room.visitors, room.sockets)
            continue
        arrived = [protocol.is_user_key(key) for key in change.arrived]
        left = [protocol.is_user_key(key) for key in change.left]
        room.version += 1
        room.users = max(0, room.users + sum(arrived) - sum(left))
        room.visitors = max(0, room.visitors + arrived.count(False) - left.count(False))
        room.sockets = max(0, room.sockets + sum(change.keys.values()))
        change.counts = Counts(room.users, room.visitors, room.sockets)
        room.listed = protocol.is_listed(
            room.listed, change.counts, conf.MAX_LISTED_MEMBERS
        )
        room.changed_at = now
        updated.append(room)
    statements = []
    if updated:
        # One statement for every room, whatever the database's limit on
        # parameters allows (bulk_update would cut it at Django's 999 on SQLite).
        fields = ["version", "users", "visitors", "sockets", "listed", "changed_at"]
        statements = sql.upsert_statements(
            room_model,
            current.connection.alias,
            ["id", "channel_name", *fields],
            [
                [room.pk, room.channel_name] + [getattr(room, f) for f in fields]
                for room in updated
            ],
            conflict=["id"],
            replace=fields,
        )
    named = {
        _user_pk(key)
        for change in changed
        for key in _keys_named(change)
        if protocol.is_user_key(key)
    } | {p.user_id for change in changed for p in change.added + change.removed}
    read = {pk: user for pk, user in (users or {}).items() if pk in named}
    users = {**read, **_users(named - read.keys())}
    _describe(changed, users)
    before, read_first = _known_before(changes, members or {})
    # A room's state that must be read is read after the writes, in the
    # transaction; else COMMIT goes with the rooms' update.
    if any(found is None for found in before.values()):
        ran = current.run([*pending, *statements])
    else:
        ran = current.finish([*pending, *statements])
    written += ran[: len(pending)]
    kept = _members_after(changes, before, read_first)
    deliveries = [_delivery(change, users) for change in changes.values()]
    names = {change.room.pk: change.room.channel_name for change in changes.values()}
    current.on_commit(lambda: known.keep(kept, names))
    broadcast.on_commit(
        current, layer, deliveries, joined=joined, departed=departed, notices=notices
    )
    return written


def _transitions(change: RoomChange, counted: dict[tuple[int, str], int]) -> None:
    """Which member keys arrived (first socket) and left (last socket)."""
    for key, delta in sorted(change.keys.items()):
        if not delta:
            continue
        now = counted.get((change.room.pk, key), 0)
        before = now - delta
        if before <= 0 < now:
            change.arrived.append(key)
        elif now <= 0 < before:
            change.left.append(key)


def _keys_named(change: RoomChange) -> set[str]:
    return {entry.key for entry in change.entries.values()} | set(
        change.arrived + change.left
    )


def _describe(changed: list[RoomChange], users: dict[Any, Any]) -> None:
    """Attach users to the presences, and each entry's member user, as sent."""
    payloads = {pk: broadcast.user_payload(user) for pk, user in users.items()}
    for change in changed:
        for presence in change.added + change.removed:
            type(presence).user.field.set_cached_value(
                presence, users.get(presence.user_id)
            )
        change.entries = {
            ref: Entry(
                entry.key, _payload(payloads, entry.key), entry.meta, entry.reason
            )
            for ref, entry in change.entries.items()
        }


def _known_before(
    changes: dict[str, RoomChange], members: dict[Any, protocol.Members]
) -> tuple[dict[Any, protocol.Members | None], set[Any]]:
    """The members this process knows of each listed room, before the change
    set (None: not known), for :func:`_members_after`; of every room that a
    subscribed socket joined, and every room that the change set changes.
    Known from earlier change sets, or from ``members``, read as this one
    started: the ids of those are the second item."""
    if not conf.BROADCAST:
        return {}, set()
    found: dict[Any, protocol.Members | None] = {}
    read = set()
    for change in changes.values():
        room = change.room
        if room.listed and (change.joiners or change.entries):
            found_now = known.get(room.pk, change.start)
            if found_now is None and room.pk in members:
                found_now = members[room.pk]
                read.add(room.pk)
            if found_now is not None or change.joiners:
                found[room.pk] = found_now
    return found, read


def _members_after(
    changes: dict[str, RoomChange],
    known_before: dict[Any, protocol.Members | None],
    read_before: set[Any],
) -> dict[Any, tuple[int, Any, bool]]:
    """Each joined room's state, built once; the members this process now knows.

    A room whose members this process knows at the version the change set
    started from (it wrote the change set before, and nothing else moved the
    room since: ``known_before``) gets them with the change set applied: no
    read (``read_before``: those whose members were read as it started). The
    others that subscribed sockets joined are read, in one query for all.
    Returns what to keep once the transaction commits: ``{room id:
    (version, members or None, read now)}``, None for rooms this process no
    longer knows.
    """
    kept: dict[Any, tuple[int, Any, bool]] = {}
    if not conf.BROADCAST:
        return kept
    members: dict[Any, protocol.Members] = {}
    for change in changes.values():
        room = change.room
        before = known_before.get(room.pk)
        if not room.listed:
            kept[room.pk] = (room.version, None, False)
        elif before is not None:
            members[room.pk] = protocol.applied(before, change.entries.values())
            kept[room.pk] = (room.version, members[room.pk], room.pk in read_before)
        elif change.entries:
            kept[room.pk] = (room.version, None, False)
    unknown = [
        change.room
        for change in changes.values()
        if change.joiners and change.room.listed and change.room.pk not in members
    ]
    by_id = {room.pk: room for room in unknown}
    if unknown:
        for room_id, entries in read_members(unknown).items():
            members[room_id] = protocol.members(entries)
            kept[room_id] = (by_id[room_id].version, members[room_id], True)
    for change in changes.values():
        room = change.room
        if change.joiners:
            change.state = protocol.state(
                room.channel_name,
                room.version,
                members[room.pk] if room.listed else None,
                Counts(room.users, room.visitors, room.sockets),
            )
    return kept


class KnownMembers:
    """The members of rooms at a version, as this process's change sets left them.

    Per process (a worker's task process): a batch whose subscribed sockets
    join a room of a thousand would otherwise read its thousand rows again
    for their state. A room is known only while the last change set this
    process saw for it is the room's last: the next change set starts from
    that version, or the room is read again. Entries are forgotten after
    MAX_AGE seconds (so that a renamed user's name comes back from the
    database) and past MAX_ROOMS rooms.
    """

    MAX_ROOMS = 1_000
    MAX_AGE = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # {room id: (version, read at, members, room name)}
        self._rooms: OrderedDict[Any, tuple[int, float, protocol.Members, str]] = (
            OrderedDict()
        )
        self._ids: dict[str, Any] = {}

    def get(self, room_id: Any, version: int) -> protocol.Members | None:
        """The room's members at ``version``, if this process knows them."""
        with self._lock:
            found = self._rooms.get(room_id)
        if found is None or found[0] != version:
            return None
        if time.monotonic() - found[1] > self.MAX_AGE:
            return None
        return found[2]

    def fresh(self, name: str) -> bool:
        """Whether this process knows members of room ``name``, not yet to be
        read again: at which version, only the room's row can tell."""
        with self._lock:
            found = self._rooms.get(self._ids.get(name))
        return found is not None and time.monotonic() - found[1] <= self.MAX_AGE

    def keep(
        self,
        rooms: dict[Any, tuple[int, protocol.Members | None, bool]],
        names: dict[Any, str],
    ) -> None:
        """Know these rooms at these versions (None: forget the room).

        The third item says whether the members were read from the database
        now, else rebuilt from what the process knew: those are read again
        MAX_AGE after their last read. ``names``: each room's name, by id.
        """
        now = time.monotonic()
        with self._lock:
            for room_id, (version, members, read) in rooms.items():
                old = self._rooms.pop(room_id, None)
                if old is not None:
                    self._forget_name(old[3], room_id)
                if members is None or (old is None and not read):
                    continue
                since = now if read or old is None else old[1]
                self._rooms[room_id] = (version, since, members, names[room_id])
                self._ids[names[room_id]] = room_id
            while len(self._rooms) > self.MAX_ROOMS:
                room_id, (*_, name) = self._rooms.popitem(last=False)
                self._forget_name(name, room_id)

    def _forget_name(self, name: str, room_id: Any) -> None:
        # Called with the lock held. A room of that name made again since
        # (pruned, then joined) has another id: that one stays known.
        if self._ids.get(name) == room_id:
            del self._ids[name]

    def clear(self) -> None:
        """Forget every room."""
        with self._lock:
            self._rooms.clear()
            self._ids.clear()


#: This process's known members.
known = KnownMembers()


def _delivery(change: RoomChange, users: dict[Any, Any]) -> broadcast.Delivery:
    def user(key: str) -> Any:
        return users.get(_user_pk(key)) if protocol.is_user_key(key) else None

    diff = None
    if change.entries:
        diff = protocol.Diff(
            room=change.room.channel_name,
            start=change.start,
            version=change.room.version,
            counts=change.counts,
            listed=change.room.listed,
            entries=change.entries,
        )
    return broadcast.Delivery(
        room=change.room,
        diff=diff,
        added=change.added,
        removed=change.removed,
        bulk=change.bulk,
        state=change.state,
        joiners=change.joiners,
        arrived=[(key, user(key)) for key in change.arrived],
        left=[
            (key, user(key), change.reasons.get(key, protocol.LEFT))
            for key in change.left
        ],
    )


def _key_count_statements(
    wanted: set[tuple[int, str]], using: str
) -> list[sql.Statement]:
    """How many sockets each (room id, member key) of ``wanted`` has (none: no
    row): one statement, but on SQLite's parameter limit."""
    _, presence_model = _models()
    keys = sorted({key for _, key in wanted})
    if not keys:
        return []
    room_ids = sorted({room_id for room_id, _ in wanted})

    def build(room_ids: Any, keys: Any) -> list[QuerySet[Any]]:
        presences = presence_model.objects.using(using).order_by()
        return [
            part.values("room_id", "key")
            .annotate(count=models.Count("id"))
            .values_list("room_id", "key", "count")
            for in_rooms in sql.any_of(presences, "room_id", room_ids)
            for part in sql.any_of(in_rooms, "key", keys)
        ]

    return sql.compiled("changes.key_counts", using, build, room_ids, keys)


def _tally(
    rows: Iterable[tuple[Any, ...]], wanted: set[tuple[int, str]]
) -> dict[tuple[int, str], int]:
    return {
        (room_id, key): count
        for room_id, key, count in rows
        if (room_id, key) in wanted
    }


def read_members(rooms: Sequence[Room]) -> dict[int, list[Entry]]:
    """The entries of every presence of ``rooms``, by room id: one query.

    A room's state is read for its joiners in each batch that has some: in a
    room of a thousand, the thousand rows are most of that batch's work, so
    ``joined_at`` is read as epoch microseconds on PostgreSQL (a bigint psycopg
    reads in C, not a timestamp Django converts in Python), and turned into
    the frame's seconds exactly as ``datetime.timestamp()`` would.
    """
    _, presence_model = _models()
    presences = presence_model.objects.filter(room_id__in=[room.pk for room in rooms])
    return _entries(rooms, _member_values(presences))


def _member_values(presences: QuerySet[Presence]) -> QuerySet[Any]:
    """What :func:`_entries` reads of each of ``presences``."""
    lookups = ["user__" + path for path in broadcast.member_fields().values()]
    epoch = sql.epoch_micros(presences, "joined_at")
    if epoch is not None:
        presences = presences.annotate(joined_us=epoch)
    joined = "joined_at" if epoch is None else "joined_us"
    return presences.values_list("room_id", "key", "ref", joined, "user_id", *lookups)


def _entries(
    rooms: Sequence[Room], rows: Iterable[Sequence[Any]]
) -> dict[int, list[Entry]]:
    """The entries of ``rows`` (:func:`_member_values`), by room id."""
    fields = broadcast.member_fields()
    found: dict[int, list[Entry]] = {room.pk: [] for room in rooms}
    plain = broadcast.plain
    for room_id, key, ref, joined_at, user_id, *values in rows:
        user = (
            dict(zip(fields, map(plain, values), strict=True))
            if user_id is not None
            else None
        )
        # Epoch microseconds where the query could ask for them.
        seconds = (
            joined_at / 1_000_000
            if isinstance(joined_at, int)
            else joined_at.timestamp()
        )
        meta = {"ref": ref, "joined_at": seconds, "meta": {}}
        found[room_id].append(Entry(key, user, meta))
    return found


def _member_statements(names: list[str], using: str) -> list[sql.Statement]:
    """The members of the listed rooms of ``names``, as :func:`_members` reads
    them: one statement (PostgreSQL)."""
    if not names:
        return []
    _, presence_model = _models()

    def build(names: Any) -> list[QuerySet[Any]]:
        presences = presence_model.objects.using(using).filter(room__listed=True)
        # The room's name, in the join that the filter above makes.
        named = presences.filter(sql.AnyOf(F("room__channel_name"), names))
        return [_member_values(named)]

    # Its SQL depends on the member fields, which settings name.
    return sql.compiled(f"changes.members {_member_columns()}", using, build, names)


def _member_columns() -> tuple[Any, ...]:
    """What the columns of :func:`_member_values` depend on."""
    return (tuple(broadcast.member_fields().items()), settings.USE_TZ)


def _members(
    rooms: Sequence[Room], rows: list[Any], using: str
) -> dict[Any, protocol.Members]:
    """The members of ``rooms`` in ``rows`` (:func:`_member_statements`)."""
    presences = _models()[1].objects.using(using)
    rows = sql.converted(
        ("changes.members", using, _member_columns()),
        lambda: _member_values(presences),
        rows,
    )
    return {
        room_id: protocol.members(entries)
        for room_id, entries in _entries(rooms, rows).items()
    }


def _payload(
    payloads: dict[Any, dict[str, Any] | None], key: str
) -> dict[str, Any] | None:
    if not protocol.is_user_key(key):
        return None
    return payloads.get(_user_pk(key))


def _user_pk(key: str) -> Any:
    """The user's primary key in a user key, as the user model's pk field takes it."""
    raw = key[len(protocol.USER_PREFIX) :]
    try:
        return get_user_model()._meta.pk.to_python(raw)
    except Exception:
        return raw


def _users(ids: Iterable[Any]) -> dict[Any, Any]:
    """The users of ``ids``, by pk, with what the member fields follow: one query."""
    wanted = sorted({pk for pk in ids if pk is not None}, key=str)
    if not wanted:
        return {}
    user_model = get_user_model()
    related = {
        path.rsplit("__", 1)[0]
        for path in broadcast.member_fields().values()
        if "__" in path
    }
    users = user_model._base_manager.filter(pk__in=wanted)
    if related:
        users = users.select_related(*sorted(related))
    return {user.pk: user for user in users}


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
