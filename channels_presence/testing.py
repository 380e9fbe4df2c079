"""Test helpers: a client's view of a room, reduced from frames as presence.js does;
and what a channel received, read from sync code.

Feed :class:`RoomView` the frames one socket received for one room, in the order
it received them, and compare its ``members`` with :func:`members_now`, what the
database says, to check that a client converges to the rows::

    view = RoomView("lobby")
    for frame in frames:
        view.receive(frame)
    assert view.members == members_now("lobby")

The rules are DESIGN.md's "The client", the same as presence.js's
``createView()`` (``tests/protocol_cases.json`` runs both): a state replaces the
view unless older; a diff applies when ``from`` <= version < its ``version``,
later ones wait for the gap to fill, older ones are dropped; unlisted frames
set the members to None. What a client does with time (sync after a gap that
lasts a second) is left to the test: :attr:`RoomView.gap` and
:attr:`RoomView.behind` say when it would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from . import groups, operations, protocol

Members = dict[str, dict[str, Any]]


class RoomView:
    """One room as one client sees it, and what each applied frame changed.

    ``log=False`` keeps no ``applied`` log: a client of a room of thousands
    that needs only the view (a benchmark's) spends nothing on it. Such a
    view applies a diff to its members in place: a ``members`` map read from
    it changes with it.
    """

    def __init__(self, room: str, *, log: bool = True) -> None:
        self.room = room
        self._log = log
        self._version: int | None = None
        self._members: Members | None = None
        # Which key holds each ref of the members (built when first needed).
        self._refs: dict[str, str] | None = None
        self._counts: dict[str, int] | None = None
        # Whether members were ever known: before that a state compares with nobody.
        self._known = False
        # Diffs not applied yet, in (version, from) order.
        self._kept: list[dict[str, Any]] = []
        self._beacon: int | None = None
        #: A listed diff reached a view with null members (it must sync).
        self.listed_while_null = False
        #: Each state or diff applied: ``{type, version, joins, leaves}``, with
        #: joins ``{key: [refs]}`` of the keys that arrived and leaves
        #: ``{key: [{ref, reason}]}`` of those that left.
        self.applied: list[dict[str, Any]] = []

    @property
    def version(self) -> int | None:
        """The view's version; None before the first state, and after expiry."""
        return self._version

    @property
    def members(self) -> Members | None:
        """``{key: {"user", "metas"}}``; None while unlisted or without a state."""
        return None if self._version is None else self._members

    @property
    def counts(self) -> dict[str, int] | None:
        """The room's counts as the last frame applied gave them."""
        return None if self._version is None else self._counts

    @property
    def gap(self) -> bool:
        """Whether diffs wait that cannot apply yet (a client syncs after 1 s)."""
        return self._version is not None and bool(self._kept)

    @property
    def behind(self) -> bool:
        """Whether a beacon is ahead of the view (a client syncs after 1 s)."""
        return (
            self._version is not None
            and self._beacon is not None
            and self._beacon > self._version
        )

    def receive(self, frame: dict[str, Any]) -> None:
        """Reduce one frame; frames of other rooms or types are ignored."""
        if frame.get("room") != self.room:
            return
        kind = frame.get("type")
        if kind == protocol.STATE:
            self._state(frame)
        elif kind == protocol.DIFF:
            self._diff(frame)
        elif kind == protocol.VERSION:
            if self._version is not None and frame["version"] > self._version:
                self._beacon = max(self._beacon or 0, frame["version"])
        elif kind == protocol.EXPIRED:
            # Forgotten; the members stay, unseen, as the last known.
            self._version = None
            self._kept = []
            self._beacon = None
            self.listed_while_null = False

    def _state(self, frame: dict[str, Any]) -> None:
        if self._version is not None and frame["version"] < self._version:
            return
        before = self._members if self._known else {}
        members = frame["members"]
        self._members = None if members is None else _members_of(members)
        self._refs = None
        self._version = frame["version"]
        self._counts = frame["counts"]
        self._known = True
        self.listed_while_null = False
        self._record("state", before, None)
        self._drain()

    def _diff(self, frame: dict[str, Any]) -> None:
        if self._version is not None and frame["version"] <= self._version:
            return
        at = 0
        while at < len(self._kept) and (
            self._kept[at]["version"],
            self._kept[at]["from"],
        ) < (
            frame["version"],
            frame["from"],
        ):
            at += 1
        twin = self._kept[at] if at < len(self._kept) else None
        if not (
            twin is not None
            and twin["version"] == frame["version"]
            and twin["from"] == frame["from"]
        ):
            self._kept.insert(at, frame)
        if self._version is not None:
            self._drain()

    def _drain(self) -> None:
        assert self._version is not None
        index = 0
        while index < len(self._kept):
            diff = self._kept[index]
            if diff["version"] <= self._version:
                del self._kept[index]
            elif diff["from"] <= self._version:
                del self._kept[index]
                self._apply(diff)
                index = 0
            else:
                index += 1

    def _apply(self, diff: dict[str, Any]) -> None:
        before = self._members
        lost: dict[str, list[dict[str, Any]]] | None = None
        if diff["joins"] is None or diff["leaves"] is None:
            self._members = None
            self._refs = None
            self.listed_while_null = False
        elif self._members is None:
            self.listed_while_null = True
        else:
            if self._refs is None:
                self._refs = _refs_of(self._members)
            # Without a log nobody holds the members before: change them in place.
            self._members, lost = _listed(
                self._members, diff, self._refs, in_place=not self._log
            )
        self._version = diff["version"]
        self._counts = diff["counts"]
        self._record("diff", before, lost)

    def _record(
        self,
        kind: str,
        before: Members | None,
        lost: dict[str, list[dict[str, Any]]] | None,
    ) -> None:
        if not self._log:
            return
        after = self._members
        joins: dict[str, list[str]] = {}
        leaves: dict[str, list[dict[str, Any]]] = {}
        # Between a map and None (unlisted) nobody is known to have come or gone.
        if before is not None and after is not None:
            for key in sorted(after.keys() - before.keys()):
                joins[key] = [meta["ref"] for meta in after[key]["metas"]]
            for key in sorted(before.keys() - after.keys()):
                metas = (
                    sorted(lost[key], key=_order)
                    if lost and key in lost
                    else (before[key]["metas"])
                )
                leaves[key] = [
                    {"ref": meta["ref"], "reason": meta.get("reason")} for meta in metas
                ]
        self.applied.append(
            {"type": kind, "version": self._version, "joins": joins, "leaves": leaves}
        )


def _order(meta: dict[str, Any]) -> tuple[float, str]:
    return (meta["joined_at"], meta["ref"])


def _members_of(members: Members) -> Members:
    # Members of one meta (most) are taken as they are: a diff copies the
    # members it changes (see _listed), so the view never writes to a frame.
    return {
        key: member
        if len(member["metas"]) == 1
        else {"user": member["user"], "metas": sorted(member["metas"], key=_order)}
        for key, member in members.items()
        if member["metas"]
    }


def _refs_of(members: Members) -> dict[str, str]:
    return {meta["ref"]: key for key, m in members.items() for meta in m["metas"]}


def _listed(
    members: Members,
    diff: dict[str, Any],
    refs: dict[str, str] | None = None,
    *,
    in_place: bool = False,
) -> tuple[Members, dict[str, list[dict[str, Any]]]]:
    """``members`` with a listed diff applied, and the metas each key lost.

    ``members`` is left as it was, unless ``in_place``: the keys the diff
    touches are copied either way (they may be a frame's). ``refs`` (which
    key holds each ref of ``members``) is updated to match the result;
    without it, it is built here. In place, a diff costs what it touches,
    not the room's size: a client of a room of thousands gets many.
    """
    after = members if in_place else dict(members)
    refs = _refs_of(members) if refs is None else refs
    copied: set[str] = set()
    lost: dict[str, list[dict[str, Any]]] = {}

    def own(key: str, user: Any = None) -> dict[str, Any]:
        if key not in copied:
            copied.add(key)
            found = after.get(key)
            after[key] = (
                {"user": user, "metas": []}
                if found is None
                else {**found, "metas": list(found["metas"])}
            )
        return after[key]

    def remove(key: str, ref: str, reported: dict[str, Any] | None = None) -> None:
        metas = own(key)["metas"]
        for index, meta in enumerate(metas):
            if meta["ref"] == ref:
                lost.setdefault(key, []).append(reported or meta)
                del metas[index]
                break
        refs.pop(ref, None)

    for member in diff["leaves"].values():
        for meta in member["metas"]:
            if meta["ref"] in refs:
                remove(refs[meta["ref"]], meta["ref"], meta)
    for key, member in diff["joins"].items():
        target = own(key, member["user"])
        target["user"] = member["user"]
        for meta in member["metas"]:
            holder = refs.get(meta["ref"])
            if holder is not None and holder != key:
                # A ref is unique in a room: under another key, it moved here.
                remove(holder, meta["ref"])
            target["metas"] = [m for m in target["metas"] if m["ref"] != meta["ref"]]
            target["metas"].append(meta)
            refs[meta["ref"]] = key
    for key in copied:
        if after[key]["metas"]:
            after[key]["metas"].sort(key=_order)
        else:
            del after[key]
    return after, lost


def members_now(room: str) -> Members | None:
    """The room's members as its rows are now, as a state would carry them."""
    members: Members | None = operations.read_state(room)["members"]
    return members


def channel_messages(
    channel: str, layer: Any = None, *, wait: float = 0.2
) -> list[dict[str, Any]]:
    """The messages that reached ``channel`` so far, oldest first, taken from Redis.

    For sync tests, without the layer's receive(): that keeps per-event-loop
    state, and sync code that calls it through async_to_sync runs each call
    on a new loop, which channels_redis does not support (messages come out
    twice or not at all). The channels of a process share one Redis key: the
    messages of the others are kept for their own turn.

    That reading of channels_redis's keys is its fast path
    (``groups.FAST_PATH_VERSIONS``). Any other layer, channels_redis at
    another release among them, is read through its public ``receive()``
    until it has been quiet for ``wait`` seconds, all in one event loop for
    the call (so that no loop's state is carried into the next call);
    channels_redis's receive then takes only the channels of that layer's
    own ``new_channel()``.
    """
    layer = layer or get_channel_layer()
    if not groups.fast_path(layer):
        received: list[dict[str, Any]] = async_to_sync(_receive_all)(
            layer, channel, wait
        )
        return received
    name = layer.non_local_name(channel)
    key = layer.prefix + name
    client = redis.Redis.from_url(layer.hosts[layer.consistent_hash(name)]["address"])
    try:
        pipe = client.pipeline()
        pipe.zrange(key, 0, -1)
        pipe.delete(key)
        raw, _ = pipe.execute()
    finally:
        client.close()
    kept = _KEPT.setdefault(id(layer), [])
    for item in raw:
        message = layer.deserialize(item)
        targets = message.pop("__asgi_channel__", channel)
        for target in targets if isinstance(targets, list) else [targets]:
            kept.append((target, message))
    mine = [message for target, message in kept if target == channel]
    kept[:] = [(target, message) for target, message in kept if target != channel]
    return mine


_KEPT: dict[int, list[tuple[str, dict[str, Any]]]] = {}


async def _receive_all(layer: Any, channel: str, wait: float) -> list[dict[str, Any]]:
    """What ``channel`` receives until nothing comes for ``wait`` seconds."""
    found = []
    while True:
        try:
            async with asyncio.timeout(wait):
                found.append(await layer.receive(channel))
        except TimeoutError:
            return found
