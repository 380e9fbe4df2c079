"""Receivers of Django's own signals: a user's presences leave as it is deleted.

The foreign key from a presence to its user cascades, and a cascade deletes
rows and nothing else: the sockets would stay in their rooms' groups, the
rooms' counts and versions would stand still, and nobody would hear of it. So
before the delete, in its transaction, :func:`user_deleted` takes the user's
presences out of their rooms as ``user_deleted`` (``operations.remove_user``);
the cascade then finds none left, and stays as a net.

Connected by ``ChannelsPresenceConfig.ready()``, not at import.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.apps.registry import Apps
from django.contrib.auth import get_user_model
from django.db import models
from django.db.models.signals import pre_delete

from . import operations

#: The ``dispatch_uid`` of :func:`user_deleted`, for each sender it is connected to.
DISPATCH_UID = "channels_presence.user_deleted"


def connect(registry: Apps = apps) -> None:
    """Connect :func:`user_deleted` to ``pre_delete`` of each of :func:`user_models`."""
    for model in user_models(registry):
        pre_delete.connect(user_deleted, sender=model, dispatch_uid=DISPATCH_UID)


def user_models(registry: Apps = apps) -> list[type[models.Model]]:
    """The user model and its proxies, of the models in ``registry``.

    A proxy's instances are deleted with the proxy as ``pre_delete``'s sender
    (an admin for a proxy of the user model does that), so a receiver of the
    user model's alone would miss them. A subclass with a table of its own
    needs nothing: deleting one deletes its user row too, with the user model
    as sender.
    """
    concrete = get_user_model()._meta.concrete_model
    return [
        model
        for model in registry.get_models()
        if model._meta.concrete_model is concrete
    ]


def user_deleted(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    """A user is being deleted: its presences leave their rooms first.

    In the delete's transaction, on its database: if it rolls back, so does
    this, and nothing is sent; once it commits, the signals and frames go and
    the sockets leave the rooms' groups (a channel layer that fails then is
    logged and retried: it never fails the delete).
    """
    operations.remove_user(instance, using=using)
