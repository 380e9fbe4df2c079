"""The example's websocket consumer: presence in the room named by the URL."""

from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from channels_presence.consumers import PresenceConsumerMixin

#: Longer chat messages are cut to this many characters.
MAX_MESSAGE_LENGTH = 500


class RoomConsumer(PresenceConsumerMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """Joins the room of its URL; relays chat messages to the room."""

    def get_presence_rooms(self) -> list[str]:
        """The room named by the URL, ``/ws/rooms/<room>/``."""
        return [self.scope["url_route"]["kwargs"]["room"]]

    async def receive(
        self,
        text_data: str | None = None,
        bytes_data: bytes | None = None,
        **kwargs: Any,
    ) -> None:
        """Decode a JSON text frame; a binary frame or one that is not JSON is ignored.

        Channels' JSON consumer raises on either, and the socket would be closed
        with 1011: a browser that sends one by mistake keeps its connection.
        """
        if text_data is None:
            return
        try:
            content = await self.decode_json(text_data)
        except (ValueError, RecursionError):
            # RecursionError: JSON nested deeper than Python's stack allows.
            return
        await self.receive_json(content, **kwargs)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Send a chat message, ``{"message": "..."}``, to everyone in the room."""
        if not isinstance(content, dict) or not isinstance(content.get("message"), str):
            return
        message = content["message"].strip()[:MAX_MESSAGE_LENGTH]
        if not message:
            return
        user = self.scope.get("user")
        author = user.get_username() if user and user.is_authenticated else None
        room = self.scope["url_route"]["kwargs"]["room"]
        await self.channel_layer.group_send(
            room, {"type": "chat.message", "message": message, "author": author}
        )

    async def chat_message(self, event: dict[str, Any]) -> None:
        """A chat message of the room, to this socket's browser."""
        await self.send_json(
            {"type": "chat", "message": event["message"], "author": event["author"]}
        )
