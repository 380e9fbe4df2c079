"""The example site's settings, on the test run's database, Redis keys and queue.

The real-browser test runs daphne, a worker and beat with these: the example's
pages, consumer and Celery mode, with the suite's database (the running test's,
named by CHANNELS_PRESENCE_TEST_DATABASE), channel-layer prefix and queue.
"""

from example.settings import *  # noqa: F403
from tests import settings as suite

DATABASES = suite.DATABASES
REDIS_URL = suite.REDIS_URL
CHANNEL_LAYERS = suite.CHANNEL_LAYERS
CELERY_BROKER_URL = suite.CELERY_BROKER_URL
CELERY_BROKER_TRANSPORT_OPTIONS = suite.CELERY_BROKER_TRANSPORT_OPTIONS
CELERY_TASK_DEFAULT_QUEUE = suite.CELERY_TASK_DEFAULT_QUEUE
DEBUG = False

# Heartbeats 50 s apart: within the browser test, a socket that joins again
# after its prune does so because presence.js heard presence.expired, not at
# its next heartbeat.
CHANNELS_PRESENCE_TOUCH_INTERVAL = 50
