"""1.0.0's convenience disconnect handler, for sync and async consumers alike."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from . import dispatch


def ws_disconnect(self: Any, code: int | None = None) -> Awaitable[None] | None:
    """Take the socket out of every room: ``disconnect = ws_disconnect``.

    Works as the ``disconnect`` of a ``WebsocketConsumer`` (called in a worker
    thread, it leaves at once) and of an ``AsyncWebsocketConsumer`` (called on
    the event loop, it returns the leaving for the consumer to await).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        dispatch.leave_all(self)
        return None
    return dispatch.aleave_all(self)
