"""The example site's pages, consumer and demo users, with Django's test client.

What a browser makes of them is tests/test_browser.py's part; here, what the
server sends: the lobby's rooms and counts, the room page's members and the
heartbeat interval it gives presence.js, bad room names, log-in, the chat.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.core.management import call_command
from django.template import Context, Template
from django.test import Client, override_settings
from django.urls import path

from channels_presence.models import Room
from example.consumers import RoomConsumer
from example.management.commands.demo_users import DEMO_USERS

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def example_site() -> Iterator[None]:
    """The example's apps, URLs and log-in settings, on the suite's database."""
    with override_settings(
        INSTALLED_APPS=[*settings.INSTALLED_APPS, "example"],
        ROOT_URLCONF="example.urls",
        STATIC_URL="static/",
        LOGIN_URL="login",
        LOGIN_REDIRECT_URL="lobby",
        LOGOUT_REDIRECT_URL="lobby",
        # The demo users' passwords are hashed fast here; the hasher is not tested.
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
    ):
        yield


# The lobby.


def test_the_lobby_lists_rooms_by_how_many_are_in_them(
    client: Client, alice: Any, bob: Any
) -> None:
    Room.objects.add("kitchen", "test.x!a", alice)
    Room.objects.add("kitchen", "test.x!b", alice)  # a second tab: one user
    Room.objects.add("kitchen", "test.x!c", bob)
    Room.objects.add("kitchen", "test.x!d")
    Room.objects.add("attic", "test.x!e")

    page = client.get("/").content.decode()

    names = [
        name
        for name in ("kitchen", "attic", "garden", "lobby")
        if f'href="/rooms/{name}/"' in page
    ]
    assert names == ["kitchen", "attic", "garden", "lobby"]
    order = [page.index(f'href="/rooms/{name}/"') for name in names]
    assert order == sorted(order), "the fullest room first, then by name"
    assert "2 users, 1 visitor" in " ".join(page.split())
    assert "0 users, 1 visitor" in " ".join(page.split())


def test_going_to_a_room_by_name_redirects_to_it(client: Client) -> None:
    response = client.get("/rooms/", {"name": " book-club "})
    assert response.status_code == 302
    assert response["Location"] == "/rooms/book-club/"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "Type the name of a room."),
        ("a room", "is not a valid Channels group name"),
        ("é", "is not a valid Channels group name"),
        ("x" * 120, "is not a valid Channels group name"),
    ],
)
def test_a_bad_room_name_is_refused_in_the_lobby_with_the_reason(
    client: Client, name: str, reason: str
) -> None:
    response = client.get("/rooms/", {"name": name})
    assert response.status_code == 400
    assert reason in response.content.decode()
    assert 'aria-invalid="true"' in response.content.decode()


# A room.


def test_a_room_page_lists_its_users_and_counts_its_visitors(
    client: Client, alice: Any, bob: Any
) -> None:
    Room.objects.add("kitchen", "test.x!a", bob)
    Room.objects.add("kitchen", "test.x!b", alice)
    Room.objects.add("kitchen", "test.x!c")

    page = client.get("/rooms/kitchen/").content.decode()

    members = page.split('id="members"')[1].split("</ul>")[0]
    assert members.index("alice") < members.index("bob")
    assert 'data-count="1"' in page
    assert "and 1 visitor" in page
    assert 'data-socket-url="/ws/rooms/kitchen/"' in page
    assert "/static/channels_presence/presence.js" in page


def test_a_room_page_shows_a_users_tabs_and_the_rooms_counts(
    client: Client, alice: Any, bob: Any
) -> None:
    Room.objects.add("kitchen", "test.x!a1", alice)
    Room.objects.add("kitchen", "test.x!a2", alice)
    Room.objects.add("kitchen", "test.x!b", bob)
    Room.objects.add("hall", "test.x!a3", alice)
    Room.objects.add("kitchen", "test.x!c")

    page = client.get("/rooms/kitchen/").content.decode()

    members = page.split('id="members"')[1].split("</ul>")[0]
    # Her socket in another room is not a tab here.
    assert 'alice<span class="tabs"> (2 tabs)</span>' in members
    assert "bob</li>" in members
    assert '<dd id="count-users">2</dd>' in page
    assert '<dd id="count-visitors">1</dd>' in page
    assert '<dd id="count-sockets">4</dd>' in page
    assert 'data-room="kitchen"' in page


def test_a_room_nobody_is_in_is_an_empty_page_not_an_error(client: Client) -> None:
    page = client.get("/rooms/empty-room/").content.decode()
    assert 'data-count="0"' in page
    assert not Room.objects.filter(channel_name="empty-room").exists()


def test_a_room_name_channels_cannot_use_is_not_found(client: Client) -> None:
    response = client.get("/rooms/a%20b/")
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("overrides", "interval"),
    [
        ({}, "15"),
        ({"CHANNELS_PRESENCE_MAX_AGE": 30}, "7.5"),
        ({"CHANNELS_PRESENCE_TOUCH_INTERVAL": 4}, "4"),
        # 0 touches at every message: heartbeats then come at MAX_AGE / 4.
        ({"CHANNELS_PRESENCE_TOUCH_INTERVAL": 0, "CHANNELS_PRESENCE_MAX_AGE": 8}, "2"),
    ],
)
def test_pages_give_presence_js_the_servers_touch_interval(
    client: Client, overrides: dict[str, float], interval: str
) -> None:
    template = Template("{% load channels_presence %}{% presence_heartbeat_interval %}")
    with override_settings(**overrides):
        assert template.render(Context()) == interval
        page = client.get("/rooms/kitchen/").content.decode()
    assert f'data-heartbeat-interval="{interval}"' in page


# Log-in and the demo users.


def test_the_demo_users_log_in_with_the_passwords_printed(client: Client) -> None:
    out = StringIO()
    call_command("demo_users", stdout=out)
    for username, password, superuser in DEMO_USERS:
        assert f"{username:<6} / {password}" in out.getvalue()
        user = authenticate(username=username, password=password)
        assert user is not None
        assert user.is_superuser is superuser
        assert user.is_staff is superuser

    response = client.post(
        "/login/?next=/rooms/kitchen/", {"username": "alice", "password": "alice-demo"}
    )
    assert response.status_code == 302
    assert response["Location"] == "/rooms/kitchen/"
    assert "Signed in as <strong>alice</strong>" in client.get("/").content.decode()
    assert client.post("/logout/")["Location"] == "/"
    assert "Browsing as a visitor" in client.get("/").content.decode()


def test_demo_users_again_resets_them_and_makes_none_twice() -> None:
    call_command("demo_users", stdout=StringIO())
    alice = get_user_model().objects.get(username="alice")
    alice.set_password("changed")
    alice.is_staff = True
    alice.save()

    call_command("demo_users", stdout=StringIO())

    assert get_user_model().objects.filter(username="alice").count() == 1
    assert get_user_model().objects.count() == len(DEMO_USERS)
    again = authenticate(username="alice", password="alice-demo")
    assert again is not None
    assert not again.is_staff


def test_the_log_in_page_labels_its_fields_and_says_where_the_users_are(
    client: Client,
) -> None:
    page = client.get("/login/").content.decode()
    assert '<label for="id_username">Username</label>' in page
    assert '<label for="id_password">Password</label>' in page
    assert "python3 dev.py demo" in page


# The consumer's chat.


async def _connected(user: Any) -> WebsocketCommunicator:
    application = AuthMiddlewareStack(
        URLRouter([path("ws/rooms/<str:room>/", RoomConsumer.as_asgi())])
    )
    communicator = WebsocketCommunicator(application, "/ws/rooms/kitchen/")
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def _next(
    communicator: WebsocketCommunicator, kind: str = "chat"
) -> dict[str, Any]:
    """The next message of that type the socket gets; others are skipped."""
    while True:
        message: dict[str, Any] = await communicator.receive_json_from(timeout=3)
        if message["type"] == kind:
            return message


@pytest.mark.django_db(transaction=True)
async def test_a_chat_message_reaches_the_room_with_its_author(alice: Any) -> None:
    from django.contrib.auth.models import AnonymousUser

    sender = await _connected(alice)
    listener = await _connected(AnonymousUser())
    try:
        # The listener is in the room once it is told who is.
        assert (await _next(listener, "presence.state"))["counts"]["visitors"] == 1
        await sender.send_json_to({"message": "  hello  "})
        assert await _next(listener) == {
            "type": "chat",
            "message": "hello",
            "author": "alice",
        }
        assert (await _next(sender))["message"] == "hello", "its own, too"
        await listener.send_json_to({"message": "x" * 600})
        reply = await _next(sender)
        assert reply["author"] is None
        assert reply["message"] == "x" * 500
    finally:
        await sender.disconnect()
        await listener.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("content", [{"message": "   "}, {"message": 3}, ["hello"], {}])
async def test_a_message_that_is_not_chat_is_ignored(alice: Any, content: Any) -> None:
    sender = await _connected(alice)
    try:
        await _next(sender, "presence.state")
        await sender.send_json_to(content)
        await sender.send_json_to({"message": "after"})
        assert (await _next(sender))["message"] == "after"
    finally:
        await sender.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "frame",
    [
        {"bytes_data": b"\x00\x01binary"},
        {"text_data": "{not json"},
        {"text_data": "[" * 10_000 + "]" * 10_000},
    ],
    ids=["binary", "malformed", "nested-10000"],
)
async def test_a_frame_that_is_not_json_is_ignored_and_the_socket_stays(
    alice: Any, frame: dict[str, Any]
) -> None:
    sender = await _connected(alice)
    try:
        await _next(sender, "presence.state")
        await sender.send_to(**frame)
        await sender.send_json_to({"message": "after"})
        assert (await _next(sender))["message"] == "after"
    finally:
        await sender.disconnect()


def test_the_demo_superuser_sees_rooms_presences_and_the_prune_schedule(
    client: Client, alice: Any
) -> None:
    call_command("demo_users", stdout=StringIO())
    Room.objects.add("kitchen", "test.x!a", alice)
    assert client.login(username="admin", password="admin-demo")
    rooms = client.get("/admin/channels_presence/room/")
    assert rooms.status_code == 200
    assert "kitchen" in rooms.content.decode()
    presences = client.get("/admin/channels_presence/presence/")
    assert "test.x!a" in presences.content.decode()
    schedule = client.get("/admin/django_celery_beat/periodictask/")
    assert "channels_presence: prune stale presences" in schedule.content.decode()
