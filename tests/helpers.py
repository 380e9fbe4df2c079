"""Helpers for tests that look into the real Redis channel layer."""

from __future__ import annotations

from typing import Any

import redis
from channels.layers import get_channel_layer
from django.conf import settings


def group_members(group: str) -> set[str]:
    """The channel names in ``group``, read straight from Redis."""
    layer: Any = get_channel_layer()
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    try:
        members = client.zrange(layer._group_key(group), 0, -1)
    finally:
        client.close()
    return {str(member) for member in members}
