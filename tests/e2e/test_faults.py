"""Faults on the real local federation (conftest.py): real processes, real signals, the tiny CXR job.

* a site's trainer killed (``kill -9``) mid-round, then the other site's trainer stopped (``SIGSTOP``): each costs
  its site that round only; the round aggregates the other site, the site takes part again the round after;
* the server killed (``kill -9``) mid-round and again as it persists the global model: the kit's start loop
  starts it again, ``job_recovery`` runs the job again under its id, and ``hcls.fedavg`` continues after the last
  persisted round: every round is aggregated once and the best model so far is kept.

Each test checks the job's final status, the rounds it recorded and that the fetched best model loads. The
measured recovery times are printed (``pytest -s``).
"""

import json
import os
import re
import signal
import time
from datetime import datetime
from pathlib import Path

import psutil
import torch
from monai.networks.nets import DenseNet121

from .conftest import approve, run

TINY = json.loads((Path(__file__).resolve().parents[1] / "tiny_cxr_profile.json").read_text())
HEARTBEAT_S = 10  # a stopped trainer is given up after this many seconds of silence


def profile(tmp_path: Path, name: str, server: dict, client: dict | None = None) -> str:
    """The tiny CXR profile with ``server`` and ``client`` settings over it, as a profile file."""
    layer = {**TINY, "server": {**TINY["server"], **server}, "client": {**TINY["client"], **(client or {})}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(layer))
    return str(path)


def submit(env: dict, profile_file: str) -> str:
    approve(env, "cxr_classification", profile_file)
    out = run("submit.sh", "cxr_classification", profile_file, env=env).stdout
    return re.search(r"job id (\S+)", out).group(1)


def server_ws(env: dict) -> Path:
    return Path(env["HCLS_WORKSPACE"]) / "local" / "flare-server"


def rounds(env: dict, job_id: str) -> dict:
    path = server_ws(env) / job_id / "app_server" / "rounds.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or moved aside during a restart
        return {"rounds": [], "restarts": []}


def job_status(env: dict, job_id: str) -> str:
    meta = server_ws(env) / "storage" / "jobs-storage" / job_id / "meta"
    return json.loads(meta.read_text())["status"]


def job_log(env: dict, job_id: str) -> str:
    log = server_ws(env) / job_id / "log.txt"
    return log.read_text() if log.is_file() else ""


def site_log(env: dict, site: str, job_id: str) -> str:
    log = Path(env["HCLS_WORKSPACE"]) / "local" / site / job_id / "log.txt"
    return log.read_text() if log.is_file() else ""


def poll(what: str, check, timeout: float, every: float = 0.2):
    """``check()``'s first truthy value within ``timeout`` seconds, else fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def finished_round(env, job_id, round_no):
    return next((r for r in rounds(env, job_id)["rounds"] if r["round"] == round_no and r["finished"]), None)


def started_round(env, job_id, round_no):
    return next((r for r in rounds(env, job_id)["rounds"] if r["round"] == round_no), None)


def trainer(env: dict, site: str, job_id: str, since: float = 0.0):
    """The site's trainer process for the job (the Client API script), started after ``since`` (epoch s)."""
    run_dir = str(Path(env["HCLS_WORKSPACE"]) / "local" / site / job_id)
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "create_time", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "custom/cxr_classification.py" in cmdline and (proc.info["cwd"] or "").startswith(run_dir):
            if proc.info["create_time"] >= since and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return proc
    return None


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def wait_completed(env, job_id, timeout=300) -> None:
    poll(f"job {job_id} to finish", lambda: job_status(env, job_id).startswith("FINISHED"), timeout, every=1)
    assert job_status(env, job_id) == "FINISHED:COMPLETED", job_log(env, job_id)[-4000:]


def fetch_and_load(env, job_id, cross_site=True) -> tuple[dict, dict]:
    """Fetch the finished job with the real tooling (the server keeps no run folder of a finished job) and load
    its best model strictly: (best_model.json, the server's rounds.json)."""
    run("fetch_model.sh", "cxr_classification", job_id, env=env)
    models = Path(env["MODELS_DIR"]) / "cxr_classification"
    DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).load_state_dict(
        torch.load(models / "best_model.pt", weights_only=True), strict=True
    )
    if cross_site:  # every site's model on every site's data, whatever happened during training
        assert set(json.loads((models / "cross_site_val.json").read_text())) == {"hospital_a", "hospital_b"}
    info = json.loads((models / "best_model.json").read_text())
    assert info["job_id"] == job_id
    return info, json.loads((models / "rounds.json").read_text())


def test_a_killed_or_stopped_trainer_costs_its_site_one_round(deployed, env, tmp_path):
    no_cross_site = [{"id": "cross_site_validation", "remove": True}]  # training only: CI time
    job_id = submit(env, profile(tmp_path, "sites", {"num_rounds": 3, "min_clients": 1, "train_timeout": 90,
                                                     "workflows": no_cross_site},
                                 {"trainer_heartbeat_timeout": HEARTBEAT_S}))  # fmt: skip

    # Round 0: hospital_b's trainer is killed; the round goes on with hospital_a.
    killed = poll("hospital_b's round-0 trainer", lambda: trainer(env, "hospital_b", job_id), 120)
    first_a = poll("hospital_a's trainer", lambda: trainer(env, "hospital_a", job_id), 60)
    killed.send_signal(signal.SIGKILL)
    killed_at = time.time()
    round0 = poll("round 0", lambda: finished_round(env, job_id, 0), 120)
    assert (round0["contributed"], round0["missing"], round0["aggregated"]) == (["hospital_a"], ["hospital_b"], True)

    # Round 1: hospital_b is back; hospital_a's trainer hangs (SIGSTOP) and is dropped after its heartbeat timeout.
    poll("round 1 to start", lambda: started_round(env, job_id, 1), 60)
    poll("hospital_a's round-1 trainer to take its task", lambda: site_log(env, "hospital_a", job_id).count(
        "sending TASK_READY for 'train'") == 2, 120)  # after its HELLO: from now on its heartbeats count
    stopped = trainer(env, "hospital_a", job_id)
    assert stopped.pid == first_a.pid  # one trainer per site and job, kept across tasks
    stopped.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    poll("a new trainer for hospital_b", lambda: trainer(env, "hospital_b", job_id, since=killed_at), 60)
    round1 = poll("round 1", lambda: finished_round(env, job_id, 1), 90)
    dropped_after = epoch(round1["finished"]) - stopped_at
    assert (round1["contributed"], round1["missing"]) == (["hospital_b"], ["hospital_a"])
    assert dropped_after < HEARTBEAT_S + 30, dropped_after
    poll("the stopped trainer to be ended by its site", lambda: not psutil.pid_exists(stopped.pid)
         or stopped.status() == psutil.STATUS_ZOMBIE, 60)  # fmt: skip

    # Round 2: both sites again; then cross-site validation and the fetch.
    poll("round 2", lambda: finished_round(env, job_id, 2), 120)
    log = job_log(env, job_id)
    assert "round 0: hospital_b missing, aggregated 1 of 2" in log and "round 2: aggregated 2 of 2" in log
    wait_completed(env, job_id)
    info, record = fetch_and_load(env, job_id, cross_site=False)
    assert [(r["round"], r["contributed"]) for r in record["rounds"]] == [
        (0, ["hospital_a"]), (1, ["hospital_b"]), (2, ["hospital_a", "hospital_b"])]  # fmt: skip
    assert record["min_clients"] == 1 and record["restarts"] == []
    assert info["round"] in (1, 2)
    rejoined_after = epoch(round1["finished"]) - killed_at
    print(f"\nkilled trainer: its site contributed again {rejoined_after:.0f}s after the kill; "
          f"stopped trainer: dropped {dropped_after:.0f}s after SIGSTOP (heartbeat timeout {HEARTBEAT_S}s)")  # fmt: skip


def kill_server(env) -> float:
    pid = int((server_ws(env) / "pid.fl").read_text())
    os.kill(pid, signal.SIGKILL)
    return time.time()


def test_a_killed_server_continues_the_job_from_its_last_round(deployed, env, tmp_path):
    job_id = submit(env, profile(tmp_path, "server", {"num_rounds": 2, "train_timeout": 120}))

    # Mid-round 1 (round 0 persisted): kill the server; the kit's loop starts it again and the job continues.
    poll("round 1 to start", lambda: started_round(env, job_id, 1), 180)
    killed_at = kill_server(env)
    resumed = poll("the job to run again", lambda: rounds(env, job_id)["restarts"], 180, every=0.5)
    assert resumed[0]["resumed_from_round"] == 1
    again = poll("round 1 to start again", lambda: started_round(env, job_id, 1), 120)
    training_again = epoch(again["started"]) - killed_at

    # As it persists the global model of round 1 (the last): kill it again.
    persists = job_log(env, job_id).count("Start persist model on server.")
    poll("the server to persist round 1", lambda: job_log(env, job_id).count("Start persist model on server.")
         > persists, 180, every=0.05)  # fmt: skip
    kill_server(env)
    best_before = json.loads((server_ws(env) / job_id / "app_server" / "best_metric.json").read_text())  # of round 1
    poll("the job to run again", lambda: len(rounds(env, job_id)["restarts"]) == 2, 180, every=0.5)

    log = job_log(env, job_id)  # the whole run's log, from before the restarts too
    assert "round 0: aggregated 2 of 2" in log and "continuing after a server restart from round 1" in log
    wait_completed(env, job_id)
    info, record = fetch_and_load(env, job_id)
    assert [r["round"] for r in record["rounds"]] == [0, 1]  # each round aggregated once
    assert all(r["aggregated"] and r["contributed"] == ["hospital_a", "hospital_b"] for r in record["rounds"])
    assert record["restarts"][0]["resumed_from_round"] == 1
    assert record["restarts"][1]["resumed_from_round"] in (1, 2)  # killed before or after the model was on disk
    assert info["round"] == 1 and info["value"] >= best_before["raw_value"] - 1e-9  # the best is kept
    print(f"\nserver kill -9 mid-round: training again (round 1 restarted) {training_again:.0f}s after the kill")
