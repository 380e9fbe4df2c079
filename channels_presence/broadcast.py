"""After a change set commits: its groups, its signals, then its frames.

``deliver`` runs once per committed change set (``changes``), in this order:

1. the sockets that joined join the rooms' groups, and those that departed
   leave them (:func:`settle`), no lock held: as 1.0.0 did, before the
   signals, so that a receiver's group send on ``added`` reaches the joiner
   and one on ``removed`` does not reach the leaver;
2. ``presence_changed`` for each presence added or removed (one
   ``bulk_change`` per room for a prune), then ``user_joined_room`` and
   ``user_left_room`` for each member key that arrived or left; a receiver
   that raises is logged;
3. ``presence.expired`` to the sockets a prune dropped, so that a live one
   can join again;
4. each room's ``presence.diff`` to its events group, through the per-process
   :class:`Throttle` (``CHANNELS_PRESENCE_EVENT_INTERVAL``);
5. ``presence.state`` to each subscribed socket that joined, the room's state
   built once and sent as one message per server process, in the round trip
   of the diffs sent at once and after them: the room's other sockets hear of
   the join first. A joiner gets its state instead of the diff sent with it,
   which the state holds;
6. the groups of those sockets are checked against their rows, and mended
   where a change set of another worker committed in between (:func:`settle`).

The change set is committed before any of this: a channel layer that fails here
is logged, and never undoes or repeats it. Clients converge through versions
(a later diff, or the prune's ``presence.version`` beacon, shows a gap, and
they sync); group changes that failed are retried in the background until the
layer answers (:class:`Retries`).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from channels.layers import BaseChannelLayer
from django.apps import apps
from django.contrib.auth import get_user_model
from django.db import DatabaseError, close_old_connections, connections, models, router
from django.db.models import QuerySet

from . import groups, protocol, sql
from .conf import conf
from .outages import CHANNEL_LAYER, outage
from .protocol import Diff
from .signals import presence_changed, user_joined_room, user_left_room

if TYPE_CHECKING:
    from django.dispatch import Signal

    from .models import Presence, Room

logger = logging.getLogger("channels_presence")


@dataclass
class Delivery:
    """What one room's change set sends after commit."""

    room: Room
    diff: Diff | None = None
    added: list[Presence] = field(default_factory=list)
    removed: list[Presence] = field(default_factory=list)
    bulk: bool = False
    state: dict[str, Any] | None = None
    joiners: list[str] = field(default_factory=list)
    # (key, user or None) of each member key that arrived.
    arrived: list[tuple[str, Any]] = field(default_factory=list)
    # (key, user or None, reason) of each member key that left.
    left: list[tuple[str, Any, str]] = field(default_factory=list)


def on_commit(
    current: sql.Transaction,
    layer: BaseChannelLayer,
    deliveries: list[Delivery],
    *,
    joined: Sequence[tuple[str, str, int]] = (),
    departed: Sequence[tuple[str, str]] = (),
    notices: Sequence[tuple[str, list[str]]] = (),
) -> None:
    """Deliver the change sets once the ``current`` transaction commits."""
    if not deliveries and not joined and not departed and not notices:
        return

    # A plain function: Django names a failed robust callback by its
    # __qualname__, which a functools.partial lacks.
    def after_commit() -> None:
        deliver(layer, deliveries, joined=joined, departed=departed, notices=notices)

    current.on_commit(after_commit)


def deliver(
    layer: BaseChannelLayer,
    deliveries: list[Delivery],
    *,
    joined: Sequence[tuple[str, str, int]] = (),
    departed: Sequence[tuple[str, str]] = (),
    notices: Sequence[tuple[str, list[str]]] = (),
) -> None:
    """Change the groups, send the signals, then the frames, of committed
    change sets; then check the groups against the rows (see above)."""
    # Before the signals, as 1.0.0 did: a receiver's group_send on "added"
    # reaches the joiner, and one on "removed" does not reach the leaver.
    changed = _Settling(layer, joined, departed)
    changed.act()
    _signals(deliveries)
    if notices:
        guard(
            "the expiry notices",
            groups.send_to_channels_now,
            layer,
            [(sockets, protocol.expired(room)) for room, sockets in notices],
        )
    if conf.BROADCAST:
        states = [
            (delivery.joiners, delivery.state)
            for delivery in deliveries
            if delivery.state is not None and delivery.joiners
        ]
        diffs = [d.diff for d in deliveries if d.diff is not None]
        if diffs or states:
            throttle.submit(layer, diffs, states)
    changed.check()


#: Times :func:`settle` reads the rows again after changing groups, at most.
SETTLE_ROUNDS = 5


def settle(
    layer: BaseChannelLayer,
    joined: Sequence[tuple[str, str, int]],
    departed: Sequence[tuple[str, str]],
) -> None:
    """Make the groups of these (room, socket) pairs follow their rows.

    No transaction or lock is held while the channel layer is waited for.
    The ``joined`` (room, socket, events) are put in their rooms' groups and
    the ``departed`` taken out; then their rows are read again. Another
    worker may have committed a newer join or leave of one of those sockets
    in between, whose own group change ours undid: a pair whose row says
    otherwise than what was done last is mended, and read again, until they
    agree. Whoever changes a group checks so after it, and each change comes
    after its commit: the last check sees the last commit. Raises what the
    layer raises (``groups.UNAVAILABLE``).
    """
    settling = _Settling(layer, joined, departed, background=False)
    settling.act()
    settling.check()


def settle_or_retry(
    layer: BaseChannelLayer,
    joined: Sequence[tuple[str, str, int]],
    departed: Sequence[tuple[str, str]],
) -> None:
    """:func:`settle`, leaving what the layer or the database fails to
    :class:`Retries` (logged) instead of raising it."""
    settling = _Settling(layer, joined, departed)
    settling.act()
    settling.check()


class _Settling:
    """:func:`settle` in two steps, for :func:`deliver` to send between them."""

    def __init__(
        self,
        layer: BaseChannelLayer,
        joined: Sequence[tuple[str, str, int]],
        departed: Sequence[tuple[str, str]],
        *,
        background: bool = True,
    ) -> None:
        self.layer = layer
        # Whether a failure is left to Retries (else it is raised).
        self.background = background
        self.joined = list(joined)
        self.departed = list(departed)
        # What was done last to each pair: in its groups, or out.
        self.inside = {(room, socket): True for room, socket, _ in self.joined}
        self.inside.update(dict.fromkeys(self.departed, False))
        self.events = {(room, socket): events for room, socket, events in self.joined}
        self.failed = False

    def act(self) -> None:
        """Join and leave the groups; a failure is retried in the background."""
        try:
            if self.joined:
                groups.add_now(self.layer, self.joined)
            if self.departed:
                groups.leave_now(self.layer, self.departed)
        except groups.UNAVAILABLE as error:
            if not self.background:
                raise
            outage.failed(
                f"group changes of {len(self.inside)} sockets",
                error,
                "they are retried in the background",
            )
            retries.add(self.layer, self.joined, self.departed)
            self.failed = True
        else:
            if self.inside:
                outage.recovered(CHANNEL_LAYER)

    def check(self) -> None:
        """Read the pairs' rows again, and mend the groups until they agree.

        A database that fails the read leaves the check to :class:`Retries`.
        """
        if self.failed or not self.inside:
            return
        for _ in range(SETTLE_ROUNDS):
            try:
                rows = rows_of(sorted({socket for _, socket in self.inside}))
            except DatabaseError as error:
                if not self.background:
                    raise
                outage.failed(
                    f"the group check of {len(self.inside)} sockets",
                    error,
                    "it is retried in the background",
                )
                retries.add(self.layer, *self._as_done())
                return
            adds = [
                (room, socket, rows[room, socket])
                for (room, socket), inside in self.inside.items()
                if not inside and (room, socket) in rows
            ]
            drops = [
                pair
                for pair, inside in self.inside.items()
                if inside and pair not in rows
            ]
            if not adds and not drops:
                return
            self.joined, self.departed = adds, drops
            self.events.update({(room, socket): ev for room, socket, ev in adds})
            self.inside.update({(room, socket): True for room, socket, _ in adds})
            self.inside.update(dict.fromkeys(drops, False))
            self.act()
            if self.failed:
                return
        logger.warning(
            "presence: the groups of %s sockets still disagreed with their rows "
            "after %s checks; the next change of each mends it",
            len(self.inside),
            SETTLE_ROUNDS,
        )

    def _as_done(self) -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
        """What was done last to each pair, as (joined, departed) to settle again."""
        return (
            [
                (room, socket, self.events.get((room, socket), 0))
                for (room, socket), inside in sorted(self.inside.items())
                if inside
            ],
            [pair for pair, inside in sorted(self.inside.items()) if not inside],
        )


def rows_of(sockets: list[str]) -> dict[tuple[str, str], int]:
    """The presences of ``sockets`` now: their events, by (room, socket)."""
    presence_model = apps.get_model("channels_presence", "Presence")
    using = router.db_for_write(presence_model)

    def presences(sockets: Any) -> list[QuerySet[Any]]:
        found = presence_model.objects.using(using).order_by()
        return [
            part.values_list("room__channel_name", "channel_name", "events")
            for part in sql.any_of(found, "channel_name", sockets)
        ]

    found: dict[tuple[str, str], int] = {}
    for statement in sql.compiled("broadcast.rows", using, presences, sockets):
        with connections[using].cursor() as cursor:
            cursor.execute(*statement)
            for room, socket, events in cursor.fetchall():
                found[room, socket] = events
    return found


def _signals(deliveries: list[Delivery]) -> None:
    for delivery in deliveries:
        room = delivery.room
        sender = type(room)
        changed = {"room": room, "added": None, "removed": None, "bulk_change": False}
        if delivery.bulk and delivery.removed:
            _send(presence_changed, sender, **{**changed, "bulk_change": True})
        else:
            for presence in delivery.removed:
                _send(presence_changed, sender, **{**changed, "removed": presence})
        for presence in delivery.added:
            _send(presence_changed, sender, **{**changed, "added": presence})
        for key, user, reason in delivery.left:
            _send(user_left_room, sender, room=room, user=user, key=key, reason=reason)
        for key, user in delivery.arrived:
            _send(user_joined_room, sender, room=room, user=user, key=key)


def _send(signal: Signal, sender: Any, **kwargs: Any) -> None:
    for receiver, response in signal.send_robust(sender=sender, **kwargs):
        if isinstance(response, Exception):
            logger.error(
                "presence signal receiver %r failed", receiver, exc_info=response
            )


def guard(
    what: str,
    call: Callable[..., None],
    *args: Any,
    then: str = "clients catch up through the rooms' versions once it answers",
) -> bool:
    """Run a (sync) channel-layer call; log its failure, saying what happens
    ``then`` (the change is committed); True if it went through."""
    try:
        call(*args)
    except groups.UNAVAILABLE as error:
        outage.failed(f"sending {what}", error, then)
        return False
    outage.recovered(CHANNEL_LAYER)
    return True


# The throttle.


#: A room's throttle interval is at most this many times EVENT_INTERVAL.
MAX_INTERVAL_FACTOR = 10


def interval(sockets: int) -> float:
    """The throttle's interval for a room of ``sockets``.

    ``CHANNELS_PRESENCE_EVENT_INTERVAL`` up to ``CHANNELS_PRESENCE_EVENT_SOCKETS``
    sockets (300), longer in proportion above, up to MAX_INTERVAL_FACTOR times
    as long. A server process spends some 300 µs of CPU on each socket's frame
    (the channel layer's receive, the consumer, the websocket), so ten diffs a
    second to a room of a thousand sockets on one daphne would take three of
    its cores, and a storm's joins would wait seconds for their states. A
    bigger room gets fewer, larger diffs instead: at most EVENT_SOCKETS
    socket-frames per EVENT_INTERVAL per room and worker process.
    """
    base = float(conf.EVENT_INTERVAL)
    most = conf.EVENT_SOCKETS
    if most is None or sockets <= most:
        return base
    return base * min(sockets / most, MAX_INTERVAL_FACTOR)


@dataclass
class _Room:
    layer: BaseChannelLayer
    sent_at: float = float("-inf")
    pending: list[Diff] = field(default_factory=list)
    # The room's interval, from its latest diff's sockets (see interval()).
    interval: float = 0.0


class Throttle:
    """A room's diffs, at most one send per ``CHANNELS_PRESENCE_EVENT_INTERVAL``.

    Per process and room: a change after a quiet interval is sent at once;
    those that follow within the interval wait, merged where their versions
    follow on, for a timer at the interval's end (a background thread), and
    are flushed when the process exits. A lone join is seen at once; a storm
    costs each socket at most ten frames a second per room per process, and
    fewer in a room of more than ``CHANNELS_PRESENCE_EVENT_SOCKETS`` sockets
    (see :func:`interval`).

    ``clock``: the monotonic clock it reads (tests give it their own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._rooms: dict[tuple[int, str], _Room] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(
        self,
        layer: BaseChannelLayer,
        diffs: Sequence[Diff],
        states: Sequence[tuple[list[str], dict[str, Any]]] = (),
    ) -> None:
        """Send ``diffs`` now, or hold them for the timer, room by room.

        ``states``: the joined sockets' states, sent now, to them instead
        of their rooms' diffs sent now (see :func:`groups.send_now`).
        """
        now = self._clock()
        ready: list[Diff] = []
        waiting = False
        with self._lock:
            for diff in diffs:
                key = (id(layer), diff.room)
                room = self._rooms.get(key)
                if room is None:
                    room = self._rooms[key] = _Room(layer)
                room.interval = interval(diff.counts.sockets)
                if not room.pending and now - room.sent_at >= room.interval:
                    room.sent_at = now
                    ready.append(diff)
                else:
                    room.pending = protocol.merge([*room.pending, diff])
                    waiting = True
            if waiting:
                self._ensure_running()
        if ready or states:
            self._send(layer, ready, states)
        if waiting:
            self._wake.set()

    def flush(self) -> None:
        """Send every held diff now."""
        self._send_due(float("inf"))

    def _send_due(self, now: float) -> None:
        """Send the held diffs due at ``now``."""
        with self._lock:
            due = self._take(now)
        for layer, diffs in due:
            self._send(layer, diffs)

    def _take(self, now: float) -> list[tuple[BaseChannelLayer, list[Diff]]]:
        # Called with the lock held: the held diffs due at ``now``, by layer.
        sent_at = min(now, self._clock())
        by_layer: dict[int, tuple[BaseChannelLayer, list[Diff]]] = {}
        for key, room in list(self._rooms.items()):
            if now - room.sent_at < room.interval:
                continue
            if room.pending:
                by_layer.setdefault(id(room.layer), (room.layer, []))[1].extend(
                    room.pending
                )
                room.pending = []
                room.sent_at = sent_at
            else:
                # Quiet for a whole interval: its next change goes at once.
                del self._rooms[key]
        return list(by_layer.values())

    def _next_due(self) -> float | None:
        # Called with the lock held.
        times = [r.sent_at + r.interval for r in self._rooms.values() if r.pending]
        return min(times) if times else None

    def _ensure_running(self) -> None:
        # Called with the lock held. A forked child starts its own thread.
        if self._thread is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, name="channels-presence-throttle", daemon=True
            )
            self._thread.start()
            atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            with self._lock:
                due_at = self._next_due()
            if due_at is None:
                self._wake.wait()
                self._wake.clear()
                continue
            delay = due_at - self._clock()
            if delay > 0:
                self._wake.wait(delay)
                self._wake.clear()
                continue
            self._send_due(self._clock())

    def _send(
        self,
        layer: BaseChannelLayer,
        diffs: list[Diff],
        states: Sequence[tuple[list[str], dict[str, Any]]] = (),
    ) -> None:
        messages = [(groups.events_group(diff.room), diff.frame()) for diff in diffs]
        # A room's joined sockets get its state instead of the diff sent with
        # it: both are of the one change set of the room that they joined in.
        instead = [
            (groups.events_group(state["room"]), joiners, state)
            for joiners, state in states
        ]
        what = f"{len(messages)} presence diffs"
        if states:
            what += f" and {len(states)} joined rooms' states"
        guard(what, groups.send_now, layer, messages, instead)


#: This process's throttle.
throttle = Throttle()


class Retries:
    """Group changes that failed after commit, tried again until they succeed.

    A background thread retries after RETRY_FIRST seconds, backing off to
    RETRY_MAX; each retry settles them again (:func:`settle`), so that a
    socket that joined or left since is left as its row now says.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[
            tuple[BaseChannelLayer, list[tuple[str, str, int]], list[tuple[str, str]]]
        ] = []
        # Pairs being retried now: still pending until that is done.
        self._in_flight = 0
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(
        self,
        layer: BaseChannelLayer,
        joined: Sequence[tuple[str, str, int]],
        departed: Sequence[tuple[str, str]],
    ) -> None:
        """Retry the group changes of ``joined`` and ``departed`` in the background."""
        with self._lock:
            self._pending.append((layer, list(joined), list(departed)))
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="channels-presence-retries", daemon=True
                )
                self._thread.start()

    def pending(self) -> int:
        """How many (room, socket) pairs wait for their group change."""
        with self._lock:
            return self._in_flight + sum(
                len(joined) + len(departed) for _, joined, departed in self._pending
            )

    def clear(self) -> None:
        """Give up every pending change (tests, whose layers come and go)."""
        with self._lock:
            self._pending.clear()

    def retry(self) -> bool:
        """Try every pending change once; True if none is left."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._in_flight = sum(
                len(joined) + len(departed) for _, joined, departed in pending
            )
        failed = []
        for layer, joined, departed in pending:
            try:
                settle(layer, joined, departed)
            except (*groups.UNAVAILABLE, DatabaseError) as error:
                logger.debug("presence: a group change failed again: %s", error)
                failed.append((layer, joined, departed))
            except Exception:
                logger.exception("presence: a group change failed; given up")
        close_old_connections()
        with self._lock:
            self._pending[:0] = failed
            self._in_flight = 0
            done = not self._pending
        if pending and not failed:
            outage.recovered(CHANNEL_LAYER)
            logger.info("presence: the sockets' group changes went through")
        return done

    def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            time.sleep(delay)
            if self.retry():
                with self._lock:
                    if not self._pending:
                        self._thread = None
                        return
            delay = min(delay * 2, RETRY_MAX)


#: Seconds before the first retry of a failed discard, and between the last ones.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0

#: This process's retries.
retries = Retries()


def send_beacons(layer: BaseChannelLayer, rooms: Sequence[tuple[str, int]]) -> None:
    """``presence.version`` to each (room, version)'s events group."""
    if rooms and conf.BROADCAST:
        guard(
            "the version beacons",
            groups.send_now,
            layer,
            [
                (groups.events_group(room), protocol.version_beacon(room, version))
                for room, version in rooms
            ],
        )


# Members, as frames carry them.


def member_fields() -> dict[str, str]:
    """What each member of a room is sent as: ``{payload key: user field}``.

    CHANNELS_PRESENCE_MEMBER_FIELDS, else ``{"id": "pk", "username":
    USERNAME_FIELD}``; but a USERNAME_FIELD that is an email field is left out
    (``{"id": "pk"}``), for every member of a room sees every other member.
    """
    configured = conf.MEMBER_FIELDS
    if configured is not None:
        return dict(configured)
    user_model = get_user_model()
    fields = {"id": "pk"}
    username = user_model.USERNAME_FIELD
    if not isinstance(user_model._meta.get_field(username), models.EmailField):
        fields["username"] = username
    return fields


def user_payload(user: Any) -> dict[str, Any] | None:
    """A member's ``user``, as the member fields say; None for no user."""
    if user is None:
        return None
    return {key: plain(_lookup(user, path)) for key, path in member_fields().items()}


def plain(value: Any) -> Any:
    """Only what every channel layer can serialize, and JSON too."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _lookup(user: Any, path: str) -> Any:
    value = user
    for part in path.split("__"):
        value = getattr(value, part, None)
    return value
