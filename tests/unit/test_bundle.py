"""The fetched model as a MONAI bundle (custom/ops/bundle.py) and fetch's staging (custom/ops/flare_admin.py).

For each job, a bundle is written from a freshly initialised network of the job's own demo build, and run on
one generated image with ``python -m monai.bundle run`` in a fresh process whose PYTHONPATH lacks this
repository (cwd outside it): the bundle alone must do. Its pre-processing must give the trainer's validation
tensors, and the nodule network, spelled with MONAI's own parts, must equal NoduleRetinaNet. A job result laid
out as NVFlare's ``download_job_result`` leaves it is staged as ``make fetch-model`` does, without a server.
"""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CUSTOM = REPO / "custom"
sys.path.insert(0, str(CUSTOM))

from hcls.job_config import JobConfig  # noqa: E402
from ops import bundle, flare_admin, job_builder  # noqa: E402

JOBS = ("cxr_classification", "ct_segmentation", "lung_nodule_detection")
GENERATORS = {"cxr_classification": ("cxr", 64), "ct_segmentation": ("ct", 32), "lung_nodule_detection": ("luna16", 32)}
OVERRIDES = {"lung_nodule_detection": ["--score_thresh", "0.0"]}  # an untrained RetinaNet scores below 0.02


def run_python(args, env=None, cwd=None, **kw):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, **kw)


def build_job(job: str, profile: str, workspace: Path) -> JobConfig:
    env = dict(os.environ, HCLS_WORKSPACE=str(workspace))
    out = subprocess.run([str(REPO / "scripts" / "build_job.sh"), job, profile], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    return JobConfig.from_job_folder(Path(out))


def bundle_env() -> dict:
    """This environment without the repository on PYTHONPATH (MONAI's bundle tools may come from PYTHONPATH)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p and not Path(p).resolve().is_relative_to(REPO)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": os.pathsep.join(paths)} if paths else env


def image_of(job: str, data: Path) -> Path:
    pattern = {"cxr_classification": "images/*/*/*.jpg", "ct_segmentation": "imagesTr/*.nii.gz",
               "lung_nodule_detection": "images/*.nii.gz"}[job]  # fmt: skip
    return sorted(data.glob(pattern))[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per job: its demo job, one generated image, and a bundle of a freshly initialised network."""
    root = tmp_path_factory.mktemp("bundles")
    jobs = {}
    for job in JOBS:
        config = build_job(job, "demo", root / "workspace")
        generator, size = GENERATORS[job]
        data = root / "data" / job
        subprocess.run([sys.executable, "-m", f"datagen.{generator}", "--out", str(data), "--n-train", "1",
                        "--n-val", "1", "--size", str(size), "--seed", "1"], cwd=CUSTOM, check=True,
                       capture_output=True)  # fmt: skip
        torch.manual_seed(0)
        network = config.build_network()
        passport = bundle.passport_from_result(root / "no_result", config, job, "unit-test")
        out = bundle.write_bundle(config, network.state_dict(), passport, root / job / "bundle", job_name=job)
        jobs[job] = {"job": config, "network": network, "data": data, "image": image_of(job, data), "bundle": out,
                     "output": root / job / "eval", "root": root}  # fmt: skip
    return jobs


@pytest.fixture(scope="module")
def runs(built):
    """Each bundle run on its image by MONAI's bundle tools, all three started at once, in fresh processes."""
    root = next(iter(built.values()))["root"]
    env = bundle_env()
    probe = run_python(["-c", "import importlib.util as u, fire, ignite; "
                        "print(u.find_spec('hcls'), u.find_spec('nodule_retinanet'))"], env=env, cwd=root)  # fmt: skip
    assert probe.returncode == 0, f"MONAI's bundle tools need fire and pytorch-ignite (requirements.txt): {probe.stderr}"
    assert probe.stdout.split() == ["None", "None"], "the fresh process must not see this repository's code"
    processes = {}
    for job, entry in built.items():
        out = entry["bundle"]
        command = ["-m", "monai.bundle", "run", "--config_file", str(out / "configs" / "inference.json"),
                   "--meta_file", str(out / "configs" / "metadata.json"), "--bundle_root", str(out),
                   "--input", str(entry["image"]), "--output_dir", str(entry["output"]),
                   *OVERRIDES.get(job, [])]  # fmt: skip
        processes[job] = subprocess.Popen([sys.executable, *command], env=env, cwd=root, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)  # fmt: skip
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()


def finished(built, runs, job) -> Path:
    log, _ = runs[job].communicate(timeout=240)
    assert runs[job].returncode == 0, log[-3000:]
    return built[job]["output"]


def test_bundles_have_monais_inference_properties(built, runs):
    from monai.bundle import ConfigWorkflow

    for entry in built.values():  # MONAI's "inference" workflow properties, all present under their standard ids
        configs = entry["bundle"] / "configs"
        workflow = ConfigWorkflow(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                                  workflow_type="inference", logging_file=False, bundle_root=str(entry["bundle"]))
        workflow.initialize()
        assert workflow.check_properties() == []


def test_bundle_layout_and_metadata(built):
    for entry in built.values():
        out = entry["bundle"]
        for name in ("models/model.pt", "configs/inference.json", "configs/metadata.json", "docs/README.md"):
            assert (out / name).is_file(), name
        entry["network"].load_state_dict(torch.load(out / "models" / "model.pt"), strict=True)
        meta = json.loads((out / "configs" / "metadata.json").read_text())
        for field in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                      "task", "description", "authors", "copyright", "network_data_format", "intended_use", "license"):
            assert meta[field], field  # fmt: skip
        assert meta["required_packages_version"]["nvflare"] == "2.9.0"
        passport = meta["passport"]
        assert passport["job_digest"]["value"] == entry["job"].digest()
        assert passport["model_sha256"] == hashlib.sha256((out / "models/model.pt").read_bytes()).hexdigest()
        assert passport["sites"]["value"] is None and "tb_events" in passport["sites"]["reason"]  # no job result
    meta = json.loads((built["cxr_classification"]["bundle"] / "configs" / "metadata.json").read_text())
    assert meta["label_classes"] == built["cxr_classification"]["job"].trainer()["labels"]
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == meta["label_classes"]


def test_cxr_bundle_gives_18_sigmoid_scores_equal_to_the_network(built, runs):
    entry = built["cxr_classification"]
    rows = list(csv.reader((finished(built, runs, "cxr_classification") / "predictions.csv").open()))
    assert len(rows) == 1 and rows[0][0] == str(entry["image"])
    scores = np.array([float(v) for v in rows[0][1:]])
    assert scores.shape == (18,) and np.all((scores >= 0) & (scores <= 1))

    import cxr_classification as cxr

    image = cxr.image_transforms(entry["job"].trainer(), train=False)({"image": str(entry["image"])})["image"]
    network = entry["network"].eval()
    with torch.no_grad():
        expected = torch.sigmoid(network(image.as_tensor()[None]))[0].numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_ct_bundle_gives_a_label_map_on_the_input_grid(built, runs):
    import nibabel as nib

    entry = built["ct_segmentation"]
    saved = sorted(finished(built, runs, "ct_segmentation").glob("*_seg.nii.gz"))
    assert len(saved) == 1
    source, labels = nib.load(entry["image"]), nib.load(saved[0])
    values = np.asarray(labels.dataobj)
    assert values.shape == source.shape and np.allclose(labels.affine, source.affine)
    assert values.min() >= 0 and values.max() <= 13 and np.issubdtype(values.dtype, np.integer)


def test_nodule_bundle_gives_boxes_and_scores(built, runs):
    entry = built["lung_nodule_detection"]
    (result,) = json.loads((finished(built, runs, "lung_nodule_detection") / "predictions.json").read_text())
    boxes, scores = np.array(result["box"]), np.array(result["score"])
    n = len(scores)
    assert n > 0 and boxes.shape == (n, 6) and np.array(result["box_voxel"]).shape == (n, 6)
    assert np.all(boxes[:, 3:] > 0) and np.all((scores >= 0) & (scores <= 1))
    assert n <= entry["job"].trainer()["inference"]["detections_per_img"]


@pytest.mark.parametrize("job", JOBS)
def test_bundle_preprocessing_is_the_trainers_validation_preprocessing(built, job):
    from monai.bundle import ConfigParser

    entry = built[job]
    trainer = entry["job"].trainer()
    parser = ConfigParser()
    parser.read_config(str(entry["bundle"] / "configs" / "inference.json"))
    got = parser.get_parsed_content("preprocessing")({"image": str(entry["image"])})["image"]
    if job == "cxr_classification":
        import cxr_classification as trainer_module

        expected = trainer_module.image_transforms(trainer, train=False)({"image": str(entry["image"])})["image"]
    elif job == "ct_segmentation":
        import ct_segmentation as trainer_module

        record = {"image": str(entry["image"]), "label": str(entry["data"] / "labelsTr" / entry["image"].name)}
        expected = trainer_module.val_transforms(trainer)(record)["image"]
    else:
        import lung_nodule_detection as trainer_module

        train, val = trainer_module.load_data(trainer, entry["data"])
        record = next(r for r in train + val if Path(r["image"]) == entry["image"])
        expected = trainer_module.detection_transforms(trainer, train=False)(record)["image"]
    assert tuple(got.shape) == tuple(expected.shape)
    assert torch.equal(torch.as_tensor(got).float(), torch.as_tensor(expected).float())


def test_nodule_network_from_monai_parts_equals_nodule_retinanet(built):
    from monai.bundle import ConfigParser

    from nodule_retinanet import NoduleRetinaNet

    entry = built["lung_nodule_detection"]
    assert entry["job"].network["path"] == "nodule_retinanet.NoduleRetinaNet"
    parser = ConfigParser()
    parser.read_config(str(entry["bundle"] / "configs" / "inference.json"))
    config = parser.get("network_def")
    assert config["_target_"].startswith("monai.") and "nodule_retinanet" not in json.dumps(parser.get())
    from_monai = parser.get_parsed_content("network_def").state_dict()
    original = NoduleRetinaNet(**entry["job"].network["args"]).state_dict()
    assert list(from_monai) == list(original)
    assert {k: tuple(v.shape) for k, v in from_monai.items()} == {k: tuple(v.shape) for k, v in original.items()}
    assert config["size_divisible"] == [int(s) for s in NoduleRetinaNet(**entry["job"].network["args"]).size_divisible]


def test_the_dp_nodule_network_from_monai_parts_has_group_norm_in_the_whole_backbone(tmp_path):
    """The nodule job's dp profile names group norm for the backbone; MONAI's ResNet would leave its blocks' batch
    norms, so the bundle replaces them by a config expression: same state_dict, same layers."""
    from monai.bundle import ConfigParser

    from nodule_retinanet import NoduleRetinaNet

    config = job_builder.resolve("lung_nodule_detection", "dp")
    persistor = next(c for c in config["server"]["components"] if c["id"] == "persistor")
    args = persistor["args"]["model"]["args"]
    assert args["norm"] == ["group", {"num_groups": 32}]
    parser = ConfigParser(bundle.network_config({"path": "nodule_retinanet.NoduleRetinaNet", "args": args}))
    from_monai = parser.get_parsed_content("network_def")
    original = NoduleRetinaNet(**args)
    assert {k: tuple(v.shape) for k, v in from_monai.state_dict().items()} == {
        k: tuple(v.shape) for k, v in original.state_dict().items()}  # fmt: skip
    assert [type(m).__name__ for m in from_monai.modules()][1:] == [type(m).__name__ for m in original.modules()][1:]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in from_monai.modules())
    from_monai.load_state_dict(original.state_dict())


def test_a_network_outside_monai_is_refused():
    with pytest.raises(bundle.BundleError, match="network my_models.Net cannot be imported"):
        bundle.network_config({"path": "my_models.Net", "args": {}})
    with pytest.raises(bundle.BundleError, match="has no bundle_config"):
        bundle.network_config({"path": "sparse_update.SparseUpdateEncoder", "args": {}})
    with pytest.raises(bundle.BundleError, match="evaluated"):
        bundle.network_config({"path": "monai.networks.nets.DenseNet121", "args": {"norm": "$os.system('x')"}})


# ---------------------------------------------------------------- fetch staging from a job result


def fake_result(root: Path, job: JobConfig, state_dict: dict, sites=("hospital_a", "hospital_b"), dp=True) -> Path:
    """A job result as download_job_result leaves it: job/<name>/ (as submitted) and workspace/ (the server's run)."""
    from torch.utils.tensorboard import SummaryWriter

    result = root / "result"
    shutil.copytree(job.app_dir.parent, result / "job" / job.app_dir.parent.name)
    server = result / "workspace" / "app_server"
    server.mkdir(parents=True)
    weights = {"model": {k: v.numpy() for k, v in state_dict.items()}, "meta_props": {}}
    torch.save(weights, server / "best_FL_global_model.pt")
    log = []
    for rnd in range(3):
        log.append(f"2026-12-03 04:00:0{rnd},000 - ScatterAndGather - INFO - [identity=x]: Round {rnd} started.")
        for site in sites:
            verdict = "REJECTED" if (rnd, site) == (2, sites[1]) else "ACCEPTED"
            log.append(f"2026-12-03 04:00:0{rnd},500 - ScatterAndGather - INFO - [identity=x]: Contribution from "
                       f"{site} {verdict} by the aggregator at round {rnd}.")  # fmt: skip
    log.append("2026-12-03 04:00:09,000 - IntimeModelSelector - INFO - [identity=x]: new best validation metric "
               "at round 1: 0.625")  # fmt: skip
    (result / "workspace" / "log.txt").write_text("\n".join(log) + "\n")
    cross = {s: {"SRV_best_FL_global_model.pt": {job.key_metric: 0.5 + i / 10}, "SRV_FL_global_model.pt": {}}
             for i, s in enumerate(sites)}  # fmt: skip
    (result / "workspace" / "cross_site_val").mkdir()
    (result / "workspace" / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(cross))
    for i, site in enumerate(sites):
        writer = SummaryWriter(str(result / "workspace" / "tb_events" / site))
        writer.add_scalar("n_train", 10 * (i + 1), 0)
        for rnd in range(3):
            writer.add_scalar(job.key_metric, 0.4 + rnd / 10, rnd)
            if dp and i == 0:
                writer.add_scalar("dp_epsilon", 0.5 * (rnd + 1), rnd)
        writer.close()
    return result


def test_fetch_stages_a_dp_job_from_its_own_definition(tmp_path):
    job = build_job("cxr_classification", "dp", tmp_path / "workspace")  # DenseNet-121 with GroupNorm
    assert job.network["args"]["norm"][0] == "group"
    torch.manual_seed(0)
    state = job.build_network().state_dict()
    result = fake_result(tmp_path, job, state)
    shutil.rmtree(tmp_path / "workspace")  # nothing but the job result is read

    out = tmp_path / "models" / "cxr_classification"
    out.mkdir(parents=True)
    (out / "bundle").mkdir()
    (out / "bundle" / "stale").write_text("an earlier fetch")
    info = flare_admin.stage(result, "cxr_classification", "job-1", tmp_path / "staged")
    flare_admin.swap_in(tmp_path / "staged", out)

    assert info["round"] == 1 and info["value"] == 0.625 and info["key_metric"] == "val_auc"
    assert info["initial_value"] == pytest.approx(0.4)
    loaded = torch.load(out / "best_model.pt")
    from monai.networks.nets import DenseNet121

    DenseNet121(**job.network["args"]).load_state_dict(loaded, strict=True)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert json.loads((out / "cross_site_val.json").read_text())["hospital_a"]
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["hospital_a", "hospital_b"]
    assert not (out / "bundle" / "stale").exists()

    config = json.loads((out / "bundle" / "configs" / "inference.json").read_text())
    assert config["network_def"]["norm"] == ["group", {"num_groups": 32}]
    passport = json.loads((out / "bundle" / "configs" / "metadata.json").read_text())["passport"]
    assert passport["job_id"] == "job-1" and passport["job_digest"]["value"] == info["job_digest"]
    sites = passport["sites"]["value"]
    assert sites["hospital_a"]["n_train"]["value"] == 10 and sites["hospital_b"]["n_train"]["value"] == 20
    assert sites["hospital_a"]["dp_epsilon_spent"]["value"] == pytest.approx(1.5)
    assert sites["hospital_b"]["dp_epsilon_spent"]["value"] is None
    assert "without differential privacy" in sites["hospital_b"]["dp_epsilon_spent"]["reason"]
    assert sites["hospital_b"]["contributed_rounds"]["value"] == [0, 1]
    rounds = passport["rounds"]["value"]
    assert rounds["planned"] == job.num_rounds and rounds["run"] == [0, 1, 2]
    assert rounds["contributors"]["2"] == ["hospital_a"] and rounds["rejected"] == {"2": ["hospital_b"]}
    assert passport["best"]["value"] == {"round": 1, "key_metric": "val_auc", "value": 0.625}
    assert passport["cross_site_validation"]["value"]["hospital_b"]["value"] == pytest.approx(0.6)
    assert passport["model_sha256"] == hashlib.sha256(
        (out / "bundle" / "models" / "model.pt").read_bytes()).hexdigest()  # fmt: skip
    readme = (out / "bundle" / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run" in readme and "hospital_a" in readme


def test_fetch_refuses_ciphertexts_and_a_wrong_job_before_writing(tmp_path):
    job = build_job("cxr_classification", "demo", tmp_path / "workspace")
    state = {k: v for k, v in list(job.build_network().state_dict().items())[:3]}
    result = fake_result(tmp_path, job, state, dp=False)
    torch.save({"model": {k: b"ckks" for k in state}}, result / "workspace" / "app_server" / "best_FL_global_model.pt")
    with pytest.raises(flare_admin.AdminError, match="holds CKKS ciphertexts"):
        flare_admin.stage(result, "cxr_classification", "job-2", tmp_path / "staged")
    with pytest.raises(flare_admin.AdminError, match="is a cxr_classification job, not ct_segmentation"):
        flare_admin.stage(result, "ct_segmentation", "job-2", tmp_path / "staged2")
    shutil.rmtree(result / "job")
    with pytest.raises(flare_admin.AdminError, match="no single job definition"):
        flare_admin.stage(result, "cxr_classification", "job-2", tmp_path / "staged3")
