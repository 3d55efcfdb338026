"""Unit tests of the CT segmentation data path: decathlon list checks, the demo data
generator, transforms, loss, the Dice metric, and the trainer that ``build(job, site, device)``
wires from a built job and a site config. No NVFlare process needed."""

import copy
import gzip
import json
import math
import shutil
import subprocess
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

import ct_segmentation as ct  # noqa: E402
from datagen import ct as datagen  # noqa: E402
from hcls.job_config import JobConfig  # noqa: E402
from hcls.site_config import SiteConfig  # noqa: E402
from hcls.training import Trainer  # noqa: E402
from ops import job_builder  # noqa: E402

LABELS = datagen.LABELS
N_LABELS = len(LABELS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small generated decathlon-format dataset (24^3 voxels)."""
    out = tmp_path_factory.mktemp("ct")
    datagen.generate(out, n_train=3, n_val=2, seed=3, size=24)
    return out


@pytest.fixture
def list_dir(tmp_path, data_dir) -> Path:
    """A copy of the generated data whose lists and files the test may break."""
    shutil.copytree(data_dir, tmp_path / "data")
    return tmp_path / "data"


def write_list(path: Path, entries) -> Path:
    path.write_text(json.dumps({"training": entries}))
    return path


def entry(case: int) -> dict:
    return {"image": f"imagesTr/ct_{case:04d}.nii.gz", "label": f"labelsTr/ct_{case:04d}.nii.gz"}


def save(data: np.ndarray, path: Path, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def build_job(out: Path, profile: str = "", overlay: dict | None = None) -> JobConfig:
    """The ct_segmentation job folder as ``job_builder`` builds it (PROFILE, then ``overlay`` merged on top)."""
    config = job_builder.resolve(ct.JOB_NAME, profile)
    if overlay:
        config = job_builder.merge(config, overlay, "test overlay")
    return JobConfig.from_job_folder(job_builder.write_job(config, out / "job"))


def production_trainer() -> dict:
    """The job's trainer settings, as the built job holds them."""
    return job_builder.resolve(ct.JOB_NAME)["client"]["trainer"]


def small_trainer(**changes) -> dict:
    """Trainer settings for tiny volumes: the production config with small sizes."""
    trainer = production_trainer()
    trainer.update(pixdim=[1.5, 1.5, 2.0], roi_size=[16, 16, 16], num_samples=2, batch_size=2, num_workers=0)
    trainer.update(changes)
    return trainer


# ---------------------------------------------------------------- generator


def test_generator_layout_and_nifti(data_dir):
    train = json.loads((data_dir / "train_data.json").read_text())["training"]
    val = json.loads((data_dir / "val_data.json").read_text())["training"]
    assert train == [entry(1), entry(2), entry(3)] and val == [entry(4), entry(5)]
    image, label = nib.load(data_dir / train[0]["image"]), nib.load(data_dir / train[0]["label"])
    assert image.shape == label.shape == (24, 24, 24)
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    assert np.allclose(image.affine, label.affine)
    assert np.allclose(np.abs(np.diag(image.affine)[:3]), datagen.SPACING)  # anisotropic spacing
    assert nib.aff2axcodes(image.affine) != ("R", "A", "S") and np.abs(image.affine[:3, 3]).min() > 1  # not identity
    hu = np.asanyarray(image.dataobj)
    assert hu.min() <= -950 and 0 < np.median(hu[np.asanyarray(label.dataobj) == 6]) < 150  # air, liver HU
    organs = set(np.unique(np.asanyarray(label.dataobj))) - {0}
    assert len(organs) >= 6 and organs <= set(range(1, N_LABELS + 1))


def test_generator_is_deterministic_and_seeded(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        datagen.generate(tmp_path / name, n_train=2, n_val=1, seed=seed, size=20)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 3 * 2
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in files)
    image = "imagesTr/ct_0001.nii.gz"
    assert (tmp_path / "a" / image).read_bytes() != (tmp_path / "c" / image).read_bytes()


def test_generator_labels_are_the_jobs():
    assert production_trainer()["labels"] == LABELS


def test_generator_cli(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "datagen.ct", "--out", str(tmp_path / "out"), "--n-train", "1", "--n-val", "1",
         "--seed", "2", "--size", "16"],
        cwd=CUSTOM, check=True, capture_output=True,
    )  # fmt: skip
    assert len(ct.read_datalist(tmp_path / "out" / "val_data.json", N_LABELS)) == 1


# ---------------------------------------------------------------- data lists


def test_generated_lists_are_read(data_dir):
    train, val = ct.load_data({"labels": LABELS, "max_train_samples": 0, "max_val_samples": 1}, data_dir)
    assert [Path(r["image"]).name for r in train] == ["ct_0001.nii.gz", "ct_0002.nii.gz", "ct_0003.nii.gz"]
    assert len(val) == 1 and set(val[0]) == {"image", "label"} and Path(val[0]["label"]).is_file()


@pytest.mark.parametrize(
    "content, fragment",
    [(None, "file not found"), ("{not json", "invalid JSON"), ('{"validation": []}', "no 'training' list"),
     ('{"training": {}}', "no 'training' list"), ('{"training": []}', "empty")],
    ids=["missing", "malformed", "no-training-key", "training-not-a-list", "empty"],
)  # fmt: skip
def test_bad_list_file(tmp_path, content, fragment):
    path = tmp_path / "train_data.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as err:
        ct.read_datalist(path, N_LABELS)
    assert str(path) in str(err.value) and fragment in str(err.value)


def break_missing_file(d: Path) -> tuple[dict, list[str]]:
    return {"image": "imagesTr/nope.nii.gz", "label": entry(1)["label"]}, ["'image'", "nope.nii.gz", "does not exist"]


def break_extension(d: Path) -> tuple[dict, list[str]]:
    shutil.copy(d / entry(1)["label"], d / "labelsTr/ct_0001.nrrd")
    return {**entry(1), "label": "labelsTr/ct_0001.nrrd"}, ["'label'", "ct_0001.nrrd", "not NIfTI"]


def break_content(d: Path) -> tuple[dict, list[str]]:
    (d / "imagesTr/fake.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    return {**entry(1), "image": "imagesTr/fake.nii.gz"}, ["'image'", "fake.nii.gz", "not a readable NIfTI"]


def break_shape(d: Path) -> tuple[dict, list[str]]:
    save(np.zeros((24, 24, 20), np.uint8), d / "labelsTr/short.nii.gz")
    return {**entry(1), "label": "labelsTr/short.nii.gz"}, ["short.nii.gz", "(24, 24, 20)", "(24, 24, 24)"]


def break_range(d: Path) -> tuple[dict, list[str]]:
    data = np.zeros((24, 24, 24), np.int16)
    data[0, 0, :3] = [14, -1, 3]
    save(data, d / "labelsTr/range.nii.gz")
    return {**entry(1), "label": "labelsTr/range.nii.gz"}, ["range.nii.gz", "values -1, 14", "0..13"]


def break_fraction(d: Path) -> tuple[dict, list[str]]:
    data = np.zeros((24, 24, 24), np.float32)
    data[1, 1, 1] = 2.5
    save(data, d / "labelsTr/soft.nii.gz")
    return {**entry(1), "label": "labelsTr/soft.nii.gz"}, ["soft.nii.gz", "values 2.5 are not integers"]


def break_keys(d: Path) -> tuple[dict, list[str]]:
    return {"image": entry(1)["image"]}, ["field 'label' is missing"]


@pytest.mark.parametrize(
    "breaker",
    [break_missing_file, break_extension, break_content, break_shape, break_range, break_fraction, break_keys],
    ids=["missing-file", "not-nifti-extension", "not-nifti-content", "shape", "label-range", "label-fraction", "keys"],
)
def test_bad_entry_names_list_entry_and_file(list_dir, breaker):
    bad, fragments = breaker(list_dir)
    path = write_list(list_dir / "val_data.json", [entry(4), bad, entry(5)])
    with pytest.raises(ValueError) as err:
        ct.read_datalist(path, N_LABELS)
    message = str(err.value)
    for fragment in [str(path), "entry training[1]", *fragments]:
        assert fragment in message
    assert "training[0]" not in message and "training[2]" not in message


def test_whole_list_is_checked_before_max_samples(list_dir):
    entries = [entry(1), entry(2), {"image": "imagesTr/a.nii.gz", "label": "x"}, {**entry(3), "image": "b.png"}]
    path = write_list(list_dir / "train_data.json", entries)
    with pytest.raises(ValueError) as err:
        ct.read_datalist(path, N_LABELS, max_samples=1)
    assert "training[2], 'image'" in str(err.value) and "training[3], 'image'" in str(err.value)


# ---------------------------------------------------------------- transforms and loader


def test_train_transforms_give_roi_crops(data_dir):
    record = ct.read_datalist(data_dir / "train_data.json", N_LABELS)[0]
    crops = ct.train_transforms(small_trainer())(record)
    assert len(crops) == 2
    for crop in crops:
        assert tuple(crop["image"].shape) == tuple(crop["label"].shape) == (1, 16, 16, 16)
        assert crop["image"].dtype == torch.float32
        assert -0.05 <= float(crop["image"].min()) and float(crop["image"].max()) <= 1.05  # 0..1 + mild shift
        assert set(crop["label"].unique().tolist()) <= set(range(N_LABELS + 1))


def test_val_transforms_resample_reorient_and_window(data_dir):
    record = ct.read_datalist(data_dir / "val_data.json", N_LABELS)[0]
    trainer = small_trainer(pixdim=[3.0, 3.0, 4.0], crop_foreground=False)
    out = ct.val_transforms(trainer)(record)
    assert tuple(out["image"].shape) == tuple(out["label"].shape) == (1, 12, 12, 12)
    assert float(out["image"].min()) == 0.0 and float(out["image"].max()) == 1.0
    # RAS: the liver (label 6, patient's right) lies at higher x indices than the spleen (label 1)
    x = torch.arange(12).view(12, 1, 1)
    centre = {k: float((x * (out["label"][0] == k)).sum() / (out["label"][0] == k).sum()) for k in (1, 6)}
    assert centre[6] > centre[1]


def test_crop_foreground_is_optional(data_dir):
    record = ct.read_datalist(data_dir / "val_data.json", N_LABELS)[0]
    cropped = ct.val_transforms(small_trainer())(record)["image"]
    assert cropped.shape[1] < 24 and cropped.shape[2] < 24  # air around the body removed


def test_loader_batches(data_dir):
    trainer = small_trainer()
    train, val = ct.load_data(trainer | {"max_train_samples": 0, "max_val_samples": 0}, data_dir)
    batch = next(iter(ct.make_loader(train, trainer, train=True)))
    assert tuple(batch["image"].shape) == (4, 1, 16, 16, 16)  # batch_size 2 x num_samples 2
    val_batch = next(iter(ct.make_loader(val, trainer, train=False)))
    assert val_batch["image"].shape[0] == 1 and val_batch["image"].shape[1] == 1


# ---------------------------------------------------------------- config, loss, train/evaluate


def network_overlay(**args) -> dict:
    """A layer that changes the network's args (the server persistor's model)."""
    return {"server": {"components": [{"id": "persistor", "args": {"model": {"args": args}}}]}}


def test_production_and_demo_configs_load(tmp_path):
    job = build_job(tmp_path / "production")
    trainer = ct.load_settings(job)
    assert trainer["roi_size"] == [96, 96, 96] and job.key_metric == "val_mean_dice"
    demo = build_job(tmp_path / "demo", "demo")
    trainer = ct.load_settings(demo)
    assert trainer["roi_size"] == [24, 24, 24]
    assert isinstance(ct.build_loss(trainer, demo.client_path), torch.nn.Module)


@pytest.mark.parametrize(
    "overlay, fragment",
    [({"client": {"trainer": {"roi_size": [96, 96, 60]}}}, "config_fed_client.json: trainer.roi_size [96, 96, 60]"),
     ({"client": {"trainer": {"labels": LABELS[:-1]}}}, "config_fed_server.json: the network's out_channels (14)"),
     (network_overlay(out_channels=13), "config_fed_server.json: the network's out_channels (13) must be"),
     (network_overlay(blocks_down=4), "config_fed_server.json: the network's blocks_down must be a list"),
     ({"client": {"trainer": {"pixdim": [1.5, 1.5]}}}, "config_fed_client.json: trainer.pixdim needs 3 values"),
     ({"client": {"trainer": {"sliding_window": None}}}, "config_fed_client.json: 'trainer' lacks the field(s) "
      "sliding_window")],
    ids=["roi", "labels", "out-channels", "blocks-down", "pixdim", "missing-field"],
)  # fmt: skip
def test_config_errors_name_the_file(tmp_path, overlay, fragment):
    with pytest.raises(ValueError) as err:
        ct.load_settings(build_job(tmp_path, overlay=overlay))
    assert fragment in str(err.value)


def test_roi_size_follows_the_networks_downsamplings(tmp_path):
    """roi_size must be a multiple of 2 ** (stages - 1) of the job's network, not of a fixed network."""
    overlay = network_overlay(blocks_down=[1, 2, 2]) | {"client": {"trainer": {"roi_size": [96, 96, 60]}}}
    assert ct.load_settings(build_job(tmp_path, overlay=overlay))["roi_size"] == [96, 96, 60]


def test_build_loss(tmp_path):
    config = tmp_path / "config_fed_client.json"
    trainer = small_trainer()
    assert type(ct.build_loss(trainer, config)).__name__ == "DiceCELoss"
    weighted = copy.deepcopy(trainer)
    weighted["loss"]["args"]["weight"] = [0.1] + [1.0] * N_LABELS
    loss = ct.build_loss(weighted, config)
    logits, label = torch.zeros(1, N_LABELS + 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)
    assert torch.isfinite(loss(logits, label))
    weighted["loss"]["args"]["weight"] = [1.0, 2.0]
    with pytest.raises(ValueError, match="config_fed_client.json: trainer.loss.args.weight has 2 values, needs 14"):
        ct.build_loss(weighted, config)
    with pytest.raises(ValueError, match="config_fed_client.json: trainer.loss.name = 'DiceCE'"):
        ct.build_loss({"loss": {"name": "DiceCE", "args": {}}}, config)


def test_build_returns_a_trainer_that_trains_and_evaluates(tmp_path, data_dir):
    """The demo job with a small SegResNet on the generated site data: train() runs the job's optimizer and
    loss on roi crops, evaluate() reports Dice under the job's key metric on whole validation volumes."""
    small = {
        "server": network_overlay(init_filters=8)["server"],
        "client": {"trainer": {"pixdim": [1.5, 1.5, 2.0], "roi_size": [16, 16, 16], "local_epochs": 1,
                               "max_train_samples": 2, "max_val_samples": 1}},
    }  # fmt: skip
    job = build_job(tmp_path, "demo", small)
    site_config = tmp_path / "site_config.json"
    site_config.write_text(json.dumps({"data_root": str(data_dir.parent), "datasets": {ct.JOB_NAME: data_dir.name},
                                       "privacy": {}}))  # fmt: skip
    set_determinism(seed=0)
    trainer = ct.build(job, SiteConfig(site_config), torch.device("cpu"))
    assert isinstance(trainer, Trainer) and trainer.n_train == 2 and trainer.dp_accounting is None
    assert list(trainer.model.state_dict()) == list(job.build_network().state_dict())
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    mean_loss, steps = trainer.train()
    assert steps == 2 and math.isfinite(mean_loss)  # 2 volumes, batch_size 1, num_samples 1, 1 epoch
    assert any(not torch.equal(value, initial[name]) for name, value in trainer.model.state_dict().items())
    metrics = trainer.evaluate()
    assert job.key_metric == "val_mean_dice" and job.key_metric in metrics
    assert set(metrics) <= {job.key_metric, *(f"val_dice_{name}" for name in LABELS)}
    assert 0.0 <= metrics[job.key_metric] <= 1.0


DP_POLICY = {"min_dataset_size": 1, "differential_privacy": {"enabled": True, "epsilon": 8, "delta": 1e-5,
                                                             "max_grad_norm": 1.0}}  # fmt: skip


def dp_small(**trainer) -> dict:
    """A small SegResNet (8 initial filters) with the dp profiles' non-in-place ReLU, 2 rounds of 2 local epochs on
    16^3 crops; ``trainer``: further trainer settings."""
    return {
        "server": job_builder.merge(network_overlay(init_filters=8), {"server": {"num_rounds": 2, "components": [
            {"id": "persistor", "args": {"model": {"args": {"act": ["RELU", {"inplace": False}]}}}}]}}, "t")["server"],
        "client": {"trainer": {"pixdim": [1.5, 1.5, 2.0], "roi_size": [16, 16, 16], "local_epochs": 2, **trainer}},
    }  # fmt: skip


def dp_site_config(tmp_path: Path, data_dir: Path) -> Path:
    """A site config whose CT dataset is ``data_dir`` and whose policy requires DP (DP_POLICY)."""
    site_config = tmp_path / "site_config.json"
    site_config.write_text(json.dumps({"data_root": str(data_dir.parent), "datasets": {ct.JOB_NAME: data_dir.name},
                                       "privacy": DP_POLICY}))  # fmt: skip
    return site_config


def test_a_site_requiring_dp_trains_segresnet_with_dp_sgd_one_crop_per_volume(tmp_path, data_dir):
    """Record-level DP-SGD (Opacus) on SegResNet (GroupNorm) with the dp profile's non-in-place activations: every
    step is accounted for; more than one crop per volume is refused, naming the field and the site's policy."""
    small, site_config = dp_small(), dp_site_config(tmp_path, data_dir)
    set_determinism(seed=0)
    trainer = ct.build(build_job(tmp_path, "demo", small), SiteConfig(site_config), torch.device("cpu"))
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    mean_loss, steps = trainer.train()  # Poisson batches of expected size 1 over 3 volumes, 2 epochs
    accounting = trainer.dp_accounting()
    assert math.isfinite(mean_loss) and steps == accounting["dp_steps"] > 0 and 0 < accounting["dp_epsilon"] <= 8
    assert any(not torch.equal(value, initial[name]) for name, value in trainer.model.state_dict().items())

    crops = job_builder.merge(small, {"client": {"trainer": {"num_samples": 2}}}, "t")
    with pytest.raises(ValueError, match=r"config_fed_client.json: trainer.num_samples is 2, and this site requires "
                                         r"differential privacy \(.*site_config.json\)"):  # fmt: skip
        ct.build(build_job(tmp_path / "crops", "demo", crops), SiteConfig(site_config), torch.device("cpu"))


def test_dp_fine_tuning_trains_only_the_dp_pretrained_profiles_layers(tmp_path, data_dir):
    """The dp_pretrained recipe: DP-SGD (Opacus) on the layers the profile names (the full-resolution decoder stage
    and the output convolution); every other weight stays as the server sent it. An unknown layer is named with
    its config file."""
    profile = json.loads((REPO / "job_configs/ct_segmentation/profiles/dp_pretrained.json").read_text())
    trained_layers = profile["client"]["trainer"]["trained_layers"]
    small = dp_small(num_samples=1, trained_layers=trained_layers)
    site_config = dp_site_config(tmp_path, data_dir)
    set_determinism(seed=0)
    trainer = ct.build(build_job(tmp_path, "demo", small), SiteConfig(site_config), torch.device("cpu"))
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    mean_loss, steps = trainer.train()
    assert math.isfinite(mean_loss) and steps == trainer.dp_accounting()["dp_steps"] > 0
    changed = {name for name, value in trainer.model.state_dict().items() if not torch.equal(value, initial[name])}
    assert "conv_final.2.conv.weight" in changed and any(name.startswith("up_layers.2.") for name in changed)
    assert all(name.startswith(tuple(f"{layer}." for layer in trained_layers)) for name in changed), changed

    unknown = job_builder.merge(small, {"client": {"trainer": {"trained_layers": ["up_layers.7"]}}}, "t")
    with pytest.raises(ValueError, match="config_fed_client.json: trainer.trained_layers: 'up_layers.7' not a module "
                                         "of SegResNet"):  # fmt: skip
        ct.build(build_job(tmp_path / "unknown", "demo", unknown), SiteConfig(site_config), torch.device("cpu"))


def logits_of(prediction: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Logits (1, C, ...) whose argmax is the label map ``prediction`` (...)."""
    return torch.nn.functional.one_hot(prediction.long(), n_classes).movedim(-1, 0).unsqueeze(0).float() * 5.0


def dice(pairs: list[tuple[list[int], list[int]]], labels=("a", "b"), key_metric="val_mean_dice") -> dict:
    """The trainer's metrics for (prediction, label) voxel lists, one pair per volume of 1 x 1 x N voxels."""
    metric = ct.new_dice_metric()
    n_classes = len(labels) + 1
    for prediction, label in pairs:
        pred, lab = torch.tensor(prediction).view(1, 1, -1), torch.tensor(label).view(1, 1, 1, 1, -1)
        ct.score_batch(metric, logits_of(pred, n_classes), lab, n_classes)
    return ct.dice_metrics(metric, list(labels), key_metric)


def test_dice_perfect_disjoint_and_half():
    perfect = dice([([0, 1, 1, 2, 2, 0], [0, 1, 1, 2, 2, 0])])
    assert perfect == {"val_mean_dice": 1.0, "val_dice_a": 1.0, "val_dice_b": 1.0}
    disjoint = dice([([0, 2, 2, 1, 1, 0], [0, 1, 1, 2, 2, 0])])
    assert disjoint == {"val_mean_dice": 0.0, "val_dice_a": 0.0, "val_dice_b": 0.0}
    # a: 4 labelled, 4 predicted, 2 shared -> 2*2/(4+4) = 0.5; b: perfect -> mean 0.75
    half = dice([([1, 1, 0, 0, 1, 1, 2], [1, 1, 1, 1, 0, 0, 2])])
    assert half == pytest.approx({"val_mean_dice": 0.75, "val_dice_a": 0.5, "val_dice_b": 1.0})


def test_dice_averages_each_organ_over_the_volumes_that_contain_it():
    # volume 1: a perfect, b absent from label but predicted (ignored: empty ground truth);
    # volume 2: a half (2*1/(2+2)), b perfect -> a = (1 + 0.5) / 2, b = 1 (volume 2 only)
    metrics = dice([([1, 1, 2, 0], [1, 1, 0, 0]), ([1, 0, 2, 1], [1, 1, 2, 0])])
    assert metrics == pytest.approx({"val_mean_dice": (0.75 + 1.0) / 2, "val_dice_a": 0.75, "val_dice_b": 1.0})


def test_dice_leaves_out_organs_absent_from_every_label():
    metrics = dice([([1, 1, 0, 0], [1, 0, 0, 0])], labels=("a", "b", "c"))
    assert metrics == pytest.approx({"val_mean_dice": 2 / 3, "val_dice_a": 2 / 3})  # b, c: no value, no NaN


def test_dice_is_nan_without_any_organ():
    metrics = dice([([1, 0], [0, 0])])
    assert set(metrics) == {"val_mean_dice"} and math.isnan(metrics["val_mean_dice"])


def test_dice_mean_is_reported_under_the_key_metric_given():
    """The trainer reports the mean Dice under the job's key metric (what the server's model selector reads)."""
    metrics = dice([([0, 1, 1, 2, 2, 0], [0, 1, 1, 2, 2, 0])], key_metric="val_dice")
    assert metrics == {"val_dice": 1.0, "val_dice_a": 1.0, "val_dice_b": 1.0}
