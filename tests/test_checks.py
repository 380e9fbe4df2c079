"""System checks: stable ids, each one raised by the misconfiguration it names."""

from __future__ import annotations

import math

import pytest
from django.core.checks import CheckMessage, Error, Warning, run_checks
from django.test import override_settings
from pytest_django import Settings

from channels_presence.checks import IN_MEMORY_LAYER

# The settings of DESIGN.md's contract that hold seconds, and those that hold a flag.
NUMBER_SETTINGS = [
    "CHANNELS_PRESENCE_MAX_AGE",
    "CHANNELS_PRESENCE_TOUCH_INTERVAL",
    "CHANNELS_PRESENCE_FLUSH_INTERVAL",
    "CHANNELS_PRESENCE_PRUNE_INTERVAL",
    "CHANNELS_PRESENCE_ROOM_PRUNE_INTERVAL",
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
    messages = presence_messages()
    assert [m.id for m in messages] == ["channels_presence.E001"]
    assert isinstance(messages[0], Error)
    assert "CHANNEL_LAYERS['default']" in str(messages[0].hint)


def test_no_channel_layers_setting_at_all_is_e001(settings: Settings) -> None:
    del settings.CHANNEL_LAYERS
    assert ids() == ["channels_presence.E001"]


def test_the_in_memory_layer_with_celery_is_e002(settings: Settings) -> None:
    settings.CHANNEL_LAYERS = {"default": MEMORY_LAYER}
    settings.CHANNELS_PRESENCE_USE_CELERY = True
    messages = presence_messages()
    assert [m.id for m in messages] == ["channels_presence.E002"]
    assert isinstance(messages[0], Error)
    assert "CHANNELS_PRESENCE_USE_CELERY = False" in str(messages[0].hint)


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
    messages = presence_messages()
    assert [m.id for m in messages] == ["channels_presence.E003"]
    assert isinstance(messages[0], Error)
    assert messages[0].msg.startswith(f"{name} is {value!r};")
    assert "seconds" in messages[0].msg


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
    messages = presence_messages()
    assert [m.id for m in messages] == ["channels_presence.W001"]
    assert isinstance(messages[0], Warning)
    assert f"({touch_interval})" in messages[0].msg


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
