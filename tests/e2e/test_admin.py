"""The coordinator's admin commands against the real federation: make wait reattaches to a job and survives a
server restart, make abort stops one, a timeout says how to follow on, a failed job shows each site's reason, and a
login that fails fast is tried again.

Jobs are the real CXR job built with the tiny profile (tests/tiny_cxr_profile.json); the server restart is the
operator's own (scripts/control.sh stop / start flare-server)."""

import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from nvflare.fuel.flare_api import flare_api

from .conftest import REPO, admin_kit, approve, run

sys.path.insert(0, str(REPO / "custom"))
from ops import flare_admin  # noqa: E402

TINY = json.loads((REPO / "tests" / "tiny_cxr_profile.json").read_text())  # 2 rounds, 32 px, no site resources


def build(env, tmp_path: Path, profile: dict, meta: dict = None) -> Path:
    """A ready job folder of the CXR job built with ``profile``; ``meta`` is merged into its meta.json afterwards."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    overlay = tmp_path / "profile.json"
    overlay.write_text(json.dumps(profile))
    job = tmp_path / "job"
    shutil.copytree(run("build_job.sh", "cxr_classification", str(overlay), env=env).stdout.strip(), job)
    if meta:
        (job / "meta.json").write_text(json.dumps({**json.loads((job / "meta.json").read_text()), **meta}))
    return job


def submit(env, job: Path, wait: str = "", **extra):
    approve(env, job)
    result = run("submit.sh", str(job), "", wait, env={**env, **extra}, check=False)
    return result, re.search(r"job id (\S+)", result.stdout).group(1)


def progress_lines(out: str) -> list:
    return [line for line in out.splitlines() if line.startswith("  ")]


def test_wait_reattaches_to_a_job_and_its_timeout_says_how_to_follow_on(deployed, env, tmp_path):
    _, job_id = submit(env, build(env, tmp_path, {**TINY, "server": {"num_rounds": 1}}))  # the shortest job
    early = run("wait.sh", job_id, env={**env, "TIMEOUT": "2"}, check=False)
    assert early.returncode == 2, early.stdout + early.stderr
    assert re.search(rf"job {job_id} is still (SUBMITTED|DISPATCHED|RUNNING) after \d+ s; "
                     rf"make wait JOB_ID={job_id} follows it again", early.stderr)  # fmt: skip

    waited = run("wait.sh", job_id, env=env, check=False)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert waited.stdout.rstrip().endswith(f"job {job_id}: FINISHED:COMPLETED")
    lines = progress_lines(waited.stdout)
    assert any(line.endswith("Round 0 finished.") for line in lines), waited.stdout
    assert not [line for line, n in Counter(lines).items() if n > 1], waited.stdout


def test_a_job_the_sites_refuse_shows_each_sites_reason(deployed, env, tmp_path):
    result, job_id = submit(env, build(env, tmp_path, {**TINY, "meta": {"scope": ""}}), "1")
    assert result.returncode == 1
    for site in ("hospital_a", "hospital_b"):
        assert f"  {site}: privacy scope '' is not allowed\n" in result.stdout, result.stdout
    assert f"job {job_id}: FINISHED:FAILED_TO_RUN" in result.stdout
    assert f"job {job_id} ended FINISHED:FAILED_TO_RUN: it never started: the sites or the server refused it" in (
        result.stderr
    )


def test_a_trainers_data_error_is_reported_by_its_site(deployed, env, tmp_path):
    val = Path(env["HCLS_WORKSPACE"]) / "data" / "hospital_b" / "chestxray14" / "val.csv"
    original = val.read_text()
    val.write_text(original.splitlines(keepends=True)[0])  # the header only: hospital_b's trainer stops
    try:
        result, job_id = submit(env, build(env, tmp_path, TINY), "1", TIMEOUT="300")
    finally:
        val.write_text(original)
    assert result.returncode == 1, result.stdout + result.stderr
    status = re.search(rf"job {job_id}: (FINISHED:\S+)\n", result.stdout).group(1)
    assert status != "FINISHED:COMPLETED" and f"job {job_id} ended {status}" in result.stderr
    blamed = [line for line in result.stdout.splitlines() if line.startswith("  server: ")]
    assert blamed and all("hospital_b" in line for line in blamed), result.stdout
    # the sites keep their job logs (allow_log_streaming false): the operator is told where hospital_b's is
    assert (f"  hospital_b: its job log stays on the site (not streamed to the server): {job_id}/log.txt "
            "in its workspace") in result.stdout  # fmt: skip
    assert "  hospital_a: " not in result.stdout


def test_wait_follows_a_job_across_a_server_restart_and_abort_ends_it(deployed, env, tmp_path):
    # min_clients 3 of 2 sites: the job stays SUBMITTED (the scheduler retries for minutes), whatever the restart
    # does to running jobs; after the restart it is the same job, SUBMITTED again, and followed on.
    _, job_id = submit(env, build(env, tmp_path, TINY, meta={"min_clients": 3}))
    follower = subprocess.Popen([str(REPO / "scripts" / "wait.sh"), job_id], env={**env, "TIMEOUT": "300"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()
    seen = []

    def until(text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in seen):
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s: {seen}"
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass

    try:
        until(f"job {job_id}: SUBMITTED", 30)
        run("control.sh", "stop", "flare-server", env=env)
        until("lost the server (", 30)
        run("control.sh", "start", "flare-server", env=env)
        until("reconnected", 90)
        aborted = run("abort.sh", job_id, env=env)
        assert f"job {job_id}: abort requested (it was SUBMITTED)" in aborted.stdout
        until(f"job {job_id}: FINISHED:ABORTED", 30)
        follower.wait(timeout=30)
    finally:
        follower.kill()
    until(f"job {job_id} ended FINISHED:ABORTED: it was aborted", 5)
    assert follower.returncode == 1
    assert sum("lost the server" in line for line in seen) == 1 and sum(line == "reconnected\n" for line in seen) == 1
    assert sum(f"job {job_id}: SUBMITTED" in line for line in seen) == 1, seen  # not reprinted after reconnecting
    again = run("abort.sh", job_id, env=env, check=False)
    assert again.returncode == 1 and f"job {job_id} already ended FINISHED:ABORTED: nothing to abort" in again.stderr


def test_a_login_that_fails_fast_is_tried_again_and_then_named(deployed, env, monkeypatch):
    # The failure seen once in a bench run: the server's answer to the identity challenge carried no certificate.
    real = flare_api.new_secure_session
    failures = []

    def failing(times: int):
        def new_secure_session(*args, **kwargs):
            if len(failures) < times:
                failures.append(time.monotonic())
                raise TypeError("'None' is not an instance of 'bytes'")
            return real(*args, **kwargs)

        return new_secure_session

    monkeypatch.setattr(flare_api, "new_secure_session", failing(1))
    with flare_admin.session(admin_kit(env)) as sess:
        assert isinstance(sess.list_jobs(), list)  # the second try logged in to the real server
    assert len(failures) == 1

    failures.clear()
    monkeypatch.setattr(flare_api, "new_secure_session", failing(99))
    with pytest.raises(flare_admin.AdminError, match=r"\(try 3: TypeError: 'None' is not an instance of 'bytes'\)"):
        flare_admin.open_session(admin_kit(env))
    assert len(failures) == flare_admin.OPEN_TRIES
    assert failures[-1] - failures[0] >= (flare_admin.OPEN_TRIES - 1) * flare_admin.OPEN_PAUSE_S
