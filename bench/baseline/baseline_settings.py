"""Django settings of the 1.0.0 baseline: django-channels-presence 1.0.0 on its stack.

Run by ``bench/baseline/run.py`` with the baseline virtualenv's Python (Django
3.2.25, channels 3.0.5, channels-redis 3.4.1, celery 5.3.6, psycopg2-binary),
never imported by the project's own code: this directory is the script's path,
so that the ``channels_presence`` imported here is 1.0.0's, from site-packages,
not the repository's.

From the environment: ``BASELINE_DATABASE`` (a SQLite file path, or a
PostgreSQL database name on the server of ``DATABASE_URL``), ``REDIS_URL`` and
``BASELINE_PREFIX`` (the channel layer's key prefix).
"""

import os
from urllib.parse import unquote, urlsplit

from django.apps import AppConfig


class PresenceConfig(AppConfig):
    """1.0.0's own AppConfig names a module ``rooms`` (defect 1): this one works."""

    name = "channels_presence"
    default_auto_field = "django.db.models.AutoField"


SECRET_KEY = "channels-presence-baseline"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "channels",
    "baseline_settings.PresenceConfig",
]
ASGI_APPLICATION = "baseline_asgi.application"

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite")
_name = os.environ["BASELINE_DATABASE"]
if DATABASE_URL == "sqlite":
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": _name}}
else:
    _parts = urlsplit(DATABASE_URL)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": _name,
            "USER": unquote(_parts.username or ""),
            "PASSWORD": unquote(_parts.password or ""),
            "HOST": _parts.hostname or "",
            "PORT": str(_parts.port or ""),
            # Persistent, as in a deployment and as in our bench settings.
            "CONN_MAX_AGE": 60,
        }
    }

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [REDIS_URL],
            "prefix": os.environ.get("BASELINE_PREFIX", "cp-baseline"),
        },
    }
}
CHANNELS_PRESENCE_MAX_AGE = 60
