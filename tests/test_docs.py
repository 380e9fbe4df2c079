"""The README: it renders as PyPI renders it, and what it tells a reader to do works.

The set-up it walks through is run for real in ``test_readme_setup``.
"""

import io
import re
import shlex
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone
from readme_renderer.rst import render

from channels_presence.models import Presence, Room
from channels_presence.schedule import ENTRIES
from tests import readme

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["README.rst", "CHANGELOG.rst"])
def test_document_renders_without_warnings_on_pypi(name):
    warnings = io.StringIO()
    html = render((ROOT / name).read_text(), stream=warnings)
    assert html is not None, warnings.getvalue()
    assert warnings.getvalue() == ""


def test_ci_runs_the_test_command_the_readme_gives():
    command = "python3 dev.py test"
    assert f"    {command}\n" in (ROOT / "README.rst").read_text()
    assert f"exec {command}\n" in (ROOT / ".ci" / "run").read_text()


def test_changelog_has_an_unreleased_section():
    assert "Unreleased" in (ROOT / "CHANGELOG.rst").read_text().split("\n\n")[1]


# What the README tells a new user to type.

NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def test_the_install_line_installs_daphne_through_an_extra_that_exists():
    line = readme.block_line('pip install "django-channels-presence[')
    extras = re.fullmatch(r'pip install "django-channels-presence\[(.+)\]"', line)
    assert extras, line
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in extras[1].split(","):
        assert extra in declared
    assert any(req.startswith("daphne") for req in declared["daphne"])


def test_celery_commands_name_your_project_not_this_repositorys():
    # The Procfile's lines (this repository's own app, tasks) are shown
    # verbatim, "web: ..." and all; every other command is for proj/.
    procfile = (ROOT / "Procfile").read_text().splitlines()
    commands = [
        line.strip()
        for line in readme.text().splitlines()
        if re.match(r"\s+celery ", line) and line.strip() not in procfile
    ]
    assert len(commands) >= 5, commands
    for command in commands:
        assert shlex.split(command)[:3] == ["celery", "-A", "proj"], command


def test_the_readme_counts_the_beat_entries_right():
    text = re.sub(r"\s+", " ", readme.text())
    counts = re.findall(r"\b(\w+) (?:celery beat |prune |beat )?entries\b", text)
    stated = [NUMBERS[word] for word in counts if word in NUMBERS]
    assert stated, counts
    assert set(stated) == {len(ENTRIES)}, counts
    for name, *_ in ENTRIES:
        assert name in text


# The README's queries and crontab, run.


@pytest.fixture
def scene(db):
    """alice (two sockets, two rooms), bob, an anonymous visitor; carol is away."""
    users = get_user_model().objects
    alice, bob, _ = (users.create_user(name) for name in ("alice", "bob", "carol"))
    Room.objects.add("lobby", "specific.a!alice-1", alice)
    Room.objects.add("lobby", "specific.a!alice-2", alice)
    Room.objects.add("lobby", "specific.a!bob", bob)
    Room.objects.add("lobby", "specific.a!anon")
    Room.objects.add("kitchen", "specific.a!alice-3", alice)
    Room.objects.create(channel_name="empty")
    return alice, bob


def test_the_readmes_queries_find_who_is_where(scene):
    alice, bob = scene
    found: dict[str, Any] = {}
    exec(readme.block_containing("presence__isnull=False").text, found)

    assert list(found["online"].order_by("username")) == [alice, bob]
    assert set(found["here"]) == {alice, bob}
    assert found["visitors"] == 1
    # Fullest first; the empty room is not among them.
    assert [
        (room.channel_name, room.sockets, room.users) for room in found["rooms"]
    ] == [("lobby", 4, 2), ("kitchen", 1, 1)]
    assert found["counts"] == (2, 1, 4)
    assert found["alice"] == alice
    assert sorted(room.channel_name for room in found["her_rooms"]) == [
        "kitchen",
        "lobby",
    ]


def test_the_readmes_crontab_prunes_stale_presences_and_empty_rooms(scene):
    Presence.objects.filter(channel_name="specific.a!bob").update(
        last_seen=timezone.now() - timedelta(hours=1)
    )
    lines = re.findall(
        r"^ +(?:[\d*/,-]+ ){5} *cd \S+ && \S+/python manage\.py (.+?)(?: >/dev/null)?$",
        readme.text(),
        flags=re.MULTILINE,
    )
    assert [line.split()[0] for line in lines] == ["prune_presences", "prune_rooms"]

    for line in lines:
        call_command(*shlex.split(line), stdout=io.StringIO())

    assert not Presence.objects.filter(channel_name="specific.a!bob").exists()
    assert Presence.objects.count() == 4
    assert sorted(Room.objects.values_list("channel_name", flat=True)) == [
        "kitchen",
        "lobby",
    ]
