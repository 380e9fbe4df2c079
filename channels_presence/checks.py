"""System checks: a misconfiguration is reported at startup, with its fix."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from typing import Any

from celery import current_app
from django.apps import AppConfig, apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import checks
from django.core.exceptions import FieldError, ImproperlyConfigured
from django.db import connections, router
from django.db.backends.base.base import BaseDatabaseWrapper

from . import leases, sentinel
from .conf import FLAG_SETTINGS, NUMBER_SETTINGS, PREFIX, conf
from .schedule import ENTRIES

IN_MEMORY_LAYER = "channels.layers.InMemoryChannelLayer"
#: The oldest SQLite with ``RETURNING``, which the batch writes and deletes use.
OLDEST_SQLITE = (3, 35)
#: SQLite transaction modes that take the write lock at BEGIN: writers queue.
QUEUEING_MODES = frozenset({"IMMEDIATE", "EXCLUSIVE"})


@checks.register()
def check_channel_layer(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E001: no channel layer; E002: a layer that Celery workers cannot reach."""
    layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    default = layers.get("default") if isinstance(layers, dict) else None
    if not isinstance(default, dict) or not default.get("BACKEND"):
        return [
            checks.Error(
                "No channel layer is configured: CHANNEL_LAYERS['default'] must be "
                "a dict with a BACKEND.",
                hint="Set CHANNEL_LAYERS['default'], e.g. to "
                "{'BACKEND': 'channels_redis.core.RedisChannelLayer', "
                "'CONFIG': {'hosts': ['redis://127.0.0.1:6379']}}.",
                id="channels_presence.E001",
            )
        ]
    if default.get("BACKEND") == IN_MEMORY_LAYER and conf.USE_CELERY is True:
        return [
            checks.Error(
                "The in-memory channel layer cannot be reached from Celery "
                "workers, and CHANNELS_PRESENCE_USE_CELERY is on.",
                hint="Use channels_redis.core.RedisChannelLayer, or set "
                "CHANNELS_PRESENCE_USE_CELERY = False to run presence inline.",
                id="channels_presence.E002",
            )
        ]
    return []


@checks.register()
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E003: a setting of the wrong type or range; W001: touches too rare."""
    errors: list[checks.CheckMessage] = []
    for name in NUMBER_SETTINGS:
        value = getattr(settings, PREFIX + name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(_setting_error(name, value, "a number of seconds"))
        elif not (math.isfinite(value) and value >= 0):
            errors.append(_setting_error(name, value, "zero or more seconds"))
    for name in FLAG_SETTINGS:
        value = getattr(settings, PREFIX + name, None)
        if value is not None and not isinstance(value, bool):
            errors.append(_setting_error(name, value, "True or False"))
    if errors:
        return errors
    if conf.TOUCH_INTERVAL >= conf.MAX_AGE:
        errors.append(
            checks.Warning(
                f"CHANNELS_PRESENCE_TOUCH_INTERVAL ({conf.TOUCH_INTERVAL}) is not "
                f"shorter than CHANNELS_PRESENCE_MAX_AGE ({conf.MAX_AGE}): live "
                "sockets would be pruned between two touches.",
                hint="Make the touch interval a fraction of MAX_AGE, e.g. a quarter.",
                id="channels_presence.W001",
            )
        )
    return errors


@checks.register()
def check_celery(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E004: Celery mode with no broker; W002: no django_celery_beat to prune.

    W002 names every entry of the schedule (``schedule.ENTRIES``) and its task.
    """
    if conf.USE_CELERY is not True:
        return []
    errors: list[checks.CheckMessage] = []
    if not current_app.conf.broker_url:
        errors.append(
            checks.Error(
                "CHANNELS_PRESENCE_USE_CELERY is on, but the Celery application "
                "of this process has no broker: presence tasks cannot be sent.",
                hint="Create your Celery app configured from Django settings "
                "(app.config_from_object('django.conf:settings', namespace="
                "'CELERY')), set CELERY_BROKER_URL, e.g. 'redis://127.0.0.1:6379/0', "
                "and import the app in your project's __init__.py ('from .celery "
                "import app as celery_app'), as the README shows; or set "
                "CHANNELS_PRESENCE_USE_CELERY = False.",
                id="channels_presence.E004",
            )
        )
    if "django_celery_beat" not in settings.INSTALLED_APPS:
        names = ", ".join(f"'{name}'" for name, *_ in ENTRIES)
        tasks = _listed([task for _, task, *_ in ENTRIES])
        errors.append(
            checks.Warning(
                "CHANNELS_PRESENCE_USE_CELERY is on, but django_celery_beat is not "
                f"installed: nothing schedules {tasks}.",
                hint="Add 'django_celery_beat' to INSTALLED_APPS and migrate, which "
                f"creates the beat entries {names}; run 'celery -A <your project> "
                "beat -S django' (or a worker with -B); or schedule those tasks "
                "yourself and silence this check.",
                id="channels_presence.W002",
            )
        )
    return errors


@checks.register()
def check_queue(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E020: a CHANNELS_PRESENCE_QUEUE that Celery cannot send tasks to."""
    queue = getattr(settings, PREFIX + "QUEUE", None)
    if queue is None:
        return []
    if not isinstance(queue, str) or not queue.strip():
        return [
            checks.Error(
                f"{PREFIX}QUEUE is {queue!r}; it must be the name of a Celery "
                "queue, or None to route presence tasks as any other task.",
                hint="Write e.g. 'presence', and run workers with "
                "'celery -A <your project> worker -Q presence'.",
                id="channels_presence.E020",
            )
        ]
    if conf.USE_CELERY is True and not current_app.conf.task_create_missing_queues:
        names = {q.name for q in current_app.conf.task_queues or ()}
        if queue not in names:
            return [
                checks.Error(
                    f"{PREFIX}QUEUE is {queue!r}, which is not among the Celery "
                    "app's task_queues, and task_create_missing_queues is off: "
                    "presence tasks could not be sent.",
                    hint=f"Add Queue({queue!r}) to CELERY_TASK_QUEUES, or turn "
                    "CELERY_TASK_CREATE_MISSING_QUEUES back on.",
                    id="channels_presence.E020",
                )
            ]
    return []


@checks.register()
def check_leases(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E005: a bad SERVER_LEASE; E006: no Redis, or a bad one, for the leases."""
    lease = getattr(settings, PREFIX + "SERVER_LEASE", None)
    if lease is not None and (
        isinstance(lease, bool)
        or not isinstance(lease, int | float)
        or not (math.isfinite(lease) and lease > 0)
    ):
        return [
            checks.Error(
                f"{PREFIX}SERVER_LEASE is {lease!r}; it must be a number of "
                "seconds above 0, or None to turn server leases off.",
                hint="Remove it to use the default, 10 seconds.",
                id="channels_presence.E005",
            )
        ]
    url = conf.REDIS_URL
    if url is not None and not _is_redis_location(url):
        return [
            checks.Error(
                f"{PREFIX}REDIS_URL is {url!r}; it must be a Redis URL, a "
                "redis+sentinel:// URL or a Sentinel dict.",
                hint="Write e.g. 'redis://127.0.0.1:6379/0', "
                "'redis+sentinel://sentinel-1:26379,sentinel-2:26379/mymaster/0' or "
                '{"sentinels": [("sentinel-1", 26379)], "master_name": "mymaster"}, '
                "or remove it to keep the leases in the channel layer's Redis.",
                id="channels_presence.E006",
            )
        ]
    if conf.SERVER_LEASE is None:
        return []
    try:
        found = leases.redis_config()
        if sentinel.is_sentinel(found):
            sentinel.host_config(found)
    except (ImproperlyConfigured, ValueError) as error:
        return [
            checks.Error(
                str(error),
                hint=f"Set {PREFIX}REDIS_URL.",
                id="channels_presence.E006",
            )
        ]
    return []


@checks.register()
def check_databases(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E011: a back end other than PostgreSQL or SQLite; E012: SQLite before
    3.35; W003: SQLite whose transactions do not start IMMEDIATE.

    Only the databases the routers write channels_presence's models to, read
    from their connections' back end and settings, without connecting.
    """
    return [
        message
        for alias in presence_databases()
        for message in database_messages(connections[alias])
    ]


def presence_databases() -> list[str]:
    """The aliases of the databases channels_presence's models are written to."""
    models = apps.get_app_config("channels_presence").get_models()
    return sorted({router.db_for_write(model) for model in models})


def database_messages(connection: BaseDatabaseWrapper) -> list[checks.CheckMessage]:
    """What is wrong with keeping presence in ``connection``'s database."""
    alias, vendor = connection.alias, connection.vendor
    if vendor == "postgresql":
        return []
    if vendor != "sqlite":
        return [
            checks.Error(
                f"The database {alias!r} ({connection.display_name}) holds "
                "channels_presence's models, which need PostgreSQL or SQLite: "
                f"{_UNSUPPORTED.get(vendor, _UNSUPPORTED[''])}",
                hint="Use PostgreSQL (SQLite 3.35 or later does for a single "
                "machine) for channels_presence's models and the user model, "
                "whose table their foreign key names.",
                id="channels_presence.E011",
            )
        ]
    messages: list[checks.CheckMessage] = []
    # The back end's DB-API module (sqlite3, unless a back end brings its own):
    # its library's version is known without connecting.
    library = getattr(connection, "Database", sqlite3)
    if tuple(library.sqlite_version_info) < OLDEST_SQLITE:
        messages.append(
            checks.Error(
                f"The database {alias!r} is SQLite {library.sqlite_version}, which"
                " has no RETURNING: channels_presence writes and deletes each "
                "batch of presences with one INSERT ... RETURNING and one "
                "DELETE ... RETURNING.",
                hint="Run Python with SQLite 3.35 or later (python -c 'import "
                "sqlite3; print(sqlite3.sqlite_version)' shows which it has), "
                "or use PostgreSQL.",
                id="channels_presence.E012",
            )
        )
    mode = (connection.settings_dict.get("OPTIONS") or {}).get("transaction_mode")
    if not (isinstance(mode, str) and mode.upper() in QUEUEING_MODES):
        messages.append(
            checks.Warning(
                f"The SQLite database {alias!r} holds channels_presence's models, "
                "and its transactions take the write lock only at their first "
                f"write (OPTIONS['transaction_mode'] is {mode!r}): one that has "
                "read cannot wait for a writer that came in since, so concurrent "
                "writers (workers, or daphnes applying presence inline) fail with "
                "'database is locked' instead of queueing.",
                hint=f'Set DATABASES["{alias}"]["OPTIONS"]["transaction_mode"] = '
                '"IMMEDIATE" (Django 5.1 or later): each transaction then takes '
                "the write lock at BEGIN, and a writer waits for it up to "
                'OPTIONS["timeout"] seconds (5 unless set), e.g. '
                '{"transaction_mode": "IMMEDIATE", "timeout": 20}.',
                id="channels_presence.W003",
            )
        )
    return messages


#: Why E011: what channels_presence needs that each back end lacks.
_UNSUPPORTED = {
    "mysql": "MySQL and MariaDB have no INSERT ... ON CONFLICT, MySQL has no "
    "RETURNING, and their named locks (GET_LOCK) are not released at commit, "
    "as the locks that order one socket's joins and leaves must be "
    "(PostgreSQL's advisory transaction locks, SQLite's single writer).",
    "oracle": "Oracle has no INSERT ... ON CONFLICT and returns a DELETE's rows "
    "only into variables; and one socket's joins and leaves are ordered by "
    "PostgreSQL's advisory locks or SQLite's single writer, which it has not.",
    "": "its SQL (INSERT ... ON CONFLICT, DELETE ... RETURNING) and the locks "
    "that order one socket's joins and leaves are written for PostgreSQL and "
    "SQLite only.",
}


def _whole_number(
    name: str, unit: str, default: str, code: str, *, none: str = ""
) -> checks.CheckMessage | None:
    """The error of the setting ``name`` unless it is unset, None, or a whole
    number of ``unit``, 1 or more; ``none``, if given, says what None means."""
    value = getattr(settings, PREFIX + name, None)
    if value is None or (
        isinstance(value, int) and not isinstance(value, bool) and value >= 1
    ):
        return None
    return checks.Error(
        f"{PREFIX}{name} is {value!r}; it must be a whole number of {unit}, "
        f"1 or more{', or ' + none if none else ''}.",
        hint=f"Remove it to use the default, {default}.",
        id=f"channels_presence.{code}",
    )


@checks.register()
def check_limits(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """E007: a bad MAX_ROOMS_PER_CONNECTION; E008: bad MEMBER_FIELDS;
    E009: a bad MAX_LISTED_MEMBERS; E010: a bad EVENT_SOCKETS."""
    errors = [
        error
        for error in (
            _whole_number(
                "EVENT_SOCKETS",
                "sockets",
                "300 sockets",
                "E010",
                none="None to keep every room's diffs at EVENT_INTERVAL",
            ),
            _whole_number("MAX_LISTED_MEMBERS", "members", "1,000 members", "E009"),
            _whole_number(
                "MAX_ROOMS_PER_CONNECTION",
                "rooms",
                "100 rooms",
                "E007",
                none="None for no limit",
            ),
        )
        if error is not None
    ]
    fields = conf.MEMBER_FIELDS
    if fields is None:
        return errors
    problem = ""
    if not isinstance(fields, dict) or not fields:
        problem = "it must be a dict of {payload key: user field}, not empty"
    elif not all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items()):
        problem = "its keys and values must be strings"
    else:
        try:
            get_user_model()._default_manager.values(*fields.values())
        except FieldError as error:
            problem = f"the user model has no such field: {error}"
    if problem:
        errors.append(
            checks.Error(
                f"{PREFIX}MEMBER_FIELDS is {fields!r}; {problem}.",
                hint="Write e.g. {'id': 'pk', 'name': 'first_name'}, or remove it "
                "to send each member's id and username.",
                id="channels_presence.E008",
            )
        )
    return errors


def _listed(names: list[str]) -> str:
    """``a, b and c``."""
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def _is_redis_location(value: object) -> bool:
    if isinstance(value, str) and value.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        return True
    if not sentinel.is_sentinel(value):
        return False
    try:
        sentinel.host_config(value)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def _setting_error(name: str, value: object, wanted: str) -> checks.Error:
    return checks.Error(
        f"{PREFIX}{name} is {value!r}; it must be {wanted}.",
        hint=f"Fix {PREFIX}{name} in your settings, or remove it to use the default.",
        id="channels_presence.E003",
    )
