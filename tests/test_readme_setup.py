"""The README's set-up, done as a new user does it, from its own text.

``django-admin startproject proj .`` and ``startapp rooms`` make a project in a
temporary directory; every README block that names a file is written into it
(see ``tests/readme.py``); ``migrate`` makes the tables and the beat entries.
Then daphne's ``runserver`` (presence inline, as no worker runs) must serve the
room page, ``presence.js`` and a websocket join; and the README's small-site
worker, ``celery -A proj worker -B``, must run the prunes without a line per
task. The project gets its own Redis keys, queue and SQLite file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from django.conf import settings
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from channels_presence.schedule import ENTRIES
from tests import readme
from tests.helpers import closed_port, sqlite_pass_only
from tests.workers import OutputProcess

pytestmark = sqlite_pass_only

BIN = Path(sys.executable).parent
#: Seconds a command of the project, or its server, may take.
TIMEOUT = 60

#: What the test adds to the settings after the README's: the run's Redis, with
#: keys and a queue of this project's own, and presence inline unless
#: PRESENCE_CELERY=1 (daphne runs without a worker). Crashed servers are pruned
#: every second, so that the worker test sees beat at work soon.
EXTRA_SETTINGS = """\
# The test's own settings.
import os

REDIS_URL = {redis_url!r}
CHANNEL_LAYERS["default"]["CONFIG"] = {{"hosts": [REDIS_URL], "prefix": {prefix!r}}}
CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_TRANSPORT_OPTIONS = {{"global_keyprefix": {prefix!r} + ":"}}
CELERY_TASK_DEFAULT_QUEUE = {prefix!r}
CHANNELS_PRESENCE_USE_CELERY = os.environ.get("PRESENCE_CELERY") == "1"
CHANNELS_PRESENCE_SERVER_PRUNE_INTERVAL = 1
"""


@dataclass
class Project:
    """The scratch project: where it is, what was written, what migrate said."""

    directory: Path
    written: list[str]
    migrated: str
    prefix: str

    def env(self, *, celery: bool) -> dict[str, str]:
        """The environment of its commands: its own settings, not the suite's."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        env["PRESENCE_CELERY"] = "1" if celery else "0"
        return env

    def manage(self, *args: str, celery: bool = False) -> str:
        """Run ``python manage.py *args``; its output, or fail with it."""
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=self.directory,
            env=self.env(celery=celery),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, f"manage.py {args}:\n{done.stdout}{done.stderr}"
        return done.stdout + done.stderr

    def query(self, sql: str) -> list[tuple[object, ...]]:
        """Rows of the project's SQLite database."""
        with sqlite3.connect(self.directory / "db.sqlite3") as database:
            return database.execute(sql).fetchall()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    directory = tmp_path_factory.mktemp("newcomer")
    prefix = f"cp-readme-{uuid.uuid4().hex[:8]}"
    env = {**os.environ}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    for command in (
        [str(BIN / "django-admin"), "startproject", "proj", "."],
        [sys.executable, "manage.py", "startapp", "rooms"],
    ):
        subprocess.run(command, cwd=directory, env=env, check=True, timeout=TIMEOUT)
    written = readme.write_project(
        directory,
        EXTRA_SETTINGS.format(redis_url=settings.REDIS_URL, prefix=prefix),
    )
    made = Project(directory, written, "", prefix)
    made.migrated = made.manage("migrate")
    try:
        yield made
    finally:
        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            keys = list(client.scan_iter(f"*{prefix}*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def test_the_readme_writes_every_file_of_the_set_up(project: Project) -> None:
    assert sorted(set(project.written)) == [
        "proj/__init__.py",
        "proj/asgi.py",
        "proj/celery.py",
        "proj/settings.py",
        "proj/urls.py",
        "rooms/consumers.py",
        "rooms/routing.py",
        "rooms/templates/rooms/room.html",
    ]


def test_migrate_says_which_beat_entries_it_created(project: Project) -> None:
    for name, *_ in ENTRIES:
        assert f"  {name}, every " in project.migrated, project.migrated


def test_the_project_passes_its_checks_in_celery_mode(project: Project) -> None:
    # E004 if proj/__init__.py did not import the Celery app, W002 without
    # django_celery_beat: the README's set-up has neither.
    output = project.manage("check", "--fail-level", "WARNING", celery=True)
    assert "no issues" in output


@dataclass
class Server:
    """daphne's ``runserver`` of the project: its base URL and its process."""

    url: str
    process: OutputProcess


@pytest.fixture(scope="module")
def server(project: Project) -> Iterator[Server]:
    """``python manage.py runserver``, as the README runs it."""
    port = closed_port()
    process = OutputProcess(
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        project.env(celery=False),
        cwd=project.directory,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not _answers(url + "/admin/login/"):
            assert process.process.poll() is None, process.output()
            assert time.monotonic() < deadline, process.output()
            time.sleep(0.1)
        yield Server(url, process)
    except BaseException:
        print(f"--- runserver ---\n{process.output()}")
        raise
    finally:
        process.stop()


def test_runserver_is_daphnes_serving_proj_asgi(server: Server) -> None:
    # "daphne" first in INSTALLED_APPS: its runserver, not Django's WSGI one.
    assert "Starting ASGI/Daphne" in server.process.output(), server.process.output()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except (urllib.error.URLError, ConnectionError):
        return False
    return True


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_the_room_page_and_presence_js_are_served(server: Server) -> None:
    status, page = _get(server.url + "/rooms/lobby/")
    assert status == 200
    script = re.search(r'<script src="([^"]+presence\.js)"', page)
    assert script, page
    assert 'ChannelsPresence.connect("/ws/rooms/lobby/"' in page

    status, code = _get(server.url + script[1])
    assert status == 200
    assert "ChannelsPresence" in code


@pytest.mark.parametrize("room", ["presence_events.lobby", "a%20b", "caf%C3%A9"])
def test_a_page_of_a_room_name_channels_cannot_use_is_not_found(
    server: Server, room: str
) -> None:
    assert _get(f"{server.url}/rooms/{room}/")[0] == 404


def test_a_websocket_joins_its_room_and_leaves_it(
    server: Server, project: Project
) -> None:
    url = server.url.replace("http://", "ws://") + "/ws/rooms/lobby/"
    sql = (
        "SELECT r.channel_name FROM channels_presence_presence p "
        "JOIN channels_presence_room r ON r.id = p.room_id"
    )
    # A browser sends its page's origin, which AllowedHostsOriginValidator checks.
    with connect(url, origin=Origin(server.url), open_timeout=5) as socket:
        event = json.loads(socket.recv(timeout=5))
        assert event["room"] == "lobby", event
        # Its own join applied, the socket is sent the room's state: itself.
        assert event["type"] == "presence.state", event
        assert event["counts"]["sockets"] == 1, event
        assert len(event["members"]) == 1, event
        assert project.query(sql) == [("lobby",)]
    deadline = time.monotonic() + 5
    while project.query(sql):
        assert time.monotonic() < deadline, "the socket's presence outlived it"
        time.sleep(0.05)


#: The origin of the project's own pages.
OWN = "own"


@pytest.mark.parametrize(
    ("path", "origin", "status"),
    [
        ("/ws/rooms/presence_events.lobby/", OWN, 500),
        ("/ws/rooms/a%20b/", OWN, 500),
        ("/ws/rooms/lobby/", "http://elsewhere.example", 403),
        ("/ws/rooms/lobby/", None, 403),
    ],
    ids=["reserved room name", "space", "another site", "no origin"],
)
def test_a_websocket_of_a_bad_room_or_from_another_site_is_refused(
    server: Server, path: str, origin: str | None, status: int
) -> None:
    # Channels' URLRouter fails a path that no pattern admits (daphne: 500);
    # the origin validator refuses pages of other hosts, and origin-less clients.
    url = server.url.replace("http://", "ws://") + path
    sent = Origin(server.url if origin == OWN else origin) if origin else None
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin=sent)
    assert refused.value.response.status_code == status


def test_the_small_site_worker_runs_beat_and_says_nothing_per_task(
    project: Project,
) -> None:
    # The README's command, verbatim; then, for a quick start and stop in a
    # test, one process without the workers' start-up handshakes.
    command = shlex.split(readme.block_line("celery -A proj worker -B"))
    assert command[:4] == ["celery", "-A", "proj", "worker"]
    worker = OutputProcess(
        [str(BIN / "celery"), *command[1:], "-P", "solo", "--without-mingle"],
        project.env(celery=True),
        cwd=project.directory,
    )
    sql = "SELECT total_run_count FROM django_celery_beat_periodictask WHERE name = ?"
    servers = next(name for name, task, *_ in ENTRIES if task.endswith("servers"))
    try:
        deadline = time.monotonic() + TIMEOUT
        while " ready." not in worker.output():
            assert worker.process.poll() is None, worker.output()
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.1)
        time.sleep(3)  # beat sends the prune of crashed servers every second
    finally:
        worker.stop()
    output = worker.output()
    # Beat saves what ran when it stops (and every few minutes before).
    with sqlite3.connect(project.directory / "db.sqlite3") as database:
        (runs,) = database.execute(sql, (servers,)).fetchone()
    assert runs >= 2, output
    # The README's LOGGING: no line per task received, run or sent.
    for chatter in (" received", " succeeded in ", "Sending due task"):
        assert chatter not in output, output
