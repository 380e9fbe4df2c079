"""``python3 dev.py demo``, for real: the README's one command, run twice in a row.

Each run is the command itself, as a subprocess: it migrates a throwaway SQLite
file, makes the demo users, starts daphne, a worker and beat under honcho, and
answers on its port; a signal (Ctrl-C's SIGINT, then SIGTERM) stops every
process it started. It reuses the virtualenv that runs the tests, and a Redis
server of its own (REDIS_URL), so its worker takes no task of anyone else's.

The demo does not use the test database: it runs in the SQLite run of
``python3 dev.py test`` only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.helpers import closed_port, sqlite_pass_only
from tests.servers import ThrowawayRedis
from tests.workers import OutputProcess

ROOT = Path(__file__).resolve().parent.parent
#: Seconds a run may take to answer: migrate a new SQLite file, start three
#: processes, on two busy cores.
START_TIMEOUT = 120
STOP_TIMEOUT = 30

# The demo runs on a SQLite file of its own, whatever the suite's database.
pytestmark = sqlite_pass_only


@pytest.fixture
def redis_url() -> Iterator[str]:
    server = ThrowawayRedis()
    server.start()
    yield server.url
    server.stop()


class Demo(OutputProcess):
    """``python3 dev.py demo`` running, with what it printed."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(
            [sys.executable, "dev.py", "demo"], env, stdin=subprocess.DEVNULL
        )

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not any(text in line for line in self.lines):
            assert self.process.poll() is None, f"the demo exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r}:\n{self.output()}"
            time.sleep(0.1)

    def stopped_by(self, signum: int) -> int:
        """Send ``signum`` to dev.py alone, as a terminal's Ctrl-C would; its code."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(STOP_TIMEOUT)
        finally:
            self.stop()  # if need be; and the last of its output is read


def descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid``, by pid, with their command lines."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name, in parentheses, may hold spaces.
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    below = [pid]
    while below:
        parent = below.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = _command_line(child)
                below.append(child)
    return found


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_the_demo_runs_the_site_twice_in_a_row_and_a_signal_stops_it_all(
    redis_url: str, tmp_path: Path
) -> None:
    port = closed_port()
    sqlite = tmp_path / "demo.sqlite3"
    env = {
        **os.environ,
        "PORT": str(port),
        "SQLITE_PATH": str(sqlite),
        "REDIS_URL": redis_url,
    }
    env.pop("DATABASE_URL", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    site = f"http://127.0.0.1:{port}"

    for run, signum in ((1, signal.SIGINT), (2, signal.SIGTERM)):
        demo = Demo(env)
        try:
            demo.wait_for(f"the demo is up: open {site}/")
            status, lobby = get(site + "/")
            assert status == 200
            assert 'href="/rooms/lobby/"' in lobby
            assert get(site + "/login/")[0] == 200
            status, script = get(site + "/static/channels_presence/presence.js")
            assert "ChannelsPresence" in script
            processes = descendants(demo.process.pid)
            commands = " | ".join(processes.values())
            for program in (
                "example.asgi:application",
                "-A tasks worker",
                "-A tasks beat",
            ):
                assert program in commands, f"run {run}: no {program} in {commands}"
        except BaseException:
            # honcho runs in a session of its own: each process goes by its pid.
            for pid in descendants(demo.process.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            demo.kill()
            print(f"--- run {run} ---\n{demo.output()}")
            raise
        assert demo.stopped_by(signum) == 0, demo.output()
        left = {pid: command for pid, command in processes.items() if alive(pid)}
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"run {run}: still running after {signum!r}: {left}"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the port still answers"

        output = demo.output()
        assert f"Redis: {redis_url} (from REDIS_URL)" in output
        assert f"Database: SQLite, {sqlite}" in output
        assert "alice  / alice-demo" in output
        assert f"stopped by {signal.Signals(signum).name}" in output
    # The second run kept the first one's database, and made no user twice.
    with closing(sqlite3.connect(sqlite)) as database:
        users = database.execute("SELECT username FROM auth_user ORDER BY 1")
        assert [name for (name,) in users] == ["admin", "alice", "bob", "carol"]


def test_the_demo_says_which_port_is_taken_and_how_to_choose_another() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "dev.py", "demo"],
            cwd=ROOT,
            env={**os.environ, "PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert (
        f"Port {port} is in use (another demo?): stop that, or choose a free "
        f"port, e.g. PORT={port + 1} python3 dev.py demo"
    ) in result.stderr
