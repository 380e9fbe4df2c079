# mypy: disallow-subclassing-any=False
"""Consumers the tests drive through WebsocketCommunicator, and a client for them.

Every consumer answers each frame it handles (``{"type": "echo", ...}``), so a
test knows a frame has been dealt with, and frames it never answers were never
handled; ``{"close": code}`` is answered by closing the socket from the server
side instead. The consumer notes, in the list the test put in its scope, each
``test.note`` message it handles (sending nothing), and on disconnect the close
code and how many presences its socket still had at that moment.

There is one of each kind for the four websocket bases Channels ships: the echo
consumers themselves, 1.0.0-style ones (``Room.objects.add`` in ``connect``, no
presence event handler), and the same decorated with ``touch_presence`` and
``remove_presence``; the JSON ones also join with ``add_presence`` instead. Below
them: the client the tests drive them with, and what it is told of a room's
presence. Helpers that look at presences in the database live in
``tests.helpers``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from channels.generic.websocket import (
    AsyncJsonWebsocketConsumer,
    AsyncWebsocketConsumer,
    JsonWebsocketConsumer,
    WebsocketConsumer,
)
from channels.testing import WebsocketCommunicator

from channels_presence.consumers import LayerOutageMixin
from channels_presence.decorators import add_presence, remove_presence, touch_presence
from channels_presence.models import Presence, Room
from channels_presence.testing import RoomView
from tests.helpers import TIMEOUT

#: The rooms the 1.0.0-style consumers join on connect.
ROOMS = ("lobby", "news")


def _echo(text_data: str | None, bytes_data: bytes | None) -> dict[str, Any]:
    if bytes_data is not None:
        return {"type": "echo", "bytes": bytes_data.hex()}
    return {"type": "echo", "text": text_data}


def _requests(content: Any) -> tuple[int | None, str | None]:
    """A frame's requests: ``{"close": code}`` closes the socket from the server,
    ``{"leave": room}`` takes it out of one room."""
    if not isinstance(content, dict):
        return None, None
    code, room = content.get("close"), content.get("leave")
    return (
        code if isinstance(code, int) else None,
        room if isinstance(room, str) else None,
    )


def _obey(consumer: Any, content: Any) -> bool:
    """Carry out the frame's requests; True if the socket was closed."""
    code, room = _requests(content)
    if code is not None:
        consumer.close(code=code)
        return True
    if room is not None:
        Room.objects.remove(room, consumer.channel_name)
    return False


async def _aobey(consumer: Any, content: Any) -> bool:
    """:func:`_obey`, async."""
    code, room = _requests(content)
    if code is not None:
        await consumer.close(code=code)
        return True
    if room is not None:
        await Room.objects.aremove(room, consumer.channel_name)
    return False


def _parse(text_data: str | None) -> Any:
    try:
        return json.loads(text_data) if text_data is not None else None
    except ValueError:
        return None


def _note(consumer: Any, *what: Any) -> None:
    calls = consumer.scope.get("calls")
    if calls is not None:
        calls.append(what)


# The echo consumers, one per base.


class EchoConsumer(WebsocketConsumer):
    """Answers every frame; ``{"leave": room}`` first takes the socket out of it."""

    def receive(self, text_data=None, bytes_data=None):
        if not _obey(self, _parse(text_data)):
            self.send(text_data=json.dumps(_echo(text_data, bytes_data)))

    def disconnect(self, code):
        rows = Presence.objects.filter(channel_name=self.channel_name).count()
        _note(self, "disconnect", code, rows)

    def test_marker(self, event):
        self.send(text_data=json.dumps({"type": "marker"}))

    def test_note(self, event):
        _note(self, "note", event["what"])

    def chat_message(self, event):
        self.send(text_data=json.dumps({"type": "chat", "text": event["text"]}))


class JsonEchoConsumer(JsonWebsocketConsumer):
    """:class:`EchoConsumer` for JSON content."""

    def receive_json(self, content, **kwargs):
        if not _obey(self, content):
            self.send_json({"type": "echo", "content": content})

    def disconnect(self, code):
        rows = Presence.objects.filter(channel_name=self.channel_name).count()
        _note(self, "disconnect", code, rows)

    def test_marker(self, event):
        self.send_json({"type": "marker"})

    def test_note(self, event):
        _note(self, "note", event["what"])

    def chat_message(self, event):
        self.send_json({"type": "chat", "text": event["text"]})


class AsyncEchoConsumer(AsyncWebsocketConsumer):
    """:class:`EchoConsumer`, async."""

    async def receive(self, text_data=None, bytes_data=None):
        if not await _aobey(self, _parse(text_data)):
            await self.send(text_data=json.dumps(_echo(text_data, bytes_data)))

    async def disconnect(self, code):
        rows = await Presence.objects.filter(channel_name=self.channel_name).acount()
        _note(self, "disconnect", code, rows)

    async def test_marker(self, event):
        await self.send(text_data=json.dumps({"type": "marker"}))

    async def test_note(self, event):
        _note(self, "note", event["what"])

    async def chat_message(self, event):
        await self.send(text_data=json.dumps({"type": "chat", "text": event["text"]}))


class AsyncJsonEchoConsumer(AsyncJsonWebsocketConsumer):
    """:class:`JsonEchoConsumer`, async."""

    async def receive_json(self, content, **kwargs):
        if not await _aobey(self, content):
            await self.send_json({"type": "echo", "content": content})

    async def disconnect(self, code):
        rows = await Presence.objects.filter(channel_name=self.channel_name).acount()
        _note(self, "disconnect", code, rows)

    async def test_marker(self, event):
        await self.send_json({"type": "marker"})

    async def test_note(self, event):
        _note(self, "note", event["what"])

    async def chat_message(self, event):
        await self.send_json({"type": "chat", "text": event["text"]})


ECHO_CONSUMERS = (
    EchoConsumer,
    JsonEchoConsumer,
    AsyncEchoConsumer,
    AsyncJsonEchoConsumer,
)


# 1.0.0-style consumers: they join in connect and know nothing of presence events.


class LegacyConsumer(EchoConsumer):
    """Joins :data:`ROOMS` in ``connect``, as 1.0.0's documentation shows."""

    def connect(self):
        for room in ROOMS:
            Room.objects.add(room, self.channel_name, self.scope.get("user"))
        self.accept()


class JsonLegacyConsumer(JsonEchoConsumer):
    """:class:`LegacyConsumer` for JSON content."""

    def connect(self):
        for room in ROOMS:
            Room.objects.add(room, self.channel_name, self.scope.get("user"))
        self.accept()


class AsyncLegacyConsumer(AsyncEchoConsumer):
    """:class:`LegacyConsumer`, async."""

    async def connect(self):
        for room in ROOMS:
            await Room.objects.aadd(room, self.channel_name, self.scope.get("user"))
        await self.accept()


class AsyncJsonLegacyConsumer(AsyncJsonEchoConsumer):
    """:class:`JsonLegacyConsumer`, async."""

    async def connect(self):
        for room in ROOMS:
            await Room.objects.aadd(room, self.channel_name, self.scope.get("user"))
        await self.accept()


# The same, decorated.


class DecoratedConsumer(LegacyConsumer):
    """``touch_presence`` on ``receive``, ``remove_presence`` on ``disconnect``."""

    @touch_presence
    def receive(self, text_data=None, bytes_data=None):
        super().receive(text_data=text_data, bytes_data=bytes_data)

    @remove_presence
    def disconnect(self, code):
        super().disconnect(code)


class JsonDecoratedConsumer(JsonLegacyConsumer):
    """``touch_presence`` on ``receive_json``, ``remove_presence`` on ``disconnect``."""

    @touch_presence
    def receive_json(self, content, **kwargs):
        super().receive_json(content, **kwargs)

    @remove_presence
    def disconnect(self, code):
        super().disconnect(code)


class AsyncDecoratedConsumer(AsyncLegacyConsumer):
    """:class:`DecoratedConsumer`, async."""

    @touch_presence
    async def receive(self, text_data=None, bytes_data=None):
        await super().receive(text_data=text_data, bytes_data=bytes_data)

    @remove_presence
    async def disconnect(self, code):
        await super().disconnect(code)


class AsyncJsonDecoratedConsumer(AsyncJsonLegacyConsumer):
    """:class:`JsonDecoratedConsumer`, async."""

    @touch_presence
    async def receive_json(self, content, **kwargs):
        await super().receive_json(content, **kwargs)

    @remove_presence
    async def disconnect(self, code):
        await super().disconnect(code)


# Joined with add_presence instead. Each notes its channel name when it accepts,
# so that a test knows its sockets without asking the database: in Celery mode a
# worker writes the rows, later.


def url_room(consumer: Any) -> str:
    """The room the URL names (``ws/<room>/``): a room callable for add_presence."""
    return str(consumer.scope["url_route"]["kwargs"]["room"])


def note_channel(consumer: Any) -> None:
    """Note the consumer's channel name, for :func:`channel_of`."""
    _note(consumer, "channel", consumer.channel_name)


class JsonJoiningConsumer(JsonDecoratedConsumer):
    """:class:`JsonDecoratedConsumer`, joining the lobby with ``add_presence``."""

    @add_presence("lobby")
    def connect(self):
        note_channel(self)
        self.accept()


class AsyncJsonJoiningConsumer(AsyncJsonDecoratedConsumer):
    """:class:`JsonJoiningConsumer`, async."""

    @add_presence("lobby")
    async def connect(self):
        note_channel(self)
        await self.accept()


class AsyncJsonUrlJoiningConsumer(AsyncJsonDecoratedConsumer):
    """:class:`AsyncJsonJoiningConsumer`, in the room the URL names."""

    @add_presence(url_room)
    async def connect(self):
        note_channel(self)
        await self.accept()


class JsonUrlJoiningConsumer(LayerOutageMixin, JsonDecoratedConsumer):
    """:class:`JsonJoiningConsumer`, in the room the URL names (tests/asgi.py).

    Closed with 1013 while its channel layer is down.
    """

    @add_presence(url_room)
    def connect(self):
        note_channel(self)
        self.accept()


# The client.


class Closed(Exception):
    """The server closed the socket when the client expected a frame."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"the server closed the socket, code {code}")


class Client(WebsocketCommunicator):
    """A communicator that keeps every text frame it got and the consumer's notes.

    ``calls`` is the list the consumer notes in; ``texts`` holds every text
    frame received, raw, in order; ``views`` each room as the client's reducer
    sees it from the presence frames received (presence.js's rules).
    ``scope`` adds keys to the consumer's scope.
    """

    def __init__(
        self,
        application: Any,
        path: str = "/ws/",
        user: Any = None,
        **scope: Any,
    ):
        super().__init__(application, path)
        self.calls: list[tuple[Any, ...]] = []
        self.texts: list[str] = []
        self.views: dict[str, RoomView] = {}
        self.scope["calls"] = self.calls
        if user is not None:
            self.scope["user"] = user
        self.scope.update(scope)
        self.closed = False

    async def disconnect(self, code: int = 1000) -> None:
        self.closed = True
        await super().disconnect(code, TIMEOUT)

    async def receive_text(self) -> str:
        """The next text frame; :class:`Closed` if the server closes instead."""
        output = await self.receive_output(TIMEOUT)
        if output["type"] == "websocket.close":
            raise Closed(output.get("code", 1000))
        text = output.get("text")
        assert isinstance(text, str), output
        self.texts.append(text)
        frame = _parse(text)
        if isinstance(frame, dict) and str(frame.get("type")).startswith("presence."):
            room = frame.get("room")
            if isinstance(room, str):
                self.views.setdefault(room, RoomView(room)).receive(frame)
        return text

    async def until_closed(self) -> int:
        """Receive frames until the server closes the socket: its close code."""
        while True:
            try:
                await self.receive_text()
            except Closed as closed:
                return closed.code

    def sees(self, room: str = "lobby") -> tuple[list[str], int] | None:
        """Who the client sees in ``room``: usernames, and how many visitors."""
        view = self.views.get(room)
        return who(view.members) if view is not None else None

    async def until_sees(
        self, *usernames: str, visitors: int = 0, room: str = "lobby"
    ) -> None:
        """Receive frames until the client sees exactly these users and visitors."""
        wanted = (sorted(usernames), visitors)
        while self.sees(room) != wanted:
            await self.receive_text()

    async def receive_type(self, kind: str) -> dict[str, Any]:
        """The next JSON frame of type ``kind``, passing over frames of other types."""
        while True:
            message = json.loads(await self.receive_text())
            assert isinstance(message, dict), message
            if message["type"] == kind:
                return message

    def received_since(self, start: int) -> list[dict[str, Any]]:
        """The JSON frames received since ``len(self.texts)`` was ``start``."""
        return [json.loads(text) for text in self.texts[start:]]

    def sent_so_far(self) -> list[dict[str, Any]]:
        """The ASGI messages the consumer has sent and no test has read yet."""
        messages = []
        while not self.output_queue.empty():
            messages.append(self.output_queue.get_nowait())
        return messages

    async def assert_got_nothing_it_cannot_handle(
        self, layer: Any, channel_name: str
    ) -> None:
        """Check, after one echoed frame, that socket ``channel_name`` is handled.

        A marker sent to its channel arrives behind anything the server sent
        it before (a message it had no handler for would have closed it),
        and its next frame is still echoed.
        """
        await layer.send(channel_name, {"type": "test.marker"})
        await self.receive_type("marker")
        await self.answer('"still here"')
        assert [m["type"] for m in self.received_since(0)] == [
            "echo",
            "marker",
            "echo",
        ]

    async def answer(self, frame: str) -> None:
        """Send the text ``frame``; check the next answer is its echo.

        Frames are handled in order, so a frame sent before and handled would
        have been answered first.
        """
        await self.send_to(text_data=frame)
        echo = await self.receive_type("echo")
        assert echo in (
            {"type": "echo", "text": frame},
            {"type": "echo", "content": _parse(frame)},
        ), f"{frame!r} was answered with {echo!r}"


@asynccontextmanager
async def connected(
    application: Any, path: str = "/ws/", user: Any = None, **scope: Any
) -> AsyncIterator[Client]:
    """A client whose connection was accepted; it disconnects on exit if need be."""
    client = Client(application, path, user, **scope)
    accepted, _ = await client.connect(TIMEOUT)
    assert accepted, "the consumer refused the connection"
    try:
        yield client
    finally:
        if not client.closed:
            await client.disconnect()


def channel_of(client: Client) -> str:
    """The channel name of the client's socket, as its consumer noted it."""
    (name,) = [call[1] for call in client.calls if call[0] == "channel"]
    return str(name)


def who(members: dict[str, Any] | None) -> tuple[list[str], int] | None:
    """The usernames and the number of visitors of a view's members."""
    if members is None:
        return None
    users = sorted(m["user"]["username"] for m in members.values() if m["user"])
    return users, sum(1 for key in members if key.startswith("v:"))
