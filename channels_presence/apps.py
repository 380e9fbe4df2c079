"""The Django application of channels_presence."""

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class ChannelsPresenceConfig(AppConfig):
    """Registers the checks, the broadcast receiver and the beat schedule."""

    name = "channels_presence"
    verbose_name = "Channels presence"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the checks; connect the broadcast receiver and the schedule."""
        from . import checks  # noqa: F401  (registers the checks)
        from .broadcast import broadcast_presence_changed
        from .schedule import create_schedule
        from .signals import presence_changed

        presence_changed.connect(
            broadcast_presence_changed,
            dispatch_uid="channels_presence.broadcast_presence_changed",
        )
        post_migrate.connect(
            create_schedule, sender=self, dispatch_uid="channels_presence.schedule"
        )
