"""One call that the database refuses costs a batch none of its other calls.

A trigger makes the database refuse one socket's presence with an integrity
error, as a race would: the batch is applied call by call, the refused call
is tried once more and then given up, with a log line naming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from django.db import connection

from channels_presence import tasks
from channels_presence.models import Presence

pytestmark = pytest.mark.django_db(transaction=True)

POISON = "specific.poison!1"
ADD = "channels_presence.tasks.add_presence"
LEAVE_ALL = "channels_presence.tasks.leave_all"


@pytest.fixture
def refused() -> Iterator[None]:
    """The database refuses a presence of POISON, as a unique violation."""
    table = Presence._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION cp_refuse_poison() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.channel_name = '{POISON}' THEN RAISE EXCEPTION "
                "'poisoned' USING ERRCODE = 'unique_violation'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            cursor.execute(
                f"CREATE TRIGGER cp_refuse_poison BEFORE INSERT OR UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION cp_refuse_poison()"
            )
        else:
            cursor.execute(
                f"CREATE TRIGGER cp_refuse_poison BEFORE INSERT ON {table} "
                f"WHEN NEW.channel_name = '{POISON}' "
                "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )
    yield
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"DROP TRIGGER cp_refuse_poison ON {table}")
            cursor.execute("DROP FUNCTION cp_refuse_poison()")
        else:
            cursor.execute("DROP TRIGGER cp_refuse_poison")


def test_a_refused_call_costs_its_batch_no_other_call(
    refused: None, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    with caplog.at_level(logging.INFO, "channels_presence"):
        tasks.apply_batch(
            [
                [ADD, ["lobby", "specific.a!1"], {"at": now}],
                [ADD, ["lobby", POISON], {"at": now}],
                [ADD, ["kitchen", "specific.a!2"], {"at": now}],
                [LEAVE_ALL, ["specific.a!1"], {"at": now + 1}],
            ]
        )
    # The others applied, in socket time: a!1 joined, then left.
    assert set(Presence.objects.values_list("room__channel_name", "channel_name")) == {
        ("kitchen", "specific.a!2")
    }
    given_up = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(given_up) == 1
    assert POISON in given_up[0].getMessage()
    assert "gave up" in given_up[0].getMessage()


def test_a_lone_refused_join_is_tried_again_then_given_up_without_raising(
    refused: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "channels_presence"):
        tasks.add_presence("lobby", POISON, None, time.time())
    assert not Presence.objects.exists()
    assert [r.levelname for r in caplog.records] == ["ERROR"]


def test_a_batch_the_database_accepts_is_applied_as_one_change_set(
    django_assert_max_num_queries,
) -> None:
    now = time.time()
    calls = [[ADD, ["lobby", f"specific.b!{n}"], {"at": now}] for n in range(20)]
    with django_assert_max_num_queries(12):
        tasks.apply_batch(calls)
    assert Presence.objects.count() == 20
