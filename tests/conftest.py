"""Fixtures shared by the whole suite: a clean channel layer, signal capture, users."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connections

from channels_presence import broadcast, changes, leases, outages, sync
from channels_presence.signals import presence_changed
from tasks import app as celery_app
from tests.helpers import new_channel_layer


@pytest.fixture(autouse=True)
def _celery_app_is_current() -> None:
    """Tasks are sent with the project's app, whatever app a test made current."""
    celery_app.set_current()


@pytest.fixture(autouse=True, scope="session")
def _no_keys_left_in_redis() -> Iterator[None]:
    """After the run, delete its keys outside the channel layer's prefix.

    The leases and the worker heartbeat live under ``leases.key_prefix()``
    (``channels-presence:`` and the layer's prefix), where the layer's flush
    after each test does not reach; the heartbeat would stay a week.
    """
    yield
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{leases.key_prefix()}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _clean_channel_layer() -> Iterator[None]:
    """Each test gets a channel layer of its own (see ``new_channel_layer``),
    and leaves none of its keys."""
    new_channel_layer()
    # Rooms of the same name come and go from test to test.
    sync.states.clear()
    changes.known.clear()
    yield
    # Discards retried against a layer that a test took down stay given up.
    broadcast.retries.clear()
    layer: Any = get_channel_layer()
    if layer is not None and hasattr(layer, "flush"):
        async_to_sync(layer.flush)()


@pytest.fixture(autouse=True)
async def _close_async_connections() -> AsyncIterator[None]:
    """Close the connection Django's async ORM opened in asgiref's worker thread.

    Left open, it would keep PostgreSQL from dropping the test database.
    """
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
def no_outage_yet() -> Iterator[None]:
    """No outage remembered from an earlier test, nor left for a later one.

    An outage is logged once (``outages.outage``): one still remembered
    would keep this test's from being logged.
    """
    outages.outage.failing.clear()
    yield
    outages.outage.failing.clear()


@pytest.fixture
def alice(django_user_model: Any) -> Any:
    """A saved user named alice."""
    return django_user_model.objects.create_user(username="alice")


@pytest.fixture
def bob(django_user_model: Any) -> Any:
    """A saved user named bob."""
    return django_user_model.objects.create_user(username="bob")


@pytest.fixture
def signals() -> Iterator[list[dict[str, Any]]]:
    """The presence_changed signals sent during the test, as keyword dicts."""
    received: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        received.append({"sender": sender, **kwargs})

    presence_changed.connect(receiver, dispatch_uid="tests.signals")
    yield received
    presence_changed.disconnect(dispatch_uid="tests.signals")
