"""Many servers and workers: one population of websocket clients, two deployments.

    .venv/bin/python -m bench.scale --json OUT [--smoke] [--setups multi,single]

Each deployment runs on its own PostgreSQL database (on the server of
``DATABASE_URL``) and its own keys in the Redis of ``REDIS_URL``:

* ``multi``: 2 daphne processes and 2 ``celery -A tasks worker -P prefork -c 2``;
* ``single``: 1 daphne and 1 ``celery -A tasks worker -P solo``, the baseline.

The same clients (``websockets``, all in this process) connect to each, spread
over its daphnes in turn: ``--clients`` sockets, of which ``--big-clients`` sit
in one big room only and the others in rooms of ``--room-size``; enough of the
latter also join the big room for it to hold ``--big-room`` sockets (by
default 1,000 clients: 900 in 90 rooms of 10, 100 in the big room alone, and
the 900 in it too). They open at most ``--rate`` a second.

Measured, for each deployment:

* the ramp: until every socket has its row (the database, polled);
* join and leave seen: ``--probes`` clients, one at a time, join a room of 10
  and leave it, and ``--big-probes`` the big room; a join (a leave) is seen by a
  member of the room when that member receives any presence frame for the room
  after the probe began to open (to close) its socket. Presence frames are
  those of type ``presence`` (wire protocol 1) or ``presence.diff`` /
  ``presence.state`` (protocol 2), so that the figure does not depend on what
  the frames say. Bounded by ``--settle`` seconds; not seen by then: missed.
  Like presence.js, a client asks for a room's state (``presence.sync``) when
  it has had none 2 s after opening: the mixin holds a room's diffs back until
  the socket's state, and a state sent to a channel at capacity is dropped;
* the end: the rows equal the sockets (each client's rooms) and each room's
  group and events group in Redis hold exactly its rows' sockets;
* worker throughput: ``--burst`` more sockets, in rooms of ``--room-size``,
  opened at once (50 handshakes in flight), then closed at once: joins (leaves)
  applied per second, from the first handshake to the last row written
  (removed), and the workers' CPU time per join;
* the costs a sizing needs: each daphne's memory per socket, and its CPU time
  per heartbeat and per presence frame delivered.

Figures, not assertions: nothing here fails because a figure is poor.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake

from bench.e2e import Process, database, delete_keys, free_port, running

ROOT = Path(__file__).resolve().parent.parent
#: The frame types that tell a client of a change in a room's presence.
PRESENCE_FRAMES = {"presence", "presence.diff", "presence.state"}
#: Handshakes in flight while the population opens; during a burst.
CONNECTING = 20
BURST_CONNECTING = 50
#: The big room's name.
BIG = "big"

SETUPS = {
    # name: (daphne processes, worker processes, the worker's pool arguments)
    "multi": (2, 2, ["-P", "prefork", "-c", "2"]),
    "single": (1, 1, ["-P", "solo"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--setups", default="multi,single")
    parser.add_argument("--clients", type=int, default=1_000)
    parser.add_argument("--room-size", type=int, default=10)
    parser.add_argument("--big-room", type=int, default=1_000)
    parser.add_argument("--big-clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--big-probes", type=int, default=10)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--check", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check(json.loads(Path(args.check).read_text()))))
        return
    if args.smoke:
        args.clients, args.room_size, args.big_room, args.big_clients = 20, 5, 15, 5
        args.rate, args.probes, args.big_probes, args.burst = 40.0, 4, 2, 20
        args.settle = 10.0
    url = os.environ.get("DATABASE_URL") or "postgres://root@127.0.0.1:5432/test"
    result: dict[str, Any] = {"setups": {}, "notes": []}
    for name in args.setups.split(","):
        daphnes, workers, pool = SETUPS[name]
        with deployment(url, daphnes, workers, pool) as servers:
            rows = asyncio.run(measure(servers, args))
        result["setups"][name] = rows
        result["notes"].append(f"{name}: {summary(name, rows)}")
    result["shape"] = shape(args)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(shape(args))
    for note in result["notes"]:
        print(note)


def shape(args: argparse.Namespace) -> str:
    small = args.clients - args.big_clients
    doubled = min(small, args.big_room - args.big_clients)
    return (
        f"{args.clients} clients (at most {args.rate:g} opened a second): "
        f"{small} in rooms of {args.room_size}, {args.big_clients} in one big "
        f"room alone, which {doubled} of the others join too ({args.big_room} "
        f"sockets); then {args.probes} probes in rooms of {args.room_size} and "
        f"{args.big_probes} in the big room, one at a time; a burst of "
        f"{args.burst} sockets opened and closed at once"
    )


def summary(name: str, rows: dict[str, Any]) -> str:
    daphnes, workers, pool = SETUPS[name]
    return (
        f"{daphnes} daphne(s), {workers} worker(s) {' '.join(pool)}; ramp "
        f"{rows['ramp.seconds']:.1f} s; joins seen p50/p99 "
        f"{rows['join.p50']:.0f}/{rows['join.p99']:.0f} ms (big room "
        f"{rows['big.join.p50']:.0f}/{rows['big.join.p99']:.0f} ms), leaves "
        f"{rows['leave.p50']:.0f}/{rows['leave.p99']:.0f} ms (big room "
        f"{rows['big.leave.p50']:.0f}/{rows['big.leave.p99']:.0f} ms); missed "
        f"{rows['missed']:.0f}; {rows['syncs']} syncs asked for; burst "
        f"{rows['burst.joins_per_s']:.0f} joins/s, "
        f"{rows['burst.leaves_per_s']:.0f} leaves/s; rows = sockets = groups at "
        f"the end: {rows['end.consistent']}"
    )


# The deployment.


@dataclass
class Servers:
    """The ports of a deployment's daphnes, and its processes."""

    ports: list[int]
    daphnes: list[Process]
    workers: list[Process]
    run: str
    database_url: str
    env: dict[str, str]


@contextmanager
def deployment(
    url: str, daphnes: int, workers: int, pool: list[str]
) -> Iterator[Servers]:
    run = uuid.uuid4().hex[:12]
    name = f"channels_presence_bench_{run}"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "CHANNELS_PRESENCE_BENCH_RUN": run,
        "CHANNELS_PRESENCE_BENCH_DATABASE": name,
    }
    bin_dir = Path(sys.executable).parent
    with database(url, name), ExitStack() as stack:
        stack.callback(delete_keys, f"cp-bench-{run}")
        subprocess.run(
            [sys.executable, "-m", "django", "migrate", "-v", "0", "--skip-checks"],
            env=env,
            cwd=ROOT,
            check=True,
        )
        ports = [free_port() for _ in range(daphnes)]
        servers = [
            Process(
                [
                    str(bin_dir / "daphne"),
                    *("-b", "127.0.0.1", "-p", str(port)),
                    "bench.asgi:application",
                ],
                env,
                ROOT,
                "Listening on TCP address",
            )
            for port in ports
        ]
        celery = [
            Process(
                [
                    *(sys.executable, "-m", "celery", "-A", "tasks", "worker"),
                    *("-l", "warning", *pool, "-n", f"scale-{n}-{run}@%h"),
                    *("--without-gossip", "--without-mingle", "--without-heartbeat"),
                ],
                env,
                ROOT,
                # At -l warning a worker says nothing once ready: its banner's
                # last line is enough, the queue waits for it meanwhile.
                "[queues]",
            )
            for n in range(workers)
        ]
        stack.enter_context(running(*servers, *celery))
        parts = urlsplit(url)
        database_url = parts._replace(path=f"/{name}").geturl()
        yield Servers(ports, servers, celery, run, database_url, env)


# The clients.


@dataclass
class Client:
    """One websocket in some rooms, and when it heard of a change in each."""

    index: int
    rooms: list[str]
    channel: str = ""
    socket: ClientConnection | None = None
    reader: asyncio.Task[None] | None = None
    #: When it received each presence frame, and the room the frame was for.
    times: list[float] = field(default_factory=list)
    about: list[str] = field(default_factory=list)
    #: The rooms it has had a ``presence.state`` of, and the syncs it asked for.
    stated: set[str] = field(default_factory=set)
    syncs: int = 0
    watchdog: asyncio.Task[None] | None = None

    def path(self) -> str:
        return f"/ws/scale/{'+'.join(self.rooms)}/"

    async def open(self, port: int) -> None:
        self.socket = await connect(
            f"ws://127.0.0.1:{port}{self.path()}", open_timeout=30, max_queue=None
        )
        hello = json.loads(await self.socket.recv())
        self.channel = hello["channel"]
        self.reader = asyncio.create_task(self._read())
        self.watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """presence.js's sync when a room has sent no state 2 s after opening,
        one a second at most: the mixin holds a room's diffs back until its
        state, and a state can be dropped on a channel at capacity."""
        assert self.socket is not None
        try:
            await asyncio.sleep(2)
            while missing := [r for r in self.rooms if r not in self.stated]:
                for room in missing:
                    self.syncs += 1
                    await self.socket.send(
                        json.dumps({"type": "presence.sync", "room": room})
                    )
                await asyncio.sleep(1)
        except Exception:
            return

    async def _read(self) -> None:
        assert self.socket is not None
        try:
            async for frame in self.socket:
                now = time.monotonic()
                event = json.loads(frame)
                if isinstance(event, dict) and event.get("type") in PRESENCE_FRAMES:
                    self.times.append(now)
                    self.about.append(str(event.get("room", "")))
                    if event["type"] == "presence.state":
                        self.stated.add(str(event.get("room", "")))
        except Exception:
            return

    def heard_since(self, room: str, start: float) -> float | None:
        """When it first heard of ``room`` at or after ``start``; None if not yet."""
        for index in range(bisect.bisect_left(self.times, start), len(self.times)):
            if self.about[index] == room:
                return self.times[index]
        return None

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        for task in (self.reader, self.watchdog):
            if task is not None:
                task.cancel()


def population(args: argparse.Namespace) -> list[Client]:
    small = args.clients - args.big_clients
    rooms = max(small // args.room_size, 1)
    doubled = min(small, args.big_room - args.big_clients)
    clients = [
        Client(i, [f"s-{i % rooms}", *([BIG] if i < doubled else [])])
        for i in range(small)
    ]
    clients += [Client(small + i, [BIG]) for i in range(args.big_clients)]
    return clients


async def open_all(
    clients: list[Client], ports: list[int], rate: float | None, in_flight: int
) -> tuple[float, int]:
    """Open the clients, spread over the ports; the time taken and those refused."""
    gate = asyncio.Semaphore(in_flight)
    refused = 0
    began = time.monotonic()

    async def one(client: Client) -> None:
        nonlocal refused
        async with gate:
            try:
                await client.open(ports[client.index % len(ports)])
            except (OSError, TimeoutError, InvalidHandshake):
                refused += 1

    tasks = []
    for n, client in enumerate(clients):
        if rate:
            await asyncio.sleep(max(began + n / rate - time.monotonic(), 0))
        tasks.append(asyncio.create_task(one(client)))
    await asyncio.gather(*tasks)
    return time.monotonic() - began, refused


# What the database and Redis hold.


def count_rows(database_url: str) -> int:
    with psycopg.connect(_dsn(database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM channels_presence_presence").fetchone()
    return int(row[0]) if row else 0


def _dsn(url: str) -> str:
    parts = urlsplit(url)
    return psycopg.conninfo.make_conninfo(
        dbname=parts.path.lstrip("/"),
        user=unquote(parts.username or ""),
        password=unquote(parts.password or "") or None,
        host=parts.hostname or "",
        port=parts.port or 5432,
    )


async def until_rows(database_url: str, expected: int, seconds: float) -> float:
    """Seconds until the rows number ``expected`` (inf if not within ``seconds``)."""
    began = time.monotonic()
    while await asyncio.to_thread(count_rows, database_url) != expected:
        if time.monotonic() - began > seconds:
            return float("inf")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


def check(expected: dict[str, list[str]]) -> dict[str, Any]:
    """In a process of the deployment: do the rows and groups match ``expected``?

    ``expected``: each room's sockets. Returns what differs, room by room.
    """
    import django

    django.setup()
    import redis
    from channels.layers import get_channel_layer
    from django.conf import settings

    from channels_presence.groups import events_group
    from channels_presence.models import Presence

    rows: dict[str, set[str]] = {}
    for room, channel in Presence.objects.values_list(
        "room__channel_name", "channel_name"
    ):
        rows.setdefault(room, set()).add(channel)
    layer: Any = get_channel_layer()
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    wrong: dict[str, str] = {}
    for room in sorted(set(expected) | set(rows)):
        want = set(expected.get(room, []))
        found = rows.get(room, set())
        for group in (room, events_group(room)):
            found_members: Any = client.zrange(layer._group_key(group), 0, -1)
            members = set(found_members)
            if members != want:
                wrong[group] = f"{len(members)} members, {len(want)} sockets"
        if found != want:
            wrong[room] = f"{len(found)} rows, {len(want)} sockets"
    client.close()
    return {"consistent": not wrong, "wrong": dict(list(wrong.items())[:10])}


def checked(servers: Servers, clients: list[Client]) -> dict[str, Any]:
    expected: dict[str, list[str]] = {}
    for client in clients:
        if client.channel and client.socket is not None:
            for room in client.rooms:
                expected.setdefault(room, []).append(client.channel)
    path = Path(f"/tmp/cp-bench-scale-{servers.run}.json")
    path.write_text(json.dumps(expected))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.scale", "--json", "-", "--check", str(path)],
            env=servers.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        path.unlink()
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


# Processes' CPU time and memory, from /proc.


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def cpu_seconds(processes: list[Process]) -> float:
    """User and system CPU time of the processes and their descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for process in processes:
        for pid in _descendants(process.process.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def rss_kib(process: Process) -> int:
    """Resident memory of the process (its own, not its children's)."""
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# The measurement.


async def measure(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    clients = population(args)
    expected_rows = sum(len(c.rooms) for c in clients)
    rss_before = [rss_kib(d) for d in servers.daphnes]
    began = time.monotonic()
    opened, refused = await open_all(clients, servers.ports, args.rate, CONNECTING)
    ramp = await until_rows(servers.database_url, expected_rows, args.settle * 8)
    ramp += opened
    await quiet(clients, 1.0, args.settle * 4)
    ramp_quiet = time.monotonic() - began
    rss_after = [rss_kib(d) for d in servers.daphnes]
    rows: dict[str, Any] = {
        "sockets": len(clients),
        "presences": expected_rows,
        "refused": refused,
        "ramp.opened_s": opened,
        "ramp.seconds": ramp,
        "ramp.quiet_s": ramp_quiet,
        "daphne.kib_per_socket": (sum(rss_after) - sum(rss_before))
        / max(len(clients) - refused, 1),
    }

    # Probes: join and leave seen, in rooms of 10 and in the big room.
    open_clients = [c for c in clients if c.socket is not None]
    small_rooms = sorted({c.rooms[0] for c in open_clients if c.rooms[0] != BIG})
    frames_before = sum(len(c.times) for c in open_clients)
    cpu_before = cpu_seconds(servers.daphnes)
    missed = 0
    probes = [(small_rooms[n % len(small_rooms)], "") for n in range(args.probes)]
    probes += [(BIG, "big.") for _ in range(args.big_probes)]
    latencies: dict[str, list[float]] = {}
    for n, (room, kind) in enumerate(probes):
        audience = [c for c in open_clients if room in c.rooms]
        probe = Client(len(clients) + n, [room])
        start = time.monotonic()
        try:
            await probe.open(servers.ports[n % len(servers.ports)])
        except (OSError, TimeoutError, InvalidHandshake):
            refused += 1
            continue
        seen = await seen_by(audience, room, start, args.settle)
        latencies.setdefault(f"{kind}join", []).extend(seen)
        missed += len(audience) - len(seen)
        start = time.monotonic()
        await probe.close()
        seen = await seen_by(audience, room, start, args.settle)
        latencies.setdefault(f"{kind}leave", []).extend(seen)
        missed += len(audience) - len(seen)
    frames = sum(len(c.times) for c in open_clients) - frames_before
    probe_cpu = cpu_seconds(servers.daphnes) - cpu_before
    for name, values in latencies.items():
        ordered = sorted(values) or [float("nan")]
        for stat, q in (("p50", 0.5), ("p99", 0.99)):
            rows[f"{name}.{stat}"] = ordered[
                min(int(len(ordered) * q), len(ordered) - 1)
            ]
        rows[f"{name}.max"] = ordered[-1]
        rows[f"{name}.seen"] = len(values)
    for name in ("join", "leave", "big.join", "big.leave"):
        for stat in ("p50", "p99", "max"):
            rows.setdefault(f"{name}.{stat}", float("nan"))
    rows["missed"] = missed
    rows["syncs"] = sum(c.syncs for c in open_clients)
    rows["daphne.frames_delivered"] = frames
    rows["daphne.cpu_us_per_frame"] = probe_cpu / max(frames, 1) * 1e6

    # The end: the rows are the sockets, and so are the groups.
    end = await asyncio.to_thread(checked, servers, clients)
    rows["end.consistent"] = end["consistent"]
    rows["end.wrong"] = end["wrong"]

    # Heartbeats: each daphne's CPU time per heartbeat frame.
    idle_before = cpu_seconds(servers.daphnes)
    await asyncio.sleep(3)
    idle = (cpu_seconds(servers.daphnes) - idle_before) / 3
    beats, seconds = 0, 3.0
    cpu_before = cpu_seconds(servers.daphnes)
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        for client in open_clients:
            assert client.socket is not None
            await client.socket.send('"heartbeat"')
            beats += 1
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    spent = cpu_seconds(servers.daphnes) - cpu_before - idle * (seconds + 0.5)
    rows["daphne.cpu_us_per_heartbeat"] = max(spent, 0.0) / max(beats, 1) * 1e6
    rows["heartbeats"] = beats

    # Worker throughput: a burst of joins, then of leaves.
    burst = [
        Client(10_000_000 + i, [f"b-{i // args.room_size}"]) for i in range(args.burst)
    ]
    total = expected_rows + args.burst
    workers_before = cpu_seconds(servers.workers)
    began = time.monotonic()
    burst_opened, burst_refused = await open_all(
        burst, servers.ports, None, BURST_CONNECTING
    )
    total -= burst_refused
    joined = burst_opened + await until_rows(
        servers.database_url, total, args.settle * 8
    )
    worker_cpu = cpu_seconds(servers.workers) - workers_before
    applied = args.burst - burst_refused
    began = time.monotonic()
    await asyncio.gather(*(c.close() for c in burst), return_exceptions=True)
    gone = await until_rows(servers.database_url, expected_rows, args.settle * 8)
    left = time.monotonic() - began if gone != float("inf") else gone
    rows["burst.opened_s"] = burst_opened
    rows["burst.joins_per_s"] = applied / joined if joined else 0.0
    rows["burst.leaves_per_s"] = applied / left if left else 0.0
    rows["worker.cpu_ms_per_join"] = worker_cpu / max(applied, 1) * 1e3
    rows["refused"] = refused + burst_refused

    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    rows["close.seconds"] = await until_rows(servers.database_url, 0, args.settle * 8)
    return rows


async def quiet(clients: list[Client], still: float, seconds: float) -> None:
    """Wait until no client has heard of a change for ``still`` seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        last = max((c.times[-1] for c in clients if c.times), default=0.0)
        if time.monotonic() - last >= still:
            return
        await asyncio.sleep(0.1)


async def seen_by(
    audience: list[Client], room: str, start: float, seconds: float
) -> list[float]:
    """The latency (ms) of each member of ``audience`` that heard of ``room``."""
    deadline = time.monotonic() + seconds
    while True:
        found = [
            (when - start) * 1e3
            for member in audience
            if (when := member.heard_since(room, start)) is not None
        ]
        if len(found) == len(audience) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.005)


if __name__ == "__main__":
    main()
