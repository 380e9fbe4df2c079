"""channels_presence.conf: the settings contract, read lazily at call time."""

from __future__ import annotations

import pytest
from django.test import override_settings
from pytest_django import Settings

from channels_presence.conf import FLAG_SETTINGS, NUMBER_SETTINGS, PREFIX, conf

# The settings contract of DESIGN.md: name -> default.
DEFAULTS: dict[str, object] = {
    "MAX_AGE": 60,
    "USE_CELERY": True,
    "TOUCH_INTERVAL": 15,
    "FLUSH_INTERVAL": 1.0,
    "PRUNE_INTERVAL": 10,
    "ROOM_PRUNE_INTERVAL": 600,
    "BROADCAST": True,
}

# A value for each setting that differs from its default.
OTHER_VALUES: dict[str, object] = {
    "MAX_AGE": 90,
    "USE_CELERY": False,
    "TOUCH_INTERVAL": 3,
    "FLUSH_INTERVAL": 0.25,
    "PRUNE_INTERVAL": 30,
    "ROOM_PRUNE_INTERVAL": 3600,
    "BROADCAST": False,
}


def _unset_all(settings: Settings) -> None:
    for name in DEFAULTS:
        if hasattr(settings, PREFIX + name):
            delattr(settings, PREFIX + name)


def test_the_contract_lists_every_setting_conf_knows() -> None:
    assert set(DEFAULTS) == set(NUMBER_SETTINGS) | set(FLAG_SETTINGS)
    assert PREFIX == "CHANNELS_PRESENCE_"


@pytest.mark.parametrize("name", DEFAULTS)
def test_an_unset_setting_has_its_documented_default(
    settings: Settings, name: str
) -> None:
    _unset_all(settings)
    assert not hasattr(settings, PREFIX + name)
    value = getattr(conf, name)
    assert value == DEFAULTS[name]
    if name in FLAG_SETTINGS:
        assert value is DEFAULTS[name]


def test_the_test_settings_turn_celery_off_and_unsetting_turns_it_on(
    settings: Settings,
) -> None:
    assert conf.USE_CELERY is False
    del settings.CHANNELS_PRESENCE_USE_CELERY
    assert conf.USE_CELERY is True


@pytest.mark.parametrize("name", DEFAULTS)
def test_a_setting_is_read_at_call_time(name: str) -> None:
    before = getattr(conf, name)
    with override_settings(**{PREFIX + name: OTHER_VALUES[name]}):
        assert getattr(conf, name) == OTHER_VALUES[name]
    assert getattr(conf, name) == before


def test_touch_interval_is_a_quarter_of_max_age_when_unset(
    settings: Settings,
) -> None:
    _unset_all(settings)
    settings.CHANNELS_PRESENCE_MAX_AGE = 100
    assert conf.TOUCH_INTERVAL == 25
    settings.CHANNELS_PRESENCE_MAX_AGE = 2
    assert conf.TOUCH_INTERVAL == 0.5


def test_an_explicit_touch_interval_wins_over_max_age(
    settings: Settings,
) -> None:
    settings.CHANNELS_PRESENCE_MAX_AGE = 100
    settings.CHANNELS_PRESENCE_TOUCH_INTERVAL = 7
    assert conf.TOUCH_INTERVAL == 7


def test_a_touch_interval_of_zero_means_zero_not_the_default(
    settings: Settings,
) -> None:
    # 0 touches on every message; it must not be mistaken for "unset".
    settings.CHANNELS_PRESENCE_MAX_AGE = 100
    settings.CHANNELS_PRESENCE_TOUCH_INTERVAL = 0
    assert conf.TOUCH_INTERVAL == 0


@pytest.mark.parametrize("name", ["USE_CELERY", "BROADCAST"])
def test_a_flag_set_to_false_is_false(settings: Settings, name: str) -> None:
    setattr(settings, PREFIX + name, False)
    assert getattr(conf, name) is False
