"""Unit tests of the lung nodule detection data handling: world -> voxel conversion, the
LUNA16-layout checks, the demo data generator, the detection pipeline, the FROC metric, and
the trainer that ``build(job, site, device)`` wires from a built job and a site config.
No NVFlare process needed."""

import csv
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.utils import set_determinism

REPO = Path(__file__).resolve().parents[2]
CUSTOM = REPO / "custom"
sys.path.insert(0, str(CUSTOM))

import froc  # noqa: E402
import lung_nodule_detection as lnd  # noqa: E402
from datagen import luna16 as datagen  # noqa: E402
from hcls.job_config import JobConfig  # noqa: E402
from hcls.site_config import SiteConfig  # noqa: E402
from hcls.training import Trainer, train_epochs  # noqa: E402
from ops import job_builder  # noqa: E402


def build_job(out: Path, profile: str = "", overlay: dict | None = None) -> JobConfig:
    """The lung_nodule_detection job folder as ``job_builder`` builds it (PROFILE, then ``overlay`` on top)."""
    config = job_builder.resolve(lnd.JOB_NAME, profile)
    if overlay:
        config = job_builder.merge(config, overlay, "test overlay")
    return JobConfig.from_job_folder(job_builder.write_job(config, out / "job"))


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory) -> JobConfig:
    """The job built with the demo profile (as scripts/build_job.sh builds it)."""
    return build_job(tmp_path_factory.mktemp("demo_job"), "demo")


@pytest.fixture(scope="module")
def demo_trainer(demo_job) -> dict:
    """The job's trainer settings with the demo profile applied."""
    return lnd.load_settings(demo_job)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A small generated LUNA16-layout dataset (never modified)."""
    out = tmp_path_factory.mktemp("luna16")
    datagen.generate(out, n_train=2, n_val=2, seed=5, size=32)
    return out


@pytest.fixture
def data_dir(tmp_path, generated) -> Path:
    """A private copy of the generated dataset, for tests that break it."""
    return Path(shutil.copytree(generated, tmp_path / "data"))


def annotation_rows(data_dir: Path) -> list[dict]:
    with open(data_dir / "annotations" / "annotations.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_annotations(data_dir: Path, lines: list[str]) -> None:
    (data_dir / "annotations" / "annotations.csv").write_text("".join(line + "\n" for line in lines))


def split_entries(data_dir: Path, split: str = "train") -> list[dict]:
    file, key = lnd.SPLITS[split]
    return json.loads((data_dir / file).read_text())[key]


def write_split(data_dir: Path, entries: list, split: str = "train") -> None:
    file, key = lnd.SPLITS[split]
    (data_dir / file).write_text(json.dumps({key: entries}))


def load_error(trainer: dict, data_dir: Path) -> str:
    with pytest.raises(ValueError) as info:
        lnd.load_data(trainer, data_dir)
    return str(info.value)


# ---------------------------------------------------------------- world -> voxel


# An image with spacing 0.5 x 0.8 x 2.5 mm, LPS origin (-100, 50, -300) and a flipped z
# axis in LPS: world_lps(i, j, k) = (-100 + 0.5 i, 50 + 0.8 j, -300 - 2.5 k).
# Its NIfTI (RAS) affine negates the x and y rows.
HAND_AFFINE = np.array(
    [[-0.5, 0.0, 0.0, 100.0],
     [0.0, -0.8, 0.0, -50.0],
     [0.0, 0.0, -2.5, -300.0],
     [0.0, 0.0, 0.0, 1.0]]
)  # fmt: skip


def test_world_to_voxel_known_answer():
    # (-95, 58, -310): i = 5 / 0.5 = 10, j = 8 / 0.8 = 10, k = -10 / -2.5 = 4
    assert lnd.world_to_voxel([-95.0, 58.0, -310.0], HAND_AFFINE) == pytest.approx([10.0, 10.0, 4.0])
    points = np.array([[-100.0, 50.0, -300.0], [-99.75, 51.2, -291.25]])  # origin; (0.5, 1.5, -3.5)
    assert lnd.world_to_voxel(points, HAND_AFFINE) == pytest.approx(np.array([[0, 0, 0], [0.5, 1.5, -3.5]]))


def test_world_to_voxel_uses_the_saved_affine(tmp_path):
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 8), dtype=np.int16), HAND_AFFINE), path)
    affine, shape = lnd.nifti_geometry(path)
    assert shape == (20, 20, 8)
    voxel = lnd.world_to_voxel([-95.0, 58.0, -310.0], affine)
    assert voxel == pytest.approx([10.0, 10.0, 4.0])
    assert lnd.inside_volume(voxel, shape)
    assert not lnd.inside_volume(lnd.world_to_voxel([-95.0, 58.0, -290.0], affine), shape)  # k = -4


# ---------------------------------------------------------------- generator


def test_generator_is_deterministic(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        datagen.generate(tmp_path / name, n_train=1, n_val=1, seed=seed, size=32)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5  # 2 images, annotations.csv, 2 split lists
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "annotations" / "annotations.csv").read_text() != (
        tmp_path / "c" / "annotations" / "annotations.csv"
    ).read_text()


def test_generated_geometry_is_luna16_like(generated):
    entries = split_entries(generated, "train") + split_entries(generated, "val")
    assert len(entries) == 4
    for entry in entries:
        uid = entry["seriesuid"]
        assert uid.startswith(datagen.UID_PREFIX) and uid.replace(".", "").isdigit()
        assert entry["image"] == f"images/{uid}.nii.gz"
        affine, shape = lnd.nifti_geometry(generated / entry["image"])
        spacing = np.abs(np.diag(affine)[:3])
        assert spacing[2] > spacing[0] * 1.5  # anisotropic
        assert np.all(affine[:3, 3] != 0)  # non-zero origin
        lps_direction = np.sign(np.diag(affine)[:3]) * [-1, -1, 1]
        assert (lps_direction < 0).any()  # at least one flipped axis in the LPS frame


def test_annotations_land_on_the_nodules(generated):
    """World coords of annotations.csv -> voxel through the affine -> the bright nodule, not the lung."""
    rows = annotation_rows(generated)
    assert len(rows) >= 4  # 1-3 nodules in each of the 4 series
    naive_hits = 0
    for row in rows:
        image = nib.load(generated / "images" / f"{row['seriesuid']}.nii.gz")
        volume = np.asarray(image.dataobj)
        centre = np.array([float(row[c]) for c in ("coordX", "coordY", "coordZ")])
        voxel = tuple(lnd.world_to_voxel(centre, image.affine).round().astype(int))
        assert volume[voxel] > -300, row  # nodule ~ +50 HU; lung ~ -800 HU
        # a reader that assumes an identity direction (index = (world - origin) / spacing) misses it
        origin_lps = image.affine[:3, 3] * [-1, -1, 1]
        naive = np.round((centre - origin_lps) / np.abs(np.diag(image.affine)[:3])).astype(int)
        inside = np.all(naive >= 0) and np.all(naive < volume.shape)
        naive_hits += bool(inside and volume[tuple(naive)] > -300)
    assert naive_hits == 0


def test_pipeline_boxes_follow_resampling(generated, demo_trainer):
    """After RAS reorientation and resampling, each box is centred on its nodule and sized by the spacing."""
    trainer = {**demo_trainer, "spacing": [1.0, 1.0, 2.0]}
    train_records, val_records = lnd.load_data(trainer, generated)
    transform = lnd.detection_transforms(trainer, train=False)
    for record in train_records + val_records:
        data = transform(record)
        image, boxes = data["image"][0], data["box"]
        assert boxes.shape == (len(record["label"]), 6)
        for box, world_box in zip(boxes, record["box"]):
            centre = tuple(((box[:3] + box[3:]) / 2 - 0.5).round().long().tolist())
            assert image[centre] > 0.5  # nodule: (50 + 1024) / 1324 = 0.81 (less once resampled); lung 0.17
            size = (box[3:] - box[:3]).numpy()
            assert size == pytest.approx(world_box[3:] / np.array(trainer["spacing"]), rel=1e-3)


def test_positive_only_crops_hold_a_whole_nodule(generated, demo_trainer):
    """With crop_pos_neg [1, 0] every training patch holds at least one nodule's whole, unclipped box."""
    set_determinism(seed=0)
    trainer = {**demo_trainer, "crop_pos_neg": [1, 0], "batch_size": 3}
    train_records, _ = lnd.load_data(trainer, generated)
    transform = lnd.detection_transforms(trainer, train=True)
    for record in train_records:
        whole_sizes = record["box"][:, 3:] / np.array(trainer["spacing"])
        for patch in transform(record):
            sizes = (patch["box"][:, 3:] - patch["box"][:, :3]).numpy()
            assert len(sizes) and any(np.allclose(size, whole, rtol=1e-3) for size in sizes for whole in whole_sizes)


# ---------------------------------------------------------------- data checks


def test_generated_data_loads(generated, demo_trainer):
    train_records, val_records = lnd.load_data(demo_trainer, generated)
    assert [r["seriesuid"] for r in train_records] == [e["seriesuid"] for e in split_entries(generated)]
    assert len(val_records) == 2
    assert sum(len(r["label"]) for r in train_records + val_records) == len(annotation_rows(generated))
    assert all(r["box"].shape == (len(r["label"]), 6) for r in train_records)


def test_missing_annotations(data_dir, demo_trainer):
    (data_dir / "annotations" / "annotations.csv").unlink()
    assert "annotations.csv: annotations file not found" in load_error(demo_trainer, data_dir)


def test_bad_header(data_dir, demo_trainer):
    write_annotations(data_dir, ["seriesuid,x,y,z,diameter_mm", "1.2,1,2,3,4"])
    message = load_error(demo_trainer, data_dir)
    assert "annotations.csv, row 1 (header)" in message and "'coordX'" in message


def test_unknown_series(data_dir, demo_trainer):
    lines = (data_dir / "annotations" / "annotations.csv").read_text().splitlines()
    write_annotations(data_dir, [*lines, "1.2.3.4,1,2,3,5"])
    message = load_error(demo_trainer, data_dir)
    assert f"annotations.csv, row {len(lines) + 1}, column 'seriesuid': series '1.2.3.4' has no image" in message


def test_non_numeric_value(data_dir, demo_trainer):
    lines = (data_dir / "annotations" / "annotations.csv").read_text().splitlines()
    uid, x, _, z, d = lines[1].split(",")
    lines[1] = ",".join([uid, x, "abc", z, d])
    lines.append(f"{uid},{x},0,{z},-3")
    write_annotations(data_dir, lines)
    message = load_error(demo_trainer, data_dir)
    assert "annotations.csv, row 2, column 'coordY': value 'abc' is not a finite number" in message
    assert f"annotations.csv, row {len(lines)}, column 'diameter_mm'" in message


def test_position_outside_the_volume(data_dir, demo_trainer):
    """The far corner of the volume if its direction were the identity: outside, through the real affine."""
    row = annotation_rows(data_dir)[0]
    affine, shape = lnd.nifti_geometry(data_dir / "images" / f"{row['seriesuid']}.nii.gz")
    origin_lps = affine[:3, 3] * [-1, -1, 1]
    naive_world = origin_lps + np.abs(np.diag(affine)[:3]) * (np.array(shape) - 1)
    assert not lnd.inside_volume(lnd.world_to_voxel(naive_world, affine), shape)
    lines = (data_dir / "annotations" / "annotations.csv").read_text().splitlines()
    write_annotations(data_dir, [*lines, f"{row['seriesuid']},{naive_world[0]},{naive_world[1]},{naive_world[2]},6"])
    message = load_error(demo_trainer, data_dir)
    assert f"annotations.csv, row {len(lines) + 1}, columns coordX,coordY,coordZ" in message
    assert "is outside the volume" in message


def test_list_entry_with_missing_file(data_dir, demo_trainer):
    entries = split_entries(data_dir)
    entries[1]["image"] = "images/missing.nii.gz"
    write_split(data_dir, entries)
    message = load_error(demo_trainer, data_dir)
    assert "train_data.json, entry training[1], field 'image'" in message and "does not exist" in message


def test_non_nifti_by_extension(data_dir, demo_trainer):
    entries = split_entries(data_dir)
    source = data_dir / entries[0]["image"]
    shutil.copy(source, data_dir / "images" / "scan.mhd")
    entries[0]["image"] = "images/scan.mhd"
    write_split(data_dir, entries)
    message = load_error(demo_trainer, data_dir)
    assert "train_data.json, entry training[0], field 'image'" in message and "not a NIfTI file" in message


def test_non_nifti_by_content(data_dir, demo_trainer):
    entry = split_entries(data_dir, "val")[1]
    (data_dir / entry["image"]).write_bytes(b"this is not a NIfTI volume" * 20)
    message = load_error(demo_trainer, data_dir)
    assert "val_data.json, entry validation[1], field 'image'" in message
    assert "not a readable NIfTI file" in message
    # the annotation rows of that series hit the same unreadable header
    assert "annotations.csv, row" in message


def test_empty_split(data_dir, demo_trainer):
    write_split(data_dir, [], split="val")
    assert "val_data.json: 'validation' lists no series, the split is empty" in load_error(demo_trainer, data_dir)


def test_split_without_nodules(data_dir, demo_trainer):
    val_uids = {e["seriesuid"] for e in split_entries(data_dir, "val")}
    lines = (data_dir / "annotations" / "annotations.csv").read_text().splitlines()
    write_annotations(data_dir, [lines[0], *(line for line in lines[1:] if line.split(",")[0] not in val_uids)])
    assert "val_data.json: no series of 'validation' has a nodule" in load_error(demo_trainer, data_dir)


# ---------------------------------------------------------------- FROC


def cube(centre, side=4.0) -> list[float]:
    half = side / 2
    return [centre - half] * 3 + [centre + half] * 3


def test_froc_perfect_and_empty():
    gt = [np.array([cube(10), cube(30)]), np.array([cube(50)])]
    perfect = froc.froc_score(gt, [np.array([0.9, 0.8]), np.array([0.3])], gt)
    assert perfect == pytest.approx(1.0)
    empty = [np.zeros((0, 6)), np.zeros((0, 6))]
    assert froc.froc_score(empty, [np.zeros(0), np.zeros(0)], gt) == 0.0


def test_froc_hand_computed():
    """Two scans with one nodule each.

    Scan 1: TP 0.9, FPs 0.8 and 0.7; scan 2: TP 0.6, FP 0.5. Operating points (FPs per scan,
    sensitivity): threshold 0.9 -> (0, 1/2); 0.8 -> (1/2, 1/2); 0.7 -> (1, 1/2); 0.6 -> (1, 1);
    0.5 -> (3/2, 1). At 1/8, 1/4, 1/2 FPs per scan the sensitivity is 1/2, at 1, 2, 4, 8 it is 1:
    (3 * 1/2 + 4 * 1) / 7 = 11/14.
    """
    gt = [np.array([cube(10)]), np.array([cube(30)])]
    preds = [np.array([cube(10.5), cube(50), cube(60)]), np.array([cube(29.5), cube(70)])]
    scores = [np.array([0.9, 0.8, 0.7]), np.array([0.6, 0.5])]
    assert froc.froc_score(preds, scores, gt) == pytest.approx(11 / 14)
    fps, sensitivity = froc.froc_curve(preds, scores, gt)
    assert (1.0, 1.0) in set(zip(fps.tolist(), sensitivity.tolist()))


def test_froc_iou_threshold_and_duplicates():
    gt = [np.array([cube(10)])]
    far = [np.array([cube(13)])]  # overlap 1 x 1 x 1 of two 4^3 boxes: IoU 1 / 127 < 0.1
    assert froc.froc_score(far, [np.array([0.9])], gt) == 0.0
    near = [np.array([cube(11)])]  # IoU 27 / 101 >= 0.1
    assert froc.froc_score(near, [np.array([0.9])], gt) == 1.0
    # One scan, nodules A and B: hit on A 0.9, second hit on A 0.8 (a false positive), hit on B 0.7.
    # Operating points: (0 FP, 1/2), (1 FP, 1/2), (1 FP, 1) -> 1/2 below 1 FP per scan, 1 from 1 on.
    gt = [np.array([cube(10), cube(30)])]
    preds = [np.array([cube(10), cube(10.2), cube(30)])]
    assert froc.froc_score(preds, [np.array([0.9, 0.8, 0.7])], gt) == pytest.approx(11 / 14)


def test_froc_without_nodules_is_nan():
    with pytest.warns(UserWarning, match="no ground-truth nodule"):
        assert np.isnan(froc.froc_score([np.array([cube(3)])], [np.array([0.5])], [np.zeros((0, 6))]))


# ---------------------------------------------------------------- detector


@pytest.fixture(scope="module")
def network(demo_job):
    return demo_job.build_network()


def test_patch_sizes_must_fit_the_network(network, demo_job, demo_trainer):
    with pytest.raises(ValueError, match=r"config_fed_client.json: trainer.patch_size \[24, 32, 16\] must be 3 sizes"):
        lnd.build_detector(network, {**demo_trainer, "patch_size": [24, 32, 16]}, demo_job.client_path)


def test_matcher_and_loss_choice(network, demo_job, demo_trainer):
    from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
    from torchvision.models.detection._utils import Matcher

    config = demo_job.client_path
    detector = lnd.build_detector(network, demo_trainer, config)
    assert isinstance(detector.proposal_matcher, Matcher)
    assert isinstance(detector.cls_loss_func, lnd.FocalLoss)  # the job's classification_loss "focal"
    atss = {**demo_trainer, "matcher": {"type": "atss", "num_candidates": 4, "center_in_gt": False}}
    assert isinstance(lnd.build_detector(network, atss, config).proposal_matcher, ATSSMatcher)
    bce = {**demo_trainer, "classification_loss": "bce"}
    assert isinstance(lnd.build_detector(network, bce, config).cls_loss_func, torch.nn.BCEWithLogitsLoss)


@pytest.mark.parametrize(
    "changes, message",
    [({"classification_loss": "dice"}, r"trainer.classification_loss 'dice' is not one of focal, bce"),
     ({"box_regression_loss": "giou"}, r"trainer.box_regression_loss 'giou' is not one of smooth_l1"),
     ({"crop_pos_neg": [0, 0]}, r"trainer.crop_pos_neg \[0, 0\] must be \[pos, neg\]"),
     ({"lr_warmup_epochs": -1}, r"trainer.lr_warmup_epochs -1 must be a number"),
     ({"froc_fps_per_scan": None}, r"'trainer' lacks the field\(s\) froc_fps_per_scan")],
    ids=["classification-loss", "box-regression-loss", "crop-pos-neg", "lr-warmup", "missing-field"],
)  # fmt: skip
def test_config_checks(tmp_path, changes, message):
    job = build_job(tmp_path, overlay={"client": {"trainer": changes}})
    with pytest.raises(ValueError, match="config_fed_client.json: " + message):
        lnd.load_settings(job)


def test_production_and_demo_settings_load(tmp_path, demo_job, demo_trainer):
    production = lnd.load_settings(build_job(tmp_path))
    assert production["patch_size"] == [192, 192, 80] and demo_trainer["patch_size"] == [32, 32, 16]
    assert demo_trainer["anchors"] == production["anchors"]  # the demo profile keeps the job's anchors
    assert demo_job.key_metric == "val_froc"


def test_lr_warmup_rises_linearly_to_the_configured_rate():
    """lr_warmup_epochs x steps_per_epoch optimizer steps take the rate from lr / steps to lr, then it stays."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.01, momentum=0.9)
    assert lnd.lr_warmup(optimizer, {"lr_warmup_epochs": 0}, steps_per_epoch=10) is None
    scheduler = lnd.lr_warmup(optimizer, {"lr_warmup_epochs": 2.5}, steps_per_epoch=4)  # 10 steps
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.001 * k for k in range(1, 11)] + [0.01, 0.01])


def test_train_epochs_steps_the_warmup_once_per_volume(network, generated, demo_job, demo_trainer):
    """The shared loop with ``patch_loss`` (what build() trains with): one optimizer and warm-up step per volume."""
    set_determinism(seed=0)
    trainer = {**demo_trainer, "max_train_samples": 1, "batch_size": 1, "lr_warmup_epochs": 10}
    train_records, _ = lnd.load_data(trainer, generated)
    detector = lnd.build_detector(network, trainer, demo_job.client_path)
    optimizer = torch.optim.SGD(detector.network.parameters(), lr=0.01)
    loader = lnd.make_loader(train_records, trainer, True)
    scheduler = lnd.lr_warmup(optimizer, trainer, steps_per_epoch=len(loader))
    cpu = torch.device("cpu")
    loss, steps = train_epochs(detector, loader, optimizer, lambda b: lnd.patch_loss(detector, b, cpu, False), 1,
                               scheduler=scheduler)  # fmt: skip
    assert steps == 1 and np.isfinite(loss) and loss > 0  # one volume's batch_size patches per step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 2 / 10)  # 1 of 10 warm-up steps taken


def test_build_trains_one_step_and_evaluates(tmp_path, generated):
    """build() on the generated site data: the detector trains on patches and evaluates whole volumes
    (untrained: no detection), reporting FROC under the job's key metric."""
    overlay = {"client": {"trainer": {"max_train_samples": 1, "max_val_samples": 1, "local_epochs": 1}}}
    job = build_job(tmp_path, "demo", overlay)
    site_config = tmp_path / "site_config.json"
    site_config.write_text(json.dumps({"data_root": str(generated.parent), "datasets": {lnd.JOB_NAME: generated.name},
                                       "privacy": {}}))  # fmt: skip
    set_determinism(seed=0)
    trainer = lnd.build(job, SiteConfig(site_config), torch.device("cpu"))
    assert isinstance(trainer, Trainer) and trainer.n_train == 1 and trainer.dp_accounting is None
    assert list(trainer.model.state_dict()) == list(job.build_network().state_dict())  # the network, not the detector
    loss, steps = trainer.train()
    assert steps == 1 and np.isfinite(loss) and loss > 0
    metrics = trainer.evaluate()
    assert set(metrics) == {job.key_metric} == {"val_froc"} and 0.0 <= metrics["val_froc"] <= 1.0


DP_POLICY = {"min_dataset_size": 1, "differential_privacy": {"enabled": True, "epsilon": 8, "delta": 1e-5,
                                                             "max_grad_norm": 1.0}}  # fmt: skip


def dp_profile() -> dict:
    return json.loads((REPO / "job_configs" / lnd.JOB_NAME / "profiles" / "dp.json").read_text())


def test_the_dp_profile_backbone_has_group_norm_everywhere_and_opacus_accepts_it(tmp_path):
    """MONAI's ResNet puts batch norm in its blocks whatever its ``norm`` says; the network's ``norm`` reaches
    every layer of the backbone, and the production network (batch norm) is the one Opacus refuses."""
    from opacus.validators import ModuleValidator

    network = build_job(tmp_path / "dp", "dp").build_network()
    norms = [m for m in network.feature_extractor.body.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 32 for m in norms)
    assert ModuleValidator.validate(network, strict=False) == []
    assert ModuleValidator.validate(build_job(tmp_path / "prod").build_network(), strict=False)  # BatchNorm: refused


def test_a_site_requiring_dp_trains_the_retinanet_with_dp_sgd_one_patch_per_volume(tmp_path, generated):
    """Record-level DP-SGD (Opacus) on the RetinaNet with the dp profile's group norm (a ResNet-10 backbone to keep
    per-sample gradients quick): every step is accounted for and the weights change; the state_dict stays the
    network's; more than one patch per volume is refused, naming the field and the site's policy."""
    small = {"server": {"num_rounds": 2, "components": [
        {"id": "persistor", "args": {"model": {"args": {"backbone_layers": [1, 1, 1, 1]}}}}]},
        "client": {"trainer": {"local_epochs": 2, "max_val_samples": 1}}}  # fmt: skip
    site_config = tmp_path / "site_config.json"
    site_config.write_text(json.dumps({"data_root": str(generated.parent), "datasets": {lnd.JOB_NAME: generated.name},
                                       "privacy": DP_POLICY}))  # fmt: skip
    job = build_job(tmp_path / "dp", "demo", job_builder.merge(dp_profile(), small, "t"))
    set_determinism(seed=0)
    trainer = lnd.build(job, SiteConfig(site_config), torch.device("cpu"))
    assert list(trainer.model.state_dict()) == list(job.build_network().state_dict())
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    mean_loss, steps = trainer.train()  # Poisson batches of expected size 1 over 2 volumes, 2 epochs
    accounting = trainer.dp_accounting()
    assert np.isfinite(mean_loss) and steps == accounting["dp_steps"] > 0 and 0 < accounting["dp_epsilon"] <= 8
    assert any(not torch.equal(value, initial[name]) for name, value in trainer.model.state_dict().items())
    assert set(trainer.evaluate()) == {"val_froc"}

    patches = job_builder.merge(small, {"client": {"trainer": {"batch_size": 2}}}, "t")
    with pytest.raises(ValueError, match=r"config_fed_client.json: trainer.batch_size is 2, and this site requires "
                                         r"differential privacy \(.*site_config.json\)"):  # fmt: skip
        lnd.build(build_job(tmp_path / "patches", "demo", patches), SiteConfig(site_config), torch.device("cpu"))


def test_dp_fine_tuning_keeps_batch_norm_frozen_and_trains_only_the_profiles_layers(tmp_path, generated):
    """The dp_pretrained recipe: DP-SGD (Opacus) on the batch-norm RetinaNet (a ResNet-10 backbone here) with its
    batch norms frozen in eval mode and only the layers the profile names trained; everything else, batch norm
    statistics included, stays as the server sent it."""
    profile = json.loads((REPO / "job_configs" / lnd.JOB_NAME / "profiles" / "dp_pretrained.json").read_text())
    trainer_settings = {k: profile["client"]["trainer"][k] for k in ("batch_size", "freeze_batch_norm", "trained_layers")}
    overlay = {"server": {"num_rounds": 2, "components": [
        {"id": "persistor", "args": {"model": {"args": {"backbone_layers": [1, 1, 1, 1]}}}}]},
        "client": {"trainer": {"local_epochs": 2, "max_val_samples": 1, **trainer_settings}}}  # fmt: skip
    site_config = tmp_path / "site_config.json"
    site_config.write_text(json.dumps({"data_root": str(generated.parent), "datasets": {lnd.JOB_NAME: generated.name},
                                       "privacy": DP_POLICY}))  # fmt: skip
    set_determinism(seed=0)
    trainer = lnd.build(build_job(tmp_path, "demo", overlay), SiteConfig(site_config), torch.device("cpu"))
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    mean_loss, steps = trainer.train()
    assert np.isfinite(mean_loss) and steps == trainer.dp_accounting()["dp_steps"] > 0
    changed = {name for name, value in trainer.model.state_dict().items() if not torch.equal(value, initial[name])}
    assert changed and all(name.startswith(tuple(trainer_settings["trained_layers"])) for name in changed), changed
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in trainer.model.modules())  # frozen, not replaced


def test_an_empty_poisson_batch_and_a_patch_without_nodule_are_dp_sgd_steps(tmp_path, generated):
    """Poisson sampling can draw no volume: Opacus cannot empty the first batch's structure (its samples hold
    strings, the series uid), so the trainer asks for an empty list; the loss is zero, through the network (the
    per-sample hooks see a batch of 0). A patch without a nodule has no box regression loss; DP-SGD still needs a
    per-sample gradient of every parameter (Opacus' step fails without one)."""
    from hcls.dp_sgd import make_private

    job = build_job(tmp_path, "demo", dp_profile())
    trainer = lnd.load_settings(job)
    network = job.build_network()
    lnd.prepare_for_dp_sgd(network)
    detector = lnd.build_detector(network, trainer, job.client_path, "sum")
    records, _ = lnd.load_data(trainer, generated)
    optimizer, loader, _ = make_private(network, torch.optim.SGD(network.parameters(), lr=0.01),
                                        lnd.make_loader(records, trainer, True), DP_POLICY["differential_privacy"], 1,
                                        "sum", [])  # fmt: skip
    assert loader.collate_fn([loader.dataset[0]])  # a volume drawn: its patch
    empty = loader.collate_fn([])
    assert empty == []
    loss = lnd.patch_loss(detector, empty, torch.device("cpu"), False)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad_sample.shape[0] == 0 for p in network.parameters())
    optimizer.step()
    optimizer.zero_grad()

    detector.train()
    no_nodule = {"image": torch.rand(1, *trainer["patch_size"]), "box": torch.zeros((0, 6)),
                 "label": torch.zeros((0,), dtype=torch.long)}  # fmt: skip
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    loss = lnd.patch_loss(detector, [[no_nodule]], torch.device("cpu"), False)
    loss.backward()
    assert all(p.grad_sample.shape[0] == 1 for p in network.parameters())
    optimizer.step()
    assert any(not torch.equal(p, before[name]) for name, p in network.named_parameters())
