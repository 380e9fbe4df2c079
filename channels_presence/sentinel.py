"""Redis Sentinel: where the leases' Redis is, when Sentinel says which it is.

A deployment on Redis with Sentinel names the Sentinels and the name of the
master they watch; the master's address is asked of them at each connection,
so that after a failover clients reconnect to the replica promoted in its place.

The leases' Redis (CHANNELS_PRESENCE_REDIS_URL, or the channel layer's first
host) may be given either way that other tools of a Channels project take:

* the host dict of channels_redis, ``{"sentinels": [("sentinel-1", 26379),
  ...], "master_name": "mymaster", "sentinel_kwargs": {...}, **connection
  keywords}`` (``db``, ``password``...), the form CHANNEL_LAYERS uses;
* a URL, ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]
  /master_name[/db][?option=value...]`` (``rediss+sentinel://`` for TLS to
  the master), the convention of the redis-sentinel-url package and others.
  The port defaults to 26379; the user and password are the master's;
  ``sentinel_username`` and ``sentinel_password`` options are the Sentinels'.

Both are turned into the same dict, and :func:`client` makes a redis-py client
of the master from it.
"""

from __future__ import annotations

import weakref
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

#: The schemes of a Sentinel URL.
SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: The port of a Sentinel named without one.
DEFAULT_PORT = 26379
#: URL options that are numbers of seconds, and those that are flags.
_SECONDS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")
_FLAGS = ("ssl",)


def is_sentinel(config: object) -> bool:
    """Whether ``config`` names a master through Sentinel (a URL or a host dict)."""
    if isinstance(config, str):
        return urlsplit(config).scheme.lower() in SCHEMES
    return isinstance(config, dict) and "master_name" in config


def parse_url(url: str) -> dict[str, Any]:
    """The host dict of a ``redis+sentinel://`` URL; ValueError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(
            f"{url!r} is not a Sentinel URL: write "
            "'redis+sentinel://host:26379,host2:26379/mymaster/0'"
        )
    # netloc: [[user]:password@]host[:port][,host[:port]...]
    auth, _, hosts = parts.netloc.rpartition("@")
    sentinels = []
    for entry in hosts.split(","):
        host, _, port = entry.strip().rpartition(":")
        if not host:
            host, port = port, ""
        if not host or (port and not port.isdigit()):
            raise ValueError(
                f"{url!r}: {entry!r} is not a Sentinel's host[:port]; separate "
                "several with commas, e.g. 'redis+sentinel://h1:26379,h2:26379/mymaster'"
            )
        sentinels.append((host, int(port) if port else DEFAULT_PORT))
    path = [unquote(part) for part in parts.path.split("/") if part]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(
            f"{url!r} names no master: its path must be /master_name or "
            "/master_name/db, e.g. 'redis+sentinel://h1:26379/mymaster/0'"
        )
    config: dict[str, Any] = {"sentinels": sentinels, "master_name": path[0]}
    if len(path) == 2:
        config["db"] = int(path[1])
    if auth:
        username, colon, password = auth.partition(":")
        if username:
            config["username"] = unquote(username)
        if colon:
            config["password"] = unquote(password)
    if parts.scheme.lower() == "rediss+sentinel":
        config["ssl"] = True
    sentinel_kwargs: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query):
        typed: Any = value
        key = name.removeprefix("sentinel_")
        if key in _SECONDS:
            typed = float(value)
        elif key in _FLAGS:
            typed = value.lower() in ("1", "true", "yes", "on")
        if name.startswith("sentinel_"):
            sentinel_kwargs[key] = typed
        else:
            config[name] = typed
    if sentinel_kwargs:
        config["sentinel_kwargs"] = sentinel_kwargs
    return config


def host_config(config: str | dict[str, Any]) -> dict[str, Any]:
    """The host dict of a Sentinel URL or host dict, checked; ValueError if bad."""
    if isinstance(config, str):
        return parse_url(config)
    sentinels = config.get("sentinels")
    if (
        not isinstance(config.get("master_name"), str)
        or not config["master_name"]
        or not isinstance(sentinels, list | tuple)
        or not sentinels
        or not all(
            isinstance(s, list | tuple) and len(s) == 2 and isinstance(s[0], str)
            for s in sentinels
        )
    ):
        raise ValueError(
            f"{config!r} is not a Sentinel host: it must name the master and "
            'its Sentinels, e.g. {"sentinels": [("127.0.0.1", 26379)], '
            '"master_name": "mymaster"}'
        )
    return dict(config)


def client(config: str | dict[str, Any], timeout: float | None = None) -> redis.Redis:
    """A client of the master that the Sentinels of ``config`` name.

    The master is looked up at each new connection: after a failover, a
    command that fails on the old master's connection is retried on the new
    one once the Sentinels name it.
    """
    options = host_config(config)
    sentinels = [(host, int(port)) for host, port in options.pop("sentinels")]
    master_name = options.pop("master_name")
    sentinel_kwargs = dict(options.pop("sentinel_kwargs", None) or {})
    if timeout is not None:
        for kwargs in (options, sentinel_kwargs):
            kwargs.setdefault("socket_timeout", timeout)
            kwargs.setdefault("socket_connect_timeout", timeout)
    # redis-py's sentinel module is not annotated.
    manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    master: redis.Redis = manager.master_for(master_name, **options)  # type: ignore[no-untyped-call]
    # Closing the master's client closes its pool, not the connections to the
    # Sentinels: those are closed when the client is collected.
    weakref.finalize(master, _close_all, manager.sentinels)
    return master


def _close_all(clients: list[redis.Redis]) -> None:
    for each in clients:
        each.close()
