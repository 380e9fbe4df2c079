"""What a browser is told of the others in its room: never a channel name, nor an email.

Members are sent as CHANNELS_PRESENCE_MEMBER_FIELDS says; by default by id and
username, unless the user model's USERNAME_FIELD is an email field, when the
username stays out. Frames are collected from real consumers (the example's)
across joins, chat, leaves, prunes and a crashed server's prune.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from channels.routing import URLRouter
from django.contrib.auth import get_user_model
from django.core.checks import run_checks
from django.test import override_settings
from django.urls import path

from channels_presence import broadcast, leases
from channels_presence.models import Presence, Room
from example.consumers import RoomConsumer
from tests.consumers import Client, connected
from tests.helpers import group_members, make_user, set_last_seen_back

pytestmark = pytest.mark.django_db(transaction=True)

EMAIL = "alice@example.com"


def app() -> Any:
    return URLRouter([path("ws/rooms/<str:room>/", RoomConsumer.as_asgi())])


@pytest.fixture
def email_username(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user model logs in by email: its USERNAME_FIELD is ``email``."""
    monkeypatch.setattr(get_user_model(), "USERNAME_FIELD", "email")


def test_members_are_sent_by_id_and_username_by_default() -> None:
    assert broadcast.member_fields() == {"id": "pk", "username": "username"}


@pytest.mark.usefixtures("email_username")
def test_a_username_that_is_an_email_is_not_sent_by_default() -> None:
    assert broadcast.member_fields() == {"id": "pk"}


@pytest.mark.usefixtures("email_username")
async def test_members_who_log_in_by_email_are_sent_without_it() -> None:
    alice = await make_user("alice", email=EMAIL)
    async with connected(app(), "/ws/rooms/lobby/", user=alice) as client:
        frame = await client.receive_type("presence.state")
    assert [m["user"] for m in frame["members"].values()] == [{"id": alice.pk}]
    assert EMAIL not in "".join(client.texts)


async def test_the_member_fields_setting_chooses_what_is_sent() -> None:
    alice = await make_user(EMAIL, email=EMAIL, first_name="Alice")
    fields = {"id": "pk", "name": "first_name"}
    with override_settings(CHANNELS_PRESENCE_MEMBER_FIELDS=fields):
        async with connected(app(), "/ws/rooms/lobby/", user=alice) as client:
            frame = await client.receive_type("presence.state")
    assert [m["user"] for m in frame["members"].values()] == [
        {"id": alice.pk, "name": "Alice"}
    ]
    assert EMAIL not in "".join(client.texts)


@pytest.mark.parametrize(
    "fields",
    [{}, [], {"id": "nope"}, {"id": 1}, {1: "pk"}, "username", {"x": "user__pk"}],
)
def test_bad_member_fields_are_reported_at_startup(fields: Any) -> None:
    with override_settings(CHANNELS_PRESENCE_MEMBER_FIELDS=fields):
        found = [m for m in run_checks() if m.id == "channels_presence.E008"]
    assert len(found) == 1
    assert "MEMBER_FIELDS" in found[0].msg


def test_good_member_fields_are_not_reported() -> None:
    fields = {"id": "pk", "name": "first_name", "joined": "date_joined"}
    with override_settings(CHANNELS_PRESENCE_MEMBER_FIELDS=fields):
        assert not [m for m in run_checks() if m.id == "channels_presence.E008"]


async def test_no_frame_a_browser_gets_holds_a_channel_name() -> None:
    alice = await make_user("alice", email=EMAIL)
    clients: list[Client] = []
    channels: set[str] = set()

    async def join(user: Any = None) -> tuple[Client, str]:
        before = await asyncio.to_thread(group_members, "lobby")
        client = Client(app(), "/ws/rooms/lobby/", user)
        assert (await client.connect(3))[0]
        clients.append(client)
        await client.receive_type("presence.state")
        (channel,) = await asyncio.to_thread(group_members, "lobby") - before
        channels.add(channel)
        return client, channel

    a, _ = await join(alice)
    b, _ = await join()
    c, c_channel = await join()
    d, d_channel = await join()

    # Chat.
    await a.send_to(text_data=json.dumps({"message": "hello"}))
    for client in clients:
        await client.receive_type("chat")
    # A prune of a stale socket: it is told, the others hear it.
    await set_last_seen_back(c_channel)
    await asyncio.to_thread(Room.objects.prune_presences)
    await c.receive_type("presence.expired")
    for client in (a, b, d):
        await client.receive_type("presence.diff")
    # A crashed server's prune.
    await Presence.objects.filter(channel_name=d_channel).aupdate(server="gone")
    with override_settings(CHANNELS_PRESENCE_SERVER_LEASE=0.4):
        await asyncio.to_thread(leases.prune_servers)
        await asyncio.sleep(0.25)
        assert len(await asyncio.to_thread(leases.prune_servers)) == 1
    await d.receive_type("presence.expired")
    await a.receive_type("presence.diff")
    # A leave, and a sync.
    await b.disconnect()
    await a.receive_type("presence.diff")
    await a.send_to(text_data=json.dumps({"type": "presence.sync", "room": "lobby"}))
    await a.receive_type("presence.state")
    for client in (a, c, d):
        await client.disconnect()

    texts = [text for client in clients for text in client.texts]
    assert len(texts) >= 12
    assert {json.loads(text)["type"] for text in texts} == {
        "presence.state",
        "presence.diff",
        "presence.expired",
        "chat",
    }
    for text in texts:
        assert "specific." not in text
        assert not any(channel in text for channel in channels)
        assert "!" not in text
