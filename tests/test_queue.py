# mypy: disallow-subclassing-any=False
"""CHANNELS_PRESENCE_QUEUE: every presence task on a queue of its own.

A deployment gives presence workers of their own (``celery -A tasks worker -Q
presence``) so that a backlog of its other tasks never delays a join. The last
test runs such a worker, bound to that queue only, with beat, and sees joins,
touches, leaves and beat's prunes applied while the run's default queue stays
empty.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, cast

import pytest
import redis
from celery import Celery
from django.conf import settings
from django.core.checks import run_checks
from django.test import override_settings
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from kombu import Queue

from channels_presence import outbox
from channels_presence.conf import task_queue
from channels_presence.consumers import PresenceConsumerMixin
from channels_presence.schedule import ENTRIES, ensure_schedule
from tasks import app as tasks_app
from tests.consumers import AsyncJsonEchoConsumer, channel_of, connected, note_channel
from tests.helpers import (
    celery_mode,
    closed_port,
    group_members,
    set_last_seen_back,
    sockets,
    sqlite_pass_only,
    touched_since,
    wait_until,
)
from tests.workers import celery_beat, celery_worker

#: The run's presence queue: its own keys, which purge_queue() deletes.
QUEUE = f"presence-dedicated-{settings.RUN}"
#: Seconds a worker may take to apply what a test sent it.
WORKER_TIMEOUT = 15
PRUNE_TASKS = [task for _, task, _, _ in ENTRIES]


def _checked(**overrides: Any) -> list[str]:
    with override_settings(**overrides):
        return [m.id for m in run_checks() if m.id == "channels_presence.E020"]


# Where the tasks are sent.


@sqlite_pass_only
def test_without_the_setting_presence_tasks_follow_celerys_own_routing() -> None:
    assert task_queue() is None
    with override_settings(CHANNELS_PRESENCE_QUEUE="presence"):
        assert task_queue() == "presence"


@sqlite_pass_only
@pytest.mark.parametrize("value", ["", "  ", 42, ["presence"], True])
def test_a_queue_that_is_not_a_name_is_e020(value: Any) -> None:
    assert _checked(CHANNELS_PRESENCE_QUEUE=value) == ["channels_presence.E020"]


@sqlite_pass_only
def test_a_queue_celery_would_refuse_to_create_is_e020() -> None:
    app = Celery("checked-queues", set_as_current=True, broker="memory://")
    try:
        app.conf.task_create_missing_queues = False
        app.conf.task_queues = [Queue("other")]
        with override_settings(CHANNELS_PRESENCE_USE_CELERY=True):
            assert _checked(CHANNELS_PRESENCE_QUEUE="presence") == [
                "channels_presence.E020"
            ]
            app.conf.task_queues = [Queue("other"), Queue("presence")]
            assert _checked(CHANNELS_PRESENCE_QUEUE="presence") == []
    finally:
        tasks_app.set_current()
        app.close()


@sqlite_pass_only
def test_a_named_queue_is_fine() -> None:
    assert _checked(CHANNELS_PRESENCE_QUEUE="presence") == []
    assert _checked(CHANNELS_PRESENCE_QUEUE=None) == []


# The beat entries.


def _queues() -> dict[str, str | None]:
    entries = PeriodicTask.objects.filter(task__in=PRUNE_TASKS)
    return dict(entries.values_list("task", "queue"))


@pytest.mark.django_db
def test_the_prune_entries_are_made_on_the_presence_queue() -> None:
    PeriodicTask.objects.filter(task__in=PRUNE_TASKS).delete()
    with override_settings(CHANNELS_PRESENCE_QUEUE="presence"):
        assert len(ensure_schedule()) == len(PRUNE_TASKS)
    assert _queues() == dict.fromkeys(PRUNE_TASKS, "presence")


@pytest.mark.django_db
def test_entries_made_before_the_setting_move_to_the_queue_at_migrate() -> None:
    assert _queues() == dict.fromkeys(PRUNE_TASKS, None)
    chosen = PRUNE_TASKS[1]
    PeriodicTask.objects.filter(task=chosen).update(queue="chosen-in-the-admin")
    with override_settings(CHANNELS_PRESENCE_QUEUE="presence"):
        assert ensure_schedule() == []
    expected = dict.fromkeys(PRUNE_TASKS, "presence")
    assert _queues() == {**expected, chosen: "chosen-in-the-admin"}
    # Without the setting, nothing moves back: the entries are the admin's.
    assert ensure_schedule() == []
    assert _queues() == {**expected, chosen: "chosen-in-the-admin"}


# A worker bound to the presence queue only.


class LobbyConsumer(PresenceConsumerMixin, AsyncJsonEchoConsumer):
    presence_rooms = ["lobby"]

    async def connect(self):
        note_channel(self)
        await super().connect()


def _waiting(queue: str) -> int:
    """Messages of the run's broker waiting in ``queue``."""
    prefix = settings.CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"]
    with redis.Redis.from_url(settings.CELERY_BROKER_URL) as client:
        return sum(
            cast(int, client.llen(key)) for key in client.scan_iter(f"{prefix}{queue}*")
        )


@pytest.fixture
def prunes_every_second() -> None:
    """prune_presences every second in beat's schedule, as an operator could set it."""
    every, _ = IntervalSchedule.objects.get_or_create(
        every=1, period=IntervalSchedule.SECONDS
    )
    PeriodicTask.objects.filter(task="channels_presence.tasks.prune_presences").update(
        interval=every, expire_seconds=None
    )


@sqlite_pass_only
@pytest.mark.django_db(transaction=True)
async def test_a_worker_bound_to_the_presence_queue_alone_does_all_the_work(
    prunes_every_second: None,
) -> None:
    with (
        celery_mode(),
        override_settings(
            CHANNELS_PRESENCE_QUEUE=QUEUE,
            CHANNELS_PRESENCE_TOUCH_INTERVAL=0,
            CHANNELS_PRESENCE_FLUSH_INTERVAL=0.1,
        ),
        celery_worker("dedicated", queues=QUEUE) as worker,
    ):
        # Joins, touches and leaves, from the outbox.
        async with connected(LobbyConsumer.as_asgi()) as client:
            socket = channel_of(client)
            await wait_until(lambda: _rows_are({socket}), seconds=WORKER_TIMEOUT)
            before = await set_last_seen_back()
            await client.answer('"ping"')
            await wait_until(lambda: touched_since(before), seconds=WORKER_TIMEOUT)
        await wait_until(lambda: _rows_are(set()), seconds=WORKER_TIMEOUT)

        # The prunes, from beat, once migrate has moved its entries.
        await asyncio.to_thread(ensure_schedule)
        assert set((await asyncio.to_thread(_queues)).values()) == {QUEUE}
        async with connected(LobbyConsumer.as_asgi()) as client:
            socket = channel_of(client)
            await wait_until(lambda: _rows_are({socket}), seconds=WORKER_TIMEOUT)
            await set_last_seen_back()
            with celery_beat():
                await wait_until(lambda: _rows_are(set()), seconds=WORKER_TIMEOUT)
            assert group_members("lobby") == set()
        assert "channels_presence.tasks.prune_presences" in worker.output()
        # Nothing ever went to the queue the worker does not consume.
        default = settings.CELERY_TASK_DEFAULT_QUEUE
        assert await asyncio.to_thread(_waiting, default) == 0
        await wait_until(lambda: _waiting(QUEUE) == 0, seconds=WORKER_TIMEOUT)


async def _rows_are(expected: set[str]) -> bool:
    return await sockets() == expected


@sqlite_pass_only
@pytest.mark.django_db(transaction=True)
async def test_a_retried_presence_task_stays_on_the_presence_queue() -> None:
    # The worker's database cannot be reached: its join fails and retries,
    # and only a retry sent to the presence queue can reach it again.
    with (
        celery_mode(),
        override_settings(CHANNELS_PRESENCE_QUEUE=QUEUE),
        celery_worker(
            "retrying",
            queues=QUEUE,
            DATABASE_URL=f"postgres://nobody@127.0.0.1:{closed_port()}/none",
            CHANNELS_PRESENCE_TEST_DATABASE="none",
        ) as worker,
    ):
        outbox.default.send(ADD_PRESENCE, "lobby", "test.x!retried", None, time.time())

        def received_again() -> bool:
            found = re.findall(
                rf"{ADD_PRESENCE}\[([0-9a-f-]+)\] received", worker.output()
            )
            return len(found) >= 2 and len(set(found)) == 1

        await wait_until(received_again, seconds=WORKER_TIMEOUT)
        assert "Retry in" in worker.output()
        default = settings.CELERY_TASK_DEFAULT_QUEUE
        assert await asyncio.to_thread(_waiting, default) == 0


ADD_PRESENCE = "channels_presence.tasks.add_presence"
