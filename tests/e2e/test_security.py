"""Transport and access security of the real federation; each test tries to break a promise:
a site kit from another provisioning (another root CA) cannot join, an admin whose role may not
submit cannot submit, kits and deployed keys are readable by their owner only, every connection is
mutual TLS, and no patient identifier from the generated data reaches any log."""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import PROJECT, REPO, admin_kit, kit_root, run, submit_and_fetch

sys.path.insert(0, str(REPO / "custom"))
from datagen.cxr import IDENTIFIER_COLUMNS  # noqa: E402
from ops import flare_admin  # noqa: E402

TINY = json.loads((Path(__file__).resolve().parents[1] / "tiny_cxr_profile.json").read_text())  # 2 rounds, 32 px
HANDSHAKE_WAIT_S = 180  # a client process needs ~10 s to dial the server; far more on a loaded 2-core machine
REGISTER_WINDOW_S = 60  # how long a foreign certificate that trusts our CA keeps trying to register


def foreign_kit(tmp_path: Path, trust_our_ca_from: Path | None) -> Path:
    """hospital_x: a site kit from a separate `nvflare provision` of this project (its own root CA)."""
    project = yaml.safe_load((REPO / "provision" / "project.yml").read_text())
    for participant in project["participants"]:
        if participant["name"] == "hospital_a":
            participant["name"] = "hospital_x"
    (tmp_path / "project.yml").write_text(yaml.safe_dump(project))
    nvflare = Path(sys.executable).with_name("nvflare")
    subprocess.run([nvflare, "provision", "-p", "project.yml", "-w", str(tmp_path)], cwd=tmp_path, check=True,
                   capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO / "custom")))  # fmt: skip
    kit = tmp_path / PROJECT / "prod_00" / "hospital_x"
    if trust_our_ca_from:  # the intruder trusts our server; only the server's check of its certificate is left
        (kit / "startup" / "rootCA.pem").write_bytes((trust_our_ca_from / "startup" / "rootCA.pem").read_bytes())
    return kit


def start_client(kit: Path) -> subprocess.Popen:
    command = [sys.executable, "-u", "-m", "nvflare.private.fed.app.client.client_train", "-m", str(kit),
               "-s", "fed_client.json", "--set", "secure_train=true", "uid=hospital_x", "org=hospital_a",
               "config_folder=config"]  # fmt: skip
    return subprocess.Popen(command, cwd=kit, stdout=open(kit / "stdout.txt", "w"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("trusts_our_server", [False, True], ids=["foreign-ca", "foreign-cert-trusting-our-ca"])
def test_a_site_kit_from_another_root_ca_cannot_join(deployed, env, tmp_path, trusts_our_server):
    kit = foreign_kit(tmp_path, kit_root(env) / "hospital_a" if trusts_our_server else None)
    client = start_client(kit)
    output = ""
    try:  # it keeps retrying; it must never register
        deadline = time.time() + (REGISTER_WINDOW_S if trusts_our_server else HANDSHAKE_WAIT_S)
        while time.time() < deadline and "Successfully registered" not in output:
            time.sleep(2)
            output = "".join(f.read_text() for f in (kit / "stdout.txt", kit / "log.txt") if f.exists())
            if not trusts_our_server and "Handshake failed" in output:
                break  # it distrusts our server's certificate: no connection at all
    finally:
        client.terminate()
        client.wait(timeout=30)
    assert "Successfully registered client:hospital_x" not in output
    if not trusts_our_server:
        assert "CERTIFICATE_VERIFY_FAILED" in output
    with flare_admin.session(admin_kit(env)) as sess:
        assert sorted(c.name for c in sess.get_system_info().client_info) == ["hospital_a", "hospital_b"]


def test_an_org_admin_may_not_submit_a_job(deployed, env, tmp_path):
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps(TINY))
    job_dir = run("build_job.sh", "cxr_classification", str(profile), env=env).stdout.strip()
    org_admin = kit_root(env) / "org-admin@hospital-a.org"
    with pytest.raises(
        flare_admin.AdminError, match="user 'org-admin@hospital-a.org' is not authorized for 'submit_job'"
    ):
        flare_admin.submit(str(org_admin), job_dir, wait=False)


def test_kits_and_deployed_keys_are_readable_by_their_owner_only(deployed, env):
    provision = Path(env["HCLS_WORKSPACE"]) / "provision"
    files = [p for p in provision.rglob("*") if p.is_file()]
    assert any(p.name == "cert.json" for p in files) and any(p.name == "client_context.tenseal" for p in files)
    exposed = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in files if p.stat().st_mode & 0o077]
    assert not exposed, exposed  # keys, HE contexts, the root CA key (state/cert.json): nothing for group/others
    deployed_secrets = [p for p in (Path(env["HCLS_WORKSPACE"]) / "local").glob("*/startup/*")
                        if p.suffix == ".key" or p.name == "client_context.tenseal"]  # fmt: skip
    assert len(deployed_secrets) == 5  # 3 TLS keys, 2 site HE contexts (the server's has no secret key)
    assert {oct(p.stat().st_mode & 0o777) for p in deployed_secrets} == {"0o600"}


def test_every_provisioned_and_deployed_connection_is_mutual_tls(deployed, env):
    configs = [
        *kit_root(env).glob("*/startup/fed_*.json"),
        *(Path(env["HCLS_WORKSPACE"]) / "local").glob("*/startup/fed_*.json"),
    ]
    assert len(configs) == 3 + 3 + 3  # server, 2 sites, 3 admins in the kits; 3 participants deployed
    for path in configs:
        text = path.read_text()
        modes = re.findall(r'"connection_security":\s*"(\w+)"', text)
        assert modes and set(modes) == {"mtls"}, path
        assert '"scheme": "grpc"' in text, path


def test_no_patient_identifier_reaches_any_log(deployed, env, tmp_path):
    _, job_id = submit_and_fetch("cxr_classification", TINY, env, tmp_path)
    with flare_admin.session(admin_kit(env)) as sess:
        server_job = Path(sess.download_job_result(job_id, destination=str(tmp_path)))  # the server job's logs
    identifiers = set()
    for csv_path in (Path(env["HCLS_WORKSPACE"]) / "data").glob("*/*/*.csv"):
        with open(csv_path, newline="") as f:
            identifiers |= {row[c] for row in csv.DictReader(f) for c in IDENTIFIER_COLUMNS if c in row}
    assert len(identifiers) > 100, "the generated CXR CSVs carry no PatientName/PatientID/PatientBirthDate"
    # One lookaround around the alternation (not one per identifier: 40x slower over the logs), same matches.
    pattern = re.compile(rf"(?<![\w^])(?:{'|'.join(map(re.escape, sorted(identifiers)))})(?![\w^])")
    every_file = [*(Path(env["HCLS_WORKSPACE"]) / "local").rglob("*"), *server_job.rglob("*")]
    logs = [
        p for p in every_file if p.is_file() and re.fullmatch(r"(log.*\.(txt|json)|.*\.log|error_log\.txt)", p.name)
    ]
    assert any(job_id in str(p) and p.parent.name == job_id for p in logs)  # the sites' logs of this job
    assert len(logs) > 10
    leaks = [f"{p}: {m.group(0)}" for p in logs for m in [pattern.search(p.read_text(errors="replace"))] if m]
    assert not leaks, leaks[:10]
