"""Fixtures shared by the whole suite: a clean channel layer, signal capture."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import connections

from channels_presence.signals import presence_changed


@pytest.fixture(autouse=True)
def _clean_channel_layer() -> Iterator[None]:
    """Every test starts and ends with none of this run's keys in Redis."""
    yield
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
def signals() -> Iterator[list[dict[str, Any]]]:
    """The presence_changed signals sent during the test, as keyword dicts."""
    received: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        received.append({"sender": sender, **kwargs})

    presence_changed.connect(receiver, dispatch_uid="tests.signals")
    yield received
    presence_changed.disconnect(dispatch_uid="tests.signals")
