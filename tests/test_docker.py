"""docker/: what can be checked without a Docker engine, which CI does not have.

The compose file is valid against the Compose Specification's own JSON schema
and has every service of the deployment, wired to one Redis and one
PostgreSQL, started in order; its commands are the Procfile's (which ``python3
dev.py demo`` runs, and the README shows); the scale example's nginx
configuration passes ``nginx -t`` (Debian's nginx) and proxies to the daphnes
that the compose file runs; and what the Dockerfile copies, installs and runs
exists in this repository.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
SERVICES = {"redis", "postgres", "migrate", "web", "worker", "beat"}
APP_SERVICES = {"migrate", "web", "worker", "beat"}
#: The scale example's services, which only its profile starts.
SCALE = {"web-2", "worker-2", "proxy"}


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
    assert set(services) == SERVICES | SCALE


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's JSON schema, as check-jsonschema ships it."""
    schemas = resources.files("check_jsonschema.builtin_schemas.vendor")
    loaded: dict[str, Any] = json.loads((schemas / "compose-spec.json").read_text())
    return loaded


def test_the_compose_file_is_valid_against_the_compose_specification(
    compose: dict[str, Any],
) -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(compose)
    ]
    assert errors == []


def test_the_schema_check_finds_a_mistake(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    broken = {
        **compose,
        "services": {
            **compose["services"],
            "web": {**compose["services"]["web"], "depends_on": {"redis": "healthy"}},
            "worker": {**compose["services"]["worker"], "restart_policy": "always"},
        },
    }
    found = {tuple(map(str, e.absolute_path)) for e in validator.iter_errors(broken)}
    # A wrong depends_on, and a key that compose does not know.
    assert ("services", "web", "depends_on") in found
    assert ("services", "worker") in found
    assert validator.is_valid(compose)


def test_the_scale_example_adds_a_daphne_and_a_worker_behind_nginx(
    services: dict[str, Any],
) -> None:
    in_scale = {name for name, service in services.items() if service.get("profiles")}
    assert in_scale == SCALE
    assert all(services[name]["profiles"] == ["scale"] for name in SCALE)
    for second, first in (("web-2", "web"), ("worker-2", "worker")):
        for key in ("command", "environment", "build", "depends_on", "healthcheck"):
            assert services[second][key] == services[first][key], (second, key)
        assert "ports" not in services[second]
    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:")
    assert proxy["volumes"] == ["./nginx.conf:/etc/nginx/conf.d/default.conf:ro"]
    assert proxy["ports"] == ["8080:80"]
    assert proxy["depends_on"] == {
        "web": {"condition": "service_healthy"},
        "web-2": {"condition": "service_healthy"},
    }
    assert (
        "docker compose -f docker/compose.yaml --profile scale up --build"
        in (ROOT / "README.rst").read_text()
    )


def upstream_servers() -> list[str]:
    """The ``host:port`` of each ``server`` of docker/nginx.conf's upstreams."""
    text = re.sub(r"#.*", "", (DOCKER / "nginx.conf").read_text())
    blocks = re.findall(r"upstream\s+\w+\s*\{([^}]*)\}", text)
    return [m for block in blocks for m in re.findall(r"server\s+(\S+?)[\s;]", block)]


def test_nginx_proxies_to_each_daphne_of_the_scale_example(
    services: dict[str, Any],
) -> None:
    daphnes = [
        name
        for name, service in services.items()
        if service.get("command", [None])[0] == "daphne"
    ]
    port = services["web"]["command"][services["web"]["command"].index("-p") + 1]
    assert sorted(upstream_servers()) == sorted(f"{name}:{port}" for name in daphnes)
    text = (DOCKER / "nginx.conf").read_text()
    # Websockets pass: HTTP/1.1 and the upgrade headers.
    for directive in (
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
    ):
        assert directive in text


def test_nginx_accepts_the_scale_examples_configuration(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        pytest.skip(
            "Debian's nginx is not installed (python3 dev.py test installs it "
            "under CI=true): the configuration cannot be tested"
        )
    # Inside the image's http block, as the nginx image includes conf.d/, with
    # nothing written outside tmp_path.
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\n"
        "error_log stderr;\n"
        "events {}\n"
        "http {\n"
        "    access_log off;\n"
        + "".join(
            f"    {kind}_temp_path {tmp_path}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    include {DOCKER / 'nginx.conf'};\n"
        "}\n"
    )
    # nginx -t resolves the upstreams' host names, which only compose's
    # network knows: in a mount namespace of its own, a hosts file names them.
    hosts = tmp_path / "hosts"
    names = sorted({server.rsplit(":", 1)[0] for server in upstream_servers()})
    hosts.write_text(f"127.0.0.1 localhost {' '.join(names)}\n")
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-rm"]
    # sh -c SCRIPT sh HOSTS NGINX ARGS...: $1 is the hosts file, the rest nginx -t.
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    test = [nginx, "-t", "-p", str(tmp_path), "-c", str(main)]
    done = subprocess.run(
        [*unshare, "sh", "-c", script, "sh", str(hosts), *test],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0 and "nginx:" not in done.stderr:
        pytest.skip(f"no mount namespace to run nginx -t in: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert "syntax is ok" in done.stderr
    assert "test is successful" in done.stderr


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


def test_the_workers_health_check_asks_presence_status_whether_presence_is_applied(
    services: dict[str, Any],
) -> None:
    for name in ("worker", "worker-2"):
        kind, command = services[name]["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        assert command.endswith("&& python manage.py presence_status"), command
        assert "inspect ping" in command


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
