# Ordering for Celery mode: when each presence joined, and which sockets left.

from typing import Any

import django.utils.timezone
from django.db import migrations, models


def joined_when_last_seen(apps: Any, schema_editor: Any) -> None:
    # The best known lower bound of when an existing presence joined.
    Presence = apps.get_model("channels_presence", "Presence")
    Presence.objects.using(schema_editor.connection.alias).update(
        joined_at=models.F("last_seen")
    )


class Migration(migrations.Migration):
    dependencies = [
        ("channels_presence", "0005_labels_and_help_texts"),
    ]

    operations = [
        migrations.AddField(
            model_name="presence",
            name="joined_at",
            field=models.DateTimeField(null=True),
        ),
        migrations.RunPython(joined_when_last_seen, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="presence",
            name="joined_at",
            field=models.DateTimeField(
                default=django.utils.timezone.now,
                help_text="When the socket joined the room, by the clock of its "
                "server: a leave that happened before this does not remove it.",
                verbose_name="joined at",
            ),
        ),
        migrations.CreateModel(
            name="Departure",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True,
                        primary_key=True,
                        serialize=False,
                        verbose_name="ID",
                    ),
                ),
                (
                    "channel_name",
                    models.CharField(
                        help_text="The reply channel name of the socket that left.",
                        max_length=255,
                        verbose_name="socket",
                    ),
                ),
                (
                    "room_channel_name",
                    models.CharField(
                        blank=True,
                        help_text="The group name of the room it left; empty when "
                        "it left every room (it disconnected).",
                        max_length=255,
                        verbose_name="room",
                    ),
                ),
                (
                    "left_at",
                    models.DateTimeField(
                        help_text="When the socket left, by the clock of its server.",
                        verbose_name="left at",
                    ),
                ),
            ],
            options={
                "verbose_name": "departure",
                "verbose_name_plural": "departures",
                "indexes": [
                    models.Index(fields=["left_at"], name="channels_presence_left_idx")
                ],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("channel_name", "room_channel_name"),
                        name="channels_presence_departure_unique",
                    )
                ],
            },
        ),
    ]
