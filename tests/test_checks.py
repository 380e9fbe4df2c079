"""System checks: stable ids, each one raised by the misconfiguration it names."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, current_app
from django.core.checks import CheckMessage, Error, Warning, run_checks
from django.db import connections
from django.db.models import Model
from django.db.utils import ConnectionHandler
from django.test import override_settings
from pytest_django import Settings

from channels_presence import checks as checks_module
from channels_presence.checks import IN_MEMORY_LAYER
from channels_presence.schedule import ENTRIES
from tasks import app as tasks_app

# The settings of DESIGN.md's contract that hold seconds, and those that hold a flag.
NUMBER_SETTINGS = [
    "CHANNELS_PRESENCE_MAX_AGE",
    "CHANNELS_PRESENCE_TOUCH_INTERVAL",
    "CHANNELS_PRESENCE_FLUSH_INTERVAL",
    "CHANNELS_PRESENCE_PRUNE_INTERVAL",
    "CHANNELS_PRESENCE_ROOM_PRUNE_INTERVAL",
    "CHANNELS_PRESENCE_WORKER_TIMEOUT",
]
FLAG_SETTINGS = ["CHANNELS_PRESENCE_USE_CELERY", "CHANNELS_PRESENCE_BROADCAST"]

REDIS_LAYER = {
    "BACKEND": "channels_redis.core.RedisChannelLayer",
    "CONFIG": {"hosts": ["redis://127.0.0.1:6379"]},
}
MEMORY_LAYER = {"BACKEND": IN_MEMORY_LAYER}


def presence_messages() -> list[CheckMessage]:
    """The messages of channels_presence's checks, run as Django runs them."""
    return [
        message
        for message in run_checks()
        if message.id and message.id.startswith("channels_presence.")
    ]


def ids() -> list[str]:
    return [str(message.id) for message in presence_messages()]


def the_message(check_id: str, level: type[CheckMessage]) -> CheckMessage:
    """The checks' one message, once checked to be ``check_id`` at ``level``."""
    messages = presence_messages()
    assert [m.id for m in messages] == [check_id]
    assert isinstance(messages[0], level)
    return messages[0]


def test_the_test_settings_raise_no_message() -> None:
    assert presence_messages() == []


@pytest.mark.parametrize(
    "layers",
    [{}, {"other": REDIS_LAYER}, {"default": {}}],
    ids=["empty", "no default", "empty default"],
)
def test_no_default_channel_layer_is_e001(
    settings: Settings, layers: dict[str, object]
) -> None:
    settings.CHANNEL_LAYERS = layers
    message = the_message("channels_presence.E001", Error)
    assert "CHANNEL_LAYERS['default']" in str(message.hint)


def test_no_channel_layers_setting_at_all_is_e001(settings: Settings) -> None:
    del settings.CHANNEL_LAYERS
    assert ids() == ["channels_presence.E001"]


def test_the_in_memory_layer_with_celery_is_e002(settings: Settings) -> None:
    settings.CHANNEL_LAYERS = {"default": MEMORY_LAYER}
    settings.CHANNELS_PRESENCE_USE_CELERY = True
    message = the_message("channels_presence.E002", Error)
    assert "CHANNELS_PRESENCE_USE_CELERY = False" in str(message.hint)


def test_the_in_memory_layer_with_celery_by_default_is_e002(
    settings: Settings,
) -> None:
    settings.CHANNEL_LAYERS = {"default": MEMORY_LAYER}
    del settings.CHANNELS_PRESENCE_USE_CELERY
    assert ids() == ["channels_presence.E002"]


def test_the_in_memory_layer_without_celery_is_fine(settings: Settings) -> None:
    settings.CHANNEL_LAYERS = {"default": MEMORY_LAYER}
    settings.CHANNELS_PRESENCE_USE_CELERY = False
    assert ids() == []


def test_a_redis_layer_with_celery_is_fine(settings: Settings) -> None:
    settings.CHANNEL_LAYERS = {"default": REDIS_LAYER}
    settings.CHANNELS_PRESENCE_USE_CELERY = True
    assert ids() == []


WRONG_NUMBERS = {
    "str": "60",
    "True": True,
    "False": False,
    "list": [60],
    "negative": -1,
    "negative float": -0.5,
    "NaN": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
}


@pytest.mark.parametrize("name", NUMBER_SETTINGS)
@pytest.mark.parametrize(
    "value", WRONG_NUMBERS.values(), ids=list(WRONG_NUMBERS.keys())
)
def test_a_number_setting_of_the_wrong_type_or_range_is_e003_naming_it(
    settings: Settings, name: str, value: object
) -> None:
    setattr(settings, name, value)
    message = the_message("channels_presence.E003", Error)
    assert message.msg.startswith(f"{name} is {value!r};")
    assert "seconds" in message.msg


@pytest.mark.parametrize("name", FLAG_SETTINGS)
@pytest.mark.parametrize("value", [1, 0, "True", "no"], ids=repr)
def test_a_flag_setting_that_is_not_a_bool_is_e003_naming_it(
    settings: Settings, name: str, value: object
) -> None:
    setattr(settings, name, value)
    # E002 compares USE_CELERY with True, so a truthy non-bool must not hide
    # behind the in-memory layer check either.
    messages = presence_messages()
    assert [m.id for m in messages] == ["channels_presence.E003"]
    assert messages[0].msg == f"{name} is {value!r}; it must be True or False."


@pytest.mark.parametrize("name", NUMBER_SETTINGS)
@pytest.mark.parametrize("value", [0, 0.5, 30, 10**6])
def test_zero_or_more_seconds_is_fine(
    settings: Settings, name: str, value: float
) -> None:
    # Keep the touch interval below MAX_AGE so that W001 stays out of the way.
    settings.CHANNELS_PRESENCE_MAX_AGE = 10**7
    settings.CHANNELS_PRESENCE_TOUCH_INTERVAL = 0
    setattr(settings, name, value)
    # A MAX_AGE of 0 is valid, but every presence is stale at once: W001.
    zero_max_age = (name, value) == ("CHANNELS_PRESENCE_MAX_AGE", 0)
    expected = ["channels_presence.W001"] if zero_max_age else []
    assert ids() == expected


def test_a_max_age_of_zero_warns_that_live_sockets_would_be_pruned(
    settings: Settings,
) -> None:
    settings.CHANNELS_PRESENCE_MAX_AGE = 0
    assert ids() == ["channels_presence.W001"]


def test_every_wrong_setting_is_reported_at_once(settings: Settings) -> None:
    settings.CHANNELS_PRESENCE_MAX_AGE = "60"
    settings.CHANNELS_PRESENCE_FLUSH_INTERVAL = -1
    settings.CHANNELS_PRESENCE_BROADCAST = "yes"
    messages = presence_messages()
    assert [m.id for m in messages] == ["channels_presence.E003"] * 3
    named = " ".join(m.msg for m in messages)
    for name in ("MAX_AGE", "FLUSH_INTERVAL", "BROADCAST"):
        assert "CHANNELS_PRESENCE_" + name in named


@pytest.mark.parametrize("touch_interval", [60, 61, 1000])
def test_a_touch_interval_not_shorter_than_max_age_is_w001(
    settings: Settings, touch_interval: float
) -> None:
    settings.CHANNELS_PRESENCE_MAX_AGE = 60
    settings.CHANNELS_PRESENCE_TOUCH_INTERVAL = touch_interval
    message = the_message("channels_presence.W001", Warning)
    assert f"({touch_interval})" in message.msg


def test_a_touch_interval_shorter_than_max_age_is_fine(
    settings: Settings,
) -> None:
    settings.CHANNELS_PRESENCE_MAX_AGE = 60
    settings.CHANNELS_PRESENCE_TOUCH_INTERVAL = 59.9
    assert ids() == []


def test_the_default_touch_interval_follows_a_small_max_age(
    settings: Settings,
) -> None:
    settings.CHANNELS_PRESENCE_MAX_AGE = 4
    if hasattr(settings, "CHANNELS_PRESENCE_TOUCH_INTERVAL"):
        del settings.CHANNELS_PRESENCE_TOUCH_INTERVAL
    assert ids() == []


def test_checks_read_settings_at_call_time() -> None:
    assert ids() == []
    with override_settings(CHANNELS_PRESENCE_MAX_AGE=-5):
        assert ids() == ["channels_presence.E003"]
    assert ids() == []


# Celery: E004 (no broker) and W002 (nothing schedules the prunes).


@pytest.fixture
def make_current(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Celery]]:
    """``make_current(**config)``: a new Celery app, current until the test ends.

    Other tests may leave an app of theirs current; afterwards the suite's own
    (``tasks.app``, which conftest imports) is.
    """
    # Celery reads CELERY_BROKER_URL from the environment before its own conf.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    made: list[Celery] = []

    def make(**config: Any) -> Celery:
        app = Celery("checked", set_as_current=True, **config)
        made.append(app)
        return app

    try:
        yield make
    finally:
        tasks_app.set_current()
        for app in made:
            app.close()


@pytest.fixture
def brokerless_app(make_current: Callable[..., Celery]) -> Celery:
    """A Celery app with no broker configured, current for the test's duration."""
    return make_current()


def test_celery_mode_with_a_broker_is_fine(
    settings: Settings, make_current: Callable[..., Celery]
) -> None:
    settings.CHANNELS_PRESENCE_USE_CELERY = True
    make_current(broker="redis://127.0.0.1:6379/0")
    assert ids() == []


@pytest.mark.parametrize("use_celery", [True, None], ids=["on", "by default"])
def test_celery_mode_with_a_brokerless_app_is_e004(
    settings: Settings, brokerless_app: Celery, use_celery: bool | None
) -> None:
    assert current_app.main == "checked"
    if use_celery is None:
        del settings.CHANNELS_PRESENCE_USE_CELERY
    else:
        settings.CHANNELS_PRESENCE_USE_CELERY = use_celery
    message = the_message("channels_presence.E004", Error)
    assert "no broker" in message.msg
    for advice in (
        "CELERY_BROKER_URL",
        "config_from_object('django.conf:settings'",
        "CHANNELS_PRESENCE_USE_CELERY = False",
    ):
        assert advice in str(message.hint)


def test_a_brokerless_app_without_celery_mode_is_fine(
    settings: Settings, brokerless_app: Celery
) -> None:
    settings.CHANNELS_PRESENCE_USE_CELERY = False
    assert ids() == []


def test_e004_looks_at_the_current_app_at_call_time(
    settings: Settings, brokerless_app: Celery
) -> None:
    settings.CHANNELS_PRESENCE_USE_CELERY = True
    assert ids() == ["channels_presence.E004"]
    tasks_app.set_current()
    assert ids() == []
    brokerless_app.set_current()
    assert ids() == ["channels_presence.E004"]


def _without_beat(settings: Settings) -> list[str]:
    apps = [app for app in settings.INSTALLED_APPS if app != "django_celery_beat"]
    assert len(apps) == len(settings.INSTALLED_APPS) - 1
    return apps


def test_celery_mode_without_django_celery_beat_is_w002(settings: Settings) -> None:
    settings.CHANNELS_PRESENCE_USE_CELERY = True
    settings.INSTALLED_APPS = _without_beat(settings)
    message = the_message("channels_presence.W002", Warning)
    assert "django_celery_beat" in message.msg
    for advice in (
        "Add 'django_celery_beat' to INSTALLED_APPS",
        "'celery -A <your project> beat -S django'",
    ):
        assert advice in str(message.hint)


def test_w002_names_every_beat_entry_and_its_task(settings: Settings) -> None:
    settings.CHANNELS_PRESENCE_USE_CELERY = True
    settings.INSTALLED_APPS = _without_beat(settings)
    message = the_message("channels_presence.W002", Warning)
    assert len(ENTRIES) == 3
    for name, task, *_ in ENTRIES:
        assert f"'{name}'" in str(message.hint)
        assert task in message.msg


def test_no_check_tells_a_project_to_run_this_repositorys_celery_app() -> None:
    # tasks/ is this repository's own Celery app; a user's is their project's.
    assert "-A tasks" not in inspect.getsource(checks_module)


def test_no_django_celery_beat_without_celery_mode_is_fine(
    settings: Settings,
) -> None:
    settings.CHANNELS_PRESENCE_USE_CELERY = False
    settings.INSTALLED_APPS = _without_beat(settings)
    assert ids() == []


def test_no_broker_and_no_django_celery_beat_are_both_reported(
    settings: Settings, brokerless_app: Celery
) -> None:
    settings.CHANNELS_PRESENCE_USE_CELERY = True
    settings.INSTALLED_APPS = _without_beat(settings)
    assert ids() == ["channels_presence.E004", "channels_presence.W002"]


# Databases: E011 (a back end presence does not support), E012 (SQLite before
# 3.35), W003 (SQLite whose writers fail instead of queueing). No MySQL, MariaDB
# or Oracle driver is installed here: their connections are stand-ins with what
# Django's have before they connect. The SQLite ones are real, never opened.


class StandIn:
    """An unopened connection to a back end this machine has no driver for."""

    def __init__(self, vendor: str, display_name: str, alias: str = "default"):
        self.vendor = vendor
        self.display_name = display_name
        self.alias = alias
        self.settings_dict: dict[str, Any] = {"OPTIONS": {}}
        self.connection = None


def sqlite(alias: str = "default", **options: Any) -> Any:
    """A real SQLite connection of ``alias`` with these OPTIONS, not opened."""
    database = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
    # Django wants a "default" among them; an empty one is its dummy back end.
    return ConnectionHandler({"default": {}, alias: {**database, "OPTIONS": options}})[
        alias
    ]


class PresenceElsewhere:
    """A router: channels_presence's models in the database "presence"."""

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        return self.db_for_write(model, **hints)

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        return "presence" if model._meta.app_label == "channels_presence" else None


ROUTED_ELSEWHERE = override_settings(
    DATABASE_ROUTERS=[f"{__name__}.{PresenceElsewhere.__name__}"]
)


@pytest.fixture
def databases(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``databases(alias=connection, ...)``: the connections the checks see."""

    def use(**found: Any) -> None:
        monkeypatch.setattr(checks_module, "connections", found)

    return use


@pytest.mark.parametrize(
    ("vendor", "name", "missing"),
    [
        ("mysql", "MySQL", "ON CONFLICT"),
        ("oracle", "Oracle", "ON CONFLICT"),
        ("microsoft", "SQL Server", "PostgreSQL and SQLite"),
    ],
)
def test_a_database_other_than_postgresql_or_sqlite_is_e011_saying_why(
    databases: Callable[..., None], vendor: str, name: str, missing: str
) -> None:
    databases(default=StandIn(vendor, name))
    message = the_message("channels_presence.E011", Error)
    assert f"'default' ({name})" in message.msg
    assert missing in message.msg
    assert "PostgreSQL" in str(message.hint)


def test_e011_says_mysql_and_mariadb_lack_returning_and_locks_held_to_commit(
    databases: Callable[..., None],
) -> None:
    databases(default=StandIn("mysql", "MySQL"))
    message = the_message("channels_presence.E011", Error)
    for reason in ("MariaDB", "RETURNING", "ON CONFLICT", "commit"):
        assert reason in message.msg


@pytest.mark.parametrize("version", [(3, 31, 0), (3, 34, 1)], ids=str)
def test_sqlite_before_3_35_is_e012(
    databases: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    version: tuple[int, int, int],
) -> None:
    connection = sqlite(transaction_mode="IMMEDIATE")
    written = ".".join(map(str, version))
    monkeypatch.setattr(
        connection,
        "Database",
        SimpleNamespace(sqlite_version_info=version, sqlite_version=written),
    )
    databases(default=connection)
    message = the_message("channels_presence.E012", Error)
    assert f"SQLite {written}" in message.msg
    assert "RETURNING" in message.msg
    assert "3.35" in str(message.hint)


@pytest.mark.parametrize("version", [(3, 35, 0), (3, 45, 1)], ids=str)
def test_sqlite_from_3_35_on_is_fine(
    databases: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    version: tuple[int, int, int],
) -> None:
    connection = sqlite(transaction_mode="IMMEDIATE")
    monkeypatch.setattr(
        connection,
        "Database",
        SimpleNamespace(
            sqlite_version_info=version, sqlite_version=".".join(map(str, version))
        ),
    )
    databases(default=connection)
    assert ids() == []


@pytest.mark.parametrize(
    "options",
    [{}, {"transaction_mode": None}, {"transaction_mode": "DEFERRED"}],
    ids=["unset", "None", "DEFERRED"],
)
def test_sqlite_without_immediate_transactions_is_w003_with_the_setting(
    databases: Callable[..., None], options: dict[str, Any]
) -> None:
    databases(default=sqlite(**options))
    message = the_message("channels_presence.W003", Warning)
    assert "'default'" in message.msg
    assert "database is locked" in message.msg
    assert 'DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"' in str(
        message.hint
    )


@pytest.mark.parametrize("mode", ["IMMEDIATE", "immediate", "EXCLUSIVE"])
def test_sqlite_whose_transactions_take_the_write_lock_at_once_is_fine(
    databases: Callable[..., None], mode: str
) -> None:
    databases(default=sqlite(transaction_mode=mode))
    assert ids() == []


@pytest.mark.skipif(
    connections["default"].vendor != "sqlite", reason="the suite's database is SQLite"
)
def test_the_suites_own_sqlite_without_immediate_transactions_is_w003(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = connections["default"].settings_dict["OPTIONS"]
    assert ids() == []
    monkeypatch.delitem(options, "transaction_mode")
    assert ids() == ["channels_presence.W003"]


def test_only_the_database_of_the_presence_models_is_checked(
    databases: Callable[..., None],
) -> None:
    routed = sqlite("presence", transaction_mode="IMMEDIATE")
    databases(default=StandIn("mysql", "MySQL"), presence=routed)
    assert ids() == ["channels_presence.E011"]
    with ROUTED_ELSEWHERE:
        assert ids() == []
    databases(default=sqlite(), presence=StandIn("oracle", "Oracle", "presence"))
    with ROUTED_ELSEWHERE:
        message = the_message("channels_presence.E011", Error)
    assert "'presence' (Oracle)" in message.msg
    # Read from the connection's class and settings: nothing was opened.
    assert routed.connection is None
