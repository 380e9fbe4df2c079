"""The management commands: prune_presences and prune_rooms, and their --dry-run;
presence_status, a health check."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from channels_presence import heartbeat, leases, operations
from channels_presence.models import Presence, Room
from channels_presence.tasks import PRUNE_PRESENCES
from tests.helpers import group_members

pytestmark = pytest.mark.django_db(transaction=True)

FRESH = "specific.a!fresh"  # lobby, alice, seen now
HALF = "specific.a!half"  # lobby, anonymous, seen 30 s ago
OLD = "specific.a!old"  # lobby, bob, seen 90 s ago
ANCIENT = "specific.b!ancient"  # kitchen, anonymous, seen 300 s ago


@pytest.fixture
def presences() -> None:
    """Presences of various ages in two rooms, their sockets in the groups."""
    users = get_user_model().objects
    operations.join("lobby", FRESH, users.create_user("alice"))
    operations.join("lobby", HALF)
    operations.join("lobby", OLD, users.create_user("bob"))
    operations.join("kitchen", ANCIENT)
    now = timezone.now()
    for socket, age in ((HALF, 30), (OLD, 90), (ANCIENT, 300)):
        Presence.objects.filter(channel_name=socket).update(
            last_seen=now - timedelta(seconds=age)
        )


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def sockets() -> set[str]:
    return set(Presence.objects.values_list("channel_name", flat=True))


def rooms() -> set[str]:
    return set(Room.objects.values_list("channel_name", flat=True))


def state() -> tuple[set[str], set[str], set[str], set[str]]:
    """Everything a prune could change: rows and group memberships."""
    return sockets(), rooms(), group_members("lobby"), group_members("kitchen")


def test_prune_presences_removes_those_older_than_max_age_and_says_which(
    presences: None,
) -> None:
    output = run("prune_presences")

    assert sockets() == {FRESH, HALF}
    assert group_members("lobby") == {FRESH, HALF}
    assert group_members("kitchen") == set()
    lines = output.splitlines()
    assert len(lines) == 3
    # By room, then socket.
    assert [line.split(", last seen ")[0] for line in lines[:2]] == [
        "Removed anonymous in kitchen (socket specific.b!ancient",
        "Removed bob in lobby (socket specific.a!old",
    ]
    assert lines[2] == "Removed 2 stale presences."


def test_prune_presences_says_when_each_was_last_seen(presences: None) -> None:
    seen = Presence.objects.get(channel_name=OLD).last_seen
    output = run("prune_presences")
    assert f"last seen {seen.isoformat(timespec='seconds')}" in output


@pytest.mark.parametrize(
    ("age", "left"),
    [
        ("20", {FRESH}),
        ("60", {FRESH, HALF}),
        ("120", {FRESH, HALF, OLD}),
        ("1000", {FRESH, HALF, OLD, ANCIENT}),
    ],
)
def test_prune_presences_honours_age(presences: None, age: str, left: set[str]) -> None:
    output = run("prune_presences", "--age", age)

    assert sockets() == left
    removed = {FRESH, HALF, OLD, ANCIENT} - left
    assert group_members("lobby") | group_members("kitchen") == left
    for socket in removed:
        assert f"(socket {socket}, last seen " in output
    for socket in left:
        assert socket not in output
    noun = "presence" if len(removed) == 1 else "presences"
    assert output.splitlines()[-1] == f"Removed {len(removed)} stale {noun}."


def test_prune_presences_takes_an_age_in_fractions_of_a_second(
    presences: None,
) -> None:
    # An hour ahead of now: out of reach of a sub-second cutoff, however slow
    # the run. The others were seen 30 s ago or earlier, far behind it.
    Presence.objects.filter(channel_name=FRESH).update(
        last_seen=timezone.now() + timedelta(hours=1)
    )

    output = run("prune_presences", "--age", "0.5")

    assert sockets() == {FRESH}
    assert group_members("lobby") | group_members("kitchen") == {FRESH}
    assert output.splitlines()[-1] == "Removed 3 stale presences."


def test_prune_presences_with_nothing_stale_says_so(presences: None) -> None:
    output = run("prune_presences", "--age", "3600")
    assert output == "Removed 0 stale presences.\n"
    assert sockets() == {FRESH, HALF, OLD, ANCIENT}


def test_prune_presences_dry_run_changes_nothing(presences: None) -> None:
    before = state()
    output = run("prune_presences", "--dry-run")

    assert state() == before
    assert "Would remove bob in lobby (socket specific.a!old, " in output
    assert "Would remove anonymous in kitchen (socket specific.b!ancient, " in output
    assert output.splitlines()[-1] == "Would remove 2 stale presences."
    assert "Removed" not in output


def test_prune_presences_dry_run_honours_age(presences: None) -> None:
    before = state()
    output = run("prune_presences", "--dry-run", "--age", "20")

    assert state() == before
    assert output.splitlines()[-1] == "Would remove 3 stale presences."
    assert "socket specific.a!half" in output
    assert FRESH not in output


def test_prune_presences_dry_run_lists_what_a_real_run_removes(
    presences: None,
) -> None:
    dry = run("prune_presences", "--dry-run", "--age", "60")
    real = run("prune_presences", "--age", "60")
    assert sorted(dry.replace("Would remove", "Removed").splitlines()) == sorted(
        real.splitlines()
    )


@pytest.mark.parametrize("age", ["-1", "-0.5", "nan", "inf"])
def test_prune_presences_refuses_a_bad_age_with_a_clear_message(
    presences: None, age: str
) -> None:
    before = state()
    with pytest.raises(CommandError, match="age must be a finite number of seconds"):
        run("prune_presences", "--age", age)
    assert state() == before


def test_prune_presences_refuses_an_age_that_is_not_a_number(presences: None) -> None:
    with pytest.raises(CommandError, match="--age"):
        run("prune_presences", "--age", "soon")


# Created out of name order, so that the output's order is the command's doing.
EMPTY_ROOMS = ["cellar", "attic", "garret", "basement"]


def test_prune_rooms_deletes_the_empty_rooms_and_says_which_by_name(
    presences: None,
) -> None:
    for name in EMPTY_ROOMS:
        Room.objects.create(channel_name=name)

    output = run("prune_rooms")

    assert rooms() == {"lobby", "kitchen"}
    assert output.splitlines() == [
        "Deleted room attic",
        "Deleted room basement",
        "Deleted room cellar",
        "Deleted room garret",
        "Deleted 4 empty rooms.",
    ]


def test_prune_rooms_after_prune_presences_deletes_rooms_left_empty(
    presences: None,
) -> None:
    run("prune_presences")
    output = run("prune_rooms")
    assert rooms() == {"lobby"}
    assert output.splitlines() == ["Deleted room kitchen", "Deleted 1 empty room."]


def test_prune_rooms_with_no_empty_room_says_so(presences: None) -> None:
    assert run("prune_rooms") == "Deleted 0 empty rooms.\n"
    assert rooms() == {"lobby", "kitchen"}


def test_prune_rooms_dry_run_changes_nothing_and_says_which_by_name(
    presences: None,
) -> None:
    for name in EMPTY_ROOMS:
        Room.objects.create(channel_name=name)
    before = state()

    output = run("prune_rooms", "--dry-run")

    assert state() == before
    assert rooms() == {"lobby", "kitchen", *EMPTY_ROOMS}
    assert output.splitlines() == [
        "Would delete room attic",
        "Would delete room basement",
        "Would delete room cellar",
        "Would delete room garret",
        "Would delete 4 empty rooms.",
    ]


# presence_status: a health check.


@pytest.fixture
def heartbeat_key() -> Iterator[str]:
    """The worker heartbeat's key, empty before and after the test."""
    key = heartbeat.key()
    with leases.client() as client:
        client.delete(key)
    yield key
    with leases.client() as client:
        client.delete(key)


def status() -> tuple[int, str]:
    """presence_status's exit status and output."""
    out = io.StringIO()
    try:
        call_command("presence_status", stdout=out)
    except CommandError as error:
        return error.returncode, f"{out.getvalue()}{error}"
    return 0, out.getvalue()


@override_settings(CHANNELS_PRESENCE_USE_CELERY=True)
def test_presence_status_prints_what_is_present_and_when_beat_ran(
    presences: None, heartbeat_key: str
) -> None:
    Presence.objects.filter(channel_name=FRESH).update(server="web-live")
    Presence.objects.filter(channel_name=OLD).update(server="web-dead")
    ran = timezone.now() - timedelta(seconds=42)
    PeriodicTask.objects.filter(task=PRUNE_PRESENCES).update(last_run_at=ran)
    heartbeat.Beat().applied(None)
    with leases.client() as client:
        client.set(leases.lease_key("web-live"), "web-live", ex=30)
        try:
            code, out = status()
        finally:
            client.delete(leases.lease_key("web-live"))
    assert code == 0, out
    assert out.splitlines() == [
        "Rooms: 2",
        "Presences: 4",
        "Servers with a live lease: 1 (of 2 with presences)",
        "Oldest waiting presence task: none waiting",
        "Worker heartbeat: a worker applied a presence task 0 s ago",
        "Beat entries, last run:",
        f"  channels_presence: prune stale presences: "
        f"{ran.isoformat(timespec='seconds')} (42 s ago)",
        "  channels_presence: prune empty rooms: never",
        "  channels_presence: prune crashed servers: never",
        "Presence is being applied.",
    ]


@override_settings(CHANNELS_PRESENCE_USE_CELERY=True)
def test_presence_status_fails_when_no_worker_heartbeat_was_ever_seen(
    heartbeat_key: str,
) -> None:
    code, out = status()
    assert code == 1
    assert "Worker heartbeat: none seen" in out
    assert "presence is not being applied: no worker heartbeat was ever seen" in out


@override_settings(
    CHANNELS_PRESENCE_USE_CELERY=True, CHANNELS_PRESENCE_WORKER_TIMEOUT=30
)
def test_presence_status_fails_when_a_task_waited_longer_than_the_worker_timeout(
    heartbeat_key: str,
) -> None:
    now = time.time()
    heartbeat.Beat().applied(now - 100)  # the last task applied, 100 s ago
    with leases.client() as client:
        client.hset(heartbeat_key, "waiting:web-1", repr(now - 40))
        code, out = status()
        assert code == 1
        assert "Oldest waiting presence task: published 40 s ago" in out
        assert "has waited longer than CHANNELS_PRESENCE_WORKER_TIMEOUT (30 s)" in out
        # Waiting less than the timeout: a worker may be on its way to it.
        client.hset(heartbeat_key, "waiting:web-1", repr(now - 10))
        assert status()[0] == 0


def test_presence_status_needs_no_worker_in_inline_mode(heartbeat_key: str) -> None:
    code, out = status()
    assert code == 0
    assert "Workers: none needed, presence runs inline" in out
