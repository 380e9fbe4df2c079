"""The benchmarks' smoke mode, run for real so that the scripts never rot.

``bench/run.py --smoke`` runs every section (ours on SQLite and PostgreSQL,
1.0.0 in its own virtualenv, end to end on daphne, many daphnes and workers,
the sizing figures) with tiny sizes. Only that
it finishes and writes what it promises is checked: figures are never judged
here (a benchmark prints them; no test asserts a time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs_postgres = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres"),
    reason="the benchmarks need PostgreSQL; they run in the PostgreSQL pass",
)


@needs_postgres
def test_smoke_run_writes_the_table_with_ours_and_1_0_0_side_by_side(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["smoke"] is True
    assert {"cpu", "cores", "python"} <= result["machine"].keys()
    assert result["versions"]["1.0.0"]["django-channels-presence"] == "1.0.0"
    assert result["versions"]["1.0.0"]["Django"] == "3.2.25"
    figures = {row["figure"] for row in result["table"]}
    for db in ("sqlite", "postgresql"):
        assert f"[{db}] heartbeat, sync consumer, inside the touch interval" in figures
        assert f"[{db}] join, async consumer (Celery mode)" in figures
    assert "broker: touch tasks, TOUCH_INTERVAL=0" in figures
    assert "worker: touch_presences, 1,000 presences" in figures
    assert "prune, wall time (half stale)" in figures
    assert "end to end: a join seen by the room, p99" in figures
    by_figure = {row["figure"]: row for row in result["table"]}
    # Every socket-side line, the prune and end to end have 1.0.0's figure.
    for figure in (
        "[postgresql] join, sync consumer (Celery mode)",
        "[sqlite] leave, sync consumer (Celery mode)",
        "prune, queries",
        "end to end: a leave seen by the room, p50",
    ):
        assert by_figure[figure]["1.0.0"] is not None, figure
        assert by_figure[figure]["ratio"] is not None, figure
    # Events reached the room's clients, on both sides. How many arrived
    # within the settle time is a figure of a loaded machine, not a check.
    for side, prefix in (("ours", "e2e"), ("1.0.0", "e2e-baseline")):
        for kind in ("join", "leave"):
            assert result[side][f"{prefix}:{kind}.seen"]["value"] > 0, (side, kind)
            assert result[side][f"{prefix}:{kind}.missed"]["value"] >= 0
    # Many servers and workers (bench/scale.py), and the sizing figures
    # (bench/sizing.py): present, and the rows matched the sockets and the
    # groups at the end of both deployments.
    for setup in ("2 daphnes, 2 workers of 2", "1 daphne, 1 worker"):
        assert f"scale [{setup}]: a join seen by a room of 10, p99" in figures
        assert f"scale [{setup}]: a leave seen by the room of 1,000, p50" in figures
        assert f"scale [{setup}]: burst, joins applied" in figures
        consistent = by_figure[
            f"scale [{setup}]: rows = sockets = groups at the end (1 = yes)"
        ]
        assert consistent["ours"] == 1, result["notes"]
    assert "sizing: Redis, 10,000 sockets in rooms of 10" in figures
    assert "sizing: database, 10,000 presences (rooms of 10)" in figures
    markdown = (tmp_path / "smoke.md").read_text()
    assert "| figure | budget | ours | 1.0.0 | ratio | holds |" in markdown
    assert "end to end: a join seen by the room, p99" in markdown


def test_the_end_to_end_budget_holds_only_when_no_worse_than_1_0_0():
    # "p99 ≤ 50 ms, and no worse than 1.0.0's in the same run".
    sys.path.insert(0, str(ROOT))
    from bench.run import compare

    def row(value: float) -> dict[str, object]:
        return {"value": value, "unit": "ms"}

    def holds(ours: float, theirs: float) -> bool:
        (line,) = [
            line
            for line in compare(
                {"e2e:join.p99": row(ours)}, {"e2e-baseline:join.p99": row(theirs)}
            )
            if line["figure"].endswith("join seen by the room, p99")
        ]
        return bool(line["holds"])

    assert holds(30, 40)
    assert not holds(30, 20)
    assert not holds(60, 80)
