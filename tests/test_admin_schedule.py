"""The admin's "Presence schedule": the prunes' beat entries, in seconds, edited.

The entries are the django-celery-beat rows that ``migrate`` made in the test
database. Who may see the page is who may view periodic tasks; who may save it,
who may change them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from django_celery_beat.models import (
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    PeriodicTasks,
)

from channels_presence.schedule import ENTRIES

if TYPE_CHECKING:
    from django.test.client import _MonkeyPatchedWSGIResponse as Response

URL = "admin:channels_presence_presenceschedule_changelist"

PRESENCES = "channels_presence.tasks.prune_presences"
ROOMS = "channels_presence.tasks.prune_rooms"
SERVERS = "channels_presence.tasks.prune_servers"

#: What the page posts when nothing is changed: migrate's intervals, all enabled.
AS_MADE = {
    "prune_presences-every": "10",
    "prune_presences-enabled": "on",
    "prune_rooms-every": "600",
    "prune_rooms-enabled": "on",
    "prune_servers-every": "5",
    "prune_servers-enabled": "on",
}


def task(name: str) -> PeriodicTask:
    return PeriodicTask.objects.select_related("interval").get(task=name)


def seconds(name: str) -> int:
    interval = task(name).interval
    assert interval is not None
    assert interval.period == IntervalSchedule.SECONDS
    every: int = interval.every
    return every


def rows() -> list[tuple[Any, ...]]:
    """Everything the page could change, of every prune's periodic task."""
    return list(
        PeriodicTask.objects.filter(task__in=[t for _, t, *_ in ENTRIES])
        .order_by("task")
        .values_list("task", "interval_id", "crontab_id", "enabled", "expire_seconds")
    )


def page(client: Client) -> Response:
    response = client.get(reverse(URL))
    assert response.status_code == 200
    return response


def post(client: Client, **changes: str | None) -> Response:
    """Post the form as made by migrate, with ``changes`` (None: field left out)."""
    data = {**AS_MADE, **changes}
    return client.post(reverse(URL), {k: v for k, v in data.items() if v is not None})


def messages_of(response: Response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def staff(*codenames: str) -> User:
    user = User.objects.create_user("staff", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="django_celery_beat", codename__in=codenames
        )
    )
    return user


@pytest.fixture
def admin_user(db: None) -> User:
    return User.objects.create_superuser("admin", password=None)


@pytest.fixture
def client_of(client: Client):
    def log_in(user: User) -> Client:
        client.force_login(user)
        return client

    return log_in


# What it shows.


@pytest.mark.django_db
def test_the_admin_index_links_to_the_presence_schedule(admin_client: Client) -> None:
    index = admin_client.get(reverse("admin:index")).content.decode()
    assert f'href="{reverse(URL)}"' in index
    assert "Presence schedule" in index


@pytest.mark.django_db
def test_it_shows_each_prune_every_so_many_seconds_enabled_and_never_run(
    admin_client: Client,
) -> None:
    response = page(admin_client)
    form = response.context["form"]
    assert {name: field.initial for name, field in form.fields.items()} == {
        "prune_presences-every": 10,
        "prune_presences-enabled": True,
        "prune_rooms-every": 600,
        "prune_rooms-enabled": True,
        "prune_servers-every": 5,
        "prune_servers-enabled": True,
    }
    html = response.content.decode()
    for name, task_name, *_ in ENTRIES:
        assert name in html
        assert task_name in html
    assert 'name="prune_presences-every" value="10"' in html
    assert html.count(">never<") == 3


@pytest.mark.django_db
def test_it_shows_when_each_prune_last_ran_and_how_often_it_has(
    admin_client: Client, settings: Any
) -> None:
    settings.TIME_ZONE = "UTC"
    ran = datetime(2030, 5, 17, 14, 3, tzinfo=UTC)
    PeriodicTask.objects.filter(task=PRESENCES).update(
        last_run_at=ran, total_run_count=1234
    )

    html = page(admin_client).content.decode()

    row = html.split('id="entry-prune_presences"', 1)[1].split("</tr>", 1)[0]
    assert "May 17, 2030, 2:03 p.m." in row
    assert "<td>1234</td>" in row
    assert html.count(">never<") == 2


@pytest.mark.django_db
def test_an_interval_in_minutes_is_shown_in_seconds(admin_client: Client) -> None:
    rooms = task(ROOMS)
    rooms.interval = IntervalSchedule.objects.create(
        every=2, period=IntervalSchedule.HOURS
    )
    rooms.save()

    assert page(admin_client).context["form"]["prune_rooms-every"].initial == 7200


@pytest.mark.django_db
def test_it_links_each_prune_to_its_periodic_task(admin_client: Client) -> None:
    html = page(admin_client).content.decode()
    for _, task_name, *_ in ENTRIES:
        url = reverse(
            "admin:django_celery_beat_periodictask_change", args=[task(task_name).pk]
        )
        assert f'href="{url}"' in html


# Saving.


@pytest.mark.django_db
def test_saving_new_seconds_points_each_task_at_an_interval_in_seconds(
    admin_client: Client,
) -> None:
    response = post(
        admin_client,
        **{"prune_presences-every": "30", "prune_rooms-every": "3600"},
    )

    assert response.status_code == 302
    assert response["Location"] == reverse(URL)
    assert (seconds(PRESENCES), seconds(ROOMS), seconds(SERVERS)) == (30, 3600, 5)
    # A prune still queued when the next is due expires, as migrate set it.
    assert task(PRESENCES).expire_seconds == 30
    assert task(ROOMS).expire_seconds == 3600
    assert messages_of(response) == [
        "Saved: channels_presence: prune stale presences: every 30 s; "
        "channels_presence: prune empty rooms: every 3600 s."
    ]


@pytest.mark.django_db
def test_an_interval_schedule_of_those_seconds_is_reused(admin_client: Client) -> None:
    existing = IntervalSchedule.objects.create(
        every=45, period=IntervalSchedule.SECONDS
    )
    before = IntervalSchedule.objects.count()

    post(admin_client, **{"prune_presences-every": "45", "prune_servers-every": "45"})

    assert task(PRESENCES).interval == existing
    assert task(SERVERS).interval == existing
    assert IntervalSchedule.objects.count() == before


@pytest.mark.django_db
def test_an_expiry_set_by_hand_is_left_as_it_is(admin_client: Client) -> None:
    PeriodicTask.objects.filter(task=PRESENCES).update(expire_seconds=120)

    post(admin_client, **{"prune_presences-every": "30"})

    assert seconds(PRESENCES) == 30
    assert task(PRESENCES).expire_seconds == 120


@pytest.mark.django_db
def test_a_prune_can_be_turned_off_and_on(admin_client: Client) -> None:
    response = post(admin_client, **{"prune_rooms-enabled": None})

    assert not task(ROOMS).enabled
    assert task(PRESENCES).enabled
    assert messages_of(response) == [
        "Saved: channels_presence: prune empty rooms: disabled."
    ]

    post(admin_client)
    assert task(ROOMS).enabled


@pytest.mark.django_db
def test_a_save_tells_a_running_beat_that_the_schedule_changed(
    admin_client: Client,
) -> None:
    PeriodicTasks.objects.all().delete()
    assert PeriodicTasks.last_change() is None

    post(admin_client, **{"prune_presences-every": "20"})

    assert PeriodicTasks.last_change() is not None


@pytest.mark.django_db
def test_saving_what_is_there_changes_nothing(admin_client: Client) -> None:
    before = rows()
    changed = list(PeriodicTask.objects.values_list("date_changed", flat=True))

    response = post(admin_client)

    assert response.status_code == 302
    assert messages_of(response) == ["Nothing changed."]
    assert rows() == before
    assert list(PeriodicTask.objects.values_list("date_changed", flat=True)) == changed


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("0", "Enter a number of seconds of 1 or more."),
        ("-5", "Enter a number of seconds of 1 or more."),
        ("ten", "Enter a whole number of seconds."),
        ("2.5", "Enter a whole number of seconds."),
        ("", "Enter a number of seconds of 1 or more."),
        (str(2**31), "Ensure this value is less than or equal to 2147483647."),
    ],
    ids=["zero", "negative", "not a number", "a fraction", "empty", "too big"],
)
def test_a_bad_number_of_seconds_is_a_form_error_and_nothing_changes(
    admin_client: Client, value: str, error: str
) -> None:
    before = rows()
    schedules = IntervalSchedule.objects.count()

    # A good change beside the bad one is not saved either.
    response = post(
        admin_client,
        **{"prune_presences-every": value, "prune_rooms-every": "1200"},
    )

    assert response.status_code == 200
    assert response.context["form"].errors == {"prune_presences-every": [error]}
    html = response.content.decode()
    assert 'class="errornote"' in html
    assert error in html
    assert rows() == before
    assert IntervalSchedule.objects.count() == schedules


# Schedules of another kind, and prunes without a task.


@pytest.mark.django_db
def test_a_prune_on_a_crontab_is_said_so_and_kept_unless_seconds_are_given(
    admin_client: Client,
) -> None:
    crontab = CrontabSchedule.objects.create(minute="*/5")
    rooms = task(ROOMS)
    rooms.interval = None
    rooms.crontab = crontab
    rooms.save()

    field = page(admin_client).context["form"]["prune_rooms-every"]
    assert field.initial is None
    assert "now on another schedule" in field.help_text

    post(admin_client, **{"prune_rooms-every": ""})
    assert task(ROOMS).crontab == crontab

    post(admin_client, **{"prune_rooms-every": "900"})
    assert task(ROOMS).crontab is None
    assert seconds(ROOMS) == 900


@pytest.mark.django_db
def test_a_prune_without_a_task_says_migrate_makes_it_and_the_rest_saves(
    admin_client: Client,
) -> None:
    PeriodicTask.objects.filter(task=SERVERS).delete()

    html = page(admin_client).content.decode()
    assert "Not scheduled" in html
    assert "python manage.py migrate" in html

    post(admin_client, **{"prune_presences-every": "15", "prune_servers-every": None})
    assert seconds(PRESENCES) == 15
    assert not PeriodicTask.objects.filter(task=SERVERS).exists()


@pytest.mark.django_db
def test_a_1_0_0_prune_presence_entry_is_the_one_shown_and_edited(
    admin_client: Client,
) -> None:
    PeriodicTask.objects.filter(task=PRESENCES).update(
        task="channels_presence.tasks.prune_presence"
    )

    assert page(admin_client).context["form"]["prune_presences-every"].initial == 10
    post(admin_client, **{"prune_presences-every": "25"})

    old = PeriodicTask.objects.get(task="channels_presence.tasks.prune_presence")
    assert old.interval is not None
    assert old.interval.every == 25


# Who may see it, who may change it.


@pytest.mark.django_db
def test_who_may_change_periodic_tasks_may_save(client_of) -> None:
    client = client_of(staff("view_periodictask", "change_periodictask"))

    assert 'name="prune_presences-every"' in page(client).content.decode()
    post(client, **{"prune_presences-every": "40"})

    assert seconds(PRESENCES) == 40


@pytest.mark.django_db
def test_who_may_only_view_periodic_tasks_sees_the_schedule_but_cannot_save(
    client_of,
) -> None:
    client = client_of(staff("view_periodictask"))
    before = rows()

    index = client.get(reverse("admin:index")).content.decode()
    assert f'href="{reverse(URL)}"' in index
    html = page(client).content.decode()
    assert "channels_presence: prune stale presences" in html
    assert "<input" not in html.split('id="presence-schedule"', 1)[1]
    assert 'name="_save"' not in html

    assert post(client, **{"prune_presences-every": "40"}).status_code == 403
    assert rows() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    "codenames",
    [(), ("view_intervalschedule", "change_intervalschedule")],
    ids=["no permission", "interval schedules only"],
)
def test_staff_who_may_not_view_periodic_tasks_neither_see_nor_save_it(
    client_of, codenames: tuple[str, ...]
) -> None:
    client = client_of(staff(*codenames))
    before = rows()

    index = client.get(reverse("admin:index"))
    assert reverse(URL) not in index.content.decode()
    assert client.get(reverse(URL)).status_code == 403
    assert post(client, **{"prune_presences-every": "40"}).status_code == 403
    assert rows() == before


@pytest.mark.django_db
def test_someone_logged_out_is_sent_to_log_in(client: Client) -> None:
    response = client.get(reverse(URL))
    assert response.status_code == 302
    assert reverse("admin:login") in response["Location"]


@pytest.mark.django_db
def test_it_has_no_add_change_or_delete_pages_of_its_own(
    admin_client: Client,
) -> None:
    index = admin_client.get(reverse("admin:index")).content.decode()
    assert "presenceschedule/add/" not in index
    assert admin_client.get(reverse(URL) + "1/change/").status_code == 404
