"""The worker heartbeat, and what a web process says when no worker applies its tasks.

The decisions are pure functions, tested on values; the watch runs against the
suite's Redis, with a real ``celery worker`` that comes late.
"""

from __future__ import annotations

import atexit
import io
import logging
import re
import time
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings

from channels_presence import dispatch, heartbeat, leases, outbox
from channels_presence.heartbeat import Heartbeat, is_stalled, oldest_unapplied
from channels_presence.outbox import Outbox
from tasks import app as celery_app
from tests.workers import celery_worker, purge_queue


@pytest.fixture
def clean_heartbeat() -> Iterator[None]:
    """No heartbeat from an earlier test of the run."""
    with leases.client() as client:
        client.delete(heartbeat.key())
    yield
    with leases.client() as client:
        client.delete(heartbeat.key())


# The decisions, on values.


def test_the_oldest_unapplied_publish_is_the_oldest_after_the_newest_applied() -> None:
    assert oldest_unapplied([10.0, 11.0, 12.0], None) == 10.0
    assert oldest_unapplied([10.0, 11.0, 12.0], 11.0) == 12.0
    assert oldest_unapplied([10.0, 11.0], 11.5) is None


def test_a_publish_is_stalled_only_once_it_waited_longer_than_the_timeout() -> None:
    assert not is_stalled(None, 100.0, 30)
    assert not is_stalled(80.0, 100.0, 30)
    assert is_stalled(60.0, 100.0, 30)
    assert not is_stalled(60.0, 100.0, None)  # the watch is off


def test_the_hash_is_read_as_each_web_processs_oldest_waiting_publish() -> None:
    found = Heartbeat.parse(
        {
            b"applied": b"99.0",
            b"stamp": b"50.0",
            b"waiting:web-1": b"40.0",  # applied since: a stale field
            b"waiting:web-2": b"60.0",
        },
        now=100.0,
    )
    assert found.waiting == {"web-1": 40.0, "web-2": 60.0}
    assert found.oldest_waiting() == 60.0
    assert found.stalled(30)
    assert not found.stalled(45)


# The worker side, against Redis.


def test_workers_finishing_out_of_order_never_lower_the_applied_stamp(
    clean_heartbeat: None,
) -> None:
    beat = heartbeat.Beat()
    beat.applied(10.0)
    beat.applied(5.0)  # a slower worker finishes an older task
    beat.applied(None)  # a prune, which beat sent: no stamp
    found = heartbeat.read()
    assert found.stamp == 10.0
    assert found.applied is not None
    assert found.now - found.applied < 5


# A web process whose tasks no worker applies, then a worker that comes.


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "channels_presence" and record.levelno == level
    ]


def _wait_for(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.05)


@pytest.mark.django_db(transaction=True)
@override_settings(
    CHANNELS_PRESENCE_WORKER_TIMEOUT=1, CHANNELS_PRESENCE_USE_CELERY=True
)
def test_a_worker_that_never_comes_is_logged_once_and_its_arrival_once(
    clean_heartbeat: None,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="channels_presence")
    monkeypatch.setattr(heartbeat, "CHECK_INTERVAL", 0.2)
    # The process's own outbox may hold unapplied publishes of earlier tests:
    # its watch would log them too. Only this test's outbox is watched here.
    monkeypatch.setattr(outbox.default, "_watch", heartbeat.Watch())
    purge_queue()
    box = Outbox(celery_app, exit_timeout=1.0)
    try:
        box.send(dispatch.LEAVE_ALL, "specific.nobody!1", at=1.0)
        assert box.flush(5)
        _wait_for(lambda: _records(caplog, logging.ERROR), 5)
        time.sleep(1.0)  # more checks, no more lines
        errors = _records(caplog, logging.ERROR)
        assert len(errors) == 1, errors
        queue = settings.CELERY_TASK_DEFAULT_QUEUE
        assert re.match(
            r"presence tasks published \d+ s ago are not applied", errors[0]
        )
        assert "no worker has ever applied a presence task" in errors[0]
        assert f"queue {queue!r}" in errors[0]
        assert f"at broker {settings.CELERY_BROKER_URL}" in errors[0]
        assert "Start one with 'celery -A tasks worker -l info'" in errors[0]
        with pytest.raises(CommandError, match="not being applied") as failed:
            call_command("presence_status", stdout=io.StringIO())
        assert failed.value.returncode == 1

        with celery_worker():
            ended = "presence: a worker applies presence tasks again"
            _wait_for(lambda: ended in str(_records(caplog, logging.WARNING)), 15)
            assert _records(caplog, logging.WARNING) == [f"{ended} (queue {queue!r})"]
            call_command("presence_status", stdout=io.StringIO())
        assert len(_records(caplog, logging.ERROR)) == 1
    finally:
        box.close()
        atexit.unregister(box.close)
        purge_queue()
