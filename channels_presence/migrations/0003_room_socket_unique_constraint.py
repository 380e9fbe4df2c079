# 1.0.0's unique_together on (room, channel_name) becomes a named
# UniqueConstraint. The constraint is added before the old one goes, so the pair
# is never unguarded.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("channels_presence", "0002_bigint_ids")]

    operations = [
        migrations.AddConstraint(
            model_name="presence",
            constraint=models.UniqueConstraint(
                fields=("room", "channel_name"),
                name="channels_presence_room_socket_unique",
            ),
        ),
        migrations.AlterUniqueTogether(name="presence", unique_together=set()),
    ]
