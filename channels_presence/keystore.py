"""Where channels_presence keeps its own keys in Redis: leases, heartbeats, notices.

The Redis of CHANNELS_PRESENCE_REDIS_URL, by default the first host of the
default channel layer, under a prefix named after the layer's.
"""

from __future__ import annotations

from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from . import sentinel
from .conf import conf


def redis_config() -> str | dict[str, Any]:
    """Where the Redis that holds the leases is: a URL, or a Sentinel host dict.

    CHANNELS_PRESENCE_REDIS_URL, else the first host of the default channel
    layer (``channels_redis``), given as a URL, an ``{"address": url}`` dict, a
    ``(host, port)`` pair or a Sentinel dict (``{"sentinels": [...],
    "master_name": ...}``).
    """
    if conf.REDIS_URL is not None:
        return conf.REDIS_URL
    config = _layer_config()
    hosts = config.get("hosts") or [("localhost", 6379)]
    host: Any = hosts[0] if isinstance(hosts, list | tuple) and hosts else None
    if sentinel.is_sentinel(host):
        return dict(host)
    if isinstance(host, dict):
        host = host.get("address")
    if isinstance(host, str):
        return host
    if isinstance(host, list | tuple) and len(host) == 2:
        return f"redis://{host[0]}:{host[1]}"
    raise ImproperlyConfigured(
        "channels_presence cannot tell where to keep server leases from "
        f"CHANNEL_LAYERS['default']['CONFIG']['hosts'] ({hosts!r}): set "
        "CHANNELS_PRESENCE_REDIS_URL, e.g. 'redis://127.0.0.1:6379/0', or "
        "CHANNELS_PRESENCE_SERVER_LEASE = None to turn leases off."
    )


def key_prefix() -> str:
    """The prefix of the lease keys: ``channels-presence:`` and the layer's prefix.

    Not under the layer's own prefix: flushing the layer (its ``flush()``
    deletes every key under it) must not take the leases with it.
    """
    prefix = _layer_config().get("prefix") or "asgi"
    return f"channels-presence:{prefix}"


def _layer_config() -> dict[str, Any]:
    layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    default = layers.get("default") if isinstance(layers, dict) else None
    config = default.get("CONFIG") if isinstance(default, dict) else None
    return config if isinstance(config, dict) else {}


def client(timeout: float | None = None) -> redis.Redis:
    """A Redis client for the leases (sync: it runs in a thread or a worker).

    Through Sentinel, a client of the master the Sentinels name at connection.
    """
    config = redis_config()
    if sentinel.is_sentinel(config):
        try:
            return sentinel.client(config, timeout)
        except ValueError as error:
            raise ImproperlyConfigured(str(error)) from error
    if not isinstance(config, str):
        raise ImproperlyConfigured(
            f"channels_presence cannot keep server leases in {config!r}: set "
            "CHANNELS_PRESENCE_REDIS_URL to a Redis URL, a redis+sentinel:// URL "
            'or a Sentinel dict ({"sentinels": [...], "master_name": ...}).'
        )
    return redis.Redis.from_url(
        config, socket_timeout=timeout, socket_connect_timeout=timeout
    )
