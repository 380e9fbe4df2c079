"""The per-process outbox: what the socket side hands to Celery, sent in the background.

Publishing a task is a network round trip to the broker, and a broker that is
down makes it fail or hang: a socket handler must do neither. So a handler only
appends to this outbox, in memory, and a background thread of the process
publishes:

* joins and leaves (``add_presence``, ``leave_all``) at once when the sender
  was idle, in the order they were appended, so that
  each socket's tasks reach the broker in its order; when several wait, they
  go as one ``apply_batch`` message. While they keep coming (more than one
  went out in the last ``busy_linger``, 50 ms), they gather for up to that
  long: a worker applies a batch as one change set per room, so a storm of
  joins costs it a few large batches rather than one small task per join,
  while a lone join, or a leave soon after it, still goes at once;
* touches as one ``touch_presences`` task per FLUSH_INTERVAL, naming every
  socket touched since the last one, however many there are.

While the broker is down the outbox keeps what it holds and tries again every
``retry_interval`` seconds; the outage is logged when it starts and when it
ends, not once per task. It holds at most ``limit`` items: past that, touches
are dropped first (a socket touches again within TOUCH_INTERVAL), and only then
the oldest joins and leaves, each drop logged. A publish that fails for another
reason (an argument that cannot be serialized, a bug) would fail again: what it
held is dropped, and logged with what that was. Whatever is pending when the
process exits is sent then by the sender thread, on a best-effort basis, and
logged if it could not be. Every line about the broker names it, its password
masked.

Each message is stamped with the time it was published, and the sender thread
watches whether a worker applies them (``channels_presence.heartbeat``): tasks
that wait longer than CHANNELS_PRESENCE_WORKER_TIMEOUT are logged as an
outage of the workers, once. Tasks sent with Celery's fallback application
(the project's was never imported) are logged at the first send.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.app import app_or_default
from kombu.exceptions import OperationalError as BrokerError
from kombu.utils.uuid import uuid
from redis.exceptions import RedisError

from . import broker, heartbeat
from .conf import conf, task_queue
from .tasks import BATCHABLE

logger = logging.getLogger("channels_presence")

TOUCH_TASK = "channels_presence.tasks.touch_presences"
BATCH_TASK = "channels_presence.tasks.apply_batch"
JOIN_TASKS = frozenset({"channels_presence.tasks.add_presence"})
LEAVE_TASKS = frozenset(
    {"channels_presence.tasks.remove_presence", "channels_presence.tasks.leave_all"}
)
# Joins and leaves sent in one apply_batch message, at most.
BATCH_SIZE = 500

# What a broker that is down or unreachable raises (a Redis error reply too: a
# replica that a failover has not promoted yet answers READONLY, a full one
# OOM); anything else is a bug, and the tasks that raised it are dropped (and
# logged, with what they were) rather than retried forever.
UNREACHABLE = (BrokerError, RedisError, OSError, TimeoutError)

Task = tuple[str, tuple[Any, ...], dict[str, Any]]


class Outbox:
    """A buffer of presence tasks that a background thread sends to the broker.

    ``app`` is the Celery application to publish with; None means Celery's
    current application, looked up at each send (the project's own, once it is
    imported, as Celery's Django guide arranges). ``limit`` bounds what it
    holds; ``retry_interval`` paces the retries of an outage; ``exit_timeout``
    bounds the wait for the sender at exit; ``busy_linger`` how long joins and
    leaves gather while they keep coming, and ``linger`` how often the sender
    looks again meanwhile (a lone one is published at once).
    """

    def __init__(
        self,
        app: Celery | None = None,
        *,
        limit: int = 100_000,
        retry_interval: float = 1.0,
        exit_timeout: float = 5.0,
        linger: float = 0.002,
        busy_linger: float = 0.05,
    ) -> None:
        self.app = app
        self.linger = linger
        self.busy_linger = busy_linger
        self.limit = limit
        self.retry_interval = retry_interval
        self.exit_timeout = exit_timeout
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._tasks: deque[Task] = deque()
        # The sockets to touch: the rooms each believes it is in, and
        # whether its group memberships are due a refresh.
        self._touches: dict[str, tuple[tuple[str, ...], bool]] = {}
        # A touch batch being published: still pending until it is sent.
        self._touches_in_flight = 0
        self._touched_at = 0.0
        self._last_touch_flush = 0.0
        # (monotonic time, how many) of the joins and leaves sent in the last
        # busy_linger: whether they keep coming.
        self._recent: deque[tuple[float, int]] = deque()
        self._thread: threading.Thread | None = None
        # The sender's broker connection and producer, and their app.
        self._connection: Any = None
        self._producer: Any = None
        self._connection_app: Celery | None = None
        self._failing = False
        self._dropping = False
        self._told_fallback = False
        self._watch = heartbeat.Watch()
        # What was published, in joins and leaves and touch tasks (bench/ reads it).
        self.sent = 0

    def send(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Queue task ``name`` for the broker; return at once."""
        self._after_fork()
        with self._lock:
            self._ensure_running()
            if len(self._tasks) + len(self._touches) >= self.limit:
                self._make_room()
            self._tasks.append((name, args, kwargs))
        self._wake.set()

    def touch(
        self, channel_name: str, rooms: tuple[str, ...] = (), *, refresh: bool = True
    ) -> None:
        """Queue a touch of ``channel_name`` for the next touch_presences batch.

        ``rooms``: the rooms the socket believes it is in; the worker tells
        it to join again those where it has no presence. ``refresh``: its
        group memberships are due a refresh.
        """
        self._after_fork()
        first = False
        with self._lock:
            self._ensure_running()
            if channel_name not in self._touches:
                if len(self._tasks) + len(self._touches) >= self.limit:
                    self._drop("a touch")
                    return
                first = not self._touches
            known = self._touches.get(channel_name)
            self._touches[channel_name] = (rooms, refresh or bool(known and known[1]))
            self._touched_at = time.time()
        if first:
            # With no touches pending the sender sleeps until woken: it has
            # to learn that a batch is now due.
            self._wake.set()

    def pending(self) -> tuple[int, int]:
        """How many tasks, and how many touches, wait to be sent."""
        with self._lock:
            return len(self._tasks), len(self._touches) + self._touches_in_flight

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything pending is sent, touches included; True if it was."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._last_touch_flush = 0.0
            self._recent.clear()
        self._wake.set()
        while time.monotonic() < deadline:
            if self.pending() == (0, 0):
                return True
            time.sleep(0.01)
        return self.pending() == (0, 0)

    def close(self) -> None:
        """Stop the sender once it has sent what is left; wait up to
        ``exit_timeout`` for it. What could not be sent is logged.

        The sender sends the rest itself, touches included: its producer and
        connection are never used from two threads at once. A sender still
        publishing when the wait ends is left to finish (this thread would
        otherwise publish beside it, and publish its batch twice); what it
        has not sent then is logged, and is lost if the process exits.
        """
        # At the exit of a forked child, what is pending is its parent's.
        self._after_fork()
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(self.exit_timeout)
        if thread.is_alive():
            tasks, touches = self.pending()
            logger.error(
                "presence outbox: %d joins and leaves and %d touches were not sent "
                "within %s s at close: the sender is still publishing to the broker "
                "at %s; lost if the process exits now, prune_presences will catch up",
                tasks,
                touches,
                self.exit_timeout,
                self._broker(),
            )

    # The sender thread.

    def _after_fork(self) -> None:
        if self._pid != os.getpid():
            # A forked child: the parent's thread and pending work are not ours.
            self._reset()

    def _ensure_running(self) -> None:
        # Called with the lock held. A closed outbox keeps what it is given.
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(
                target=self._run, name="channels-presence-outbox", daemon=True
            )
            self._thread.start()
            atexit.register(self.close)

    def _run(self) -> None:
        try:
            self._sending()
        finally:
            self._last_send()

    def _sending(self) -> None:
        while not self._stop.is_set():
            # A lone join goes at once: it is on the path of every join seen.
            # A burst gathers into one message (each publish costs the sender
            # CPU that the event loop waits for).
            self._gather()
            self._wake.clear()
            now = time.monotonic()
            due = now - self._last_touch_flush >= conf.FLUSH_INTERVAL
            try:
                self._send_pending(touches_due=due)
            except UNREACHABLE as error:
                self._outage(error)
                self._stop.wait(self.retry_interval)
                continue
            except Exception:
                # The sender must outlive any bug, or nothing is sent again.
                logger.exception("presence outbox: the sender failed")
                self._stop.wait(self.retry_interval)
                continue
            self._recovered()
            self._check_workers()
            # While a publish is not known applied, wake to look again.
            watching = heartbeat.CHECK_INTERVAL if self._watch.waiting() else None
            with self._lock:
                touches = bool(self._touches)
            if touches:
                wait = self._last_touch_flush + conf.FLUSH_INTERVAL - time.monotonic()
                wait = max(wait, 0.001)
                self._wake.wait(min(wait, watching) if watching else wait)
            else:
                self._wake.wait(watching)

    def _last_send(self) -> None:
        """Once closed: send what is left, touches included, once."""
        try:
            self._send_pending(touches_due=True)
        except UNREACHABLE as error:
            tasks, touches = self.pending()
            logger.error(
                "presence outbox: %d joins and leaves and %d touches could not be "
                "sent at exit, the broker at %s is unavailable (%s); "
                "prune_presences will catch up",
                tasks,
                touches,
                self._broker(),
                error,
            )
        except Exception:
            logger.exception("presence outbox: the sender failed at exit")
        finally:
            self._disconnect()

    def _gather(self) -> None:
        """While joins and leaves keep coming, let them gather a while longer.

        When more than one went out in the last ``busy_linger``: up to
        ``busy_linger`` after the last message, or until a full batch waits.
        A storm becomes a few batches, which a worker applies as one change
        set per room, where one task per join would each pay a transaction
        and a state of the room of its own.
        """
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                waiting = len(self._tasks)
                while self._recent and self._recent[0][0] <= now - self.busy_linger:
                    self._recent.popleft()
                sent = sum(count for _, count in self._recent)
                last = self._recent[-1][0] if self._recent else now
            left = last + self.busy_linger - now
            if not waiting or waiting >= BATCH_SIZE or sent < 2 or left <= 0:
                return
            self._stop.wait(min(left, self.linger))

    def _send_pending(self, *, touches_due: bool) -> None:
        while True:
            with self._lock:
                if not self._tasks:
                    break
                batch = self._next_batch()
            try:
                if len(batch) == 1:
                    self._publish(*batch[0])
                else:
                    calls = [[name, list(args), kwargs] for name, args, kwargs in batch]
                    self._publish(BATCH_TASK, (calls,), {}, carrying=len(batch))
            except UNREACHABLE:
                raise
            except Exception as error:
                self._lost(error, batch, [])
            with self._lock:
                self._recent.append((time.monotonic(), len(batch)))
                for task in batch:
                    # Unless a full outbox dropped it meanwhile.
                    if not (self._tasks and self._tasks[0] is task):
                        break
                    self._tasks.popleft()
        if not touches_due:
            return
        with self._lock:
            touches, at = self._touches, self._touched_at
            self._touches = {}
            self._touches_in_flight = len(touches)
        if not touches:
            return
        names = sorted(touches)
        kwargs: dict[str, Any] = {
            "at": at,
            "refresh": [name for name in names if touches[name][1]],
        }
        rooms = {name: list(rooms) for name, (rooms, _) in touches.items() if rooms}
        if rooms:
            kwargs["rooms"] = rooms
        try:
            self._publish(TOUCH_TASK, (names,), kwargs)
        except UNREACHABLE:
            with self._lock:
                room = max(self.limit - len(self._tasks) - len(self._touches), 0)
                for name in names[:room]:
                    self._touches.setdefault(name, touches[name])
            raise
        except Exception as error:
            self._lost(error, [], names)
        finally:
            with self._lock:
                self._touches_in_flight = 0
        self._last_touch_flush = time.monotonic()

    def _next_batch(self) -> list[Task]:
        # Called with the lock held: the joins and leaves at the head, in
        # order, for one apply_batch; else the head task alone.
        batch: list[Task] = []
        for task in self._tasks:
            if task[0] not in BATCHABLE or len(batch) == BATCH_SIZE:
                break
            batch.append(task)
        return batch or [self._tasks[0]]

    def _publish(
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        carrying: int = 1,
    ) -> None:
        # The app itself, not Celery's current_app proxy: the producer below
        # is kept for one app, and is made again when another is current.
        app = app_or_default(self.app)
        if not self._told_fallback and broker.is_fallback_app(app):
            self._told_fallback = True
            logger.error(broker.fallback_app_error(app))
        stamp = time.time()
        queue = task_queue()
        # What send_task does, less what a presence task never uses (a
        # result, a parent task, an ETA): a join's publish is on the path of
        # every join seen, and this took a quarter off its CPU time (0.72 to
        # 0.55 ms a publish, measured alone).
        options = app.amqp.router.route(
            {"queue": queue} if queue else {}, name, args, kwargs
        )
        message = app.amqp.create_task_message(
            uuid(),
            name,
            args,
            kwargs,
            ignore_result=True,
            argsrepr=_shown(name, args, carrying),
            kwargsrepr=repr(kwargs),
        )
        try:
            app.amqp.send_task_message(
                self._producer_for(app),
                name,
                message,
                retry=False,
                headers={heartbeat.HEADER: stamp},
                **options,
            )
        except UNREACHABLE:
            self._disconnect()
            raise
        self._watch.published(stamp)
        self.sent += carrying

    def _check_workers(self) -> None:
        # In the sender thread, at most every CHECK_INTERVAL while a publish
        # is not known applied: a Redis read, never on the socket path.
        if not self._watch.due():
            return
        try:
            self._watch.check(app_or_default(self.app))
        except Exception:
            logger.exception("presence outbox: the worker watch failed")

    def _broker(self) -> str:
        try:
            return broker.broker_location(app_or_default(self.app))
        except Exception:
            # A log line must not fail for a broker URL kombu cannot read.
            return "(unreadable broker URL)"

    def _producer_for(self, app: Celery) -> Any:
        # A connection of our own, that fails at once when the broker is down:
        # with the app's own, kombu retries connecting for seconds inside
        # every publish, even with retry=False, which held up the retries
        # and the exit of an outage. One producer on it, made once: making
        # one per task cost more than the publishing.
        if self._producer is None or self._connection_app is not app:
            self._disconnect()
            options = {**app.conf.broker_transport_options, "max_retries": 0}
            self._connection = app.connection_for_write(transport_options=options)
            self._connection_app = app
            self._producer = app.amqp.Producer(self._connection, auto_declare=False)
        return self._producer

    def _disconnect(self) -> None:
        self._producer = None
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception:
                logger.debug("presence outbox: closing the broker connection failed")

    # Bookkeeping.

    def _make_room(self) -> None:
        # Called with the lock held, when the outbox is full.
        if self._touches:
            self._drop(f"{len(self._touches)} touches")
            self._touches.clear()
        else:
            self._tasks.popleft()
            self._drop("the oldest join or leave")

    def _lost(self, error: Exception, tasks: list[Task], touches: list[str]) -> None:
        # Called in an except block: the traceback goes with the line.
        logger.exception(
            "presence outbox: dropped %s: publishing them to the broker at %s "
            "failed (%s: %s), which is not an outage (an outage's are kept and "
            "retried); they were %s",
            _counted(tasks, touches),
            self._broker(),
            type(error).__name__,
            error,
            _listed(tasks, touches),
        )

    def _drop(self, what: str) -> None:
        if self._dropping:
            return
        self._dropping = True
        logger.error(
            "presence outbox is full (%d items, the broker at %s is unavailable?): "
            "dropping %s; more drops are not logged until it empties",
            self.limit,
            self._broker(),
            what,
        )

    def _outage(self, error: BaseException) -> None:
        if self._failing:
            logger.debug("presence outbox: the broker is still unavailable: %s", error)
            return
        self._failing = True
        tasks, touches = self.pending()
        logger.error(
            "presence outbox: the broker at %s is unavailable (%s); %d tasks and "
            "%d touches are kept and sent when it answers",
            self._broker(),
            error,
            tasks,
            touches,
        )

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            logger.warning(
                "presence outbox: the broker at %s answers again", self._broker()
            )
        with self._lock:
            if self._dropping and not self._tasks and not self._touches:
                self._dropping = False


#: The outbox of this process, that the decorators and the mixin use.
default = Outbox()


#: Tasks, and touched sockets, that a line about a dropped publish names.
LISTED = 10


def _counted(tasks: Sequence[Task], touches: Sequence[str]) -> str:
    """How many joins, leaves (and other tasks) and touches: "2 joins, ..."."""
    joins = sum(name in JOIN_TASKS for name, _, _ in tasks)
    leaves = sum(name in LEAVE_TASKS for name, _, _ in tasks)
    others = len(tasks) - joins - leaves
    other = f", {others} other tasks" if others else ""
    return f"{joins} joins, {leaves} leaves{other} and {len(touches)} touches"


def _listed(tasks: Sequence[Task], touches: Sequence[str]) -> str:
    """The first LISTED tasks, as calls, and touched sockets, for a log line."""
    calls = [
        f"{name.rpartition('.')[2]}({', '.join(map(repr, args))})"[:200]
        for name, args, _ in tasks[:LISTED]
    ]
    parts = []
    if tasks:
        parts.append(", ".join(calls) + _more(len(tasks)))
    if touches:
        named = ", ".join(map(repr, touches[:LISTED]))
        parts.append(f"touches of {named}{_more(len(touches))}")
    return "; ".join(parts)


def _more(count: int) -> str:
    return f" and {count - LISTED} more" if count > LISTED else ""


def _shown(name: str, args: tuple[Any, ...], carrying: int) -> str:
    """Task ``name``'s arguments as Celery's logs and monitors show them.

    Celery's own ``saferepr`` took a fifth of a publish. A batch, or a
    touch of many sockets, is shown by its size, not as a list of a few
    hundred cut at 1,024 characters.
    """
    if carrying > 1:
        return f"({carrying} joins and leaves)"
    if name == TOUCH_TASK:
        return f"({len(args[0])} sockets)"
    shown = repr(args)
    return shown if len(shown) <= 1024 else shown[:1021] + "..."
