"""Outages of the database and the channel layer, logged once each.

A socket handler (``dispatch``) and the delivery of a committed change set
(``broadcast``) both keep working while the database or the channel layer is
down; each failure is reported here, and the log says when an outage starts
and when it ends, not every failure between.
"""

from __future__ import annotations

import logging

from django.db import Error as DatabaseError

logger = logging.getLogger("channels_presence")

DATABASE = "database"
CHANNEL_LAYER = "channel layer"


class Outages:
    """Logs the first failure of an outage and its end, not every failure between.

    The database and the channel layer fail apart, and a touch needs only the
    database: each has its own outage, ended only by a call that used it.
    """

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def failed(self, what: str, error: BaseException, then: str = "") -> None:
        """``what`` failed with ``error``; ``then`` says what happens next."""
        dependency = DATABASE if isinstance(error, DatabaseError) else CHANNEL_LAYER
        if dependency in self.failing:
            logger.debug("presence %s failed again: %s", what, error)
            return
        self.failing.add(dependency)
        logger.error(
            "presence %s failed: the %s is unavailable; %s",
            what,
            dependency,
            then or "presence stays out of date until it answers again",
            exc_info=error,
        )

    def recovered(self, *dependencies: str) -> None:
        """Calls that needed ``dependencies`` succeeded: their outages are over."""
        for dependency in dependencies:
            if dependency in self.failing:
                self.failing.discard(dependency)
                logger.warning("presence works again: the %s answers", dependency)


#: This process's outages.
outage = Outages()
