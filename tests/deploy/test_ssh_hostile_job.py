"""A hostile job on the SSH test hosts (conftest.py): its trainer (the job's own code) tries to rewrite what the
site enforces, to read the site's private key, to take back the participant's uid and to connect to the server
itself; each is refused, the files are unchanged, the kernel counts the blocked connection, and the job still trains.

The trainers run as the job user flare-job (flare_participant_job_user), not as the participant's user flare, at both
sites: hospital_a is a native client under systemd, hospital_b (conftest.CONTAINER_SITE) a compose service where a
Docker engine runs here, else native too."""

import hashlib
import json
import re
import shutil
import subprocess

from .conftest import HOSTS, REPO, command, on_host, run

SITES = ("hospital_a", "hospital_b")
TINY_ONE_ROUND = {**json.loads((REPO / "tests" / "tiny_cxr_profile.json").read_text()), "server": {"num_rounds": 1}}
# What the site enforces and holds, relative to its workspace: none may change, the key may not be read.
GUARDED = ["local/privacy.json", "local/site_config.json", "local/resources.json", "local/approved_jobs.json",
           "local/custom/site_privacy/components.py", "startup/client.key", "startup/fed_client.json"]  # fmt: skip

# Forged: at each site, before training as the real CXR trainer, each attack; outcomes to job_state/hostile.json
# (the one folder the job user may write) and to stdout (the site's log).
FORGED = '''"""Forged: the real CXR trainer after a round of attacks on the site it runs at."""
import json
import os
import socket
from pathlib import Path

import cxr_classification
from hcls import client_loop

SERVER = ("{server}", 8003)  # the server's FL port: the participant reaches it, the job user must not


def attempt(name, action):
    try:
        action()
        outcome = "done"
    except BaseException as error:  # noqa: BLE001 - every refusal is the point
        outcome = f"{{type(error).__name__}}: {{error}}"
    print(f"hostile {{name}}: {{outcome}}", flush=True)
    return outcome


def append(path, text):
    with open(path, "a") as f:
        f.write(text)


if Path.cwd().name.startswith("app_"):  # at a site (the trainer runs only there)
    ws = Path.cwd().parents[1]
    status = dict(line.split(":\\t", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":\\t" in line)
    outcomes = {{
        "uid": os.getuid(), "euid": os.geteuid(), "groups": os.getgroups(), "CapEff": status["CapEff"].strip(),
        "NoNewPrivs": status["NoNewPrivs"].strip(),
        "append privacy.json": attempt("append privacy.json", lambda: append(ws / "local/privacy.json", " ")),
        "replace privacy.json": attempt("replace privacy.json", lambda: os.replace(ws / "local/site_config.json",
                                                                                   ws / "local/privacy.json")),
        "write site code": attempt("write site code", lambda: append(ws / "local/custom/site_privacy/components.py",
                                                                     "\\nALLOW_ALL = True\\n")),
        "add local file": attempt("add local file", lambda: (ws / "local/zz_hostile.json").write_text("{{}}")),
        "write kit": attempt("write kit", lambda: append(ws / "startup/fed_client.json", " ")),
        "read client.key": attempt("read client.key", lambda: (ws / "startup/client.key").read_bytes()),
        "take uid flare": attempt("take uid flare", lambda: os.setuid(2710)),
        "connect to server": attempt("connect to server", lambda: socket.create_connection(SERVER, timeout=2).close()),
    }}
    (ws / "job_state" / "hostile.json").write_text(json.dumps(outcomes))
client_loop.main(cxr_classification.JOB_NAME, cxr_classification.build)
'''


def digests(ws) -> dict:
    return {rel: hashlib.sha256((ws / rel).read_bytes()).hexdigest() for rel in GUARDED}


def blocked_packets(deployed, site) -> int:
    """Packets of the job user that the nftables rule of a site's host (a native unit's, a container's entrypoint's:
    the container shares the host's network) rejected so far."""
    out = on_host(deployed, site, "nft list table inet hcls_flare_job").stdout
    return int(re.search(r"skuid \S+ .*counter packets (\d+)", out).group(1))


def test_a_hostile_trainer_is_refused_and_the_job_still_trains(deployed, tmp_path):
    env = deployed["env"]
    workspaces = {site: deployed["root"] / site / "opt" / "hcls-flare" / site for site in SITES}
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(TINY_ONE_ROUND))
    built = run("build_job.sh", "cxr_classification", profile, env=env).stdout.strip().splitlines()[-1]
    job = tmp_path / "job"
    shutil.copytree(built, job)
    (job / "app" / "custom" / "forged_trainer.py").write_text(FORGED.format(server=HOSTS["flare-server"]))
    config = job / "app" / "config" / "config_fed_client.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "app_script": "forged_trainer.py"}))
    # The site approved this code (the test is what the job user cannot do, not what the site refuses to run).
    run("approve.sh", job, env=env)  # every site: the job runs at both
    run("deploy.sh", env=env)
    before = {site: digests(ws) for site, ws in workspaces.items()}
    packets = {site: blocked_packets(deployed, site) for site in SITES}
    for ws in workspaces.values():
        (ws / "job_state" / "hostile.json").unlink(missing_ok=True)

    result = subprocess.run(command("submit.sh", job, "", "1", env=env, coordinator=True), env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert "FINISHED:COMPLETED" in result.stdout, result.stdout + result.stderr
    job_id = re.search(r"job id (\S+)", result.stdout).group(1)

    for site, ws in workspaces.items():
        runtime = "container" if site == deployed["container_site"] else "native"
        outcomes = json.loads((ws / "job_state" / "hostile.json").read_text())
        print(f"hostile trainer at {site} ({runtime}): {json.dumps(outcomes, indent=1)}")
        # The trainer ran as the job user (in the participant's group, for its workspace), without any capability.
        assert outcomes["uid"] == outcomes["euid"] == 2711 and 2710 in outcomes["groups"], (site, outcomes)
        assert int(outcomes["CapEff"], 16) == 0 and outcomes["NoNewPrivs"] == "1", (site, outcomes)
        # Refused by the files' owner and modes (EACCES) or, first for what needs the folder, the read-only mounts.
        for attack in ("append privacy.json", "replace privacy.json", "write site code", "add local file", "write kit",
                       "read client.key", "take uid flare"):  # fmt: skip
            assert re.match(r"PermissionError|OSError: \[Errno 30\] Read-only file system", outcomes[attack]), (
                site, attack, outcomes)
        assert outcomes["read client.key"].startswith("PermissionError"), (site, outcomes)
        assert outcomes["connect to server"].startswith("OSError: [Errno 113]"), (site, outcomes)  # EHOSTUNREACH
        assert digests(ws) == before[site], site
        assert not (ws / "local" / "zz_hostile.json").exists(), site
        # The site says why: the kernel counted (and logged, "hcls-flare job egress blocked:") the rejected packet,
        # and the trainer's output is in the site's log.
        assert blocked_packets(deployed, site) > packets[site], site
        logs = "".join(path.read_text(errors="replace") for path in [ws / "daemon.log", *ws.glob(f"{job_id}/log*.txt")])
        assert "hostile read client.key: PermissionError" in logs, (site, logs[-4000:])
        # The participant itself still reaches the server (the rule is the job user's only) and the round completed.
        assert on_host(deployed, site, f"/opt/hcls-flare/{site}/flarectl.sh status").returncode == 0, site
