"""The Django application of channels_presence."""

from django.apps import AppConfig
from django.db.models.signals import post_migrate


class ChannelsPresenceConfig(AppConfig):
    """Registers the checks and the beat schedule; deleted users leave their rooms."""

    name = "channels_presence"
    verbose_name = "Channels presence"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the checks; connect the schedule to post_migrate, and the
        removal of a deleted user's presences to its pre_delete."""
        from . import (
            checks,  # noqa: F401  (registers the checks)
            receivers,
        )
        from .schedule import create_schedule

        post_migrate.connect(
            create_schedule, sender=self, dispatch_uid="channels_presence.schedule"
        )
        # The user model is known once every app's models are loaded: now.
        receivers.connect()
