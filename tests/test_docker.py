"""docker/: what can be checked without a Docker engine, which CI does not have.

The compose file parses and has every service of the deployment, wired to one
Redis and one PostgreSQL, started in order; its commands are the Procfile's
(which ``python3 dev.py demo`` runs, and the README shows); and what the
Dockerfile copies, installs and runs exists in this repository.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
SERVICES = {"redis", "postgres", "migrate", "web", "worker", "beat"}
APP_SERVICES = {"migrate", "web", "worker", "beat"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


def procfile() -> dict[str, list[str]]:
    """The Procfile's commands, as a shell would split them in docker's web.

    ``${HOST:-...}`` and ``${PORT:-...}`` take what the container listens on.
    """
    values = {"HOST": "0.0.0.0", "PORT": "8000"}
    commands = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip():
            name, command = line.split(":", 1)
            expanded = re.sub(
                r"\$\{(\w+):-[^}]*\}", lambda m: values[str(m.group(1))], command
            )
            commands[name] = shlex.split(expanded)
    return commands


def test_the_compose_file_names_every_service(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES


def test_web_worker_and_beat_run_the_procfiles_commands(
    services: dict[str, Any],
) -> None:
    assert {name: services[name]["command"] for name in procfile()} == procfile()
    assert set(procfile()) == {"web", "worker", "beat"}


def test_the_readme_shows_the_procfile_and_the_compose_command() -> None:
    readme = (ROOT / "README.rst").read_text()
    for line in (ROOT / "Procfile").read_text().splitlines():
        assert f"    {line}\n" in readme, f"README.rst does not show {line!r}"
    assert "docker compose -f docker/compose.yaml up --build" in readme
    assert "python3 dev.py demo" in readme


def test_migrate_runs_once_before_the_app_and_the_app_waits_for_it(
    services: dict[str, Any],
) -> None:
    assert services["migrate"]["command"] == [
        "python",
        "manage.py",
        "migrate",
        "--no-input",
    ]
    assert services["migrate"]["restart"] == "no"
    for name in APP_SERVICES - {"migrate"}:
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, name
    assert services["migrate"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }


def test_every_app_service_has_the_same_database_and_redis(
    services: dict[str, Any],
) -> None:
    postgres = services["postgres"]["environment"]
    database = (
        f"postgres://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert environment["DATABASE_URL"] == database, name
        assert environment["REDIS_URL"] == "redis://redis:6379/0", name
        assert services[name]["build"] == {
            "context": "..",
            "dockerfile": "docker/Dockerfile",
        }


def test_the_long_running_services_have_health_checks(
    services: dict[str, Any],
) -> None:
    for name in ("redis", "postgres", "web", "worker"):
        assert services[name]["healthcheck"]["test"], name
    web_check = " ".join(services["web"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/" in web_check
    assert services["web"]["ports"] == ["8000:8000"]


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in lines]


def test_the_dockerfile_is_python_3_11_slim_run_by_a_user_not_root() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [value for kind, value in instructions if kind == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1] not in {"root", "0"}


def test_what_the_dockerfile_copies_and_installs_exists() -> None:
    instructions = dockerfile()
    for kind, value in instructions:
        if kind == "COPY":
            *sources, _ = value.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repo"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    installs = [
        value for kind, value in instructions if kind == "RUN" and "pip" in value
    ]
    assert installs == ['pip install ".[example]"']
    assert "example" in extras
    cmd = dict(instructions)["CMD"]
    assert cmd == (
        '["daphne", "-b", "0.0.0.0", "-p", "8000", "example.asgi:application"]'
    )


def test_the_entry_points_exist_and_the_example_passes_its_checks(
    tmp_path: Path,
) -> None:
    # What the image runs, run here: example.asgi:application for daphne,
    # tasks for celery -A, manage.py for migrate; with the image's settings.
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example.settings",
        "PYTHONPATH": str(ROOT),
        "DEBUG": "0",
        "SQLITE_PATH": str(tmp_path / "db.sqlite3"),
    }
    env.pop("DATABASE_URL", None)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import example.asgi, tasks; "
            "print(callable(example.asgi.application), tasks.app.main)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.split() == ["True", "tasks"], probe.stderr
    check = subprocess.run(
        [sys.executable, "manage.py", "check", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
