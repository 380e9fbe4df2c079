"""Decorators for consumer methods, sync or async: 1.0.0's two, on Channels 4.

``touch_presence`` goes on ``receive(self, text_data=None, bytes_data=None)`` or
on ``receive_json(self, content, **kwargs)``; ``remove_presence`` goes on
``disconnect(self, code)``. Each works on a plain method and on an ``async def``
one, and neither lets a database or channel-layer outage reach the handler.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

from asgiref.sync import iscoroutinefunction

from . import dispatch

Handler = TypeVar("Handler", bound=Callable[..., Any])


def touch_presence(func: Handler) -> Handler:
    """Touch the socket's presences on each received message.

    Touches closer together than CHANNELS_PRESENCE_TOUCH_INTERVAL are coalesced.
    A heartbeat (a text frame, or JSON content, that is the JSON string
    ``"heartbeat"``) is only a touch: the handler is not called. Binary frames
    reach the handler.
    """
    takes_content = _takes_json_content(func)

    if iscoroutinefunction(func):

        @functools.wraps(func)
        async def touch_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            await dispatch.atouch(self)
            if _is_heartbeat(takes_content, args, kwargs):
                return None
            return await func(self, *args, **kwargs)

        return cast(Handler, touch_async)

    @functools.wraps(func)
    def touch_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        dispatch.touch(self)
        if _is_heartbeat(takes_content, args, kwargs):
            return None
        return func(self, *args, **kwargs)

    return cast(Handler, touch_sync)


def remove_presence(func: Handler) -> Handler:
    """Take the socket out of every room, then call the disconnect handler."""
    if iscoroutinefunction(func):

        @functools.wraps(func)
        async def remove_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            await dispatch.aleave_all(self)
            return await func(self, *args, **kwargs)

        return cast(Handler, remove_async)

    @functools.wraps(func)
    def remove_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        dispatch.leave_all(self)
        return func(self, *args, **kwargs)

    return cast(Handler, remove_sync)


def _takes_json_content(func: Callable[..., Any]) -> bool:
    """Whether ``func`` receives decoded JSON (``receive_json``) or raw frames."""
    parameters = inspect.signature(func).parameters
    return "text_data" not in parameters and "bytes_data" not in parameters


def _is_heartbeat(
    takes_content: bool, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    if "text_data" in kwargs or "bytes_data" in kwargs:
        return dispatch.is_heartbeat(kwargs.get("text_data"))
    if takes_content:
        content = args[0] if args else kwargs.get("content")
        return bool(content == dispatch.HEARTBEAT_CONTENT)
    return bool(args) and dispatch.is_heartbeat(args[0])
