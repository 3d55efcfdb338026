"""The benchmark's smoke run (`make bench ONLY=<row> QUICK=1`): each row still produces its numbers. Benchmarks are
not tests; the figures themselves are not checked here (README "Measured", bench/results/)."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bench(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "INVENTORY")}
    env.update(HCLS_WORKSPACE=str(tmp_path / "workspace"), BENCH_RESULTS=str(tmp_path / "results"))
    return subprocess.run(["make", "-s", "bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_an_unknown_row_is_refused(tmp_path):
    run = bench(tmp_path, "ONLY=nothing")
    assert run.returncode != 0 and "ONLY=nothing: no row nothing (rows: operations" in run.stderr, run.stderr


def test_the_operations_row_measures_provision_and_deploys(tmp_path):
    run = bench(tmp_path, "ONLY=operations", "QUICK=1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "bench.json").read_text())["rows"]
    assert [r["what"].split(",")[0] for r in rows] == [
        "`make provision`", "first `make deploy`", "no-op `make deploy` (changed=0)"]  # fmt: skip
    assert all(r["value"] > 0 and r["row"] == "operations" for r in rows), rows
    assert [r["target"] for r in rows] == ["", "<= 30 s", "<= 15 s"]
    assert (tmp_path / "results" / "bench.md").read_text().strip() in run.stdout  # printed as written
