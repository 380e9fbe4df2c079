"""No transaction or advisory lock is held while the channel layer is waited for.

Every channel-layer call that the operations make is watched: at each one, the
database connection of the thread must be outside any transaction and, on
PostgreSQL, hold no advisory lock. A prune of many sockets must not hold off
other sockets' joins while its group discards run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from channels_presence import groups, operations, protocol
from channels_presence.changes import Join
from channels_presence.models import Presence
from tests.helpers import ago, group_members, in_background

pytestmark = pytest.mark.django_db(transaction=True)

WATCHED = ["add_now", "leave_now", "refresh_now", "send_now", "send_to_channels_now"]


def _held() -> tuple[bool, int]:
    """Whether this thread's connection is in a transaction, and how many
    advisory locks its session holds (PostgreSQL).

    Asked of the database driver: ``sql.atomic`` sends BEGIN itself on
    PostgreSQL, which Django's ``in_atomic_block`` does not see.
    """
    raw = connection.connection
    if raw is None:
        return False, 0
    if connection.vendor != "postgresql":
        return bool(raw.in_transaction), 0
    from psycopg.pq import TransactionStatus

    if raw.info.transaction_status != TransactionStatus.IDLE:
        return True, 0
    with raw.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid = pg_backend_pid()"
        )
        (locks,) = cursor.fetchone()
    return False, locks


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool, int]]:
    seen: list[tuple[str, bool, int]] = []
    for name in WATCHED:
        original = getattr(groups, name)

        def watched(
            *args: Any,
            _name: str = name,
            _call: Callable[..., Any] = original,
            **kwargs: Any,
        ) -> Any:
            seen.append((_name, *_held()))
            return _call(*args, **kwargs)

        monkeypatch.setattr(groups, name, watched)
    return seen


def test_joins_leaves_touches_and_prunes_call_the_layer_holding_nothing(calls):
    operations.join("lobby", "specific.a!1", subscribe=True)
    operations.join("lobby", "specific.a!2", subscribe=True)
    operations.touch(["specific.a!1"], rooms={"specific.a!1": ["lobby"]})
    operations.leave("lobby", "specific.a!1")
    Presence.objects.update(last_seen=ago(3600))
    operations.prune_presences()
    assert {name for name, _, _ in calls} >= {"add_now", "leave_now", "refresh_now"}
    assert [call for call in calls if call[1:] != (False, 0)] == []


def test_a_join_does_not_wait_for_a_prunes_group_discards(monkeypatch):
    # Past a thousand sockets, a prune's discards used to hold every socket's
    # lock, and every join waited for them.
    operations.apply(
        [
            Join("lobby", f"specific.b!{n}", events=protocol.ALL_EVENTS)
            for n in range(1_001)
        ]
    )
    Presence.objects.update(last_seen=ago(3600))
    discarding, release = threading.Event(), threading.Event()
    leave_now = groups.leave_now

    def slow(layer: Any, pairs: Any) -> None:
        # The prune's discards hang until the join is done.
        if len(list(pairs)) > 1_000:
            discarding.set()
            release.wait(10)
        leave_now(layer, pairs)

    monkeypatch.setattr(groups, "leave_now", slow)
    prune = in_background(operations.prune_presences)
    assert discarding.wait(10)
    started = time.monotonic()
    operations.join("lobby", "specific.c!1", subscribe=True)
    waited = time.monotonic() - started
    release.set()
    assert len(prune.result(30)) == 1_001
    assert waited < 5
    assert group_members("lobby") == {"specific.c!1"}
