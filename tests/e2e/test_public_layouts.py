"""The CXR job trains across two public releases' layouts at once: hospital_a holds a CheXpert-v1.0-small
tree, hospital_b NIH ChestX-ray14, each exactly as the generators write them (file names, folders, columns,
value conventions of the real downloads). The shared federation's CXR data (the project's layout, see
tests/tiny_data.json) is swapped out for this test and back; the deployed sites are not touched.
(The 3D layouts, an MSD ``dataset.json`` with DICOM series and LUNA16 ``subset*/`` MetaImage, are
hospital_b's data for the whole session: scripts/generate_data.sh, test_3d_jobs.py.)"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, TINY_DATA, approve, run

TINY_PROFILE = json.loads((REPO / "tests" / "tiny_cxr_profile.json").read_text())
LAYOUTS = {"hospital_a": "chexpert-small", "hospital_b": "nih"}


def cxr_dataset(env, site: str) -> Path:
    config = json.loads((REPO / "site_configs" / f"site_{site}" / "local_config.json").read_text())
    return Path(env["HCLS_WORKSPACE"]) / "data" / site / config["datasets"]["cxr_classification"]


@pytest.fixture
def public_cxr_layouts(deployed, env):
    """Each site's CXR dataset folder holds its public layout while the test runs."""
    swapped = []
    try:
        for seed, (site, layout) in enumerate(LAYOUTS.items(), start=1):
            dataset = cxr_dataset(env, site)
            generated = dataset.with_name(f"{dataset.name}.{layout}")
            subprocess.run(
                [sys.executable, "-m", "datagen.cxr", "--out", str(generated), "--layout", layout, "--seed", str(seed),
                 "--n-train", TINY_DATA["CXR_N_TRAIN"], "--n-val", TINY_DATA["CXR_N_VAL"],
                 "--size", TINY_DATA["CXR_SIZE"]],
                cwd=REPO / "custom", check=True, capture_output=True,
            )  # fmt: skip
            dataset.rename(dataset.with_name(f"{dataset.name}.project"))
            generated.rename(dataset)
            swapped.append(dataset)
        yield
    finally:
        for dataset in swapped:
            shutil.rmtree(dataset)
            dataset.with_name(f"{dataset.name}.project").rename(dataset)


def test_cxr_trains_across_chexpert_and_nih_downloads(public_cxr_layouts, env, tmp_path):
    profile = tmp_path / "tiny.json"
    profile.write_text(json.dumps({**TINY_PROFILE, "server": {"num_rounds": 1}}))
    approve(env, "cxr_classification", profile)
    out = run("submit.sh", "cxr_classification", str(profile), "1", env=env).stdout
    job_id = re.search(r"job id (\S+)", out).group(1)
    assert "Round 0 finished" in out and "FINISHED:COMPLETED" in out, out[-3000:]

    local = Path(env["HCLS_WORKSPACE"]) / "local"
    logs = {site: next((local / site).glob(f"{job_id}/log.txt")).read_text() for site in LAYOUTS}
    # CheXpert has no column for 7 of the 18 outputs, NIH none for 4: masked there, never negatives.
    assert re.search(r"chexpert layout; 7 of 18 outputs never supervised here \(.*Infiltration", logs["hospital_a"])
    assert re.search(r"nih layout; 4 of 18 outputs never supervised here \(.*Fracture", logs["hospital_b"])
    assert "n_train=24" in logs["hospital_a"] and "n_train=24" in logs["hospital_b"]
    for site, log in logs.items():
        auc = re.findall(r"val_auc\W+([0-9.]+)", log)
        assert auc and all(0.0 <= float(v) <= 1.0 for v in auc), (site, log[-2000:])
