# Wire protocol 2: rooms get a version, their counts and their listing; presences
# get the member key and the ref that events name them by, and which events their
# consumer handles. Existing rows are kept: each presence gets the key and ref a
# join would have given it (a visitor's session is not known any more, so each
# anonymous socket is a visitor of its own), each room its counts from its rows,
# and a first version from the time of this migration.

from typing import Any

from django.conf import settings
from django.db import migrations, models
from django.utils.crypto import salted_hmac

import channels_presence.clock

# As channels_presence.protocol computes them, copied: a migration must not
# change when the code does.
MAX_LISTED_MEMBERS = 1_000


def _digest(salt: str, *parts: str) -> str:
    value = "\0".join(parts)
    return salted_hmac(salt, value, algorithm="sha256").hexdigest()[:32]


def keys_refs_and_counts(apps: Any, schema_editor: Any) -> None:
    alias = schema_editor.connection.alias
    Room = apps.get_model("channels_presence", "Room")
    Presence = apps.get_model("channels_presence", "Presence")
    limit = getattr(
        settings, "CHANNELS_PRESENCE_MAX_LISTED_MEMBERS", MAX_LISTED_MEMBERS
    )
    rooms = dict(Room.objects.using(alias).values_list("pk", "channel_name"))
    keys: dict[int, dict[str, int]] = {pk: {} for pk in rooms}
    presences = Presence.objects.using(alias).order_by("pk")
    batch = []
    for presence in presences.only(
        "pk", "room_id", "channel_name", "user_id"
    ).iterator():
        room = rooms[presence.room_id]
        if presence.user_id is not None:
            key = f"u:{presence.user_id}"
        else:
            key = "v:" + _digest(
                "channels_presence.visitor", room, presence.channel_name
            )
        presence.key = key
        presence.ref = "r:" + _digest(
            "channels_presence.ref", room, presence.channel_name, key
        )
        keys[presence.room_id][key] = keys[presence.room_id].get(key, 0) + 1
        batch.append(presence)
        if len(batch) == 1_000:
            Presence.objects.using(alias).bulk_update(batch, ["key", "ref"])
            batch = []
    Presence.objects.using(alias).bulk_update(batch, ["key", "ref"])
    updated = []
    for pk, counts in keys.items():
        users = sum(1 for key in counts if key.startswith("u:"))
        sockets = sum(counts.values())
        updated.append(
            Room(
                pk=pk,
                users=users,
                visitors=len(counts) - users,
                sockets=sockets,
                listed=len(counts) <= limit and sockets <= 4 * limit,
            )
        )
    Room.objects.using(alias).bulk_update(
        updated, ["users", "visitors", "sockets", "listed"], batch_size=1_000
    )


class Migration(migrations.Migration):
    dependencies = [
        ("channels_presence", "0008_hot_touches"),
    ]

    operations = [
        migrations.AddField(
            model_name="presence",
            name="events",
            field=models.PositiveSmallIntegerField(
                default=0,
                help_text=(
                    "Which presence events the socket's consumer handles: 1 "
                    "states, 2 diffs, 4 expiry notices (added up)."
                ),
                verbose_name="events",
            ),
        ),
        migrations.AddField(
            model_name="presence",
            name="key",
            field=models.CharField(
                blank=True,
                default="",
                help_text=(
                    "Who the socket is in the room's events: 'u:<user id>', or "
                    "'v:' and a digest of the room and the visitor's session."
                ),
                max_length=100,
                verbose_name="member key",
            ),
        ),
        migrations.AddField(
            model_name="presence",
            name="ref",
            field=models.CharField(
                blank=True,
                default="",
                help_text=(
                    "Names this socket in the room's events without its channel "
                    "name: 'r:' and a digest of the room, the socket and its key."
                ),
                max_length=40,
                verbose_name="ref",
            ),
        ),
        migrations.AddField(
            model_name="room",
            name="changed_at",
            field=models.DateTimeField(
                blank=True,
                help_text=(
                    "When the room's presences last changed (its version went up)."
                ),
                null=True,
                verbose_name="changed at",
            ),
        ),
        migrations.AddField(
            model_name="room",
            name="listed",
            field=models.BooleanField(
                default=True,
                help_text=(
                    "Whether the room's events list its members; above "
                    "CHANNELS_PRESENCE_MAX_LISTED_MEMBERS they carry counts only."
                ),
                verbose_name="listed",
            ),
        ),
        migrations.AddField(
            model_name="room",
            name="sockets",
            field=models.PositiveIntegerField(
                default=0,
                help_text="How many sockets (presences) are in the room.",
                verbose_name="sockets",
            ),
        ),
        migrations.AddField(
            model_name="room",
            name="users",
            field=models.PositiveIntegerField(
                default=0,
                help_text="How many distinct logged-in users are in the room.",
                verbose_name="users",
            ),
        ),
        migrations.AddField(
            model_name="room",
            name="version",
            field=models.BigIntegerField(
                default=channels_presence.clock.micros,
                help_text=(
                    "Goes up by one with each change set of the room's presences;"
                    " starts at the room's creation time in microseconds, so that"
                    " a room made again under the same name never repeats a "
                    "version."
                ),
                verbose_name="version",
            ),
        ),
        migrations.AddField(
            model_name="room",
            name="visitors",
            field=models.PositiveIntegerField(
                default=0,
                help_text=(
                    "How many distinct anonymous visitors (browser sessions) are "
                    "in the room."
                ),
                verbose_name="visitors",
            ),
        ),
        migrations.RunPython(keys_refs_and_counts, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name="presence",
            index=models.Index(
                fields=["room", "key"], name="channels_presence_key_idx"
            ),
        ),
        migrations.AddIndex(
            model_name="room",
            index=models.Index(
                fields=["changed_at"], name="channels_presence_changed_idx"
            ),
        ),
    ]
