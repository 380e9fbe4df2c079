"""Channel-layer calls: which groups a socket is in, and sending to them.

Each room is a Channels group named like the room; every socket present in the
room is in it, so the room's own messages reach its members (1.0.0's contract).
Presence events go to a second group per room, the *events group*, which only
sockets that asked for them join: Channels closes a consumer that receives a
message type it has no handler for, so a 1.0.0-style consumer must never get one.

On channels_redis's own layer, at a release that a test pins
(``FAST_PATH_VERSIONS``), adds, discards and sends go straight to its keys, in
pipelines, with a copy of its send script: the *fast path*. Every other layer,
and channels_redis at any other release, takes the public API (``group_add``,
``group_discard``, ``group_send``, ``send``): correct everywhere, only slower.
:func:`fast_path` decides, and every use of channels_redis's internals asks it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.metadata
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, ParamSpec, TypeGuard, TypeVar

import redis
from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, get_channel_layer
from channels_redis.core import RedisChannelLayer
from django.core.exceptions import ImproperlyConfigured
from redis.exceptions import RedisError

from . import sentinel
from .protocol import DIFF_EVENTS
from .validation import EVENTS_PREFIX

logger = logging.getLogger("channels_presence")

# How many channel-layer calls one batch keeps in flight at once.
CONCURRENCY = 64
# How many group calls go to Redis in one pipeline.
PIPELINE_SIZE = 1_000

#: What a channel layer that is down or unreachable raises.
UNAVAILABLE = (RedisError, OSError, TimeoutError)


#: The channels-redis releases whose internals the fast path copies, from the
#: first to the last, both included: their group_add, group_discard,
#: group_send, send and receive, key layout and shard hash are the same, and
#: tests/test_groups.py (which meets the fast path with channels_redis's own
#: calls both ways) passed on each of 4.0.0, 4.1.0, 4.2.0, 4.2.1 and 4.3.0. A
#: later release, even a bugfix one, takes the public API until that test has
#: passed on it and this range names it: a layout changed under the fast path
#: would lose messages silently, where the public path only costs round trips.
#: (pyproject.toml leaves channels-redis uncapped for that reason: a new
#: release must work, just not fast until it is pinned.)
FAST_PATH_VERSIONS: tuple[tuple[int, int, int], tuple[int, int, int]] = (
    (4, 0, 0),
    (4, 3, 0),
)


def fast_path(layer: BaseChannelLayer) -> TypeGuard[RedisChannelLayer]:
    """Whether channels_redis's internals may be used on ``layer``.

    Only on ``RedisChannelLayer`` itself, not a subclass: a subclass exists to
    change something (its keys, its serializer, what its group_send does),
    and the fast path would skip that without a word. And only while the
    installed channels-redis is a release of ``FAST_PATH_VERSIONS``.
    """
    if type(layer) is not RedisChannelLayer:
        return False
    release = _installed_channels_redis()
    low, high = FAST_PATH_VERSIONS
    return release is not None and low <= release <= high


@functools.cache
def _installed_channels_redis() -> tuple[int, int, int] | None:
    """The installed channels-redis release, read once; None if not a final one."""
    try:
        return _release(importlib.metadata.version("channels-redis"))
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, int, int] | None:
    """``(4, 3, 0)`` for "4.3.0" or "4.3"; None for a pre-, post-, dev or local
    release, which no test can have pinned."""
    found = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if found is None:
        return None
    major, minor, patch = found.groups()
    return int(major), int(minor), int(patch or 0)


P = ParamSpec("P")
T = TypeVar("T")

# Whether run_sync keeps an event loop per thread: only in a process that runs
# tasks for a Celery worker (see tasks.py), where nothing else uses the layer.
_keeping_loops = False
_loops = threading.local()


def keep_loops() -> None:
    """Let :func:`run_sync` reuse one event loop per thread in this process.

    For a Celery worker's task processes, on a layer without the fast path
    (whose calls go through blocking clients there, see :func:`add_now`).
    There ``async_to_sync`` would make a new event loop for every
    channel-layer call, and a layer new connections for every loop. Elsewhere it
    stays off: a layer whose pools live in a loop of ours could no longer be
    flushed from another loop (``async_to_sync(layer.flush)()``), as tests do.
    """
    global _keeping_loops
    _keeping_loops = True


def run_sync(
    call: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
) -> T:
    """``async_to_sync(call)(*args, **kwargs)``, on a kept loop if allowed.

    Under ``sync_to_async`` (a consumer's thread) it is always
    ``async_to_sync``, which runs the call on the consumer's own loop.
    """
    if not _keeping_loops or _under_an_event_loop():
        return async_to_sync(call)(*args, **kwargs)
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    # A forked child makes its own: its parent's connections are not its own.
    if loop is None or loop.is_closed() or _loops.pid != os.getpid():
        loop = _loops.loop = asyncio.new_event_loop()
        _loops.pid = os.getpid()
    return loop.run_until_complete(call(*args, **kwargs))


def _under_an_event_loop() -> bool:
    from asgiref.sync import SyncToAsync

    threadlocal = SyncToAsync.threadlocal
    return (
        getattr(threadlocal, "main_event_loop", None) is not None
        and getattr(threadlocal, "main_event_loop_pid", None) == os.getpid()
    )


def get_layer(channel_layer: BaseChannelLayer | None = None) -> BaseChannelLayer:
    """The channel layer to use: ``channel_layer`` if given, else the default one.

    Resolved at each call, so ``override_settings(CHANNEL_LAYERS=...)`` applies.
    """
    if channel_layer is not None:
        return channel_layer
    layer = get_channel_layer()
    if layer is None:
        raise ImproperlyConfigured(
            "channels_presence needs a channel layer: configure "
            "CHANNEL_LAYERS['default'] in your settings, e.g. with "
            "'channels_redis.core.RedisChannelLayer'."
        )
    return layer


def events_group(room_name: str) -> str:
    """The group that receives the presence events of ``room_name``."""
    name = EVENTS_PREFIX + room_name
    if len(name) < BaseChannelLayer.MAX_NAME_LENGTH:
        return name
    # Too long for Channels once prefixed: a digest stays unique and short.
    return EVENTS_PREFIX + hashlib.sha256(room_name.encode()).hexdigest()


async def join(
    layer: BaseChannelLayer, room_name: str, channel_name: str, *, subscribe: bool
) -> None:
    """Put a socket in a room's group, and in its events group if it subscribes."""
    await add(layer, [(room_name, channel_name, DIFF_EVENTS if subscribe else 0)])


async def add(layer: BaseChannelLayer, joins: Iterable[tuple[str, str, int]]) -> None:
    """Put each (room, socket, events) in the room's group, and in its events
    group if it handles diffs (``protocol.DIFF_EVENTS``): one round trip."""
    calls = _added(joins)
    if fast_path(layer):
        await _pipelined(layer, _group_commands(layer, ADD, calls))
    else:
        await _in_batches(layer.group_add(g, c) for g, c in calls)


async def leave(layer: BaseChannelLayer, pairs: Iterable[tuple[str, str]]) -> None:
    """Take each (room, socket) pair out of the room's group and events group."""
    calls = _left(pairs)
    if fast_path(layer):
        await _pipelined(layer, _group_commands(layer, DISCARD, calls))
    else:
        await _in_batches(layer.group_discard(g, c) for g, c in calls)


def add_now(layer: BaseChannelLayer, joins: Iterable[tuple[str, str, int]]) -> None:
    """:func:`add`, from sync code (a sync consumer's thread, a worker).

    On the fast path the same commands go through a blocking Redis
    client of this process: ``async_to_sync`` would hop to an event loop and
    back, which costs more than the round trip itself.
    """
    joins = list(joins)
    if not _now(layer, ADD, _added(joins)):
        run_sync(add, layer, joins)


def leave_now(layer: BaseChannelLayer, pairs: Iterable[tuple[str, str]]) -> None:
    """:func:`leave`, from sync code; see :func:`add_now`."""
    pairs = list(pairs)
    if not _now(layer, DISCARD, _left(pairs)):
        run_sync(leave, layer, pairs)


def refresh_now(layer: BaseChannelLayer, joins: Iterable[tuple[str, str, int]]) -> bool:
    """Refresh each (room, socket, events) membership, from sync code.

    channels_redis drops a group member whose score is older than the
    layer's ``group_expiry`` at the group's next send. On channels_redis the
    scores of members still there are set to now (``ZADD XX``: a socket
    discarded meanwhile is not put back), and the groups' keys live another
    ``group_expiry``; returns True. Elsewhere it is ``group_add``, which can
    put back a socket that left meanwhile: returns False, and the caller
    checks.
    """
    joins = list(joins)
    if _now(layer, REFRESH, _added(joins)):
        return True
    run_sync(add, layer, joins)
    return False


def _now(layer: BaseChannelLayer, operation: str, calls: list[tuple[str, str]]) -> bool:
    """Run ``operation`` on blocking clients; False if the layer has none."""
    clients = _blocking_clients(layer)
    if clients is None:
        return False
    _pipelined_now(clients, _group_commands(layer, operation, calls))
    return True


def _added(joins: Iterable[tuple[str, str, int]]) -> list[tuple[str, str]]:
    return [
        (group, channel_name)
        for room_name, channel_name, events in joins
        for group in (
            [room_name, events_group(room_name)]
            if events & DIFF_EVENTS
            else [room_name]
        )
    ]


def _left(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        (group, channel_name)
        for room_name, channel_name in pairs
        for group in (room_name, events_group(room_name))
    ]


#: Seconds a blocking client waits for Redis before it fails, unless the
#: layer's host says otherwise: a socket's thread must not hang on it.
BLOCKING_TIMEOUT = 5.0

#: Each channels_redis layer's blocking clients, one per shard, or None when
#: a host is of a kind they cannot be made for.
_BLOCKING: weakref.WeakKeyDictionary[RedisChannelLayer, list[redis.Redis] | None] = (
    weakref.WeakKeyDictionary()
)

_BLOCKING_MADE = threading.Lock()


def _blocking_clients(layer: BaseChannelLayer) -> list[redis.Redis] | None:
    """Blocking clients of the layer's shards, made once per layer and process.

    None off the fast path: they write channels_redis's keys themselves.
    """
    if not fast_path(layer):
        return None
    if layer in _BLOCKING:
        # Every sync consumer's join and leave asks: no lock once made.
        return _BLOCKING[layer]
    with _BLOCKING_MADE:
        # A worker's thread and its throttle's timer may ask at once.
        if layer not in _BLOCKING:
            found = [_blocking_client(host) for host in layer.hosts]
            clients = [client for client in found if client is not None]
            _BLOCKING[layer] = clients if len(clients) == len(found) else None
        return _BLOCKING[layer]


def _blocking_client(host: Any) -> redis.Redis | None:
    """A redis-py client of a channels_redis host, or None if it has no URL."""
    if not isinstance(host, dict):
        return None
    if sentinel.is_sentinel(host):
        return sentinel.client(host, BLOCKING_TIMEOUT)
    options = dict(host)
    address = options.pop("address", None)
    if not isinstance(address, str):
        return None
    options.setdefault("socket_timeout", BLOCKING_TIMEOUT)
    options.setdefault("socket_connect_timeout", BLOCKING_TIMEOUT)
    try:
        return redis.Redis.from_url(address, **options)
    except (TypeError, ValueError):
        return None


ADD = "add"
DISCARD = "discard"
REFRESH = "refresh"


def _group_commands(
    layer: RedisChannelLayer, operation: str, calls: list[tuple[str, str]]
) -> list[Command]:
    """``group_add`` or ``group_discard`` of each (group, socket), as commands.

    channels_redis makes each group_add two round trips (ZADD, then EXPIRE)
    and each discard one: a mixin's join would wait for four, a prune of
    thousands of sockets for twice as many. The same changes, on the same
    keys as channels_redis's, go as one ZADD (and EXPIRE) or
    ZREM per group naming its sockets, in one pipeline per shard and
    PIPELINE_SIZE sockets.
    """
    by_group: dict[str, list[str]] = {}
    for group, channel_name in calls:
        by_group.setdefault(group, []).append(channel_name)
    now = time.time()

    def command(key: bytes, channel_names: list[str]) -> Callable[[Any], None]:
        def add(pipe: Any) -> None:
            if operation in (ADD, REFRESH):
                members = dict.fromkeys(channel_names, now)
                pipe.zadd(key, members, xx=operation == REFRESH)
                pipe.expire(key, layer.group_expiry)
            else:
                pipe.zrem(key, *channel_names)

        return add

    return [
        (
            layer.consistent_hash(group),
            len(part),
            command(layer._group_key(group), part),
        )
        for group, names in by_group.items()
        for part in _parts(names)
    ]


# A command for _pipelined: the shard it goes to, its weight (how many items
# it names), and what it adds to that shard's pipeline.
Command = tuple[int, int, Callable[[Any], None]]


async def _pipelined(
    layer: RedisChannelLayer, commands: Iterable[Command]
) -> list[Any]:
    """Run the commands, one pipeline per shard and PIPELINE_SIZE of weight.

    CONCURRENCY pipelines are in flight at once. Returns, for each command,
    the replies of what it added, in the order of ``commands``.
    """
    jobs = list(commands)
    chunks = _chunks(jobs)
    replies: list[Any] = [None] * len(jobs)

    async def run(shard: int, numbers: list[int]) -> None:
        async with layer.connection(shard).pipeline(transaction=False) as pipe:
            bounds = _fill(pipe, jobs, numbers)
            _spread(replies, bounds, await pipe.execute())

    await _in_batches(
        run(shard, numbers) for shard, chunk in chunks.items() for numbers in chunk
    )
    return replies


def _pipelined_now(clients: list[redis.Redis], commands: list[Command]) -> list[Any]:
    """:func:`_pipelined` on blocking clients, one pipeline after another."""
    replies: list[Any] = [None] * len(commands)
    for shard, chunk in _chunks(commands).items():
        for numbers in chunk:
            pipe = clients[shard].pipeline(transaction=False)
            bounds = _fill(pipe, commands, numbers)
            _spread(replies, bounds, pipe.execute())
    return replies


def _fill(
    pipe: Any, commands: list[Command], numbers: list[int]
) -> list[tuple[int, int, int]]:
    """Add the commands of ``numbers`` to ``pipe``; where each one's replies are."""
    bounds = []
    for number in numbers:
        start = len(pipe)
        commands[number][2](pipe)
        bounds.append((number, start, len(pipe)))
    return bounds


def _spread(
    replies: list[Any], bounds: list[tuple[int, int, int]], results: list[Any]
) -> None:
    """Each command's replies, from its pipeline's results, into ``replies``."""
    for number, start, end in bounds:
        replies[number] = results[start:end]


def _chunks(jobs: list[Command]) -> dict[int, list[list[int]]]:
    """The jobs' numbers, by shard, in chunks of PIPELINE_SIZE weight at most."""
    chunks: dict[int, list[list[int]]] = {}
    weights: dict[int, int] = {}
    for number, (shard, weight, _) in enumerate(jobs):
        chunk = chunks.setdefault(shard, [[]])
        if chunk[-1] and weights.get(shard, 0) + weight > PIPELINE_SIZE:
            chunk.append([])
            weights[shard] = 0
        chunk[-1].append(number)
        weights[shard] = weights.get(shard, 0) + weight
    return chunks


def _parts(items: list[T]) -> list[list[T]]:
    return [
        items[start : start + PIPELINE_SIZE]
        for start in range(0, len(items), PIPELINE_SIZE)
    ]


# What channels_redis's group_send runs on each shard for a group's members
# there, with the expiry of old messages (a separate pipeline there) folded in:
# a copy, so used on the fast path only (FAST_PATH_VERSIONS).
# KEYS: the channel keys; ARGV: their messages, then their capacities, then
# the message expiry cutoff, the time, and the expiry.
_SEND_LUA = """
local over_capacity = 0
local n = #KEYS
local cutoff = ARGV[2 * n + 1]
local now = ARGV[2 * n + 2]
local expiry = ARGV[2 * n + 3]
for i = 1, n do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, cutoff)
    if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[i + n]) then
        redis.call('ZADD', KEYS[i], now, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
"""


async def _redis_send(
    layer: RedisChannelLayer, messages: list[tuple[str, dict[str, Any]]]
) -> None:
    """``group_send`` of each (group, message), for many groups at once.

    channels_redis's group_send is three round trips per group (members, then
    expiry of old messages, then a script that pushes the message): a prune's
    notices and events, one each per room, would wait for thousands. The same
    commands on the same keys go here in two rounds of pipelines, one per
    shard: the members of every group, then one script per group and shard.
    """
    send = _GroupSend(layer, messages)
    found = await _pipelined(layer, send.members())
    _log_over_capacity(await _pipelined(layer, send.pushes(found)))


def _redis_send_now(
    layer: RedisChannelLayer,
    clients: list[redis.Redis],
    messages: list[tuple[str, dict[str, Any]]],
    instead: list[Instead],
) -> None:
    """:func:`_redis_send` on blocking clients, with ``instead`` (see
    :func:`send_now`) pushed in the round that pushes the groups' messages."""
    skipped: dict[str, set[str]] = {}
    for group, names, _ in instead:
        skipped.setdefault(group, set()).update(names)
    send = _GroupSend(layer, messages)
    found = _pipelined_now(clients, send.members())
    pushes = send.pushes(found, skipped)
    # A channel's messages are received in the order of their times (its
    # sorted set's scores): ``instead``'s are the later.
    pushes += _push_commands(
        layer,
        [(names, message) for _, names, message in instead],
        send.now + (len(pushes) + 1) * 1e-6,
    )
    _log_over_capacity(_pipelined_now(clients, pushes))


class _GroupSend:
    """The two rounds of commands of a send to groups (see :func:`_redis_send`)."""

    def __init__(
        self,
        layer: RedisChannelLayer,
        messages: list[tuple[str, dict[str, Any]]],
        now: float | None = None,
    ) -> None:
        self.layer = layer
        self.by_group: dict[str, list[dict[str, Any]]] = {}
        for group, message in messages:
            self.by_group.setdefault(group, []).append(message)
        self.groups = list(self.by_group)
        self.now = time.time() if now is None else now

    def members(self) -> list[Command]:
        """Round one: each group's members, its expired ones dropped first."""
        layer, now = self.layer, self.now

        def read(key: bytes) -> Callable[[Any], None]:
            def add(pipe: Any) -> None:
                pipe.zremrangebyscore(key, min=0, max=int(now) - layer.group_expiry)
                pipe.zrange(key, 0, -1)

            return add

        return [
            (layer.consistent_hash(g), 1, read(layer._group_key(g)))
            for g in self.groups
        ]

    def pushes(
        self, found: list[Any], skipped: dict[str, set[str]] | None = None
    ) -> list[Command]:
        """Round two: each message pushed to the members found in round one
        (but those ``skipped`` for its group)."""
        deliveries = []
        for group, (_, found_names) in zip(self.groups, found, strict=True):
            names = [name.decode() for name in found_names]
            if skipped and group in skipped:
                names = [name for name in names if name not in skipped[group]]
            deliveries += [(names, message) for message in self.by_group[group]]
        return _push_commands(self.layer, deliveries, self.now)


async def _redis_push(
    layer: RedisChannelLayer, deliveries: list[tuple[list[str], dict[str, Any]]]
) -> None:
    """Push each message to each of its channels, one script per shard and message."""
    _log_over_capacity(await _pipelined(layer, _push_commands(layer, deliveries)))


def _push_commands(
    layer: RedisChannelLayer,
    deliveries: list[tuple[list[str], dict[str, Any]]],
    now: float | None = None,
) -> list[Command]:
    """The scripts that push each message to each of its channels.

    channels_redis's layout: the channels of one process share a key, and
    get one copy of the message naming them all (``__asgi_channel__``), which
    that process hands to each; so a message to a thousand sockets of one
    server is serialized and stored once.
    """
    now = time.time() if now is None else now

    def push(keys: list[str], args: list[Any], at: float) -> Callable[[Any], None]:
        def add(pipe: Any) -> None:
            cutoff = int(now) - int(layer.expiry)
            pipe.eval(_SEND_LUA, len(keys), *keys, *args, cutoff, at, layer.expiry)

        return add

    commands: list[Command] = []
    for channel_names, message in deliveries:
        if not channel_names:
            continue
        by_shard, encoded, capacities = _by_key(layer, channel_names, message)
        for shard, keys in by_shard.items():
            for part in _parts(keys):
                args = [encoded[k] for k in part] + [capacities[k] for k in part]
                # A channel's messages are received in the order of their
                # scores: one microsecond apart, in the order given.
                at = now + len(commands) * 1e-6
                commands.append((shard, len(part), push(part, args, at)))
    return commands


def _log_over_capacity(replies: list[Any]) -> None:
    full = sum(reply[0] for reply in replies)
    if full:
        logger.info("%s channels over capacity in a group send", full)


def _by_key(
    layer: RedisChannelLayer, channel_names: list[str], message: dict[str, Any]
) -> tuple[dict[int, list[str]], dict[str, bytes], dict[str, int]]:
    """channels_redis's ``_map_channel_keys_to_connection``, in fewer steps.

    The same keys, shards, messages and capacities: a channel's key is the
    layer's prefix and the channel's non-local name (up to its "!"); each key
    gets one copy of the message naming its channels. A room's events go to
    every socket of the room, so this runs once per member and change set.
    """
    names_by_key: dict[str, list[str]] = {}
    prefix = layer.prefix
    for name in channel_names:
        end = name.find("!")
        key = prefix + (name if end < 0 else name[: end + 1])
        found = names_by_key.get(key)
        if found is None:
            names_by_key[key] = [name]
        else:
            found.append(name)
    by_shard: dict[int, list[str]] = {}
    encoded: dict[str, bytes] = {}
    capacities: dict[str, int] = {}
    for key, names in names_by_key.items():
        by_shard.setdefault(layer.consistent_hash(key[len(prefix) :]), []).append(key)
        encoded[key] = layer.serialize({**message, "__asgi_channel__": names})
        capacities[key] = layer.get_capacity(names[0])
    return by_shard, encoded, capacities


async def send_to_channels(
    layer: BaseChannelLayer, deliveries: Iterable[tuple[list[str], dict[str, Any]]]
) -> None:
    """Send each message to each channel of its list (not to a group), a
    channel's messages in their order."""
    deliveries = [(list(names), message) for names, message in deliveries]
    if fast_path(layer):
        await _redis_push(layer, deliveries)
        return
    await _in_order(
        (name, functools.partial(layer.send, name, message))
        for names, message in deliveries
        for name in names
    )


def send_to_channels_now(
    layer: BaseChannelLayer, deliveries: Iterable[tuple[list[str], dict[str, Any]]]
) -> None:
    """:func:`send_to_channels`, from sync code; see :func:`add_now`."""
    deliveries = [(list(names), message) for names, message in deliveries]
    clients = _blocking_clients(layer)
    if clients is None:
        run_sync(send_to_channels, layer, deliveries)
        return
    _log_over_capacity(_pipelined_now(clients, _push_commands(layer, deliveries)))


async def send(
    layer: BaseChannelLayer, messages: Iterable[tuple[str, dict[str, Any]]]
) -> None:
    """Send each (group, message) pair.

    A group's messages arrive in their order. Those of different groups may
    arrive in any order, except on the fast path, which keeps the order given.
    """
    messages = list(messages)
    if fast_path(layer):
        await _redis_send(layer, messages)
        return
    await _in_order(
        (group, functools.partial(layer.group_send, group, message))
        for group, message in messages
    )


#: A message for some members of a group instead of the group's own messages
#: of the same send: (group, channel names, message).
Instead = tuple[str, list[str], dict[str, Any]]


def send_now(
    layer: BaseChannelLayer,
    messages: Iterable[tuple[str, dict[str, Any]]],
    instead: Iterable[Instead] = (),
) -> None:
    """:func:`send`, from sync code (a worker's sends); see :func:`add_now`.

    ``instead``: messages for channels of a group, sent to them in place of
    that group's messages (joined sockets get their room's state, which
    holds the diff sent with it). On the fast path they are pushed in the
    same round trip as the groups' messages, after them: a server process
    receives one message at a time, and the room's other sockets are the
    ones waiting. Elsewhere they are sent first, and the group's messages
    reach those channels too (a client drops a diff its state holds).
    """
    messages = list(messages)
    replacing = [(group, list(names), message) for group, names, message in instead]
    clients = _blocking_clients(layer)
    if clients is None:
        if replacing:
            deliveries = [(names, message) for _, names, message in replacing]
            run_sync(send_to_channels, layer, deliveries)
        run_sync(send, layer, messages)
        return
    _redis_send_now(layer, clients, messages, replacing)


async def apply(
    layer: BaseChannelLayer,
    departed: Iterable[tuple[str, str]],
    messages: Iterable[tuple[str, dict[str, Any]]],
    *,
    notices: Iterable[tuple[str, dict[str, Any]]] = (),
) -> None:
    """After a commit: send notices, drop departed sockets, then send events.

    Notices go first because they are for the departing sockets; events go
    last, so that a departing socket does not hear of its own departure.
    """
    await send(layer, notices)
    await leave(layer, departed)
    await send(layer, messages)


async def _in_order(calls: Iterable[tuple[str, Callable[[], Awaitable[Any]]]]) -> None:
    """Run each (destination, call): those of one destination one after
    another, in their order; CONCURRENCY destinations at once.

    Two group_sends to one group in flight together may arrive in either
    order (channels_redis reads the members, then pushes, in separate round
    trips); a room's frames must not.
    """
    by_destination: dict[str, list[Callable[[], Awaitable[Any]]]] = {}
    for destination, call in calls:
        by_destination.setdefault(destination, []).append(call)

    async def run(queue: list[Callable[[], Awaitable[Any]]]) -> None:
        for call in queue:
            await call()

    await _in_batches(run(queue) for queue in by_destination.values())


async def _in_batches(calls: Iterable[Awaitable[Any]]) -> None:
    batch: list[Awaitable[Any]] = []
    for call in calls:
        batch.append(call)
        if len(batch) == CONCURRENCY:
            await asyncio.gather(*batch)
            batch = []
    if batch:
        await asyncio.gather(*batch)
