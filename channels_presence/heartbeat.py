"""The worker heartbeat, and the web process's watch on it: is presence applied?

A web process that publishes presence tasks no worker consumes would otherwise
say nothing at all: its sockets work, and the rows never change. So:

* the outbox stamps every message it publishes with the time it published it
  (the ``channels_presence_sent`` header: an older worker ignores it);
* a worker, after it applied a presence task, writes to one Redis hash (the
  Redis of the leases, ``leases.client``) the time it did (``applied``) and
  the newest stamp it has applied (``stamp``, only ever raised);
* the web process remembers when it published (to the second) and, at most
  every CHECK_INTERVAL seconds and only while something it published is not
  yet known applied, reads the hash in its outbox's sender thread, never on
  the socket path. A publish at or before ``stamp`` is applied: a worker has
  applied one published at that time or later, and queues are first in,
  first out. A publish older than CHANNELS_PRESENCE_WORKER_TIMEOUT that is
  not is an outage, logged once, and once more when it ends.

The web process also writes its oldest unapplied publish to the hash
(``waiting:<server id>``), so that ``manage.py presence_status`` can tell
from any process how long presence tasks have waited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from celery import Celery
from django.core.exceptions import ImproperlyConfigured
from redis.exceptions import RedisError

from . import broker, leases
from .conf import conf

logger = logging.getLogger("channels_presence")

#: The message header in which the outbox stamps the time it published.
HEADER = "channels_presence_sent"
#: Seconds between two looks at the heartbeat from one web process, at least.
CHECK_INTERVAL = 5.0
#: Publishes closer together than this are remembered as one (the earliest).
GRAIN = 1.0
#: The hash is forgotten after this long without a write.
KEY_LIFETIME = 7 * 86400
WAITING = "waiting:"

# Raise ``stamp`` only: workers finish their tasks out of order.
_APPLIED = """
redis.call('HSET', KEYS[1], 'applied', ARGV[1])
if ARGV[2] ~= '' then
  local stamp = tonumber(redis.call('HGET', KEYS[1], 'stamp'))
  if not stamp or tonumber(ARGV[2]) > stamp then
    redis.call('HSET', KEYS[1], 'stamp', ARGV[2])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
"""

UNREACHABLE = (RedisError, OSError, ImproperlyConfigured)


def key() -> str:
    """The Redis key of the heartbeat hash."""
    return f"{leases.key_prefix()}:worker"


@dataclass(frozen=True)
class Heartbeat:
    """What the heartbeat hash says, at ``now`` (this process's clock)."""

    now: float
    #: When a worker last applied a presence task; None: never seen.
    applied: float | None = None
    #: The newest publish stamp of an applied task.
    stamp: float | None = None
    #: Each web process's oldest publish not known applied when it last looked.
    waiting: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, fields: dict[bytes, bytes], now: float) -> Heartbeat:
        """Read the hash's fields, as HGETALL returns them."""
        values = {name.decode(): float(value) for name, value in fields.items()}
        return cls(
            now=now,
            applied=values.get("applied"),
            stamp=values.get("stamp"),
            waiting={
                name.removeprefix(WAITING): value
                for name, value in values.items()
                if name.startswith(WAITING)
            },
        )

    def oldest_waiting(self) -> float | None:
        """The oldest publish, of any web process, that no worker has applied."""
        return oldest_unapplied(self.waiting.values(), self.stamp)

    def stalled(self, timeout: float | None) -> bool:
        """Whether a presence task waits longer than ``timeout`` seconds."""
        return is_stalled(self.oldest_waiting(), self.now, timeout)


def oldest_unapplied(published: Any, stamp: float | None) -> float | None:
    """The oldest of ``published`` (times) after ``stamp``, the newest applied."""
    waiting = [at for at in published if stamp is None or at > stamp]
    return min(waiting, default=None)


def is_stalled(oldest: float | None, now: float, timeout: float | None) -> bool:
    """A publish at ``oldest`` still unapplied at ``now`` waits too long."""
    return timeout is not None and oldest is not None and now - oldest > timeout


def read(connection: redis.Redis | None = None) -> Heartbeat:
    """The heartbeat as it is now; raises if its Redis cannot be reached."""
    if connection is None:
        with leases.client(timeout=5.0) as connection:
            return read(connection)
    fields = cast("dict[bytes, bytes]", connection.hgetall(key()))
    return Heartbeat.parse(fields, time.time())


class Beat:
    """The worker side: one write to the heartbeat hash per applied task."""

    def __init__(self) -> None:
        self._client: redis.Redis | None = None
        self._failing = False

    def applied(self, stamp: float | None) -> None:
        """A presence task was applied; ``stamp`` is when it was published."""
        try:
            if self._client is None:
                self._client = leases.client(timeout=2.0)
            self._client.eval(
                _APPLIED,
                1,
                key(),
                repr(time.time()),
                "" if stamp is None else repr(float(stamp)),
                KEY_LIFETIME,
            )
        except UNREACHABLE as error:
            self._client = None
            if not self._failing:
                self._failing = True
                logger.warning(
                    "presence: the worker heartbeat cannot be written (%s); web "
                    "processes will report presence tasks as not applied",
                    error,
                )
            return
        if self._failing:
            self._failing = False
            logger.warning("presence: the worker heartbeat is written again")


class Watch:
    """The web side: when this process published, and whether a worker applies it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._published: deque[float] = deque()
        self._next_check = 0.0
        self._client: redis.Redis | None = None
        self.stalled = False

    def published(self, stamp: float) -> None:
        """This process published a message stamped ``stamp``."""
        with self._lock:
            if not self._published or stamp - self._published[-1] >= GRAIN:
                self._published.append(stamp)

    def waiting(self) -> bool:
        """Whether something this process published is not known applied."""
        return bool(self._published)

    def due(self) -> bool:
        """Whether it is time to look at the heartbeat again."""
        return (
            conf.WORKER_TIMEOUT is not None
            and self.waiting()
            and time.monotonic() >= self._next_check
        )

    def check(self, app: Celery) -> None:
        """Look at the heartbeat; log an outage of the workers once, and its end."""
        self._next_check = time.monotonic() + CHECK_INTERVAL
        try:
            if self._client is None:
                self._client = leases.client(timeout=2.0)
            found = read(self._client)
            oldest = self._settle(found.stamp)
            field_name = WAITING + leases.default.id
            if oldest is None:
                self._client.hdel(key(), field_name)
            else:
                pipe = self._client.pipeline(transaction=False)
                pipe.hset(key(), field_name, repr(oldest))
                pipe.expire(key(), KEY_LIFETIME)
                pipe.execute()
        except UNREACHABLE as error:
            self._client = None
            logger.debug("presence: the worker heartbeat cannot be read: %s", error)
            return
        if is_stalled(oldest, found.now, conf.WORKER_TIMEOUT):
            if not self.stalled:
                self.stalled = True
                assert oldest is not None
                logger.error(stalled_message(app, found, found.now - oldest))
        elif self.stalled:
            self.stalled = False
            logger.warning(
                "presence: a worker applies presence tasks again (queue %r)",
                broker.queue_name(app),
            )

    def _settle(self, stamp: float | None) -> float | None:
        # Forget the publishes a worker has applied; the oldest left, if any.
        with self._lock:
            while self._published and stamp is not None and self._published[0] <= stamp:
                self._published.popleft()
            return self._published[0] if self._published else None


def stalled_message(app: Celery, found: Heartbeat, age: float) -> str:
    """The error a web process logs when its presence tasks are not applied."""
    if found.applied is None:
        seen = "no worker has ever applied a presence task (no worker heartbeat)"
    else:
        seen = (
            "a worker last applied a presence task "
            f"{found.now - found.applied:.0f} s ago"
        )
    return (
        f"presence tasks published {age:.0f} s ago are not applied: {seen}. "
        f"Is a worker consuming queue {broker.queue_name(app)!r} at broker "
        f"{broker.broker_location(app)}? Start one with "
        f"'{broker.worker_command(app)}'. Until then presence does not change; "
        "it catches up when a worker comes"
    )


#: The worker heartbeat of this process, and its watch (in web processes).
beat = Beat()
