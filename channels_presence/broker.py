"""What the log says of the Celery application a process sends presence tasks with.

Its broker, without a password; its queue; the command that starts a worker
for it; and whether it is Celery's own fallback application, the one a process
gets when the project's Celery app was never imported.
"""

from __future__ import annotations

from celery import Celery
from django.conf import settings
from kombu.utils.url import maybe_sanitize_url

from .conf import task_queue


def broker_location(app: Celery) -> str:
    """The broker URL of ``app``, its password masked (``redis://:**@host:6379/0``).

    Failover URLs (``sentinel://a;sentinel://b``) are each masked. An app with
    no broker URL names the one kombu would use (``amqp://guest:**@localhost``).
    """
    url = app.conf.broker_url
    if not url:
        with app.connection_for_write() as connection:
            return str(connection.as_uri())
    parts = url.split(";") if isinstance(url, str) else list(url)
    return ";".join(str(maybe_sanitize_url(part.strip())) for part in parts)


def queue_name(app: Celery) -> str:
    """The queue presence tasks go to: CHANNELS_PRESENCE_QUEUE, else the app's default.

    Without CHANNELS_PRESENCE_QUEUE a project's ``task_routes`` could send
    them elsewhere; this names the queue a worker consumes unless told.
    """
    return task_queue() or str(app.conf.task_default_queue)


def worker_command(app: Celery) -> str:
    """The command that starts a worker consuming the presence queue."""
    project = "<your project>" if is_fallback_app(app) else app.main or "<project>"
    command = f"celery -A {project} worker -l info"
    queue = task_queue()
    return f"{command} -Q {queue}" if queue else command


def is_fallback_app(app: Celery) -> bool:
    """Whether ``app`` is the application Celery makes when none was set up.

    ``celery.current_app`` in a process that never imported the project's app
    is one that Celery makes on the spot, as ``Celery("default", fixups=[],
    set_as_current=False)`` (``celery._state._get_current_app``): no Django
    fixup, no settings, and a broker of ``amqp://guest@localhost``. A project's
    own app keeps the Django fixup and is made current.
    """
    # Neither attribute is in celery-types' stubs; both are set in __init__.
    fixups = getattr(app, "fixups", None)
    current = getattr(app, "set_as_current", True)
    return app.main == "default" and not fixups and not current


def fallback_app_error(app: Celery) -> str:
    """The error to log when presence tasks go out with Celery's fallback app."""
    package = (settings.SETTINGS_MODULE or "proj.settings").split(".")[0]
    return (
        "presence tasks are sent with Celery's default app, not your project's: "
        f"its broker is {broker_location(app)}, which no worker of yours "
        "consumes. The project's Celery app was never imported in this "
        f"process: add 'from .celery import app as celery_app' to "
        f"{package}/__init__.py, as Celery's Django guide shows "
        "(https://docs.celeryq.dev/en/stable/django/first-steps-with-django.html)"
    )
