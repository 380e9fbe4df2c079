"""channels_presence.conf: the settings contract, read lazily at call time."""

from __future__ import annotations

import pytest
from django.test import override_settings
from pytest_django import Settings as DjangoSettings

from channels_presence.conf import Settings, conf

# The settings contract of DESIGN.md, by the names users write: name -> default.
DEFAULTS: dict[str, object] = {
    "CHANNELS_PRESENCE_MAX_AGE": 60,
    "CHANNELS_PRESENCE_USE_CELERY": True,
    "CHANNELS_PRESENCE_TOUCH_INTERVAL": 15,
    "CHANNELS_PRESENCE_FLUSH_INTERVAL": 1.0,
    "CHANNELS_PRESENCE_PRUNE_INTERVAL": 10,
    "CHANNELS_PRESENCE_ROOM_PRUNE_INTERVAL": 600,
    "CHANNELS_PRESENCE_BROADCAST": True,
    "CHANNELS_PRESENCE_SERVER_LEASE": 10,
    "CHANNELS_PRESENCE_SERVER_PRUNE_INTERVAL": 5,
    "CHANNELS_PRESENCE_REDIS_URL": None,
    "CHANNELS_PRESENCE_QUEUE": None,
    "CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION": 100,
    "CHANNELS_PRESENCE_MEMBER_FIELDS": None,
    "CHANNELS_PRESENCE_EVENT_INTERVAL": 0.1,
    "CHANNELS_PRESENCE_EVENT_SOCKETS": 300,
    "CHANNELS_PRESENCE_MAX_LISTED_MEMBERS": 1_000,
    "CHANNELS_PRESENCE_WORKER_TIMEOUT": 30,
}
FLAGS = {"CHANNELS_PRESENCE_USE_CELERY", "CHANNELS_PRESENCE_BROADCAST"}

# A value for each setting that differs from its default.
OTHER_VALUES: dict[str, object] = {
    "CHANNELS_PRESENCE_MAX_AGE": 90,
    "CHANNELS_PRESENCE_USE_CELERY": False,
    "CHANNELS_PRESENCE_TOUCH_INTERVAL": 3,
    "CHANNELS_PRESENCE_FLUSH_INTERVAL": 0.25,
    "CHANNELS_PRESENCE_PRUNE_INTERVAL": 30,
    "CHANNELS_PRESENCE_ROOM_PRUNE_INTERVAL": 3600,
    "CHANNELS_PRESENCE_BROADCAST": False,
    "CHANNELS_PRESENCE_SERVER_LEASE": None,
    "CHANNELS_PRESENCE_SERVER_PRUNE_INTERVAL": 2,
    "CHANNELS_PRESENCE_REDIS_URL": "redis://elsewhere:6379/1",
    "CHANNELS_PRESENCE_QUEUE": "presence",
    "CHANNELS_PRESENCE_MAX_ROOMS_PER_CONNECTION": None,
    "CHANNELS_PRESENCE_MEMBER_FIELDS": {"id": "pk"},
    "CHANNELS_PRESENCE_EVENT_INTERVAL": 0.5,
    "CHANNELS_PRESENCE_EVENT_SOCKETS": None,
    "CHANNELS_PRESENCE_MAX_LISTED_MEMBERS": 50,
    "CHANNELS_PRESENCE_WORKER_TIMEOUT": None,
}


def attribute(setting: str) -> str:
    """The attribute of ``conf`` that reads ``setting``."""
    return setting.removeprefix("CHANNELS_PRESENCE_")


def _unset_all(settings: DjangoSettings) -> None:
    for name in DEFAULTS:
        if hasattr(settings, name):
            delattr(settings, name)


def test_conf_reads_exactly_the_settings_of_the_contract() -> None:
    read = {
        name for name, value in vars(Settings).items() if isinstance(value, property)
    }
    assert read == {attribute(setting) for setting in DEFAULTS}


@pytest.mark.parametrize("name", DEFAULTS)
def test_an_unset_setting_has_its_documented_default(
    settings: DjangoSettings, name: str
) -> None:
    _unset_all(settings)
    assert not hasattr(settings, name)
    value = getattr(conf, attribute(name))
    assert value == DEFAULTS[name]
    if name in FLAGS:
        assert value is DEFAULTS[name]


def test_the_test_settings_turn_celery_off_and_unsetting_turns_it_on(
    settings: DjangoSettings,
) -> None:
    assert conf.USE_CELERY is False
    del settings.CHANNELS_PRESENCE_USE_CELERY
    assert conf.USE_CELERY is True


@pytest.mark.parametrize("name", DEFAULTS)
def test_a_setting_is_read_by_its_name_at_call_time(name: str) -> None:
    before = getattr(conf, attribute(name))
    with override_settings(**{name: OTHER_VALUES[name]}):
        assert getattr(conf, attribute(name)) == OTHER_VALUES[name]
    assert getattr(conf, attribute(name)) == before


def test_touch_interval_is_a_quarter_of_max_age_when_unset(
    settings: DjangoSettings,
) -> None:
    _unset_all(settings)
    settings.CHANNELS_PRESENCE_MAX_AGE = 100
    assert conf.TOUCH_INTERVAL == 25
    settings.CHANNELS_PRESENCE_MAX_AGE = 2
    assert conf.TOUCH_INTERVAL == 0.5


def test_an_explicit_touch_interval_wins_over_max_age(
    settings: DjangoSettings,
) -> None:
    settings.CHANNELS_PRESENCE_MAX_AGE = 100
    settings.CHANNELS_PRESENCE_TOUCH_INTERVAL = 7
    assert conf.TOUCH_INTERVAL == 7


def test_a_touch_interval_of_zero_means_zero_not_the_default(
    settings: DjangoSettings,
) -> None:
    # 0 touches on every message; it must not be mistaken for "unset".
    settings.CHANNELS_PRESENCE_MAX_AGE = 100
    settings.CHANNELS_PRESENCE_TOUCH_INTERVAL = 0
    assert conf.TOUCH_INTERVAL == 0


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_a_flag_set_to_false_is_false(settings: DjangoSettings, name: str) -> None:
    setattr(settings, name, False)
    assert getattr(conf, attribute(name)) is False
