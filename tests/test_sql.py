"""The transactions of change sets: BEGIN and COMMIT with their statements.

On PostgreSQL (psycopg 3), a change set's transaction sends its BEGIN with
its first round trip and its COMMIT with its last; elsewhere, or inside a
transaction already open, it is Django's ``atomic()``. Either way it commits
all or nothing, and what follows the commit runs after it.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import DatabaseError, connection, transaction
from django.db.models.signals import post_delete
from django.test.utils import CaptureQueriesContext

from channels_presence import changes, operations, sql
from channels_presence.changes import Join, Leave
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from channels_presence.signals import presence_changed
from tests.helpers import group_members

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = "lobby"

combined = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="BEGIN and COMMIT go with the statements on PostgreSQL (psycopg 3)",
)


def _state() -> tuple[list[tuple[str, str]], list[tuple[str, int, int]]]:
    presences = sorted(
        Presence.objects.values_list("room__channel_name", "channel_name")
    )
    rooms = sorted(Room.objects.values_list("channel_name", "version", "sockets"))
    return presences, rooms


@combined
def test_a_lone_join_is_two_round_trips_begin_and_commit_included_then_a_check():
    operations.join(ROOM, "specific.a!1", subscribe=True)

    autocommit: list[bool] = []

    def watch(execute: Any, *args: Any) -> Any:
        autocommit.append(connection.connection.autocommit)
        return execute(*args)

    with (
        CaptureQueriesContext(connection) as queries,
        connection.execute_wrapper(watch),
    ):
        operations.apply([Join(ROOM, "specific.a!2", events=7)])

    first, last, check = [query["sql"] for query in queries.captured_queries]
    # The locks and reads, the member keys' sockets counted among them; then
    # the writes and the room's update, with COMMIT. After it, with no lock
    # held, the joiner's rows are read again for its groups' check.
    assert first.startswith("BEGIN; ")
    assert "COUNT(" in first
    assert 'INSERT INTO "channels_presence_presence"' in last
    assert last.endswith("; COMMIT")
    assert check.startswith("SELECT ")
    # psycopg was in autocommit throughout: it sent no BEGIN of its own.
    assert autocommit == [True, True, True]
    assert connection.get_autocommit()
    assert Room.objects.get().sockets == 2


@combined
def test_a_failed_last_round_trip_rolls_the_whole_change_set_back():
    operations.join(ROOM, "specific.a!1")
    before = _state()

    def fail_before_commit(execute: Any, sql_: str, *args: Any) -> Any:
        if sql_.endswith("; COMMIT"):
            sql_ = sql_.replace("; COMMIT", "; SELECT 1 / 0; COMMIT")
        return execute(sql_, *args)

    with (
        connection.execute_wrapper(fail_before_commit),
        pytest.raises(DatabaseError, match="division by zero"),
    ):
        operations.apply([Join(ROOM, "specific.a!2"), Leave(ROOM, "specific.a!1")])

    assert connection.connection.info.transaction_status == 0  # idle
    assert connection.get_autocommit()
    assert not connection.needs_rollback
    assert _state() == before
    # The connection goes on working.
    operations.apply([Join(ROOM, "specific.a!2")])
    assert len(_state()[0]) == 2


@combined
def test_a_failure_after_the_commit_keeps_the_rows_and_their_groups(monkeypatch):
    def fail(*args: Any) -> None:
        raise RuntimeError("a bug after COMMIT")

    # A room this process knows: its state needs no read, so COMMIT goes
    # with the room's update, before the members are built.
    operations.apply([Join(ROOM, "specific.a!0", events=7)])
    monkeypatch.setattr(changes, "_members_after", fail)
    with pytest.raises(RuntimeError, match="after COMMIT"):
        operations.apply([Join(ROOM, "specific.a!1", events=7)])

    # Committed: the row stands, and the socket stays in the room's groups.
    assert _state()[0] == [(ROOM, "specific.a!0"), (ROOM, "specific.a!1")]
    assert "specific.a!1" in group_members(ROOM)
    assert "specific.a!1" in group_members(events_group(ROOM))
    assert connection.get_autocommit()


def test_a_failure_between_round_trips_rolls_back(monkeypatch):
    operations.join(ROOM, "specific.a!1")
    before = _state()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the database went away")

    # Between the round trip that locks and reads and the one that writes.
    monkeypatch.setattr("channels_presence.changes._writes", refuse)
    with pytest.raises(ConnectionError):
        operations.apply([Join(ROOM, "specific.a!2")])

    assert _state() == before
    assert connection.get_autocommit()
    assert not connection.in_atomic_block


def test_inside_a_transaction_it_is_a_savepoint_that_the_outer_rollback_undoes(
    signals,
):
    operations.join(ROOM, "specific.a!1")
    before = _state()
    signals.clear()

    def undone() -> None:
        with transaction.atomic():
            operations.apply([Join(ROOM, "specific.a!2")])
            assert len(_state()[0]) == 2
            raise RuntimeError("undone")

    with pytest.raises(RuntimeError, match="undone"):
        undone()

    assert _state() == before
    # Nothing committed, nothing announced.
    assert signals == []


def test_rows_read_raw_are_converted_as_their_queryset_converts_them():
    operations.join(ROOM, "specific.c!1")
    operations.join(ROOM, "specific.c!2")

    def build() -> Any:
        return Presence.objects.order_by("pk").values_list(
            "channel_name", "joined_at", "room__changed_at", "events"
        )

    ((raw,),) = [sql.together(connection, [sql.statement(build())])]
    key = ("tests.converted", connection.vendor)
    expected = list(build())
    assert [tuple(row) for row in sql.converted(key, build, raw)] == expected
    # Again, whether or not the columns needed converting (on SQLite the
    # timestamps do: they are read as text).
    assert [tuple(row) for row in sql.converted(key, build, raw)] == expected


def test_what_follows_the_commit_sees_it_and_may_query():
    seen: list[int] = []

    def count_rows(sender: Any, **kwargs: Any) -> None:
        # After COMMIT, outside the transaction: the ORM works as usual.
        assert not connection.in_atomic_block
        seen.append(Presence.objects.filter(channel_name="specific.a!1").count())

    presence_changed.connect(count_rows, dispatch_uid="tests.test_sql")
    try:
        operations.apply([Join(ROOM, "specific.a!1")])
    finally:
        presence_changed.disconnect(dispatch_uid="tests.test_sql")

    assert seen == [1]


def test_presences_with_delete_receivers_are_deleted_through_the_orm_inside_it():
    deleted: list[str] = []

    def remember(sender: Any, instance: Presence, **kwargs: Any) -> None:
        deleted.append(instance.channel_name)

    operations.join(ROOM, "specific.a!1")
    post_delete.connect(remember, sender=Presence, dispatch_uid="tests.test_sql")
    try:
        operations.apply([Leave(ROOM, "specific.a!1")])
    finally:
        post_delete.disconnect(sender=Presence, dispatch_uid="tests.test_sql")

    assert deleted == ["specific.a!1"]
    assert _state()[0] == []
    assert Room.objects.get().sockets == 0


@combined
def test_a_statement_after_the_commit_is_refused_and_the_connection_restored():
    def count_after_commit() -> None:
        with sql.atomic(connection.alias) as current:
            current.finish([("SELECT 1", [])])
            Room.objects.count()

    with pytest.raises(RuntimeError, match="after the transaction's COMMIT"):
        count_after_commit()

    assert connection.get_autocommit()
    assert Room.objects.count() == 0


@combined
def test_nothing_run_sends_neither_begin_nor_commit():
    with CaptureQueriesContext(connection) as queries, sql.atomic(connection.alias):
        pass

    assert queries.captured_queries == []


def test_elsewhere_it_is_djangos_atomic():
    with transaction.atomic(), sql.atomic(connection.alias) as current:
        assert not current.own
        assert connection.in_atomic_block


@combined
def test_in_manual_transaction_management_the_callers_rollback_undoes_it():
    # (On SQLite, where Django's savepoint outside a transaction commits on
    # release, this is Django's own behaviour, the same with or without us.)
    transaction.set_autocommit(False)
    try:
        operations.apply([Join(ROOM, "specific.a!1")])
        assert len(_state()[0]) == 1
        transaction.rollback()
    finally:
        transaction.set_autocommit(True)

    assert _state() == ([], [])
