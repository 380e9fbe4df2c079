"""Server leases: the sockets of a crashed server leave their rooms within seconds.

A server that dies (SIGKILL, out of memory, a lost host) never runs its
sockets' disconnect handlers, and without this module its presences would stay
until ``prune_presences`` finds them stale, MAX_AGE later (a minute by default).

So each process that joins sockets to rooms (a daphne, a uvicorn worker) holds a
lease: a Redis key that lives CHANNELS_PRESENCE_SERVER_LEASE seconds (10) and
that a background thread of the process sets again every third of that. The
thread starts at the process's first join, not at import. Every presence records
the id of the server its socket is on (``Presence.server``), and
``prune_servers``, which celery beat runs every CHANNELS_PRESENCE_SERVER_PRUNE_INTERVAL
seconds (5), removes the presences of the servers whose lease is gone, as a prune
does: group discards, ``presence.expired``, ``presence_changed`` and the broadcast.

A lease can also be missing because Redis lost it: a restart without
persistence, a ``FLUSHALL``, a failover. A live server sets its lease again
within a third of the lease time, so a server is only taken for dead when its
lease is missing at one check (a mark is left in Redis) and still missing at a
later check, at least half the lease time after the first; marks are kept in
the same Redis, so a Redis that lost the leases lost the marks too. A Redis
that started less than one lease time ago is not trusted at all, for a Redis
restored from a snapshot brings back old marks and not the leases that expired
while it was down. With the defaults a dead server's presences go 10 to 25
seconds after it died.

Presences written without a server (the managers, 1.0.0-style) are never
removed by this: only by the ordinary prune.

The leases live in the Redis of CHANNELS_PRESENCE_REDIS_URL, by default the
first host of the default channel layer: a server that cannot reach it cannot
reach its sockets' groups either. Keys are named after the layer's prefix.
Either may name the master of a Redis Sentinel deployment (see
``channels_presence.sentinel``). A failover loses the writes the replica had
not received, leases among them, and every server's refresh fails until the
Sentinels name the new master: the two checks above keep it from taking live
servers for dead, as for any Redis that lost the leases.

Each renewal also reads Redis's clock (``TIME``, in the renewal's round trip):
operations are ordered and presences pruned by the servers' clocks, so a
server whose clock is more than MAX_CLOCK_SKEW off Redis's says so, once until
it comes back.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis
from channels.layers import BaseChannelLayer
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from redis.exceptions import RedisError, ResponseError

from . import clock, operations, protocol, validation
from .conf import conf
from .keystore import client, key_prefix, redis_config

__all__ = ["client", "key_prefix", "redis_config"]

if TYPE_CHECKING:
    from .models import Presence

logger = logging.getLogger("channels_presence")

#: How often a live server sets its lease again, as a fraction of the lease time.
REFRESH_FRACTION = 1 / 3
#: How long a lease must stay missing, as a fraction of the lease time.
CONFIRM_FRACTION = 1 / 2
#: Marks of missing leases are forgotten after this many lease times.
MARK_LIFETIME = 10
#: Seconds between attempts while Redis cannot be reached, at most.
RETRY_INTERVAL = 1.0
#: Seconds this server's clock may be off Redis's before it is logged.
MAX_CLOCK_SKEW = 5.0
#: Longest server id: it is stored in a column of this length.
SERVER_ID_LENGTH = validation.SERVER_MAX_LENGTH


def lease_key(server: str) -> str:
    """The Redis key of ``server``'s lease."""
    return f"{key_prefix()}:lease:{server}"


def mark_key(server: str) -> str:
    """The Redis key marking that ``server``'s lease was found missing, and when."""
    return f"{key_prefix()}:missing:{server}"


class Lease:
    """This process's server id, and the thread that keeps its lease alive."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        # Whether this server's clock was last seen off Redis's (and logged).
        self._skewed = False
        self.id = _new_id()

    def server(self) -> str:
        """This process's server id, its lease held from now on; "" with leases off."""
        if conf.SERVER_LEASE is None:
            return ""
        if self._pid != os.getpid():
            # A forked child is a server of its own, with a lease of its own.
            self._reset()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="channels-presence-lease", daemon=True
                    )
                    self._thread.start()
                    atexit.register(self.release)
        return self.id

    def _run(self) -> None:
        connection: redis.Redis | None = None
        while not self._stop.is_set():
            ttl = conf.SERVER_LEASE or 0
            if ttl <= 0:
                # Leases were turned off while the process ran.
                self._stop.wait(RETRY_INTERVAL)
                continue
            period = ttl * REFRESH_FRACTION
            try:
                if connection is None:
                    connection = client(timeout=period)
                # Redis's clock comes with the renewal, in the same round trip.
                sent = clock.seconds()
                pipe = connection.pipeline(transaction=False)
                pipe.set(lease_key(self.id), self.id, px=max(1, int(ttl * 1000)))
                pipe.time()
                _, (seconds, micros) = pipe.execute()
                self._compare_clocks(
                    clock.skew(sent, clock.seconds(), seconds + micros / 1e6)
                )
            except (RedisError, OSError, ImproperlyConfigured) as error:
                if not self._failing:
                    self._failing = True
                    logger.error(
                        "presence: the lease of server %s cannot be refreshed (%s); "
                        "its sockets' presences will be removed if it stays so "
                        "for %s seconds",
                        self.id,
                        error,
                        ttl,
                    )
                self._stop.wait(min(RETRY_INTERVAL, period))
                continue
            if self._failing:
                self._failing = False
                logger.warning(
                    "presence: the lease of server %s is held again", self.id
                )
            self._stop.wait(period)
        if connection is not None:
            connection.close()

    def _compare_clocks(self, skew: float) -> None:
        """Warn, once until it comes back, that this server's clock is off Redis's.

        Every server compares its clock with the one Redis, so two servers
        within MAX_CLOCK_SKEW of it are within twice that of each other.
        """
        if abs(skew) <= MAX_CLOCK_SKEW:
            if self._skewed:
                self._skewed = False
                logger.info(
                    "presence: the clock of server %s is back within %s s of Redis's",
                    self.id,
                    MAX_CLOCK_SKEW,
                )
            return
        if self._skewed:
            return
        self._skewed = True
        logger.warning(
            "presence: the clock of server %s is %.1f s %s Redis's (more than %s "
            "s). Presence orders a socket's joins and leaves by the clocks of the "
            "processes that stamp them, so a leave sent from another server may be "
            "ordered before the join it follows, or a rejoin before an earlier "
            "leave and be dropped; and last_seen, stamped by this clock, is "
            "compared with the clocks of the workers that prune, so presences may "
            "be pruned early or late. Keep every server's clock in sync with NTP "
            "(chrony or systemd-timesyncd).",
            self.id,
            abs(skew),
            "ahead of" if skew < 0 else "behind",
            MAX_CLOCK_SKEW,
        )

    def release(self) -> None:
        """Stop refreshing and give the lease up: the process is leaving."""
        if self._pid != os.getpid() or self._thread is None:
            return
        self._stop.set()
        self._thread.join(RETRY_INTERVAL * 5)
        self._thread = None
        try:
            with client(timeout=RETRY_INTERVAL) as connection:
                connection.delete(lease_key(self.id))
        except (RedisError, OSError, ImproperlyConfigured) as error:
            logger.warning("presence: lease of %s not given up: %s", self.id, error)
        self._stop = threading.Event()


def _new_id() -> str:
    host = socket.gethostname()[:60]
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"[:SERVER_ID_LENGTH]


#: This process's lease.
default = Lease()


def dead_servers(servers: Iterable[str]) -> list[str]:
    """Those of ``servers`` whose lease has been missing for long enough.

    A first check that finds a lease missing marks it; a check at least
    CONFIRM_FRACTION of the lease time later that finds it still missing says
    the server is dead. A found lease clears its mark. Nothing is dead while
    the Redis that holds the leases has been up less than one lease time.
    """
    ttl = conf.SERVER_LEASE
    names = sorted(set(servers))
    if ttl is None or not names:
        return []
    with client(timeout=max(ttl, 1.0)) as connection:
        if _uptime(connection) < ttl:
            return []
        seconds, micros = connection.time()
        now = seconds + micros / 1e6
        pipe = connection.pipeline(transaction=False)
        for name in names:
            pipe.exists(lease_key(name))
            pipe.get(mark_key(name))
        answers = pipe.execute()
        dead: list[str] = []
        pipe = connection.pipeline(transaction=False)
        for index, name in enumerate(names):
            alive, marked = answers[2 * index], answers[2 * index + 1]
            if alive:
                if marked is not None:
                    pipe.delete(mark_key(name))
            elif marked is None:
                pipe.set(
                    mark_key(name),
                    repr(now),
                    nx=True,
                    px=int(ttl * MARK_LIFETIME * 1000),
                )
            elif now - float(marked) >= ttl * CONFIRM_FRACTION:
                dead.append(name)
        pipe.execute()
    return dead


def _uptime(connection: redis.Redis) -> float:
    try:
        info: Any = connection.info("server")
    except ResponseError:
        # INFO disabled (some managed Redis): the marks alone must do.
        return float("inf")
    return float(info.get("uptime_in_seconds", float("inf")))


def prune_servers(*, channel_layer: BaseChannelLayer | None = None) -> list[Presence]:
    """Remove the presences of the servers whose lease is gone; return them.

    They are removed as :func:`operations.prune_presences` removes stale ones,
    in one pass for every dead server: ``presence.expired`` to each socket,
    the group discards, one ``presence_changed(bulk_change=True)`` and one
    diff per room, whose leaves give the reason ``server_lost``. Does nothing
    with leases off.

    The marks of the dead servers stay until they expire: a join of theirs
    still queued when they died, applied later, is removed at the next check.
    """
    if conf.SERVER_LEASE is None:
        return []
    presence_model = apps.get_model("channels_presence", "Presence")
    servers = presence_model.objects.exclude(server="").values_list("server", flat=True)
    dead = dead_servers(servers.distinct())
    if not dead:
        return []
    removed = operations.prune_presences(
        0,
        presences=presence_model.objects.filter(server__in=dead),
        channel_layer=channel_layer,
        reason=protocol.SERVER_LOST,
    )
    logger.warning(
        "presence: servers %s lost their lease; removed their %d presences",
        ", ".join(dead),
        len(removed),
    )
    return removed
