"""Unit tests of the CXR data handling: CSV label policies and validation, the demo data
generator, image transforms, the masked loss and the AUC metric, and the trainer that
``build(job, site, device)`` wires from a built job and a site config. No NVFlare process needed."""

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.transforms import Compose
from monai.utils import set_determinism

CUSTOM = Path(__file__).resolve().parents[2] / "custom"
sys.path.insert(0, str(CUSTOM))

import cxr_classification as cxr  # noqa: E402
from datagen import cxr as datagen  # noqa: E402
from hcls import transform_config  # noqa: E402
from hcls.components import build_by_name, build_optimizer  # noqa: E402
from hcls.job_config import JobConfig  # noqa: E402
from hcls.site_config import SITE_CONFIG_ENV, SiteConfig  # noqa: E402
from hcls.training import Trainer  # noqa: E402
from ops import job_builder  # noqa: E402

LABELS = datagen.DEFAULT_LABELS


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small generated CheXpert-format dataset."""
    out = tmp_path_factory.mktemp("cxr")
    datagen.generate(out, n_train=12, n_val=6, seed=3, size=32)
    return out


@pytest.fixture
def csv_dir(tmp_path, data_dir) -> Path:
    """A directory holding one real image, ``img.jpg``, for hand-written CSVs."""
    shutil.copy(next(data_dir.glob("images/*/study1/view1_frontal.jpg")), tmp_path / "img.jpg")
    return tmp_path


def build_job(out: Path, profile: str = "", overlay: dict | None = None) -> JobConfig:
    """The cxr_classification job folder as ``job_builder`` builds it (PROFILE, then ``overlay`` merged on top)."""
    config = job_builder.resolve(cxr.JOB_NAME, profile)
    if overlay:
        config = job_builder.merge(config, overlay, "test overlay")
    return JobConfig.from_job_folder(job_builder.write_job(config, out / "job"))


def write_site_config(path: Path, data_dir: Path, privacy: dict | None = None) -> SiteConfig:
    config = {"data_root": str(data_dir.parent), "datasets": {cxr.JOB_NAME: data_dir.name}}
    path.write_text(json.dumps(config | ({"privacy": privacy} if privacy is not None else {})))
    return SiteConfig(path)


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- label policies


@pytest.mark.parametrize(
    "policy, labels, masks",
    [
        ("ones", [[1, 0], [1, 0], [0, 1]], [[1, 1], [1, 1], [1, 1]]),
        ("zeros", [[1, 0], [0, 0], [0, 0]], [[1, 1], [1, 1], [1, 1]]),
        ("ignore", [[1, 0], [0, 0], [0, 0]], [[1, 1], [0, 1], [1, 0]]),
    ],
)
def test_uncertain_policy_and_blank(csv_dir, policy, labels, masks):
    csv_path = write_csv(
        csv_dir / "train.csv",
        ["Path,A,B", "img.jpg,1.0,", "img.jpg,-1.0,0.0", "img.jpg,0,-1"],  # blank B in row 2 -> 0
    )
    records = cxr.read_label_csv(csv_path, ["A", "B"], policy)
    assert [r["label"].tolist() for r in records] == labels
    assert [r["mask"].tolist() for r in records] == masks


def identifiers(csv_path: Path) -> list[str]:
    with open(csv_path, newline="") as f:
        return [row[c] for row in csv.DictReader(f) for c in datagen.IDENTIFIER_COLUMNS]


def test_generated_csvs_are_read_without_identifier_columns(data_dir):
    train_text = (data_dir / "train.csv").read_text()
    assert ",-1.0," in train_text and ",," in train_text  # report labels: uncertain and blank cells
    values = identifiers(data_dir / "train.csv")
    assert len(values) == 36 and all(values)  # PatientName, PatientID, PatientBirthDate of 12 studies
    records = cxr.read_label_csv(data_dir / "train.csv", LABELS, "ones")
    assert len(records) == 12
    assert all(set(r) == {"image", "label", "mask"} for r in records)
    assert not any(value in repr(records) for value in values)
    assert Path(records[0]["image"]).is_file()


def test_identifiers_look_real_and_birth_date_matches_age(data_dir):
    with open(data_dir / "val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert re.fullmatch(r"[A-Z][a-z]+\^[A-Z][a-z]+", row["PatientName"])
        assert re.fullmatch(r"MRN-A\d{7}", row["PatientID"])
        assert int(row["PatientBirthDate"][:4]) == datagen.STUDY_YEAR - int(row["Age"])


def test_a_label_that_the_site_blocks_is_refused(data_dir, tmp_path):
    site = write_site_config(tmp_path / "site_config.json", data_dir, {"blocked_data_fields": ["PatientID"]})
    trainer = {"labels": ["Edema", "PatientID"], "uncertain_label_policy": "ones", "max_train_samples": 0,
               "max_val_samples": 0}  # fmt: skip
    with pytest.raises(ValueError, match=r"trainer.labels names PatientID, blocked by this site .*site_config.json"):
        cxr.load_data(trainer, site.dataset_dir(cxr.JOB_NAME), site.blocked_fields, site.path)


def test_val_csv_holds_only_expert_labels(data_dir):
    lines = (data_dir / "val.csv").read_text().splitlines()
    header = lines[0].split(",")
    label_columns = [header.index(label) for label in LABELS]
    cells = {line.split(",")[i] for line in lines[1:] for i in label_columns}
    assert cells == {"0.0", "1.0"}


def test_max_samples_caps_records(data_dir):
    assert len(cxr.read_label_csv(data_dir / "train.csv", LABELS, "ones", max_samples=5)) == 5


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "lines, fragments",
    [
        (["Image,A,B", "img.jpg,1.0,0.0"], ["row 1", "'Path'"]),
        (["Path,A", "img.jpg,1.0"], ["row 1", "'B'"]),
        (["Path,A,B", "img.jpg,1.0,0.0", "img.jpg,1.0,2.0"], ["row 3", "column 'B'", "'2.0'"]),
        (["Path,A,B", "img.jpg,yes,0.0"], ["row 2", "column 'A'", "'yes'"]),
        (["Path,A,B", "img.jpg,1.0,0.0", "missing.jpg,1.0,0.0"], ["row 3", "column 'Path'", "missing.jpg"]),
        (["Path,A,B", ",1.0,0.0"], ["row 2", "column 'Path'", "empty"]),
    ],
    ids=["no-path-column", "no-label-column", "bad-number", "bad-word", "missing-image", "empty-path"],
)
def test_bad_input_names_file_row_and_column(csv_dir, lines, fragments):
    csv_path = write_csv(csv_dir / "train.csv", lines)
    with pytest.raises(ValueError) as err:
        cxr.read_label_csv(csv_path, ["A", "B"], "ones")
    for fragment in [str(csv_path), *fragments]:
        assert fragment in str(err.value)


def test_whole_csv_is_checked_and_all_errors_reported(csv_dir):
    csv_path = write_csv(csv_dir / "train.csv", ["Path,A,B", "img.jpg,1.0,0.0", "img.jpg,3,0.0", "img.jpg,1.0,x"])
    with pytest.raises(ValueError) as err:
        cxr.read_label_csv(csv_path, ["A", "B"], "ones", max_samples=1)
    assert "row 3, column 'A'" in str(err.value) and "row 4, column 'B'" in str(err.value)


def test_missing_csv(tmp_path):
    with pytest.raises(ValueError, match="nope.csv: CSV file not found"):
        cxr.read_label_csv(tmp_path / "nope.csv", ["A"], "ones")


def test_empty_dataset(csv_dir):
    csv_path = write_csv(csv_dir / "val.csv", ["Path,A,B"])
    with pytest.raises(ValueError, match="val.csv: no data rows"):
        cxr.read_label_csv(csv_path, ["A", "B"], "ones")


# ---------------------------------------------------------------- configs


def test_production_and_profile_settings_load(tmp_path):
    for profile in ("", "demo", "dp", "he"):
        job = build_job(tmp_path / (profile or "production"), profile)
        trainer = cxr.load_settings(job)
        assert trainer["labels"] == LABELS and len(LABELS) == job.network["args"]["out_channels"] == 18
        assert job.key_metric == "val_auc"
        assert JobConfig.from_client_config(job.client_path).client == job.client  # how a site's trainer finds it


def test_unknown_policy_names_config_file(tmp_path):
    job = build_job(tmp_path, overlay={"client": {"trainer": {"uncertain_label_policy": "maybe"}}})
    with pytest.raises(ValueError, match="config_fed_client.json: trainer.uncertain_label_policy 'maybe'"):
        cxr.load_settings(job)


def test_missing_trainer_field_names_config_file(tmp_path):
    job = build_job(tmp_path, overlay={"client": {"trainer": {"max_val_samples": None}}})  # null deletes the key
    with pytest.raises(ValueError, match="config_fed_client.json: 'trainer' lacks the field.s. max_val_samples"):
        cxr.load_settings(job)


def test_network_outputs_must_be_one_per_label_naming_the_server_config(tmp_path):
    """What ties the network to the labels: its out_channels, in the server config, is len(trainer.labels)."""
    job = build_job(tmp_path, "demo", {"client": {"trainer": {"labels": LABELS[:-1]}}})
    with pytest.raises(ValueError) as err:
        cxr.load_settings(job)
    message = str(err.value)
    assert message.startswith(f"{job.server_path}: the network's out_channels (18) must be len(trainer.labels) = 17")
    assert str(job.client_path) in message
    network = {"components": [{"id": "persistor", "args": {"model": {"args": {"out_channels": 17}}}}]}
    fixed = build_job(tmp_path, "demo", {"server": network, "client": {"trainer": {"labels": LABELS[:-1]}}})
    assert cxr.load_settings(fixed)["labels"] == LABELS[:-1]


def test_unknown_optimizer_names_config_file_and_field(tmp_path):
    config = tmp_path / "config_fed_client.json"
    with pytest.raises(ValueError, match="config_fed_client.json: trainer.optimizer.name = 'Adamm'"):
        build_optimizer({"optimizer": {"name": "Adamm", "args": {}}}, config, [])


def test_site_dataset_dir(tmp_path, monkeypatch, data_dir):
    site_config = tmp_path / "site_config.json"
    monkeypatch.delenv(SITE_CONFIG_ENV, raising=False)
    with pytest.raises(ValueError, match="HCLS_SITE_CONFIG is not set"):
        SiteConfig.from_env()

    monkeypatch.setenv(SITE_CONFIG_ENV, str(site_config))
    with pytest.raises(ValueError, match="site_config.json: file not found"):
        SiteConfig.from_env()

    site_config.write_text(json.dumps({"data_root": str(tmp_path), "datasets": {"ct_segmentation": "ct"}}))
    with pytest.raises(ValueError, match="site_config.json: field 'datasets.cxr_classification'"):
        SiteConfig.from_env().dataset_dir("cxr_classification")

    site_config.write_text(json.dumps({"data_root": str(tmp_path), "datasets": {"cxr_classification": "chexpert"}}))
    with pytest.raises(ValueError, match=f"dataset directory {tmp_path / 'chexpert'} .* does not exist"):
        SiteConfig.from_env().dataset_dir("cxr_classification")

    site_config.write_text(json.dumps({"data_root": str(tmp_path), "datasets": {"cxr_classification": str(data_dir)}}))
    assert SiteConfig.from_env().dataset_dir("cxr_classification") == data_dir


# ---------------------------------------------------------------- generator


def test_generator_is_deterministic(tmp_path):
    for name in ("a", "b"):
        datagen.generate(tmp_path / name, n_train=4, n_val=2, seed=7, size=32)
    for csv_name in ("train.csv", "val.csv"):
        assert (tmp_path / "a" / csv_name).read_bytes() == (tmp_path / "b" / csv_name).read_bytes()
    images = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(images) == 6
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in images)


def test_generator_patients_differ_per_seed_and_site(tmp_path):
    datagen.generate(tmp_path / "a", n_train=4, n_val=2, seed=1, size=32, site_prefix="A")
    datagen.generate(tmp_path / "b", n_train=4, n_val=2, seed=2, size=32, site_prefix="B")
    a_text, b_text = (tmp_path / "a" / "train.csv").read_text(), (tmp_path / "b" / "train.csv").read_text()
    assert "MRN-A" in a_text and "MRN-B" in b_text and "MRN-B" not in a_text
    assert {p.name for p in (tmp_path / "a" / "images").iterdir()}.isdisjoint(
        p.name for p in (tmp_path / "b" / "images").iterdir()
    )


def test_generator_cli_takes_labels_from_job_config(tmp_path):
    job = build_job(tmp_path, "demo", {"client": {"trainer": {"labels": ["Edema", "Lung Opacity"]}}})
    subprocess.run(
        [sys.executable, "-m", "datagen.cxr", "--out", str(tmp_path / "out"), "--n-train", "3", "--n-val", "2",
         "--seed", "5", "--size", "32", "--labels-from", str(job.client_path), "--site-prefix", "C"],
        cwd=CUSTOM, check=True, capture_output=True,  # as scripts/generate_data.sh runs it
    )  # fmt: skip
    header = (tmp_path / "out" / "train.csv").read_text().splitlines()[0]
    assert header == "Path,Sex,Age,Frontal/Lateral,AP/PA,Edema,Lung Opacity,PatientName,PatientID,PatientBirthDate"
    assert len(cxr.read_label_csv(tmp_path / "out" / "val.csv", ["Edema", "Lung Opacity"], "ones")) == 2


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("train", [False, True])
def test_image_transforms_shape_and_range(data_dir, train):
    record = cxr.read_label_csv(data_dir / "val.csv", LABELS, "ones")[0]
    image = cxr.image_transforms({"image_size": [48, 40]}, train=train)(record)["image"]
    assert tuple(image.shape) == (1, 48, 40)
    assert image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_loader_batches(data_dir):
    records = cxr.read_label_csv(data_dir / "train.csv", LABELS, "ignore")
    trainer = {"image_size": [32, 32], "batch_size": 4, "num_workers": 0}
    batch = next(iter(cxr.make_loader(records, trainer, train=True)))
    assert tuple(batch["image"].shape) == (4, 1, 32, 32)
    assert tuple(batch["label"].shape) == tuple(batch["mask"].shape) == (4, len(LABELS))


# ---------------------------------------------------------------- loss and metric


def test_masked_loss_averages_unmasked_elements_only():
    trainer = {"loss": {"name": "BCEWithLogitsLoss", "args": {}}}
    loss_fn = build_by_name(torch.nn, trainer["loss"], Path("config_fed_client.json"), "loss", reduction="none")
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = cxr.masked_loss(loss_fn, logits, target, mask)
    # per sample: the mean over its unmasked labels; then the mean over the batch
    assert loss.item() == pytest.approx((math.log(2) + (math.log(1 + math.exp(-1)) + math.log(2)) / 2) / 2)
    loss.backward()
    assert logits.grad[0, 1].item() == 0.0 and logits.grad[0, 0].item() != 0.0


def test_masked_loss_with_everything_masked_is_zero():
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    assert cxr.masked_loss(loss_fn, torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_auc_averages_labels_with_both_classes():
    scores = torch.tensor([[0.1, 0.1, 0.5], [0.2, 0.2, 0.5], [0.3, 0.3, 0.5], [0.4, 0.4, 0.5]])
    target = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # label 0 ranks perfectly (1.0), label 1 inversely (0.0), label 2 has one class and is skipped
    assert cxr.mean_auc(scores, target, torch.ones_like(target)) == pytest.approx(0.5)


def test_auc_uses_unmasked_rows_only():
    scores = torch.tensor([[0.1], [0.8], [0.9], [0.7]])
    target = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    assert cxr.mean_auc(scores, target, torch.ones_like(target)) == pytest.approx(0.5)
    assert cxr.mean_auc(scores, target, torch.tensor([[1.0], [1.0], [0.0], [1.0]])) == pytest.approx(1.0)


def test_auc_is_nan_with_a_warning_when_no_label_qualifies():
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    with pytest.warns(UserWarning, match="val_auc is nan"):
        assert math.isnan(cxr.mean_auc(torch.rand(2, 2), target, torch.ones_like(target)))


# ---------------------------------------------------------------- the trainer: build(job, site, device)

TINY = {"client": {"trainer": {"image_size": [32, 32], "batch_size": 4, "num_workers": 0}}}  # demo, smaller
CPU = torch.device("cpu")


def test_build_returns_a_trainer_that_trains_and_evaluates(tmp_path, data_dir):
    """The demo job on the generated site data: the job's network, trained by train(), scored by evaluate()."""
    job = build_job(tmp_path, "demo", TINY)
    site = write_site_config(tmp_path / "site_config.json", data_dir, {"min_dataset_size": 1})
    set_determinism(seed=0)
    trainer = cxr.build(job, site, CPU)
    assert isinstance(trainer, Trainer) and trainer.n_train == 12 and trainer.dp_accounting is None
    assert list(trainer.model.state_dict()) == list(job.build_network().state_dict())  # what the server aggregates
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}

    metrics = trainer.evaluate()
    assert set(metrics) == {job.key_metric} == {"val_auc"}
    assert math.isnan(metrics["val_auc"]) or 0.0 <= metrics["val_auc"] <= 1.0

    rounds = [trainer.train() for _ in range(3)]
    assert all(steps == 3 and math.isfinite(loss) for loss, steps in rounds)  # 12 samples / batch_size 4
    assert rounds[-1][0] < rounds[0][0]  # training lowers the loss
    changed = [name for name, value in trainer.model.state_dict().items() if not torch.equal(value, initial[name])]
    assert "class_layers.out.weight" in changed
    assert set(trainer.evaluate()) == {"val_auc"}


FINE_TUNE = {"client": {"trainer": {"trained_layers": ["features.denseblock4", "class_layers"], "freeze_batch_norm": True}}}
DP_POLICY = {"min_dataset_size": 1, "differential_privacy": {"enabled": True, "epsilon": 8, "delta": 1e-5,
                                                             "max_grad_norm": 1.0}}  # fmt: skip


def test_dp_fine_tuning_trains_only_the_named_layers_and_keeps_batch_norm_frozen(tmp_path, data_dir):
    """The dp_pretrained recipe: DP-SGD (Opacus) on the BatchNorm DenseNet-121 with its batch norms frozen in
    eval mode and only the last dense block and the classifier trained; everything else, batch norm statistics
    included, stays as the server sent it."""
    job = build_job(tmp_path, "demo", job_builder.merge(TINY, FINE_TUNE, "test")
                    | {"server": {"num_rounds": 2, "components": [{"id": "persistor", "args": {
                        "model": {"args": {"act": ["relu", {"inplace": False}]}}}}]}})  # fmt: skip
    site = write_site_config(tmp_path / "site_config.json", data_dir, DP_POLICY)
    set_determinism(seed=0)
    trainer = cxr.build(job, site, CPU)
    initial = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    loss, steps = trainer.train()
    assert math.isfinite(loss) and steps > 0 and trainer.dp_accounting()["dp_steps"] == steps
    changed = {name for name, value in trainer.model.state_dict().items() if not torch.equal(value, initial[name])}
    assert "class_layers.out.weight" in changed and "features.denseblock4.denselayer16.layers.conv2.weight" in changed
    assert all(name.startswith(("features.denseblock4.", "class_layers.")) for name in changed)
    assert not any(".norm" in name for name in changed)  # batch norm weights and running statistics


def test_an_unknown_trained_layer_is_named_with_its_config_file(tmp_path, data_dir):
    job = build_job(tmp_path, "demo", TINY | {"client": {"trainer": {"trained_layers": ["features.denseblock9"]}}})
    site = write_site_config(tmp_path / "site_config.json", data_dir, {})
    with pytest.raises(ValueError, match="config_fed_client.json: trainer.trained_layers: 'features.denseblock9' not a "
                                         "module of DenseNet121"):  # fmt: skip
        cxr.build(job, site, CPU)


def test_trainer_reports_the_jobs_key_metric(tmp_path, data_dir):
    """The key metric is the job's (the server's model selector reads it), whatever it is named."""
    job = build_job(tmp_path, "demo", TINY | {"server": {"key_metric": "val_macro_auc"}})
    site = write_site_config(tmp_path / "site_config.json", data_dir, {})
    assert set(cxr.build(job, site, CPU).evaluate()) == {"val_macro_auc"}


def test_validation_preprocessing_is_the_bundle_configs(tmp_path, data_dir, monkeypatch):
    """What the trainer's evaluate() feeds the network is ``inference_preprocessing`` instantiated from its
    MONAI bundle config (what the fetched model's bundle carries), applied to the image file alone."""
    loaders, evaluate = [], cxr.evaluate

    def spy(model, loader, *args):  # the validation loader that the trainer's evaluate() uses
        loaders.append(loader)
        return evaluate(model, loader, *args)

    monkeypatch.setattr(cxr, "evaluate", spy)
    job = build_job(tmp_path, "demo", TINY)
    site = write_site_config(tmp_path / "site_config.json", data_dir, {})
    cxr.build(job, site, CPU).evaluate()
    (loader,) = loaders
    val_records = cxr.read_label_csv(data_dir / "val.csv", LABELS, "ones")
    assert [r["image"] for r in loader.dataset.data] == [r["image"] for r in val_records]

    record = val_records[0]
    bundle = Compose(transform_config.instantiate(cxr.inference_preprocessing(cxr.load_settings(job))))
    expected = bundle({"image": record["image"]})["image"]
    for _ in range(2):  # deterministic: no augmentation in validation
        actual = loader.dataset.transform(dict(record))["image"]
        assert tuple(actual.shape) == (1, 32, 32)
        assert torch.equal(torch.as_tensor(actual), torch.as_tensor(expected))
