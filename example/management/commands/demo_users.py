"""``manage.py demo_users``: the demo's log-ins, made or reset, and printed."""

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

#: (username, password, superuser): the demo's log-ins. Public on purpose: the
#: demo runs on 127.0.0.1; never run this command on a site others can reach.
DEMO_USERS = (
    ("admin", "admin-demo", True),
    ("alice", "alice-demo", False),
    ("bob", "bob-demo", False),
    ("carol", "carol-demo", False),
)


class Command(BaseCommand):
    help = (
        "Create the demo users (admin, a superuser, and alice, bob and carol), or "
        "reset their passwords if they exist, and print their log-ins."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        """Make or reset every demo user in one transaction, then print them."""
        users = get_user_model()
        with transaction.atomic():
            for username, password, superuser in DEMO_USERS:
                user = users.objects.filter(username=username).first()
                if user is None:
                    user = users(username=username)
                user.is_staff = user.is_superuser = superuser
                user.is_active = True
                user.set_password(password)
                user.save()
        self.stdout.write("Demo log-ins (username / password):")
        for username, password, superuser in DEMO_USERS:
            role = "  superuser: /admin/" if superuser else ""
            self.stdout.write(f"    {username:<6} / {password}{role}")
