"""Operator safety: a dry run changes nothing at all, and says what a real run would do.

"Nothing" is checked byte for byte: every row count, and every key the channel
layer holds in Redis (each group's members with their scores, each socket's
queued messages), dumped before and after; and no presence_changed is sent.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from channels_presence import operations
from channels_presence.models import Departure, Presence, Room
from tests.helpers import ago

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def scene() -> None:
    """Two rooms with live and stale sockets (subscribed to events), one empty room."""
    for room, socket, age in [
        # Seen "a minute from now": live however slowly the test runs.
        ("lobby", "specific.a!live", -60),
        ("lobby", "specific.a!stale", 120),
        ("kitchen", "specific.b!stale", 300),
        ("kitchen", "specific.b!live", 5),
    ]:
        operations.join(room, socket, subscribe=True)
        Presence.objects.filter(channel_name=socket).update(last_seen=ago(age))
    operations.join("attic", "specific.c!gone")
    operations.leave("attic", "specific.c!gone", at=timezone.now())


def snapshot() -> dict[str, Any]:
    """Every row count, and every key of the run's channel layer, as Redis dumps it."""
    prefix = f"cp-test-{settings.RUN}"
    with redis.Redis.from_url(settings.REDIS_URL) as client:
        keys = sorted(client.scan_iter(f"{prefix}*"))
        layer = {key: client.dump(key) for key in keys}
    return {
        "rooms": Room.objects.count(),
        "presences": Presence.objects.count(),
        "departures": Departure.objects.count(),
        "layer": layer,
    }


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.mark.usefixtures("scene")
@pytest.mark.parametrize(
    ("command", "last_line"),
    [
        (["prune_presences", "--dry-run"], "Would remove 2 stale presences."),
        (
            ["prune_presences", "--dry-run", "--age", "1"],
            "Would remove 3 stale presences.",
        ),
        (["prune_rooms", "--dry-run"], "Would delete 1 empty room."),
    ],
)
def test_a_dry_run_changes_no_row_no_group_and_sends_nothing(
    command: list[str], last_line: str, signals: list[dict[str, Any]]
) -> None:
    before = snapshot()
    # The groups are really there to be changed: the check is not vacuous.
    assert len(before["layer"]) >= 4
    assert before["rooms"] == 3

    output = run(*command)

    assert snapshot() == before
    assert signals == []
    assert output.splitlines()[-1] == last_line


@pytest.mark.usefixtures("scene")
def test_a_real_run_after_a_dry_run_removes_what_it_listed() -> None:
    dry = run("prune_presences", "--dry-run")
    before = snapshot()

    real = run("prune_presences")

    assert dry.replace("Would remove", "Removed") == real
    after = snapshot()
    assert after["presences"] == before["presences"] - 2
    # The real run did change the groups, where the dry run did not.
    assert after["layer"] != before["layer"]
