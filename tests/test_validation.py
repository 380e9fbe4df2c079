"""channels_presence.validation: what callers pass in is checked before any write."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
from channels.layers import BaseChannelLayer
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.test import override_settings
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from channels_presence import validation
from tests.helpers import sqlite_pass_only

ALLOWED = "ASCII alphanumerics, hyphens, underscores, or periods"

VALID_NAMES = [
    "lobby",
    "Room-1_a.b",
    "0",
    "a" * (BaseChannelLayer.MAX_NAME_LENGTH - 1),
]

INVALID_NAMES = {
    "space": "a b",
    "leading space": " lobby",
    "unicode": "café",
    "emoji": "room-\N{GRINNING FACE}",
    "empty": "",
    "100 chars": "a" * BaseChannelLayer.MAX_NAME_LENGTH,
    "200 chars": "a" * 200,
    "slash": "a/b",
    "colon": "a:b",
    "newline inside": "lob\nby",
    "tab": "lob\tby",
    "nul": "lob\x00by",
    "escape": "lobby\x1b",
}

NameCheck = Callable[[object], str]
NAME_CHECKS = pytest.mark.parametrize(
    "check",
    [validation.room_name, validation.channel_name],
    ids=["room_name", "channel_name"],
)


@NAME_CHECKS
@pytest.mark.parametrize("name", VALID_NAMES)
def test_a_name_channels_accepts_is_returned_unchanged(
    check: NameCheck, name: str
) -> None:
    assert check(name) == name


@NAME_CHECKS
@pytest.mark.parametrize("name", INVALID_NAMES.values(), ids=INVALID_NAMES.keys())
def test_a_name_channels_rejects_is_a_value_error_saying_what_is_allowed(
    check: NameCheck, name: str
) -> None:
    with pytest.raises(ValueError, match="is not a valid Channels") as raised:
        check(name)
    message = str(raised.value)
    assert ALLOWED in message
    assert f"< {BaseChannelLayer.MAX_NAME_LENGTH}" in message
    # The message shows the offending value (shortened when long).
    assert repr(name)[:40] in message


@NAME_CHECKS
def test_a_trailing_newline_is_rejected(check: NameCheck) -> None:
    # Channels' own check uses re.match with "$", which also matches before a
    # final newline, so "lobby\n" slips through it; Channels' rule (and its
    # message) says ASCII alphanumerics, hyphens, underscores or periods only.
    with pytest.raises(ValueError, match=ALLOWED):
        check("lobby\n")


@NAME_CHECKS
@pytest.mark.parametrize("name", [None, 7, b"lobby", ["lobby"]])
def test_a_name_that_is_not_a_str_is_a_type_error(
    check: NameCheck, name: object
) -> None:
    with pytest.raises(TypeError, match="must be a str, not"):
        check(name)


@pytest.mark.parametrize(
    "name",
    [
        "specific.abc!def",
        "specific.0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d!6e7f8a9b0c1d",
        "specific.abc!",
    ],
)
def test_process_local_channel_names_are_valid(name: str) -> None:
    assert validation.channel_name(name) == name


def test_process_local_form_is_not_a_valid_room_name() -> None:
    with pytest.raises(ValueError, match="not a valid Channels group name"):
        validation.room_name("specific.abc!def")


def test_channel_name_error_tells_the_caller_what_to_pass() -> None:
    with pytest.raises(ValueError, match=r"pass the consumer's self\.channel_name"):
        validation.channel_name("not a channel")


def test_channel_names_checks_every_name_and_returns_a_list() -> None:
    assert validation.channel_names(("a", "b.c!d")) == ["a", "b.c!d"]
    with pytest.raises(ValueError, match="'b c'"):
        validation.channel_names(["a", "b c"])


def test_channel_names_refuses_a_bare_str() -> None:
    # A str is iterable: "abc" must not be taken for ["a", "b", "c"].
    with pytest.raises(TypeError, match="list of str"):
        validation.channel_names("abc")


@pytest.mark.parametrize("user", [None, AnonymousUser()], ids=["None", "anonymous"])
def test_no_user_or_an_anonymous_user_is_stored_as_anonymous(user: object) -> None:
    assert validation.user_id(user) is None


@pytest.mark.django_db
def test_a_saved_user_is_stored_by_its_primary_key() -> None:
    user = get_user_model().objects.create_user("alice")
    assert validation.user_id(user) == user.pk


def test_an_unsaved_user_is_a_value_error_that_says_to_save_it() -> None:
    with pytest.raises(ValueError, match="has not been saved: save it first"):
        validation.user_id(get_user_model()(username="alice"))


@pytest.mark.django_db
def test_a_deleted_user_is_a_value_error() -> None:
    user = get_user_model().objects.create_user("alice")
    user.delete()
    with pytest.raises(ValueError, match="has not been saved"):
        validation.user_id(user)


@pytest.mark.parametrize("user", ["alice", 1, object()], ids=["str", "int", "object"])
def test_anything_else_as_a_user_is_a_type_error(user: object) -> None:
    with pytest.raises(TypeError, match="user must be a saved User, None or"):
        validation.user_id(user)


def test_age_none_means_max_age() -> None:
    with override_settings(CHANNELS_PRESENCE_MAX_AGE=42):
        assert validation.age(None) == 42.0
    with override_settings(CHANNELS_PRESENCE_MAX_AGE=7.5):
        assert validation.age(None) == 7.5


@pytest.mark.parametrize("seconds", [0, 1, 2.5, 10**6])
def test_a_finite_non_negative_age_is_returned_as_a_float(seconds: float) -> None:
    result = validation.age(seconds)
    assert result == seconds
    assert type(result) is float


@pytest.mark.parametrize(
    "seconds", [-1, -0.001, math.nan, math.inf, -math.inf], ids=str
)
def test_a_negative_or_non_finite_age_is_a_value_error(seconds: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds, 0 or more"):
        validation.age(seconds)


@pytest.mark.parametrize("seconds", ["10", True, False, b"10", [10]], ids=repr)
def test_an_age_that_is_not_a_number_is_a_type_error(seconds: object) -> None:
    with pytest.raises(TypeError, match="age must be a number of seconds"):
        validation.age(seconds)


def test_a_max_age_of_the_wrong_type_is_a_type_error_too() -> None:
    with (
        override_settings(CHANNELS_PRESENCE_MAX_AGE="60"),
        pytest.raises(TypeError, match="age must be a number"),
    ):
        validation.age(None)


def test_a_room_name_in_the_events_group_namespace_is_refused() -> None:
    with pytest.raises(ValueError, match="reserved for channels_presence's events"):
        validation.room_name("presence_events.lobby")


# ROOM_NAME_PATTERN: the same rule, for URL patterns.


def _pattern_admits(name: str) -> bool:
    return re.fullmatch(validation.ROOM_NAME_PATTERN, name) is not None


def _room_name_accepts(name: str) -> bool:
    try:
        validation.room_name(name)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    "name",
    [
        *VALID_NAMES,
        *INVALID_NAMES.values(),
        "presence_events.lobby",
        "presence_events",
        "presence_events-lobby",
        "\N{ARABIC-INDIC DIGIT ONE}",
        "lobby\n",
    ],
)
def test_the_url_pattern_admits_exactly_the_room_names_room_name_accepts(
    name: str,
) -> None:
    assert _pattern_admits(name) == _room_name_accepts(name)


@sqlite_pass_only
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=110))
@hypothesis_settings(max_examples=500, deadline=None)
def test_any_text_is_admitted_by_the_url_pattern_iff_room_name_accepts_it(
    name: str,
) -> None:
    assert _pattern_admits(name) == _room_name_accepts(name)


@sqlite_pass_only
@given(st.from_regex(r"[-a-zA-Z0-9_.]{1,110}", fullmatch=True))
@hypothesis_settings(max_examples=500, deadline=None)
def test_names_of_the_allowed_characters_agree_too(name: str) -> None:
    assert _pattern_admits(name) == _room_name_accepts(name)
