"""The Celery application of a channels_presence deployment.

Run it beside daphne::

    celery -A tasks worker -l info
    celery -A tasks beat -l info -S django

It is configured from the Django settings in DJANGO_SETTINGS_MODULE
(``example.settings`` when unset), from the names that start with ``CELERY_``:
``CELERY_BROKER_URL`` is the broker, which the example's settings take from
``REDIS_URL``. Tasks are found in every installed app's ``tasks`` module, among
them ``channels_presence.tasks``. The web process imports this app too (see
``example/__init__.py``), so that the tasks it sends go to the same broker.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")

app = Celery("tasks")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

__all__ = ["app"]
