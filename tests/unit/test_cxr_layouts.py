"""Unit tests of the CXR dataset layouts (custom/cxr_layouts.py): one output space (the job's 18 labels), many
sources (the project layout, CheXpert v1.0 as distributed, NIH ChestX-ray14): detection, label maps, masking,
splits, bad input, the data check and its --check CLI, and build/train/evaluate on generated CheXpert and NIH
trees. Tiny images; no NVFlare process."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.utils import set_determinism

CUSTOM = Path(__file__).resolve().parents[2] / "custom"
sys.path.insert(0, str(CUSTOM))

import cxr_classification as cxr  # noqa: E402
import cxr_layouts as layouts  # noqa: E402
from datagen import cxr as datagen  # noqa: E402
from hcls.job_config import JobConfig  # noqa: E402
from hcls.site_config import SiteConfig  # noqa: E402
from ops import job_builder  # noqa: E402

LABELS = datagen.DEFAULT_LABELS
SOURCES = datagen.JOB_TRAINER["label_sources"]
CHEXPERT_MASKED = ["Infiltration", "Emphysema", "Fibrosis", "Pleural_Thickening", "Nodule", "Mass", "Hernia"]
NIH_MASKED = ["Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]
TINY = {"client": {"trainer": {"image_size": [32, 32], "batch_size": 4, "num_workers": 0}}}
SMALL_NETWORK = {"server": {"components": [{"id": "persistor", "args": {"model": {"args": {
    "init_features": 8, "growth_rate": 8, "block_config": [1, 1, 1, 1]}}}}]}}  # a tiny DenseNet, 18 outputs
CPU = torch.device("cpu")


def trainer_settings(**overrides) -> dict:
    return {"labels": LABELS, "label_sources": SOURCES, "uncertain_label_policy": "ones", "max_train_samples": 0,
            "max_val_samples": 0} | overrides  # fmt: skip


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """A generated dataset folder per layout (the folder a site's datasets.cxr_classification names)."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout, (n_train, n_val) in {"chexpert-small": (12, 6), "nih": (12, 6), "project": (6, 3)}.items():
        out[layout] = root / layout
        datagen.generate_layout(layout, out[layout], n_train, n_val, seed=4, size=32)
    return out


def copy_tree(trees: dict, layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trees[layout], tmp_path / layout))


def build_job(out: Path, overlay: dict | None = None) -> JobConfig:
    config = job_builder.merge(job_builder.resolve(cxr.JOB_NAME, "demo"), TINY, "tiny")
    if overlay:
        config = job_builder.merge(config, overlay, "test overlay")
    return JobConfig.from_job_folder(job_builder.write_job(config, out / "job"))


def site_config(path: Path, data_dir: Path, layout: str | None = None) -> SiteConfig:
    config = {"data_root": str(data_dir.parent), "datasets": {cxr.JOB_NAME: data_dir.name}, "privacy": {}}
    if layout:
        config["dataset_layouts"] = {cxr.JOB_NAME: layout}
    path.write_text(json.dumps(config))
    return SiteConfig(path)


def rewrite_csv(path: Path, edit) -> None:
    """Apply ``edit(rows)`` to a CSV's rows (header first), in place."""
    rows = list(csv.reader(path.open(newline="")))
    edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


# ---------------------------------------------------------------- the job's label map


def test_job_label_map_feeds_only_the_jobs_outputs():
    assert set(SOURCES) == {"chexpert", "nih"}
    for layout, mapping in SOURCES.items():
        assert set(mapping.values()) <= set(LABELS) and len(set(mapping.values())) == len(mapping)
        assert set(mapping) <= set(layouts.VOCABULARY[layout])
    assert SOURCES["chexpert"]["Pleural Effusion"] == "Effusion" and SOURCES["nih"]["Effusion"] == "Effusion"
    assert set(SOURCES["nih"]) == set(layouts.NIH_FINDINGS)  # every NIH finding feeds an output
    assert [s for s in layouts.output_sources("project", LABELS, SOURCES)] == LABELS  # identity


@pytest.mark.parametrize(
    "label_sources, fragment",
    [
        ({"mimic": {}}, "label_sources.mimic: unknown layout"),
        ({"nih": {"Effusions": "Effusion"}}, "'Effusions' is not a nih label"),
        ({"chexpert": {"Edema": "Edema", "Pleural Effusion": "Edema"}}, "'Edema' is fed by both"),
    ],
)
def test_bad_label_map_names_the_client_config(tmp_path, label_sources, fragment):
    job = build_job(tmp_path, {"client": {"trainer": {"label_sources": None}}})
    job.client["trainer"]["label_sources"] = label_sources
    with pytest.raises(ValueError, match=f"config_fed_client.json: trainer.*{fragment}"):
        cxr.load_settings(job)


# ---------------------------------------------------------------- detection


def test_layout_detection(trees, tmp_path):
    assert layouts.detect_layout(trees["chexpert-small"]) == "chexpert"
    assert layouts.detect_layout(trees["chexpert-small"] / "CheXpert-v1.0-small") == "chexpert"  # the folder itself
    assert layouts.detect_layout(trees["nih"]) == "nih"
    assert layouts.detect_layout(trees["project"]) == "project"
    assert layouts.detect_layout(trees["project"], "nih") == "nih"  # named by the site
    with pytest.raises(ValueError, match="site_config.json: dataset_layouts.cxr_classification 'mimic'"):
        layouts.detect_layout(trees["project"], "mimic", tmp_path / "site_config.json")
    (tmp_path / "mimic-cxr-jpg").mkdir()  # a release the job does not read: each layout's marker file is named
    with pytest.raises(ValueError, match=r"mimic-cxr-jpg: not a chest X-ray dataset this job reads: no CheXpert-v1.0\*/ "
                       r"folder with train.csv or valid.csv \(CheXpert\), no Data_Entry_2017.csv \(NIH ChestX-ray14\)"):
        layouts.detect_layout(tmp_path / "mimic-cxr-jpg")
    site = site_config(tmp_path / "site_config.json", trees["nih"], "nih")
    assert cxr.site_layout(site, trees["nih"]) == ("nih", "site config")


# ---------------------------------------------------------------- CheXpert


def test_chexpert_mapping_masking_and_frontal_only(trees):
    data = cxr.read_data(trainer_settings(), trees["chexpert-small"])
    assert data.layout == "chexpert" and not data.problems
    assert [label for label, s in zip(LABELS, data.sources, strict=True) if s is None] == CHEXPERT_MASKED
    assert data.sources[LABELS.index("Effusion")] == "Pleural Effusion"
    csv_path = trees["chexpert-small"] / "CheXpert-v1.0-small" / "train.csv"
    rows = list(csv.DictReader(csv_path.open(newline="")))
    frontal = [row for row in rows if row["Frontal/Lateral"] == "Frontal"]
    assert len(frontal) == 12 and len(rows) > 12  # laterals exist and are skipped by default
    assert len(data.train.records) == 12 and data.train.laterals_skipped == len(rows) - 12
    effusion = LABELS.index("Effusion")
    for row, record in zip(frontal, data.train.records, strict=True):
        assert record["image"].endswith(row["Path"]) and set(record) == {"image", "label", "mask"}
        cell = row["Pleural Effusion"]
        assert record["label"][effusion] == (1.0 if cell in ("1.0", "-1.0") else 0.0)  # U-Ones, blank negative
        for label in CHEXPERT_MASKED:  # never supervised by a CheXpert site
            assert record["mask"][LABELS.index(label)] == 0 and record["label"][LABELS.index(label)] == 0
    with_laterals = cxr.read_data(trainer_settings(include_lateral=True), trees["chexpert-small"])
    assert len(with_laterals.train.records) == len(rows)


def test_auc_ignores_labels_a_chexpert_site_does_not_feed(trees):
    _, val = cxr.load_data(trainer_settings(), trees["chexpert-small"])
    target = torch.as_tensor(np.stack([r["label"] for r in val]))
    mask = torch.as_tensor(np.stack([r["mask"] for r in val]))
    scores = target.clone()  # a perfect score on every fed label ...
    infiltration = LABELS.index("Infiltration")
    assert mask[:, infiltration].sum() == 0
    scores[:, infiltration] = torch.linspace(0, 1, len(val))  # ... and anything on a masked one
    fed_both = [j for j in range(len(LABELS)) if mask[:, j].all() and target[:, j].unique().numel() == 2]
    assert fed_both and cxr.mean_auc(scores, target, mask) == pytest.approx(1.0)
    target[:, infiltration] = torch.tensor([1.0, 0.0] * (len(val) // 2))  # masked targets never count either
    assert cxr.mean_auc(scores, target, mask) == pytest.approx(1.0)


def test_chexpert_full_folder_name(tmp_path):
    datagen.generate_layout("chexpert", tmp_path / "chexpert", 3, 2, seed=1, size=32)
    assert (tmp_path / "chexpert" / "CheXpert-v1.0" / "valid.csv").is_file()
    train, val = cxr.load_data(trainer_settings(), tmp_path / "chexpert")
    assert len(train) == 3 and len(val) == 2 and "/CheXpert-v1.0/train/patient" in train[0]["image"]


def test_chexpert_path_prefix_matching_no_folder(trees, tmp_path):
    data_dir = copy_tree(trees, "chexpert-small", tmp_path)
    csv_path = data_dir / "CheXpert-v1.0-small" / "valid.csv"
    rewrite_csv(csv_path, lambda rows: rows[2].__setitem__(0, rows[2][0].replace("-small/", "/")))
    with pytest.raises(ValueError) as err:
        cxr.load_data(trainer_settings(), data_dir)
    assert f"{csv_path}, row 3, column 'Path': prefix 'CheXpert-v1.0' of" in str(err.value)
    assert "names no folder" in str(err.value)


def test_chexpert_missing_image(trees, tmp_path):
    data_dir = copy_tree(trees, "chexpert-small", tmp_path)
    csv_path = data_dir / "CheXpert-v1.0-small" / "train.csv"
    first = next(csv.DictReader(csv_path.open(newline="")))["Path"]
    (data_dir / first).unlink()
    with pytest.raises(ValueError, match=rf"{csv_path}, row 2, column 'Path': image file .* does not exist"):
        cxr.load_data(trainer_settings(), data_dir)


def test_chexpert_bad_cell_names_column(trees, tmp_path):
    data_dir = copy_tree(trees, "chexpert-small", tmp_path)
    csv_path = data_dir / "CheXpert-v1.0-small" / "train.csv"
    column = rows_header(csv_path).index("Edema")
    rewrite_csv(csv_path, lambda rows: rows[1].__setitem__(column, "2.0"))
    with pytest.raises(ValueError, match=rf"{csv_path}, row 2, column 'Edema': value '2.0'"):
        cxr.load_data(trainer_settings(), data_dir)


def rows_header(csv_path: Path) -> list[str]:
    return next(csv.reader(csv_path.open(newline="")))


def test_patient_in_both_splits_is_refused_without_naming_the_patient(trees, tmp_path):
    data_dir = copy_tree(trees, "chexpert-small", tmp_path)
    folder = data_dir / "CheXpert-v1.0-small"
    train_path = next(csv.DictReader((folder / "train.csv").open(newline="")))["Path"]
    patient = layouts.patient_of(train_path)
    val_rows = list(csv.reader((folder / "valid.csv").open(newline="")))
    moved = val_rows[1][0].replace(layouts.patient_of(val_rows[1][0]), patient)
    (data_dir / moved).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(data_dir / val_rows[1][0], data_dir / moved)
    rewrite_csv(folder / "valid.csv", lambda rows: rows[1].__setitem__(0, moved))
    with pytest.raises(ValueError) as err:
        cxr.load_data(trainer_settings(), data_dir)
    message = str(err.value)
    assert message.startswith(f"{folder / 'valid.csv'}, row 2: 1 patient(s) have both training (train.csv)")
    assert patient not in message


# ---------------------------------------------------------------- NIH


def test_nih_exhaustive_negatives_splits_and_masking(trees):
    data = cxr.read_data(trainer_settings(), trees["nih"])
    assert data.layout == "nih" and not data.problems
    assert len(data.train.records) == 12 and len(data.val.records) == 6
    assert [label for label, s in zip(LABELS, data.sources, strict=True) if s is None] == NIH_MASKED
    entries = {row["Image Index"]: row for row in csv.DictReader((trees["nih"] / "Data_Entry_2017.csv").open())}
    assert "No Finding" in {row["Finding Labels"] for row in entries.values()}
    assert any("|" in row["Finding Labels"] for row in entries.values())
    names = (trees["nih"] / "train_val_list.txt").read_text().split()
    assert {Path(r["image"]).parent.parent.name for r in data.train.records} == {"images_001", "images_002"}
    for name, record in zip(names, data.train.records, strict=True):
        assert Path(record["image"]).name == name
        findings = set(entries[name]["Finding Labels"].split("|"))
        for j, label in enumerate(LABELS):
            if label in NIH_MASKED:
                assert record["mask"][j] == 0
            else:  # a finding absent from the row's list is a negative, never masked
                assert record["mask"][j] == 1 and record["label"][j] == float(label in findings)


def test_nih_unknown_finding(trees, tmp_path):
    data_dir = copy_tree(trees, "nih", tmp_path)
    rewrite_csv(data_dir / "Data_Entry_2017.csv", lambda rows: rows[3].__setitem__(1, "Effusion|Pleural Thickening"))
    with pytest.raises(ValueError) as err:
        cxr.load_data(trainer_settings(), data_dir)
    assert f"{data_dir / 'Data_Entry_2017.csv'}, row 4, column 'Finding Labels': unknown finding(s) " \
           "'Pleural Thickening'" in str(err.value)  # fmt: skip


def test_nih_missing_image_and_patient_overlap(trees, tmp_path):
    data_dir = copy_tree(trees, "nih", tmp_path)
    names = (data_dir / "test_list.txt").read_text().split()
    next(data_dir.glob(f"images_*/images/{names[1]}")).unlink()
    with pytest.raises(ValueError, match=rf"test_list.txt, row 2: image file {names[1]} not found"):
        cxr.load_data(trainer_settings(), data_dir)

    data_dir = copy_tree(trees, "nih", tmp_path / "overlap")
    train_names = (data_dir / "train_val_list.txt").read_text().split()
    (data_dir / "test_list.txt").write_text("\n".join([*names, train_names[0]]) + "\n")
    patient = train_names[0].split("_")[0].lstrip("0")
    with pytest.raises(ValueError) as err:
        cxr.load_data(trainer_settings(), data_dir)
    assert f"test_list.txt, row {len(names) + 1}: 1 patient(s) have both training" in str(err.value)
    assert patient not in str(err.value).replace(str(data_dir), "")


# ---------------------------------------------------------------- project layout: as before


def test_project_layout_is_unchanged(trees):
    train, val = cxr.load_data(trainer_settings(label_sources=None), trees["project"])
    assert len(train) == 6 and len(val) == 3
    assert all(r["mask"].sum() > 0 for r in train) and all(r["mask"].all() for r in val)  # every label fed


# ---------------------------------------------------------------- the data check


def test_check_summary_has_counts_and_no_identifiers(trees, tmp_path):
    job = build_job(tmp_path)
    for layout, expected in (("chexpert-small", "chexpert"), ("nih", "nih"), ("project", "project")):
        site = site_config(tmp_path / f"{layout}.json", trees[layout])
        summary = cxr.check_data(job, site)
        assert summary["ok"] and summary["layout"] == expected and summary["layout_from"] == "detected"
        assert summary["errors"] == [] and summary["dataset"] == layout
        masked = {"chexpert": CHEXPERT_MASKED, "nih": NIH_MASKED, "project": []}[expected]
        assert summary["masked_labels"] == masked and list(summary["labels"]) == LABELS
        for label, entry in summary["labels"].items():
            for split in ("training", "validation"):
                counts = entry[split]
                assert sum(counts.values()) == summary["splits"][split]["images"]
                assert (counts["masked"] == counts["positives"] + counts["negatives"] + counts["masked"]) == (
                    label in masked
                )
        text = json.dumps(summary)
        assert str(trees[layout].parent) not in text and "patient0" not in text and ".jpg" not in text
        assert ".png" not in text
    nih = cxr.check_data(job, site_config(tmp_path / "nih.json", trees["nih"]))
    patient_ids = {row["Patient ID"] for row in csv.DictReader((trees["nih"] / "Data_Entry_2017.csv").open())}
    assert nih["splits"]["training"]["patients"] + nih["splits"]["validation"]["patients"] == len(patient_ids)
    assert not any(f'"{p}"' in json.dumps(nih) for p in patient_ids)


def test_check_reports_errors_without_paths_or_identifiers(trees, tmp_path):
    data_dir = copy_tree(trees, "chexpert-small", tmp_path)
    csv_path = data_dir / "CheXpert-v1.0-small" / "train.csv"
    first = next(csv.DictReader(csv_path.open(newline="")))["Path"]
    (data_dir / first).unlink()
    summary = cxr.check_data(build_job(tmp_path), site_config(tmp_path / "site.json", data_dir))
    assert not summary["ok"]
    assert summary["errors"] == [{"file": "chexpert-small/CheXpert-v1.0-small/train.csv", "row": 2, "column": "Path",
                                  "error": "image file does not exist"}]  # fmt: skip
    assert layouts.patient_of(first) not in json.dumps(summary)


def test_check_cli_without_nvflare(trees, tmp_path):
    job = build_job(tmp_path)
    site = site_config(tmp_path / "site.json", trees["nih"])
    code = "import runpy, sys; sys.modules['nvflare'] = None; sys.argv = sys.argv[1:]; " \
           "runpy.run_path(sys.argv[0], run_name='__main__')"  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code, str(CUSTOM / "cxr_classification.py"), "--check",
         "--config", str(job.client_path)],
        env=os.environ | {"HCLS_SITE_CONFIG": str(site.path), "PYTHONPATH": str(CUSTOM)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layout"] == "nih"


# ---------------------------------------------------------------- generator


def test_generator_layouts_are_deterministic(tmp_path):
    for layout in ("chexpert-small", "nih"):
        for name in ("a", "b"):
            datagen.generate_layout(layout, tmp_path / layout / name, 3, 2, seed=9, size=16)
        first = tmp_path / layout / "a"
        files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
        assert files and all(
            (tmp_path / layout / "a" / f).read_bytes() == (tmp_path / layout / "b" / f).read_bytes() for f in files
        )
    header = rows_header(tmp_path / "chexpert-small" / "a" / "CheXpert-v1.0-small" / "train.csv")
    assert header == [*datagen.CHEXPERT_COLUMNS, *layouts.CHEXPERT_OBSERVATIONS]
    assert datagen.NIH_FINDINGS == list(layouts.NIH_FINDINGS)


# ---------------------------------------------------------------- build, train, evaluate


@pytest.mark.parametrize("layout", ["chexpert-small", "nih"])
def test_build_trains_and_evaluates_on_a_generated_tree(trees, tmp_path, layout):
    job = build_job(tmp_path, SMALL_NETWORK)
    site = site_config(tmp_path / "site_config.json", trees[layout])
    set_determinism(seed=0)
    trainer = cxr.build(job, site, CPU)
    assert trainer.n_train == 12
    loss, steps = trainer.train()
    assert steps == 3 and math.isfinite(loss)  # 12 frontal images / batch_size 4
    metrics = trainer.evaluate()
    assert set(metrics) == {job.key_metric}
    assert math.isnan(metrics[job.key_metric]) or 0.0 <= metrics[job.key_metric] <= 1.0
