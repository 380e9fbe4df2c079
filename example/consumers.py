"""The example's websocket consumer: presence in the room named by the URL."""

from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from channels_presence.consumers import PresenceConsumerMixin


class RoomConsumer(PresenceConsumerMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """Joins the room of its URL; relays chat messages to the room."""

    def get_presence_rooms(self) -> list[str]:
        """The room named by the URL, ``/ws/rooms/<room>/``."""
        return [self.scope["url_route"]["kwargs"]["room"]]

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Send a chat message to everyone in the room."""
        if isinstance(content, dict) and isinstance(content.get("message"), str):
            room = self.scope["url_route"]["kwargs"]["room"]
            await self.channel_layer.group_send(
                room, {"type": "chat.message", "message": content["message"][:500]}
            )

    async def chat_message(self, event: dict[str, Any]) -> None:
        """A chat message of the room, to this socket's browser."""
        await self.send_json({"type": "chat", "message": event["message"]})
