# 64-bit ids: presences get one row per connection per room, and 1.0.0's 32-bit
# ids run out on a busy site. The foreign key column follows the room's id.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("channels_presence", "0001_initial")]

    operations = [
        migrations.AlterField(
            model_name="room",
            name="id",
            field=models.BigAutoField(
                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
            ),
        ),
        migrations.AlterField(
            model_name="presence",
            name="id",
            field=models.BigAutoField(
                auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
            ),
        ),
    ]
