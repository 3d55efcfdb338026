"""Row "operations": how long the coordinator's commands take for the three participants of the local federation
(provision/project.yml's server and two sites as native processes on this machine, the default inventory): `make
provision`, the first `make deploy` into an empty workspace, and `make deploy` again with nothing changed
(changed=0); then the deploys over SSH to three test hosts (custom/ops/ssh_test_hosts.py: network namespaces booted
like machines, each with its own systemd and sshd): the first `make deploy` onto freshly made hosts and the no-op
one. Targets (issue "make bench"): first deploy <= 30 s, no-op deploy <= 15 s locally and over SSH. Medians over
REPEATS runs (1 with QUICK). The federation is stopped and the test hosts are removed at the end."""

import os
import shutil
import subprocess
from pathlib import Path

from ops import ssh_test_hosts

from .table import Measurement, median, timed

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
REPEATS = 5
SSH_FIRST_REPEATS = 3  # each on freshly made hosts (~20 s to make and boot three)
# Small demo data: the deploy checks each site's data root; its size does not matter to a deploy.
DATA = {"CXR_N_TRAIN": "24", "CXR_N_VAL": "16", "CXR_SIZE": "32", "CXR_LAYOUTS": "project"}


def run(quick: bool, work: Path) -> list[Measurement]:
    repeats = 1 if quick else REPEATS
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, **DATA, "HCLS_WORKSPACE": str(work / "workspace"), "MODELS_DIR": str(work / "models")}
    env.pop("INVENTORY", None)  # the local federation's
    log = work / "operations.log"
    provision = [timed([SCRIPTS / "provision.sh"], env, REPO, log) for _ in range(repeats)]
    timed([SCRIPTS / "generate_data.sh", "cxr_classification"], env, REPO, log)
    try:
        first = [timed([SCRIPTS / "deploy.sh"], env, REPO, log)]
        again = [timed([SCRIPTS / "deploy.sh"], env, REPO, log) for _ in range(repeats)]
        for _ in range(repeats - 1):  # first deploys again: stop everything, empty the deployment, deploy
            timed([SCRIPTS / "control.sh", "stop"], env, REPO, log)
            shutil.rmtree(work / "workspace" / "local")
            first.append(timed([SCRIPTS / "deploy.sh"], env, REPO, log))
    finally:
        timed([SCRIPTS / "control.sh", "stop"], env, REPO, log)
    n = _repeats(repeats)
    local = [
        Measurement("operations", f"`make provision`, 3 participants + admin ({n})", median(provision), "s",
                    samples=provision),
        Measurement("operations", f"first `make deploy`, 3 local participants ({n})", median(first), "s",
                    target="<= 30 s", met=median(first) <= 30, samples=first),
        Measurement("operations", f"no-op `make deploy` (changed=0), 3 local participants ({n})", median(again), "s",
                    target="<= 15 s", met=median(again) <= 15, samples=again),
    ]  # fmt: skip
    return local + ssh_deploys(quick, work / "ssh")


def ssh_deploys(quick: bool, work: Path) -> list[Measurement]:
    """`make deploy` over SSH to the three test hosts (the project's server and sites; every participant native,
    the hosts' venv already there as on production hosts): first onto freshly made hosts (kits, local/, service
    user, systemd units, start), then again with nothing changed. No measurement where this machine
    cannot make the hosts (printed)."""
    if reason := ssh_test_hosts.can_make_hosts():
        print(f"bench operations: no deploys over SSH: {reason}", flush=True)
        return []
    firsts, repeats = (1, 1) if quick else (SSH_FIRST_REPEATS, REPEATS)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    coordinator = work / "coordinator"
    env = {**os.environ, **DATA, "HCLS_WORKSPACE": str(coordinator), "MODELS_DIR": str(work / "models"),
           "INVENTORY": str(ssh_test_hosts.write_inventory(work / "hosts.yml", key)),
           "SERVER_HOST": ssh_test_hosts.SERVER, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg")}  # fmt: skip
    log = work / "operations_ssh.log"
    timed([SCRIPTS / "provision.sh"], env, REPO, log)  # kits that dial the server host by its name
    timed([SCRIPTS / "generate_data.sh", "cxr_classification"], env, REPO, log)
    first, again = [], []
    for i in range(firsts):
        booted = ssh_test_hosts.boot_hosts(work / f"hosts{i}", key, ssh_test_hosts.HOSTS)
        try:
            for site in ssh_test_hosts.SITES:  # the deploy checks each site's data root
                shutil.copytree(coordinator / "data" / site, work / f"hosts{i}" / site / "opt" / "data")
            ssh_test_hosts.known_hosts(key).unlink(missing_ok=True)  # new hosts, new host keys: pinned afresh
            timed([SCRIPTS / "trust_hosts.sh"], env, REPO, log)
            first.append(timed([SCRIPTS / "deploy.sh"], env, REPO, log))
            if i == 0:
                again = [timed([SCRIPTS / "deploy.sh"], env, REPO, log) for _ in range(repeats)]
        finally:
            ssh_test_hosts.remove_booted(booted)
    hosts = "3 SSH test hosts (network namespaces, systemd and sshd each), participants native"
    return [
        Measurement("operations", f"first `make deploy`, {hosts}, fresh hosts ({_repeats(firsts)})", median(first),
                    "s", target="<= 30 s", met=median(first) <= 30, samples=first),
        Measurement("operations", f"no-op `make deploy` (changed=0), {hosts} ({_repeats(repeats)})", median(again),
                    "s", target="<= 15 s", met=median(again) <= 15, samples=again),
    ]  # fmt: skip


def _repeats(n: int) -> str:
    return f"median of {n}" if n > 1 else "1 run (QUICK)"
