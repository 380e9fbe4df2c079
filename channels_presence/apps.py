"""The Django application of channels_presence."""

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class ChannelsPresenceConfig(AppConfig):
    """Registers the checks and the beat schedule."""

    name = "channels_presence"
    verbose_name = "Channels presence"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the checks; connect the schedule to post_migrate."""
        from . import checks  # noqa: F401  (registers the checks)
        from .schedule import create_schedule

        post_migrate.connect(
            create_schedule, sender=self, dispatch_uid="channels_presence.schedule"
        )
