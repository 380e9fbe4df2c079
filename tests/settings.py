"""Settings for the test suite.

The database comes from DATABASE_URL (``postgres://user@host:port/name``), and
is a throwaway SQLite file when it is unset; Redis comes from REDIS_URL.

The celery workers a test starts (``tests/workers.py``) read these settings
too: the run's id, in the environment they inherit, gives them the same
channel-layer prefix and Celery queue, and CHANNELS_PRESENCE_TEST_DATABASE
names the test database they must use. CHANNELS_PRESENCE_TEST_BROKER_URL points
a worker at another broker, CHANNELS_PRESENCE_TEST_VISIBILITY_TIMEOUT shortens
the time after which the broker gives a dead worker's tasks to another.
CHANNELS_PRESENCE_TEST_SENTINELS puts the channel layer, the broker and the
leases behind Redis Sentinel; CHANNELS_PRESENCE_TEST_SERVER_LEASE and
CHANNELS_PRESENCE_TEST_TOUCH_INTERVAL set those two settings;
CHANNELS_PRESENCE_TEST_PGBOUNCER sets the database up for PgBouncer.
"""

import os
import tempfile
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

SECRET_KEY = "channels-presence-tests"
DEBUG = False
USE_TZ = True
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "channels",
    "django_celery_beat",
    "channels_presence",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def _database(url: str | None) -> dict[str, object]:
    if not url:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(tempfile.gettempdir(), "channels_presence.sqlite3"),
            # BEGIN IMMEDIATE: SQLite writers queue up instead of failing.
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
            "TEST": {
                "NAME": os.path.join(
                    tempfile.gettempdir(), f"test_channels_presence_{os.getpid()}.db"
                )
            },
        }
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"DATABASE_URL must be a postgres:// URL, not {url!r}")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/") or "test",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        # One database per run: runs on one server must not drop each other's.
        "TEST": {"NAME": f"test_channels_presence_{os.getpid()}"},
    }


DATABASES = {"default": _database(os.environ.get("DATABASE_URL"))}
if os.environ.get("CHANNELS_PRESENCE_TEST_DATABASE"):
    # A worker started by a test: it uses the test's database, as it is.
    DATABASES["default"]["NAME"] = os.environ["CHANNELS_PRESENCE_TEST_DATABASE"]
if os.environ.get("CHANNELS_PRESENCE_TEST_PGBOUNCER"):
    # A worker behind PgBouncer in transaction mode, set up as the README says:
    # a server-side cursor would outlive the transaction that holds its server
    # connection. (Django's psycopg prepares no statement unless told to.)
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True

# One id per test run, inherited by the workers the run starts: each run keeps
# to its own keys and queue on a Redis that other runs may share.
RUN = os.environ.setdefault("CHANNELS_PRESENCE_TEST_RUN", uuid.uuid4().hex[:12])

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

CHANNEL_LAYERS: dict[str, Any] = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [REDIS_URL],
            # Each run keeps to its own keys on a Redis others may share.
            "prefix": f"cp-test-{RUN}",
        },
    }
}

# The operations run inline in this suite: Celery mode has its own tests, and a
# daphne that a test starts (tests/asgi.py) is put in it from the environment.
CHANNELS_PRESENCE_USE_CELERY = os.environ.get("CHANNELS_PRESENCE_TEST_CELERY") == "1"

# In this process a room's diffs go out at once, so that a test sees each one
# when the operation returns; the worker processes a test starts throttle them
# as a deployment does (tests/workers.py sets the default, 0.1 s), and the
# throttle's own tests override this.
CHANNELS_PRESENCE_EVENT_INTERVAL = float(
    os.environ.get("CHANNELS_PRESENCE_TEST_EVENT_INTERVAL", "0")
)

CELERY_BROKER_URL = os.environ.get("CHANNELS_PRESENCE_TEST_BROKER_URL", REDIS_URL)
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
    "global_keyprefix": f"cp-test-{RUN}:"
}
if os.environ.get("CHANNELS_PRESENCE_TEST_VISIBILITY_TIMEOUT"):
    # A worker that must soon get the tasks a killed worker held: kombu's
    # Redis transport gives them back once they have been unacknowledged for
    # visibility_timeout, at a worker's start or at its sweeps (every
    # unacked_restore_interval s, scanning every unacked_restore_throttle-th).
    CELERY_BROKER_TRANSPORT_OPTIONS.update(
        visibility_timeout=float(
            os.environ["CHANNELS_PRESENCE_TEST_VISIBILITY_TIMEOUT"]
        ),
        unacked_restore_interval=1,
        unacked_restore_throttle=1,
    )
if os.environ.get("CHANNELS_PRESENCE_TEST_SENTINELS"):
    # A daphne, worker or beat of the Sentinel test (tests/test_sentinel.py):
    # Redis is the master that these Sentinels name, "host:port,host:port".
    _SENTINELS = [
        (host, int(port))
        for host, port in (
            address.rsplit(":", 1)
            for address in os.environ["CHANNELS_PRESENCE_TEST_SENTINELS"].split(",")
        )
    ]
    CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [
        {"sentinels": _SENTINELS, "master_name": "mymaster"}
    ]
    CELERY_BROKER_URL = ";".join(f"sentinel://{h}:{p}" for h, p in _SENTINELS)
    CELERY_BROKER_TRANSPORT_OPTIONS["master_name"] = "mymaster"
if os.environ.get("CHANNELS_PRESENCE_TEST_SERVER_LEASE"):
    CHANNELS_PRESENCE_SERVER_LEASE = float(
        os.environ["CHANNELS_PRESENCE_TEST_SERVER_LEASE"]
    )
if os.environ.get("CHANNELS_PRESENCE_TEST_TOUCH_INTERVAL"):
    CHANNELS_PRESENCE_TOUCH_INTERVAL = float(
        os.environ["CHANNELS_PRESENCE_TEST_TOUCH_INTERVAL"]
    )
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = f"presence-{RUN}"
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
