"""The built-in presence_changed receiver: tell a room's subscribers what changed.

Each change becomes one message to the room's events group (see ``groups``),
holding plain values only: the room, who was added or removed, and the members
as they are now (users by id and username, anonymous visitors as a count).

Inside an operation the receiver does not send at once: it collects, so that the
members of every changed room are read in one query and sent in one trip to the
channel layer, however many rooms the operation touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.contrib.auth import get_user_model

from . import groups
from .conf import conf

if TYPE_CHECKING:
    from .models import Presence, Room

#: The message type of a change, sent to a room's events group.
EVENT_TYPE = "presence.changed"
#: The message type telling a room's stale sockets that a prune dropped them.
EXPIRED_TYPE = "presence.expired"


@dataclass(frozen=True)
class Change:
    """One change of one room, as presence_changed announces it."""

    room: Room
    added: Presence | None = None
    removed: Presence | None = None
    bulk_change: bool = False


_collected: ContextVar[list[Change] | None] = ContextVar(
    "channels_presence_collected", default=None
)


@contextmanager
def collecting() -> Iterator[list[Change]]:
    """Collect the changes the receiver sees in this block instead of sending them."""
    changes: list[Change] = []
    token = _collected.set(changes)
    try:
        yield changes
    finally:
        _collected.reset(token)


def broadcast_presence_changed(
    sender: type[Room],
    room: Room,
    added: Presence | None = None,
    removed: Presence | None = None,
    bulk_change: bool = False,
    **kwargs: Any,
) -> None:
    """Receiver of presence_changed: send the change to the room's events group."""
    if not conf.BROADCAST:
        return
    change = Change(room, added, removed, bulk_change)
    collected = _collected.get()
    if collected is not None:
        collected.append(change)
        return
    # Sent outside an operation, e.g. by a direct room.broadcast_changed() call.
    groups.run_sync(groups.send, groups.get_layer(), messages([change]))


def messages(changes: list[Change]) -> list[tuple[str, dict[str, Any]]]:
    """The (group, message) pairs for ``changes``; one query for all the rooms."""
    if not changes:
        return []
    members = _members({change.room.pk for change in changes})
    return [
        (
            groups.events_group(change.room.channel_name),
            {
                "type": EVENT_TYPE,
                "room": change.room.channel_name,
                "added": _describe(change.added),
                "removed": _describe(change.removed),
                "bulk_change": change.bulk_change,
                **members[change.room.pk],
            },
        )
        for change in changes
    ]


def expired(room: Room, channel_names: list[str]) -> tuple[str, dict[str, Any]]:
    """The notice, one per room, naming the sockets a prune is about to drop."""
    return (
        groups.events_group(room.channel_name),
        {
            "type": EXPIRED_TYPE,
            "room": room.channel_name,
            "channel_names": channel_names,
        },
    )


def _members(room_ids: set[int]) -> dict[int, dict[str, Any]]:
    presence_model = apps.get_model("channels_presence", "Presence")
    username = "user__" + get_user_model().USERNAME_FIELD
    rows = presence_model.objects.filter(room_id__in=room_ids).values_list(
        "room_id", "user_id", username
    )
    users: dict[int, dict[int, str]] = {room_id: {} for room_id in room_ids}
    anonymous = dict.fromkeys(room_ids, 0)
    for room_id, user_id, name in rows:
        if user_id is None:
            anonymous[room_id] += 1
        else:
            users[room_id][user_id] = str(name)
    return {
        room_id: {
            "members": [
                {"id": user_id, "username": name}
                for user_id, name in sorted(by_user.items(), key=lambda i: i[1])
            ],
            "anonymous": anonymous[room_id],
        }
        for room_id, by_user in users.items()
    }


def _describe(presence: Presence | None) -> dict[str, Any] | None:
    if presence is None:
        return None
    user = presence.user if type(presence).user.is_cached(presence) else None
    return {
        "channel_name": presence.channel_name,
        "user_id": presence.user_id,
        "username": user.get_username() if user is not None else None,
    }
