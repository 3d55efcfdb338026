"""NVFlare Client API trainer for the ``lung_nodule_detection`` job: 3D lung nodule detection (LUNA16).

Run by NVFlare's ClientAPIExecutor from the job's app directory on a site::

    python3 -u custom/lung_nodule_detection.py --config config/config_fed_client.json

Hyper-parameters, the network (``NoduleRetinaNet``) and the key metric come from the job
(``hcls.job_config.JobConfig``); the data directory from the site config
(``$HCLS_SITE_CONFIG``, key ``datasets.lung_nodule_detection``). The exchanged parameters
are the network's state_dict; the detector around it (anchors, matcher, sampler, losses,
box selection, sliding-window inference) follows MONAI's LUNA16 detection tutorial, with the
job's choices: ``trainer.matcher`` is the IoU matcher (``fg_iou_thresh``, ``bg_iou_thresh``,
``allow_low_quality_matches``) unless it says ``"type": "atss"`` (the tutorial's ATSS matcher,
``num_candidates``, ``center_in_gt``); ``classification_loss`` ``"focal"`` is MONAI's FocalLoss
(gamma 2; the detector's own default, and the tutorial's, is ``"bce"``). The optional
``trainer.crop_pos_neg`` (default ``[1, 1]``, the tutorial's) weighs patches that hold a whole
nodule against random ones. ``trainer.lr_warmup_epochs`` (default 0: none) raises the learning
rate linearly, step by step, from almost 0 to the optimizer's over that many local epochs, counted
across rounds (the tutorial warms up over 10 epochs): at SGD's 0.01 from the first step, the
from-scratch network stops looking at the image.

Data directory (LUNA16 layout):

* ``images/<seriesuid>.nii.gz`` (or ``.nii``): the CT volumes;
* ``annotations/annotations.csv``: ``seriesuid,coordX,coordY,coordZ,diameter_mm``, the
  nodule centres in LUNA16's world coordinates, ITK/LPS millimetres;
* ``train_data.json`` / ``val_data.json``: the series of each split,
  ``{"training": [{"image": "images/<uid>.nii.gz", "seriesuid": "<uid>"}, ...]}``
  (``"validation"`` in ``val_data.json``). Boxes come from annotations.csv.

A nodule's box is the cube of side ``diameter_mm`` around its centre. World positions
reach voxels only through each image's affine: NIfTI affines are RAS, so an LPS point is
turned to RAS (x and y negated) and then through the inverse affine (``world_to_voxel``;
in the pipeline, MONAI's ``AffineBoxToImageCoordinated`` with ``affine_lps_to_ras=True``,
applied after resampling to ``trainer.spacing`` so that it uses the resampled affine).

Before training, annotations.csv and both split lists are checked whole; every problem is
a ValueError line naming the file and the row (CSV: the file's line number, header = row 1)
or the entry (JSON: ``training[i]``): a missing file or header, a non-numeric or
non-positive value, a seriesuid without an image in ``images/``, a nodule centre outside
its volume, a list entry naming a missing, non-NIfTI (by extension or unreadable NIfTI
header) or mismatched file, an empty split or one without any nodule.

LUNA16 as distributed (detected when the data directory holds ``subset*/`` folders of ``.mhd``
files and a top-level ``annotations.csv``; ``candidates.csv`` is not used):

* ``subsetN/<seriesuid>.mhd`` + ``.raw``: MetaImage volumes, read by MONAI's ``ITKReader``
  (``LoadImaged`` picks it by extension; needs the ``itk`` package). Their geometry
  (``Offset``, ``ElementSpacing``, ``TransformMatrix``) is LPS; the reader hands the
  pipeline the RAS affine, so boxes follow the same path as for NIfTI;
* ``annotations.csv``: as above, at the top level;
* the split is by subset number, from the site config's optional ``luna16_split``
  (default ``{"train": [0, 1, 2, 3, 4, 5, 6, 7], "val": [8, 9]}``); every configured
  subset folder must exist. Annotations of series whose ``.mhd`` lies in a subset outside
  the split are not used (counted); one whose series has no ``.mhd`` in any ``subset*/``
  folder is an error. A header whose ``.raw`` is missing or shorter than
  ``DimSize x element size`` is an error naming the header.

``python custom/lung_nodule_detection.py --check --config config/config_fed_client.json``
(``HCLS_SITE_CONFIG`` set) prints ``check_data``'s summary (layout, series and nodules per
split, ``errors``: every problem with its file and row; paths relative to the data directory, series
uids replaced by their place on disk) and trains nothing.

Differential privacy, when the site config requires it (``privacy.differential_privacy``): record-level DP-SGD
with Opacus (``hcls.dp_sgd.make_private``) over all rounds and local epochs, on a backbone without trained batch norm
(the network's ``norm``: ``profiles/dp.json`` gives it group norm), one patch per volume (``batch_size`` 1, else the
trainer stops), ReLUs not in place and each bottleneck's shortcut added out of place (``prepare_for_dp_sgd``). The
detector's losses are then sums over each patch's sampled anchors (not means over the batch), so a patch's gradient
depends on that patch alone, which is what clipping it bounds; mixed precision is off. The recipe that keeps the
accuracy (README, row ``dp``) is ``profiles/dp_pretrained.json``: the batch-norm detector pre-trained without DP on
public data (LUNA16), its batch norms frozen in eval mode (``trainer.freeze_batch_norm``) and only its output
convolutions trained (``trainer.trained_layers``, ``hcls.training.train_only``).

Key metric (``val_froc`` in the job config): mean sensitivity at ``trainer.froc_fps_per_scan`` false positives
per scan, boxes matched at IoU >= 0.1 (see ``froc.py``), on whole validation volumes.
"""

import csv
import importlib.util
import math
import re
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.transforms.dictionary import (
    AffineBoxToImageCoordinated,
    ClipBoxToImaged,
    ConvertBoxToStandardModed,
    RandCropBoxByPosNegLabeld,
    RandFlipBoxd,
    RandRotateBox90d,
)
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.data import DataLoader, Dataset
from monai.data.utils import no_collation
from monai.losses import FocalLoss
from monai.networks.nets.resnet import ResNetBottleneck
from monai.transforms import (
    Compose,
    EnsureTyped,
    Lambdad,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

import froc
from hcls import client_loop, data_check, transform_config
from hcls.components import build_optimizer
from hcls.dp_sgd import make_private, require_one_sample_per_record
from hcls.job_config import JobConfig
from hcls.json_files import read_json
from hcls.site_config import SiteConfig
from hcls.training import Trainer, train_epochs, train_only

JOB_NAME = "lung_nodule_detection"
REQUIRED_KEYS = (
    "spacing", "intensity_range", "patch_size", "val_patch_size", "anchors", "matcher", "sampler",
    "classification_loss", "box_regression_loss", "inference", "froc_fps_per_scan", "optimizer",
    "local_epochs", "batch_size", "num_workers", "max_train_samples", "max_val_samples", "seed",
)  # fmt: skip
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
ANNOTATIONS_CSV = "annotations/annotations.csv"
SPLITS = {"train": ("train_data.json", "training"), "val": ("val_data.json", "validation")}
NIFTI_SUFFIXES = (".nii.gz", ".nii")
LUNA16_ANNOTATIONS_CSV = "annotations.csv"  # LUNA16 as distributed: at the top level, beside subset0/ .. subset9/
LUNA16_DEFAULT_SPLIT = {"train": [0, 1, 2, 3, 4, 5, 6, 7], "val": [8, 9]}  # site config key "luna16_split"
METAIMAGE_ELEMENT_SIZES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
CLASSIFICATION_LOSSES = ("focal", "bce")
BOX_REGRESSION_LOSSES = ("smooth_l1",)
DEFAULT_CROP_POS_NEG = (1, 1)  # MONAI's LUNA16 tutorial: half the patches centred on a nodule
DEFAULT_LR_WARMUP_EPOCHS = 0
IOU_THRESHOLD = froc.LUNA16_IOU_THRESHOLD
MAX_REPORTED_ERRORS = 20


# ---------------------------------------------------------------- geometry


def world_to_voxel(points_lps_mm, affine) -> np.ndarray:
    """Continuous voxel indices (i, j, k; voxel centres at integers) of LPS world points in mm.

    ``points_lps_mm``: ``(3,)`` or ``(N, 3)`` ITK/LPS world coordinates (LUNA16's coordX/Y/Z);
    ``affine``: the image's 4x4 NIfTI (RAS) affine, voxel index -> RAS world. The points are
    turned to RAS (x and y negated) and mapped through the inverse affine, so spacing,
    origin and direction (flips included) are all honoured.
    """
    points = np.asarray(points_lps_mm, dtype=np.float64)
    ras = points.reshape(-1, 3) * np.array([-1.0, -1.0, 1.0])
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    voxels = ras @ inverse[:3, :3].T + inverse[:3, 3]
    return voxels.reshape(points.shape)


def inside_volume(voxel: np.ndarray, shape) -> bool:
    """Whether a continuous voxel position lies in a volume of ``shape`` (voxel k spans k +- 0.5)."""
    return bool(np.all(voxel >= -0.5) and np.all(voxel < np.asarray(shape[:3]) - 0.5))


def nifti_geometry(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """RAS affine and 3D shape from a NIfTI header; ValueError if ``path`` is not a readable 3D NIfTI file."""
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path}: not a NIfTI file (expected a .nii.gz or .nii file name)")
    try:
        image = nib.load(path)  # reads the header only
    except Exception as err:  # nibabel raises many types for a corrupt or foreign file
        raise ValueError(f"{path}: not a readable NIfTI file: {err}") from err
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path}: not a NIfTI image ({type(image).__name__})")
    shape = tuple(int(s) for s in image.shape)
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise ValueError(f"{path}: expected a 3D volume, got shape {shape}")
    return np.asarray(image.affine, dtype=np.float64), shape[:3]


def read_metaimage_header(path: Path) -> dict[str, str]:
    """``key = value`` fields of a MetaImage (.mhd) header; ValueError naming the file and line."""
    fields = {}
    try:
        lines = path.read_text(errors="strict").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable MetaImage header: {err}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}, line {number}: expected 'Key = Value', got {line.strip()[:60]!r}")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":  # the last field of a header
            break
    return fields


def _numbers(path: Path, fields: dict, key: str, count: int, default=None, kind=float) -> list:
    if key not in fields:
        if default is None:
            raise ValueError(f"{path}: header field {key!r} is missing")
        return list(default)
    try:
        values = [kind(v) for v in fields[key].split()]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{path}: header field {key} = {fields[key]!r}: expected {count} numbers")
    return values


def metaimage_geometry(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """RAS affine and 3D shape (x, y, z) of a MetaImage header, its data file checked.

    MetaImage geometry is LPS: world = Offset + D @ (ElementSpacing * index), the columns of the
    direction D being TransformMatrix's consecutive triples (as ITK reads it). The RAS affine negates
    the x and y rows, as MONAI's ITKReader does. ValueError naming the header: not 3D, an unknown
    ElementType, or an ElementDataFile that is missing or shorter than DimSize x element size.
    """
    fields = read_metaimage_header(path)
    if fields.get("ObjectType", "Image") != "Image":
        raise ValueError(f"{path}: header field ObjectType = {fields['ObjectType']!r}, expected 'Image'")
    if fields.get("NDims") != "3":
        raise ValueError(f"{path}: header field NDims = {fields.get('NDims')!r}, expected 3")
    shape = tuple(int(v) for v in _numbers(path, fields, "DimSize", 3, kind=int))
    if min(shape) < 1:
        raise ValueError(f"{path}: header field DimSize = {fields['DimSize']!r}: sizes must be positive")
    spacing = np.array(_numbers(path, fields, "ElementSpacing", 3, default=(1.0, 1.0, 1.0)))
    if (spacing <= 0).any():
        raise ValueError(f"{path}: header field ElementSpacing = {fields['ElementSpacing']!r}: must be positive")
    origin = np.array(_numbers(path, fields, "Offset", 3, default=(0.0, 0.0, 0.0)))
    direction = np.array(_numbers(path, fields, "TransformMatrix", 9, default=np.eye(3).ravel())).reshape(3, 3).T
    if abs(np.linalg.det(direction)) < 1e-6:
        raise ValueError(f"{path}: header field TransformMatrix = {fields['TransformMatrix']!r} is singular")
    element_type = fields.get("ElementType")
    if element_type not in METAIMAGE_ELEMENT_SIZES:
        raise ValueError(f"{path}: header field ElementType = {element_type!r} is not a MetaImage scalar type")
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    data_name = fields.get("ElementDataFile")
    if not data_name or data_name == "LOCAL" or "%" in data_name or data_name.startswith("LIST"):
        raise ValueError(f"{path}: header field ElementDataFile = {data_name!r}: expected the name of one .raw file")
    data_file = path.parent / data_name
    if not data_file.is_file():
        raise ValueError(f"{path}: its data file {data_name} (ElementDataFile) does not exist")
    if fields.get("CompressedData", "False").lower() != "true":
        expected = int(np.prod(shape)) * channels * METAIMAGE_ELEMENT_SIZES[element_type]
        header_size = max(int(fields.get("HeaderSize", "0")), 0)
        actual = data_file.stat().st_size
        if actual < expected + header_size:
            raise ValueError(
                f"{path}: its data file {data_name} holds {actual} bytes, fewer than DimSize {list(shape)} x "
                f"{METAIMAGE_ELEMENT_SIZES[element_type]} bytes ({element_type}) = {expected + header_size}: truncated"
            )
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ origin
    return affine, shape


def voxel_box_corners(box: np.ndarray) -> np.ndarray:
    """Voxel-index boxes (voxel centres at integers) to MONAI box coordinates (voxel k spans [k, k+1])."""
    return box + 0.5


# ---------------------------------------------------------------- data checking


class _Geometries(dict):
    """Cache of ``nifti_geometry`` (``metaimage_geometry`` for LUNA16's layout) by path (each header read once)."""

    def __init__(self, metaimage: bool = False):
        super().__init__()
        self.read = metaimage_geometry if metaimage else nifti_geometry

    def __missing__(self, path: Path):
        self[path] = self.read(path)
        return self[path]


def series_image(images_dir: Path, uid: str) -> Path:
    """The image of series ``uid`` in ``images_dir``; ValueError if there is none."""
    for suffix in NIFTI_SUFFIXES:
        path = images_dir / f"{uid}{suffix}"
        if path.is_file():
            return path
    raise ValueError(f"column 'seriesuid': series {uid!r} has no image {uid}.nii.gz (or .nii) in {images_dir}")


def parse_annotation(row: dict) -> tuple[str, np.ndarray, float]:
    """Series uid, LPS centre (mm) and diameter (mm) of one annotations.csv row; ValueError on a bad value."""
    uid = (row["seriesuid"] or "").strip()
    if not uid:
        raise ValueError("column 'seriesuid': empty")
    values = []
    for column in ANNOTATION_COLUMNS[1:]:
        cell = (row[column] or "").strip()
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"column {column!r}: value {cell!r} is not a finite number")
        values.append(value)
    if values[3] <= 0:
        raise ValueError(f"column 'diameter_mm': value {values[3]} is not positive")
    return uid, np.array(values[:3]), values[3]


def read_annotations(
    csv_path: Path, images_dir: Path, geometries: dict, errors: list[str], resolve=None, unused: list | None = None
) -> dict[str, list]:
    """Nodules by series uid: ``[(centre_lps_mm, diameter_mm), ...]``; row problems are appended to ``errors``.

    ``resolve(uid)``: the series' image, None for a series this site does not use (its row number goes to
    ``unused``), ValueError for an unknown one; by default the NIfTI image in ``images_dir``.
    """
    resolve = resolve or (lambda uid: series_image(images_dir, uid))
    if not csv_path.is_file():
        raise ValueError(f"{csv_path}: annotations file not found")
    nodules: dict[str, list] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ANNOTATION_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{csv_path}, row 1 (header): missing column(s) {', '.join(repr(c) for c in missing)}; "
                f"expected the header {','.join(ANNOTATION_COLUMNS)}"
            )
        for row in reader:
            try:
                uid, centre, diameter = parse_annotation(row)
                image = resolve(uid)
                if image is None:
                    if unused is not None:
                        unused.append(reader.line_num)
                    continue
                affine, shape = geometries[image]
                voxel = world_to_voxel(centre, affine)
                if not inside_volume(voxel, shape):
                    raise ValueError(
                        f"columns coordX,coordY,coordZ: world position {tuple(centre.round(3).tolist())} mm "
                        f"(LPS) is outside the volume {image.name}: voxel {tuple(voxel.round(1).tolist())}, "
                        f"shape {shape}"
                    )
            except ValueError as err:
                errors.append(f"{csv_path}, row {reader.line_num}, {err}")
                continue
            nodules.setdefault(uid, []).append((centre, diameter))
    return nodules


def read_split(list_path: Path, key: str, data_dir: Path, geometries: dict, errors: list[str]) -> list[dict]:
    """``[{"image": path, "seriesuid": uid}]`` of one split list; entry problems are appended to ``errors``."""
    entries = read_json(list_path).get(key)
    if not isinstance(entries, list):
        raise ValueError(f"{list_path}: missing the list {key!r} of series")
    if not entries:
        raise ValueError(f"{list_path}: {key!r} lists no series, the split is empty")
    series = []
    for index, entry in enumerate(entries):
        where = f"{list_path}, entry {key}[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry.get("seriesuid"):
            errors.append(f"{where}: expected an object with 'image' (a path) and 'seriesuid'")
            continue
        uid, image = str(entry["seriesuid"]), data_dir / entry["image"]
        if not image.is_file():
            errors.append(f"{where}, field 'image': image file {image} does not exist")
            continue
        try:
            geometries[image]
        except ValueError as err:
            errors.append(f"{where}, field 'image': {err}")
            continue
        if image.name not in {f"{uid}{suffix}" for suffix in NIFTI_SUFFIXES}:
            errors.append(f"{where}: image file {image.name} is not named after its seriesuid {uid!r}")
            continue
        series.append({"image": str(image), "seriesuid": uid})
    return series


def nodule_boxes(nodules: list) -> np.ndarray:
    """``(N, 6)`` float32 LPS world boxes in MONAI's ``cccwhd`` mode: cubes of side diameter_mm."""
    boxes = [[*centre, diameter, diameter, diameter] for centre, diameter in nodules]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 6)


def detect_layout(data_dir: Path) -> str:
    """``"luna16"`` (LUNA16 as distributed: ``subset*/`` folders of ``.mhd`` files and a top-level
    ``annotations.csv``) or ``"nifti"`` (``images/``, ``annotations/annotations.csv``, split lists)."""
    data_dir = Path(data_dir)
    subsets = [p for p in data_dir.glob("subset*") if p.is_dir() and next(p.glob("*.mhd"), None) is not None]
    if subsets and (data_dir / LUNA16_ANNOTATIONS_CSV).is_file():
        return "luna16"
    if (data_dir / "images").is_dir() or (data_dir / ANNOTATIONS_CSV).is_file():
        return "nifti"
    if subsets:
        raise ValueError(f"{data_dir}: {len(subsets)} subset*/ folders of .mhd series but no {LUNA16_ANNOTATIONS_CSV} "
                         "beside them (LUNA16 as distributed: put its annotations.csv there)")  # fmt: skip
    raise ValueError(f"{data_dir}: not a nodule dataset this job reads: no subset*/ folders of .mhd series with "
                     f"{LUNA16_ANNOTATIONS_CSV} (LUNA16 as distributed), no images/ or {ANNOTATIONS_CSV} (the NIfTI "
                     "layout)")  # fmt: skip


def luna16_split(site: SiteConfig) -> dict[str, list[int]]:
    """The site's ``luna16_split`` (subset numbers per split), default ``LUNA16_DEFAULT_SPLIT``.

    ValueError naming the site config if it is malformed."""
    split = site.data.get("luna16_split", LUNA16_DEFAULT_SPLIT)
    where = f"{site.path}: field 'luna16_split"
    if not isinstance(split, dict) or set(split) != set(SPLITS):
        raise ValueError(f"{where}' must be an object with the keys 'train' and 'val' (lists of subset numbers)")
    for name, numbers in split.items():
        if not isinstance(numbers, list) or not numbers:
            raise ValueError(f"{where}.{name}' must be a non-empty list of subset numbers")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise ValueError(f"{where}.{name}' = {numbers!r}: subset numbers are integers >= 0")
    shared = sorted(set(split["train"]) & set(split["val"]))
    if shared:
        raise ValueError(f"{where}': subset(s) {shared} are in both 'train' and 'val'")
    return {name: list(split[name]) for name in SPLITS}


def luna16_series(data_dir: Path, errors: list[str]) -> dict[str, tuple[int, Path]]:
    """Every ``subsetN/<uid>.mhd`` in ``data_dir``: ``{uid: (N, path)}``; a uid in two subsets is an error."""
    series: dict[str, tuple[int, Path]] = {}
    folders = [
        (int(m.group(1)), p) for p in data_dir.iterdir() if p.is_dir() and (m := re.fullmatch(r"subset(\d+)", p.name))
    ]
    for number, folder in sorted(folders):
        for header in sorted(folder.glob("*.mhd")):
            uid = header.stem
            if uid in series:
                errors.append(f"{header}: series {uid!r} is also in {series[uid][1]}")
                continue
            series[uid] = (number, header)
    return series


def scan_data(data_dir: Path, split: dict | None = None) -> dict:
    """Every check of the data directory, nothing loaded but headers: ``{"layout", "splits": {name: [{"image",
    "seriesuid"}]}, "nodules": {uid: [(centre, diameter)]}, "annotation_rows", "unused_rows", "errors", "series"}``.

    ``split``: the LUNA16 subset numbers per split (``luna16_split``; default ``LUNA16_DEFAULT_SPLIT``).
    Raises ValueError only for a problem that stops the scan (a missing annotations file or header, a split list).
    """
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    geometries, errors, unused = _Geometries(metaimage=layout == "luna16"), [], []
    if layout == "nifti":
        nodules = read_annotations(data_dir / ANNOTATIONS_CSV, data_dir / "images", geometries, errors)
        splits = {
            name: read_split(data_dir / file, key, data_dir, geometries, errors) for name, (file, key) in SPLITS.items()
        }
        images = sorted(p for p in (data_dir / "images").glob("*") if p.name.endswith(NIFTI_SUFFIXES))
        on_disk = {p.name.removesuffix(".gz").removesuffix(".nii"): ("images", p) for p in images}
    else:
        split = split or LUNA16_DEFAULT_SPLIT
        found, failed = luna16_series(data_dir, errors), set()
        on_disk = {uid: (f"subset{n}", path) for uid, (n, path) in found.items()}
        splits = {}
        for name in SPLITS:
            for number in split[name]:
                if not (data_dir / f"subset{number}").is_dir():
                    folder = data_dir / f"subset{number}"
                    errors.append(f"{folder}: no such folder (subset {number} of luna16_split.{name})")
            splits[name] = []
            for uid, (number, header) in found.items():
                if number not in split[name]:
                    continue
                try:
                    geometries[header]
                except ValueError as err:
                    errors.append(str(err))
                    failed.add(header)
                    continue
                splits[name].append({"image": str(header), "seriesuid": uid})
            if not splits[name] and not errors:
                errors.append(f"{data_dir}: the subsets {split[name]} of luna16_split.{name} hold no .mhd series")
        configured = {n for numbers in split.values() for n in numbers}

        def resolve(uid):
            if uid not in found:  # a subset this site did not download: its rows are counted, not used
                return None
            number, header = found[uid]
            if header in failed:
                raise ValueError(f"column 'seriesuid': its series {header} is unusable (its header problem is above)")
            return header if number in configured else None

        nodules = read_annotations(data_dir / LUNA16_ANNOTATIONS_CSV, data_dir, geometries, errors, resolve, unused)
    with open(data_dir / (ANNOTATIONS_CSV if layout == "nifti" else LUNA16_ANNOTATIONS_CSV), newline="") as f:
        annotation_rows = max(sum(1 for line in f if line.strip()) - 1, 0)
    return {
        "layout": layout, "splits": splits, "nodules": nodules, "annotation_rows": annotation_rows,
        "unused_rows": len(unused), "errors": errors, "series": on_disk,
    }  # fmt: skip


def split_source(data_dir: Path, layout: str, name: str, split: dict | None) -> str:
    """Where a split's series come from, for messages: its list file, or its subsets."""
    if layout == "nifti":
        return f"{data_dir / SPLITS[name][0]}: no series of {SPLITS[name][1]!r}"
    return f"{data_dir}: no series of subsets {(split or LUNA16_DEFAULT_SPLIT)[name]} (luna16_split.{name})"


def load_data(trainer: dict, data_dir: Path, split: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Validated train and val records ``{"image", "seriesuid", "box", "label"}`` from ``data_dir``.

    ``split``: the LUNA16 subset numbers per split when ``data_dir`` is in LUNA16's own layout (``luna16_split``).
    """
    data_dir = Path(data_dir)
    scan = scan_data(data_dir, split)
    errors = scan["errors"]
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise ValueError("\n".join(errors[:MAX_REPORTED_ERRORS]) + more)
    if scan["layout"] == "luna16" and importlib.util.find_spec("itk") is None:
        raise ValueError(
            f"{data_dir}: LUNA16 MetaImage (.mhd) volumes are read by MONAI's ITKReader, which needs the "
            "'itk' package; it is not installed"
        )
    nodules, records = scan["nodules"], {}
    for name, series in scan["splits"].items():
        max_samples = trainer[f"max_{name}_samples"]
        series = series[:max_samples] if max_samples > 0 else series
        records[name] = [
            {**s, "box": nodule_boxes(nodules.get(s["seriesuid"], [])),
             "label": np.zeros(len(nodules.get(s["seriesuid"], [])), dtype=np.int64)}
            for s in series
        ]  # fmt: skip
        if not any(len(r["label"]) for r in records[name]):
            annotations = data_dir / (ANNOTATIONS_CSV if scan["layout"] == "nifti" else LUNA16_ANNOTATIONS_CSV)
            raise ValueError(
                f"{split_source(data_dir, scan['layout'], name, split)} has a nodule in {annotations}; "
                "detection cannot be trained or evaluated on it"
            )
    return records["train"], records["val"]


def check_data(job: JobConfig, site: SiteConfig) -> dict:
    """The site's data checked as ``build`` checks it, nothing trained: layout, series and nodules per split,
    annotation rows used / outside the split, and ``errors``: every problem with its file and row or entry.

    Nothing in it reaches beyond the data directory: paths are relative to it, and series uids are replaced
    by their place on disk (``subset3/<series 2>``: the second ``.mhd`` of ``subset3/`` in name order).
    """
    summary = {"job": JOB_NAME, "ok": False, "layout": None, "dataset": None}
    try:
        data_dir = site.dataset_dir(JOB_NAME)
        summary["dataset"] = data_dir.name
        layout = summary["layout"] = detect_layout(data_dir)
        split = luna16_split(site) if layout == "luna16" else None
    except ValueError as err:  # the site config names no usable dataset directory: no host path in the message
        summary["errors"] = [data_check.site_message(err, site)]
        return summary
    trainer = job.trainer()
    if split:
        summary["luna16_split"] = split
    try:
        scan = scan_data(data_dir, split)
    except ValueError as err:
        scan, errors = None, [str(err)]
    else:
        errors = list(scan["errors"])
        summary["splits"] = {}
        for name, series in scan["splits"].items():
            uids = [s["seriesuid"] for s in series]
            n_nodules = sum(len(scan["nodules"].get(uid, [])) for uid in uids)
            max_samples = trainer.get(f"max_{name}_samples", 0)
            summary["splits"][name] = {
                "series": len(uids), "nodules": n_nodules,
                "series_with_nodules": sum(1 for uid in uids if scan["nodules"].get(uid)),
                "series_used": min(len(uids), max_samples) if max_samples and max_samples > 0 else len(uids),
            }  # fmt: skip
            if not errors and n_nodules == 0:
                errors.append(f"{split_source(data_dir, layout, name, split)} has a nodule")
        used = sum(len(v) for v in scan["nodules"].values())
        summary["annotations"] = {
            "rows": scan["annotation_rows"], "used": used, "outside_split": scan["unused_rows"],
        }  # fmt: skip
        if layout == "luna16" and importlib.util.find_spec("itk") is None:
            errors.append("reading .mhd needs the 'itk' package (MONAI's ITKReader); it is not installed")
    summary["ok"] = not errors
    summary["errors"] = [_redact(e, data_dir, scan) for e in errors]  # last, as in every job's summary
    return summary


def _redact(message: str, data_dir: Path, scan: dict | None) -> str:
    """``message`` with paths relative to ``data_dir`` and series uids replaced by their place on disk."""
    message = message.replace(f"{data_dir}/", "").replace(str(data_dir), ".")
    if scan:
        places: dict[str, str] = {}
        by_folder: dict[str, list] = {}
        for uid, (folder, _) in sorted(scan["series"].items()):
            by_folder.setdefault(folder, []).append(uid)
        for folder, uids in by_folder.items():
            for index, uid in enumerate(sorted(uids), start=1):
                places[uid] = f"<series {index}>"
        for uid in sorted(places, key=len, reverse=True):
            message = message.replace(uid, places[uid])
    # a uid that names no file on disk (an annotation row's): the row number locates it
    return re.sub(r"\d+(\.\d+){4,}", "<seriesuid>", message)


# ---------------------------------------------------------------- transforms


def inference_preprocessing(trainer: dict) -> list[dict]:
    """Load, RAS, resample to ``spacing``, HU window -> 0..1 (MONAI bundle config; see hcls.transform_config)."""
    low, high = trainer["intensity_range"]
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": None},  # None: the MetaTensor's
        {"_target_": "Spacingd", "keys": "image", "pixdim": trainer["spacing"], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
    ]  # fmt: skip


def detection_transforms(trainer: dict, train: bool) -> Compose:
    """LUNA16 pipeline: the image pre-processing above, then world boxes -> voxel boxes.

    Training adds ``batch_size`` random ``patch_size`` crops per volume (``crop_pos_neg``: by default
    half of them hold a whole nodule, as in MONAI's tutorial) and flips / 90-degree rotations /
    intensity jitter.
    """
    transforms = [
        *transform_config.instantiate(inference_preprocessing(trainer)),
        ConvertBoxToStandardModed(box_keys="box", mode="cccwhd"),
        # world (LPS mm) -> voxel index through the resampled image's RAS affine
        AffineBoxToImageCoordinated(box_keys="box", box_ref_image_keys="image", affine_lps_to_ras=True),
        Lambdad(keys="box", func=voxel_box_corners),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="box", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.long, track_meta=False),
    ]
    if train:
        box_args = {"image_keys": "image", "box_keys": "box", "box_ref_image_keys": "image"}
        pos, neg = trainer.get("crop_pos_neg", DEFAULT_CROP_POS_NEG)
        transforms += [
            RandCropBoxByPosNegLabeld(
                image_keys="image", box_keys="box", label_keys="label", spatial_size=trainer["patch_size"],
                whole_box=True, num_samples=trainer["batch_size"], pos=pos, neg=neg, allow_smaller=True,
            ),
            ClipBoxToImaged(box_keys="box", label_keys="label", box_ref_image_keys="image", remove_empty=True),
            RandFlipBoxd(**box_args, prob=0.5, spatial_axis=0),
            RandFlipBoxd(**box_args, prob=0.5, spatial_axis=1),
            RandFlipBoxd(**box_args, prob=0.5, spatial_axis=2),
            RandRotateBox90d(**box_args, prob=0.75, max_k=3, spatial_axes=(0, 1)),
            RandScaleIntensityd(keys="image", prob=0.15, factors=0.1),
            RandShiftIntensityd(keys="image", prob=0.15, offsets=0.1),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            EnsureTyped(keys="box", dtype=torch.float32, track_meta=False),
            EnsureTyped(keys="label", dtype=torch.long, track_meta=False),
        ]  # fmt: skip
    return Compose(transforms)


def make_loader(records: list[dict], trainer: dict, train: bool) -> DataLoader:
    """One volume per batch (a list of ``batch_size`` patches when training), no collation."""
    dataset = Dataset(records, transform=detection_transforms(trainer, train))
    return DataLoader(dataset, batch_size=1, shuffle=train, num_workers=trainer["num_workers"], collate_fn=no_collation)


# ---------------------------------------------------------------- detector


def build_detector(network: torch.nn.Module, trainer: dict, config_path: Path, loss_reduction: str = "mean"
                   ) -> RetinaNetDetector:  # fmt: skip
    """MONAI's RetinaNetDetector around ``network``, configured from ``trainer`` (tutorial settings). Its losses
    are means over the batch's sampled anchors, or sums (``loss_reduction`` "sum", for DP-SGD)."""
    size_divisible = tuple(int(s) for s in network.size_divisible)
    for field in ("patch_size", "val_patch_size"):
        if len(trainer[field]) != 3 or any(p % s for p, s in zip(trainer[field], size_divisible)):
            raise ValueError(
                f"{config_path}: trainer.{field} {trainer[field]} must be 3 sizes divisible by the network's "
                f"size_divisible {list(size_divisible)}"
            )
    anchors = trainer["anchors"]
    if len(anchors["base_anchor_shapes"]) != network.num_anchors:
        raise ValueError(
            f"{config_path}: trainer.anchors.base_anchor_shapes has {len(anchors['base_anchor_shapes'])} shapes, "
            f"the network has num_anchors={network.num_anchors}"
        )
    anchor_generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=anchors["feature_map_scales"], base_anchor_shapes=anchors["base_anchor_shapes"]
    )
    detector = RetinaNetDetector(network=network, anchor_generator=anchor_generator)
    detector.set_target_keys(box_key="box", label_key="label")
    matcher = trainer["matcher"]
    if matcher.get("type", "iou") == "atss":  # MONAI's LUNA16 tutorial: ATSS, num_candidates 4
        detector.set_atss_matcher(matcher.get("num_candidates", 4), center_in_gt=matcher.get("center_in_gt", False))
    else:
        detector.set_regular_matcher(
            matcher["fg_iou_thresh"], matcher["bg_iou_thresh"],
            allow_low_quality_matches=matcher["allow_low_quality_matches"],
        )  # fmt: skip
    sampler = trainer["sampler"]
    if "pool_size" in sampler or "min_neg" in sampler:
        detector.set_hard_negative_sampler(
            batch_size_per_image=sampler["batch_size_per_image"], positive_fraction=sampler["positive_fraction"],
            pool_size=sampler.get("pool_size", 10), min_neg=sampler.get("min_neg", 1),
        )  # fmt: skip
    else:
        detector.set_balanced_sampler(sampler["batch_size_per_image"], sampler["positive_fraction"])
    # The detector's default classification loss is BCE; the job asks for the focal loss.
    if trainer["classification_loss"] == "focal":
        detector.set_cls_loss(FocalLoss(reduction=loss_reduction, gamma=2.0))
    else:
        detector.set_cls_loss(torch.nn.BCEWithLogitsLoss(reduction=loss_reduction))
    detector.set_box_regression_loss(
        torch.nn.SmoothL1Loss(beta=1.0 / 9, reduction=loss_reduction), encode_gt=True, decode_pred=False
    )
    inference = trainer["inference"]
    detector.set_box_selector_parameters(
        score_thresh=inference["score_thresh"], topk_candidates_per_level=inference["topk_candidates_per_level"],
        nms_thresh=inference["nms_thresh"], detections_per_img=inference["detections_per_img"],
    )  # fmt: skip
    detector.set_sliding_window_inferer(
        roi_size=trainer["val_patch_size"], overlap=0.25, sw_batch_size=1, mode="constant", device="cpu"
    )
    return detector


def prepare_for_dp_sgd(network: torch.nn.Module) -> None:
    """What Opacus' per-sample gradient hooks need, same computation, weights and ``state_dict``: ReLUs not in place
    (MONAI's ResNet builds its blocks' in place) and every bottleneck's shortcut added out of place (MONAI's adds
    it in place onto ``bn3``'s output, which the hooks forbid)."""

    def forward(block, x):
        residual = x if block.downsample is None else block.downsample(x)
        out = block.act(block.bn1(block.conv1(x)))
        out = block.act(block.bn2(block.conv2(out)))
        return block.act(block.bn3(block.conv3(out)) + residual)

    for module in network.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
        if isinstance(module, ResNetBottleneck):
            module.forward = types.MethodType(forward, module)


def lr_warmup(optimizer: torch.optim.Optimizer, trainer: dict, steps_per_epoch: int):
    """Linear warm-up over ``trainer.lr_warmup_epochs`` epochs of ``steps_per_epoch`` steps; None without one."""
    warmup_steps = round(trainer.get("lr_warmup_epochs", DEFAULT_LR_WARMUP_EPOCHS) * steps_per_epoch)
    if warmup_steps <= 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))


def autocast(device: torch.device, amp: bool):
    """Mixed precision on CUDA when ``amp`` (MONAI's tutorial trains with AMP); a no-op otherwise."""
    return torch.autocast(device_type="cuda") if amp and device.type == "cuda" else nullcontext()


# ---------------------------------------------------------------- train / evaluate


def patch_loss(detector, batch, device: torch.device, amp: bool) -> torch.Tensor:
    """Classification + box regression loss of the detector on a batch's training patches (one volume's, or under
    DP-SGD those of the volumes Poisson sampling drew: none gives a zero loss through the network, no step).

    Every output of the network is in the loss, those without a training target times 0: a batch whose patches hold
    no nodule has no box regression loss (MONAI's is then a constant), and DP-SGD needs a per-sample gradient of
    every parameter, zero or not."""
    samples = [s for item in batch for s in (item if isinstance(item, list) else [item])]
    if not samples:
        size = [int(s) for s in detector.network.size_divisible]  # the smallest input the network takes
        return all_outputs(detector.network(torch.zeros((0, 1, *size), device=device)))
    images = [s["image"].to(device) for s in samples]
    targets = [{"box": s["box"].to(device), "label": s["label"].to(device)} for s in samples]
    outputs = []
    hook = detector.network.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        with autocast(device, amp):
            losses = detector(images, targets)
            return losses[detector.cls_key] + losses[detector.box_reg_key] + 0.0 * all_outputs(outputs[0])
    finally:
        hook.remove()


def all_outputs(outputs: dict) -> torch.Tensor:
    """The sum of every map the network put out (classification and box regression, every level)."""
    return sum(map_.sum() for maps in outputs.values() for map_ in maps)


def predict(detector, loader, device: torch.device, val_patch_size, amp: bool) -> tuple[list, list, list]:
    """Predicted boxes and scores and ground-truth boxes (voxel coordinates) of every validation volume."""
    detector.eval()
    pred_boxes, pred_scores, gt_boxes = [], [], []
    with torch.no_grad():
        for batch in loader:
            for item in batch:
                image = item["image"].to(device)
                use_inferer = any(s > p for s, p in zip(image.shape[1:], val_patch_size))
                with autocast(device, amp):
                    output = detector([image], use_inferer=use_inferer)[0]
                pred_boxes.append(output[detector.target_box_key].float().cpu().numpy())
                pred_scores.append(output[detector.pred_score_key].float().cpu().numpy())
                gt_boxes.append(item["box"].cpu().numpy())
    return pred_boxes, pred_scores, gt_boxes


def evaluate(detector, loader, device: torch.device, trainer: dict, key_metric: str, amp: bool = False) -> dict:
    """``{key_metric: FROC score}`` of the detector on whole validation volumes."""
    pred_boxes, pred_scores, gt_boxes = predict(detector, loader, device, trainer["val_patch_size"], amp)
    score = froc.froc_score(pred_boxes, pred_scores, gt_boxes, trainer["froc_fps_per_scan"], IOU_THRESHOLD)
    return {key_metric: score}


# ---------------------------------------------------------------- the trainer


def load_settings(job: JobConfig) -> dict:
    """The job's trainer settings, with the ones this trainer depends on checked."""
    trainer = job.trainer(REQUIRED_KEYS)
    config_path = job.client_path
    losses = (("classification_loss", CLASSIFICATION_LOSSES), ("box_regression_loss", BOX_REGRESSION_LOSSES))
    for field, allowed in losses:
        if trainer[field] not in allowed:
            raise ValueError(f"{config_path}: trainer.{field} {trainer[field]!r} is not one of {', '.join(allowed)}")
    crop = trainer.get("crop_pos_neg", DEFAULT_CROP_POS_NEG)
    numbers = isinstance(crop, list | tuple) and all(isinstance(v, int | float) and v >= 0 for v in crop)
    if not numbers or len(crop) != 2 or sum(crop) <= 0:
        raise ValueError(f"{config_path}: trainer.crop_pos_neg {crop!r} must be [pos, neg], weights >= 0, not both 0")
    warmup = trainer.get("lr_warmup_epochs", DEFAULT_LR_WARMUP_EPOCHS)
    if isinstance(warmup, bool) or not isinstance(warmup, int | float) or not warmup >= 0:
        raise ValueError(f"{config_path}: trainer.lr_warmup_epochs {warmup!r} must be a number of epochs >= 0")
    return trainer


def build(job: JobConfig, site: SiteConfig, device: torch.device) -> Trainer:
    trainer = load_settings(job)
    data_dir = site.dataset_dir(JOB_NAME)
    layout = detect_layout(data_dir)
    split = luna16_split(site) if layout == "luna16" else None
    train_records, val_records = load_data(trainer, data_dir, split)
    train_loader = make_loader(train_records, trainer, train=True)
    val_loader = make_loader(val_records, trainer, train=False)

    amp = bool(trainer.get("amp", True)) and device.type == "cuda" and not site.dp_policy
    network = job.build_network()
    trained = train_only(network, trainer, job.client_path)
    detector = build_detector(network, trainer, job.client_path, "sum" if site.dp_policy else "mean").to(device)
    optimizer = build_optimizer(trainer, job.client_path, trained)
    dp_accounting = None
    if site.dp_policy:
        require_one_sample_per_record(trainer, "batch_size", "patch", job.client_path, site.path)
        prepare_for_dp_sgd(detector.network)
        epochs = job.num_rounds * trainer["local_epochs"]
        optimizer, train_loader, dp_accounting = make_private(
            detector.network, optimizer, train_loader, site.dp_policy, epochs, loss_reduction="sum", empty_batch=[]
        )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    scheduler = lr_warmup(optimizer, trainer, steps_per_epoch=len(train_loader))
    n_nodules = sum(len(r["label"]) for r in train_records)
    print(f"{JOB_NAME}: {layout} layout, {len(train_records)} training series ({n_nodules} nodules), "
          f"device={device} amp={amp}")

    def train():
        return train_epochs(
            detector, train_loader, optimizer, lambda batch: patch_loss(detector, batch, device, amp),
            trainer["local_epochs"], scaler=scaler, scheduler=scheduler,
        )  # fmt: skip

    return Trainer(
        model=detector.network,
        train=train,
        evaluate=lambda: evaluate(detector, val_loader, device, trainer, job.key_metric, amp),
        n_train=len(train_records),
        dp_accounting=dp_accounting,
    )


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(data_check.main(JOB_NAME, check_data, sys.argv[1:]))
    client_loop.main(JOB_NAME, build)
