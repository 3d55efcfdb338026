"""`make doctor` over real SSH (see conftest.py): problems planted on the deployed test hosts are each reported on the
host that has them, and an unreachable host is reported while the others still are. What is planted is real and
undone afterwards, byte for byte (the later tests of this package see the federation as it was):
- flare-server: a newer nvflare in its python (a copy of the installed package's METADATA with another Version,
  bind-mounted over it in that host's mount namespace only: the venv is shared, read-only);
- hospital_a: a GPU id the host does not have in its deployed local/site_config.json, and a bad row (a label value
  that is no label) in its CheXpert train.csv;
- hospital_b: an expired certificate: its kit's client.crt re-signed by the project's root CA with a validity that
  ended yesterday (same subject, key and extensions)."""

import base64
import datetime
import glob
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from .conftest import HOSTS, on_host, run, write_inventory

WS = "/opt/hcls-flare"
FAKE_NVFLARE = "2.9.99"
MISSING_GPU = 7


def expired_copy(pem: bytes, workspace: Path) -> bytes:
    """PEM certificate PEM re-signed by the project's root CA (state/cert.json) with a validity that ended a day ago."""
    (state,) = glob.glob(str(workspace / "provision" / "*" / "state" / "cert.json"))
    state = json.loads(Path(state).read_text())
    root_key = serialization.load_pem_private_key(state["root_pri_key"].encode(), password=None)
    root = x509.load_pem_x509_certificate(state["root_cert"].encode())
    old = x509.load_pem_x509_certificate(pem)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(old.subject).issuer_name(root.subject).public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now - datetime.timedelta(days=1))
    )  # fmt: skip
    for ext in old.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(root_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# A copy of train.csv's last row with its first label cell (a 0/1 value) set to "x" (not a label value).
BAD_ROW = """python3 - "$0" <<'EOF'
import csv, sys
path = sys.argv[1]
rows = list(csv.reader(open(path, newline="")))
bad = list(rows[-1])
column = next(i for i, v in enumerate(bad) if i > 0 and v.strip() in ("0", "1", "0.0", "1.0"))
bad[column] = "x"
with open(path, "a", newline="") as f:
    csv.writer(f).writerow(bad)
print(rows[0][column], len(rows) + 1)
EOF"""


def checks(report: dict, host: str) -> dict:
    return {r["check"]: r for r in report["participants"][host]["checks"]}


def test_doctor_reports_planted_problems_per_host_and_an_unreachable_host(deployed):
    env, root = deployed["env"], deployed["root"]
    workspace = Path(env["HCLS_WORKSPACE"])
    profile = root / "approved_0.json"  # the tiny CXR profile: no GPU asked of the sites
    undo = []  # (host, command), run in reverse order
    sums = {}  # host -> command printing the sha256 of every planted file, before and after

    def digests():
        return {h: on_host(deployed, h, f"sha256sum {files}").stdout for h, files in sums.items()}

    meta = on_host(deployed, "flare-server", "ls -d /opt/hcls-flare/venv/lib/python3*/site-packages/nvflare-*.dist-info").stdout.strip()
    site_config = f"{WS}/hospital_a/local/site_config.json"
    train_csv = on_host(deployed, "hospital_a", "find /opt/data -name train.csv | sort | head -n1").stdout.strip()
    assert train_csv, on_host(deployed, "hospital_a", "find /opt/data -name '*.csv'").stdout
    crt = f"{WS}/hospital_b/startup/client.crt"
    before = {}
    try:
        # Each plant keeps a copy and writes through the same file (owner, mode and inode stay), or mounts over it.
        sums["flare-server"] = f" {meta}/METADATA"
        sums["hospital_a"] = f" {site_config} {train_csv}"
        sums["hospital_b"] = f" {crt}"
        before = digests()
        undo.append(("flare-server", f"umount {meta}/METADATA; rm -f /tmp/doctor-METADATA"))
        on_host(deployed, "flare-server", f"sed 's/^Version: .*/Version: {FAKE_NVFLARE}/' {meta}/METADATA > /tmp/doctor-METADATA"
                f" && mount --bind /tmp/doctor-METADATA {meta}/METADATA")  # fmt: skip
        undo.append(("hospital_a", f"cat {site_config}.doctor > {site_config} && rm {site_config}.doctor"))
        on_host(deployed, "hospital_a", f"cp -p {site_config} {site_config}.doctor && "
                f"jq '.gpu_ids = [{MISSING_GPU}]' {site_config}.doctor > {site_config}")  # fmt: skip
        undo.append(("hospital_a", f"cat {train_csv}.doctor > {train_csv} && rm {train_csv}.doctor"))
        bad_column, bad_row = on_host(deployed, "hospital_a", f"cp -p {train_csv} {train_csv}.doctor && "
                                      + BAD_ROW.replace("$0", train_csv)).stdout.strip().rsplit(" ", 1)
        pem = on_host(deployed, "hospital_b", f"cat {crt}").stdout.encode()
        expired = base64.b64encode(expired_copy(pem, workspace)).decode()
        undo.append(("hospital_b", f"cat {crt}.doctor > {crt} && rm {crt}.doctor"))
        on_host(deployed, "hospital_b", f"cp -p {crt} {crt}.doctor && echo {expired} | base64 -d > {crt}")

        result = run("doctor.sh", "", "cxr_classification", profile, env=env, check=False, timeout=300)
        print(result.stdout)
        print(f"make doctor with the planted problems: {result.seconds:.0f} s")
        assert result.returncode == 1, result.stdout + result.stderr
        report = json.loads((workspace / "doctor.json").read_text())
        assert set(report["participants"]) == set(HOSTS)
        server, site_a, site_b = (checks(report, h) for h in ("flare-server", "hospital_a", "hospital_b"))
        assert server["versions"]["status"] == "error" and f"nvflare {FAKE_NVFLARE}" in server["versions"]["detail"]
        assert site_a["gpus"]["status"] == "error" and f"[{MISSING_GPU}]" in site_a["gpus"]["detail"], site_a["gpus"]
        data = site_a["data cxr_classification"]
        assert data["status"] == "error" and f"train.csv:{bad_row}" in data["detail"], (data, bad_column, bad_row)
        assert site_b["cert client.crt"]["status"] == "error" and "expired" in site_b["cert client.crt"]["detail"]
        # What was not planted is reported fine on the same hosts.
        assert site_a["cert client.crt"]["status"] == "ok" and site_a["port 8003"]["status"] == "ok"
        assert site_b["data cxr_classification"]["status"] == "ok", site_b["data cxr_classification"]
        assert site_b["gpus"]["status"] == "ok" and server["cert server.crt"]["status"] == "ok"
        for host, problem in [("flare-server", FAKE_NVFLARE), ("hospital_a", f"[{MISSING_GPU}]"),
                              ("hospital_a", "train.csv"), ("hospital_b", "expired")]:  # fmt: skip
            assert any(line.startswith(host) and problem in line for line in result.stdout.splitlines()), (host, problem)
        assert "/opt/data" not in json.dumps(report["participants"]["hospital_a"])  # counts only, no host paths of data
    finally:
        for host, cmd in reversed(undo):
            on_host(deployed, host, cmd, check=False)
    assert digests() == before  # every planted file as it was

    # hospital_b unreachable (nothing listens on that port): reported as such, the others still fully reported.
    inventory = write_inventory(root / "hosts_doctor.yml", deployed["key"], hosts={**HOSTS, "hospital_b": f"{HOSTS['hospital_b']}:2299"})
    result = run("doctor.sh", "", "cxr_classification", profile, env={**env, "INVENTORY": str(inventory)}, check=False, timeout=300)
    print(result.stdout)
    print(f"make doctor with hospital_b unreachable: {result.seconds:.0f} s")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((workspace / "doctor.json").read_text())
    site_b = report["participants"]["hospital_b"]["checks"]
    assert [r["check"] for r in site_b] == ["host"] and "unreachable" in site_b[0]["detail"], site_b
    for host in ("flare-server", "hospital_a"):
        rows = checks(report, host)
        assert {r["status"] for r in rows.values()} <= {"ok", "warning"}, (host, rows)
    assert checks(report, "hospital_a")["data cxr_classification"]["status"] == "ok"
