"""Checks on what callers pass in, done before anything is written.

Room and socket names are checked by Channels' own rules (the ones every channel
layer applies), so a name we accept is a name the layer accepts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import cache
from typing import Any

from channels.layers import BaseChannelLayer
from django.contrib.auth import get_user_model

from .conf import conf

#: The events groups of rooms (see ``groups``) are named with this prefix, which
#: room names may therefore not use: a 1.0.0-style consumer in a room named like
#: an events group would be sent presence events it cannot handle.
EVENTS_PREFIX = "presence_events."

#: A regular expression that matches exactly the names :func:`room_name`
#: accepts, for URL patterns that admit no other room:
#: ``re_path(rf"^ws/rooms/(?P<room>{ROOM_NAME_PATTERN})/$", ...)``. Channels'
#: group-name rule (ASCII letters, "-", "_", ".", and digits as Python's ``\d``
#: reads them), shorter than its name limit, outside the events groups' prefix.
ROOM_NAME_PATTERN = (
    f"(?!{re.escape(EVENTS_PREFIX)})"
    rf"[-a-zA-Z\d_.]{{1,{BaseChannelLayer.MAX_NAME_LENGTH - 1}}}"
)


@cache
def _rules() -> BaseChannelLayer:
    # The base layer carries Channels' name rules and needs no configuration.
    return BaseChannelLayer()


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _usable(
    name: object, what: str, kind: str, require: Callable[[str], object], hint: str = ""
) -> str:
    """Return ``name`` if Channels accepts it as a ``kind`` name, else raise."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    try:
        require(name)
        # Channels checks names with re.match and "$", which also matches
        # before a final newline; its own rule allows none.
        if name.endswith("\n"):
            raise TypeError(_rules().invalid_name_error.format(kind))
    except TypeError as error:
        raise ValueError(
            f"{what} {_shown(name)} is not a valid Channels {kind.lower()} name: "
            f"{error}{hint}"
        ) from None
    return name


def room_name(name: object) -> str:
    """Return ``name`` if Channels can use it as a group name, else raise."""
    name = _usable(name, "room name", "Group", _rules().require_valid_group_name)
    if name.startswith(EVENTS_PREFIX):
        raise ValueError(
            f"room name {_shown(name)} starts with {EVENTS_PREFIX!r}, which is "
            "reserved for channels_presence's events groups: choose another name"
        )
    return name


def channel_name(name: object) -> str:
    """Return ``name`` if Channels can use it as a channel name, else raise."""
    return _usable(
        name,
        "channel name",
        "Channel",
        _rules().require_valid_channel_name,
        " (pass the consumer's self.channel_name)",
    )


def channel_names(names: object) -> list[str]:
    """Return ``names`` as a list if each one is a valid channel name, else raise."""
    if isinstance(names, str | bytes | bytearray) or not hasattr(names, "__iter__"):
        raise TypeError(
            f"channel names must be a list of str, not {type(names).__name__}"
        )
    return [channel_name(name) for name in names]


#: Longest server id, the length of ``Presence.server``.
SERVER_MAX_LENGTH = 100


def server(name: object) -> str:
    """Return ``name`` if it can be stored as a server id ("" for none), else raise."""
    if not isinstance(name, str):
        raise TypeError(
            f"server must be a server id (a str, '' for none), not {_shown(name)}"
        )
    if len(name) > SERVER_MAX_LENGTH or not name.isprintable():
        raise ValueError(
            f"server {_shown(name)} is not a usable server id: use at most "
            f"{SERVER_MAX_LENGTH} printable characters (leases.default.server() "
            "makes one)"
        )
    return name


def user_id(user: Any) -> int | None:
    """The primary key to store for ``user``; None for an anonymous presence.

    ``None`` and anything that is not authenticated (``AnonymousUser``) are
    anonymous; a saved instance of the user model is stored by its key.
    """
    if user is None or getattr(user, "is_authenticated", None) is False:
        return None
    user_model = get_user_model()
    if not isinstance(user, user_model):
        raise TypeError(
            f"user must be a saved {user_model.__name__}, None or AnonymousUser, "
            f"not {type(user).__name__}"
        )
    if user._state.adding or user.pk is None:
        raise ValueError(
            f"user {_shown(user)} has not been saved: save it first, or pass None "
            "for an anonymous presence"
        )
    pk: int = user.pk
    return pk


def age(seconds: object) -> float:
    """Return ``seconds`` as a float age, or the configured MAX_AGE for None."""
    if seconds is None:
        seconds = conf.MAX_AGE
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"age must be a number of seconds, not {_shown(seconds)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"age must be a finite number of seconds, 0 or more, not {_shown(seconds)}"
        )
    return float(seconds)
