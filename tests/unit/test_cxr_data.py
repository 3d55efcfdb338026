"""Unit tests of the CXR data handling: CSV label policies and validation, the demo data
generator, image transforms, the masked loss and the AUC metric. No NVFlare process needed."""

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

CUSTOM = Path(__file__).resolve().parents[2] / "custom"
sys.path.insert(0, str(CUSTOM))

import cxr_classification as cxr  # noqa: E402
import hcls_common  # noqa: E402
from datagen import cxr as datagen  # noqa: E402

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


def test_a_label_that_the_site_blocks_is_refused(data_dir, tmp_path, monkeypatch):
    site_config = tmp_path / "site_config.json"
    site_config.write_text(json.dumps({"privacy": {"blocked_data_fields": ["PatientID"]}}))
    monkeypatch.setenv(hcls_common.SITE_CONFIG_ENV, str(site_config))
    trainer = {"labels": ["Edema", "PatientID"], "uncertain_label_policy": "ones", "max_train_samples": 0,
               "max_val_samples": 0}  # fmt: skip
    with pytest.raises(ValueError, match=r"trainer.labels names PatientID, blocked by this site .*site_config.json"):
        cxr.load_data(trainer, data_dir, ["PatientID"])


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


def write_job_config(app_config: Path, key_metric: str = "val_auc", **trainer_changes) -> Path:
    """A job's client config with every required trainer key, and its server config next to it."""
    trainer = {key: None for key in cxr.REQUIRED_KEYS} | {"uncertain_label_policy": "ones"} | trainer_changes
    (app_config / "config_fed_server.json").write_text(json.dumps({"key_metric": key_metric}))
    client_config = app_config / "config_fed_client.json"
    client_config.write_text(json.dumps({"format_version": 2, "trainer": trainer}))
    return client_config


def test_unknown_policy_names_config_file(tmp_path):
    config = write_job_config(tmp_path, uncertain_label_policy="maybe")
    with pytest.raises(ValueError, match="config_fed_client.json: trainer.uncertain_label_policy 'maybe'"):
        cxr.load_config(config)


def test_other_key_metric_names_server_config(tmp_path):
    with pytest.raises(ValueError, match="config_fed_server.json: key_metric must be 'val_auc'"):
        cxr.load_config(write_job_config(tmp_path, key_metric="val_dice"))


def test_unknown_optimizer_names_config_file_and_field(tmp_path):
    config = tmp_path / "config_fed_client.json"
    with pytest.raises(ValueError, match="config_fed_client.json: trainer.optimizer.name = 'Adamm'"):
        hcls_common.build_optimizer({"optimizer": {"name": "Adamm", "args": {}}}, config, [])


def test_site_dataset_dir(tmp_path, monkeypatch, data_dir):
    site_config = tmp_path / "site_config.json"
    monkeypatch.delenv(hcls_common.SITE_CONFIG_ENV, raising=False)
    with pytest.raises(ValueError, match="HCLS_SITE_CONFIG is not set"):
        hcls_common.site_dataset_dir("cxr_classification")

    monkeypatch.setenv(hcls_common.SITE_CONFIG_ENV, str(site_config))
    with pytest.raises(ValueError, match="site_config.json: file not found"):
        hcls_common.site_dataset_dir("cxr_classification")

    site_config.write_text(json.dumps({"data_root": str(tmp_path), "datasets": {"ct_segmentation": "ct"}}))
    with pytest.raises(ValueError, match="site_config.json: field 'datasets.cxr_classification'"):
        hcls_common.site_dataset_dir("cxr_classification")

    site_config.write_text(json.dumps({"data_root": str(tmp_path), "datasets": {"cxr_classification": "chexpert"}}))
    with pytest.raises(ValueError, match=f"dataset directory {tmp_path / 'chexpert'} .* does not exist"):
        hcls_common.site_dataset_dir("cxr_classification")

    site_config.write_text(json.dumps({"data_root": str(tmp_path), "datasets": {"cxr_classification": str(data_dir)}}))
    assert hcls_common.site_dataset_dir("cxr_classification") == data_dir


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
    config = tmp_path / "config_fed_client.json"
    config.write_text(json.dumps({"trainer": {"labels": ["Edema", "Lung Opacity"]}}))
    subprocess.run(
        [sys.executable, str(CUSTOM / "datagen" / "cxr.py"), "--out", str(tmp_path / "out"), "--n-train", "3",
         "--n-val", "2", "--seed", "5", "--size", "32", "--labels-from", str(config), "--site-prefix", "C"],
        check=True, capture_output=True,
    )  # fmt: skip
    header = (tmp_path / "out" / "train.csv").read_text().splitlines()[0]
    assert header == "Path,Sex,Age,Frontal/Lateral,AP/PA,Edema,Lung Opacity,PatientName,PatientID,PatientBirthDate"
    assert len(cxr.read_label_csv(tmp_path / "out" / "val.csv", ["Edema", "Lung Opacity"], "ones")) == 2


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("train", [False, True])
def test_image_transforms_shape_and_range(data_dir, train):
    record = cxr.read_label_csv(data_dir / "val.csv", LABELS, "ones")[0]
    image = cxr.image_transforms([48, 40], train=train)(record)["image"]
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
    loss_fn = hcls_common.build_loss(trainer, Path("config_fed_client.json"), reduction="none")
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
