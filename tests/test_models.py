"""Room and Presence: 1.0.0's public fields and tables, readable for an operator."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import models
from django.test import override_settings
from django.utils import timezone

from channels_presence.models import Presence, Room


def concrete_field_names(model: type[models.Model]) -> set[str]:
    return {field.name for field in model._meta.concrete_fields}


def test_room_has_the_fields_of_1_0_0_its_version_and_its_counts() -> None:
    assert concrete_field_names(Room) == {
        "id",
        "channel_name",
        "version",
        "users",
        "visitors",
        "sockets",
        "listed",
        "changed_at",
    }


def test_a_new_rooms_version_starts_at_its_creation_time_in_microseconds() -> None:
    before = int(timezone.now().timestamp() * 1_000_000)
    version = Room._meta.get_field("version").get_default()
    after = int(timezone.now().timestamp() * 1_000_000)
    assert before <= version <= after


@pytest.mark.django_db
def test_a_rooms_counts_are_one_query_on_its_row(django_assert_num_queries) -> None:
    room = Room.objects.create(channel_name="lobby", users=2, visitors=3, sockets=7)
    with django_assert_num_queries(1):
        counts = room.counts()
    assert counts == (2, 3, 7)
    assert (counts.users, counts.visitors, counts.sockets) == (2, 3, 7)
    assert Room.objects.counts("lobby") == counts
    assert Room.objects.counts("nowhere") == (0, 0, 0)


@pytest.mark.django_db(transaction=True)
async def test_a_rooms_counts_async() -> None:
    room = await Room.objects.acreate(channel_name="lobby", users=1, sockets=2)
    assert await room.acounts() == (1, 0, 2)
    assert await Room.objects.acounts("lobby") == (1, 0, 2)


@pytest.mark.django_db
def test_occupied_rooms_are_the_fullest_first() -> None:
    Room.objects.create(channel_name="empty")
    Room.objects.create(channel_name="few", users=1, sockets=1)
    Room.objects.create(channel_name="many", users=2, visitors=5, sockets=9)
    Room.objects.create(channel_name="also-few", users=1, sockets=3)
    assert [room.channel_name for room in Room.objects.occupied()] == [
        "many",
        "also-few",
        "few",
    ]


def test_room_channel_name_is_a_unique_255_char_field() -> None:
    field = Room._meta.get_field("channel_name")
    assert isinstance(field, models.CharField)
    assert field.max_length == 255
    assert field.unique
    assert not field.null


def test_presence_has_the_fields_of_1_0_0_and_those_of_its_events() -> None:
    assert concrete_field_names(Presence) == {
        "id",
        "room",
        "channel_name",
        "user",
        "last_seen",
        "joined_at",
        "server",
        "key",
        "ref",
        "events",
    }


@pytest.mark.django_db
def test_a_presence_made_by_hand_gets_the_key_and_ref_a_join_gives() -> None:
    room = Room.objects.create(channel_name="lobby")
    presence = Presence.objects.create(room=room, channel_name="specific.a!1")
    assert presence.key.startswith("v:")
    assert presence.ref.startswith("r:")


def test_presence_server_is_an_indexed_optional_string() -> None:
    field = Presence._meta.get_field("server")
    assert isinstance(field, models.CharField)
    assert field.blank
    assert field.default == ""
    assert not field.null
    indexed = {tuple(index.fields) for index in Presence._meta.indexes}
    assert ("server",) in indexed


def test_presence_room_is_a_cascading_foreign_key_to_room() -> None:
    field = Presence._meta.get_field("room")
    assert isinstance(field, models.ForeignKey)
    assert field.related_model is Room
    assert field.remote_field.on_delete is models.CASCADE
    assert not field.null
    assert field.column == "room_id"


def test_presence_channel_name_is_a_255_char_field_not_unique_alone() -> None:
    field = Presence._meta.get_field("channel_name")
    assert isinstance(field, models.CharField)
    assert field.max_length == 255
    # One socket can be in several rooms.
    assert not field.unique


def test_presence_user_is_a_nullable_cascading_foreign_key_to_the_user() -> None:
    field = Presence._meta.get_field("user")
    assert isinstance(field, models.ForeignKey)
    assert field.related_model is get_user_model()
    assert field.null
    assert field.remote_field.on_delete is models.CASCADE
    assert field.column == "user_id"


def test_presence_last_seen_defaults_to_now() -> None:
    field = Presence._meta.get_field("last_seen")
    assert isinstance(field, models.DateTimeField)
    assert field.default is timezone.now
    before = timezone.now()
    presence = Presence(room=Room(channel_name="lobby"), channel_name="a")
    assert before <= presence.last_seen <= timezone.now()


@pytest.mark.parametrize("model", [Room, Presence])
def test_ids_are_64_bit_auto_primary_keys(model: type[models.Model]) -> None:
    pk = model._meta.pk
    assert isinstance(pk, models.BigAutoField)
    assert pk.name == "id"


def test_tables_and_app_label_are_those_of_1_0_0() -> None:
    assert Room._meta.app_label == "channels_presence"
    assert Presence._meta.app_label == "channels_presence"
    assert Room._meta.db_table == "channels_presence_room"
    assert Presence._meta.db_table == "channels_presence_presence"


def test_a_socket_is_unique_per_room() -> None:
    unique = [
        constraint
        for constraint in Presence._meta.constraints
        if isinstance(constraint, models.UniqueConstraint)
    ]
    assert [(c.name, tuple(c.fields)) for c in unique] == [
        ("channels_presence_room_socket_unique", ("room", "channel_name"))
    ]


@pytest.mark.parametrize(
    "field",
    [
        field
        for model in (Room, Presence)
        for field in model._meta.concrete_fields
        if not field.auto_created
    ],
    ids=lambda field: f"{field.model.__name__}.{field.name}",
)
def test_every_field_has_an_explicit_verbose_name_and_help_text(
    field: models.Field[object, object],
) -> None:
    # deconstruct() lists verbose_name only when it was given, not the default
    # derived from the attribute name.
    _, _, _, kwargs = field.deconstruct()
    assert str(kwargs.get("verbose_name", "")).strip()
    assert str(field.help_text).strip()


@pytest.mark.parametrize("model", [Room, Presence])
def test_models_have_readable_names(model: type[models.Model]) -> None:
    assert str(model._meta.verbose_name) == model.__name__.lower()
    assert str(model._meta.verbose_name_plural) == model.__name__.lower() + "s"


def test_a_room_reads_as_its_name() -> None:
    assert str(Room(channel_name="lobby")) == "lobby"


@pytest.mark.django_db
def test_a_presence_with_a_user_reads_as_who_in_which_room() -> None:
    alice = get_user_model().objects.create_user("alice")
    room = Room.objects.create(channel_name="lobby")
    presence = Presence.objects.create(room=room, channel_name="a", user=alice)
    presence = Presence.objects.get(pk=presence.pk)
    assert str(presence) == "alice in lobby"


@pytest.mark.django_db
def test_an_anonymous_presence_reads_as_anonymous_in_which_room() -> None:
    room = Room.objects.create(channel_name="lobby")
    presence = Presence.objects.create(room=room, channel_name="a")
    presence = Presence.objects.get(pk=presence.pk)
    assert str(presence) == "anonymous in lobby"


@pytest.mark.parametrize(
    ("max_age", "seconds_ago", "stale"),
    [
        (60, 0, False),
        (60, 50, False),
        (60, 70, True),
        (30, 50, True),
        (120, 70, False),
    ],
)
def test_a_presence_is_stale_once_older_than_max_age(
    max_age: int, seconds_ago: int, stale: bool
) -> None:
    presence = Presence(
        room=Room(channel_name="lobby"),
        channel_name="a",
        last_seen=timezone.now() - timedelta(seconds=seconds_ago),
    )
    with override_settings(CHANNELS_PRESENCE_MAX_AGE=max_age):
        assert presence.is_stale is stale


def test_is_stale_reads_max_age_at_call_time() -> None:
    presence = Presence(
        room=Room(channel_name="lobby"),
        channel_name="a",
        last_seen=timezone.now() - timedelta(seconds=45),
    )
    with override_settings(CHANNELS_PRESENCE_MAX_AGE=30):
        assert presence.is_stale
    with override_settings(CHANNELS_PRESENCE_MAX_AGE=60):
        assert not presence.is_stale


@pytest.mark.django_db(transaction=True)
async def test_aget_users_lists_each_present_user_once(django_user_model) -> None:
    alice = await django_user_model.objects.acreate(username="alice")
    bob = await django_user_model.objects.acreate(username="bob")
    await django_user_model.objects.acreate(username="carol")
    room = await Room.objects.aadd("lobby", "specific.a!1", alice)
    await Room.objects.aadd("lobby", "specific.a!2", alice)
    await Room.objects.aadd("lobby", "specific.a!3", bob)
    await Room.objects.aadd("lobby", "specific.a!4")

    users = await room.aget_users()

    assert sorted(user.get_username() for user in users) == ["alice", "bob"]
