"""make certs and make doctor's report logic (custom/ops/certs.py, custom/ops/doctor.py) on real certificates made
here with `cryptography` (a root CA and participants it signs) and on facts as ansible/doctor.yml writes them,
including the host probe (custom/ops/doctor_probe.py) run for real on a workspace here."""

import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "custom"))
from ops import certs, doctor  # noqa: E402

PROBE = REPO / "custom" / "ops" / "doctor_probe.py"
NOW = datetime.datetime.now(datetime.timezone.utc)  # main() reads the clock too
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # one key for all: signing is what matters


def name(cn, org=None, role=None):
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    attrs += [x509.NameAttribute(NameOID.UNSTRUCTURED_NAME, role)] if role else []
    return x509.Name(attrs)


def cert(cn, days_left, ca=False, role=None, issuer="hcls-ai-factory") -> bytes:
    builder = (
        x509.CertificateBuilder().subject_name(name(cn, "hcls", role)).issuer_name(name(issuer))
        .public_key(KEY.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=max(400, 1 - days_left))).not_valid_after(NOW + datetime.timedelta(days=days_left, hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    return builder.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


ROOT = cert("hcls-ai-factory", 3000, ca=True)


def kit_root(tmp_path, days: dict) -> Path:
    """A provisioned kit set: one folder per participant with startup/<server|client>.crt and rootCA.pem."""
    root = tmp_path / "prod_00"
    for participant, left in days.items():
        startup = root / participant / "startup"
        startup.mkdir(parents=True)
        role = "project_admin" if "@" in participant else None
        (startup / ("server.crt" if participant == "flare-server" else "client.crt")).write_bytes(cert(participant, left, role=role))
        (startup / "rootCA.pem").write_bytes(ROOT)
        (startup / "client.key").write_text("never read")
    return root


def test_certs_lists_the_root_once_and_every_participant_with_days_left(tmp_path, capsys):
    root = kit_root(tmp_path, {"flare-server": 300, "hospital_a": 300, "admin@x.org": 300})
    rows = certs.kit_certificates(root, NOW)
    assert [(r["participant"], r["status"]) for r in rows] == [
        ("root CA", "ok"), ("admin@x.org", "ok"), ("flare-server", "ok"), ("hospital_a", "ok")]  # fmt: skip
    assert rows[0]["ca"] and rows[0]["kits"] == ["admin@x.org", "flare-server", "hospital_a"] and rows[0]["days_left"] == 3000
    assert rows[1]["role"] == "project_admin" and rows[2]["days_left"] == 300
    assert certs.main([str(root), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "root CA" in out and "hospital_a" in out and "client.crt" in out
    assert len(json.loads((tmp_path / "c.json").read_text())) == 4


def test_certs_warns_under_30_days_and_fails_on_an_expired_one(tmp_path, capsys):
    soon = kit_root(tmp_path / "a", {"flare-server": 300, "hospital_a": 12})
    rows = certs.kit_certificates(soon, NOW)
    assert certs.worst(rows) == "warning"
    assert certs.main([str(soon)]) == 0 and "warning: fewer than 30 days left: hospital_a client.crt (12 days)" in capsys.readouterr().err
    expired = kit_root(tmp_path / "b", {"flare-server": 300, "hospital_b": -3})
    rows = certs.kit_certificates(expired, NOW)
    assert [r["status"] for r in rows if r["participant"] == "hospital_b"] == ["expired"]
    assert certs.worst(rows) == "error"
    # main() measures against the real clock: a certificate that expired long ago.
    gone = kit_root(tmp_path / "c", {"hospital_b": -4000})
    assert certs.main([str(gone)]) == 1 and "error: certificate not valid now: hospital_b client.crt (expired" in capsys.readouterr().err


def test_certs_bad_input_names_the_folder_or_file(tmp_path, capsys):
    assert certs.main([str(tmp_path / "nothing")]) == 1
    assert "nothing: no startup kits" in capsys.readouterr().err
    root = kit_root(tmp_path, {"hospital_a": 100})
    (root / "hospital_a" / "startup" / "client.crt").write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    with pytest.raises(ValueError, match=r"hospital_a/startup/client.crt: not a PEM certificate"):
        certs.kit_certificates(root, NOW)


# ---- make doctor's report --------------------------------------------------------------------------------------------

PROJECT = {"server": {"name": "flare-server", "ports": [8003, 8103]}, "clients": ["hospital_a", "hospital_b"]}
META = {"cxr_classification": {"scope": "hospital_policy", "resource_spec": {"hospital_a": {"num_of_gpus": 1}}}}


def probe(server=False, nvflare="2.9.0", skew=0.0, gpus=(), gpu_ids=(), offered=0, cert_days=300, scopes=("hospital_policy",),
          free=50 * 2**30, port_ok=True) -> dict:  # fmt: skip
    p = {"time": 1000.5 + skew, "deployed": True, "running": {"rc": 0, "status": "x running (pid 1), 0 restarts"},
         "versions": {"source": "/opt/hcls-flare/venv/bin", "nvflare": nvflare, "monai": "1.6.1", "torch": "2.14.1"},
         "certs": {("server.crt" if server else "client.crt"): cert("p", cert_days).decode(), "rootCA.pem": ROOT.decode()},
         "disk": {"path": "/opt/hcls-flare/x", "free": free, "total": 2 * free},
         "gpus": {"present": list(gpus), "nvidia_smi": [], "gpu_ids": list(gpu_ids), "offered": offered}}  # fmt: skip
    if not server:
        p["privacy"] = {"file": "local/privacy.json", "scopes": list(scopes), "default_scope": None}
        p["reach"] = {"server": "flare-server", "ports": {
            "8003": {"ok": True, "seconds": 0.01},
            "8103": {"ok": True, "seconds": 0.01} if port_ok else {"ok": False, "error": "ConnectionRefusedError: refused"}}}
        p["preflight"] = {"rule": "CheckServerAvailable", "problem": "PASSED" if port_ok else "Can't connect", "solution": "N/A"}
    return p


def write_facts(tmp_path, probes: dict, summaries: dict | None = None) -> Path:
    facts = tmp_path / "doctor"
    (facts / "hosts").mkdir(parents=True)
    for host, p in probes.items():
        body = p if "unreachable" in p else {"participant": host, "runtime": "native", "controller_before": 1000.0,
                                             "controller_after": 1001.0, "probe": p}  # fmt: skip
        (facts / "hosts" / f"{host}.json").write_text(json.dumps(body))
    for (site, job), summary in (summaries or {}).items():
        (facts / "check-data" / site).mkdir(parents=True, exist_ok=True)
        (facts / "check-data" / site / f"{job}.json").write_text(json.dumps(summary))
    return facts


GOOD_DATA = {"ok": True, "errors": [], "splits": {"training": {"images": 24}, "validation": {"images": 16}}}


def rows(rep, host):
    return {r["check"]: r for r in rep["participants"][host]["checks"]}


def test_a_healthy_federation_is_all_ok(tmp_path):
    facts = write_facts(tmp_path, {"flare-server": probe(server=True), "hospital_a": probe(gpus=[0], gpu_ids=[0], offered=1),
                                   "hospital_b": probe(gpus=[0, 1], gpu_ids=[1], offered=1)},
                        {("hospital_a", "cxr_classification"): GOOD_DATA, ("hospital_b", "cxr_classification"): GOOD_DATA})  # fmt: skip
    rep = doctor.report(facts, PROJECT, {**META}, now=NOW)
    assert rep["ok"] and rep["errors"] == 0, doctor.table(rep)
    a = rows(rep, "hospital_a")
    assert set(a) == {"host", "running", "versions", "clock", "cert client.crt", "cert rootCA.pem", "disk", "gpus",
                      "port 8003", "port 8103", "preflight", "privacy", "data cxr_classification"}  # fmt: skip
    assert a["data cxr_classification"]["detail"] == "training 24 images, validation 16 images"
    assert rep["participants"]["flare-server"]["versions"] == {"nvflare": "2.9.0", "monai": "1.6.1", "torch": "2.14.1"}


def test_each_problem_is_an_error_on_the_participant_that_has_it(tmp_path):
    bad_data = {"ok": False, "errors": [{"file": "cxr/train.csv", "row": 26, "column": "Atelectasis", "error": "not a label: 'x'"}],
                "splits": {"training": {"images": 24}}}  # fmt: skip
    facts = write_facts(tmp_path, {
        "flare-server": probe(server=True, nvflare="2.9.99", skew=90),
        "hospital_a": probe(gpu_ids=[7], scopes=("other",), port_ok=False),
        "hospital_b": probe(cert_days=-2, free=2**29),
    }, {("hospital_a", "cxr_classification"): bad_data})  # fmt: skip
    rep = doctor.report(facts, PROJECT, META, now=NOW)
    assert not rep["ok"]
    server, a, b = rows(rep, "flare-server"), rows(rep, "hospital_a"), rows(rep, "hospital_b")
    assert server["versions"]["status"] == "error" and "nvflare 2.9.99 differs" in server["versions"]["detail"]
    assert "2.9.0 on hospital_a, hospital_b" in server["versions"]["detail"]
    assert a["versions"]["status"] == b["versions"]["status"] == "ok"  # the majority is right
    assert server["clock"]["status"] == "error" and "skew +89.5 s" in server["clock"]["detail"]
    assert a["gpus"]["status"] == "error" and "gpu_ids [7] of local/site_config.json not on the host" in a["gpus"]["detail"]
    assert "job cxr_classification asks 1 GPUs (meta.json resource_spec), the site offers 0" in a["gpus"]["detail"]
    assert a["port 8103"]["status"] == "error" and a["port 8003"]["status"] == "ok"
    assert a["preflight"]["status"] == "error"
    assert a["privacy"]["status"] == "error" and "job cxr_classification selects scope 'hospital_policy'" in a["privacy"]["detail"]
    assert a["data cxr_classification"]["detail"].startswith("1 problem(s): cxr/train.csv:26 column Atelectasis: not a label")
    assert b["cert client.crt"]["status"] == "error" and "expired" in b["cert client.crt"]["detail"]
    assert b["disk"]["status"] == "error"
    assert b["data cxr_classification"]["status"] == "error" and "no data check summary" in b["data cxr_classification"]["detail"]
    table = doctor.table(rep)
    assert any(line.startswith("hospital_b") and "expired" in line for line in table.splitlines())


def test_a_version_tie_flags_every_participant_and_a_missing_version_is_an_error(tmp_path):
    facts = write_facts(tmp_path, {"flare-server": probe(server=True, nvflare="2.9.1"), "hospital_a": probe(nvflare="2.9.0"),
                                   "hospital_b": {**probe(), "versions": {"error": "RuntimeError: exit 1: no python"}}})  # fmt: skip
    rep = doctor.report(facts, PROJECT, {}, now=NOW)
    assert rows(rep, "flare-server")["versions"]["status"] == rows(rep, "hospital_a")["versions"]["status"] == "error"
    assert "cannot read the versions: RuntimeError" in rows(rep, "hospital_b")["versions"]["detail"]


def test_an_unreachable_or_unprobed_host_is_reported_and_the_others_still_are(tmp_path):
    facts = write_facts(tmp_path, {"flare-server": probe(server=True),
                                   "hospital_b": {"participant": "hospital_b", "unreachable": True, "msg": "Failed to connect"}})  # fmt: skip
    rep = doctor.report(facts, PROJECT, {}, now=NOW)
    assert rep["errors"] == 2
    assert rows(rep, "hospital_b") == {"host": {"check": "host", "status": "error", "detail": "unreachable: Failed to connect"}}
    assert rows(rep, "hospital_a")["host"]["detail"].startswith("not probed")
    assert rep["participants"]["flare-server"]["status"] == "ok"
    only = doctor.report(facts, PROJECT, {}, site="flare-server", now=NOW)
    assert list(only["participants"]) == ["flare-server"] and only["ok"]
    with pytest.raises(ValueError, match="unknown SITE 'hospital_z'"):
        doctor.report(facts, PROJECT, {}, site="hospital_z", now=NOW)


def test_main_writes_the_json_and_exits_1_on_an_error(tmp_path, capsys):
    facts = write_facts(tmp_path, {"flare-server": probe(server=True)})
    out = tmp_path / "doctor.json"
    assert doctor.main([str(facts), "--project", str(REPO / "provision" / "project.yml"), "--json", str(out)]) == 1
    rep = json.loads(out.read_text())
    assert set(rep["participants"]) == {"flare-server", "hospital_a", "hospital_b"} and rep["errors"] == 2
    assert "flare-server  host" in capsys.readouterr().out
    (facts / "hosts" / "hospital_a.json").write_text("{not json")
    assert doctor.main([str(facts), "--project", str(REPO / "provision" / "project.yml")]) == 2
    assert "hosts/hospital_a.json: not valid JSON" in capsys.readouterr().err


def test_load_project_names_the_file_and_field(tmp_path):
    bad = tmp_path / "project.yml"
    bad.write_text("participants:\n  - {name: s, type: server, fed_learn_port: 'x'}\n")
    with pytest.raises(ValueError, match=r"project.yml: participants\[s\].fed_learn_port: not a port number"):
        doctor.load_project(bad)
    assert doctor.load_project(REPO / "provision" / "project.yml")["server"] == {"name": "flare-server", "ports": [8003, 8103]}


def test_the_host_probe_reads_a_workspace(tmp_path):
    """The real probe on a server workspace here (no clients' network checks): versions of this venv, the kit's
    certificates and never its key, GPUs, disk."""
    ws = tmp_path / "flare-server"
    (ws / "startup").mkdir(parents=True)
    (ws / "local").mkdir()
    (ws / "startup" / "server.crt").write_bytes(cert("flare-server", 100))
    (ws / "startup" / "rootCA.pem").write_bytes(ROOT)
    (ws / "startup" / "server.key").write_text("secret")
    (ws / "local" / "site_config.json").write_text(json.dumps({"gpu_ids": [3]}))
    (ws / "flarectl.sh").write_text("#!/bin/sh\necho flare-server stopped; exit 3\n")
    (ws / "flarectl.sh").chmod(0o755)
    args = {"ws": str(ws), "runtime": "native", "python_bin": str(Path(sys.executable).parent), "container": "flare-x",
            "image": "none", "is_server": True, "server_ports": [8003, 8103]}  # fmt: skip
    out = subprocess.run([sys.executable, PROBE, json.dumps(args)], capture_output=True, text=True, timeout=120, check=True)
    facts = json.loads(out.stdout)
    assert facts["deployed"] and facts["running"] == {"rc": 3, "status": "flare-server stopped"}
    assert facts["versions"]["nvflare"] == importlib.metadata.version("nvflare")
    assert facts["versions"]["torch"] == importlib.metadata.version("torch")
    assert set(facts["certs"]) == {"server.crt", "rootCA.pem"} and "secret" not in out.stdout
    assert facts["gpus"]["gpu_ids"] == [3] and facts["disk"]["free"] > 0
    assert "privacy" not in facts and "reach" not in facts


def test_the_clock_window_leaves_out_the_probes_own_work():
    facts = {"controller_before": 1000.0, "controller_after": 1010.0, "probe": {"time": 1000.5, "elapsed": 9.0}}
    assert doctor.clock_row(facts)["detail"].startswith("skew +0.0 s")  # read within [1000, 1001]
    late = {**facts, "probe": {"time": 1007.0, "elapsed": 9.0}}  # 6 s after the latest moment it could have read it
    assert doctor.clock_row(late) == {"check": "clock", "status": "warning",
                                      "detail": "skew +6.0 s vs the controller (within a 1.0 s probe window)"}  # fmt: skip
    early = {**facts, "probe": {"time": 900.0, "elapsed": 9.0}}
    assert doctor.clock_row(early)["status"] == "error" and "skew -100.0 s" in doctor.clock_row(early)["detail"]


def test_provision_refuses_to_make_a_new_root_ca_while_the_key_is_away(tmp_path):
    """The CA key kept off the coordinator (state/ moved away): make provision stops instead of rotating the CA."""
    env = {**os.environ, "HCLS_WORKSPACE": str(tmp_path)}
    provision = [str(REPO / "scripts" / "provision.sh")]
    subprocess.run(provision, env=env, capture_output=True, text=True, timeout=300, check=True)
    project = tmp_path / "provision" / "hcls-ai-factory"
    assert certs.main([str(project / "prod_00")]) == 0
    (project / "state").rename(tmp_path / "ca-backup")
    refused = subprocess.run(provision, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and f"the root CA key {project}/state/cert.json is missing" in refused.stderr
    assert sorted(p.name for p in project.iterdir()) == ["prod_00"]  # nothing written
    (tmp_path / "ca-backup").rename(project / "state")
    subprocess.run(provision, env=env, capture_output=True, text=True, timeout=300, check=True)
    roots = {r["serial"] for kit in ("prod_00", "prod_01") for r in certs.kit_certificates(project / kit) if r["ca"]}
    assert len(roots) == 1  # the same root CA
