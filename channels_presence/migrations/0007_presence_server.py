# Server leases: each presence records the server process its socket is on.
# Existing rows get "" (no server): only the ordinary prune removes them.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("channels_presence", "0006_joined_at_and_departures"),
    ]

    operations = [
        migrations.AddField(
            model_name="presence",
            name="server",
            field=models.CharField(
                blank=True,
                default="",
                help_text="The id of the server process the socket is on, whose "
                "lease keeps it here; empty when it joined through the managers, "
                "and then only the ordinary prune removes it.",
                max_length=100,
                verbose_name="server",
            ),
        ),
        migrations.AddIndex(
            model_name="presence",
            index=models.Index(fields=["server"], name="channels_presence_server_idx"),
        ),
    ]
