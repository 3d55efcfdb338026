"""Sparse updates on the real federation: the CXR job with sparse_update top 10 % sends at most a
quarter of the dense bytes per site and round, and still trains to a best model that loads.

(That top_k_percent 100 aggregates exactly like the dense run is shown on real NVFlare filter and
aggregator objects in tests/unit/test_sparse_filters.py.)"""

import json
from pathlib import Path

import torch

from .conftest import submit_and_fetch
from monai.networks.nets import DenseNet121

SPARSE_10 = {
    "site_resources": None,
    "server": {"num_rounds": 2},
    "client": {"sparse_update": {"enabled": True, "top_k_percent": 10},
               "trainer": {"image_size": [32, 32], "batch_size": 8, "num_workers": 0,
                           "optimizer": {"name": "Adam", "args": {"lr": 0.001}}}},
}  # fmt: skip


def test_top_k_10_sends_at_most_a_quarter_of_the_dense_bytes(deployed, env, tmp_path):
    _, job_id = submit_and_fetch("cxr_classification", SPARSE_10, env, tmp_path)
    models = Path(env["MODELS_DIR"]) / "cxr_classification"
    records = json.loads((models / "update_bytes.json").read_text())
    assert sorted((r["site"], r["round"]) for r in records) == [
        ("hospital_a", 0), ("hospital_a", 1), ("hospital_b", 0), ("hospital_b", 1),
    ]  # fmt: skip
    for r in records:
        assert r["top_k_percent"] == 10 and r["dense_bytes"] > 27e6  # DenseNet-121 in float32
        assert r["sent_bytes"] <= 0.25 * r["dense_bytes"], r

    site_log = next((Path(env["HCLS_WORKSPACE"]) / "local" / "hospital_a").glob(f"{job_id}/log.txt")).read_text()
    assert "sparse updates: top 10.0% per tensor, error feedback" in site_log
    assert json.loads((models / "best_model.json").read_text())["job_id"] == job_id
    DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).load_state_dict(
        torch.load(models / "best_model.pt"), strict=True
    )
