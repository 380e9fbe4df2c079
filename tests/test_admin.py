"""The admin: who is where, what is stale, and pruning it by hand."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.db import models
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from channels_presence import operations
from channels_presence.conf import conf
from channels_presence.groups import events_group
from channels_presence.models import Presence, Room
from tests.helpers import group_members

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

ROOMS_URL = "admin:channels_presence_room_changelist"
PRESENCES_URL = "admin:channels_presence_presence_changelist"

# Sockets of the scene below.
ALICE = "specific.x!alice"  # lobby, alice, live
ANON_STALE = "specific.x!anon1"  # lobby, anonymous, stale
BOB = "specific.x!bob"  # lobby, bob, stale
ANON_LIVE = "specific.x!anon2"  # kitchen, anonymous, live
CAROL = "specific.y!carol"  # kitchen, carol, stale
IN_ROOM = {"lobby": {ALICE, ANON_STALE, BOB}, "kitchen": {ANON_LIVE, CAROL}}


@dataclass
class Scene:
    lobby: Room
    kitchen: Room
    empty: Room

    def presence(self, channel_name: str) -> Presence:
        return Presence.objects.get(channel_name=channel_name)

    def pk(self, channel_name: str) -> int:
        return self.presence(channel_name).pk


@pytest.fixture
def admin_user(db: None) -> User:
    """The superuser of ``admin_client``, without a password: hashing one is slow."""
    return User.objects.create_superuser("admin", password=None)


@pytest.fixture
def scene(db: None, django_capture_on_commit_callbacks: Any) -> Scene:
    """Two rooms with live and stale presences, their sockets in both groups.

    The test's transaction never commits: the joins' after-commit work (their
    group adds, among others) is run as each join's own commit would.
    """
    with django_capture_on_commit_callbacks(execute=True):
        made = _scene()
    for room, sockets in IN_ROOM.items():
        assert group_members(room) == group_members(events_group(room)) == sockets
    return made


def _scene() -> Scene:
    users = get_user_model().objects
    alice = users.create_user("alice")
    bob = users.create_user("bob")
    carol = users.create_user("carol")
    join = partial(operations.join, subscribe=True)
    lobby = join("lobby", ALICE, alice)
    join("lobby", ANON_STALE)
    join("lobby", BOB, bob)
    kitchen = join("kitchen", ANON_LIVE)
    join("kitchen", CAROL, carol)
    empty = Room.objects.create(channel_name="empty")
    Presence.objects.filter(channel_name__in=[ANON_STALE, BOB, CAROL]).update(
        last_seen=timezone.now() - timedelta(seconds=conf.MAX_AGE * 2)
    )
    return Scene(lobby, kitchen, empty)


def changelist_sockets(response: Response) -> set[str]:
    assert response.status_code == 200
    return {presence.channel_name for presence in response.context["cl"].result_list}


def action_choices(response: Response) -> set[str]:
    action_form = response.context["action_form"]
    if action_form is None:
        return set()
    return {name for name, _ in action_form.fields["action"].choices if name}


def prune(client: Client, *sockets: str, scene: Scene) -> Response:
    return client.post(
        reverse(PRESENCES_URL),
        {
            "action": "prune_stale",
            "index": "0",
            "_selected_action": [scene.pk(socket) for socket in sockets],
        },
    )


def messages_of(response: Response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def help_texts(response: Response) -> dict[str, str]:
    """The help text under each field of a change form, by field name."""
    assert response.status_code == 200
    found = {}
    rows = response.content.decode().split('<div class="form-row field-')[1:]
    for row in rows:
        name = row.split('"', 1)[0]
        help_text = re.search(r'<div class="help"[^>]*>\s*<div>(.*?)</div>', row, re.S)
        if help_text:
            found[name] = help_text.group(1)
    return found


def help_text(model: type[Room | Presence], name: str) -> str:
    field = model._meta.get_field(name)
    assert isinstance(field, models.Field)
    return str(field.help_text)


def staff_user(*permissions: str) -> User:
    user = User.objects.create_user("staff", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="channels_presence", codename__in=permissions
        )
    )
    return user


@pytest.mark.django_db
def test_room_changelist_shows_how_many_sockets_are_in_each_room(
    admin_client: Client, scene: Scene
) -> None:
    response = admin_client.get(reverse(ROOMS_URL))
    assert response.status_code == 200
    counts = {
        name: (users, visitors, sockets)
        for name, users, visitors, sockets in re.findall(
            r'<th class="field-channel_name"><a [^>]*>([^<]+)</a></th>'
            r'<td class="field-users">(\d+)</td>'
            r'<td class="field-visitors">(\d+)</td>'
            r'<td class="field-member_count">(\d+)</td>',
            response.content.decode(),
        )
    }
    assert counts == {
        "lobby": ("2", "1", "3"),
        "kitchen": ("1", "1", "2"),
        "empty": ("0", "0", "0"),
    }
    assert ">Sockets present</a>" in response.content.decode()


@pytest.mark.django_db
def test_room_changelist_sorts_by_member_count(
    admin_client: Client, scene: Scene
) -> None:
    # member_count is the fourth column; "-4" sorts it descending.
    response = admin_client.get(reverse(ROOMS_URL), {"o": "-4"})
    names = [room.channel_name for room in response.context["cl"].result_list]
    assert names == ["lobby", "kitchen", "empty"]


@pytest.mark.django_db
def test_presence_changelist_lists_every_presence(
    admin_client: Client, scene: Scene
) -> None:
    response = admin_client.get(reverse(PRESENCES_URL))
    assert changelist_sockets(response) == {ALICE, ANON_STALE, BOB, ANON_LIVE, CAROL}


@pytest.mark.django_db
def test_presence_changelist_marks_the_stale_ones(
    admin_client: Client, scene: Scene
) -> None:
    response = admin_client.get(reverse(PRESENCES_URL))
    marks = dict(
        re.findall(
            r'<th class="field-channel_name"><a [^>]*>([^<]+)</a></th>'
            r'.*?<td class="field-stale"><img [^>]*alt="(True|False)"',
            response.content.decode(),
        )
    )
    assert marks == {
        ALICE: "False",
        ANON_STALE: "True",
        BOB: "True",
        ANON_LIVE: "False",
        CAROL: "True",
    }


@pytest.mark.django_db
def test_presence_changelist_filters_by_room(
    admin_client: Client, scene: Scene
) -> None:
    url = reverse(PRESENCES_URL)
    lobby = admin_client.get(url, {"room__id__exact": scene.lobby.pk})
    assert changelist_sockets(lobby) == {ALICE, ANON_STALE, BOB}
    kitchen = admin_client.get(url, {"room__id__exact": scene.kitchen.pk})
    assert changelist_sockets(kitchen) == {ANON_LIVE, CAROL}


@pytest.mark.django_db
def test_room_filter_offers_only_rooms_with_presences(
    admin_client: Client, scene: Scene
) -> None:
    content = admin_client.get(reverse(PRESENCES_URL)).content.decode()
    offered = {int(pk) for pk in re.findall(r"room__id__exact=(\d+)", content)}
    assert offered == {scene.lobby.pk, scene.kitchen.pk}


@pytest.mark.django_db
def test_presence_changelist_filters_by_staleness(
    admin_client: Client, scene: Scene
) -> None:
    url = reverse(PRESENCES_URL)
    stale = admin_client.get(url, {"stale": "yes"})
    assert changelist_sockets(stale) == {ANON_STALE, BOB, CAROL}
    live = admin_client.get(url, {"stale": "no"})
    assert changelist_sockets(live) == {ALICE, ANON_LIVE}


@pytest.mark.django_db
def test_staleness_filter_follows_max_age(admin_client: Client, scene: Scene) -> None:
    with override_settings(CHANNELS_PRESENCE_MAX_AGE=conf.MAX_AGE * 10):
        response = admin_client.get(reverse(PRESENCES_URL), {"stale": "yes"})
    assert changelist_sockets(response) == set()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("anon1", {ANON_STALE}),
        ("specific.x", {ALICE, ANON_STALE, BOB, ANON_LIVE}),
        ("alice", {ALICE}),
        ("carol", {CAROL}),
        ("kitchen", {ANON_LIVE, CAROL}),
        ("nobody", set()),
    ],
)
def test_presence_changelist_searches_by_socket_username_and_room(
    admin_client: Client, scene: Scene, query: str, found: set[str]
) -> None:
    response = admin_client.get(reverse(PRESENCES_URL), {"q": query})
    assert changelist_sockets(response) == found


@pytest.mark.django_db(transaction=True)
def test_prune_action_removes_only_the_selected_stale_presences(
    admin_client: Client, scene: Scene
) -> None:
    response = prune(admin_client, ALICE, ANON_STALE, ANON_LIVE, scene=scene)

    assert response.status_code == 302
    # The selected stale one is gone; the fresh selected ones and the stale
    # unselected ones stay.
    assert set(Presence.objects.values_list("channel_name", flat=True)) == {
        ALICE,
        BOB,
        ANON_LIVE,
        CAROL,
    }
    assert group_members("lobby") == {ALICE, BOB}
    assert group_members("kitchen") == {ANON_LIVE, CAROL}
    assert messages_of(response) == [
        "Pruned 1 stale presence: anonymous in lobby.",
    ]


@pytest.mark.django_db(transaction=True)
def test_prune_action_names_every_presence_it_removed(
    admin_client: Client, scene: Scene
) -> None:
    response = prune(admin_client, ANON_STALE, BOB, CAROL, ALICE, scene=scene)

    assert set(Presence.objects.values_list("channel_name", flat=True)) == {
        ALICE,
        ANON_LIVE,
    }
    assert group_members("lobby") == {ALICE}
    assert group_members("kitchen") == {ANON_LIVE}
    (message,) = messages_of(response)
    assert message.startswith("Pruned 3 stale presences: ")
    for name in ("anonymous in lobby", "bob in lobby", "carol in kitchen"):
        assert name in message
    assert "alice" not in message


@pytest.mark.django_db(transaction=True)
def test_prune_action_on_live_presences_only_says_so(
    admin_client: Client, scene: Scene
) -> None:
    response = prune(admin_client, ALICE, ANON_LIVE, scene=scene)

    assert Presence.objects.count() == 5
    assert group_members("lobby") == {ALICE, ANON_STALE, BOB}
    assert messages_of(response) == ["None of the selected presences is stale."]


@pytest.mark.django_db
def test_superuser_is_offered_the_prune_action(
    admin_client: Client, scene: Scene
) -> None:
    response = admin_client.get(reverse(PRESENCES_URL))
    assert "prune_stale" in action_choices(response)


@pytest.mark.django_db
def test_staff_with_change_permission_is_offered_the_prune_action(
    client: Client, scene: Scene
) -> None:
    client.force_login(staff_user("view_presence", "change_presence"))
    response = client.get(reverse(PRESENCES_URL))
    assert "prune_stale" in action_choices(response)


@pytest.mark.django_db(transaction=True)
def test_staff_without_change_permission_cannot_prune(
    client: Client, scene: Scene
) -> None:
    client.force_login(staff_user("view_presence", "delete_presence"))
    response = client.get(reverse(PRESENCES_URL))
    assert changelist_sockets(response) == {ALICE, ANON_STALE, BOB, ANON_LIVE, CAROL}
    # The action list is there (delete is allowed), without prune.
    assert action_choices(response) == {"delete_selected"}

    response = prune(client, ANON_STALE, BOB, scene=scene)
    assert Presence.objects.count() == 5
    assert group_members("lobby") == {ALICE, ANON_STALE, BOB}
    assert not any("Pruned" in message for message in messages_of(response))


@pytest.mark.django_db
def test_presence_change_form_shows_the_help_texts(
    admin_client: Client, scene: Scene
) -> None:
    presence = scene.presence(ALICE)
    response = admin_client.get(
        reverse("admin:channels_presence_presence_change", args=[presence.pk])
    )
    assert help_texts(response) == {
        name: help_text(Presence, name)
        for name in (
            "room",
            "channel_name",
            "user",
            "last_seen",
            "joined_at",
            "server",
            "key",
            "ref",
            "events",
        )
    }
    assert ALICE in response.content.decode()


@pytest.mark.django_db
def test_room_change_form_shows_the_help_text(
    admin_client: Client, scene: Scene
) -> None:
    response = admin_client.get(
        reverse("admin:channels_presence_room_change", args=[scene.lobby.pk])
    )
    assert help_texts(response) == {
        name: help_text(Room, name)
        for name in (
            "channel_name",
            "version",
            "users",
            "visitors",
            "sockets",
            "listed",
            "changed_at",
        )
    }


# Read only: rooms and presences are made by sockets, never by hand

MODELS: dict[str, type[Room | Presence]] = {"room": Room, "presence": Presence}


@pytest.mark.django_db
@pytest.mark.parametrize("name", MODELS)
def test_there_is_no_add_view_and_no_add_link(
    admin_client: Client, scene: Scene, name: str
) -> None:
    add_url = reverse(f"admin:channels_presence_{name}_add")
    before = MODELS[name].objects.count()

    assert admin_client.get(add_url).status_code == 403
    assert admin_client.post(add_url, {"channel_name": "attic"}).status_code == 403

    assert MODELS[name].objects.count() == before
    for page in (f"admin:channels_presence_{name}_changelist", "admin:index"):
        response = admin_client.get(reverse(page))
        assert response.status_code == 200
        assert add_url not in response.content.decode()


def _change_url(name: str, pk: int) -> str:
    return reverse(f"admin:channels_presence_{name}_change", args=[pk])


@pytest.mark.django_db
def test_every_field_of_a_room_is_read_only(admin_client: Client, scene: Scene) -> None:
    url = _change_url("room", scene.lobby.pk)

    form = admin_client.get(url).context["adminform"]
    assert list(form.form.fields) == []
    assert set(form.readonly_fields) >= {"channel_name"}
    admin_client.post(url, {"channel_name": "attic"})

    assert Room.objects.get(pk=scene.lobby.pk).channel_name == "lobby"


@pytest.mark.django_db
def test_every_field_of_a_presence_is_read_only(
    admin_client: Client, scene: Scene
) -> None:
    before = scene.presence(BOB)
    url = _change_url("presence", before.pk)

    form = admin_client.get(url).context["adminform"]
    assert list(form.form.fields) == []
    assert set(form.readonly_fields) >= {"room", "channel_name", "user", "last_seen"}
    admin_client.post(
        url,
        {
            "room": scene.kitchen.pk,
            "channel_name": "specific.x!other",
            "user": "",
            "last_seen_0": "2020-01-01",
            "last_seen_1": "00:00:00",
        },
    )

    after = Presence.objects.get(pk=before.pk)
    fields = ("room_id", "channel_name", "user_id", "last_seen")
    assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]


# Deleting in the admin goes through the operations


def delete_selected(client: Client, url: str, pks: list[int]) -> Response:
    return client.post(
        url,
        {
            "action": "delete_selected",
            "index": "0",
            "_selected_action": pks,
            "post": "yes",
        },
    )


def removals(signals: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(room, socket) of each removed-presence signal; fails on any other signal."""
    assert all(s["removed"] is not None and not s["bulk_change"] for s in signals)
    return sorted((s["room"].channel_name, s["removed"].channel_name) for s in signals)


def assert_in_groups(expected: dict[str, set[str]]) -> None:
    for room, sockets in expected.items():
        assert group_members(room) == sockets
        assert group_members(events_group(room)) == sockets


@pytest.mark.django_db(transaction=True)
def test_deleting_a_presence_takes_its_socket_out_of_the_room(
    admin_client: Client, scene: Scene, signals: list[dict[str, Any]]
) -> None:
    pk = scene.pk(BOB)
    signals.clear()

    response = admin_client.post(
        reverse("admin:channels_presence_presence_delete", args=[pk]), {"post": "yes"}
    )

    assert response.status_code == 302
    assert not Presence.objects.filter(pk=pk).exists()
    assert Presence.objects.count() == 4
    assert_in_groups({"lobby": {ALICE, ANON_STALE}, "kitchen": {ANON_LIVE, CAROL}})
    assert removals(signals) == [("lobby", BOB)]
    assert signals[0]["removed"].pk == pk


@pytest.mark.django_db(transaction=True)
def test_deleting_selected_presences_takes_their_sockets_out_of_their_rooms(
    admin_client: Client, scene: Scene, signals: list[dict[str, Any]]
) -> None:
    pks = [scene.pk(ANON_STALE), scene.pk(CAROL)]
    signals.clear()

    response = delete_selected(admin_client, reverse(PRESENCES_URL), pks)

    assert response.status_code == 302
    assert set(Presence.objects.values_list("channel_name", flat=True)) == {
        ALICE,
        BOB,
        ANON_LIVE,
    }
    assert_in_groups({"lobby": {ALICE, BOB}, "kitchen": {ANON_LIVE}})
    assert removals(signals) == [("kitchen", CAROL), ("lobby", ANON_STALE)]


@pytest.mark.django_db(transaction=True)
def test_deleting_a_room_takes_each_of_its_sockets_out_of_it(
    admin_client: Client, scene: Scene, signals: list[dict[str, Any]]
) -> None:
    signals.clear()

    response = admin_client.post(
        reverse("admin:channels_presence_room_delete", args=[scene.lobby.pk]),
        {"post": "yes"},
    )

    assert response.status_code == 302
    assert set(Room.objects.values_list("channel_name", flat=True)) == {
        "kitchen",
        "empty",
    }
    assert set(Presence.objects.values_list("channel_name", flat=True)) == {
        ANON_LIVE,
        CAROL,
    }
    assert_in_groups({"lobby": set(), "kitchen": {ANON_LIVE, CAROL}})
    assert removals(signals) == [
        ("lobby", ALICE),
        ("lobby", ANON_STALE),
        ("lobby", BOB),
    ]


@pytest.mark.django_db(transaction=True)
def test_deleting_selected_rooms_takes_each_of_their_sockets_out(
    admin_client: Client, scene: Scene, signals: list[dict[str, Any]]
) -> None:
    signals.clear()

    response = delete_selected(
        admin_client, reverse(ROOMS_URL), [scene.lobby.pk, scene.kitchen.pk]
    )

    assert response.status_code == 302
    assert list(Room.objects.values_list("channel_name", flat=True)) == ["empty"]
    assert not Presence.objects.exists()
    assert_in_groups({"lobby": set(), "kitchen": set()})
    assert removals(signals) == [
        ("kitchen", ANON_LIVE),
        ("kitchen", CAROL),
        ("lobby", ALICE),
        ("lobby", ANON_STALE),
        ("lobby", BOB),
    ]
