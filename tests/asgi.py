"""The ASGI application a test serves with a real ``daphne`` subprocess.

The example's room consumer (``PresenceConsumerMixin``), at ``/ws/rooms/<room>/``,
and a decorated one (``tests.consumers.JsonUrlJoiningConsumer``), at
``/ws/decorated/<room>/``, behind Channels' session and auth middleware as the
example has it (a visitor's session cookie makes its tabs one member), with the
suite's settings; the test's environment says which database, prefix and queue,
and CHANNELS_PRESENCE_TEST_CELERY=1 puts it in Celery mode.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
get_asgi_application()

# After Django is set up: these import models. The Celery app is imported so
# that the outbox sends with it, as a project's __init__.py would.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

import tasks  # noqa: E402, F401
from example.consumers import RoomConsumer  # noqa: E402
from tests.consumers import JsonUrlJoiningConsumer  # noqa: E402

application = AuthMiddlewareStack(
    URLRouter(
        [
            path("ws/rooms/<str:room>/", RoomConsumer.as_asgi()),
            path("ws/decorated/<str:room>/", JsonUrlJoiningConsumer.as_asgi()),
        ]
    )
)
