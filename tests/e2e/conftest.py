"""One real local federation for the end-to-end tests: provisioned twice, deployed with
Ansible, in a private workspace (HCLS_WORKSPACE, MODELS_DIR, and HCLS_SITE_CONFIGS for the sites' approvals of
job code), stopped at the end. Each job a test submits is approved first (``approve``), as a site's operator
approves it with make approve."""

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROJECT_FILE = yaml.safe_load((REPO / "provision" / "project.yml").read_text())
PROJECT = PROJECT_FILE["name"]
SERVER = next(p for p in PROJECT_FILE["participants"] if p["type"] == "server")
PROJECT_ADMIN = next(p["name"] for p in PROJECT_FILE["participants"] if p.get("role") == "project_admin")
PORTS = (SERVER["fed_learn_port"], SERVER["admin_port"])
TINY_DATA = json.loads((REPO / "tests" / "tiny_data.json").read_text())  # generator sizes (scripts/generate_data.sh)


def run(*args, env, check=True, timeout=900):
    result = subprocess.run(
        [str(REPO / "scripts" / args[0]), *args[1:]], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def root_ca_fingerprint(out: str) -> str:
    return re.search(r"root CA: (.*)", out).group(1)


def kit_root(env) -> Path:
    """The latest provisioning's kits (one folder per participant)."""
    return sorted((Path(env["HCLS_WORKSPACE"]) / "provision" / PROJECT).glob("prod_*"))[-1]


def admin_kit(env) -> str:
    return str(kit_root(env) / PROJECT_ADMIN)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="package")
def env(tmp_path_factory):
    busy = [p for p in PORTS if port_in_use(p)]
    if busy:
        pytest.fail(f"ports {busy} are in use (a running demo? 'make down' stops it)")
    work = tmp_path_factory.mktemp("federation")
    environ = dict(os.environ, HCLS_WORKSPACE=str(work / "workspace"), MODELS_DIR=str(work / "models"),
                   HCLS_SITE_CONFIGS=str(work / "site_configs"), **TINY_DATA)  # fmt: skip
    yield environ
    run("control.sh", "stop", env=environ, check=False)
    assert not any(port_in_use(p) for p in PORTS), "the federation did not stop"


@pytest.fixture(scope="package")
def deployed(env):
    first = run("provision.sh", env=env)
    second = run("provision.sh", "--he", env=env)  # HE contexts as well, for test_he.py; same root CA
    run("generate_data.sh", env=env)
    deploy = run("deploy.sh", env=env)
    assert re.search(r"hospital_b\s+: ok=\d+\s+changed=[1-9]", deploy.stdout)
    return {"fingerprints": (root_ca_fingerprint(first.stdout), root_ca_fingerprint(second.stdout))}


def approve(env: dict, job, profile="") -> str:
    """Every site approves JOB (a job of job_configs/ built with PROFILE, or a ready job folder) as make approve
    INSTALL=1 does: recorded in HCLS_SITE_CONFIGS and written into the deployed sites, which read it for each job.
    Its digest (approve.sh's output says it)."""
    out = run("approve.sh", "--install", str(job), str(profile), env=env).stdout
    return re.search(r"sha256 ([0-9a-f]{64})", out).group(1)


def submit_and_fetch(job: str, profile: dict, env: dict, tmp_path: Path) -> tuple[str, str]:
    """Approve and submit JOB with a profile overlay, wait for it, fetch its best model: (submit output, job id)."""
    overlay = tmp_path / f"{job}.json"
    overlay.write_text(json.dumps(profile))
    approve(env, job, overlay)
    out = run("submit.sh", job, str(overlay), "1", env=env).stdout
    job_id = re.search(r"job id (\S+)", out).group(1)
    run("fetch_model.sh", job, job_id, env=env)
    return out, job_id
