"""Every budget of DESIGN.md, measured beside django-channels-presence 1.0.0.

    python3 dev.py bench            # full run, about 10 minutes
    python3 dev.py bench --smoke    # tiny sizes, well under a minute (CI)

or, with the project's virtualenv and services already there,
``.venv/bin/python -m bench.run [--smoke] [--out DIR]``.

Each section runs as a subprocess with its own database, Redis keys and Celery
queue: ours with this virtualenv (``bench/pipeline.py``, ``bench/e2e.py``, and
``bench/scale.py`` and ``bench/sizing.py``, which have no 1.0.0 side), and
1.0.0 with the baseline virtualenv ``bench/.baseline-venv`` (Django 3.2.25,
channels 3.0.5, channels-redis 3.4.1, celery 5.3.6, psycopg2-binary; made on
first use) running ``bench/baseline/run.py``. All of them run in this one
invocation, so each ratio compares figures taken minutes apart on the same
machine. The table is printed and written to ``DIR/latest.json`` and
``DIR/latest.md`` (``bench/results/`` by default; ``smoke.json`` and
``smoke.md`` under ``--smoke``, so a smoke run never replaces a full one).
``--only scale,sizing`` runs some parts (of pipeline, e2e, scale, sizing) and
writes the files named for them, ``scale-sizing.json`` and ``scale-sizing.md``.

Figures, not assertions: nothing here fails because a budget is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
import venv
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.e2e import delete_keys
from bench.storm import BYTES_BUDGET, CONVERGE_BUDGET

ROOT = Path(__file__).resolve().parent.parent
BASELINE_VENV = ROOT / "bench" / ".baseline-venv"
BASELINE_PYTHON = BASELINE_VENV / "bin" / "python"
#: 1.0.0 on the stack it was released for. psycopg2-binary, not psycopg2,
#: which would need a compiler and libpq's headers to build.
BASELINE_PACKAGES = [
    "django-channels-presence==1.0.0",
    "Django==3.2.25",
    "channels==3.0.5",
    "channels-redis==3.4.1",
    "celery==5.3.6",
    "psycopg2-binary==2.9.13",
    "daphne==3.0.2",
]
DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/test"
LOWER, HIGHER = "lower", "higher"
#: What a run is made of: bench/pipeline.py (and 1.0.0's run.py), bench/e2e.py,
#: bench/scale.py and bench/sizing.py.
PARTS = ("pipeline", "e2e", "scale", "sizing")


@dataclass
class Line:
    """One line of the comparison: a figure of ours, 1.0.0's, and the budget."""

    label: str
    ours: str  # the key of our figure
    baseline: str = ""  # the key of 1.0.0's figure for the same work
    budget: str = ""
    limit: float | None = None  # the budget's number, in the figure's unit
    better: str = LOWER  # which way is better, for the ratio and the budget
    no_worse: bool = False  # the budget also asks for 1.0.0's figure or better


def lines() -> list[Line]:
    """What the table shows, in order; a figure missing from a run is skipped."""
    hb, join = "≤ 5 µs", "≤ 500 µs"
    found: list[Line] = []
    for db in ("sqlite", "postgresql"):
        found += [
            Line(
                f"[{db}] heartbeat, async consumer, inside the touch interval",
                f"{db}:socket.heartbeat.async",
                f"{db}:socket.heartbeat.async",
                hb,
                5,
            ),
            Line(
                f"[{db}] heartbeat, sync consumer, inside the touch interval",
                f"{db}:socket.heartbeat.sync",
                f"{db}:socket.heartbeat.sync",
                hb,
                5,
            ),
            Line(
                f"[{db}] heartbeat, async, due (TOUCH_INTERVAL=0)",
                f"{db}:socket.heartbeat.async.due",
                f"{db}:socket.heartbeat.async",
            ),
            Line(
                f"[{db}] heartbeat, sync, due (TOUCH_INTERVAL=0)",
                f"{db}:socket.heartbeat.sync.due",
                f"{db}:socket.heartbeat.sync",
            ),
            Line(
                f"[{db}] heartbeat, inline mode (one UPDATE awaited)",
                f"{db}:socket.heartbeat.inline",
                f"{db}:socket.heartbeat.async",
            ),
            Line(
                f"[{db}] join, async consumer (Celery mode)",
                f"{db}:socket.join.async",
                f"{db}:socket.join.sync",
                join,
                500,
            ),
            Line(
                f"[{db}] join, sync consumer (Celery mode)",
                f"{db}:socket.join.sync",
                f"{db}:socket.join.sync",
                join,
                500,
            ),
            Line(
                f"[{db}] join, inline mode",
                f"{db}:socket.join.inline",
                f"{db}:socket.join.sync",
            ),
            Line(
                f"[{db}] leave, async consumer (Celery mode)",
                f"{db}:socket.leave.async",
                f"{db}:socket.leave.sync",
                join,
                500,
            ),
            Line(
                f"[{db}] leave, sync consumer (Celery mode)",
                f"{db}:socket.leave.sync",
                f"{db}:socket.leave.sync",
                join,
                500,
            ),
            Line(
                f"[{db}] leave, inline mode",
                f"{db}:socket.leave.inline",
                f"{db}:socket.leave.sync",
            ),
        ]
    per_flush = "≤ 1 per FLUSH_INTERVAL"
    found += [
        Line(
            "broker: touch tasks, default TOUCH_INTERVAL",
            "postgresql:broker.default.touch_tasks_per_flush",
            budget=per_flush,
            limit=1,
        ),
        Line(
            "broker: touch tasks, TOUCH_INTERVAL=0",
            "postgresql:broker.interval0.touch_tasks_per_flush",
            budget=per_flush,
            limit=1,
        ),
        Line(
            "broker: messages/s, default TOUCH_INTERVAL",
            "postgresql:broker.default.messages_per_s",
        ),
        Line(
            "broker: messages/s, TOUCH_INTERVAL=0",
            "postgresql:broker.interval0.messages_per_s",
        ),
    ]
    for count in (1_000, 10_000, 100_000):
        found.append(
            Line(
                f"worker: touch_presences, {count:,} presences",
                f"postgresql:worker.touch.{count}",
                budget="≥ 50,000/s",
                limit=50_000,
                better=HIGHER,
            )
        )
        found.append(
            Line(
                f"worker: joins applied, {count:,} presences",
                f"postgresql:worker.joins.{count}",
                better=HIGHER,
            )
        )
    found += [
        Line(
            "a join in a room of 1,000: the diff each socket gets",
            "postgresql:room1000.join.diff_bytes",
        ),
        Line(
            "a leave in a room of 1,000: the diff each socket gets",
            "postgresql:room1000.leave.diff_bytes",
        ),
    ]
    found.append(
        Line(
            "worker: joins and leaves applied, batches of 500, rooms of 1,000",
            "postgresql:worker.batch.1000",
            budget="≥ 5,000/s",
            limit=5_000,
            better=HIGHER,
        )
    )
    found += [
        Line(
            "prune, wall time (half stale)",
            "postgresql:prune.seconds",
            "postgresql:prune.seconds",
            "≤ 2 s",
            2,
        ),
        Line(
            "prune, queries",
            "postgresql:prune.queries",
            "postgresql:prune.queries",
            "O(1), not O(rooms)",
        ),
        Line(
            "prune: a worker join's p99 beside it, ms",
            "postgresql:prune.join_p99_during",
            budget="≤ alone + the prune's database time",
        ),
    ]
    found += [
        Line(
            "end to end: the clients opened, every join seen by its room",
            "e2e:ramp.seconds",
            "e2e-baseline:ramp.seconds",
        ),
        Line(
            "end to end: handshakes refused",
            "e2e:refused",
            "e2e-baseline:refused",
        ),
    ]
    for what in ("join", "leave"):
        for stat in ("p50", "p99", "max"):
            limit = 50.0 if (what, stat) == ("join", "p99") else None
            found.append(
                Line(
                    f"end to end: a {what} seen by the room, {stat}",
                    f"e2e:{what}.{stat}",
                    f"e2e-baseline:{what}.{stat}",
                    "≤ 50 ms, and ≤ 1.0.0's" if limit else "",
                    limit,
                    no_worse=limit is not None,
                )
            )
    found += [
        Line(
            "join storm (1,000 into one room, 200/s): every view complete after",
            "storm:converge.seconds",
            "storm-baseline:converge.seconds",
            f"≤ {CONVERGE_BUDGET:g} s",
            CONVERGE_BUDGET,
        ),
        Line(
            "join storm: bytes per client / the room's final state, worst client",
            "storm:bytes.ratio",
            "storm-baseline:bytes.ratio",
            f"≤ {BYTES_BUDGET:g}",
            BYTES_BUDGET,
        ),
        Line(
            "join storm: frames per client, median",
            "storm:frames.median",
            "storm-baseline:frames.median",
        ),
    ]
    found += scale_lines() + sizing_lines()
    return found


#: bench/scale.py's deployments: 2 daphnes and 2 workers (prefork, 2 each),
#: and 1 daphne and 1 worker (solo), the baseline.
SCALE_SETUPS = {"multi": "2 daphnes, 2 workers of 2", "single": "1 daphne, 1 worker"}


def scale_lines() -> list[Line]:
    """bench/scale.py's figures, each deployment's on a line of its own."""
    found: list[Line] = []
    for setup, label in SCALE_SETUPS.items():
        at = f"scale [{label}]"
        found.append(
            Line(f"{at}: ramp, until every socket's row", f"scale.{setup}:ramp.seconds")
        )
        for what, room in (("", "a room of 10"), ("big.", "the room of 1,000")):
            for kind in ("join", "leave"):
                for stat in ("p50", "p99"):
                    found.append(
                        Line(
                            f"{at}: a {kind} seen by {room}, {stat}",
                            f"scale.{setup}:{what}{kind}.{stat}",
                        )
                    )
        found += [
            Line(f"{at}: presence frames missed", f"scale.{setup}:missed"),
            Line(
                f"{at}: rows = sockets = groups at the end (1 = yes)",
                f"scale.{setup}:end.consistent",
                better=HIGHER,
            ),
            Line(
                f"{at}: burst, joins applied",
                f"scale.{setup}:burst.joins_per_s",
                better=HIGHER,
            ),
            Line(
                f"{at}: burst, leaves applied",
                f"scale.{setup}:burst.leaves_per_s",
                better=HIGHER,
            ),
            Line(
                f"{at}: worker CPU time per join",
                f"scale.{setup}:worker.cpu_ms_per_join",
            ),
            Line(
                f"{at}: daphne memory per socket",
                f"scale.{setup}:daphne.kib_per_socket",
            ),
            Line(
                f"{at}: daphne CPU time per heartbeat",
                f"scale.{setup}:daphne.cpu_us_per_heartbeat",
            ),
            Line(
                f"{at}: daphne CPU time per presence frame",
                f"scale.{setup}:daphne.cpu_us_per_frame",
            ),
        ]
    return found


def sizing_lines() -> list[Line]:
    """bench/sizing.py's figures, per 10,000 sockets."""
    return [
        Line(
            "sizing: Redis, 10,000 sockets in rooms of 10",
            "sizing:redis.rooms.bytes_per_10k_sockets",
        ),
        Line(
            "sizing: Redis, 10,000 sockets in one room",
            "sizing:redis.one_room.bytes_per_10k_sockets",
        ),
        Line(
            "sizing: database, 10,000 presences (rooms of 10)",
            "sizing:database.present.kib_per_10k",
        ),
        Line(
            "sizing: database, once those 10,000 left",
            "sizing:database.left.kib_per_10k",
        ),
        Line(
            "sizing: add_presence as a worker runs it, one process",
            "sizing:database.joins_per_s",
            better=HIGHER,
        ),
    ]


#: The units of bench/scale.py's and bench/sizing.py's figures, by their key's end.
UNITS = {
    "seconds": "s",
    "p50": "ms",
    "p99": "ms",
    "missed": "frames",
    "consistent": "",
    "joins_per_s": "/s",
    "leaves_per_s": "/s",
    "cpu_ms_per_join": "ms",
    "kib_per_socket": "KiB",
    "cpu_us_per_heartbeat": "µs",
    "cpu_us_per_frame": "µs",
    "bytes_per_10k_sockets": "bytes",
    "kib_per_10k": "KiB",
}


def as_rows(prefix: str, figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Plain figures as the table's rows, keyed ``prefix:key``; text becomes detail."""
    rows = {}
    for key, value in figures.items():
        unit = UNITS.get(key.rsplit(".", 1)[-1])
        if unit is None or not isinstance(value, int | float):
            continue
        rows[f"{prefix}:{key}"] = {
            "key": key,
            "value": float(value),
            "p99": None,
            "unit": unit,
            "n": None,
            "detail": "",
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--skip-baseline", action="store_true", help="ours only, no 1.0.0"
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)",
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        parser.error(f"--only: no such part {', '.join(sorted(parts - set(PARTS)))}")
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    started = time.monotonic()
    ours: dict[str, dict[str, Any]] = {}
    baseline: dict[str, dict[str, Any]] = {}
    baseline_versions: dict[str, str] = {}
    smoke = ["--smoke"] if args.smoke else []
    e2e: dict[str, Any] = {"ours": {}, "baseline": {}, "notes": []}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as scratch:
        out = Path(scratch)
        pipelines = (("sqlite", "sqlite"), ("postgresql", database_url))
        for db, url in pipelines if "pipeline" in parts else ():
            sections = "socket" if db == "sqlite" else "socket,broker,worker,prune"
            found = ours_run(out / f"ours-{db}.json", url, sections, smoke)
            ours.update({f"{db}:{key}": row for key, row in found.items()})
            if not args.skip_baseline:
                sections = "socket" if db == "sqlite" else "socket,prune"
                found, versions = baseline_run(
                    out / f"baseline-{db}.json", url, sections, smoke
                )
                baseline_versions = versions or baseline_versions
                baseline.update({f"{db}:{key}": row for key, row in found.items()})
        if "e2e" in parts:
            e2e = e2e_run(out / "e2e.json", database_url, smoke, args.skip_baseline)
        ours.update({f"e2e:{key}": row for key, row in e2e["ours"].items()})
        baseline.update(
            {f"e2e-baseline:{key}": row for key, row in e2e["baseline"].items()}
        )
        storm = e2e_run(
            out / "storm.json", database_url, smoke, args.skip_baseline, "bench.storm"
        )
        ours.update({f"storm:{key}": row for key, row in storm["ours"].items()})
        baseline.update(
            {f"storm-baseline:{key}": row for key, row in storm["baseline"].items()}
        )
        e2e["notes"] = [*e2e.get("notes", []), *storm.get("notes", [])]
        if "scale" in parts:
            found = part_run("bench.scale", out / "scale.json", database_url, smoke)
            for setup, figures in found.get("setups", {}).items():
                ours.update(as_rows(f"scale.{setup}", figures))
                if figures.get("end.wrong"):
                    notes.append(
                        f"scale, {setup}: differed at the end: {figures['end.wrong']}"
                    )
            if found:
                notes += [f"scale: {found['shape']}", *found["notes"]]
        if "sizing" in parts:
            found = part_run("bench.sizing", out / "sizing.json", database_url, smoke)
            ours.update(as_rows("sizing", found.get("rows", {})))
            notes += [
                f"sizing, {key}: {value}"
                for key, value in found.get("rows", {}).items()
                if isinstance(value, str)
            ]
    table = compare(ours, baseline)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "seconds": round(time.monotonic() - started),
        "machine": machine(),
        "versions": {"ours": our_versions(), "1.0.0": baseline_versions},
        "notes": [*FAILURES, *e2e.get("notes", []), *notes],
        "table": table,
        "ours": ours,
        "1.0.0": baseline,
    }
    # A run of some parts only never replaces a whole one: it is named for them.
    name = "-".join(part for part in PARTS if part in parts)
    name = "smoke" if args.smoke else "latest" if parts == set(PARTS) else name
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    markdown = render(result)
    (args.out / f"{name}.md").write_text(markdown)
    print(markdown)
    if FAILURES:
        sys.exit(1)


FAILURES: list[str] = []


def run_logged(command: list[str], env: dict[str, str], cwd: Path) -> bool:
    """Run a section, its output to ours; a failure is noted and the run goes on.

    The table then lacks that section's figures, the note says why, and the
    command exits non-zero at the end.
    """
    what = " ".join(Path(c).name if "/" in c else c for c in command)
    print(f"==> {what}\n    ({env.get('DATABASE_URL', '')})", flush=True)
    code = subprocess.run(command, env=env, cwd=cwd).returncode
    if code != 0:
        FAILURES.append(f"FAILED (exit {code}): {what}, on {env.get('DATABASE_URL')}")
        print(f"==> {FAILURES[-1]}", flush=True)
    return code == 0


def ours_run(
    out: Path, url: str, sections: str, smoke: list[str]
) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    env.pop("CHANNELS_PRESENCE_BENCH_RUN", None)
    command = [sys.executable, "bench/pipeline.py", "--sections", sections]
    if not run_logged([*command, "--json", str(out), *smoke], env, ROOT):
        return {}
    return {row["key"]: row for row in json.loads(out.read_text())["rows"]}


def baseline_run(
    out: Path, url: str, sections: str, smoke: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    ensure_baseline_venv()
    run = uuid.uuid4().hex[:12]
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "BASELINE_RUN": run,
        "BASELINE_PREFIX": f"cp-baseline-{run}",
    }
    # Not the repository's root on the path: there, channels_presence is ours.
    env.pop("PYTHONPATH", None)
    try:
        ran = run_logged(
            [
                str(BASELINE_PYTHON),
                "run.py",
                "--sections",
                sections,
                "--json",
                str(out),
                *smoke,
            ],
            env,
            ROOT / "bench" / "baseline",
        )
    finally:
        delete_keys(f"cp-baseline-{run}")
    if not ran:
        return {}, {}
    found = json.loads(out.read_text())
    return {row["key"]: row for row in found["rows"]}, found["versions"]


def part_run(module: str, out: Path, url: str, smoke: list[str]) -> dict[str, Any]:
    """Run ``python -m module --json out``; what it wrote, or {} if it failed."""
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    env.pop("CHANNELS_PRESENCE_BENCH_RUN", None)
    if not run_logged(
        [sys.executable, "-m", module, "--json", str(out), *smoke], env, ROOT
    ):
        return {}
    found: dict[str, Any] = json.loads(out.read_text())
    return found


def e2e_run(
    out: Path,
    url: str,
    smoke: list[str],
    skip_baseline: bool,
    module: str = "bench.e2e",
) -> dict[str, Any]:
    """Run a websocket section (bench.e2e, bench.storm), ours and 1.0.0's."""
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", module, "--json", str(out), *smoke]
    if not skip_baseline:
        ensure_baseline_venv()
        command += ["--baseline-python", str(BASELINE_PYTHON)]
    if not run_logged(command, env, ROOT):
        return {"ours": {}, "baseline": {}, "notes": []}
    found: dict[str, Any] = json.loads(out.read_text())
    return found


def ensure_baseline_venv() -> None:
    """Make bench/.baseline-venv with 1.0.0's stack, again only when it changes."""
    stamp = BASELINE_VENV / ".installed"
    wanted = hashlib.sha256("\n".join(BASELINE_PACKAGES).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    print(f"==> creating the 1.0.0 baseline virtualenv in {BASELINE_VENV}", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(BASELINE_VENV)
    subprocess.run(
        [str(BASELINE_PYTHON), "-m", "pip", "install", "--quiet", *BASELINE_PACKAGES],
        check=True,
    )
    stamp.write_text(wanted)


def compare(
    ours: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The table's rows: each line whose figure of ours was measured."""
    table = []
    for line in lines():
        mine = ours.get(line.ours)
        if mine is None or mine["value"] is None:
            continue
        theirs = baseline.get(line.baseline) if line.baseline else None
        value = float(mine["value"])
        other = float(theirs["value"]) if theirs and theirs["value"] else None
        if other is not None and math.isnan(other):
            other = None  # not reached (1.0.0's storm never converges): see the notes
        ratio = None
        if other is not None and value > 0:
            ratio = other / value if line.better == LOWER else value / other
        holds = None
        if line.limit is not None:
            holds = value <= line.limit if line.better == LOWER else value >= line.limit
            if line.no_worse and ratio is not None:
                holds = holds and ratio >= 1
        table.append(
            {
                "figure": line.label,
                "budget": line.budget,
                "unit": mine["unit"],
                "ours": value,
                "ours_p99": mine.get("p99"),
                "1.0.0": other,
                "1.0.0_p99": theirs.get("p99") if theirs else None,
                "ratio": ratio,
                "holds": holds,
                "detail": mine.get("detail", ""),
            }
        )
    return table


def render(result: dict[str, Any]) -> str:
    """The table as Markdown, with the machine and the versions above it."""
    machine_ = result["machine"]
    ours_v = ", ".join(f"{k} {v}" for k, v in result["versions"]["ours"].items())
    base_v = ", ".join(f"{k} {v}" for k, v in result["versions"]["1.0.0"].items())
    out = [
        f"# channels_presence benchmarks{' (smoke)' if result['smoke'] else ''}",
        "",
        f"{result['date']}; {machine_['cpu']}, {machine_['cores']} cores, "
        f"Python {machine_['python']}; {result['seconds']} s.",
        "",
        f"- ours: {ours_v}",
        f"- 1.0.0: {base_v or 'not run'}",
        "",
        "Latencies are medians per call (p99 in brackets); ratio = how many "
        "times better ours is than 1.0.0 for the same work (its time over "
        "ours, or our rate over its). holds judges the median (p99 for end "
        "to end).",
        "",
        "| figure | budget | ours | 1.0.0 | ratio | holds |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["table"]:
        holds = {None: "", True: "yes", False: "**NO**"}[row["holds"]]
        ratio = f"{row['ratio']:,.1f}x" if row["ratio"] is not None else ""
        out.append(
            f"| {row['figure']} | {row['budget']} "
            f"| {_figure(row['ours'], row['ours_p99'], row['unit'])} "
            f"| {_figure(row['1.0.0'], row['1.0.0_p99'], row['unit'])} "
            f"| {ratio} | {holds} |"
        )
    if result["notes"]:
        out += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(out) + "\n"


def _figure(value: float | None, p99: float | None, unit: str) -> str:
    if value is None:
        return "—"
    text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if p99 is not None:
        text += f" ({p99:,.2f})" if abs(p99) < 100 else f" ({p99:,.0f})"
    return f"{text} {unit}"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def our_versions() -> dict[str, str]:
    names = [
        "django-channels-presence",
        "Django",
        "channels",
        "channels-redis",
        "celery",
        "redis",
        "psycopg",
        "daphne",
        "websockets",
    ]
    return {name: version(name) for name in names}


if __name__ == "__main__":
    main()
