"""Faults on the SSH test hosts (conftest.py), with real processes and signals: a participant whose every process was
killed (kill -9) comes back, by systemd on a native site and by Docker's restart policy on the container site, and a
whole host after its pid namespace was killed (a reboot: the container site's Docker engine starts at boot and its
container comes back); a site's link cut for longer than a round costs it those rounds only (that job completes and
its best model is fetched); while a tiny CXR job trains across the hosts' addresses, a deploy killed after it wrote a
new configuration is not applied and the next deploy is refused naming the job (also on the container site), which
goes on training with both sites until it is aborted; then the new configuration is applied, a deploy with nothing
to apply changes nothing, and FORCE=1 restarts a site during a job. Measured recovery times are printed (pytest -s)."""

import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import torch
import pytest
from .conftest import CUT_OFF_PROFILE, CUT_OFF_TRAIN_TIMEOUT, HOSTS, LONG_PROFILE, PREFIX, REPO, command, netns, recap, run, veth
from .conftest import round_record, server_job_file, write_inventory
from .conftest import on_host as _on_host
from monai.networks.nets import DenseNet121

TINY_PROFILE = json.loads((REPO / "tests" / "tiny_cxr_profile.json").read_text())  # 2 rounds, 32 px
# flarectl.sh status: "<name> running (pid N), R restarts" (native) or "(pid N in container flare-<name>, <health>)".
STATUS = re.compile(r"(\S+) running \(pid (\d+)[^)]*\), (\d+) restarts")


def on_host(deployed, name: str, cmd: str, check=True) -> subprocess.CompletedProcess:
    """CMD in a root shell on host NAME, over SSH."""
    return _on_host(deployed, name, cmd, check=check)


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


def submit(deployed, tmp_path, wait: bool, layer: dict = TINY_PROFILE) -> tuple[subprocess.Popen, str]:
    """Submit the tiny CXR job (with the profile LAYER) in the background: (the submitting process, the job id)."""
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps(layer))
    cmd = command("submit.sh", "cxr_classification", profile, "1" if wait else "", env=deployed["env"], coordinator=True)
    proc = subprocess.Popen(cmd, env=deployed["env"], cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if match := re.search(r"job id (\S+)", line):
            return proc, match.group(1)
    raise AssertionError(f"no job id from submit.sh: {proc.wait()}")


def container_pids(site: str) -> list[str]:
    """Every process of the container site's containers (its init, the kit's loop, the participant, jobs), from
    their cgroups (the site's Docker engine puts them under hclsd/<site>-docker)."""
    return [pid for procs in Path(f"/sys/fs/cgroup/pids/{PREFIX}/{site}-docker").glob("*/cgroup.procs")
            for pid in procs.read_text().split()]  # fmt: skip


@pytest.mark.parametrize("runtime", ["native", "container"])
def test_killed_participant_is_restarted_and_registers_again(deployed, runtime):
    """native (hospital_a): kill -9 of every NVFlare process, systemd restarts the unit (NRestarts);
    container: kill -9 of every process of the container, Docker's restart policy restarts it (RestartCount)."""
    if runtime == "container":
        site = deployed["container_site"]
        if site is None:
            pytest.skip(f"no container site: {deployed['native_reason']}")
        killed = container_pids(site)
    else:
        site = "hospital_a"
        assert on_host(deployed, site, f"systemctl is-enabled hcls-flare-{site}.service").stdout.strip() == "enabled"
        killed = nvflare_pids(list(HOSTS).index(site))
    pid, restarts = status(deployed, site)
    assert killed, f"no participant process on {site}"
    killed_at = time.time()
    subprocess.run(["kill", "-9", *killed])  # a short-lived one (a health check) may be gone already
    until(f"{site} registered again", lambda: registered_since(deployed, site, killed_at), timeout=90)
    seconds = time.time() - killed_at
    print(f"{site} ({runtime}): kill -9 of {len(killed)} processes -> registered again in {seconds:.1f} s")
    assert seconds < 90
    out = run("status.sh", env=deployed["env"], coordinator=True).stdout
    new_pid = status(deployed, site)[0]
    assert new_pid != pid
    shown = re.search(rf"{site} running \(pid {new_pid}[^)]*\), (\d+) restarts", out)
    assert shown and int(shown.group(1)) == restarts + 1, out  # systemd's NRestarts, Docker's RestartCount
    print(f"{site}: make status shows {shown.group(1)} restarts (before: {restarts})")
    assert f"client: {site}" in out, out  # the server knows the client again


def test_a_tiny_job_trains_while_an_interrupted_deploy_waits_for_it_unless_forced(deployed, tmp_path):
    env, site = deployed["env"], "hospital_a"
    ws = deployed["root"] / site / "opt" / "hcls-flare" / site
    # A new environment of the participant (flarectl.sh exports it): its running process cannot take it without a
    # restart. (A new privacy policy would not do: each job process reads the policy; it restarts no participant.)
    new = write_inventory(tmp_path / "new.yml", deployed["key"],
                          flare_participant_env={"OMP_NUM_THREADS": 1, "HCLS_STALE": 1})  # fmt: skip
    new_env = dict(env, INVENTORY=str(new))
    pid, _ = status(deployed, site)

    # A job longer than the two deploys below (approved: conftest), aborted once a round with both sites finished
    # after the refusal.
    job, job_id = submit(deployed, tmp_path, wait=True, layer=LONG_PROFILE)
    try:
        until(f"job {job_id} running on {site}", lambda: job_id in flarectl(deployed, site, "jobs").stdout, timeout=120)

        # A deploy of the new environment, killed (SIGKILL, with its SSH sessions) once flarectl.sh changed on the host.
        deploy = subprocess.Popen(command("deploy.sh", site, env=new_env), env=new_env, cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        lines, task = [], ""
        for line in deploy.stdout:
            lines.append(line)
            task = line if line.startswith("TASK [") else task
            if "Install the participant control script" in task and line.startswith(f"changed: [{site}]"):
                os.killpg(deploy.pid, signal.SIGKILL)
                break
        deploy.wait(timeout=60)
        assert "export HCLS_STALE=1" in (ws / "flarectl.sh").read_text(), "".join(lines)
        assert status(deployed, site)[0] == pid  # written, not applied

        # The next deploy has nothing to copy but knows the participant is stale: refused while the job runs.
        refused = run("deploy.sh", site, env=new_env, check=False)
        said = " ".join(refused.stdout.split())  # Ansible wraps long messages
        assert refused.returncode != 0 and recap(refused.stdout)[site][2] == 1, refused.stdout
        assert f"{site} runs job {job_id}: not restarted" in said and "FORCE=1 restarts it" in said, refused.stdout
        assert status(deployed, site)[0] == pid

        # The job goes on across the hosts' addresses with the participant as it was: a later round has both sites.
        last = max((r["round"] for r in round_record(deployed, job_id)), default=-1)
        both = until("a round with both sites after the refusal", timeout=300,
                     probe=lambda: finished_round(deployed, job_id, "hospital_b", True, after=last))  # fmt: skip
        assert site in both["contributed"], both
    finally:
        run("abort.sh", job_id, env=env, coordinator=True, check=False)
        out, _ = job.communicate(timeout=300)
    assert "FINISHED:ABORTED" in out, out
    until(f"job {job_id} gone from {site}", lambda: job_id not in flarectl(deployed, site, "jobs").stdout, timeout=120)
    assert list(ws.glob(f"{job_id}*"))  # the site's job workspace stays on its host

    applied = run("deploy.sh", site, env=new_env)
    assert recap(applied.stdout) == {site: (1, 0, 0)}, applied.stdout
    assert f"{site} restarted with its new files" in " ".join(applied.stdout.split()), applied.stdout
    assert status(deployed, site)[0] != pid
    again = run("deploy.sh", site, env=new_env)
    assert recap(again.stdout) == {site: (0, 0, 0)}, again.stdout

    # FORCE=1 restarts it during a job (back to the inventory's environment); the job is then aborted.
    pid, _ = status(deployed, site)
    job, job_id = submit(deployed, tmp_path, wait=False)
    job.wait(timeout=60)
    try:
        until(f"job {job_id} running on {site}", lambda: job_id in flarectl(deployed, site, "jobs").stdout, timeout=120)
        forced = run("deploy.sh", site, env=dict(env, FORCE="1"))
        assert recap(forced.stdout)[site][0] > 0 and recap(forced.stdout)[site][1:] == (0, 0), forced.stdout
        assert f"ending job {job_id}" in " ".join(forced.stdout.split()), forced.stdout
        assert status(deployed, site)[0] != pid and flarectl(deployed, site, "jobs").stdout.strip() == ""
        assert "HCLS_STALE" not in (ws / "flarectl.sh").read_text()
    finally:
        run("abort.sh", job_id, env=env, coordinator=True, check=False)


def finished_round(deployed, job_id: str, site: str, contributed: bool, after: int = -1) -> dict | None:
    """The first finished round after round AFTER to which SITE contributed (or which it missed)."""
    for r in round_record(deployed, job_id):
        if r["round"] > after and r.get("finished") and (site in r["contributed"]) == contributed:
            return r
    return None


def test_a_site_cut_off_for_longer_than_a_round_misses_it_and_contributes_again(deployed, tmp_path):
    """hospital_b's link (veth) is taken down right after the first round with both sites and brought up once the server closed a round
    without it (after train_timeout, longer than a round): min_clients 1 lets that round aggregate hospital_a
    alone; hospital_b contributes again to a later round, the job completes and its best model loads.

    How soon it is back depends on its task request in flight when the link went down: a request whose reply was
    lost is retried after the kit's communication_timeout (fed_client.json, set by provision/project.yml; NVFlare's
    default of 300 s kept a site out for minutes), so the wait for its return is bounded by that plus two rounds."""
    env, site, train_timeout = deployed["env"], "hospital_b", CUT_OFF_TRAIN_TIMEOUT
    kit = json.loads(on_host(deployed, site, f"cat /opt/hcls-flare/{site}/startup/fed_client.json").stdout)
    communication_timeout = kit["client"]["communication_timeout"]
    assert communication_timeout <= 60, kit["client"]
    job, job_id = submit(deployed, tmp_path, wait=True, layer=CUT_OFF_PROFILE)  # approved (conftest)
    link = veth(list(HOSTS).index(site))
    try:
        if site == deployed["container_site"]:  # flarectl.sh's digest guard works in a container too
            until(f"job {job_id} running on {site}", lambda: job_id in flarectl(deployed, site, "jobs").stdout, timeout=120)
            stale = f"/opt/hcls-flare/{site}/local/zz-stale-test"  # a changed file of the participant
            on_host(deployed, site, f"touch {stale}")
            refused = flarectl(deployed, site, "ensure", check=False)
            on_host(deployed, site, f"rm {stale}")
            assert refused.returncode == 4 and f"{site} runs job {job_id}: not restarted" in refused.stderr, refused
            assert "up to date" in flarectl(deployed, site, "ensure").stdout
        first = until("round 0 with both sites", lambda: finished_round(deployed, job_id, site, True), timeout=240)
        assert first["missing"] == [], first  # round 0, or a later one when hospital_b's first trainer was slow
        subprocess.run(["ip", "link", "set", link, "down"], check=True)
        cut_at = time.monotonic()
        missed = until(f"a round without {site}", lambda: finished_round(deployed, job_id, site, False, first["round"]),
                       timeout=train_timeout + 90)  # fmt: skip
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        restored_at, down_for = time.time(), time.monotonic() - cut_at
        log = server_job_file(deployed, job_id, "log.txt").read_text(errors="replace")
        assert f"round {missed['round']}: {site} missing, aggregated 1 of 2" in log, log[-3000:]
        back = until(f"{site} contributing again", lambda: finished_round(deployed, job_id, site, True, missed["round"]),
                     timeout=communication_timeout + 2 * train_timeout + 60)  # fmt: skip
        seconds = datetime.fromisoformat(back["finished"]).timestamp() - restored_at
        print(f"{site}: link down {down_for:.1f} s (round {missed['round']} aggregated without it); restored -> "
              f"round {back['round']} with its result finished after {seconds:.1f} s")
        out, _ = job.communicate(timeout=600)
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        job.kill()
    assert "FINISHED:COMPLETED" in out, out
    run("fetch_model.sh", "cxr_classification", job_id, env=env, coordinator=True)
    models = deployed["root"] / "models" / "cxr_classification"
    assert json.loads((models / "best_model.json").read_text())["job_id"] == job_id
    recorded = {r["round"]: r for r in json.loads((models / "rounds.json").read_text())["rounds"]}
    assert recorded[missed["round"]]["missing"] == [site] and site in recorded[back["round"]]["contributed"]
    DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).load_state_dict(torch.load(models / "best_model.pt"))


def test_rebooted_host_starts_its_participant_at_boot(deployed):
    """hospital_b: the container site when there is one (its Docker engine starts at boot, and the container
    with it), else a native site (its unit starts at boot)."""
    site = "hospital_b"
    runtime = "container" if site == deployed["container_site"] else "native"
    rebooted_at = time.time()
    ssh_after = deployed["reboot"](site)
    until(f"{site} registered after the reboot", lambda: registered_since(deployed, site, rebooted_at), timeout=90)
    seconds = time.time() - rebooted_at
    print(f"{site} ({runtime}): rebooted; sshd after {ssh_after:.1f} s, participant registered after {seconds:.1f} s")
    assert status(deployed, site)[1] == 0  # a fresh boot: started by systemd / the engine, not restarted
    again = run("deploy.sh", site, env=deployed["env"])
    assert recap(again.stdout) == {site: (0, 0, 0)}, again.stdout
