"""The Django application of channels_presence."""

from django.apps import AppConfig


class ChannelsPresenceConfig(AppConfig):
    """Registers the system checks and the built-in broadcast receiver."""

    name = "channels_presence"
    verbose_name = "Channels presence"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the checks; connect the broadcast receiver (once)."""
        from . import checks  # noqa: F401  (registers the checks)
        from .broadcast import broadcast_presence_changed
        from .signals import presence_changed

        presence_changed.connect(
            broadcast_presence_changed,
            dispatch_uid="channels_presence.broadcast_presence_changed",
        )
