"""Settings for the benchmarks in ``bench/``, and for the worker they start.

Everything a benchmark writes is its own, so that it never meets a test run or
another benchmark on the same servers. ``bench/pipeline.py`` sets, before
Django starts, and its ``celery -A tasks worker`` subprocess inherits:

* ``CHANNELS_PRESENCE_BENCH_RUN``: the run's id, which prefixes the channel
  layer's keys and the broker's keys and names the Celery queue;
* ``CHANNELS_PRESENCE_BENCH_DATABASE`` (optional): the name of the run's own
  database, ``channels_presence_bench_<run>`` by default: a PostgreSQL database
  on the server of ``DATABASE_URL``, or a SQLite file when ``DATABASE_URL`` is
  ``sqlite``. The database named in the URL is never used by Django: the
  benchmark only connects to it to create and drop its own.

``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) is the channel layer and
the broker.
"""

import os
import tempfile
import uuid
from urllib.parse import unquote, urlsplit

SECRET_KEY = "channels-presence-bench"
DEBUG = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "channels",
    "django_celery_beat",
    "channels_presence",
]

RUN = os.environ.setdefault("CHANNELS_PRESENCE_BENCH_RUN", uuid.uuid4().hex[:12])
DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/test"
DATABASE_URL = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


DATABASE_NAME = (
    os.environ.get("CHANNELS_PRESENCE_BENCH_DATABASE")
    or f"channels_presence_bench_{RUN}"
)


def database(url: str, name: str | None) -> dict[str, object]:
    """The Django database of ``url``, named ``name`` (the URL's own if None)."""
    if url == "sqlite":
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(tempfile.gettempdir(), f"{name or 'bench'}.sqlite3"),
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20},
        }
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(
            f"DATABASE_URL must be a postgres:// URL or 'sqlite', not {url!r}"
        )
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name or parts.path.lstrip("/") or "test",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


DATABASES = {"default": database(DATABASE_URL, DATABASE_NAME)}
# Persistent connections, as a deployment has: otherwise every inline operation
# (database_sync_to_async closes old connections) opens a new one, and that is
# most of what the inline figures would show.
DATABASES["default"]["CONN_MAX_AGE"] = 60

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
#: Every Redis key of the run starts with this (channel layer and broker alike).
KEY_PREFIX = f"cp-bench-{RUN}"

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": KEY_PREFIX},
    }
}

CHANNELS_PRESENCE_USE_CELERY = True
CHANNELS_PRESENCE_FLUSH_INTERVAL = 1.0

CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_TRANSPORT_OPTIONS = {"global_keyprefix": f"{KEY_PREFIX}:"}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = f"presence-{RUN}"
CELERY_TASK_IGNORE_RESULT = True
# Celery's Django fix-up closes the database connection around every task
# unless this is set: a lone join's task would open a connection each time.
CELERY_DB_REUSE_MAX = 1_000

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"channels_presence": {"handlers": ["console"], "level": "WARNING"}},
}
