# The admin's "Presence schedule" page: a proxy of Room, with no table and no
# permissions of its own, that gives the page a place in the admin index.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("channels_presence", "0009_room_versions_counts_and_member_keys"),
    ]

    operations = [
        migrations.CreateModel(
            name="PresenceSchedule",
            fields=[],
            options={
                "verbose_name": "presence schedule",
                "verbose_name_plural": "presence schedule",
                "proxy": True,
                "default_permissions": (),
                "indexes": [],
                "constraints": [],
            },
            bases=("channels_presence.room",),
        ),
    ]
