"""Homomorphic encryption on the real federation (kits provisioned with HE=1 by the session fixture):
the CXR job with profiles/he.json and a tiny network completes, the server aggregates and persists
CKKS ciphertexts only, and only a site's context can decrypt them."""

import json
import sys
import tempfile
from pathlib import Path

import pytest
import tenseal as ts
import torch

from .conftest import REPO, admin_kit, approve, run
from monai.networks.nets import DenseNet

sys.path.insert(0, str(REPO / "custom"))
from ops import flare_admin  # noqa: E402

# DenseNet-121 under full encryption needs ~15 GB in the server job process; this one (7k parameters) fits.
TINY_NET = {"spatial_dims": 2, "in_channels": 1, "out_channels": 18, "init_features": 8, "growth_rate": 8,
            "block_config": [2, 2], "bn_size": 2}  # fmt: skip


def he_profile() -> dict:
    profile = json.loads((REPO / "job_configs" / "cxr_classification" / "profiles" / "he.json").read_text())
    for component in profile["server"]["components"]:
        if component["id"] == "persistor":
            component["args"]["model"] = {"path": "monai.networks.nets.DenseNet", "args": TINY_NET}
    profile["site_resources"] = None
    profile["server"]["num_rounds"] = 2
    profile["client"]["trainer"] = {"image_size": [32, 32], "batch_size": 8, "num_workers": 0,
                                    "optimizer": {"name": "Adam", "args": {"lr": 0.001}}}  # fmt: skip
    return profile


@pytest.fixture(scope="module")
def he_job(deployed, env, tmp_path_factory):
    overlay = tmp_path_factory.mktemp("he") / "he_tiny.json"
    overlay.write_text(json.dumps(he_profile()))
    approve(env, "cxr_classification", overlay)
    out = run("submit.sh", "cxr_classification", str(overlay), "1", env=env).stdout
    return out, out.split("job id ")[1].split()[0]


def test_tiny_job_completes_under_he(he_job, env):
    out, job_id = he_job
    assert "Round 1 finished" in out and "FINISHED:COMPLETED" in out
    for site in ("hospital_a", "hospital_b"):
        site_log = next((Path(env["HCLS_WORKSPACE"]) / "local" / site).glob(f"{job_id}/log.txt")).read_text()
        assert "Encryption time for" in site_log and "Decryption time for" in site_log  # round 1 got ciphertext


def test_the_server_persists_ciphertext_that_only_a_site_can_decrypt(he_job, env):
    _, job_id = he_job
    with flare_admin.session(admin_kit(env)) as sess, tempfile.TemporaryDirectory() as tmp:
        result = Path(sess.download_job_result(job_id, destination=tmp))
        models = {name: torch.load(next(result.rglob(name)), weights_only=False)["model"]
                  for name in ("FL_global_model.pt", "best_FL_global_model.pt")}  # fmt: skip
    shapes = {k: v.numel() for k, v in DenseNet(**TINY_NET).state_dict().items()}
    startup = Path(env["HCLS_WORKSPACE"]) / "local"
    server_ctx = ts.context_from((startup / "flare-server" / "startup" / "server_context.tenseal").read_bytes())
    site_ctx = ts.context_from((startup / "hospital_a" / "startup" / "client_context.tenseal").read_bytes())
    assert not server_ctx.has_secret_key() and site_ctx.has_secret_key()
    for name, weights in models.items():
        assert set(weights) == set(shapes), name
        assert all(isinstance(v, bytes) for v in weights.values()), f"{name} holds plaintext"
        with pytest.raises(ValueError, match="doesn.t hold a secret_key"):
            ts.ckks_vector_from(server_ctx, weights["class_layers.out.bias"]).decrypt()
        for key, blob in weights.items():
            values = ts.ckks_vector_from(site_ctx, blob).decrypt()
            assert len(values) == shapes[key] and all(abs(v) < 1e3 for v in values), key


def test_fetching_an_he_model_says_why_and_keeps_the_earlier_model(he_job, env):
    _, job_id = he_job
    best = Path(env["MODELS_DIR"]) / "cxr_classification" / "best_model.pt"
    before = best.read_bytes() if best.exists() else None
    bad = run("fetch_model.sh", "cxr_classification", job_id, env=env, check=False)
    assert bad.returncode == 1 and "holds CKKS ciphertexts" in bad.stderr
    assert (best.read_bytes() if best.exists() else None) == before
