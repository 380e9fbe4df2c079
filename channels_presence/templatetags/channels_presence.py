"""Template tags for pages that use the browser client, ``presence.js``.

``{% load channels_presence %}``, then ``{% presence_heartbeat_interval %}``
where the client's ``heartbeatInterval`` option goes.
"""

from __future__ import annotations

from django import template

from ..conf import conf

register = template.Library()


@register.simple_tag
def presence_heartbeat_interval() -> str:
    """Seconds between a client's heartbeats: the server's touch interval.

    A heartbeat sent more often would be coalesced anyway. With
    ``CHANNELS_PRESENCE_TOUCH_INTERVAL = 0`` (touch on every message) it is a
    quarter of ``CHANNELS_PRESENCE_MAX_AGE``, the default touch interval.
    """
    interval = conf.TOUCH_INTERVAL or conf.MAX_AGE / 4
    return format(float(interval), "g")
