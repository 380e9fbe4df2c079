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
import re
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
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
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

    # A second tab of A: one member with two tabs, then one again.
    second_tab = await page_a.context.new_page()
    await second_tab.goto(f"{site}/rooms/{ROOM}/")
    await expect(_member(page_b, "alice")).to_have_text(
        "alice (2 tabs)", timeout=SHOWN_WITHIN
    )
    await expect(page_b.locator("#count-users")).to_have_text("2")
    await expect(page_b.locator("#count-sockets")).to_have_text("3")
    await second_tab.close()
    await expect(_member(page_b, "alice")).to_have_text("alice", timeout=SHOWN_WITHIN)
    await expect(page_b.locator("#count-sockets")).to_have_text("2")

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
#: Wire protocol 2's client cases, shared with the server's tests (plain JSON).
PROTOCOL_CASES = json.loads((ROOT / "tests/protocol_cases.json").read_text())
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
    await page.evaluate("window.calls = []; window.marks = []")
    yield page
    await page.close()


async def _connect(page: Any, **options: Any) -> None:
    await page.evaluate(
        """([url, options]) => {
          window.room = ChannelsPresence.connect(url, Object.assign({
            onSync: (members, counts, room) =>
                calls.push(["sync", members, counts, room]),
            onJoin: (key, member, metas, room) =>
                calls.push(["join", key, member, metas, room]),
            onLeave: (key, member, metas, room) =>
                calls.push(["leave", key, member, metas, room]),
            onMembers: (list, counts, room) =>
                calls.push(["members", list, counts, room]),
            onError: frame => calls.push(["error", frame]),
            // A mark only says that the frames before it were handled.
            onMessage: data => data.type === "test.mark"
                ? marks.push(data.n) : calls.push(["message", data]),
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


async def _send(page: Any, *frames: dict[str, Any]) -> None:
    """Send ``frames`` on the latest socket; return once the page has handled them."""
    socket = page.server.sockets[-1]
    for frame in frames:
        socket.send(json.dumps(frame))
    mark = len(await page.evaluate("marks"))
    socket.send(json.dumps({"type": "test.mark", "n": mark}))
    await wait_until(lambda: _has_mark(page, mark))


async def _has_mark(page: Any, mark: int) -> bool:
    return bool(await page.evaluate(f"marks.includes({mark})"))


async def _sent(page: Any, client: str = "room") -> list[Any]:
    """What the page sent on its latest socket so far, decoded: all of it, since
    a mark that ``client`` (the connection's global) sends last has arrived."""
    frames = page.server.frames_in[-1]
    mark = {"test": "mark", "n": len(frames)}
    await page.evaluate(f"{client}.send({json.dumps(mark)})")
    await wait_until(lambda: bool(frames) and json.loads(frames[-1]) == mark)
    decoded = [json.loads(frame) for frame in frames]
    return [
        frame
        for frame in decoded
        if not (isinstance(frame, dict) and frame.get("test") == "mark")
    ]


async def _syncs(page: Any, client: str = "room") -> list[str]:
    """The rooms of the presence.sync frames the page sent, in order."""
    return [
        frame["room"]
        for frame in await _sent(page, client)
        if isinstance(frame, dict) and frame.get("type") == "presence.sync"
    ]


async def _stop_the_clock(page: Any) -> None:
    """Timers and Date of the page fire only when a test advances them."""
    await page.clock.install(time=0)
    await page.clock.pause_at(1000)


def _ref(tag: str) -> str:
    return "r:" + tag * 16


def _meta(tag: str, joined_at: float, **reason: str) -> dict[str, Any]:
    return {"ref": _ref(tag), "joined_at": joined_at, "meta": {}, **reason}


def _user(pk: int, name: str, *metas: dict[str, Any]) -> dict[str, Any]:
    return {"user": {"id": pk, "username": name}, "metas": list(metas)}


def _counts(users: int, visitors: int, sockets: int) -> dict[str, int]:
    return {"users": users, "visitors": visitors, "sockets": sockets}


def _state(
    version: int, members: Any, counts: Any = None, room: str = "x"
) -> dict[str, Any]:
    return {
        "type": "presence.state",
        "room": room,
        "version": version,
        "members": members,
        "counts": counts or _counts(0, 0, 0),
    }


def _diff(
    start: int,
    version: int,
    joins: Any,
    leaves: Any,
    counts: Any = None,
    room: str = "x",
) -> dict[str, Any]:
    return {
        "type": "presence.diff",
        "room": room,
        "from": start,
        "version": version,
        "joins": joins,
        "leaves": leaves,
        "counts": counts or _counts(0, 0, 0),
    }


ALICE = _user(1, "alice", _meta("a1", 10.0))
BOB = _user(2, "bob", _meta("b1", 20.0))
CAROL = _user(3, "carol", _meta("c1", 15.0))
VISITOR = "v:" + "f0" * 16


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
    two_tabs = _user(1, "alice", _meta("a1", 10.0), _meta("a2", 30.0))
    await _send(
        page,
        _state(7, {"u:2": BOB, "u:1": two_tabs}, _counts(2, 0, 3)),
    )
    page.server.sockets[0].send("not json")
    await _send(page, {"type": "chat", "message": "hi"})
    await page.evaluate("room.send({message: 'hello'})")

    counts = _counts(2, 0, 3)
    members = {"u:1": two_tabs, "u:2": BOB}
    # The first state joins every key in it, then syncs; the list is ordered by
    # each key's earliest joined_at.
    assert await page.evaluate("calls.filter(c => c[0] !== 'status')") == [
        ["join", "u:1", two_tabs, two_tabs["metas"], "x"],
        ["join", "u:2", BOB, BOB["metas"], "x"],
        ["sync", members, counts, "x"],
        ["members", [{"key": "u:1", **two_tabs}, {"key": "u:2", **BOB}], counts, "x"],
        ["message", {"type": "chat", "message": "hi"}],
    ]
    assert await page.evaluate("[room.members('x'), room.version('x')]") == [
        members,
        7,
    ]
    assert await page.evaluate("[room.members('y'), room.version('y')]") == [
        None,
        None,
    ]
    assert await _sent(page) == [{"message": "hello"}]

    # One of alice's tabs leaves: no leave; then bob's only tab: a leave with
    # bob as he was and the meta that left, with its reason.
    await page.evaluate("calls = []")
    gone = _meta("b1", 20.0, reason="left")
    await _send(
        page,
        _diff(7, 8, {}, {"u:1": _user(1, "alice", _meta("a2", 30.0, reason="left"))}),
        _diff(8, 9, {}, {"u:2": _user(2, "bob", gone)}, _counts(1, 0, 1)),
    )
    calls = await page.evaluate("calls")
    kinds = [call[0] for call in calls]
    assert kinds == ["sync", "members", "leave", "sync", "members"]
    assert calls[2] == ["leave", "u:2", BOB, [gone], "x"]
    assert calls[3] == ["sync", {"u:1": ALICE}, _counts(1, 0, 1), "x"]
    assert calls[4] == ["members", [{"key": "u:1", **ALICE}], _counts(1, 0, 1), "x"]


async def test_presence_js_reduces_every_shared_protocol_case(page: Any) -> None:
    # The pure reducer, ChannelsPresence.createView(), case by case.
    reduced = await page.evaluate(
        """cases => Object.fromEntries(cases.map(test => {
          const view = ChannelsPresence.createView();
          const applied = [];
          for (const frame of test.frames) {
            for (const change of view.receive(frame)) {
              const entry = {type: change.type, version: change.version,
                             joins: {}, leaves: {}};
              for (const join of change.joins) {
                entry.joins[join.key] = join.metas.map(meta => meta.ref);
              }
              for (const leave of change.leaves) {
                entry.leaves[leave.key] = leave.metas.map(
                  meta => ({ref: meta.ref, reason: meta.reason ?? null}));
              }
              if (change.members === null) entry.members = null;
              applied.push(entry);
            }
          }
          return [test.name, {
            version: view.version, members: view.members, counts: view.counts,
            gap: view.gap, behind: view.behind,
            listed_while_null: view.listedWhileNull, applied}];
        }))""",
        PROTOCOL_CASES,
    )
    assert reduced == {case["name"]: case["expect"] for case in PROTOCOL_CASES}


async def test_presence_js_calls_back_on_every_shared_protocol_case(
    page: Any,
) -> None:
    # The same cases through a socket, each in a room of its own name: onJoin,
    # onLeave, onSync and onMembers for each state or diff applied, in order.
    await _connect(page)
    await _open(page)
    for case in PROTOCOL_CASES:
        room = case["name"]
        await _send(page, *({**frame, "room": room} for frame in case["frames"]))
    calls = await page.evaluate(
        """calls.filter(call => call[0] !== "status").map(call => {
          const [kind, key, , metas, room] = call;
          if (kind === "join") return [room, kind, key, metas.map(m => m.ref)];
          if (kind === "leave") return [room, kind, key,
              metas.map(m => ({ref: m.ref, reason: m.reason ?? null}))];
          // onSync(members, counts, room), onMembers(list, counts, room)
          return [call[3], kind, call[1] === null];
        })"""
    )
    for case in PROTOCOL_CASES:
        expected: list[Any] = []
        for applied in case["expect"]["applied"]:
            for key in sorted(applied["joins"]):
                expected.append(["join", key, applied["joins"][key]])
            for key in sorted(applied["leaves"]):
                expected.append(["leave", key, applied["leaves"][key]])
            unlisted = "members" in applied
            expected += [["sync", unlisted], ["members", unlisted]]
        got = [call[1:] for call in calls if call[0] == case["name"]]
        assert got == expected, case["name"]
        assert await page.evaluate(
            "name => [room.members(name), room.version(name)]", case["name"]
        ) == [case["expect"]["members"], case["expect"]["version"]], case["name"]


async def test_presence_js_buffers_diffs_until_the_first_state(page: Any) -> None:
    await _connect(page)
    await _open(page)
    await _send(
        page,
        _diff(5, 6, {"u:2": BOB}, {}),
        _diff(6, 7, {"u:3": CAROL}, {}),
        _diff(7, 8, {}, {"u:2": _user(2, "bob", _meta("b1", 20.0, reason="left"))}),
    )
    assert await _calls(page, "sync") == []
    assert await page.evaluate("[room.members('x'), room.version('x')]") == [None, None]

    # The state is at 6: the diff to 6 is dropped, the two after it apply.
    await _send(page, _state(6, {"u:1": ALICE, "u:2": BOB}))
    assert [members for members, *_ in await _calls(page, "sync")] == [
        {"u:1": ALICE, "u:2": BOB},
        {"u:1": ALICE, "u:2": BOB, "u:3": CAROL},
        {"u:1": ALICE, "u:3": CAROL},
    ]
    assert [key for key, *_ in await _calls(page, "join")] == ["u:1", "u:2", "u:3"]
    assert [key for key, *_ in await _calls(page, "leave")] == ["u:2"]
    assert await page.evaluate("room.version('x')") == 8


async def test_presence_js_syncs_when_a_gap_lasts_a_second_and_not_before(
    page: Any,
) -> None:
    await _stop_the_clock(page)
    await _connect(page)
    await _open(page)
    await _send(page, _state(5, {"u:1": ALICE}), _diff(6, 7, {"u:3": CAROL}, {}))
    await page.clock.run_for(900)
    assert await _syncs(page) == []

    # Filled within the second: no sync.
    await _send(page, _diff(5, 6, {"u:2": BOB}, {}))
    assert await page.evaluate("room.version('x')") == 7
    await page.clock.run_for(2000)
    assert await _syncs(page) == []

    # Left open: a sync 1 s after the gap appeared, not before.
    await _send(page, _diff(8, 9, {}, {}))
    await page.clock.run_for(990)
    assert await _syncs(page) == []
    await page.clock.run_for(20)
    assert await _syncs(page) == ["x"]
    assert await page.evaluate("room.version('x')") == 7

    # The state that answers closes the gap: the kept diff 8 -> 9 applies.
    await _send(page, _state(8, {"u:1": ALICE}))
    assert await page.evaluate("room.version('x')") == 9
    await page.clock.run_for(3000)
    assert await _syncs(page) == ["x"]


async def test_presence_js_syncs_when_a_beacon_stays_ahead_for_a_second(
    page: Any,
) -> None:
    await _stop_the_clock(page)
    await _connect(page)
    await _open(page)
    beacon = {"type": "presence.version", "room": "x", "version": 6}
    # Before any state, and for a room it is not in, a beacon means nothing.
    await _send(page, beacon, {**beacon, "room": "elsewhere"})
    await _send(page, _state(5, {"u:1": ALICE}), {**beacon, "version": 5})
    await page.clock.run_for(1500)
    assert await _syncs(page) == []

    # Ahead, then caught up within the second: no sync.
    await _send(page, beacon)
    await page.clock.run_for(500)
    await _send(page, _diff(5, 6, {"u:2": BOB}, {}))
    await page.clock.run_for(1500)
    assert await _syncs(page) == []

    # Ahead for a second: a sync.
    await _send(page, {**beacon, "version": 8})
    await page.clock.run_for(990)
    assert await _syncs(page) == []
    await page.clock.run_for(20)
    assert await _syncs(page) == ["x"]


async def test_presence_js_syncs_its_rooms_without_a_state_two_seconds_after_open(
    page: Any,
) -> None:
    await _stop_the_clock(page)
    await _connect(page, rooms=["x", "y", "z"])
    await _open(page)
    await _send(page, _state(5, {"u:1": ALICE}, room="y"))
    # A diff is no state: it waits for one.
    await _send(page, _diff(5, 6, {"u:2": BOB}, {}, room="z"))
    await page.clock.run_for(1990)
    assert await _syncs(page) == []
    await page.clock.run_for(20)
    assert sorted(await _syncs(page)) == ["x", "z"]

    # A new connection: the same again, for it.
    await page.server.sockets[0].close()
    await page.clock.run_for(1000)  # at most minDelay (1 s) before reconnecting
    await _open(page, 2)
    await _send(page, _state(6, {"u:1": ALICE}, room="x"))
    await page.clock.run_for(2010)
    assert sorted(await _syncs(page)) == ["y", "z"]


async def test_presence_js_sends_one_sync_per_room_per_second_at_most(
    page: Any,
) -> None:
    await _stop_the_clock(page)
    # A listed diff on null members syncs after a random 0-2 s: 0 here.
    await page.evaluate("Math.random = () => 0")
    await _connect(page)
    await _open(page)
    listed = {"u:2": BOB}
    await _send(page, _state(5, None), _diff(5, 6, listed, {}))
    await page.clock.run_for(1)
    assert await _syncs(page) == ["x"]

    # Answered, and at once needed again: the next sync waits out the second.
    await _send(page, _state(6, None), _diff(6, 7, listed, {}))
    await _send(page, _diff(7, 8, listed, {}), _diff(8, 9, listed, {}))
    await page.clock.run_for(900)
    assert await _syncs(page) == ["x"]
    await page.clock.run_for(120)
    assert await _syncs(page) == ["x", "x"]
    # Other rooms have their own second.
    await _send(page, _state(1, None, room="y"), _diff(1, 2, listed, {}, room="y"))
    await page.clock.run_for(1)
    assert await _syncs(page) == ["x", "x", "y"]


async def test_presence_js_forgets_an_expired_room_and_joins_it_again(
    page: Any,
) -> None:
    await _stop_the_clock(page)
    # No periodic heartbeat during the test: the one that comes is the re-join.
    await _connect(page, heartbeatInterval=600, rejoinDelay=0.5)
    await _open(page)
    await _send(page, _state(5, {"u:1": ALICE, "u:2": BOB}))
    await page.evaluate("calls = []; Math.random = () => 0.5")
    await _send(page, {"type": "presence.expired", "room": "x"})
    assert await page.evaluate("[room.members('x'), room.version('x')]") == [None, None]
    # A beacon and a diff of the old membership: ignored, kept until the state.
    await _send(
        page,
        {"type": "presence.version", "room": "x", "version": 9},
        _diff(5, 6, {"u:3": CAROL}, {}),
    )

    # Not at once, 1-2 x rejoinDelay (0.75 s here): the prune may still be
    # taking the socket out of the group.
    await page.clock.run_for(740)
    assert await _sent(page) == []
    await page.clock.run_for(20)
    assert await _sent(page) == ["heartbeat"]
    assert await page.evaluate("calls") == []

    # The rejoin's state: what changed meanwhile, not everyone joining again.
    await _send(page, _state(7, {"u:1": ALICE, "u:3": CAROL}))
    assert [call[:2] for call in await page.evaluate("calls")] == [
        ["join", "u:3"],
        ["leave", "u:2"],
        ["sync", {"u:1": ALICE, "u:3": CAROL}],
        ["members", [{"key": "u:1", **ALICE}, {"key": "u:3", **CAROL}]],
    ]
    assert await page.evaluate("room.version('x')") == 7


async def test_presence_js_syncs_a_rejoined_room_that_gets_no_state(
    page: Any,
) -> None:
    await _stop_the_clock(page)
    await _connect(page, heartbeatInterval=600)
    await _open(page)
    await _send(page, _state(5, {"u:1": ALICE}))
    await page.evaluate("Math.random = () => 0")
    await _send(page, {"type": "presence.expired", "room": "x"})
    await page.clock.run_for(1000)
    assert await _sent(page) == ["heartbeat"]
    await page.clock.run_for(1990)
    assert await _syncs(page) == []
    await page.clock.run_for(20)
    assert await _syncs(page) == ["x"]


async def test_presence_js_passes_presence_errors_to_on_error(page: Any) -> None:
    await _connect(page)
    await _open(page)
    error = {
        "type": "presence.error",
        "error": "not_in_room",
        "room": "y",
        "message": "this socket is not in room 'y'",
    }
    await _send(page, error)
    assert await _calls(page, "error") == [[error]]
    assert await _calls(page, "message") == []


async def test_presence_js_keeps_unlisted_members_null_and_syncs_on_a_listed_diff(
    page: Any,
) -> None:
    await _stop_the_clock(page)
    await _connect(page)
    await _open(page)
    await _send(page, _state(5, {"u:1": ALICE, "u:2": BOB}))
    await page.evaluate("calls = []")
    many = _counts(1200, 40, 1500)
    await _send(page, _diff(5, 6, None, None, many))
    # Nobody is said to leave; the counts still come.
    assert await page.evaluate("calls") == [
        ["sync", None, many, "x"],
        ["members", None, many, "x"],
    ]
    await page.clock.run_for(3000)
    assert await _syncs(page) == []

    # Listed again: members stay null until a state, asked for within 2 s.
    await _send(page, _diff(6, 7, {"u:3": CAROL}, {}, _counts(3, 0, 3)))
    assert await page.evaluate("[room.members('x'), room.version('x')]") == [None, 7]
    await page.clock.run_for(2010)
    assert await _syncs(page) == ["x"]
    await _send(page, _state(7, {"u:1": ALICE, "u:3": CAROL}, _counts(2, 0, 2)))
    assert await page.evaluate("room.members('x')") == {"u:1": ALICE, "u:3": CAROL}
    assert await _calls(page, "join") == []


async def test_presence_js_keeps_its_views_when_a_callback_throws(page: Any) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(error.message))
    await page.evaluate(
        """url => { window.room = ChannelsPresence.connect(url, {
          onJoin: key => { throw new Error("broken onJoin for " + key); },
          onSync: members => calls.push(["sync", members]),
          onMessage: data => marks.push(data.n),
          onStatus: status => calls.push(["status", status]),
        }); }""",
        FAKE_ROOM,
    )
    await _open(page)
    await _send(page, _state(5, {"u:1": ALICE}), _diff(5, 6, {"u:2": BOB}, {}))
    assert await _calls(page, "sync") == [
        [{"u:1": ALICE}],
        [{"u:1": ALICE, "u:2": BOB}],
    ]
    await wait_until(lambda: len(errors) == 2)
    assert errors == ["broken onJoin for u:1", "broken onJoin for u:2"]


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


@pytest.mark.parametrize("code", [4400, 4403, 4429])
async def test_presence_js_does_not_reconnect_after_a_refusal(
    page: Any, code: int
) -> None:
    await _connect(page, minDelay=0.05, maxDelay=0.1)
    await _open(page)
    error = {"type": "presence.error", "error": "bad_room", "message": "no"}
    await _send(page, error)
    await page.server.sockets[-1].close(code=code)
    await wait_until(lambda: _is_closed(page))
    await asyncio.sleep(0.5)
    assert len(page.server.sockets) == 1, "reconnected after a refusal"
    assert await _calls(page, "error") == [[error]]
    assert await _calls(page, "status") == [["connecting"], ["open"], ["closed"]]


# 4503: the server's channel layer is down, try again later.
@pytest.mark.parametrize("code", [1000, 4503])
async def test_presence_js_backs_off_while_connections_do_not_hold(
    page: Any, code: int
) -> None:
    # Each wait at its ceiling: 0.1, 0.2, 0.4 and 0.8 s before connections 2-5.
    await page.evaluate("Math.random = () => 0.999999")
    await _connect(page, minDelay=0.1, maxDelay=10)
    await _open(page)
    started = time.monotonic()
    for connections in range(2, 6):
        await page.server.sockets[-1].close(code=code)
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
        """() => [
          {heartbeatInterval: 0}, {retries: 3}, {maxDelay: "30"}, {rooms: "lobby"},
          {onSync: "showMembers"},
        ].map(o => {
            try { ChannelsPresence.connect("/ws/rooms/x/", o); return null; }
            catch (error) { return error.name + ": " + error.message; }
        })"""
    )
    assert errors == [
        "TypeError: ChannelsPresence.connect: heartbeatInterval must be a number "
        "of seconds above 0, not 0",
        'TypeError: ChannelsPresence.connect: unknown option "retries"; the '
        "options are heartbeatInterval, minDelay, maxDelay, rejoinDelay, rooms, "
        "onSync, onJoin, onLeave, onMembers, onError, onMessage, onStatus",
        "TypeError: ChannelsPresence.connect: maxDelay must be a number of "
        'seconds above 0, not "30"',
        "TypeError: ChannelsPresence.connect: rooms must be an array of room "
        'names, not "lobby"',
        "TypeError: ChannelsPresence.connect: onSync must be a function",
    ]
    assert await page.evaluate(
        "ChannelsPresence.socketUrl('/ws/rooms/a/', "
        "{protocol: 'https:', host: 'example.com'})"
    ) == ("wss://example.com/ws/rooms/a/")


EXAMPLE_SITE = "http://example.test"


@pytest.fixture
def room_html(db: None) -> str:
    """The example's room page for ROOM, as Django renders it (nobody in it)."""
    with override_settings(
        INSTALLED_APPS=[*settings.INSTALLED_APPS, "example"],
        ROOT_URLCONF="example.urls",
        STATIC_URL="static/",
    ):
        page: str = Client().get(f"/rooms/{ROOM}/").content.decode()
    return page


async def _serve_room_page(page: Any, html: str) -> None:
    """Serve the room page and its static files at EXAMPLE_SITE; its socket is
    page.server's."""

    async def serve(route: Any) -> None:
        path = route.request.url.removeprefix(EXAMPLE_SITE)
        if path == f"/rooms/{ROOM}/":
            await route.fulfill(body=html, content_type="text/html")
            return
        # The app's static files and the example's, from their folders.
        name = path.removeprefix("/static/")
        for app in ("channels_presence", "example"):
            found = ROOT / app / "static" / name
            if path.startswith(f"/static/{app}/") and found.is_file():
                await route.fulfill(path=str(found))
                return
        await route.fulfill(status=404)

    await page.route(EXAMPLE_SITE + "/**", serve)
    await page.route_web_socket(
        EXAMPLE_SITE.replace("http", "ws") + f"/ws/rooms/{ROOM}/", page.server.accept
    )
    await page.goto(f"{EXAMPLE_SITE}/rooms/{ROOM}/")


async def test_the_room_page_shows_users_tabs_visitors_and_counts_from_presence_js(
    page: Any, room_html: str
) -> None:
    from playwright.async_api import expect

    await _stop_the_clock(page)
    await _serve_room_page(page, room_html)
    await expect(page.locator("#status")).to_have_attribute("data-status", "open")
    # presence.js is told the page's room: without a state 2 s on, it syncs it.
    await page.clock.run_for(2010)
    assert await _syncs(page, "presenceRoom") == [ROOM]

    visitor = {"user": None, "metas": [_meta("f1", 40.0)]}
    two_tabs = _user(1, "alice", _meta("a1", 10.0), _meta("a2", 30.0))
    socket = page.server.sockets[0]
    socket.send(
        json.dumps(
            _state(
                5,
                {
                    "u:2": BOB,
                    "u:1": two_tabs,
                    VISITOR: visitor,
                    "v:" + "f2" * 16: visitor,
                },
                _counts(2, 2, 5),
                room=ROOM,
            )
        )
    )
    members = page.locator("#members li")
    await expect(members).to_have_text(["alice (2 tabs)", "bob"])
    await expect(page.locator("#anonymous")).to_have_text("and 2 visitors")
    await expect(page.locator("#anonymous")).to_have_attribute("data-count", "2")
    await expect(page.locator("#counts")).to_have_text(
        re.compile(r"Users\s*2\s*Visitors\s*2\s*Open tabs\s*5")
    )

    # One of alice's tabs closes, and a visitor goes.
    left = _user(1, "alice", _meta("a2", 30.0, reason="left"))
    socket.send(json.dumps(_diff(5, 6, {}, {"u:1": left}, _counts(2, 1, 3), room=ROOM)))
    await expect(members).to_have_text(["alice", "bob"])
    await expect(page.locator("#anonymous")).to_have_text("and 1 visitor")
    await expect(page.locator("#count-sockets")).to_have_text("3")

    # Too many to list: the counts only.
    socket.send(json.dumps(_diff(6, 7, None, None, _counts(1500, 30, 1800), room=ROOM)))
    await expect(page.locator("#members")).to_be_hidden()
    await expect(page.locator("#unlisted")).to_be_visible()
    await expect(page.locator("#count-users")).to_have_text("1500")
