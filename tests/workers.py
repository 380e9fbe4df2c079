"""Real ``celery worker`` and ``celery beat`` processes for the tests that cross one.

Each runs ``celery -A tasks`` (the deployment's own app) with the suite's settings,
on the test database of the running test (it must be a transactional test, so
that the worker sees the rows the test commits) and the run's own Celery queue.
A process is started fresh, waited for until it says it is ready, and stopped
with SIGTERM (SIGKILL after a grace period) when the block ends; its output is
kept, and printed when a test fails, to show what the worker did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.db import connection

from channels_presence import outbox

ROOT = Path(__file__).resolve().parent.parent

#: Seconds a worker or beat may take to start, and to stop.
START_TIMEOUT = 30
STOP_TIMEOUT = 15


class OutputProcess:
    """A subprocess, in a session of its own, and the lines it has printed."""

    def __init__(
        self, command: list[str], env: dict[str, str], cwd: Path = ROOT, **popen: Any
    ) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            **popen,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self.saw(self.lines[-1])
        self.ended()

    def saw(self, line: str) -> None:
        """Called with each line the process prints, as it comes."""

    def ended(self) -> None:
        """Called once the process has closed its output."""

    def output(self) -> str:
        """Everything the process printed so far."""
        return "\n".join(self.lines)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no acknowledgement."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM, a warm shutdown; SIGKILL if it does not end in time."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(STOP_TIMEOUT)


class CeleryProcess(OutputProcess):
    """A running ``celery`` subprocess and the lines it has printed."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self._ready = threading.Event()
        super().__init__([sys.executable, "-m", "celery", "-A", "tasks", *args], env)

    def saw(self, line: str) -> None:
        """A worker or beat says when it is ready."""
        if " ready." in line or "beat: Starting" in line:
            self._ready.set()

    def ended(self) -> None:
        """A process that ended is as ready as it will ever be."""
        self._ready.set()

    def wait_ready(self) -> None:
        """Block until the process says it is ready; fail if it exits instead."""
        if not self._ready.wait(START_TIMEOUT) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(
                f"celery {self.name} did not start:\n" + "\n".join(self.lines[-40:])
            )


def environment(**extra: str) -> dict[str, str]:
    """The environment of a worker or beat of this test run, on the test database."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CHANNELS_PRESENCE_TEST_DATABASE": str(connection.settings_dict["NAME"]),
        "PYTHONUNBUFFERED": "1",
        # Workers throttle a room's diffs as a deployment's do.
        "CHANNELS_PRESENCE_TEST_EVENT_INTERVAL": "0.1",
        **extra,
    }


def purge_queue() -> None:
    """Forget the tasks a previous test left in the run's queue."""
    outbox.default.flush(timeout=5)
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextmanager
def celery_worker(
    name: str = "worker",
    *,
    concurrency: int = 1,
    queues: str | None = None,
    **env: str,
) -> Iterator[CeleryProcess]:
    """A running ``celery -A tasks worker`` (solo pool unless ``concurrency`` > 1).

    ``queues``: what it consumes (``-Q``), instead of the run's default queue.
    """
    pool = ["-P", "solo"]
    if concurrency > 1:
        pool = ["-P", "prefork", "-c", str(concurrency)]
    if queues is not None:
        pool += ["-Q", queues]
    worker = CeleryProcess(
        name,
        [
            "worker",
            "-l",
            "info",
            "-n",
            f"{name}-{os.getpid()}@%h",
            *pool,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        environment(**env),
    )
    try:
        worker.wait_ready()
        yield worker
    except BaseException:
        print(f"--- celery {name} output ---\n{worker.output()}")
        raise
    finally:
        worker.stop()


@contextmanager
def celery_beat(**env: str) -> Iterator[CeleryProcess]:
    """A running ``celery -A tasks beat -S django``, reading the test database."""
    args = ["beat", "-l", "info", "-S", "django"]
    beat = CeleryProcess("beat", args, environment(**env))
    try:
        beat.wait_ready()
        yield beat
    except BaseException:
        print(f"--- celery beat output ---\n{beat.output()}")
        raise
    finally:
        beat.stop()
