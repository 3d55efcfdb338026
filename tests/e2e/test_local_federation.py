"""End to end on real parts: nvflare provision, Ansible deploy, real server and client
processes talking gRPC over mutual TLS, a tiny CXR job submitted through the admin kit,
and the fetched best model loaded strictly into the network of the job config.

Runs the same scripts as the Makefile, in a private workspace (see conftest.py).
"""

import hashlib
import json
import re
from pathlib import Path

import torch
from monai.networks.nets import DenseNet121

from .conftest import approve, run

TINY_PROFILE = json.loads((Path(__file__).resolve().parents[1] / "tiny_cxr_profile.json").read_text())  # 2 rounds, 32 px


def test_reprovisioning_keeps_the_root_ca(deployed, env):
    first, second = deployed["fingerprints"]
    assert first == second
    kits = sorted((Path(env["HCLS_WORKSPACE"]) / "provision" / "hcls-ai-factory").glob("prod_*"))
    assert len(kits) == 2


def test_second_deploy_changes_nothing(deployed, env):
    out = run("deploy.sh", env=env).stdout
    recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0", out, re.M)
    assert sorted(host for host, _ in recap) == ["flare-server", "hospital_a", "hospital_b"]
    assert all(changed == "0" for _, changed in recap), out


def test_kits_keep_keys_private(deployed, env):
    local = Path(env["HCLS_WORKSPACE"]) / "local"
    keys = list(local.glob("*/startup/*.key"))
    assert len(keys) == 3
    assert all(oct(k.stat().st_mode & 0o777) == "0o600" for k in keys)
    fed_client = json.loads((local / "hospital_a" / "startup" / "fed_client.json").read_text())
    assert fed_client["client"]["connection_security"] == "mtls"
    assert fed_client["servers"][0]["service"]["scheme"] == "grpc"


def test_tiny_cxr_job_trains_and_its_best_model_loads_strictly(deployed, env, tmp_path):
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps(TINY_PROFILE))
    approve(env, "cxr_classification", profile)
    out = run("submit.sh", "cxr_classification", str(profile), "1", env=env).stdout
    job_id = re.search(r"job id (\S+)", out).group(1)
    assert "Round 1 finished" in out and "FINISHED:COMPLETED" in out
    assert re.search(r"validation metric \S+ from client hospital_a", out)

    fetched = run("fetch_model.sh", "cxr_classification", "", str(tmp_path / "agent"), env=env).stdout
    models = Path(env["MODELS_DIR"]) / "cxr_classification"
    info = json.loads((models / "best_model.json").read_text())
    assert info["job_id"] == job_id and info["key_metric"] == "val_auc" and info["round"] == 1
    assert 0.0 <= info["value"] <= 1.0
    assert info["sha256"] == hashlib.sha256((models / "best_model.pt").read_bytes()).hexdigest()
    assert info["nvflare_version"] == "2.9.0"
    assert str(models / "best_model.pt") in fetched

    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=18)
    model.load_state_dict(torch.load(models / "best_model.pt"), strict=True)
    assert (tmp_path / "agent" / "best_model.pt").read_bytes() == (models / "best_model.pt").read_bytes()

    cross_site = json.loads((models / "cross_site_val.json").read_text())
    assert set(cross_site) == {"hospital_a", "hospital_b"}
    assert all("val_auc" in json.dumps(results) for results in cross_site.values())

    # The hand-off: a MONAI bundle whose passport says where the model comes from (tests/unit/test_bundle.py runs one).
    bundle = models / "bundle"
    passport = json.loads((bundle / "configs" / "metadata.json").read_text())["passport"]
    assert passport["job_id"] == job_id and passport["best"]["value"]["round"] == 1
    assert passport["job_digest"]["value"] == info["job_digest"]
    assert passport["model_sha256"] == hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    sites = passport["sites"]["value"]
    assert {s: sites[s]["n_train"]["value"] for s in sites} == {"hospital_a": 24, "hospital_b": 24}
    contributors = passport["rounds"]["value"]["contributors"]
    assert {r: sorted(sites) for r, sites in contributors.items()} == {"0": ["hospital_a", "hospital_b"],
                                                                       "1": ["hospital_a", "hospital_b"]}  # fmt: skip
    assert set(passport["cross_site_validation"]["value"]) == {"hospital_a", "hospital_b"}
    assert all(sites[s]["dp_epsilon_spent"]["value"] is None for s in sites)


def test_bad_input_is_named_and_changes_nothing(deployed, env):
    models = Path(env["MODELS_DIR"]) / "cxr_classification" / "best_model.pt"
    before = models.read_bytes() if models.exists() else None

    bad = run("deploy.sh", "hospital_z", env=env, check=False)
    assert bad.returncode != 0 and "unknown SITE 'hospital_z'" in bad.stderr
    bad = run("submit.sh", "no_such_job", env=env, check=False)
    assert bad.returncode != 0 and "unknown JOB 'no_such_job'" in bad.stderr
    bad = run("fetch_model.sh", "cxr_classification", "00000000-0000-0000-0000-000000000000", env=env, check=False)
    assert bad.returncode != 0 and "error:" in bad.stderr

    data = Path(env["HCLS_WORKSPACE"]) / "data" / "hospital_b"
    data.rename(data.with_name("hospital_b.moved"))
    try:
        bad = run("deploy.sh", "hospital_b", env=env, check=False)
    finally:
        data.with_name("hospital_b.moved").rename(data)
    assert bad.returncode != 0 and f"hospital_b: data root {data}" in bad.stdout

    status = run("control.sh", "status", env=env).stdout
    assert status.count(" running (pid") == 3, status
    assert (models.read_bytes() if models.exists() else None) == before
