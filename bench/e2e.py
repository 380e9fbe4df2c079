"""End to end: websocket clients on a real daphne, one celery worker, Redis.

    .venv/bin/python -m bench.e2e --json OUT [--smoke] [--baseline-python PY]

Ours: ``daphne bench.asgi:application`` (the mixin, Celery mode) and one
``celery -A tasks worker -P solo``, on a PostgreSQL database of the run's own
(on the server of ``DATABASE_URL``) and the Redis of ``REDIS_URL``. 1.0.0
(with ``--baseline-python``): its documented consumer
(``bench/baseline/baseline_asgi.py``) on daphne 3 from the baseline
virtualenv, which does its database work on the socket's own thread (it has no
worker). Both on a free loopback port.

The clients (``websockets``, asyncio, all in this one process) open sockets
into rooms of ``--room-size``, at most ``--rate`` new sockets a second, then
close them at the same rate. Each socket is told its channel name; each
presence event names who joined or left. A join's latency, for each other
client of the room that was open when it joined: from the moment the joining
client began to open its socket to the moment that client received the event;
a leave's, from the moment the leaving client began to close. Bounded: every
phase ends after its last socket plus ``--settle`` seconds, and an event not
seen by then counts as missed.

With 1.0.0 beside ours, both servers run at once, each with its population
(ours opened first, then 1.0.0's), and the probes alternate between them: ours
first on even probes, 1.0.0 first on odd ones. The machine is shared: a burst
of someone else's work falls on both alike, where one after the other it fell
on whichever was being measured, and decided which p99 was the lower.

600 probes a server: a probe's events come ten at a time (one per member of
its room), so with 200 probes the p99 of 2,000 events was the second or third
worst probe, and the full passes of a daphne's garbage collector (150-250 ms
with 1,000 sockets, ours and 1.0.0's alike; one to three in each server's 200
probes) decided it whenever two of them landed on probes. With 600 it is the
sixth worst probe; in the runs of 600 traced so far, each daphne made two
full passes during the probes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
#: How long a socket may take to open, its first frame included.
OPEN_TIMEOUT = 30.0
#: A socket that does not open: refused, counted, and the run goes on.
REFUSED = (OSError, TimeoutError, InvalidHandshake, ConnectionClosed)
#: Handshakes in flight at once while the population connects.
CONNECTING = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--clients", type=int, default=1_000)
    parser.add_argument("--room-size", type=int, default=10)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--probes", type=int, default=600)
    parser.add_argument("--baseline-python")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.room_size, args.rate = 20, 5, 20.0
        args.settle, args.probes = 10.0, 5
    url = os.environ.get("DATABASE_URL") or "postgres://root@127.0.0.1:5432/test"
    if url == "sqlite":
        raise SystemExit("bench/e2e.py runs on PostgreSQL: set DATABASE_URL")
    result: dict[str, Any] = {"ours": {}, "baseline": {}, "notes": []}
    shape = (
        f"{args.clients} clients in rooms of {args.room_size} (opened at most "
        f"{args.rate:g}/s, {CONNECTING} handshakes at a time), then {args.probes} "
        "probe clients, one at a time, each joining a room and leaving it; "
        "one client process"
    )
    with ExitStack() as servers:
        ports = {"ours": servers.enter_context(ours_server(url))}
        if args.baseline_python:
            ports["baseline"] = servers.enter_context(
                baseline_server(url, args.baseline_python)
            )
            shape += "; the two servers up at once, their probes alternating"
        measured, trouble = asyncio.run(measure(ports, args))
        result.update(measured)
        result["notes"].extend(trouble)
    result["notes"].append(f"end to end, ours: {shape}; {summary(result['ours'])}")
    if args.baseline_python:
        result["notes"].append(
            f"end to end, 1.0.0: {shape}; {summary(result['baseline'])}"
        )
    Path(args.json).write_text(json.dumps(result))
    for note in result["notes"]:
        print(note)


def summary(rows: dict[str, dict[str, Any]]) -> str:
    return (
        f"{rows['refused']['value']:.0f} sockets refused; "
        f"{rows['ramp.seconds']['detail']}; "
    ) + ", ".join(
        f"{what}s: {rows[f'{what}.seen']['value']:.0f} events seen, "
        f"{rows[f'{what}.missed']['value']:.0f} missed"
        for what in ("join", "leave")
    )


# The clients.


class Client:
    """One websocket, the events it received, and when.

    A client is named by its presence's ref (ours: ``presence.diff`` frames
    name refs) or its channel name (1.0.0's events name channels).
    """

    def __init__(self, index: int, room: str) -> None:
        self.index = index
        self.room = room
        self.channel = ""
        self.bytes = 0
        self.socket: ClientConnection | None = None
        self.events: list[tuple[float, str, str]] = []  # (when, kind, channel)
        self.reader: asyncio.Task[None] | None = None
        #: Why this client stopped reading before its socket closed, if it did.
        self.failed = ""

    def saw(self, kind: str, channel: str) -> float | None:
        """When this client first received ``kind`` for ``channel``, if it did."""
        for when, what, name in self.events:
            if what == kind and name == channel:
                return when
        return None

    async def open(self, port: int) -> None:
        self.socket = await connect(
            f"ws://127.0.0.1:{port}/ws/{self.room}/",
            open_timeout=OPEN_TIMEOUT,
            max_queue=None,
        )
        try:
            # Bounded too: a server that accepted the socket and never said
            # hello hung a whole run.
            first = await asyncio.wait_for(self.socket.recv(), OPEN_TIMEOUT)
        except BaseException:
            await self.socket.close()
            raise
        hello = json.loads(first)
        self.channel = hello.get("ref") or hello["channel"]
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.socket is not None
        try:
            async for frame in self.socket:
                now = time.monotonic()
                self.bytes += len(frame)
                event = json.loads(frame)
                if event.get("type") == "presence.state":
                    # Who was there before this socket's join: seen too.
                    for member in (event["members"] or {}).values():
                        for meta in member["metas"]:
                            self.events.append((now, "state", meta["ref"]))
                elif event.get("type") == "presence.diff":
                    for kind in ("joins", "leaves"):
                        for member in (event[kind] or {}).values():
                            for meta in member["metas"]:
                                name = "join" if kind == "joins" else "leave"
                                self.events.append((now, name, meta["ref"]))
                elif event.get("type") == "presence":
                    if event.get("added"):
                        self.events.append((now, "join", event["added"]))
                    if event.get("removed"):
                        self.events.append((now, "leave", event["removed"]))
        except ConnectionClosed:
            return
        except Exception as error:  # a frame this client did not understand
            self.failed = f"{type(error).__name__}: {error}"


@dataclass
class System:
    """One server under test: its population, and what its probes measured."""

    port: int
    population: list[Client]
    members: dict[str, list[Client]]
    refused: int = 0
    opened: float = 0.0
    ramp: float = 0.0
    settled: bool = False
    unsettled: int = 0
    joins: list[float] = field(default_factory=list)
    leaves: list[float] = field(default_factory=list)

    def trouble(self) -> list[str]:
        """The server's trouble (:meth:`Server.trouble`), and its clients'."""
        failed = [c for c in self.population if c.failed]
        return SERVERS[self.port].trouble() + [
            f"client {c.index} stopped reading: {c.failed}" for c in failed[:5]
        ]


async def measure(
    ports: dict[str, int], args: argparse.Namespace
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """Open each server's population, then time ``--probes`` joins and leaves
    on each, the servers taking turns (see the module's docstring).

    Returns each server's rows, and notes on what went wrong where a
    population did not settle or events were missed."""
    systems = {name: await populate(port, args) for name, port in ports.items()}
    trouble = [
        f"end to end, {name}'s population did not settle: {line}"
        for name, system in systems.items()
        if not system.settled
        for line in system.trouble()
    ]
    order = list(systems)
    for n in range(args.probes):
        for name in order if n % 2 == 0 else order[::-1]:
            await probe(systems[name], n, args)
    expected = args.probes * args.room_size
    trouble += [
        f"end to end, {name} missed events: {line}"
        for name, system in systems.items()
        if len(system.joins) < expected or len(system.leaves) < expected
        for line in system.trouble()
    ]
    for system in systems.values():
        closing = [c.socket.close() for c in system.population if c.socket]
        await asyncio.gather(*closing, return_exceptions=True)
        for client in system.population:
            if client.reader is not None:
                client.reader.cancel()
    return {name: rows(system, args) for name, system in systems.items()}, trouble


async def populate(port: int, args: argparse.Namespace) -> System:
    """Open the population of the server on ``port``, and wait until it settles."""
    rooms = max(args.clients // args.room_size, 1)
    system = System(
        port, [Client(i, f"e2e-{i % rooms}") for i in range(args.clients)], {}
    )
    # At most --rate handshakes started a second and CONNECTING of them in
    # flight, so that a server slower to accept (1.0.0 does its database work
    # in the handshake) is not made to drop them.
    gate = asyncio.Semaphore(CONNECTING)
    began = time.monotonic()

    async def open_one(client: Client) -> None:
        async with gate:
            try:
                await client.open(port)
            except REFUSED:
                system.refused += 1
                return
        system.members.setdefault(client.room, []).append(client)

    opening = []
    for i, client in enumerate(system.population):
        await asyncio.sleep(max(began + i / args.rate - time.monotonic(), 0))
        opening.append(asyncio.create_task(open_one(client)))
    await asyncio.gather(*opening)
    system.opened = time.monotonic() - began

    # Settled once the first member of each room to open knows every other
    # member: by its join, or from its own state (when that member's join was
    # applied first, though it opened second).
    def unsettled() -> list[str]:
        return [
            room
            for room, group in system.members.items()
            if {c.channel for c in group[1:]}
            - {ch for _, kind, ch in group[0].events if kind in ("join", "state")}
        ]

    system.settled = await wait_for(lambda: not unsettled(), args.settle * 4)
    system.ramp = time.monotonic() - began
    system.unsettled = len(unsettled())
    return system


async def probe(system: System, n: int, args: argparse.Namespace) -> None:
    """Probe ``n``: a client joins a room of the population, and leaves it once
    its join has been seen (or --settle has passed)."""
    names = sorted(system.members)
    room = names[n % len(names)]
    audience = list(system.members[room])
    client = Client(args.clients + n, room)
    start = time.monotonic()
    try:
        await client.open(system.port)
    except REFUSED:
        system.refused += 1
        return
    seen = await seen_by(audience, "join", client.channel, start, args.settle)
    system.joins += seen
    if len(seen) < len(audience):
        # Said at once: a run whose probes all miss takes --settle each.
        print(f"probe {n} on port {system.port}: {missed(audience, client)}")
    start = time.monotonic()
    assert client.socket is not None
    await client.socket.close()
    system.leaves += await seen_by(
        audience, "leave", client.channel, start, args.settle
    )
    if client.reader is not None:
        client.reader.cancel()


def missed(audience: list[Client], joiner: Client) -> str:
    """Which clients of ``audience`` did not see ``joiner``'s join, and what
    each last received."""
    now = time.monotonic()
    lines = []
    for member in audience:
        if member.saw("join", joiner.channel) is not None:
            continue
        last = (
            f"its last event {now - member.events[-1][0]:.1f} s ago"
            if member.events
            else "no event ever"
        )
        state = member.socket.state.name if member.socket else "never opened"
        lines.append(
            f"client {member.index} ({state}, {len(member.events)} events, {last}"
            + (f", stopped reading: {member.failed}" if member.failed else "")
            + ")"
        )
    return f"{len(lines)} of {len(audience)} did not see the join: " + "; ".join(lines)


def rows(system: System, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The figures of one server's probes."""
    expected = args.probes * args.room_size
    result = {
        **figures("join", system.joins, expected - len(system.joins)),
        **figures("leave", system.leaves, expected - len(system.leaves)),
    }
    result["refused"] = _row("refused", system.refused, "sockets")
    result["ramp.seconds"] = _row(
        "ramp.seconds",
        system.ramp,
        "s",
        f"{args.clients} sockets opened in {system.opened:.1f} s; every join "
        f"seen by its room {'after' if system.settled else 'NOT within'} "
        f"{system.ramp:.1f} s"
        + ("" if system.settled else f" ({system.unsettled} rooms short of it)"),
    )
    return result


async def wait_for(done: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def seen_by(
    audience: list[Client], kind: str, channel: str, start: float, seconds: float
) -> list[float]:
    """The latency (ms) of each member of ``audience`` that saw the event."""

    def seen() -> list[float]:
        found = []
        for member in audience:
            when = member.saw(kind, channel)
            if when is not None:
                found.append((when - start) * 1e3)
        return found

    deadline = time.monotonic() + seconds
    while True:
        found = seen()
        if len(found) == len(audience) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.002)


def figures(
    kind: str, latencies: list[float], missed: int
) -> dict[str, dict[str, Any]]:
    ordered = sorted(latencies) or [float("nan")]

    def at(q: float) -> float:
        return ordered[min(int(len(ordered) * q), len(ordered) - 1)]

    rows = {
        f"{kind}.{stat}": _row(f"{kind}.{stat}", value, "ms")
        for stat, value in (("p50", at(0.5)), ("p99", at(0.99)), ("max", ordered[-1]))
    }
    rows[f"{kind}.seen"] = _row(f"{kind}.seen", len(latencies), "events")
    rows[f"{kind}.missed"] = _row(f"{kind}.missed", missed, "events")
    return rows


def _row(key: str, value: float, unit: str, detail: str = "") -> dict[str, Any]:
    return {
        "key": key,
        "value": value,
        "p99": None,
        "unit": unit,
        "n": None,
        "detail": detail,
    }


# The servers.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: What a server's log says of trouble.
TROUBLE = ("over capacity", "ERROR", "WARNING", "CRITICAL")
#: A log line's time, which would make each repeated line look new.
LOGGED_AT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+\s+")


@dataclass
class Server:
    """A server under test: its processes, and its keys' prefix in Redis."""

    prefix: str
    processes: list[Process]

    def trouble(self) -> list[str]:
        """What went wrong, for a note: its processes' lines of trouble, and
        the messages still queued in its channels' keys."""
        lines = Counter(
            f"{p.name}: {LOGGED_AT.sub('', line)}"
            for p in self.processes
            for line in p.lines
            if any(marker in line for marker in TROUBLE)
        )
        found = [
            line if n == 1 else f"{line} ({n} times)"
            for line, n in lines.most_common(20)
        ]
        if len(lines) > 20:
            found.append(f"... and {len(lines) - 20} other lines")
        return found + queued(self.prefix)


#: The servers running, by port.
SERVERS: dict[int, Server] = {}


def redis_client() -> Any:
    """A client of the Redis that the servers use (``REDIS_URL``)."""
    import redis

    return redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))


def queued(prefix: str) -> list[str]:
    """The messages waiting in each channel key of ``prefix`` (not received)."""
    client = redis_client()
    try:
        return [
            f"{key.decode()}: {client.zcard(key)} messages not received"
            for key in client.scan_iter(f"{prefix}specific.*", count=1000)
        ]
    finally:
        client.close()


class Process:
    """A subprocess whose output is kept; ready once a line contains ``ready``."""

    def __init__(
        self, command: list[str], env: dict[str, str], cwd: Path, ready: str
    ) -> None:
        self.lines: list[str] = []
        self.name = "celery" if "celery" in command else Path(command[0]).name
        self._ready = threading.Event()
        self._marker = ready
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._marker in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> None:
        if not self._ready.wait(START_TIMEOUT) or self.process.poll() is not None:
            raise RuntimeError("did not start:\n" + "\n".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def _server_sql(url: str, statement: str) -> None:
    parts = urlsplit(url)
    with psycopg.connect(
        dbname=parts.path.lstrip("/") or "postgres",
        user=unquote(parts.username or ""),
        password=unquote(parts.password or "") or None,
        host=parts.hostname or "",
        port=parts.port or 5432,
        autocommit=True,
    ) as server:
        server.execute(statement)


@contextmanager
def database(url: str, name: str) -> Iterator[None]:
    _server_sql(url, f'CREATE DATABASE "{name}"')
    try:
        yield
    finally:
        _server_sql(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        for process in processes:
            process.wait_ready()
        yield
    finally:
        for process in processes:
            process.stop()


def delete_keys(prefix: str) -> None:
    """Delete the keys of a run: the layer's and broker's, under ``prefix``,
    and the leases and worker heartbeat, under ``channels-presence:`` and it."""
    client = redis_client()
    try:
        keys = [
            key
            for pattern in (f"{prefix}*", f"channels-presence:{prefix}*")
            for key in client.scan_iter(pattern, count=1000)
        ]
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


@contextmanager
def ours_server(url: str, **extra: str) -> Iterator[int]:
    """Our daphne and one worker on a database of their own; yields the port."""
    run = uuid.uuid4().hex[:12]
    name = f"channels_presence_bench_{run}"
    env = {
        **os.environ,
        **extra,
        "DATABASE_URL": url,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "CHANNELS_PRESENCE_BENCH_RUN": run,
        "CHANNELS_PRESENCE_BENCH_DATABASE": name,
    }
    port = free_port()
    bin_dir = Path(sys.executable).parent
    with database(url, name):
        try:
            subprocess.run(
                [sys.executable, "-m", "django", "migrate", "-v", "0", "--skip-checks"],
                env=env,
                cwd=ROOT,
                check=True,
            )
            daphne = Process(
                [
                    str(bin_dir / "daphne"),
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "bench.asgi:application",
                ],
                env,
                ROOT,
                "Listening on TCP address",
            )
            worker = Process(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "tasks",
                    "worker",
                    "-l",
                    "info",
                    "-P",
                    "solo",
                    "-n",
                    f"e2e-{run}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                env,
                ROOT,
                " ready.",
            )
            with running(daphne, worker):
                SERVERS[port] = Server(f"cp-bench-{run}", [daphne, worker])
                yield port
        finally:
            SERVERS.pop(port, None)
            delete_keys(f"cp-bench-{run}")


@contextmanager
def baseline_server(url: str, python: str, **extra: str) -> Iterator[int]:
    """1.0.0's documented consumer on daphne 3, on a database of its own."""
    run = uuid.uuid4().hex[:12]
    name = f"cp_baseline_{run}"
    env = {
        **os.environ,
        **extra,
        "DATABASE_URL": url,
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "baseline_settings",
        "BASELINE_DATABASE": name,
        "BASELINE_PREFIX": f"cp-baseline-{run}",
    }
    env.pop("PYTHONPATH", None)  # the repository's channels_presence is ours
    cwd = ROOT / "bench" / "baseline"
    port = free_port()
    with database(url, name):
        try:
            subprocess.run(
                [python, "-m", "django", "migrate", "-v", "0", "--skip-checks"],
                env=env,
                cwd=cwd,
                check=True,
            )
            daphne = Process(
                [
                    str(Path(python).parent / "daphne"),
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "baseline_asgi:application",
                ],
                env,
                cwd,
                "Listening on TCP address",
            )
            with running(daphne):
                SERVERS[port] = Server(f"cp-baseline-{run}", [daphne])
                yield port
        finally:
            SERVERS.pop(port, None)
            delete_keys(f"cp-baseline-{run}")


if __name__ == "__main__":
    main()
