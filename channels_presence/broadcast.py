"""The built-in presence_changed receiver: tell a room's subscribers what changed.

Each change becomes one message to the room's events group (see ``groups``),
holding plain values only: the room, who was added or removed, and the members
as they are now (users as :func:`member_fields` says, by default by id and
username, anonymous visitors as a count).

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
from django.db import models

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


def member_fields() -> dict[str, str]:
    """What each member of a room is sent as: ``{payload key: user field}``.

    CHANNELS_PRESENCE_MEMBER_FIELDS, else ``{"id": "pk", "username":
    USERNAME_FIELD}``; but a USERNAME_FIELD that is an email field is left out
    (``{"id": "pk"}``), for every member of a room sees every other member.
    """
    configured = conf.MEMBER_FIELDS
    if configured is not None:
        return dict(configured)
    user_model = get_user_model()
    fields = {"id": "pk"}
    username = user_model.USERNAME_FIELD
    if not isinstance(user_model._meta.get_field(username), models.EmailField):
        fields["username"] = username
    return fields


def _members(room_ids: set[int]) -> dict[int, dict[str, Any]]:
    presence_model = apps.get_model("channels_presence", "Presence")
    fields = member_fields()
    rows = presence_model.objects.filter(room_id__in=room_ids).values_list(
        "room_id", "user_id", *("user__" + field for field in fields.values())
    )
    users: dict[int, dict[int, tuple[Any, ...]]] = {room_id: {} for room_id in room_ids}
    anonymous = dict.fromkeys(room_ids, 0)
    for room_id, user_id, *values in rows:
        if user_id is None:
            anonymous[room_id] += 1
        else:
            users[room_id][user_id] = tuple(map(_plain, values))
    return {
        room_id: {
            "members": [
                dict(zip(fields, values, strict=True))
                for _, values in sorted(by_user.items(), key=_member_order)
            ],
            "anonymous": anonymous[room_id],
        }
        for room_id, by_user in users.items()
    }


def _member_order(item: tuple[int, tuple[Any, ...]]) -> tuple[list[str], int]:
    # By what the members are shown as (the id last), as a member list reads.
    user_id, values = item
    return [str(value) for value in values[1:] + values[:1]], user_id


def _plain(value: Any) -> Any:
    # Only what every channel layer can serialize, and JSON too.
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _describe(presence: Presence | None) -> dict[str, Any] | None:
    if presence is None:
        return None
    user = presence.user if type(presence).user.is_cached(presence) else None
    described: dict[str, Any] = {
        "channel_name": presence.channel_name,
        "user_id": presence.user_id,
    }
    for key, field in member_fields().items():
        if key not in described and field != "pk":
            described[key] = _plain(_lookup(user, field)) if user is not None else None
    return described


def _lookup(user: Any, field: str) -> Any:
    value = user
    for part in field.split("__"):
        value = getattr(value, part, None)
    return value
