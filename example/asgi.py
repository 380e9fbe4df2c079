"""The ASGI application of the example site: HTTP, and websockets with auth.

Run it with ``daphne example.asgi:application``. Static files (the site's CSS
and ``channels_presence/presence.js``) are served by Django's
``ASGIStaticFilesHandler`` straight from the apps' ``static/`` folders, as
``runserver`` does: no collectstatic, whatever DEBUG is. A busy site would put
them behind a web server or a CDN instead; WhiteNoise, the usual choice under
WSGI, serves files synchronously and Django warns about that under ASGI.
"""

import os

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")
http = ASGIStaticFilesHandler(get_asgi_application())

# After Django is set up: these import models.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from example.consumers import RoomConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(
                URLRouter([path("ws/rooms/<str:room>/", RoomConsumer.as_asgi())])
            )
        ),
    }
)
