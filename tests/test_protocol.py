"""Wire protocol 2's pure parts: keys, refs, listing, diffs, and the client's reducer.

No database, no channel layer, except where a case says so. The reducer cases
(``tests/protocol_cases.json``) are the ones presence.js runs in Chromium
(tests/test_browser.py): the Python reducer of ``channels_presence.testing``,
which the end-to-end tests use to check what clients see, must agree with it
on every one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from channels_presence import protocol
from channels_presence.protocol import Counts, Diff, Entry
from channels_presence.testing import RoomView
from tests.helpers import sqlite_pass_only

pytestmark = sqlite_pass_only

CASES = json.loads((Path(__file__).parent / "protocol_cases.json").read_text())


# Keys and refs.


def test_a_users_key_is_its_primary_key() -> None:
    assert protocol.member_key("lobby", "specific.a!1", 42) == "u:42"
    assert protocol.member_key("lobby", "specific.a!1", 42, "session") == "u:42"


def test_a_visitors_key_is_per_session_and_room_and_holds_neither() -> None:
    tab = protocol.member_key("lobby", "specific.a!1", None, "sess-1")
    other_tab = protocol.member_key("lobby", "specific.b!2", None, "sess-1")
    elsewhere = protocol.member_key("kitchen", "specific.a!1", None, "sess-1")
    someone = protocol.member_key("lobby", "specific.a!1", None, "sess-2")
    assert tab == other_tab
    assert len({tab, elsewhere, someone}) == 3
    assert tab.startswith("v:")
    assert len(tab) == 2 + 32
    assert "sess-1" not in tab


def test_a_visitor_without_a_session_is_one_per_socket() -> None:
    one = protocol.member_key("lobby", "specific.a!1")
    two = protocol.member_key("lobby", "specific.a!2")
    assert one != two
    assert one == protocol.visitor_key("lobby", "specific.a!1")


def test_digests_are_djangos_salted_hmac() -> None:
    from django.utils.crypto import salted_hmac

    value = "lobby\0session"
    expected = salted_hmac("channels_presence.visitor", value, algorithm="sha256")
    key = protocol.visitor_key("lobby", "specific.a!1", "session")
    assert key == "v:" + expected.hexdigest()[:32]


def test_keys_and_refs_are_salted_with_the_secret_key() -> None:
    key = protocol.visitor_key("lobby", "specific.a!1", "sess")
    ref = protocol.presence_ref("lobby", "specific.a!1", key)
    with override_settings(SECRET_KEY="another secret"):
        assert protocol.visitor_key("lobby", "specific.a!1", "sess") != key
        assert protocol.presence_ref("lobby", "specific.a!1", key) != ref


def test_a_ref_is_one_per_socket_room_and_key_and_hides_the_channel_name() -> None:
    ref = protocol.presence_ref("lobby", "specific.a!1", "u:1")
    assert ref == protocol.presence_ref("lobby", "specific.a!1", "u:1")
    assert ref.startswith("r:")
    assert len(ref) == 2 + 32
    assert "specific" not in ref
    others = {
        protocol.presence_ref("kitchen", "specific.a!1", "u:1"),
        protocol.presence_ref("lobby", "specific.a!2", "u:1"),
        protocol.presence_ref("lobby", "specific.a!1", "u:2"),
    }
    assert ref not in others
    assert len(others) == 3


@pytest.mark.parametrize(
    ("subscribe", "mask"),
    [
        (True, protocol.ALL_EVENTS),
        (False, 0),
        ([], 0),
        (["state"], protocol.STATE_EVENTS),
        (["diff", "expired"], protocol.DIFF_EVENTS | protocol.EXPIRED_EVENTS),
    ],
)
def test_subscribe_is_all_none_or_named_events(subscribe: Any, mask: int) -> None:
    assert protocol.event_mask(subscribe) == mask


def test_an_unknown_event_or_a_bare_string_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown presence event 'changed'"):
        protocol.event_mask(["changed"])
    with pytest.raises(TypeError, match=r"write \['diff'\]"):
        protocol.event_mask("diff")


# Listing, with hysteresis.


@pytest.mark.parametrize(
    ("was_listed", "keys", "sockets", "listed"),
    [
        (True, 10, 10, True),
        (True, 10, 40, True),
        (True, 11, 11, False),  # too many members
        (True, 10, 41, False),  # too many sockets
        (False, 10, 10, False),  # not below 90 % yet
        (False, 9, 9, False),
        (False, 8, 8, True),
        (False, 8, 36, False),  # sockets not below 90 % of 40
        (False, 8, 35, True),
    ],
)
def test_a_room_is_unlisted_above_the_limits_and_relisted_below_90_percent(
    was_listed: bool, keys: int, sockets: int, listed: bool
) -> None:
    counts = Counts(users=keys, visitors=0, sockets=sockets)
    assert protocol.is_listed(was_listed, counts, max_members=10) is listed


# Frames.

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _entry(key: str, ref: str, seconds: float, reason: str | None = None) -> Entry:
    at = datetime.fromtimestamp(T0.timestamp() + seconds, UTC)
    user = {"id": int(key[2:]), "username": key} if key.startswith("u:") else None
    return Entry(key, user, protocol.meta(ref, at), reason)


def test_a_state_lists_members_by_key_with_metas_in_join_order() -> None:
    frame = protocol.state(
        "lobby",
        7,
        [_entry("u:1", "r:b", 2), _entry("u:1", "r:a", 1), _entry("v:x", "r:c", 0)],
        Counts(1, 1, 3),
    )
    assert frame == {
        "type": "presence.state",
        "room": "lobby",
        "version": 7,
        "members": {
            "u:1": {
                "user": {"id": 1, "username": "u:1"},
                "metas": [
                    {"ref": "r:a", "joined_at": T0.timestamp() + 1, "meta": {}},
                    {"ref": "r:b", "joined_at": T0.timestamp() + 2, "meta": {}},
                ],
            },
            "v:x": {
                "user": None,
                "metas": [{"ref": "r:c", "joined_at": T0.timestamp(), "meta": {}}],
            },
        },
        "counts": {"users": 1, "visitors": 1, "sockets": 3},
    }
    json.dumps(frame)


def test_an_unlisted_state_carries_counts_only() -> None:
    frame = protocol.state("lobby", 7, None, Counts(2000, 0, 2000))
    assert frame["members"] is None
    assert frame["counts"] == {"users": 2000, "visitors": 0, "sockets": 2000}


def test_a_diff_lists_each_ref_once_with_its_status_and_leaves_their_reason() -> None:
    diff = Diff(
        "lobby",
        3,
        4,
        Counts(1, 0, 1),
        entries={
            "r:a": _entry("u:1", "r:a", 1),
            "r:b": _entry("u:2", "r:b", 2, "expired"),
        },
    )
    frame = diff.frame()
    assert frame["from"] == 3
    assert frame["version"] == 4
    assert list(frame["joins"]) == ["u:1"]
    assert frame["leaves"]["u:2"]["metas"][0]["reason"] == "expired"
    assert "reason" not in frame["joins"]["u:1"]["metas"][0]


def test_merged_diffs_keep_each_refs_last_status() -> None:
    first = Diff(
        "lobby", 3, 4, Counts(1, 0, 1), entries={"r:a": _entry("u:1", "r:a", 1)}
    )
    second = Diff(
        "lobby",
        4,
        5,
        Counts(0, 0, 0),
        entries={"r:a": _entry("u:1", "r:a", 1, "left")},
    )
    third = Diff(
        "lobby", 5, 6, Counts(1, 0, 1), entries={"r:b": _entry("u:2", "r:b", 3)}
    )
    (merged,) = protocol.merge([first, second, third])
    frame = merged.frame()
    assert (frame["from"], frame["version"]) == (3, 6)
    assert list(frame["joins"]) == ["u:2"]
    assert frame["leaves"]["u:1"]["metas"][0]["ref"] == "r:a"
    assert frame["counts"] == {"users": 1, "visitors": 0, "sockets": 1}


def test_diffs_that_do_not_follow_on_stay_apart() -> None:
    first = Diff("lobby", 3, 4, Counts())
    gap = Diff("lobby", 5, 6, Counts())
    unlisted = Diff("lobby", 4, 5, Counts(), listed=False)
    assert len(protocol.merge([first, gap])) == 2
    assert len(protocol.merge([first, unlisted])) == 2
    with pytest.raises(ValueError, match="does not follow"):
        first.merged(gap)


def test_an_unlisted_diff_carries_counts_only() -> None:
    frame = Diff("lobby", 3, 4, Counts(5, 0, 5), listed=False).frame()
    assert frame["joins"] is None
    assert frame["leaves"] is None


# The client's reducer: the same cases as presence.js.


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_the_python_reducer_agrees_with_presence_js(case: dict[str, Any]) -> None:
    view = RoomView("lobby")
    for frame in case["frames"]:
        view.receive(frame)
    expect = case["expect"]
    assert view.version == expect["version"], case["why"]
    assert view.members == expect["members"], case["why"]
    assert view.counts == expect["counts"], case["why"]
    assert view.gap == expect["gap"], case["why"]
    assert view.behind == expect["behind"], case["why"]
    assert view.listed_while_null == expect["listed_while_null"], case["why"]
    applied = [
        {k: v for k, v in change.items() if k != "members"}
        for change in expect["applied"]
    ]
    assert [
        {k: v for k, v in change.items() if k != "members"} for change in view.applied
    ] == applied, case["why"]


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_the_reducer_without_a_log_agrees_and_leaves_the_frames_as_they_were(
    case: dict[str, Any],
) -> None:
    # Without a log a diff changes the view's members in place (a benchmark's
    # thousand clients); never a frame's, which other clients may share.
    frames = json.loads(json.dumps(case["frames"]))
    view = RoomView("lobby", log=False)
    for frame in frames:
        view.receive(frame)
    assert frames == case["frames"], case["why"]
    assert view.version == case["expect"]["version"], case["why"]
    assert view.members == case["expect"]["members"], case["why"]
    assert view.applied == []
