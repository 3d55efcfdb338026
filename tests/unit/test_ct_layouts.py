"""Unit tests of the CT trainer's dataset layouts beside the project's lists: MSD / BTCV ``dataset.json`` (labels
map, optional validation list, the hash split), the job's ``trainer.label_remap``, DICOM series folders as images
(geometry against a known voxel, bad folders), the data check and its ``--check`` CLI, the generator's ``msd`` and
``--dicom`` outputs, and one real build / train / evaluate on an MSD task of DICOM series. No NVFlare process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged, Orientationd
from monai.utils import set_determinism
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

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
SIZE = 20

# A hand-made coronal series: 6 columns x 5 rows x 4 slices. Rows run along +L (LPS x), columns downwards (-S),
# slices stack posteriorly (+P, the normal row x column). PixelSpacing = (row spacing 0.8, column spacing 0.6),
# slices 2.5 mm apart, first slice at LPS (-100, 50, -300). Voxel (i, j, k) = (column, row, slice):
# LPS = (-100 + 0.6 i, 50 + 2.5 k, -300 - 0.8 j), RAS = (100 - 0.6 i, -50 - 2.5 k, -300 - 0.8 j).
HAND_SHAPE = (6, 5, 4)
HAND_VOXEL = (3, 2, 1)
HAND_RAS = (100 - 0.6 * 3, -50 - 2.5 * 1, -300 - 0.8 * 2)
HAND_AFFINE = np.array([[-0.6, 0, 0, 100], [0, 0, -2.5, -50], [0, -0.8, 0, -300], [0, 0, 0, 1.0]])  # RAS


def write_hand_series(folder: Path, series_uid: str = "1.2.3.4.5") -> Path:
    """The hand-made series (HU -1000, 500 at ``HAND_VOXEL``), files named in the reverse order of their position."""
    folder.mkdir(parents=True)
    volume = np.full(HAND_SHAPE, -1000, dtype=np.int16)
    volume[HAND_VOXEL] = 500
    for k in range(HAND_SHAPE[2]):
        uid = generate_uid(entropy_srcs=[series_uid, f"/{k}"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.SeriesInstanceUID = CTImageStorage, uid, "CT", series_uid
        ds.ImagePositionPatient = [-100.0, 50.0 + 2.5 * k, -300.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.6], 2.5
        ds.Rows, ds.Columns = HAND_SHAPE[1], HAND_SHAPE[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (volume[:, :, k].T.astype(np.int32) + 1024).astype("<u2").tobytes()
        pydicom.dcmwrite(folder / f"slice_{HAND_SHAPE[2] - k}.dcm", ds, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    """Generated datasets of one seed (never modified): the project lists, an MSD task, an MSD task of DICOM."""
    root = tmp_path_factory.mktemp("ct")
    out = {"project": root / "project", "msd": root / "msd", "msd-dicom": root / "msd-dicom"}
    datagen.generate(out["project"], n_train=2, n_val=1, seed=4, size=SIZE)
    datagen.generate(out["msd"], n_train=2, n_val=1, seed=4, size=SIZE, layout="msd")
    datagen.generate(out["msd-dicom"], n_train=2, n_val=1, seed=4, size=SIZE, layout="msd", dicom=True)
    return out


def copy(generated: dict, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(generated[name], tmp_path / name))


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> JobConfig:
    return build_job(tmp_path_factory.mktemp("job"))


def build_job(out: Path, overlay: dict | None = None, profile: str = "demo") -> JobConfig:
    config = job_builder.resolve(ct.JOB_NAME, profile)
    if overlay:
        config = job_builder.merge(config, overlay, "test overlay")
    return JobConfig.from_job_folder(job_builder.write_job(config, out / "job"))


def site_config(tmp_path: Path, data_dir: Path, **extra) -> SiteConfig:
    path = tmp_path / "site_config.json"
    path.write_text(json.dumps({"data_root": str(data_dir.parent), "datasets": {ct.JOB_NAME: data_dir.name}, **extra}))
    return SiteConfig(path)


def trainer_settings(job: JobConfig, **changes) -> dict:
    return {**ct.load_settings(job), "max_train_samples": 0, "max_val_samples": 0, **changes}


def edit_dataset(data_dir: Path, change) -> None:
    path = data_dir / "dataset.json"
    dataset = json.loads(path.read_text())
    change(dataset)
    path.write_text(json.dumps(dataset))


def messages(problems) -> list[str]:
    return [str(p) for p in problems]


# ---------------------------------------------------------------- generator


def test_generator_writes_an_msd_task(generated):
    dataset = json.loads((generated["msd"] / "dataset.json").read_text())
    assert {"name", "description", "reference", "licence", "tensorImageSize", "modality", "labels", "numTraining",
            "numTest", "training", "test"} <= set(dataset)  # fmt: skip
    assert dataset["tensorImageSize"] == "3D" and dataset["modality"] == {"0": "CT"}
    assert dataset["labels"]["0"] == "background" and dataset["labels"]["3"] == "rkid"
    assert "validation" not in dataset and dataset["numTraining"] == 3 and dataset["numTest"] == len(dataset["test"])
    first = {"image": "./imagesTr/abdomen_001.nii.gz", "label": "./labelsTr/abdomen_001.nii.gz"}
    assert dataset["training"][0] == first
    assert all((generated["msd"] / path).is_file() for path in dataset["test"])
    assert dataset["test"][0].startswith("./imagesTs/")


def test_generator_msd_is_the_project_data_renumbered(generated):
    """Same seed: the same images; an msd label through the job's remap is the project label."""
    project, msd = generated["project"], generated["msd"]
    assert (project / "imagesTr/ct_0001.nii.gz").read_bytes() == (msd / "imagesTr/abdomen_001.nii.gz").read_bytes()
    data = ct.read_site_data({"labels": LABELS, "label_remap": production_remap()}, msd)
    lookup = np.array([data.label_map[v] for v in range(len(datagen.MSD_LABELS))])
    source = np.asanyarray(nib.load(msd / "labelsTr/abdomen_001.nii.gz").dataobj)
    assert (source == datagen.MSD_LABELS.index("vertebrae")).any()  # the unmapped label is in the data
    assert np.array_equal(lookup[source], np.asanyarray(nib.load(project / "labelsTr/ct_0001.nii.gz").dataobj))


def test_generator_dicom_series_hold_the_nifti_volume(generated):
    folder = generated["msd-dicom"] / "imagesTr" / "abdomen_001"
    files = sorted(folder.iterdir())
    assert len(files) == SIZE
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {h.Modality for h in headers} == {"CT"} and len({h.SeriesInstanceUID for h in headers}) == 1
    assert float(headers[0].RescaleIntercept) == -1024 and float(headers[0].RescaleSlope) == 1
    nifti = nib.load(generated["msd"] / "imagesTr" / "abdomen_001.nii.gz")
    image = LoadImage(image_only=True)(str(folder))  # MONAI's default DICOM reader (ITKReader)
    assert np.array_equal(image.numpy(), np.asanyarray(nifti.dataobj).astype(np.float32))
    assert np.allclose(image.affine.numpy(), nifti.affine, atol=1e-3)
    other = pydicom.dcmread(generated["msd-dicom"] / "imagesTr" / "abdomen_002" / "0001.dcm", stop_before_pixels=True)
    assert other.SeriesInstanceUID != headers[0].SeriesInstanceUID


def test_generator_is_deterministic_and_cli(tmp_path, generated):
    subprocess.run(
        [sys.executable, "-m", "datagen.ct", "--out", str(tmp_path / "again"), "--n-train", "2", "--n-val", "1",
         "--seed", "4", "--size", str(SIZE), "--layout", "msd", "--dicom"],
        cwd=CUSTOM, check=True, capture_output=True,
    )  # fmt: skip
    first = generated["msd-dicom"]
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)


def test_generator_dicom_in_the_project_layout(tmp_path):
    datagen.generate(tmp_path / "d", n_train=1, n_val=1, seed=2, size=16, dicom=True)
    train = json.loads((tmp_path / "d" / "train_data.json").read_text())["training"]
    assert train == [{"image": "imagesTr/ct_0001", "label": "labelsTr/ct_0001.nii.gz"}]
    records, val = ct.load_data({"labels": LABELS, "max_train_samples": 0, "max_val_samples": 0}, tmp_path / "d")
    assert Path(records[0]["image"]).is_dir() and len(val) == 1


# ---------------------------------------------------------------- layouts and dataset.json


def test_layout_detection(tmp_path, generated):
    assert ct.detect_layout(generated["msd"]) == "msd" and ct.detect_layout(generated["project"]) == "project"
    both = copy(generated, "msd", tmp_path)
    shutil.copy(generated["project"] / "train_data.json", both)
    with pytest.raises(ValueError, match=r"holds both dataset.json .* and train_data.json .*: name the one to read in "
                                         r"the site config: dataset_layouts.ct_segmentation"):  # fmt: skip
        ct.detect_layout(both)
    assert ct.detect_layout(both, "msd") == "msd"
    with pytest.raises(ValueError, match="site.json: dataset_layouts.ct_segmentation 'nifti' is not one of"):
        ct.detect_layout(both, "nifti", "site.json")
    with pytest.raises(ValueError, match="no dataset.json .* nor train_data.json"):
        ct.detect_layout(tmp_path)


def test_site_names_the_layout(tmp_path, generated, job):
    both = copy(generated, "msd", tmp_path)
    shutil.copy(generated["project"] / "train_data.json", both)
    summary = ct.check_data(job, site_config(tmp_path, both))
    assert not summary["ok"] and "dataset_layouts.ct_segmentation" in summary["errors"][0]["error"]
    named = ct.check_data(job, site_config(tmp_path, both, dataset_layouts={ct.JOB_NAME: "msd"}))
    assert named["layout"] == "msd" and named["layout_from"] == "site config" and named["ok"]


@pytest.mark.parametrize(
    "labels, expected",
    [({"0": "background", "1": "spleen", "2": "rkid"}, {0: "background", 1: "spleen", 2: "rkid"}),
     ({"background": 0, "spleen": 1, "rkid": "2"}, {0: "background", 1: "spleen", 2: "rkid"})],
    ids=["number-to-name", "name-to-number"],
)  # fmt: skip
def test_msd_labels_both_ways(labels, expected):
    assert ct.parse_msd_labels(labels) == expected


@pytest.mark.parametrize(
    "labels, fragment",
    [(None, "must be an object"), ({"0": "background", "1": 5}, "is not a label value and its name"),
     ({"background": 0, "spleen": 0}, "label value 0 is named twice")],
    ids=["missing", "bad-name", "twice"],
)  # fmt: skip
def test_bad_msd_labels_name_the_field(tmp_path, generated, labels, fragment):
    data_dir = copy(generated, "msd", tmp_path)
    edit_dataset(data_dir, lambda d: d.update(labels=labels))
    problems = messages(ct.read_site_data({"labels": LABELS}, data_dir).problems)
    assert len(problems) == 1 and problems[0].startswith(f"{data_dir / 'dataset.json'}, 'labels': ")
    assert fragment in problems[0]


def test_validation_list_is_used_and_paths_may_start_with_dot(tmp_path, generated):
    data_dir = copy(generated, "msd", tmp_path)
    edit_dataset(data_dir, lambda d: d.update(validation=[d["training"].pop(0)], test=["./imagesTs/ignored"]))
    data = ct.read_site_data({"labels": LABELS}, data_dir, fraction=0.9)
    assert not data.problems and data.validation_fraction is None
    assert [Path(r["image"]).name for r in data.val.records] == ["abdomen_001.nii.gz"]
    assert [Path(r["image"]).name for r in data.train.records] == ["abdomen_002.nii.gz", "abdomen_003.nii.gz"]
    edit_dataset(data_dir, lambda d: d["validation"].append(d["training"][1]))
    problems = messages(ct.read_site_data({"labels": LABELS}, data_dir).problems)
    assert problems == [f"{data_dir / 'dataset.json'}, entry validation[1], 'image': the same image as training[1]: "
                        "a case is in one split"]  # fmt: skip


def test_label_values_outside_the_labels_map_name_the_entry(tmp_path, generated):
    data_dir = copy(generated, "msd", tmp_path)
    edit_dataset(data_dir, lambda d: d["labels"].pop("14"))  # vertebrae voxels are now unknown values
    problems = ct.read_site_data({"labels": LABELS}, data_dir).problems
    assert [(p.row, p.column) for p in problems] == [("training[0]", "label"), ("training[1]", "label"),
                                                     ("training[2]", "label")]  # fmt: skip
    assert "abdomen_001.nii.gz: values 14 are not values of its 'labels' in" in problems[0].message


# ---------------------------------------------------------------- the split


def entries(names) -> list:
    return [(i, {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}) for i, name in
            enumerate(names)]  # fmt: skip


def images(items) -> set[str]:
    return {entry["image"] for _, entry in items}


@pytest.mark.parametrize("n, n_val", [(2, 1), (3, 1), (14, 3), (40, 8)])
def test_split_sizes_and_at_least_one_each_side(n, n_val):
    train, val = ct.split_training(entries([f"case_{i}" for i in range(n)]), 0.2)
    assert len(val) == n_val and len(train) == n - n_val
    assert ct.split_training(entries(["only"]), 0.2) == (entries(["only"]), [])


def test_split_is_deterministic_and_independent_of_order():
    names = [f"la_{i:03d}" for i in range(30)]
    train, val = ct.split_training(entries(names), 0.2)
    again_train, again_val = ct.split_training(entries(reversed(names)), 0.2)
    assert images(val) == images(again_val) and images(train) == images(again_train)
    without_dot = [(i, {"image": e["image"][2:]}) for i, e in entries(names)]
    assert {f"./{image}" for image in images(ct.split_training(without_dot, 0.2)[1])} == images(val)


def test_msd_split_from_the_site_config(tmp_path, generated, job):
    data_dir = generated["msd"]
    summary = ct.check_data(job, site_config(tmp_path, data_dir, msd_split={"validation_fraction": 0.5}))
    assert summary["msd_split"] == {"validation_fraction": 0.5} and summary["ok"]
    assert summary["splits"]["validation"]["images"] == 2 and summary["splits"]["training"]["images"] == 1
    bad = ct.check_data(job, site_config(tmp_path, data_dir, msd_split={"validation_fraction": 1.5}))
    assert bad["errors"][0]["error"].startswith("site_config.json: field 'msd_split' must be")
    one = copy(generated, "msd", tmp_path)
    edit_dataset(one, lambda d: d.update(training=d["training"][:1]))
    problems = messages(ct.read_site_data({"labels": LABELS}, one).problems)
    assert problems == [f"{one / 'dataset.json'}, 'training': 1 case(s): too few to split (msd_split)"]


# ---------------------------------------------------------------- the label remap


def production_remap() -> dict:
    return job_builder.resolve(ct.JOB_NAME)["client"]["trainer"]["label_remap"]


def test_btcv_and_totalsegmentator_names_map_to_the_job_labels():
    btcv = ["background", "spleen", "rkid", "lkid", "gall", "eso", "liver", "sto", "aorta", "IVC", "veins",
            "pancreas", "rad", "lad"]  # fmt: skip
    remap = ct.check_label_remap(production_remap(), LABELS, "job.json")
    label_map, report = ct.map_source_labels(dict(enumerate(btcv)), LABELS, remap)
    assert label_map == {i: i for i in range(14)}  # BTCV's numbering is the job's
    assert report["IVC"] == "inferior_vena_cava" and report["veins"] == "portal_and_splenic_veins"
    long_names = ["background", "Portal Vein and Splenic Vein", "right adrenal gland", "Left-Kidney", "tumour"]
    _, report = ct.map_source_labels(dict(enumerate(long_names)), LABELS, remap)
    assert list(report.values()) == ["background", "portal_and_splenic_veins", "right_adrenal_gland", "left_kidney",
                                     "background (unmapped)"]  # fmt: skip
    total = ["background", "kidney_right", "kidney_left", "adrenal_gland_right", "adrenal_gland_left",
             "inferior_vena_cava", "liver"]  # fmt: skip
    label_map, _ = ct.map_source_labels(dict(enumerate(total)), LABELS, remap)
    assert [label_map[v] for v in range(1, 7)] == [LABELS.index(n) + 1 for n in
        ["right_kidney", "left_kidney", "right_adrenal_gland", "left_adrenal_gland", "inferior_vena_cava", "liver"]]


def test_remap_by_class_number_and_to_background():
    remap = ct.check_label_remap({"cancer": "liver", "Tumour": 0, "kidney": 2}, LABELS, "job.json")
    label_map, report = ct.map_source_labels({0: "background", 1: "liver", 2: "cancer", 3: "tumour", 4: "kidney"},
                                             LABELS, remap)  # fmt: skip
    assert label_map == {0: 0, 1: 6, 2: 6, 3: 0, 4: 2}
    assert report == {"background": "background", "liver": "liver", "cancer": "liver", "tumour": "background",
                      "kidney": "right_kidney"}  # fmt: skip


@pytest.mark.parametrize(
    "remap, fragment",
    [({"x": 14}, 'trainer.label_remap["x"] = 14: class 14 is outside 0..13'),
     ({"x": -1}, 'trainer.label_remap["x"] = -1: class -1 is outside 0..13'),
     ({"x": "kidney"}, 'trainer.label_remap["x"] = "kidney" is not an organ of trainer.labels'),
     ({"x": True}, 'trainer.label_remap["x"] = true is not an organ'),
     ({"IVC": "aorta"}, 'trainer.label_remap["IVC"] and trainer.label_remap["ivc"] are the same source name')],
    ids=["class-14", "class-negative", "unknown-organ", "bool", "same-key"],
)  # fmt: skip
def test_bad_remap_is_fatal_and_names_the_job_config(tmp_path, remap, fragment):
    job = build_job(tmp_path, {"client": {"trainer": {"label_remap": remap}}})
    with pytest.raises(ValueError) as err:
        ct.load_settings(job)
    assert f"{job.client_path}: {fragment}" in str(err.value)


def test_remap_is_applied_in_the_cached_preprocessing(generated):
    """MapLabelValued in the deterministic transforms: an msd case pre-processes to the project case's label."""
    trainer = small_trainer()
    msd = ct.read_site_data(trainer, generated["msd"])
    project = ct.read_site_data(trainer, generated["project"])
    got = ct.val_transforms(trainer, msd.label_map)(msd.train.records[0])["label"]
    expected = ct.val_transforms(trainer, project.label_map)(project.train.records[0])["label"]
    assert torch.equal(got, expected) and int(got.max()) <= len(LABELS)
    names = [type(t).__name__ for t in ct.deterministic_transforms(trainer, msd.label_map)]
    assert "MapLabelValued" in names and "MapLabelValued" not in [
        type(t).__name__ for t in ct.deterministic_transforms(trainer, project.label_map)]


def small_trainer() -> dict:
    trainer = job_builder.resolve(ct.JOB_NAME, "demo")["client"]["trainer"]
    return {**trainer, "pixdim": [1.5, 1.5, 2.0], "roi_size": [16, 16, 16], "max_train_samples": 0,
            "max_val_samples": 0}  # fmt: skip


# ---------------------------------------------------------------- DICOM series


def test_dicom_geometry_puts_the_marker_voxel_where_it_is(tmp_path):
    """Header geometry, MONAI's loaded MetaTensor and a NIfTI label written in that geometry agree on the world
    (RAS) position of a marker voxel, also after reorientation to RAS."""
    folder = write_hand_series(tmp_path / "series")
    shape, affine = ct.dicom_series(folder)
    assert shape == HAND_SHAPE and np.allclose(affine, HAND_AFFINE)
    image = LoadImage(image_only=True)(str(folder))
    assert tuple(np.argwhere(image.numpy() > 0)[0]) == HAND_VOXEL and float(image.max()) == 500
    assert np.allclose(image.affine.numpy(), HAND_AFFINE) and float(image.min()) == -1000
    assert np.allclose((image.affine.numpy() @ [*HAND_VOXEL, 1])[:3], HAND_RAS)
    label = np.zeros(HAND_SHAPE, np.uint8)
    label[HAND_VOXEL] = 1
    nib.save(nib.Nifti1Image(label, HAND_AFFINE), tmp_path / "label.nii.gz")
    record, values = ct.check_entry(tmp_path, {"image": "series", "label": "label.nii.gz"}, {0, 1}, "0 or 1")
    assert values == {0, 1} and record["image"] == str(folder)
    ras = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]),
                   Orientationd(["image", "label"], axcodes="RAS", labels=None)])(record)  # fmt: skip
    at_image, at_label = (np.argwhere(ras[key][0].numpy() > 0)[0] for key in ("image", "label"))
    assert np.array_equal(at_image, at_label) and np.allclose(ras["image"].affine, ras["label"].affine)
    assert np.allclose((ras["image"].affine.numpy() @ [*at_image, 1])[:3], HAND_RAS)


def test_label_out_of_the_series_geometry(tmp_path):
    write_hand_series(tmp_path / "series")
    shifted = HAND_AFFINE.copy()
    shifted[0, 3] += 1.0
    nib.save(nib.Nifti1Image(np.zeros(HAND_SHAPE, np.uint8), shifted), tmp_path / "shifted.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 3), np.uint8), HAND_AFFINE), tmp_path / "short.nii.gz")
    with pytest.raises(ct.EntryError, match="shifted.nii.gz is not in the geometry of its DICOM series") as err:
        ct.check_entry(tmp_path, {"image": "series", "label": "shifted.nii.gz"}, {0}, "0")
    assert err.value.column == "label"
    with pytest.raises(ct.EntryError, match=r"short.nii.gz has shape \(6, 5, 3\), its image .*series has shape "
                                            r"\(6, 5, 4\)"):  # fmt: skip
        ct.check_entry(tmp_path, {"image": "series", "label": "short.nii.gz"}, {0}, "0")


def break_second_series(folder: Path) -> list[str]:
    write_hand_series(folder.parent / "other", "9.8.7")
    shutil.copy(folder.parent / "other" / "slice_1.dcm", folder / "zz_other.dcm")
    return ["holds more than one series: zz_other.dcm has another SeriesInstanceUID than 0001.dcm"]


def break_non_dicom(folder: Path) -> list[str]:
    (folder / "README.txt").write_text("exported by the PACS")
    return [f"file {folder / 'README.txt'} is not a DICOM file"]


def break_empty(folder: Path) -> list[str]:
    shutil.rmtree(folder)
    folder.mkdir()
    return [f"DICOM series folder {folder} is empty"]


def break_duplicate_slice(folder: Path) -> list[str]:
    shutil.copy(folder / "0003.dcm", folder / "0003 copy.dcm")
    return ["0003 copy.dcm", "0003.dcm", "are the same slice position"]


@pytest.mark.parametrize(
    "breaker", [break_second_series, break_non_dicom, break_empty, break_duplicate_slice],
    ids=["two-series", "non-dicom-file", "empty-folder", "duplicate-slice"],
)  # fmt: skip
def test_bad_dicom_folders_name_the_entry_and_file(tmp_path, generated, breaker):
    data_dir = copy(generated, "msd-dicom", tmp_path)
    fragments = breaker(data_dir / "imagesTr" / "abdomen_002")
    problems = ct.read_site_data({"labels": LABELS}, data_dir).problems
    assert [(p.file, p.row, p.column) for p in problems] == [(data_dir / "dataset.json", "training[1]", "image")]
    assert all(fragment in problems[0].message for fragment in fragments), problems[0].message


# ---------------------------------------------------------------- the data check


def test_check_data_summary(tmp_path, generated, job):
    summary = ct.check_data(job, site_config(tmp_path, generated["msd-dicom"]))
    assert summary["ok"] and summary["errors"] == []
    assert {k: summary[k] for k in ("job", "dataset", "layout", "layout_from")} == {
        "job": "ct_segmentation", "dataset": "msd-dicom", "layout": "msd", "layout_from": "detected"}
    assert summary["splits"] == {"training": {"file": "msd-dicom/dataset.json", "images": 2, "dicom_series": 2},
                                 "validation": {"file": "msd-dicom/dataset.json", "images": 1, "dicom_series": 1}}  # fmt: skip
    assert set(summary["organs"]) == set(LABELS)
    assert summary["organs"]["liver"] == {"training": 2, "validation": 1}
    assert summary["organs"]["right_adrenal_gland"] == {"training": 0, "validation": 0}  # never drawn
    assert summary["source_labels"]["rkid"] == "right_kidney"
    assert summary["source_labels"]["vertebrae"] == "background (unmapped)"
    project = ct.check_data(job, site_config(tmp_path, generated["project"]))
    assert project["ok"] and project["layout"] == "project" and "msd_split" not in project
    assert project["splits"]["validation"] == {"file": "project/val_data.json", "images": 1, "dicom_series": 0}
    assert project["source_labels"] == {name: name for name in ["background", *LABELS]}


def test_check_data_errors_stay_inside_the_dataset_folder(tmp_path, generated, job):
    data_dir = copy(generated, "msd-dicom", tmp_path)
    break_non_dicom(data_dir / "imagesTr" / "abdomen_001")
    edit_dataset(data_dir, lambda d: d["training"][2].update(label="./labelsTr/missing.nii.gz"))
    summary = ct.check_data(job, site_config(tmp_path, data_dir))
    assert not summary["ok"] and sum(split["images"] for split in summary["splits"].values()) == 1
    assert summary["errors"] == [
        {"file": "msd-dicom/dataset.json", "row": "training[0]", "column": "image",
         "error": "file msd-dicom/imagesTr/abdomen_001/README.txt is not a DICOM file (a series folder holds its "
                  "DICOM files only)"},
        {"file": "msd-dicom/dataset.json", "row": "training[2]", "column": "label",
         "error": "file msd-dicom/labelsTr/missing.nii.gz does not exist"},
    ]  # fmt: skip
    assert str(tmp_path) not in json.dumps(summary)


def test_check_cli_exit_status_without_nvflare(tmp_path, generated, job, monkeypatch, capsys):
    """``python custom/ct_segmentation.py --check --config CONFIG`` runs with nvflare unimportable: 0 when the data
    is fine, 1 (and the errors printed) when not."""
    site = site_config(tmp_path, generated["msd"])
    code = "import runpy, sys; sys.modules['nvflare'] = None; sys.argv = sys.argv[1:]; " \
           "runpy.run_path(sys.argv[0], run_name='__main__')"  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code, str(CUSTOM / "ct_segmentation.py"), "--check", "--config", str(job.client_path)],
        env=os.environ | {"HCLS_SITE_CONFIG": str(site.path), "PYTHONPATH": str(CUSTOM)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layout"] == "msd"
    monkeypatch.setitem(sys.modules, "nvflare", None)
    data_dir = copy(generated, "msd", tmp_path)
    edit_dataset(data_dir, lambda d: d["labels"].pop("14"))
    monkeypatch.setenv("HCLS_SITE_CONFIG", str(site_config(tmp_path, data_dir).path))
    assert check_cli(ct, job) == 1
    assert json.loads(capsys.readouterr().out)["errors"][0]["row"] == "training[0]"


# ---------------------------------------------------------------- a real training step


def test_build_trains_and_evaluates_on_an_msd_task_of_dicom_series(tmp_path):
    datagen.generate(tmp_path / "btcv", n_train=2, n_val=1, seed=6, size=32, layout="msd", dicom=True)
    overlay = {
        "server": {"components": [{"id": "persistor", "args": {"model": {"args": {"init_filters": 8}}}}]},
        "client": {"trainer": {"roi_size": [16, 16, 16], "local_epochs": 1, "max_val_samples": 1}},
    }
    job = build_job(tmp_path, overlay)
    set_determinism(seed=0)
    trainer = ct.build(job, site_config(tmp_path, tmp_path / "btcv", privacy={}), torch.device("cpu"))
    assert isinstance(trainer, Trainer) and trainer.n_train == 2
    loss, steps = trainer.train()
    assert steps == 2 and np.isfinite(loss)
    metrics = trainer.evaluate()
    assert job.key_metric in metrics and set(metrics) <= {job.key_metric, *(f"val_dice_{n}" for n in LABELS)}


def check_cli(trainer_module, job) -> int:
    """The trainer's ``--check --config`` command line, in this process."""
    argv = ["--check", "--config", str(job.client_path)]
    return trainer_module.data_check.main(trainer_module.JOB_NAME, trainer_module.check_data, argv)
