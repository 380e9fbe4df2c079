"""Wire protocol 2: member keys, refs, and the frames a socket is sent.

Pure functions and values: no database, no channel layer. DESIGN.md's "Wire
protocol 2" is the specification; in short:

* a *member* is a key (``"u:<pk>"`` for a user, ``"v:<hmac>"`` for an anonymous
  visitor) with one *meta* per socket of that key in the room, each named by a
  *ref*;
* a room has a *version*, bumped by one by each change set that changes its
  presences; a ``presence.state`` is the room at a version, a
  ``presence.diff`` the refs changed from ``from`` to ``version``, each once,
  with its status at ``version``;
* a room with too many members is *unlisted*: its frames carry counts only.

The key and the ref are computed when the socket joins and stored on its
presence, so that a leave always names what joined.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NamedTuple

from django.conf import settings

#: The frame types, as the channel layer's message types and as the client sees them.
STATE = "presence.state"
DIFF = "presence.diff"
VERSION = "presence.version"
EXPIRED = "presence.expired"
ERROR = "presence.error"
#: What a client sends to ask for a fresh state.
SYNC = "presence.sync"

#: Why a presence left, in the leave metas of a diff.
LEFT = "left"
EXPIRED_REASON = "expired"
SERVER_LOST = "server_lost"
REMOVED = "removed"
USER_DELETED = "user_deleted"
REASONS = (LEFT, EXPIRED_REASON, SERVER_LOST, REMOVED, USER_DELETED)

#: The event types a socket's consumer can handle; a presence stores which.
STATE_EVENTS = 1
DIFF_EVENTS = 2
EXPIRED_EVENTS = 4
ALL_EVENTS = STATE_EVENTS | DIFF_EVENTS | EXPIRED_EVENTS
EVENT_NAMES = {"state": STATE_EVENTS, "diff": DIFF_EVENTS, "expired": EXPIRED_EVENTS}

USER_PREFIX = "u:"
VISITOR_PREFIX = "v:"
REF_PREFIX = "r:"
# 128 bits, as hex.
_DIGEST_LENGTH = 32
_VISITOR_SALT = "channels_presence.visitor"
_REF_SALT = "channels_presence.ref"

#: A room lists its members again only below this fraction of both limits.
RELIST_FRACTION = 0.9
#: A listed room may hold this many presences per member key allowed.
SOCKETS_PER_KEY = 4


def _digest(salt: str, *parts: str) -> str:
    """Django's ``salted_hmac(salt, parts, algorithm="sha256")``, 128 bits of it.

    The same construction, with the key it derives from the salt and
    SECRET_KEY kept: a batch computes two digests per join, and deriving the
    key again each time was most of their cost.
    """
    key = _derived_key(salt, settings.SECRET_KEY)
    message = "\0".join(parts).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:_DIGEST_LENGTH]


@functools.lru_cache(maxsize=16)
def _derived_key(salt: str, secret: str) -> bytes:
    return hashlib.sha256((salt + secret).encode()).digest()


def user_key(user_pk: object) -> str:
    """The member key of a logged-in user."""
    return f"{USER_PREFIX}{user_pk}"


def visitor_key(room: str, channel_name: str, session_key: str | None = None) -> str:
    """The member key of an anonymous visitor: per session, else per socket.

    Salted with the room, so that a visitor cannot be followed across rooms.
    """
    identity = session_key if session_key else channel_name
    return VISITOR_PREFIX + _digest(_VISITOR_SALT, room, identity)


def member_key(
    room: str,
    channel_name: str,
    user_pk: object = None,
    session_key: str | None = None,
) -> str:
    """The member key of a socket joining ``room``: its user's, else a visitor's."""
    if user_pk is not None:
        return user_key(user_pk)
    return visitor_key(room, channel_name, session_key)


def presence_ref(room: str, channel_name: str, key: str) -> str:
    """The ref of one socket in one room, under one key.

    The key is part of it: a socket that joins again as another user is a new
    presence, so a diff never names one ref twice.
    """
    return REF_PREFIX + _digest(_REF_SALT, room, channel_name, key)


def is_user_key(key: str) -> bool:
    """Whether ``key`` is a user's (else an anonymous visitor's)."""
    return key.startswith(USER_PREFIX)


def event_mask(subscribe: bool | Iterable[str]) -> int:
    """The event types a joining socket handles: True for all, or their names."""
    if isinstance(subscribe, bool):
        return ALL_EVENTS if subscribe else 0
    if isinstance(subscribe, str):
        raise TypeError(
            f"subscribe takes True, False or a list of event names, not "
            f"{subscribe!r}: write [{subscribe!r}]"
        )
    mask = 0
    for name in subscribe:
        if name not in EVENT_NAMES:
            raise ValueError(
                f"unknown presence event {name!r}: the events are "
                f"{', '.join(EVENT_NAMES)}"
            )
        mask |= EVENT_NAMES[name]
    return mask


class Counts(NamedTuple):
    """A room's totals: distinct users, distinct visitors, and sockets."""

    users: int = 0
    visitors: int = 0
    sockets: int = 0

    @property
    def keys(self) -> int:
        """How many members (user and visitor keys) the room has."""
        return self.users + self.visitors

    def as_dict(self) -> dict[str, int]:
        """The ``counts`` of a frame."""
        return {"users": self.users, "visitors": self.visitors, "sockets": self.sockets}


def is_listed(was_listed: bool, counts: Counts, max_members: int) -> bool:
    """Whether a room lists its members, with hysteresis.

    A listed room stays listed while it has at most ``max_members`` keys and
    ``SOCKETS_PER_KEY`` times that many presences; an unlisted one is listed
    again only once below RELIST_FRACTION of both.
    """
    max_sockets = SOCKETS_PER_KEY * max_members
    if was_listed:
        return counts.keys <= max_members and counts.sockets <= max_sockets
    return (
        counts.keys < RELIST_FRACTION * max_members
        and counts.sockets < RELIST_FRACTION * max_sockets
    )


def timestamp(moment: datetime) -> float:
    """Epoch seconds, as a frame carries ``joined_at``."""
    return moment.timestamp()


def meta(
    ref: str, joined_at: datetime, data: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One socket's meta in a member: its ref, when it joined, and its metadata."""
    return {"ref": ref, "joined_at": timestamp(joined_at), "meta": dict(data or {})}


def _meta_order(item: Mapping[str, Any]) -> tuple[float, str]:
    return (item["joined_at"], item["ref"])


class Entry(NamedTuple):
    """One presence (key, ref) of a room: who, its meta, and why it left, if it did.

    A named tuple: a prune makes one for each of tens of thousands of presences.
    """

    key: str
    user: dict[str, Any] | None
    meta: dict[str, Any]
    reason: str | None = None

    @property
    def present(self) -> bool:
        """Whether the presence is in the room (else it left, for ``reason``)."""
        return self.reason is None


def members(entries: Iterable[Entry]) -> dict[str, dict[str, Any]]:
    """``{key: {"user", "metas"}}`` of the entries, metas by (joined_at, ref).

    A leave's metas carry its ``reason``. The metas of present entries are
    the entries' own dicts, not copies: a frame is serialized, never changed.
    """
    found: dict[str, dict[str, Any]] = {}
    for entry in entries:
        member = found.get(entry.key)
        if member is None:
            member = found[entry.key] = {"user": entry.user, "metas": []}
        if entry.reason is None:
            member["metas"].append(entry.meta)
        else:
            member["metas"].append({**entry.meta, "reason": entry.reason})
    for member in found.values():
        if len(member["metas"]) > 1:
            member["metas"].sort(key=_meta_order)
    return dict(sorted(found.items()))


Members = dict[str, dict[str, Any]]


def state(
    room: str,
    version: int,
    room_members: Iterable[Entry] | Mapping[str, dict[str, Any]] | None,
    counts: Counts,
) -> dict[str, Any]:
    """The ``presence.state`` frame: the room at ``version``.

    ``room_members`` is its entries, or its members as :func:`members` makes
    them; None: the room is unlisted, and the frame carries counts only.
    """
    if room_members is not None and not isinstance(room_members, Mapping):
        room_members = members(room_members)
    return {
        "type": STATE,
        "room": room,
        "version": version,
        "members": None if room_members is None else room_members,
        "counts": counts.as_dict(),
    }


def applied(
    room_members: Mapping[str, dict[str, Any]], entries: Iterable[Entry]
) -> Members:
    """``room_members`` after ``entries``: a new map; the old one is left as it was.

    Present entries are upserted (a ref is one presence), left ones removed,
    and members left without metas dropped: what a client does with a diff,
    done once by the worker that wrote the change.
    """
    result = dict(room_members)
    touched: dict[str, dict[str, Any]] = {}
    for entry in entries:
        member = touched.get(entry.key)
        if member is None:
            old = result.get(entry.key)
            member = {
                "user": old["user"] if old is not None else entry.user,
                "metas": list(old["metas"]) if old is not None else [],
            }
            touched[entry.key] = result[entry.key] = member
        ref = entry.meta["ref"]
        member["metas"] = [meta for meta in member["metas"] if meta["ref"] != ref]
        if entry.present:
            member["user"] = entry.user
            member["metas"].append(entry.meta)
    for key, member in touched.items():
        if member["metas"]:
            member["metas"].sort(key=_meta_order)
        else:
            del result[key]
    return result


def version_beacon(room: str, version: int) -> dict[str, Any]:
    """The ``presence.version`` frame: the room is at ``version``."""
    return {"type": VERSION, "room": room, "version": version}


def expired(room: str) -> dict[str, Any]:
    """The ``presence.expired`` frame: a prune dropped this socket from ``room``."""
    return {"type": EXPIRED, "room": room}


def error(
    code: str, message: str, room: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A ``presence.error`` frame: a refused request, and what to do."""
    frame: dict[str, Any] = {"type": ERROR, "error": code}
    if room is not None:
        frame["room"] = room
    frame.update(extra)
    frame["message"] = message
    return frame


@dataclass(frozen=True)
class Diff:
    """The change sets ``start`` + 1 ... ``version`` of a room, one entry per ref.

    ``start`` is the frame's ``from``. ``listed`` False sends counts only.
    """

    room: str
    start: int
    version: int
    counts: Counts
    listed: bool = True
    entries: Mapping[str, Entry] = field(default_factory=dict)

    def follows(self, earlier: Diff) -> bool:
        """Whether this diff starts where ``earlier`` ends, listed alike."""
        return (
            self.room == earlier.room
            and self.start == earlier.version
            and self.listed == earlier.listed
        )

    def merged(self, later: Diff) -> Diff:
        """This diff and the next one as one: each ref with its status at the end."""
        if not later.follows(self):
            raise ValueError(
                f"diff {later.start}..{later.version} of {later.room!r} does not "
                f"follow {self.start}..{self.version} of {self.room!r}"
            )
        return replace(
            later, start=self.start, entries={**self.entries, **later.entries}
        )

    def frame(self) -> dict[str, Any]:
        """The ``presence.diff`` frame."""
        joins: dict[str, Any] | None = None
        leaves: dict[str, Any] | None = None
        if self.listed:
            entries = self.entries.values()
            joins = members(entry for entry in entries if entry.present)
            leaves = members(entry for entry in entries if not entry.present)
        return {
            "type": DIFF,
            "room": self.room,
            "from": self.start,
            "version": self.version,
            "joins": joins,
            "leaves": leaves,
            "counts": self.counts.as_dict(),
        }


def merge(diffs: Iterable[Diff]) -> list[Diff]:
    """Diffs in order, each run that follows on merged into one."""
    merged: list[Diff] = []
    for diff in diffs:
        if merged and diff.follows(merged[-1]):
            merged[-1] = merged[-1].merged(diff)
        else:
            merged.append(diff)
    return merged


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is an int or a finite float (not a bool)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
