"""Every client's view converges to the rows: real sockets, a real worker, a reducer.

A real daphne (the example's consumer, Celery mode) and a real ``celery
worker`` on the test database. Websocket clients join one room, some leave,
some come back, some open a second tab as the same visitor session; each
client keeps every frame it gets. At the end, each client's frames are
reduced by the reducer presence.js uses (``channels_presence.testing``), as
they came, and again shuffled with some duplicated: either way the view
equals the room's rows, or shows a gap that a sync closes, as the protocol
says.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from channels_presence.testing import RoomView, members_now
from tests.helpers import wait_until
from tests.servers import Daphne
from tests.test_pipeline import drained
from tests.workers import celery_worker, purge_queue

pytestmark = pytest.mark.django_db(transaction=True)

ROOM = "converge"
#: Sockets that join; some leave and come back.
CLIENTS = 24


class Recorder:
    """A websocket client that keeps every presence frame it gets."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.frames: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for text in self.socket:
                frame = json.loads(text)
                if str(frame.get("type", "")).startswith("presence."):
                    self.frames.append(frame)
        except Exception:
            return

    def view(self, frames: list[dict[str, Any]] | None = None) -> RoomView:
        view = RoomView(ROOM)
        for frame in self.frames if frames is None else frames:
            view.receive(frame)
        return view

    async def close(self) -> None:
        await self.socket.close()
        self.reader.cancel()


def shuffled(frames: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """The frames with a third of the diffs sent twice, and every diff moved.

    The state stays first: a client only joins once, and keeps what waits.
    """
    state, diffs = frames[0], frames[1:]
    noisy = diffs + [d for d in diffs if rng.random() < 0.33]
    rng.shuffle(noisy)
    return [state, *noisy]


async def test_every_clients_reduced_view_equals_the_rows() -> None:
    await asyncio.to_thread(purge_queue)
    rng = random.Random(20261202)
    daphne = Daphne()
    recorders: list[Recorder] = []
    try:
        with celery_worker(concurrency=2):
            for _ in range(CLIENTS):
                recorders.append(Recorder(await daphne.connect(ROOM)))
                await asyncio.sleep(rng.uniform(0, 0.02))
            # A second tab of one visitor session: same cookie, one member.
            cookie = await _session_cookie(daphne)
            tabs = [
                Recorder(
                    await daphne.connect(ROOM, additional_headers={"Cookie": cookie})
                )
                for _ in range(2)
            ]
            recorders += tabs
            # Churn: a third leave, some come back.
            leaving = rng.sample(recorders[:CLIENTS], CLIENTS // 3)
            for recorder in leaving:
                await recorder.close()
                recorders.remove(recorder)
                if rng.random() < 0.5:
                    recorders.append(Recorder(await daphne.connect(ROOM)))
            await drained()
            expected = await sync_to_async(members_now)(ROOM)
            assert expected is not None
            assert len(expected) == len(recorders) - 1, "the two tabs are one member"

            async def converged() -> bool:
                return all(r.view().members == expected for r in recorders)

            await wait_until(converged, seconds=15)
            for recorder in recorders:
                noisy = recorder.view(shuffled(recorder.frames, rng))
                if noisy.gap:
                    # Kept diffs wait on a gap: the client syncs after a second.
                    noisy.receive(await _sync(recorder))
                assert noisy.members == expected
            (tab_key,) = [k for k, m in expected.items() if len(m["metas"]) == 2]
            assert tab_key.startswith("v:")
    except BaseException:
        print(f"--- daphne output ---\n{daphne.output()}")
        raise
    finally:
        for recorder in recorders:
            await recorder.close()
        daphne.close()
        await asyncio.to_thread(purge_queue)


async def _sync(recorder: Recorder) -> dict[str, Any]:
    """Ask the server for the room's state, as presence.js does on a gap."""
    count = len(recorder.frames)
    await recorder.socket.send(json.dumps({"type": "presence.sync", "room": ROOM}))
    await wait_until(lambda: len(recorder.frames) > count, seconds=5)
    (state,) = [f for f in recorder.frames[count:] if f["type"] == "presence.state"]
    return state


async def _session_cookie(daphne: Daphne) -> str:
    """A session cookie for a visitor, from a page that saves a session."""
    from django.contrib.sessions.backends.db import SessionStore

    def make() -> str:
        session = SessionStore()
        session["visitor"] = True
        session.save()
        return str(session.session_key)

    key = await sync_to_async(make)()
    return f"sessionid={key}"
