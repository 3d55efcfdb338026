"""Faults on the SSH test hosts (conftest.py), with real processes and signals: systemd brings back a participant
whose every NVFlare process was killed, and a whole host after its pid namespace was killed (a reboot); while a
tiny CXR job trains across the hosts' addresses, a deploy killed after it wrote a new configuration is not
applied and the next deploy is refused naming the job, which completes (its best model is fetched); then the
new configuration is applied, a deploy with nothing to apply changes nothing, and FORCE=1 restarts a site
during a job."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml
from conftest import HOSTS, REPO, command, netns, recap, run, write_inventory
from monai.networks.nets import DenseNet121

TINY_PROFILE = json.loads((REPO / "tests" / "tiny_cxr_profile.json").read_text())  # 2 rounds, 32 px
STATUS = re.compile(r"(\S+) running \(pid (\d+)\), (\d+) restarts")
# Aborts a job through the FLARE API with the admin kit: python ABORT KIT JOB_ID.
ABORT = """
import sys
from ops.flare_admin import session
with session(sys.argv[1]) as sess:
    sess.abort_job(sys.argv[2])
"""


def on_host(deployed, name: str, cmd: str, check=True) -> subprocess.CompletedProcess:
    """CMD in a root shell on host NAME, over SSH."""
    result = subprocess.run(
        ["ssh", "-i", deployed["key"], "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "LogLevel=ERROR",
         "-o", "UserKnownHostsFile=/dev/null", f"root@{HOSTS[name]}", cmd], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 or not check, f"{name}: {cmd}: {result.stdout}{result.stderr}"
    return result


def flarectl(deployed, name: str, *args, check=True) -> subprocess.CompletedProcess:
    return on_host(deployed, name, f"/opt/hcls-flare/{name}/flarectl.sh {' '.join(args)}", check=check)


def status(deployed, name: str) -> tuple[int, int]:
    """(pid, restarts) of a running participant, from flarectl.sh status on its host."""
    out = flarectl(deployed, name, "status").stdout
    _, pid, restarts = STATUS.search(out).groups()
    return int(pid), int(restarts)


def registered_since(deployed, name: str, since: float) -> bool:
    """Whether participant NAME's log.txt says it registered with the server at or after time SINCE."""
    log = deployed["root"] / name / "opt" / "hcls-flare" / name / "log.txt"
    text = log.read_text(errors="replace") if log.exists() else ""
    stamps = re.findall(rf"^(\S+ \S+),\d+ - .*Successfully registered client:{name} ", text, re.M)
    return any(datetime.strptime(s, "%Y-%m-%d %H:%M:%S").timestamp() >= int(since) for s in stamps)


def until(what: str, probe, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(every)
    return result


def nvflare_pids(index: int) -> list[str]:
    """Every NVFlare process of a host: the pids of its namespace whose command line names nvflare."""
    pids = []
    for pid in subprocess.run(["ip", "netns", "pids", netns(index)], capture_output=True, text=True).stdout.split():
        try:
            if b"nvflare" in open(f"/proc/{pid}/cmdline", "rb").read():
                pids.append(pid)
        except OSError:
            pass
    return pids


def submit(deployed, tmp_path, wait: bool) -> tuple[subprocess.Popen, str]:
    """Submit the tiny CXR job in the background: (the submitting process, the job id)."""
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps(TINY_PROFILE))
    cmd = command("submit.sh", "cxr_classification", profile, "1" if wait else "", env=deployed["env"], coordinator=True)
    proc = subprocess.Popen(cmd, env=deployed["env"], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if match := re.search(r"job id (\S+)", line):
            return proc, match.group(1)
    raise AssertionError(f"no job id from submit.sh: {proc.wait()}")


def test_killed_participant_is_restarted_by_systemd_and_registers_again(deployed):
    site = "hospital_b"
    assert on_host(deployed, site, "systemctl is-enabled hcls-flare-hospital_b.service").stdout.strip() == "enabled"
    pid, restarts = status(deployed, site)
    killed = nvflare_pids(list(HOSTS).index(site))
    assert killed, f"no NVFlare process on {site}"
    killed_at = time.time()
    subprocess.run(["kill", "-9", *killed], check=True)
    until(f"{site} registered again", lambda: registered_since(deployed, site, killed_at), timeout=60)
    seconds = time.time() - killed_at
    print(f"{site}: kill -9 of {len(killed)} NVFlare processes -> registered again in {seconds:.1f} s")
    assert seconds < 60
    out = run("status.sh", env=deployed["env"], coordinator=True).stdout
    assert f"{site} running (pid {status(deployed, site)[0]}), {restarts + 1} restarts" in out, out
    assert f"client: {site}" in out, out  # the server knows the client again


def test_a_tiny_job_trains_while_an_interrupted_deploy_waits_for_it_unless_forced(deployed, tmp_path):
    env, site = deployed["env"], "hospital_a"
    ws = deployed["root"] / site / "opt" / "hcls-flare" / site
    new = write_inventory(tmp_path / "new.yml", deployed["key"], flare_participant_privacy={"min_dataset_size": 3})
    new_env = dict(env, INVENTORY=str(new))
    pid, _ = status(deployed, site)

    job, job_id = submit(deployed, tmp_path, wait=True)
    try:
        until(f"job {job_id} running on {site}", lambda: job_id in flarectl(deployed, site, "jobs").stdout, timeout=120)

        # A deploy of a new privacy policy, killed (SIGKILL, with its SSH sessions) once local/ has changed on the host.
        deploy = subprocess.Popen(command("deploy.sh", site, env=new_env), env=new_env, cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        lines = []
        for line in deploy.stdout:
            lines.append(line)
            if re.match(rf"changed: \[{site}\] => \(item=privacy.json\)", line):
                os.killpg(deploy.pid, signal.SIGKILL)
                break
        deploy.wait(timeout=60)
        assert '"min_dataset_size": 3' in (ws / "local" / "privacy.json").read_text(), "".join(lines)
        assert status(deployed, site)[0] == pid  # written, not applied

        # The next deploy has nothing to copy but knows the participant is stale: refused while the job runs.
        refused = run("deploy.sh", site, env=new_env, check=False)
        said = " ".join(refused.stdout.split())  # Ansible wraps long messages
        assert refused.returncode != 0 and recap(refused.stdout)[site][2] == 1, refused.stdout
        assert f"{site} runs job {job_id}: not restarted" in said and "FORCE=1 restarts it" in said, refused.stdout
        assert status(deployed, site)[0] == pid
        out, _ = job.communicate(timeout=900)
    finally:
        job.kill()
    # The job trained across the hosts' addresses; its best model loads; the sites' job workspaces stay on their hosts.
    assert "Round 1 finished" in out and "FINISHED:COMPLETED" in out, out
    assert re.search(r"validation metric \S+ from client hospital_b", out)
    run("fetch_model.sh", "cxr_classification", job_id, env=env, coordinator=True)
    models = deployed["root"] / "models" / "cxr_classification"
    assert json.loads((models / "best_model.json").read_text())["job_id"] == job_id
    DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).load_state_dict(torch.load(models / "best_model.pt"))
    assert list(ws.glob(f"{job_id}*"))

    applied = run("deploy.sh", site, env=new_env)
    assert recap(applied.stdout) == {site: (1, 0, 0)}, applied.stdout
    assert f"{site} restarted with its new files" in " ".join(applied.stdout.split()), applied.stdout
    assert status(deployed, site)[0] != pid
    again = run("deploy.sh", site, env=new_env)
    assert recap(again.stdout) == {site: (0, 0, 0)}, again.stdout

    # FORCE=1 restarts it during a job (back to the inventory's policy); the job is then aborted.
    pid, _ = status(deployed, site)
    job, job_id = submit(deployed, tmp_path, wait=False)
    job.wait(timeout=60)
    try:
        until(f"job {job_id} running on {site}", lambda: job_id in flarectl(deployed, site, "jobs").stdout, timeout=120)
        forced = run("deploy.sh", site, env=dict(env, FORCE="1"))
        assert recap(forced.stdout)[site][0] > 0 and recap(forced.stdout)[site][1:] == (0, 0), forced.stdout
        assert f"ending job {job_id}" in " ".join(forced.stdout.split()), forced.stdout
        assert status(deployed, site)[0] != pid and flarectl(deployed, site, "jobs").stdout.strip() == ""
        assert '"min_dataset_size": 2' in (ws / "local" / "privacy.json").read_text()
    finally:
        abort = [sys.executable, "-c", ABORT, admin_kit(env), job_id]
        subprocess.run(command(*abort, env=env, coordinator=True), env=dict(env, PYTHONPATH=str(REPO / "custom")),
                       cwd=REPO, capture_output=True, timeout=120)  # fmt: skip


def admin_kit(env) -> str:
    """The project admin's kit of the newest provisioning in the test workspace."""
    project = yaml.safe_load((REPO / "provision" / "project.yml").read_text())
    admin = next(p["name"] for p in project["participants"] if p.get("role") == "project_admin")
    kits = sorted((Path(env["HCLS_WORKSPACE"]) / "provision" / project["name"]).glob("prod_*"))
    return str(kits[-1] / admin)


def test_rebooted_host_starts_its_participant_at_boot(deployed):
    site = "hospital_b"
    rebooted_at = time.time()
    ssh_after = deployed["reboot"](site)
    until(f"{site} registered after the reboot", lambda: registered_since(deployed, site, rebooted_at), timeout=60)
    seconds = time.time() - rebooted_at
    print(f"{site}: rebooted; sshd after {ssh_after:.1f} s, participant registered after {seconds:.1f} s")
    assert status(deployed, site)[1] == 0  # a fresh boot: started by systemd, not restarted
    again = run("deploy.sh", site, env=deployed["env"])
    assert recap(again.stdout) == {site: (0, 0, 0)}, again.stdout
