"""The example site of channels_presence: a room with a live member list.

The Celery app is imported here, as Celery's Django guide does, so that the web
process sends its presence tasks through the same broker as the workers use.
"""

from tasks import app as celery_app

__all__ = ["celery_app"]
