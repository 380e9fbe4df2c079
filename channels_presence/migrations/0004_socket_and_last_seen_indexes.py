# Indexes for the queries that run all the time: touch() and leave_all() find a
# socket by its channel name alone (1.0.0 scanned the table), and
# prune_presences() looks for old last_seen values.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("channels_presence", "0003_room_socket_unique_constraint")]

    operations = [
        migrations.AddIndex(
            model_name="presence",
            index=models.Index(
                fields=["channel_name"], name="channels_presence_socket_idx"
            ),
        ),
        migrations.AddIndex(
            model_name="presence",
            index=models.Index(fields=["last_seen"], name="channels_presence_seen_idx"),
        ),
    ]
