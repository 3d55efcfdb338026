"""Unit tests of LUNA16 as distributed (``subsetN/<uid>.mhd`` + ``.raw``, top-level ``annotations.csv``) beside
the NIfTI layout: MetaImage headers and geometry, data-file checks, the subset split, layout detection, the
data-check summary and its ``--check`` CLI, and one real build / train / evaluate. No NVFlare process needed."""

import csv
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.utils import set_determinism

REPO = Path(__file__).resolve().parents[2]
CUSTOM = REPO / "custom"
sys.path.insert(0, str(CUSTOM))

import lung_nodule_detection as lnd  # noqa: E402
from datagen import luna16 as datagen  # noqa: E402
from hcls.job_config import JobConfig  # noqa: E402
from hcls.site_config import SiteConfig  # noqa: E402
from hcls.training import Trainer  # noqa: E402
from ops import job_builder  # noqa: E402

itk_missing = pytest.mark.skipif(
    importlib.util.find_spec("itk") is None, reason="MONAI's ITKReader needs the 'itk' package"
)

# A hand-made MetaImage: shape (x, y, z) = (6, 5, 4), spacing 0.5 x 0.8 x 2.5 mm, LPS origin (-100, 50, -300) and a
# direction that swaps and flips axes: TransformMatrix triples are the LPS directions of the i, j, k axes,
# i -> +P, j -> -L, k -> -S. world(i, j, k) = (-100 - 0.8 j, 50 + 0.5 i, -300 - 2.5 k).
HAND = {"shape": (6, 5, 4), "matrix": "0 1 0 -1 0 0 0 0 -1", "origin": "-100 50 -300", "spacing": "0.5 0.8 2.5"}
HAND_VOXEL = (3, 2, 1)
HAND_WORLD = (-100 - 0.8 * 2, 50 + 0.5 * 3, -300 - 2.5 * 1)


def write_hand_mhd(folder: Path, name: str = "hand", raw_bytes: int | None = None, data_file: bool = True) -> Path:
    volume = np.full(HAND["shape"], -1000, dtype=np.int16)
    volume[HAND_VOXEL] = 500
    raw = volume.astype("<i2").transpose(2, 1, 0).tobytes()  # x fastest
    if data_file:
        (folder / f"{name}.raw").write_bytes(raw if raw_bytes is None else raw[:raw_bytes])
    header = folder / f"{name}.mhd"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
        f"TransformMatrix = {HAND['matrix']}\nOffset = {HAND['origin']}\nCenterOfRotation = 0 0 0\n"
        f"AnatomicalOrientation = RAI\nElementSpacing = {HAND['spacing']}\nDimSize = 6 5 4\n"
        f"ElementType = MET_SHORT\nElementDataFile = {name}.raw\n"
    )
    return header


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory) -> JobConfig:
    overlay = {"client": {"trainer": {"max_train_samples": 1, "max_val_samples": 1, "local_epochs": 1}}}
    config = job_builder.merge(job_builder.resolve(lnd.JOB_NAME, "demo"), overlay, "test overlay")
    return JobConfig.from_job_folder(job_builder.write_job(config, tmp_path_factory.mktemp("job") / "job"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A small generated LUNA16 tree with flipped directions (never modified): series in subset0, 1, 8, 9."""
    out = tmp_path_factory.mktemp("luna16") / "luna16"
    datagen.generate(out, n_train=2, n_val=2, seed=5, size=32, layout="luna16", flip_direction=True)
    return out


@pytest.fixture
def data_dir(tmp_path, generated) -> Path:
    return Path(shutil.copytree(generated, tmp_path / "luna16"))


def site_config(tmp_path: Path, data_dir: Path, **extra) -> SiteConfig:
    path = tmp_path / "site_config.json"
    path.write_text(json.dumps({"data_root": str(data_dir.parent), "datasets": {lnd.JOB_NAME: data_dir.name}, **extra}))
    return SiteConfig(path)


def rows(data_dir: Path) -> list[dict]:
    with open(data_dir / "annotations.csv", newline="") as f:
        return list(csv.DictReader(f))


def headers(data_dir: Path, subset: int) -> list[Path]:
    return sorted((data_dir / f"subset{subset}").glob("*.mhd"))


def scan_error(data_dir: Path, split=None) -> str:
    with pytest.raises(ValueError) as info:
        lnd.load_data({"max_train_samples": 0, "max_val_samples": 0}, data_dir, split)
    return str(info.value)


# ---------------------------------------------------------------- headers and geometry


def test_metaimage_geometry_known_voxel(tmp_path):
    affine, shape = lnd.metaimage_geometry(write_hand_mhd(tmp_path))
    assert shape == HAND["shape"]
    assert lnd.world_to_voxel(HAND_WORLD, affine) == pytest.approx(HAND_VOXEL)
    assert lnd.world_to_voxel([-100.0, 50.0, -300.0], affine) == pytest.approx([0, 0, 0])  # the origin


@itk_missing
def test_monai_reads_the_same_geometry_and_voxels(tmp_path):
    """MONAI's LoadImage (ITKReader, picked by extension) gives the RAS affine the checks use and the voxel."""
    from monai.transforms import LoadImage

    header = write_hand_mhd(tmp_path)
    image = LoadImage(image_only=True)(str(header))
    affine, _ = lnd.metaimage_geometry(header)
    assert np.asarray(image.affine) == pytest.approx(affine)
    assert tuple(np.argwhere(np.asarray(image) == 500)[0]) == HAND_VOXEL


def test_header_problems(tmp_path):
    header = write_hand_mhd(tmp_path)
    text = header.read_text()
    header.write_text(text.replace("NDims = 3", "NDims = 2"))
    with pytest.raises(ValueError, match=r"hand.mhd: header field NDims = '2', expected 3"):
        lnd.metaimage_geometry(header)
    header.write_text(text.replace("MET_SHORT", "MET_WHATEVER"))
    with pytest.raises(ValueError, match=r"hand.mhd: header field ElementType = 'MET_WHATEVER'"):
        lnd.metaimage_geometry(header)
    header.write_text(text.replace("DimSize = 6 5 4", "DimSize = 6 5"))
    with pytest.raises(ValueError, match=r"hand.mhd: header field DimSize = '6 5': expected 3 numbers"):
        lnd.metaimage_geometry(header)


def test_missing_and_truncated_raw(tmp_path):
    header = write_hand_mhd(tmp_path, data_file=False)
    with pytest.raises(ValueError, match=r"hand.mhd: its data file hand.raw \(ElementDataFile\) does not exist"):
        lnd.metaimage_geometry(header)
    write_hand_mhd(tmp_path, raw_bytes=100)
    with pytest.raises(ValueError) as info:
        lnd.metaimage_geometry(header)
    assert "hand.mhd: its data file hand.raw holds 100 bytes, fewer than DimSize [6, 5, 4] x 2 bytes" in str(info.value)
    assert "= 240: truncated" in str(info.value)


# ---------------------------------------------------------------- generator and layout


def test_generator_luna16_layout(tmp_path, generated):
    datagen.generate(tmp_path / "again", n_train=2, n_val=2, seed=5, size=32, layout="luna16", flip_direction=True)
    files = sorted(p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    assert len(files) == 9 and Path("annotations.csv") in files  # 4 x (.mhd, .raw) + annotations.csv
    for rel in files:
        assert (generated / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    assert [len(headers(generated, n)) for n in range(10)] == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    # the same series and nodules as the NIfTI layout of the same arguments
    datagen.generate(tmp_path / "nifti", n_train=2, n_val=2, seed=5, size=32)
    nifti_rows = (tmp_path / "nifti" / "annotations" / "annotations.csv").read_text()
    assert (generated / "annotations.csv").read_text() == nifti_rows


def test_generated_nodules_land_on_bright_voxels(generated):
    """annotations.csv world positions -> voxel through each header's geometry (non-identity direction,
    non-zero origin) -> the bright nodule in the .raw data."""
    flipped = 0
    for row in rows(generated):
        (header,) = generated.glob(f"subset*/{row['seriesuid']}.mhd")
        affine, shape = lnd.metaimage_geometry(header)
        flipped += bool((np.sign(np.diag(affine)[:3]) * [-1, -1, 1] < 0).any())
        assert np.all(affine[:3, 3] != 0)
        volume = np.fromfile(header.with_suffix(".raw"), dtype="<i2").reshape(shape[::-1]).transpose(2, 1, 0)
        centre = [float(row[c]) for c in ("coordX", "coordY", "coordZ")]
        voxel = tuple(lnd.world_to_voxel(centre, affine).round().astype(int))
        assert volume[voxel] > -300, row
    assert flipped == len(rows(generated))


def test_layout_detection(tmp_path, generated):
    assert lnd.detect_layout(generated) == "luna16"
    datagen.generate(tmp_path / "nifti", n_train=1, n_val=1, seed=1, size=32)
    assert lnd.detect_layout(tmp_path / "nifti") == "nifti"
    copy = Path(shutil.copytree(generated, tmp_path / "no_csv"))
    (copy / "annotations.csv").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{copy}: 4 subset*/ folders of .mhd series but no annotations.csv")):
        lnd.detect_layout(copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'empty'}: not a nodule dataset this job reads")):
        lnd.detect_layout(tmp_path / "empty")


# ---------------------------------------------------------------- split and checks


def test_split_from_the_site_config(tmp_path, generated):
    assert lnd.luna16_split(site_config(tmp_path, generated)) == lnd.LUNA16_DEFAULT_SPLIT
    site = site_config(tmp_path, generated, luna16_split={"train": [0], "val": [9]})
    split = lnd.luna16_split(site)
    scan = lnd.scan_data(generated, split)
    assert [s["image"] for s in scan["splits"]["train"]] == [str(p) for p in headers(generated, 0)]
    assert [s["image"] for s in scan["splits"]["val"]] == [str(p) for p in headers(generated, 9)]
    outside = [r for r in rows(generated) if not any(generated.glob(f"subset[09]/{r['seriesuid']}.mhd"))]
    assert scan["errors"] == [] and scan["unused_rows"] == len(outside) > 0
    for bad, message in (({"train": [0, 1], "val": [1]}, r"': subset\(s\) \[1\] are in both"),
                         ({"train": [0]}, r"' must be an object with the keys 'train' and 'val'"),
                         ({"train": ["0"], "val": [8]}, r"\.train' = \['0'\]: subset numbers")):  # fmt: skip
        with pytest.raises(ValueError, match=r"site_config.json: field 'luna16_split" + message):
            lnd.luna16_split(site_config(tmp_path, generated, luna16_split=bad))


def test_configured_subset_folder_missing(data_dir):
    shutil.rmtree(data_dir / "subset5")
    assert "subset5: no such folder (subset 5 of luna16_split.train)" in scan_error(data_dir)


def test_a_series_not_downloaded_is_counted_and_a_position_outside_its_volume_is_an_error(data_dir):
    """A site may hold only some subsets with the unmodified annotations.csv: rows of absent series are not used."""
    row = rows(data_dir)[0]
    affine, shape = lnd.metaimage_geometry(next(data_dir.glob(f"subset*/{row['seriesuid']}.mhd")))
    beyond = affine @ np.array([shape[0] + 3, 0, 0, 1.0])  # RAS world of a voxel past the volume
    lps = beyond[:3] * [-1, -1, 1]
    lines = (data_dir / "annotations.csv").read_text().splitlines()
    lines += ["1.2.840.99.1,1,2,3,5", f"{row['seriesuid']},{lps[0]},{lps[1]},{lps[2]},6"]
    (data_dir / "annotations.csv").write_text("\n".join(lines) + "\n")
    message = scan_error(data_dir)
    n = len(lines)
    assert "1.2.840.99.1" not in message  # a series this site does not hold: counted, not an error
    assert f"annotations.csv, row {n}, columns coordX,coordY,coordZ" in message and "is outside the volume" in message
    lines.pop()
    (data_dir / "annotations.csv").write_text("\n".join(lines) + "\n")
    scan = lnd.scan_data(data_dir)
    assert not scan["errors"] and scan["unused_rows"] >= 1


def test_truncated_raw_in_the_tree(data_dir):
    header = headers(data_dir, 8)[0]
    raw = header.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])
    message = scan_error(data_dir)
    assert f"{header}: its data file {raw.name} holds 1000 bytes" in message
    assert "annotations.csv, row" in message  # its nodules cannot be placed either


# ---------------------------------------------------------------- summary and CLI


def test_check_data_summary_has_no_identifiers(tmp_path, data_dir, demo_job):
    site = site_config(tmp_path, data_dir, luna16_split={"train": [0, 1], "val": [8]})
    summary = lnd.check_data(demo_job, site)
    uids = [p.stem for p in data_dir.glob("subset*/*.mhd")]
    n_rows = len(rows(data_dir))
    subset_of = {p.stem: int(p.parent.name.removeprefix("subset")) for p in data_dir.glob("subset*/*.mhd")}
    nodules = {name: sum(1 for r in rows(data_dir) if subset_of[r["seriesuid"]] in subsets)
               for name, subsets in (("train", (0, 1)), ("val", (8,)))}  # fmt: skip
    assert summary["layout"] == "luna16" and summary["ok"] and summary["errors"] == []
    assert summary["splits"]["train"]["series"] == 2 and summary["splits"]["val"]["series"] == 1
    assert summary["splits"]["train"]["series_used"] == 1  # max_train_samples 1 in this job
    assert {name: summary["splits"][name]["nodules"] for name in ("train", "val")} == nodules
    assert summary["annotations"] == {"rows": n_rows, "used": nodules["train"] + nodules["val"],
                                      "outside_split": n_rows - nodules["train"] - nodules["val"]}  # fmt: skip
    text = json.dumps(summary)
    assert not any(uid in text for uid in uids) and str(tmp_path) not in text

    # an error names the file (relative, the series by its place on disk) and the row, not the uid
    header = headers(data_dir, 1)[0]
    header.with_suffix(".raw").write_bytes(b"\0" * 10)
    lines = (data_dir / "annotations.csv").read_text().splitlines()
    (data_dir / "annotations.csv").write_text("\n".join([*lines, "1.2.840.99.1,1,2,3,5"]) + "\n")
    summary = lnd.check_data(demo_job, site)
    text = json.dumps(summary)
    assert not summary["ok"] and not any(uid in text for uid in [*uids, "1.2.840.99.1"]) and str(tmp_path) not in text
    assert any(p.startswith("subset1/<series 1>.mhd: its data file <series 1>.raw holds 10 bytes")
               for p in summary["errors"]), summary["errors"]  # fmt: skip
    assert not any(f"row {len(lines) + 1}," in p for p in summary["errors"])  # a series not held: not an error
    assert "problems" not in summary  # "errors", as in every job's summary


def test_check_data_on_the_nifti_layout(tmp_path, demo_job):
    datagen.generate(tmp_path / "nifti", n_train=2, n_val=1, seed=3, size=32)
    summary = lnd.check_data(demo_job, site_config(tmp_path, tmp_path / "nifti"))
    assert summary["layout"] == "nifti" and summary["ok"] and "luna16_split" not in summary
    assert summary["splits"]["train"]["series"] == 2 and summary["splits"]["val"]["series"] == 1


def test_check_data_without_a_dataset_directory(tmp_path, demo_job):
    """A site config naming no dataset directory, or a malformed split, is an error in the summary, not a crash;
    it names the site config and the dataset folder, no host path."""
    summary = lnd.check_data(demo_job, site_config(tmp_path, tmp_path / "data" / "luna16"))
    assert not summary["ok"] and summary["errors"] == [
        "site_config.json: dataset directory luna16 (datasets.lung_nodule_detection) does not exist"]
    datagen.generate(tmp_path / "data" / "luna16", n_train=2, n_val=1, seed=3, size=32, layout="luna16")
    summary = lnd.check_data(demo_job, site_config(tmp_path, tmp_path / "data" / "luna16", luna16_split={"train": [0]}))
    assert not summary["ok"] and summary["layout"] == "luna16" and len(summary["errors"]) == 1
    assert summary["errors"][0].startswith("site_config.json: field 'luna16_split' must be an object")
    assert str(tmp_path) not in json.dumps(summary)


def test_check_cli_without_nvflare(tmp_path, generated, demo_job, monkeypatch, capsys):
    """``--check --config CONFIG`` (what ``python custom/lung_nodule_detection.py --check`` runs) prints the
    summary as JSON with nvflare made unimportable; problems give exit status 1."""
    monkeypatch.setitem(sys.modules, "nvflare", None)  # any "import nvflare..." now raises ImportError
    monkeypatch.setenv("HCLS_SITE_CONFIG", str(site_config(tmp_path, generated).path))
    assert check_cli(lnd, demo_job) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "luna16" and summary["ok"] and summary["splits"]["val"]["series"] == 2
    empty_train = site_config(tmp_path, generated, luna16_split={"train": [2], "val": [8]})
    monkeypatch.setenv("HCLS_SITE_CONFIG", str(empty_train.path))
    assert check_cli(lnd, demo_job) == 1
    assert "hold no .mhd series" in capsys.readouterr().out


# ---------------------------------------------------------------- pipeline and trainer


@itk_missing
def test_pipeline_boxes_land_on_the_nodules(generated, demo_job):
    """Through MONAI's ITKReader, RAS reorientation and resampling, each box is centred on its nodule."""
    trainer = {**lnd.load_settings(demo_job), "spacing": [1.0, 1.0, 2.0], "max_train_samples": 0}
    train_records, val_records = lnd.load_data(trainer, generated, lnd.LUNA16_DEFAULT_SPLIT)
    transform = lnd.detection_transforms(trainer, train=False)
    for record in train_records + val_records:
        data = transform(record)
        image, boxes = data["image"][0], data["box"]
        assert boxes.shape == (len(record["label"]), 6)
        for box, world_box in zip(boxes, record["box"]):
            centre = tuple(((box[:3] + box[3:]) / 2 - 0.5).round().long().tolist())
            assert image[centre] > 0.5  # nodule ~0.81, lung ~0.17
            assert (box[3:] - box[:3]).numpy() == pytest.approx(world_box[3:] / np.array(trainer["spacing"]), rel=1e-3)


@itk_missing
def test_build_trains_and_evaluates_on_metaimage(tmp_path, generated, demo_job):
    set_determinism(seed=0)
    trainer = lnd.build(demo_job, site_config(tmp_path, generated, privacy={}), torch.device("cpu"))
    assert isinstance(trainer, Trainer) and trainer.n_train == 1
    loss, steps = trainer.train()
    assert steps == 1 and np.isfinite(loss) and loss > 0
    metrics = trainer.evaluate()
    assert set(metrics) == {"val_froc"} and 0.0 <= metrics["val_froc"] <= 1.0


def test_missing_itk_is_named_before_training(monkeypatch, generated):
    real_find_spec = lnd.importlib.util.find_spec
    no_itk = lambda name, *args: None if name == "itk" else real_find_spec(name, *args)  # noqa: E731
    monkeypatch.setattr(lnd.importlib.util, "find_spec", no_itk)
    message = scan_error(generated)
    assert "needs the 'itk' package; it is not installed" in message


def check_cli(trainer_module, job) -> int:
    """The trainer's ``--check --config`` command line, in this process."""
    argv = ["--check", "--config", str(job.client_path)]
    return trainer_module.data_check.main(trainer_module.JOB_NAME, trainer_module.check_data, argv)
