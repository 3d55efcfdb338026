"""The two 3D jobs through the same real federation: a tiny CT segmentation job and a tiny
lung nodule detection job train on generated data, and the imaging agent loads the fetched
best models with its own code, unchanged. The sites hold different layouts, as
scripts/generate_data.sh writes them: hospital_a the project's NIfTI lists, hospital_b an MSD
task's ``dataset.json`` (its own label numbering and names) over DICOM series folders for CT,
and LUNA16 as distributed (``subset*/`` MetaImage) for the nodules."""

import json
from pathlib import Path

import torch
from monai.networks.nets import SegResNet

from .conftest import REPO, submit_and_fetch

CT_TINY = {
    "site_resources": None,
    "server": {"num_rounds": 2},
    "client": {"trainer": {"pixdim": [2.0, 2.0, 2.5], "roi_size": [16, 16, 16], "num_samples": 1, "batch_size": 1,
                           "num_workers": 0, "sliding_window": {"sw_batch_size": 1, "overlap": 0.25}}},
}  # fmt: skip
NODULE_TINY = {
    "site_resources": None,
    "server": {"num_rounds": 2},
    "client": {"trainer": {"spacing": [1.4, 1.4, 2.5], "patch_size": [32, 32, 16], "val_patch_size": [48, 48, 16],
                           "batch_size": 1, "num_workers": 0, "inference": {"detections_per_img": 20}}},
}  # fmt: skip


def site_log(env, site: str, job_id: str) -> str:
    return next((Path(env["HCLS_WORKSPACE"]) / "local" / site).glob(f"{job_id}/log.txt")).read_text()


def fetched(env, job):
    models = Path(env["MODELS_DIR"]) / job
    return models, json.loads((models / "best_model.json").read_text())


def test_ct_segmentation_model_loads_with_the_imaging_agent_code(deployed, env, tmp_path):
    out, job_id = submit_and_fetch("ct_segmentation", CT_TINY, env, tmp_path)
    assert "FINISHED:COMPLETED" in out
    assert "ct_segmentation: project layout" in site_log(env, "hospital_a", job_id)
    assert "ct_segmentation: msd layout; made background: vertebrae" in site_log(env, "hospital_b", job_id)
    models, info = fetched(env, "ct_segmentation")
    assert info["job_id"] == job_id and info["key_metric"] == "val_mean_dice" and info["round"] == 1

    path = models / "best_model.pt"
    model = SegResNet(spatial_dims=3, in_channels=1, out_channels=14, init_filters=32, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1])
    model.load_state_dict(torch.load(path)); model.eval()  # fmt: skip

    cross_site = json.loads((models / "cross_site_val.json").read_text())
    assert set(cross_site) == {"hospital_a", "hospital_b"}
    assert any(k.startswith("val_dice_") for k in json.dumps(cross_site).split('"'))
    assert list((models / "tensorboard").glob("hospital_a/events.out.tfevents.*"))


def test_lung_nodule_model_loads_into_the_configured_network(deployed, env, tmp_path):
    out, job_id = submit_and_fetch("lung_nodule_detection", NODULE_TINY, env, tmp_path)
    assert "FINISHED:COMPLETED" in out
    assert "lung_nodule_detection: nifti layout" in site_log(env, "hospital_a", job_id)
    assert "lung_nodule_detection: luna16 layout" in site_log(env, "hospital_b", job_id)
    models, info = fetched(env, "lung_nodule_detection")
    assert info["job_id"] == job_id and info["key_metric"] == "val_froc" and info["round"] == 1
    assert 0.0 <= info["value"] <= 1.0

    import sys

    sys.path.insert(0, str(REPO / "custom"))
    from nodule_retinanet import NoduleRetinaNet
    from ops import job_builder

    server = job_builder.resolve("lung_nodule_detection")["server"]
    args = next(c for c in server["components"] if c["id"] == "persistor")["args"]["model"]["args"]
    model = NoduleRetinaNet(**args)
    model.load_state_dict(torch.load(models / "best_model.pt")); model.eval()  # fmt: skip
    assert set(json.loads((models / "cross_site_val.json").read_text())) == {"hospital_a", "hospital_b"}
