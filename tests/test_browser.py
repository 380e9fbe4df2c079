"""The example site and presence.js in a real browser: Chromium, driven by Playwright.

daphne serves the example (``example.asgi``), a ``celery -A tasks worker`` applies
presence and broadcasts, ``celery -A tasks beat -S django`` schedules the prunes:
three subprocesses on the running test's database, the run's Redis keys and queue
(``tests/example_settings.py``). Two users log in through the log-in page and open
one room; what each page shows is what presence.js made of the server's messages.

Chromium is Debian's (``/usr/bin/chromium``): ``python3 dev.py test`` installs it
under CI=true; elsewhere, without it, this test is skipped and says why.

``CHANNELS_PRESENCE_SCREENSHOT=docs/demo.png`` saves the room page's screenshot
there (the README shows it); otherwise it goes to the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from channels_presence.models import Presence, Room
from tests.helpers import closed_port, set_last_seen_back, wait_until
from tests.workers import (
    CeleryProcess,
    OutputProcess,
    celery_beat,
    celery_worker,
    environment,
    purge_queue,
)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
SETTINGS_MODULE = "tests.example_settings"
ROOM = "garden"
PASSWORD = "browser-test-password"

#: Milliseconds a page may take to show a join or a leave: the issue's bound.
SHOWN_WITHIN = 5_000
#: Milliseconds for what waits on beat's next tick or a reconnection.
SLOW = 30_000


def _chromium_or_skip() -> None:
    if CHROMIUM.exists():
        return
    reason = f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; under CI=true, python3 dev.py test installs it")
    print(f"skipping the browser test: {reason}")
    pytest.skip(reason)


class Daphne:
    """``daphne example.asgi:application`` on a port: started, stopped, started."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.runs: list[OutputProcess] = []

    def start(self) -> None:
        """Start daphne and wait until it answers HTTP."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start daphne; it answers once :meth:`wait_ready` returns."""
        daphne = str(Path(sys.executable).parent / "daphne")
        command = [daphne, "-b", "127.0.0.1", "-p", str(self.port)]
        self.runs.append(
            OutputProcess(
                [*command, "example.asgi:application"],
                environment(DJANGO_SETTINGS_MODULE=SETTINGS_MODULE),
            )
        )

    def wait_ready(self) -> None:
        """Block until daphne answers HTTP; fail if it exits or takes 30 s."""
        process = self.runs[-1].process
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        "daphne did not start:\n" + self.output()
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, as a deployment stops it."""
        self.runs[-1].stop()

    def output(self) -> str:
        """Everything daphne printed so far, run after run."""
        return "\n".join(run.output() for run in self.runs)


@dataclass
class Stack:
    """daphne, a worker and beat, running."""

    daphne: Daphne
    worker: CeleryProcess
    beat: CeleryProcess

    def output(self) -> str:
        """What each of them printed."""
        return (
            f"--- daphne ---\n{self.daphne.output()}\n"
            f"--- worker ---\n{self.worker.output()}\n"
            f"--- beat ---\n{self.beat.output()}"
        )


@pytest.fixture
def stack() -> Iterator[Stack]:
    """daphne, a worker and beat (pruning every second), on the test database."""
    _chromium_or_skip()
    prune = PeriodicTask.objects.get(task="channels_presence.tasks.prune_presences")
    prune.interval, _ = IntervalSchedule.objects.get_or_create(
        every=1, period=IntervalSchedule.SECONDS
    )
    prune.save()
    purge_queue()
    daphne = Daphne(closed_port())
    with ExitStack() as running:
        # daphne starts while the worker and beat do.
        daphne.spawn()
        running.callback(daphne.stop)
        worker = running.enter_context(
            celery_worker(DJANGO_SETTINGS_MODULE=SETTINGS_MODULE)
        )
        beat = running.enter_context(
            celery_beat(DJANGO_SETTINGS_MODULE=SETTINGS_MODULE)
        )
        daphne.wait_ready()
        yield Stack(daphne, worker, beat)
    purge_queue()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Debian Chromium, driven by Playwright's async API.

    Async, because Playwright's sync API keeps an event loop running in the
    test's thread, where Django's ORM then refuses to run.
    """
    _chromium_or_skip()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def _log_in(browser: Any, site: str, username: str) -> Any:
    """A page of a new browser context, logged in through the log-in page, in ROOM."""
    context = await browser.new_context(viewport={"width": 1000, "height": 540})
    page = await context.new_page()
    await page.goto(f"{site}/login/?next=/rooms/{ROOM}/")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"**/rooms/{ROOM}/")
    return page


def _member(page: Any, username: str) -> Any:
    return page.locator("#members li", has_text=username)


async def _joined_at(channel_name: str) -> datetime | None:
    presence = await Presence.objects.filter(channel_name=channel_name).afirst()
    return presence.joined_at if presence else None


@pytest.mark.django_db(transaction=True)
async def test_two_users_see_each_other_come_and_go_and_beat_prunes_the_stale(
    stack: Stack, browser: Any, tmp_path: Path
) -> None:
    try:
        await _two_users_in_a_room(stack.daphne, browser, tmp_path)
    except BaseException:
        # What the three processes did, shown with the failure.
        print(stack.output())
        raise


async def _two_users_in_a_room(daphne: Daphne, browser: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    users = get_user_model().objects
    for name in ("alice", "bob", "carol"):
        await sync_to_async(users.create_user)(name, password=PASSWORD)
    site = daphne.url

    # B is in the room first; its own join, applied by the worker, lists it.
    page_b = await _log_in(browser, site, "bob")
    await expect(page_b.locator("#status")).to_have_attribute("data-status", "open")
    # Its heartbeat comes at the server's touch interval (tests/example_settings).
    await expect(page_b.locator("main")).to_have_attribute(
        "data-heartbeat-interval", "50"
    )
    await expect(_member(page_b, "bob")).to_have_count(1, timeout=SLOW)

    # A joins: B shows A within 5 s, and A sees both.
    page_a = await _log_in(browser, site, "alice")
    started = time.monotonic()
    await expect(_member(page_b, "alice")).to_have_count(1, timeout=SHOWN_WITHIN)
    print(f"B showed A {time.monotonic() - started:.2f} s after A's page loaded")
    await expect(page_a.locator("#members")).to_contain_text("bob")

    # An anonymous visitor is counted, not named; the chat reaches the room.
    visitor = await (await browser.new_context()).new_page()
    await visitor.goto(f"{site}/rooms/{ROOM}/")
    await expect(page_b.locator("#anonymous")).to_have_attribute(
        "data-count", "1", timeout=SHOWN_WITHIN
    )
    await expect(page_b.locator("#members li")).to_have_text(["alice", "bob"])
    await page_a.get_by_label("Message").fill("Hello from Alice!")
    await page_a.get_by_label("Message").press("Enter")
    await page_b.get_by_label("Message").fill("Hi Alice, Bob here.")
    await page_b.get_by_role("button", name="Send").click()
    await expect(page_a.locator("#messages li")).to_have_count(2)
    await expect(page_b.locator("#messages li")).to_have_text(
        ["alice: Hello from Alice!", "bob: Hi Alice, Bob here."]
    )
    await page_b.locator("#chat-input").blur()
    screenshot = Path(
        os.environ.get("CHANNELS_PRESENCE_SCREENSHOT") or tmp_path / "demo.png"
    )
    assert len(await page_b.screenshot(path=str(screenshot))) > 10_000

    # The lobby counts the room's people.
    lobby = await (await browser.new_context()).new_page()
    await lobby.goto(site + "/")
    await expect(lobby.locator(".rooms li", has_text=ROOM)).to_contain_text(
        "2 users, 1 visitor"
    )
    await lobby.close()
    await visitor.close()
    await expect(page_b.locator("#anonymous")).to_have_attribute(
        "data-count", "0", timeout=SHOWN_WITHIN
    )

    # A closes its page: B shows A gone within 5 s.
    await page_a.close()
    started = time.monotonic()
    await expect(_member(page_b, "alice")).to_have_count(0, timeout=SHOWN_WITHIN)
    print(f"B showed A gone {time.monotonic() - started:.2f} s after A closed")

    # A presence whose socket went silent (carol's, never touched again) is
    # pruned by beat, and B's list updates.
    carol = await users.aget(username="carol")
    await Room.objects.aadd(ROOM, "specific.silent!carol", carol)
    await expect(_member(page_b, "carol")).to_have_count(1, timeout=SHOWN_WITHIN)
    await set_last_seen_back("specific.silent!carol")
    await expect(_member(page_b, "carol")).to_have_count(0, timeout=SLOW)
    assert await _joined_at("specific.silent!carol") is None

    # B's own presence made stale: beat prunes it, B is told (presence.expired),
    # and presence.js makes it join again: a presence joined after the prune.
    bob = Presence.objects.filter(user__username="bob")
    channel_b = await bob.values_list("channel_name", flat=True).aget()
    before = timezone.now()
    await set_last_seen_back(channel_b)
    await wait_until(lambda: _rejoined(channel_b, before), seconds=SLOW / 1000)
    await expect(_member(page_b, "bob")).to_have_count(1)

    # daphne restarts: B reconnects, with backoff, and joins the room again.
    await asyncio.to_thread(daphne.stop)
    await expect(page_b.locator("#status")).to_have_attribute(
        "data-status", "reconnecting", timeout=SHOWN_WITHIN
    )
    await asyncio.to_thread(daphne.start)
    await expect(page_b.locator("#status")).to_have_attribute(
        "data-status", "open", timeout=SLOW
    )
    await wait_until(
        lambda: bob.exclude(channel_name=channel_b).aexists(), seconds=SLOW / 1000
    )
    await expect(_member(page_b, "bob")).to_have_count(1)


async def _rejoined(channel_name: str, since: datetime) -> bool:
    joined = await _joined_at(channel_name)
    return joined is not None and joined > since


PRESENCE_JS = ROOT / "channels_presence/static/channels_presence/presence.js"
FAKE_ROOM = "ws://presence.test/ws/rooms/x/"


class FakeServer:
    """Playwright's stand-in for the server of FAKE_ROOM: every connection's
    route, and the frames the page sent on each."""

    def __init__(self) -> None:
        self.sockets: list[Any] = []
        self.frames_in: list[list[str]] = []

    def accept(self, socket: Any) -> None:
        frames: list[str] = []
        self.sockets.append(socket)
        self.frames_in.append(frames)
        socket.on_message(lambda frame: frames.append(frame))


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    """A blank page with presence.js, whose sockets to FAKE_ROOM Playwright answers.

    ``page.server`` is the FakeServer; ``window.calls`` what the callbacks got.
    """
    if os.environ.get("DATABASE_URL"):
        # No database is involved: these run in the SQLite pass only.
        pytest.skip("presence.js alone, independent of the database: SQLite pass")
    page = await browser.new_page()
    page.server = FakeServer()
    await page.route_web_socket(FAKE_ROOM, page.server.accept)
    await page.set_content("<!DOCTYPE html><title>presence.js</title>")
    await page.add_script_tag(path=str(PRESENCE_JS))
    await page.evaluate("window.calls = []")
    yield page
    await page.close()


async def _connect(page: Any, **options: float) -> None:
    await page.evaluate(
        """([url, options]) => {
          window.room = ChannelsPresence.connect(url, Object.assign({
            onMembers: (members, anonymous, room) =>
                calls.push(["members", members, anonymous, room]),
            onMessage: data => calls.push(["message", data]),
            onStatus: status => calls.push(["status", status]),
        }, options)); }""",
        [FAKE_ROOM, options],
    )


async def _calls(page: Any, kind: str) -> list[Any]:
    return [call[1:] for call in await page.evaluate("calls") if call[0] == kind]


async def _has_calls(page: Any, kind: str) -> bool:
    return bool(await _calls(page, kind))


async def _status(page: Any) -> str | None:
    statuses = await _calls(page, "status")
    return statuses[-1][0] if statuses else None


async def _open(page: Any, connections: int = 1) -> None:
    await wait_until(lambda: len(page.server.sockets) == connections)
    await wait_until(lambda: _is_open(page))


async def _is_open(page: Any) -> bool:
    return await _status(page) == "open"


async def test_presence_js_heartbeats_at_the_interval_it_is_given(page: Any) -> None:
    await _connect(page, heartbeatInterval=0.1)
    await _open(page)
    frames = page.server.frames_in[0]
    await wait_until(lambda: len(frames) >= 5)
    assert set(frames) == {'"heartbeat"'}
    assert await _calls(page, "status") == [["connecting"], ["open"]]


async def test_presence_js_calls_back_with_members_and_other_messages(
    page: Any,
) -> None:
    await _connect(page)
    await _open(page)
    members = [{"id": 1, "username": "alice"}, {"id": 2, "username": "bob"}]
    server = page.server.sockets[0]
    server.send(
        json.dumps(
            {"type": "presence", "room": "x", "members": members, "anonymous": 2}
        )
    )
    server.send("not json")
    server.send(json.dumps({"type": "chat", "message": "hi"}))
    await page.evaluate("room.send({message: 'hello'})")
    await wait_until(lambda: _has_calls(page, "message"))
    assert await _calls(page, "members") == [[members, 2, "x"]]
    assert await _calls(page, "message") == [[{"type": "chat", "message": "hi"}]]
    await wait_until(lambda: bool(page.server.frames_in[0]))
    assert page.server.frames_in[0] == ['{"message":"hello"}']


async def test_presence_js_joins_again_after_presence_expired(page: Any) -> None:
    # No periodic heartbeat during the test: the one that comes is the re-join.
    await _connect(page, heartbeatInterval=600, rejoinDelay=0.3)
    await _open(page)
    started = time.monotonic()
    page.server.sockets[0].send(json.dumps({"type": "presence.expired", "room": "x"}))
    await wait_until(lambda: bool(page.server.frames_in[0]))
    # Not at once: the prune may still be taking the socket out of the group.
    assert time.monotonic() - started >= 0.3
    assert page.server.frames_in[0] == ['"heartbeat"']
    assert await _calls(page, "message") == []


async def test_presence_js_reconnects_with_backoff_until_closed(page: Any) -> None:
    await _connect(page, minDelay=0.05, maxDelay=0.2)
    for connections in range(1, 4):
        await _open(page, connections)
        await page.server.sockets[-1].close()
    await _open(page, 4)
    assert (
        await _calls(page, "status")
        == [["connecting"], ["open"]]
        + [
            ["reconnecting"],
            ["open"],
        ]
        * 3
    )

    await page.evaluate("room.close()")
    await wait_until(lambda: _is_closed(page))
    await asyncio.sleep(0.5)
    assert len(page.server.sockets) == 4, "reconnected after close()"
    assert await page.evaluate("room.status") == "closed"


async def test_presence_js_backs_off_while_connections_do_not_hold(
    page: Any,
) -> None:
    # Each wait at its ceiling: 0.1, 0.2, 0.4 and 0.8 s before connections 2-5.
    await page.evaluate("Math.random = () => 0.999999")
    await _connect(page, minDelay=0.1, maxDelay=10)
    await _open(page)
    started = time.monotonic()
    for connections in range(2, 6):
        await page.server.sockets[-1].close()
        await _open(page, connections)
    # Had each short-lived connection started the backoff over, 0.4 s.
    assert time.monotonic() - started >= 1.5


async def _is_closed(page: Any) -> bool:
    return await _status(page) == "closed"


async def test_presence_js_backs_off_with_full_jitter_and_checks_its_options(
    page: Any,
) -> None:
    ceilings = await page.evaluate(
        "[0, 1, 2, 3, 4, 5, 6, 10].map("
        "n => ChannelsPresence.backoffDelay(n, 1, 30, () => 0.999999))"
    )
    assert [round(c) for c in ceilings] == [1, 2, 4, 8, 16, 30, 30, 30]
    jittered = await page.evaluate(
        "Array.from({length: 200}, () => ChannelsPresence.backoffDelay(3, 1, 30))"
    )
    assert all(0 <= delay < 8 for delay in jittered)
    assert max(jittered) - min(jittered) > 2, "no jitter"

    errors = await page.evaluate(
        """() => [{heartbeatInterval: 0}, {retries: 3}, {maxDelay: "30"}].map(o => {
            try { ChannelsPresence.connect("/ws/rooms/x/", o); return null; }
            catch (error) { return error.name + ": " + error.message; }
        })"""
    )
    assert errors == [
        "TypeError: ChannelsPresence.connect: heartbeatInterval must be a number "
        "of seconds above 0, not 0",
        'TypeError: ChannelsPresence.connect: unknown option "retries"; the '
        "options are heartbeatInterval, minDelay, maxDelay, rejoinDelay, "
        "onMembers, onMessage, onStatus",
        "TypeError: ChannelsPresence.connect: maxDelay must be a number of "
        'seconds above 0, not "30"',
    ]
    assert await page.evaluate(
        "ChannelsPresence.socketUrl('/ws/rooms/a/', "
        "{protocol: 'https:', host: 'example.com'})"
    ) == ("wss://example.com/ws/rooms/a/")
