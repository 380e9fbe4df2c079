# Names and help texts for the admin. Nothing changes in the database.

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("channels_presence", "0004_socket_and_last_seen_indexes"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="presence",
            options={"verbose_name": "presence", "verbose_name_plural": "presences"},
        ),
        migrations.AlterModelOptions(
            name="room",
            options={"verbose_name": "room", "verbose_name_plural": "rooms"},
        ),
        migrations.AlterField(
            model_name="room",
            name="channel_name",
            field=models.CharField(
                help_text="The Channels group that the room's sockets are added to.",
                max_length=255,
                unique=True,
                verbose_name="group name",
            ),
        ),
        migrations.AlterField(
            model_name="presence",
            name="room",
            field=models.ForeignKey(
                help_text="The room the socket is in.",
                on_delete=django.db.models.deletion.CASCADE,
                to="channels_presence.room",
                verbose_name="room",
            ),
        ),
        migrations.AlterField(
            model_name="presence",
            name="channel_name",
            field=models.CharField(
                help_text="The socket's reply channel name (the consumer's "
                "channel_name).",
                max_length=255,
                verbose_name="socket",
            ),
        ),
        migrations.AlterField(
            model_name="presence",
            name="user",
            field=models.ForeignKey(
                blank=True,
                help_text="The socket's logged-in user; empty for an anonymous "
                "visitor.",
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                to=settings.AUTH_USER_MODEL,
                verbose_name="user",
            ),
        ),
        migrations.AlterField(
            model_name="presence",
            name="last_seen",
            field=models.DateTimeField(
                default=django.utils.timezone.now,
                help_text="When the socket last showed it was alive; it is stale "
                "once older than CHANNELS_PRESENCE_MAX_AGE seconds.",
                verbose_name="last seen",
            ),
        ),
    ]
