"""Join storm: 1,000 websocket clients into one room, 200 opens a second.

    .venv/bin/python -m bench.storm --json OUT [--smoke] [--baseline-python PY]

Ours: ``daphne bench.asgi:application`` (the mixin, Celery mode, wire protocol
2) and one ``celery -A tasks worker -P solo``, on a PostgreSQL database of the
run's own. 1.0.0 (with ``--baseline-python``): its documented consumer on
daphne 3 (``bench/baseline/baseline_asgi.py``), broadcasting the room's member
list on each change, the documentation's form that a late joiner can use.

Each client counts the bytes of every frame after its hello, and reduces them
as a browser would: ours with the reducer presence.js uses
(``channels_presence.testing.RoomView``), and asks for the state, as
presence.js does, when a gap in the versions or a beacon ahead of it lasts a
second, or when it has no state two seconds after it opened (at most once a
second); 1.0.0's by taking each member list.
Two figures: the time from the last socket's open until every client's view
holds every socket (each client is told its own ref, or channel name, at
connect), bounded by ``--settle``; and the bytes each client received against
the size of the room's final state (ours: a ``presence.state`` asked for at
the end; 1.0.0: its last member list).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake

from bench.e2e import SERVERS, _row, baseline_server, ours_server, wait_for
from channels_presence import protocol

ROOM = "storm"
#: DESIGN.md's budget: every view complete this many seconds after the last
#: open, and no client receiving more than this many times the final state.
CONVERGE_BUDGET = 5.0
BYTES_BUDGET = 1.5
CONNECTING = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--clients", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--settle", type=float, default=60.0)
    parser.add_argument("--baseline-python")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.rate, args.settle = 50, 50.0, 20.0
    url = os.environ.get("DATABASE_URL") or "postgres://root@127.0.0.1:5432/test"
    result: dict[str, Any] = {"ours": {}, "baseline": {}, "notes": []}
    with ours_server(url) as port:
        result["ours"] = asyncio.run(storm(port, args, ours=True))
        # What the servers logged of trouble, when a budget was missed.
        trouble = SERVERS[port].trouble() if missed(result["ours"]) else []
    result["notes"].append(f"join storm, ours: {summary(result['ours'])}")
    result["notes"] += [f"join storm, ours, trouble: {line}" for line in trouble]
    if args.baseline_python:
        with baseline_server(
            url, args.baseline_python, BASELINE_BROADCAST="members"
        ) as port:
            result["baseline"] = asyncio.run(storm(port, args, ours=False))
        result["notes"].append(f"join storm, 1.0.0: {summary(result['baseline'])}")
    Path(args.json).write_text(json.dumps(result))
    for note in result["notes"]:
        print(note)


def missed(rows: dict[str, dict[str, Any]]) -> bool:
    """Whether a storm missed its budget (a NaN, never complete, misses it)."""
    seconds = rows["converge.seconds"]["value"]
    return not (
        seconds <= CONVERGE_BUDGET and rows["bytes.ratio"]["value"] <= BYTES_BUDGET
    )


def summary(rows: dict[str, dict[str, Any]]) -> str:
    return "; ".join(rows[key]["detail"] for key in ("converge.seconds", "bytes.ratio"))


class StormClient:
    """One socket: what it was told, reduced, and how many bytes that took."""

    def __init__(self, ours: bool) -> None:
        self.ours = ours
        self.socket: ClientConnection | None = None
        self.me = ""
        self.bytes = 0
        self.frames = 0
        self.view = protocol_view() if ours else None
        self.members: set[str] = set()
        self.last_list = 0
        self.reader: asyncio.Task[None] | None = None
        self.watchdog: asyncio.Task[None] | None = None
        # Why it asked: "gap", "beacon", "unlisted" or "no state".
        self.why: Counter[str] = Counter()
        self.opened_at = 0.0
        # When the first state arrived, after the open; how many states came.
        self.first_state: float | None = None
        self.states = 0
        # (version, refs) of the view when last asked what it sees.
        self._seen: tuple[int | None, set[str]] = (None, set())

    async def open(self, port: int) -> None:
        self.socket = await connect(
            f"ws://127.0.0.1:{port}/ws/{ROOM}/",
            open_timeout=60,
            max_queue=None,
            max_size=None,
        )
        hello = json.loads(await self.socket.recv())
        self.opened_at = time.monotonic()
        self.me = hello.get("ref") or hello["channel"]
        self.reader = asyncio.create_task(self._read())
        if self.view is not None:
            self.watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """presence.js's syncs: a gap, or a beacon ahead, that lasts a second;
        no state two seconds after opening; one a second at most."""
        assert self.socket is not None
        assert self.view is not None
        since: float | None = None
        last_sync = float("-inf")
        try:
            while True:
                await asyncio.sleep(0.2)
                now = time.monotonic()
                view = self.view
                waiting = view.gap or view.behind or view.listed_while_null
                why = "gap" if view.gap else "beacon" if view.behind else "unlisted"
                if view.version is None and now - self.opened_at >= 2:
                    waiting, since, why = True, since or now - 1, "no state"
                if not waiting:
                    since = None
                    continue
                since = since or now
                if now - since >= 1 and now - last_sync >= 1:
                    last_sync = now
                    self.why[why] += 1
                    await self.socket.send(
                        json.dumps({"type": protocol.SYNC, "room": ROOM})
                    )
        except Exception:
            return

    async def _read(self) -> None:
        assert self.socket is not None
        try:
            async for text in self.socket:
                self.bytes += len(text.encode() if isinstance(text, str) else text)
                self.frames += 1
                # A browser decodes each frame on its own core; this one process
                # decodes a thousand clients' frames, in C as fast as it can.
                frame = orjson.loads(text)
                if frame.get("type") == protocol.STATE:
                    self.states += 1
                    if self.first_state is None:
                        self.first_state = time.monotonic() - self.opened_at
                if self.view is not None:
                    self.view.receive(frame)
                elif frame.get("type") == "presence" and "presence" in frame:
                    self.members = set(frame["presence"])
                    self.last_list = len(text)
        except Exception:
            return

    def sees(self) -> set[str]:
        """The sockets this client's view holds: refs (ours) or channel names."""
        if self.view is None:
            return self.members
        if self.view.version is None or self._seen[0] != self.view.version:
            members = self.view.members or {}
            refs = {meta["ref"] for m in members.values() for meta in m["metas"]}
            self._seen = (self.view.version, refs)
        return self._seen[1]


def protocol_view() -> Any:
    from channels_presence.testing import RoomView

    return RoomView(ROOM, log=False)


async def storm(port: int, args: argparse.Namespace, *, ours: bool) -> dict[str, Any]:
    # A browser reduces its frames in a heap of its own; this one process
    # holds a thousand clients' views, millions of objects that each of the
    # cyclic collector's full passes would walk (most of the client's time,
    # taken from the daphne beside it). Their frames hold no cycles.
    gc.disable()
    try:
        return await _storm(port, args, ours=ours)
    finally:
        gc.enable()


async def _storm(port: int, args: argparse.Namespace, *, ours: bool) -> dict[str, Any]:
    clients = [StormClient(ours) for _ in range(args.clients)]
    refused = 0
    gate = asyncio.Semaphore(CONNECTING)
    began = time.monotonic()

    async def open_one(client: StormClient) -> None:
        nonlocal refused
        async with gate:
            try:
                await client.open(port)
            except (OSError, TimeoutError, InvalidHandshake):
                refused += 1

    opening = []
    for n, client in enumerate(clients):
        await asyncio.sleep(max(began + n / args.rate - time.monotonic(), 0))
        opening.append(asyncio.create_task(open_one(client)))
    await asyncio.gather(*opening)
    last_open = time.monotonic()
    opened = [c for c in clients if c.socket is not None]
    everyone = {c.me for c in opened}
    converged = None
    while time.monotonic() - last_open < args.settle:
        if all(c.sees() == everyone for c in opened):
            converged = time.monotonic() - last_open
            break
        await asyncio.sleep(0.05)
    behind = sum(1 for c in opened if c.sees() != everyone)
    received = [c.bytes for c in opened]
    frames = [c.frames for c in opened]
    # Before the state asked for below, which one client gets on top.
    firsts = _first_states(opened)
    final = await final_state_size(opened, ours)
    ratios = [b / final for b in received] if final else [float("nan")]
    for client in opened:
        for task in (client.reader, client.watchdog):
            if task is not None:
                task.cancel()
    await asyncio.gather(
        *(c.socket.close() for c in opened if c.socket is not None),
        return_exceptions=True,
    )
    opening_seconds = last_open - began
    converge_detail = (
        f"{len(opened)} sockets opened in {opening_seconds:.1f} s "
        f"({len(opened) / opening_seconds:.0f}/s) "
        f"({refused} refused); every view complete "
        + (
            f"{converged:.2f} s after the last open"
            if converged is not None
            else f"NOT within {args.settle:g} s ({behind} clients behind)"
        )
    )
    rows = {
        "converge.seconds": _row(
            "converge.seconds",
            converged if converged is not None else float("nan"),
            "s",
            converge_detail,
        ),
        "bytes.ratio": _row(
            "bytes.ratio",
            max(ratios),
            "x",
            f"bytes per client / final state ({final:,} B): max "
            f"{max(ratios):.2f}, p99 {_p99(ratios):.2f}, median "
            f"{statistics.median(ratios):.2f}, over {BYTES_BUDGET:g}: "
            f"{sum(1 for r in ratios if r > BYTES_BUDGET)} clients; "
            f"{statistics.median(received):,.0f} B and "
            f"{statistics.median(frames):.0f} frames per client (median), "
            f"{sum(received) / 1e6:,.1f} MB in all"
            + (f"; {_syncs(opened)}; {firsts}" if ours else ""),
        ),
        "frames.median": _row("frames.median", statistics.median(frames), "frames"),
    }
    rows["converge.seconds"]["n"] = len(opened)
    return rows


def _syncs(clients: list[StormClient]) -> str:
    why = sum((c.why for c in clients), Counter())
    reasons = ", ".join(f"{why[reason]} for {reason}" for reason in sorted(why))
    return f"{sum(why.values())} syncs asked for" + (f" ({reasons})" if why else "")


def _first_states(clients: list[StormClient]) -> str:
    """How long each client waited for its first state, and who got more."""
    waits = sorted(c.first_state for c in clients if c.first_state is not None)
    if not waits:
        return "no client got a state"
    return (
        f"first state {statistics.median(waits) * 1000:,.0f} ms after the open "
        f"(median; p99 {_p99(waits) * 1000:,.0f} ms, max {waits[-1] * 1000:,.0f} "
        f"ms, {sum(1 for w in waits if w >= 2)} at 2 s or more), "
        f"{sum(1 for c in clients if c.states > 1)} clients got more than one"
    )


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * 0.99), len(ordered) - 1)]


async def final_state_size(clients: list[StormClient], ours: bool) -> int:
    """The size of the room's state at the end, as its clients get it."""
    if not clients:
        return 0
    if not ours:
        return max(c.last_list for c in clients)
    asking = clients[0]
    assert asking.socket is not None
    before = asking.bytes
    count = asking.frames
    await asking.socket.send(json.dumps({"type": protocol.SYNC, "room": ROOM}))
    await wait_for(lambda: asking.frames > count, 10)
    size = asking.bytes - before
    asking.bytes = before
    return size


if __name__ == "__main__":
    main()
