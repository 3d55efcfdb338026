"""`make upgrade` on the SSH test hosts (conftest.py): a patch release of a pinned package, pytest 9.0.2 -> 9.0.3,
reaches every native participant as a new venv that its host builds from wheels sent there (the hosts have no
index): every host builds first, then the participants restart from it one at a time, the server first. A plain
deploy afterwards keeps the new venvs (changed=0), and a job trains on them. Removing venvs/current (the rollback
to the venv the host had) during that job: a site's deploy is refused, naming the job, and the next deploy, once
the job has ended, restarts every participant from its own venv: an environment change restarts a participant only
between jobs.

The pins are requirements.txt's with the CPU torch of the test image (conftest TEST_TORCH, a 190 MB wheel instead of
the ~5 GB CUDA build), so the new venvs hold what the image holds. The container site (if any) is named and left
as it is: its environment is its image."""

import json
import re
import subprocess
import time

from .conftest import HOSTS, LONG_PROFILE, REPO, TEST_TORCH, command, on_host, recap, round_record, run

PATCH = ("pytest==9.0.2", "pytest==9.0.3")
VENVS = "/opt/hcls-flare/venvs"


def submit(deployed, tmp_path, layer: dict) -> tuple[subprocess.Popen, str]:
    """Submit the tiny CXR job with profile LAYER (approved at every site: conftest), following it (WAIT=1)."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(layer))
    cmd = command("submit.sh", "cxr_classification", profile, "1", env=deployed["env"], coordinator=True)
    proc = subprocess.Popen(cmd, env=deployed["env"], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if match := re.search(r"job id (\S+)", line):
            return proc, match.group(1)
    raise AssertionError(f"no job id from submit.sh: {proc.wait()}")


def participant_path(deployed, name: str) -> str:
    """PATH of the participant's main process (its unit's), which flarectl.sh starts with its venv's bin first."""
    pid = on_host(deployed, name, f"systemctl show -p MainPID --value hcls-flare-{name}.service").stdout.strip()
    environ = on_host(deployed, name, f"cat /proc/{pid}/environ").stdout
    return next(v for v in environ.split("\0") if v.startswith("PATH=")).removeprefix("PATH=")


def test_upgrade_rolls_a_patch_release_out_one_participant_at_a_time_between_jobs(deployed, tmp_path):
    env = deployed["env"]
    pinned = (REPO / "requirements.txt").read_text()
    assert PATCH[0] in pinned.splitlines(), f"requirements.txt no longer pins {PATCH[0]}: choose another patch release"
    pins = tmp_path / "requirements.txt"
    pins.write_text(pinned.replace(PATCH[0], PATCH[1]))
    upgrade_env = {**env, "HCLS_REQUIREMENTS": str(pins), "TORCH_REQUIREMENT": TEST_TORCH, "TIMEOUT": "900"}
    native = [name for name in HOSTS if name != deployed["container_site"]]
    before = {name: participant_path(deployed, name) for name in native}

    upgraded = run("upgrade.sh", env=upgrade_env, timeout=1500)
    print(upgraded.stdout)
    env_id = re.search(r"^environment (\w+): \d+ wheels", upgraded.stdout, re.M).group(1)
    assert f"environment {env_id}: building it on the native participants' hosts" in upgraded.stdout
    for name in native:
        assert f"{name}: runs environment {env_id} ({name} restarted" in upgraded.stdout, upgraded.stdout
    if deployed["container_site"]:
        assert f"{deployed['container_site']}: container runtime" in upgraded.stdout
    order = [upgraded.stdout.index(f"{name}: runs environment") for name in native]
    assert order == sorted(order) and native[0] == "flare-server"  # the server first, then the sites in turn
    for name in native:
        assert on_host(deployed, name, f"readlink {VENVS}/current").stdout.strip() == env_id
        version = f"{VENVS}/{env_id}/bin/python -c 'import importlib.metadata as m; print(m.version(\"pytest\"))'"
        assert on_host(deployed, name, version).stdout.strip() == PATCH[1].split("==")[1]
        assert participant_path(deployed, name).startswith(f"{VENVS}/{env_id}/bin:"), name
        on_host(deployed, name, f"test -f {VENVS}/{env_id}/.hcls-complete")  # built to the end
        wheels = on_host(deployed, name, "ls /opt/hcls-flare/wheelhouse").stdout.split()
        assert "pytest-9.0.3-py3-none-any.whl" in wheels and not any(w.startswith("pytest-9.0.2") for w in wheels)

    # Plain deploys keep the participants on venvs/current.
    again = run("deploy.sh", env=env)
    assert all(counts == (0, 0, 0) for counts in recap(again.stdout).values()), again.stdout

    # A job trains on the new venvs; a site's rollback deployed meanwhile waits for its end. The job (longer than the
    # deploy) is aborted once a round with both sites finished after the refusal.
    job, job_id = submit(deployed, tmp_path, LONG_PROFILE)
    site = native[1]
    try:
        until(lambda: job_id in on_host(deployed, site, f"/opt/hcls-flare/{site}/flarectl.sh jobs").stdout)
        for name in native:
            on_host(deployed, name, f"rm {VENVS}/current")
        refused = run("deploy.sh", site, env=env, check=False)
        said = " ".join((refused.stdout + refused.stderr).split())
        assert refused.returncode != 0 and f"{site} runs job {job_id}: not restarted" in said, refused.stdout[-3000:]

        def finished() -> list[dict]:
            return [r for r in round_record(deployed, job_id) if r.get("finished")]

        after = len(finished())
        until(lambda: len(finished()) > after, timeout=300)
        assert all(r["missing"] == [] and len(r["contributed"]) == 2 for r in finished())
    finally:
        run("abort.sh", job_id, env=env, coordinator=True, check=False)
        out, _ = job.communicate(timeout=300)
    # Round AFTER (0-based) is the first that finished after the refusal: round 0 when the refusal came that early.
    assert "FINISHED:ABORTED" in out and f"Round {after} finished" in out, out[-3000:]
    for name in native:
        assert participant_path(deployed, name).startswith(f"{VENVS}/{env_id}/bin:"), name  # not restarted in the job
    until(lambda: on_host(deployed, site, f"/opt/hcls-flare/{site}/flarectl.sh jobs").stdout.strip() == "")

    # Now idle: the rollback is applied, each participant runs from the venv its host had.
    back = run("deploy.sh", env=env)
    for name in native:
        assert f"{name} restarted with its new files" in back.stdout, back.stdout
        assert participant_path(deployed, name) == before[name]


def until(probe, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(1)
