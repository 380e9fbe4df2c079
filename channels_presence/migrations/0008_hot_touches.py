# Touches as HOT updates on PostgreSQL: the touch UPDATE (thousands of rows per
# batch) was the worker's bottleneck, because each updated row got a new index
# entry in channels_presence_seen_idx as well as a new heap tuple. Without an
# index on last_seen and with free room in each page (fillfactor), PostgreSQL
# rewrites the row in its own page and touches no index (a heap-only tuple):
# bench/ measured touch_presences at 40-45k presences/s before, ~70k/s after.
# The price is that prune_presences() scans the table for stale rows, which
# bench/ measured too. fillfactor applies to pages written from now on (a
# VACUUM FULL repacks the old ones). SQLite has no such option; it only loses
# the index.

from typing import Any

from django.db import migrations

TABLE = "channels_presence_presence"
FILLFACTOR = 70


def set_fillfactor(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE {TABLE} SET (fillfactor = {FILLFACTOR})")


def reset_fillfactor(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE {TABLE} RESET (fillfactor)")


class Migration(migrations.Migration):
    dependencies = [("channels_presence", "0007_presence_server")]

    operations = [
        migrations.RemoveIndex(
            model_name="presence", name="channels_presence_seen_idx"
        ),
        migrations.RunPython(set_fillfactor, reset_fillfactor),
    ]
