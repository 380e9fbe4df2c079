"""Time: when something happened, and from when on a presence is stale."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta

from django.utils import timezone

from . import validation


def seconds() -> float:
    """Now, as UNIX time in seconds, by this server's clock."""
    return time.time()


def skew(sent: float, received: float, other: float) -> float:
    """How far ahead of ours another clock is, as far as a round trip can tell.

    ``other`` is the other clock's reading, taken somewhere between ``sent`` and
    ``received`` on ours: what half the round trip could explain is not
    counted, so a slow answer never passes for a skewed clock. Negative when
    the other clock is behind ours.
    """
    middle = (sent + received) / 2
    ahead = other - middle
    return math.copysign(max(abs(ahead) - (received - sent) / 2, 0.0), ahead)


def micros() -> int:
    """Now, in microseconds since the epoch: a new room's first version."""
    return time.time_ns() // 1000


def moment(at: datetime | None) -> datetime:
    """``at`` if it is an aware datetime, now if it is None."""
    if at is None:
        return timezone.now()
    if not isinstance(at, datetime) or timezone.is_naive(at):
        raise TypeError(f"at must be an aware datetime or None, not {at!r}")
    return at


def from_timestamp(at: object) -> datetime | None:
    """The moment of a task's ``at``: UNIX time in seconds, or None for now."""
    if at is None:
        return None
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise ValueError(
            f"at must be a UNIX time in seconds (a float, as time.time() gives) "
            f"or None for now, not {at!r}"
        )
    try:
        return datetime.fromtimestamp(at, UTC)
    except (OverflowError, OSError, ValueError) as error:
        raise ValueError(f"at {at!r} is not a time a datetime can hold") from error


def stale_before(age: object = None) -> datetime:
    """Presences last seen before this are stale: ``age`` seconds ago (MAX_AGE)."""
    seconds = validation.age(age)
    try:
        return timezone.now() - timedelta(seconds=seconds)
    except OverflowError:
        # Older than anything a datetime can hold: nothing is that stale.
        return datetime.min.replace(tzinfo=UTC)
