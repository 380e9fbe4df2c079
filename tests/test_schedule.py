"""The beat schedule: django-celery-beat rows for the two prunes, made by migrate.

``migrate`` creates them when they are missing and never touches them after:
from then on the admin owns them. The last test runs them for real, with a
``celery beat`` and a ``celery worker`` subprocess.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest
from asgiref.sync import async_to_sync
from django.apps import apps
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client, override_settings
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from channels_presence.models import Presence, Room
from channels_presence.schedule import ENTRIES, create_schedule
from tests.helpers import set_last_seen_back
from tests.workers import celery_beat, celery_worker, purge_queue

PRUNE_PRESENCES = "channels_presence.tasks.prune_presences"
PRUNE_ROOMS = "channels_presence.tasks.prune_rooms"
# 1.0.0's registered name for prune_presences.
PRUNE_PRESENCE = "channels_presence.tasks.prune_presence"

PRESENCES_ENTRY = "channels_presence: prune stale presences"
ROOMS_ENTRY = "channels_presence: prune empty rooms"

OURS = (PRUNE_PRESENCES, PRUNE_ROOMS, PRUNE_PRESENCE)


def entries() -> list[PeriodicTask]:
    """The periodic tasks that run one of the prunes, by task name."""
    return list(PeriodicTask.objects.filter(task__in=OURS).order_by("task", "pk"))


def entry(task: str) -> PeriodicTask:
    return PeriodicTask.objects.select_related("interval").get(task=task)


def seconds(task: str) -> int:
    """The interval of the entry running ``task``, which must be in seconds."""
    interval = entry(task).interval
    assert interval is not None
    assert interval.period == IntervalSchedule.SECONDS
    every: int = interval.every
    return every


def migrate() -> None:
    call_command("migrate", verbosity=0)


def delete_entries() -> None:
    PeriodicTask.objects.filter(task__in=OURS).delete()
    assert entries() == []


@pytest.mark.django_db
def test_migrate_made_both_entries_enabled_with_readable_names() -> None:
    # The test database was migrated by pytest-django: nothing else made them.
    made = [(e.name, e.task, e.enabled) for e in entries()]
    assert made == [
        (PRESENCES_ENTRY, PRUNE_PRESENCES, True),
        (ROOMS_ENTRY, PRUNE_ROOMS, True),
    ]
    for task in (PRUNE_PRESENCES, PRUNE_ROOMS):
        made_entry = entry(task)
        assert made_entry.crontab is None
        assert made_entry.solar is None
        assert made_entry.args == "[]"
        assert made_entry.kwargs == "{}"
        assert "migrate" in made_entry.description


@pytest.mark.django_db
def test_the_default_intervals_are_10_and_600_seconds() -> None:
    assert (seconds(PRUNE_PRESENCES), seconds(PRUNE_ROOMS)) == (10, 600)


@pytest.mark.django_db
def test_a_prune_still_queued_at_the_next_interval_expires() -> None:
    # After a worker outage, queued prunes must not run ahead of the touches
    # queued behind them.
    for task in (PRUNE_PRESENCES, PRUNE_ROOMS):
        assert entry(task).expire_seconds == seconds(task)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("prune", "room_prune", "expected"),
    [(30, 3600, (30, 3600)), (2.5, 59.1, (3, 60)), (0, 0.2, (1, 1))],
    ids=["whole", "rounded up", "at least one second"],
)
def test_the_intervals_come_from_the_settings_in_whole_seconds(
    prune: float, room_prune: float, expected: tuple[int, int]
) -> None:
    delete_entries()
    with override_settings(
        CHANNELS_PRESENCE_PRUNE_INTERVAL=prune,
        CHANNELS_PRESENCE_ROOM_PRUNE_INTERVAL=room_prune,
    ):
        migrate()
    assert (seconds(PRUNE_PRESENCES), seconds(PRUNE_ROOMS)) == expected
    assert all(e.enabled for e in entries())


@pytest.mark.django_db
def test_an_existing_interval_schedule_is_reused() -> None:
    delete_entries()
    existing = IntervalSchedule.objects.create(every=7, period=IntervalSchedule.SECONDS)
    with override_settings(CHANNELS_PRESENCE_PRUNE_INTERVAL=7):
        migrate()
    assert entry(PRUNE_PRESENCES).interval == existing
    assert (
        IntervalSchedule.objects.filter(
            every=7, period=IntervalSchedule.SECONDS
        ).count()
        == 1
    )


@pytest.mark.django_db
def test_admin_edits_survive_migrate_and_nothing_is_duplicated() -> None:
    # As the admin does it: a new interval chosen, the other entry disabled.
    presences = entry(PRUNE_PRESENCES)
    presences.interval = IntervalSchedule.objects.create(
        every=2, period=IntervalSchedule.MINUTES
    )
    presences.save()
    rooms = entry(PRUNE_ROOMS)
    rooms.enabled = False
    rooms.save()

    for _ in range(2):
        migrate()

    assert len(entries()) == 2
    interval = entry(PRUNE_PRESENCES).interval
    assert interval is not None
    assert (interval.every, interval.period) == (2, IntervalSchedule.MINUTES)
    assert entry(PRUNE_PRESENCES).enabled
    assert not entry(PRUNE_ROOMS).enabled
    assert seconds(PRUNE_ROOMS) == 600


@pytest.mark.django_db
def test_a_renamed_entry_is_not_made_again() -> None:
    for task in (PRUNE_PRESENCES, PRUNE_ROOMS):
        renamed = entry(task)
        renamed.name = f"ours: {task}"
        renamed.save()

    migrate()

    assert sorted(e.name for e in entries()) == [
        f"ours: {PRUNE_PRESENCES}",
        f"ours: {PRUNE_ROOMS}",
    ]


@pytest.mark.django_db
def test_an_entry_of_that_name_pointed_at_another_task_is_left_alone() -> None:
    # The admin made the presences entry run something else: migrate must not
    # collide with the name, nor take the entry back.
    repointed = entry(PRUNE_PRESENCES)
    repointed.task = "myproject.tasks.cleanup"
    repointed.save()

    migrate()

    assert PeriodicTask.objects.get(name=PRESENCES_ENTRY).task == (
        "myproject.tasks.cleanup"
    )
    assert [e.task for e in entries()] == [PRUNE_ROOMS]


@pytest.mark.django_db
def test_a_1_0_0_prune_presence_entry_keeps_a_second_prune_out() -> None:
    delete_entries()
    old = PeriodicTask.objects.create(
        name="prune presence",
        task=PRUNE_PRESENCE,
        interval=IntervalSchedule.objects.create(
            every=30, period=IntervalSchedule.SECONDS
        ),
    )

    migrate()

    # It already prunes: only the room prune, which 1.0.0 did not have, is new.
    assert [(e.pk, e.task) for e in entries()] == [
        (old.pk, PRUNE_PRESENCE),
        (entry(PRUNE_ROOMS).pk, PRUNE_ROOMS),
    ]


@pytest.mark.django_db
def test_nothing_is_made_without_django_celery_beat_installed() -> None:
    delete_entries()
    without_beat = [
        app.name for app in apps.get_app_configs() if app.name != "django_celery_beat"
    ]
    # override_settings of INSTALLED_APPS repopulates the app registry; migrate
    # itself is not run that way, as django_celery_beat's tables would be
    # models of no app. The receiver is what migrate calls.
    with override_settings(INSTALLED_APPS=without_beat):
        assert not apps.is_installed("django_celery_beat")
        create_schedule(sender=apps.get_app_config("channels_presence"))
    assert entries() == []

    # The same call with it installed does make them.
    create_schedule(sender=apps.get_app_config("channels_presence"))
    assert [e.task for e in entries()] == [PRUNE_PRESENCES, PRUNE_ROOMS]


SERVERS_ENTRY = "channels_presence: prune crashed servers"


def migrate_output(verbosity: int = 1) -> str:
    out = io.StringIO()
    call_command("migrate", verbosity=verbosity, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_migrate_says_which_entries_it_created_and_their_intervals() -> None:
    delete_entries()

    output = migrate_output()

    assert (
        "Celery beat entries created by channels_presence (edit them in the "
        "admin, under Presence schedule):\n"
        f"  {PRESENCES_ENTRY}, every 10 s\n"
        f"  {ROOMS_ENTRY}, every 600 s\n"
    ) in output
    # The servers entry was there already: it is not said to be created.
    assert SERVERS_ENTRY not in output


@pytest.mark.django_db
def test_migrate_names_all_three_entries_when_it_creates_them_all() -> None:
    PeriodicTask.objects.filter(name__in=[name for name, *_ in ENTRIES]).delete()

    output = migrate_output()

    assert len(ENTRIES) == 3
    for name, *_ in ENTRIES:
        assert f"  {name}, every " in output


@pytest.mark.django_db
def test_migrate_says_nothing_of_entries_that_exist() -> None:
    assert "beat entries" not in migrate_output()


@pytest.mark.django_db
def test_migrate_at_verbosity_0_creates_the_entries_silently() -> None:
    delete_entries()

    assert migrate_output(verbosity=0) == ""
    assert [e.task for e in entries()] == [PRUNE_PRESENCES, PRUNE_ROOMS]


@pytest.mark.django_db
def test_the_admin_lists_both_entries(client: Client) -> None:
    client.force_login(User.objects.create_superuser("admin", password=None))

    response = client.get("/admin/django_celery_beat/periodictask/")

    assert response.status_code == 200
    page = response.content.decode()
    assert PRESENCES_ENTRY in page
    assert ROOMS_ENTRY in page


# The real beat.

#: Seconds the prune may take to come round: beat and worker start, then the
#: DatabaseScheduler's first tick.
BEAT_TIMEOUT = 30


@pytest.fixture
def clean_queue() -> Iterator[None]:
    purge_queue()
    yield
    purge_queue()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("clean_queue")
def test_celery_beat_runs_prune_presences_on_the_schedule() -> None:
    presences = entry(PRUNE_PRESENCES)
    presences.interval = IntervalSchedule.objects.create(
        every=1, period=IntervalSchedule.SECONDS
    )
    presences.save()
    Room.objects.add("lobby", "test.abc!stale")
    Room.objects.add("lobby", "test.abc!fresh")
    async_to_sync(set_last_seen_back)("test.abc!stale")

    with celery_worker() as worker, celery_beat() as beat:
        deadline = time.monotonic() + BEAT_TIMEOUT
        while Presence.objects.filter(channel_name="test.abc!stale").exists():
            assert time.monotonic() < deadline, (
                "the stale presence was not pruned in time\n"
                f"--- beat ---\n{beat.output()}\n--- worker ---\n{worker.output()}"
            )
            time.sleep(0.2)
        # One more prune after that one: the fresh presence outlives it too.
        runs = _prunes(worker.output())
        while _prunes(worker.output()) <= runs:
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.2)

        sent = beat.output()

    # Beat ran it from the row migrate made, under that row's name.
    assert f"Sending due task {PRESENCES_ENTRY} ({PRUNE_PRESENCES})" in sent
    assert list(Presence.objects.values_list("channel_name", flat=True)) == [
        "test.abc!fresh"
    ]


def _prunes(output: str) -> int:
    """How many prune_presences tasks the worker has finished."""
    return sum(
        1
        for line in output.splitlines()
        if f"Task {PRUNE_PRESENCES}[" in line and " succeeded " in line
    )
