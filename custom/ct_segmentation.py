"""NVFlare Client API trainer for the ``ct_segmentation`` job: 3D multi-organ CT segmentation.

Run by NVFlare's ClientAPIExecutor from the job's app directory on a site::

    python3 -u custom/ct_segmentation.py --config config/config_fed_client.json

Hyper-parameters, the network and the key metric come from the job (``hcls.job_config.JobConfig``);
the data directory from the site config (``$HCLS_SITE_CONFIG``, key ``datasets.ct_segmentation``).

Check a site's data without training (no server, no NVFlare)::

    HCLS_SITE_CONFIG=local/site_config.json python3 custom/ct_segmentation.py --check --config CONFIG

Data layouts, detected from the files or named by the site (``dataset_layouts.ct_segmentation``: ``"project"``
or ``"msd"``; a folder holding both ``dataset.json`` and ``train_data.json`` must be named):

* ``project`` (the project's own): ``train_data.json`` and ``val_data.json``, each
  ``{"training": [{"image": ..., "label": ...}, ...]}`` with paths relative to the data directory; label maps
  numbered as the job (0 = background, ``i`` = ``trainer.labels[i - 1]``; ``trainer.label_remap`` is not used).
* ``msd`` (Medical Segmentation Decathlon / BTCV ``dataset.json``): ``training`` (paths as MSD writes them,
  ``./imagesTr/x.nii.gz``, relative to the data directory), ``labels`` (``{"0": "background", "1": "spleen"}``,
  or the inverse ``{"spleen": 1}``), an optional ``validation`` list (as MONAI's BTCV ``dataset_0.json``); ``test``
  is not read. Without ``validation``, ``training`` is split: the ``round(f * n)`` cases whose image path
  (without a leading ``./``) has the lowest SHA-256 are the validation cases, at least one on each side when
  there are two or more (the split depends on the paths, not on their order), ``f`` from the site config's
  optional ``msd_split`` ``{"validation_fraction": f}`` (default 0.2; 10 + 4 cases give 11 + 3, 3 give 2 + 1).
  Each source label *name* becomes a job class through ``trainer.label_remap`` (source name -> job organ,
  ``"background"`` or a class 0..13; names compared lower-case with spaces and hyphens as underscores); a name
  equal to a job organ needs no entry; any other source label becomes background and the data check reports it
  (``source_labels``: ``"background (unmapped)"``). The remap is applied with MONAI's ``MapLabelValued`` in the
  cached pre-processing. A remap value that is no organ of ``trainer.labels``, not "background" nor a class
  0..13 stops the trainer (ValueError naming the job config and ``trainer.label_remap["name"]``).

An ``image`` that is a directory (either layout) is one DICOM series, as a PACS export holds it: read by MONAI's
``LoadImage`` with its default DICOM reader, ``ITKReader`` (GDCM); its headers are checked first with pydicom.
An empty folder, a file in it that is not DICOM, files of two series (SeriesInstanceUID), slices of different
size or orientation, two slices at one position or uneven slice spacing are errors naming the folder or file.
Its label stays NIfTI in the series' geometry: the same shape (columns, rows, slices) and the same RAS affine
within ``AFFINE_TOLERANCE_MM``.

Every entry of both splits is checked before training: a missing, malformed or empty list, an entry naming a
missing or non-NIfTI file, a label whose shape differs from its image's, or label values that are not integers
in ``0..len(labels)`` (project) or not values of the ``labels`` map (msd) is a ValueError naming the list file,
the entry (``training[i]``, 0-based, or ``validation[i]``), the field and the file.

Pre-processing (deterministic, cached): load, channel first, reorient to RAS, resample
to ``trainer.pixdim`` (bilinear image, nearest label), window ``trainer.intensity_range``
(HU) to 0..1 with clipping, optionally crop to the body (``trainer.crop_foreground``,
default true). Training adds (random) ``num_samples`` crops of ``roi_size`` per volume,
centred on foreground/background at ``pos_neg_ratio``, and a mild intensity shift. No
flips: left and right organs (kidneys, adrenal glands) carry different labels.
Validation runs sliding-window inference (``roi_size`` plus ``trainer.sliding_window``
arguments) on the whole pre-processed volume; Dice is computed in that resampled space.

Metrics (MONAI ``DiceMetric``, background excluded, on the argmax prediction):

* ``val_dice_<organ>``: Dice of that organ averaged over the validation volumes whose
  label contains it. A volume without the organ gives no value for it (MONAI's
  ``ignore_empty``; predicted voxels of that organ there are not penalised). An organ in
  no validation label has no value and is left out of the metrics dict (no NaN is sent).
* the key metric (``val_mean_dice`` in the job config): the mean of the ``val_dice_<organ>`` values present,
  i.e. a nan-mean over the organs; NaN only if no validation label contains any organ.

Loss: ``trainer.loss`` looked up in ``monai.losses`` (a class ``weight`` list in its args
needs ``len(labels) + 1`` values, background first). Optional trainer fields, read with
these defaults when absent: ``crop_foreground`` (true), ``cache_rate`` (1.0: the
pre-processed volumes are cached in memory; lower it for large datasets) and ``trained_layers`` (all: fine-tuning
trains only the named modules, ``hcls.training.train_only``).

Differential privacy, when the site config requires it (``privacy.differential_privacy``): record-level DP-SGD
with Opacus (``hcls.dp_sgd.make_private``) over all rounds and local epochs, one crop per volume (``num_samples``
1, else the trainer stops), ReLUs not in place (``profiles/dp.json``) and each residual block's shortcut added
out of place (``add_residuals_out_of_place``). The recipe that keeps the accuracy (README, row ``dp``) is
``profiles/dp_pretrained.json``: SegResNet pre-trained without DP on public data, its full-resolution decoder
stage and output convolution fine-tuned with DP-SGD.
"""

import hashlib
import importlib.util
import json
import math
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import monai.losses
import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, decollate_batch
from monai.inferers import SlidingWindowInferer
from monai.metrics import DiceMetric
from monai.networks.blocks.segresnet_block import ResBlock
from monai.transforms import AsDiscrete, Compose, EnsureTyped, RandCropByPosNegLabeld, RandShiftIntensityd, SpatialPadd

from hcls import client_loop, data_check, transform_config
from hcls.components import build_optimizer
from hcls.dp_sgd import make_private, require_one_sample_per_record
from hcls.job_config import JobConfig
from hcls.json_files import read_json
from hcls.site_config import SiteConfig
from hcls.training import Trainer, train_epochs, train_only

JOB_NAME = "ct_segmentation"
TRAIN_LIST, VAL_LIST = "train_data.json", "val_data.json"
REQUIRED_KEYS = (
    "labels", "pixdim", "intensity_range", "roi_size", "num_samples", "pos_neg_ratio", "optimizer", "loss",
    "sliding_window", "local_epochs", "batch_size", "num_workers", "max_train_samples", "max_val_samples", "seed",
)  # fmt: skip
OPTIONAL_DEFAULTS = {"crop_foreground": True, "cache_rate": 1.0, "label_remap": {}}  # read with these when absent
LAYOUTS = ("project", "msd")
MSD_LIST = "dataset.json"
MSD_DEFAULT_SPLIT = {"validation_fraction": 0.2}  # site config key "msd_split"
UNMAPPED = "background (unmapped)"  # what a source label that maps to no job class becomes
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
AFFINE_TOLERANCE_MM = 0.01  # a DICOM series' label affine must match the series' to this (and slices differ more)
MAX_REPORTED_ERRORS = 20


# ---------------------------------------------------------------- problems


@dataclass
class Problem:
    """One bad input: its file, entry (``training[3]``), field (``image``, ``label``, ``labels``) and what is wrong."""

    file: Path
    row: str | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = str(self.file) + (f", entry {self.row}" if self.row else "")
        if self.column:
            return f"{where}, {self.column!r}: {self.message}"
        return f"{where}, {self.message}" if self.row else f"{where}: {self.message}"

    def summary(self, base: Path) -> dict:
        """File relative to ``base`` (the dataset folder's parent), entry, field and the message without paths
        beyond the dataset folder."""
        try:
            file = Path(self.file).relative_to(base).as_posix()
        except ValueError:
            file = Path(self.file).name
        return {"file": file, "row": self.row, "column": self.column, "error": public(self.message, base)}


class EntryError(ValueError):
    """A bad list entry: the field at fault (``image``, ``label`` or None for the entry itself) and why."""

    def __init__(self, column: str | None, message: str):
        super().__init__(f"{column!r}: {message}" if column else message)
        self.column, self.message = column, message


def public(message: str, base: Path) -> str:
    """``message`` with every path from ``base`` (the dataset folder's parent) on: no directory above it."""
    for prefix in {f"{base}/", f"{Path(base).resolve()}/"}:
        message = message.replace(prefix, "")
    return message


def raise_problems(problems: list[Problem]) -> None:
    """ValueError listing the first ``MAX_REPORTED_ERRORS`` problems, if any."""
    if problems:
        more = f"\n... and {len(problems) - MAX_REPORTED_ERRORS} more" if len(problems) > MAX_REPORTED_ERRORS else ""
        raise ValueError("\n".join(map(str, problems[:MAX_REPORTED_ERRORS])) + more)


@dataclass
class Split:
    """The valid records of one split and, per record, the job classes (1..13) its label holds after the remap."""

    file: Path
    records: list[dict] = field(default_factory=list)
    classes: list[set[int]] = field(default_factory=list)


@dataclass
class SiteData:
    """Everything read from a site's dataset folder: both splits, the label remap and every problem found."""

    layout: str
    train: Split
    val: Split
    label_map: dict[int, int]  # source label value -> job class (identity for the project layout)
    source_labels: dict[str, str]  # source label name -> job label, "background" or UNMAPPED
    problems: list[Problem]
    validation_fraction: float | None = None  # msd_split's, when the validation cases were drawn from 'training'


# ---------------------------------------------------------------- label names and the remap


def normalize(name: str) -> str:
    """A label name for comparison: lower-case, runs of spaces and hyphens as one underscore."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def job_classes(labels: list[str]) -> dict[str, int]:
    """Normalized job label name -> class: ``background`` 0, ``labels[i]`` i + 1."""
    return {"background": 0, **{normalize(name): i + 1 for i, name in enumerate(labels)}}


def check_label_remap(remap, labels: list[str], where) -> dict[str, int]:
    """``trainer.label_remap`` as {normalized source name: job class}; ValueError naming ``where`` (the job config)
    and the field for a value that is no job label, not "background" and not a class in ``0..len(labels)``."""
    if not isinstance(remap, dict):
        raise ValueError(f"{where}: trainer.label_remap must be an object {{source label name: job label}}")
    classes, remapped, originals = job_classes(labels), {}, {}
    for source, target in remap.items():
        name = f"trainer.label_remap[{json.dumps(source)}]"
        if isinstance(target, int) and not isinstance(target, bool):
            if not 0 <= target <= len(labels):
                raise ValueError(
                    f"{where}: {name} = {target}: class {target} is outside 0..{len(labels)} "
                    f"(0 = background, i = trainer.labels[i - 1])"
                )
            cls = target
        elif isinstance(target, str) and normalize(target) in classes:
            cls = classes[normalize(target)]
        else:
            raise ValueError(
                f"{where}: {name} = {json.dumps(target)} is not an organ of trainer.labels, \"background\" "
                f"or a class number 0..{len(labels)}"
            )
        if normalize(source) in originals:
            other = f"trainer.label_remap[{json.dumps(originals[normalize(source)])}]"
            raise ValueError(f"{where}: {name} and {other} are the same source name once normalized")
        remapped[normalize(source)], originals[normalize(source)] = cls, source
    return remapped


def map_source_labels(source: dict[int, str], labels: list[str], remap: dict[str, int]):
    """(source value -> job class, source name -> what it becomes) for a dataset's label map ``source``: its name
    through ``remap`` (normalized names), else the job label or "background" of that name, else background,
    reported as ``UNMAPPED``."""
    classes, names = job_classes(labels), ["background", *labels]
    label_map, report = {}, {}
    for value, name in sorted(source.items()):
        cls = remap.get(normalize(name), classes.get(normalize(name)))
        label_map[value] = cls or 0
        report[name] = UNMAPPED if cls is None else names[cls]
    return label_map, report


def parse_msd_labels(value) -> dict[int, str]:
    """The ``labels`` of an MSD ``dataset.json`` as {value: name}: ``{"0": "background", "1": "spleen"}`` as MSD
    writes it, or the inverse ``{"background": 0, "spleen": 1}`` of some releases; ValueError otherwise."""
    if not isinstance(value, dict) or not value:
        raise ValueError('must be an object of label value -> name, e.g. {"0": "background", "1": "spleen"}')
    by_number = all(isinstance(key, str) and key.strip().isdigit() for key in value)
    pairs = [(key, name) for key, name in value.items()] if by_number else [(n, key) for key, n in value.items()]
    source = {}
    for number, name in pairs:
        if isinstance(number, str) and number.strip().isdigit():
            number = int(number)
        if not isinstance(number, int) or isinstance(number, bool) or number < 0 or not isinstance(name, str):
            raise ValueError(f"{json.dumps(number)}: {json.dumps(name)} is not a label value and its name")
        if number in source:
            raise ValueError(f"label value {number} is named twice ({source[number]!r}, {name!r})")
        source[number] = name
    return source


# ---------------------------------------------------------------- images: NIfTI files and DICOM series folders


def check_nifti(path: Path) -> nib.Nifti1Image:
    """The NIfTI image at ``path`` (header read, data not loaded); ValueError if it is missing or not NIfTI."""
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"file {path} is not NIfTI (expected a .nii or .nii.gz file)")
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise ValueError(f"file {path} is not a readable NIfTI file: {err}") from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"file {path} is not NIfTI (nibabel reads it as {type(image).__name__})")
    return image


def read_dicom_slices(folder: Path) -> list[dict]:
    """The geometry of every file of the DICOM series folder ``folder`` (headers only); ValueError naming the folder
    or file for an empty folder, something that is not a DICOM image file, or a second series."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise ValueError(f"{folder} is a DICOM series folder: reading it needs the 'pydicom' package") from None
    if importlib.util.find_spec("itk") is None:
        raise ValueError(f"{folder} is a DICOM series folder: MONAI's ITKReader reads it, which needs 'itk'")
    files = sorted(folder.iterdir())
    if not files:
        raise ValueError(f"DICOM series folder {folder} is empty")
    slices, series = [], {}
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path} is not a file: a DICOM series folder holds the files of one series only")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            raise ValueError(f"file {path} is not a DICOM file (a series folder holds its DICOM files only)") from None
        except Exception as err:  # truncated or corrupt headers raise several types
            raise ValueError(f"file {path} is not a readable DICOM file: {err}") from None
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), path)
        if len(series) > 1:
            first, other = series.values()
            raise ValueError(
                f"DICOM series folder {folder} holds more than one series: {other.name} has another "
                f"SeriesInstanceUID than {first.name} (export one series per folder)"
            )
        missing = [tag for tag in DICOM_GEOMETRY_TAGS if tag not in ds]
        if missing:
            raise ValueError(f"DICOM file {path} lacks {', '.join(missing)}: not an image slice with a geometry")
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise ValueError(f"DICOM file {path} holds {ds.NumberOfFrames} frames: one file per slice is read")
        slices.append({
            "path": path, "position": np.array(ds.ImagePositionPatient, float),
            "orientation": np.array(ds.ImageOrientationPatient, float), "spacing": np.array(ds.PixelSpacing, float),
            "size": (int(ds.Columns), int(ds.Rows)),
        })  # fmt: skip
    return slices


def dicom_series(folder: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape (columns, rows, slices) and RAS affine of the one DICOM series in ``folder``, from its headers, as
    MONAI's ITKReader reads it: slices sorted along the normal (row x column direction), slice spacing from
    their positions; ValueError naming the folder or file for any inconsistency."""
    slices = read_dicom_slices(folder)
    first = slices[0]
    for other in slices[1:]:
        if other["size"] != first["size"] or not (
            np.allclose(other["orientation"], first["orientation"], atol=1e-4)
            and np.allclose(other["spacing"], first["spacing"], atol=1e-4)
        ):
            raise ValueError(
                f"DICOM file {other['path']}: its size, orientation or pixel spacing differs from "
                f"{first['path'].name}'s"
            )
    if len(slices) < 2:
        raise ValueError(f"DICOM series folder {folder} holds one slice: a CT volume needs two or more")
    row, column = first["orientation"][:3], first["orientation"][3:]
    normal = np.cross(row, column)
    ordered = sorted(slices, key=lambda s: float(s["position"] @ normal))
    steps = np.diff([float(s["position"] @ normal) for s in ordered])
    if steps.min() < AFFINE_TOLERANCE_MM:
        i = int(np.argmin(steps))
        first_path, second_path = ordered[i]["path"], ordered[i + 1]["path"]
        raise ValueError(f"DICOM files {first_path} and {second_path.name} are the same slice position")
    if steps.max() - steps.min() > max(0.01 * steps.mean(), AFFINE_TOLERANCE_MM):
        spread = f"{steps.min():g} to {steps.max():g} mm"
        raise ValueError(f"DICOM series folder {folder}: slices are unevenly spaced ({spread} apart)")
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * first["spacing"][1], column * first["spacing"][0]  # PixelSpacing: row, column
    lps[:3, 2], lps[:3, 3] = normal * steps.mean(), ordered[0]["position"]
    return (*first["size"], len(slices)), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def check_label_values(label: nib.Nifti1Image, path: Path, allowed: set[int], allowed_text: str) -> set[int]:
    """The values in ``label``; ValueError unless each is an integer of ``allowed`` (``allowed_text`` says which)."""
    try:
        values = np.unique(np.asanyarray(label.dataobj))
    except Exception as err:  # truncated or corrupt data
        raise ValueError(f"label file {path}: cannot read its data: {err}") from err
    finite = np.isfinite(values)
    bad = values[~finite | (values != np.round(values)) | ~np.isin(values, sorted(allowed))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise ValueError(f"label file {path}: values {shown} are not {allowed_text}")
    return {int(v) for v in values}


def check_entry(data_dir: Path, entry, allowed: set[int], allowed_text: str) -> tuple[dict, set[int]]:
    """One record (absolute image and label paths) from a list entry and the values in its label; EntryError
    naming the field. An image that is a directory is a DICOM series; its label must share its geometry."""
    if not isinstance(entry, dict):
        raise EntryError(None, f"expected an object with 'image' and 'label', got {entry!r}")
    paths = {}
    for key in ("image", "label"):
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            raise EntryError(key, f"field {key!r} is missing or not a file path")
        paths[key] = data_dir / value
    try:
        if paths["image"].is_dir():
            image_shape, image_affine = dicom_series(paths["image"])
        else:
            image_shape, image_affine = tuple(check_nifti(paths["image"]).shape), None
    except ValueError as err:
        raise EntryError("image", str(err)) from None
    try:
        label = check_nifti(paths["label"])
    except ValueError as err:
        raise EntryError("label", str(err)) from None
    if tuple(label.shape) != image_shape:
        raise EntryError(
            "label", f"label file {paths['label']} has shape {tuple(label.shape)}, its image {paths['image']} has "
            f"shape {image_shape}"
        )  # fmt: skip
    if image_affine is not None and not np.allclose(label.affine, image_affine, atol=AFFINE_TOLERANCE_MM):
        raise EntryError(
            "label", f"label file {paths['label']} is not in the geometry of its DICOM series {paths['image']}: "
            f"affine (RAS, mm) {np.round(label.affine[:3], 3).tolist()} vs the series' "
            f"{np.round(image_affine[:3], 3).tolist()} (tolerance {AFFINE_TOLERANCE_MM} mm)"
        )  # fmt: skip
    try:
        values = check_label_values(label, paths["label"], allowed, allowed_text)
    except ValueError as err:
        raise EntryError("label", str(err)) from None
    return {"image": str(paths["image"]), "label": str(paths["label"])}, values


# ---------------------------------------------------------------- dataset layouts


def read_entries(list_path: Path, key: str, items, allowed: set[int], allowed_text: str, label_map, problems) -> Split:
    """The split made of ``items`` ((index in ``list_path``'s ``key`` list, entry)); a bad entry is a Problem."""
    split = Split(list_path)
    for i, entry in items:
        try:
            record, values = check_entry(list_path.parent, entry, allowed, allowed_text)
        except EntryError as err:
            problems.append(Problem(list_path, f"{key}[{i}]", err.column, err.message))
            continue
        split.records.append(record)
        split.classes.append({label_map[v] for v in values} - {0})
    return split


def read_list_file(list_path: Path, problems: list[Problem]) -> dict | None:
    """The JSON object in ``list_path``; a missing or malformed file is a Problem (then None)."""
    try:
        return read_json(list_path)
    except ValueError as err:
        problems.append(Problem(list_path, None, None, str(err).removeprefix(f"{list_path}: ")))
        return None


def list_entries(data: dict | None, list_path: Path, key: str, problems: list[Problem], optional=False) -> list | None:
    """The ``key`` list of ``data`` (read from ``list_path``; None when ``optional`` and absent); a missing or
    malformed list is a Problem (then an empty list). No Problem for a file that could not be read (None)."""
    if data is None:
        return []
    entries = data.get(key)
    if entries is None and optional:
        return None
    if not isinstance(entries, list):
        problems.append(Problem(list_path, None, None, f"no {key!r} list of {{image, label}} entries"))
        return []
    if not entries:
        problems.append(Problem(list_path, None, None, f"the {key!r} list is empty, the dataset is empty"))
    return entries


def read_project_list(list_path: Path, n_labels: int, problems: list[Problem]) -> Split:
    """One of the project's lists (``{"training": [{image, label}, ...]}``), labels already in the job's classes."""
    entries = list_entries(read_list_file(list_path, problems), list_path, "training", problems)
    allowed = set(range(n_labels + 1))
    identity = {value: value for value in allowed}
    return read_entries(list_path, "training", enumerate(entries), allowed, f"integers in 0..{n_labels}", identity,
                        problems)  # fmt: skip


def read_datalist(list_path: Path, n_labels: int, max_samples: int = 0) -> list[dict]:
    """Check the whole project list ``list_path``, then return its first ``max_samples`` records (0 = all)."""
    problems: list[Problem] = []
    records = read_project_list(list_path, n_labels, problems).records
    raise_problems(problems)
    return records[:max_samples] if max_samples > 0 else records


def read_project(labels: list[str], data_dir: Path) -> SiteData:
    """The project layout: ``train_data.json`` and ``val_data.json``, labels numbered as the job's (identity)."""
    problems: list[Problem] = []
    train, val = (read_project_list(data_dir / name, len(labels), problems) for name in (TRAIN_LIST, VAL_LIST))
    identity = {value: value for value in range(len(labels) + 1)}
    return SiteData("project", train, val, identity, {name: name for name in ["background", *labels]}, problems)


def split_training(items: list, fraction: float) -> tuple[list, list]:
    """(training, validation) of the ``(index, entry)`` items: the ``round(fraction * n)`` entries whose image path
    (without a leading ``./``) has the lowest SHA-256 go to validation, at least one on each side when n >= 2. The
    split depends on the paths only, not on the order of the entries."""

    def rank(item):
        image = item[1].get("image") if isinstance(item[1], dict) else None
        text = PurePosixPath(image).as_posix() if isinstance(image, str) else json.dumps(item[1], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest(), item[0]

    n = len(items)
    n_val = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
    chosen = {index for index, _ in sorted(items, key=rank)[:n_val]}
    return [it for it in items if it[0] not in chosen], [it for it in items if it[0] in chosen]


def read_msd(trainer: dict, data_dir: Path, fraction: float, where) -> SiteData:
    """An MSD / BTCV-style folder: ``dataset.json`` with ``labels``, ``training`` and an optional ``validation``
    list (else ``training`` is split by ``fraction``); labels through ``trainer.label_remap``."""
    path, problems = data_dir / MSD_LIST, []
    remap = check_label_remap(trainer.get("label_remap", OPTIONAL_DEFAULTS["label_remap"]), trainer["labels"], where)
    empty = SiteData("msd", Split(path), Split(path), {}, {}, problems)
    dataset = read_list_file(path, problems)
    training = list_entries(dataset, path, "training", problems)
    if problems:
        return empty
    try:
        source = parse_msd_labels(dataset.get("labels"))
    except ValueError as err:
        problems.append(Problem(path, None, "labels", str(err)))
        return empty
    label_map, report = map_source_labels(source, trainer["labels"], remap)
    allowed_text = f"values of its 'labels' in {path} ({', '.join(map(str, sorted(source)))})"
    validation = list_entries(dataset, path, "validation", problems, optional=True)
    if validation is None:
        train_items, val_items = split_training(list(enumerate(training)), fraction)
        val_key = "training"
        if not val_items:
            problems.append(Problem(path, None, "training", f"{len(training)} case(s): too few to split (msd_split)"))
    else:
        train_items, val_items, val_key = list(enumerate(training)), list(enumerate(validation)), "validation"
        problems += overlap_problems(path, training, validation)
    entry_problems: list[Problem] = []
    train = read_entries(path, "training", train_items, set(source), allowed_text, label_map, entry_problems)
    val = read_entries(path, val_key, val_items, set(source), allowed_text, label_map, entry_problems)
    problems += sorted(entry_problems, key=list_order)  # as the entries stand in dataset.json
    return SiteData("msd", train, val, label_map, report, problems, fraction if validation is None else None)


def list_order(problem: Problem) -> tuple[bool, int]:
    """Where an entry's problem stands in ``dataset.json``: ``training[i]`` before ``validation[j]``, by index."""
    name, _, index = (problem.row or "").partition("[")
    return name != "training", int(index.rstrip("]") or -1)


def overlap_problems(path: Path, training: list, validation: list) -> list[Problem]:
    """A Problem for each ``validation`` entry whose image is also a ``training`` entry's."""
    images = {PurePosixPath(e["image"]).as_posix(): i for i, e in enumerate(training) if isinstance(e, dict)
              and isinstance(e.get("image"), str)}  # fmt: skip
    return [
        Problem(path, f"validation[{j}]", "image", f"the same image as training[{images[key]}]: a case is in one split")
        for j, e in enumerate(validation)
        if isinstance(e, dict) and isinstance(e.get("image"), str) and (key := PurePosixPath(e["image"]).as_posix())
        in images
    ]  # fmt: skip


def detect_layout(data_dir: Path, named: str | None = None, where="the site config") -> str:
    """The layout named by the site (``named``) or detected: ``dataset.json`` -> msd, ``train_data.json`` -> project;
    both without a name, or neither, is a ValueError."""
    if named:
        if named not in LAYOUTS:
            raise ValueError(f"{where}: dataset_layouts.{JOB_NAME} {named!r} is not one of {', '.join(LAYOUTS)}")
        return named
    msd, project = (data_dir / MSD_LIST).is_file(), (data_dir / TRAIN_LIST).is_file()
    if msd and project:
        raise ValueError(
            f"{data_dir} holds both {MSD_LIST} (msd layout) and {TRAIN_LIST} (project layout): name the one to "
            f"read in {where}: dataset_layouts.{JOB_NAME} (\"msd\" or \"project\")"
        )
    if not msd and not project:
        raise ValueError(f"{data_dir}: no {MSD_LIST} (msd layout) nor {TRAIN_LIST} and {VAL_LIST} (project layout)")
    return "msd" if msd else "project"


def site_layout(site: SiteConfig, data_dir: Path) -> tuple[str, str]:
    """The layout of the site's CT dataset and how it was chosen ("site config" or "detected")."""
    named = (site.data.get("dataset_layouts") or {}).get(JOB_NAME)
    return detect_layout(data_dir, named, site.path), "site config" if named else "detected"


def msd_split(site: SiteConfig) -> float:
    """The site's ``msd_split.validation_fraction`` (default 0.2); ValueError naming the site config if malformed."""
    split = site.data.get("msd_split", MSD_DEFAULT_SPLIT)
    fraction = split.get("validation_fraction") if isinstance(split, dict) else None
    if set(split if isinstance(split, dict) else ()) != {"validation_fraction"} or isinstance(fraction, bool) or not (
        isinstance(fraction, (int, float)) and 0 < fraction < 1
    ):
        raise ValueError(
            f"{site.path}: field 'msd_split' must be {{\"validation_fraction\": a number between 0 and 1}}, "
            f"got {json.dumps(split)}"
        )
    return float(fraction)


def read_site_data(trainer: dict, data_dir: Path, layout: str | None = None, fraction: float | None = None,
                   where="the job config") -> SiteData:  # fmt: skip
    """Every entry of the site's dataset checked (problems collected, nothing raised for them): ``layout`` (detected
    when None), ``fraction`` the msd validation fraction (default ``msd_split``'s), ``where`` the job config."""
    layout = layout or detect_layout(data_dir)
    if layout == "project":
        return read_project(trainer["labels"], data_dir)
    return read_msd(trainer, data_dir, MSD_DEFAULT_SPLIT["validation_fraction"] if fraction is None else fraction,
                    where)  # fmt: skip


def usable(data: SiteData, trainer: dict) -> SiteData:
    """``data`` once it has no problem (else a ValueError listing them), each split cut to its first
    ``max_train_samples`` / ``max_val_samples`` records (0 = all)."""
    raise_problems(data.problems)
    for split, key in ((data.train, "max_train_samples"), (data.val, "max_val_samples")):
        if trainer[key] > 0:
            split.records, split.classes = split.records[: trainer[key]], split.classes[: trainer[key]]
    return data


def load_data(trainer: dict, data_dir: Path, layout=None, fraction=None) -> tuple[list[dict], list[dict]]:
    """Validated train and val records from ``data_dir`` (the whole dataset checked before any training)."""
    data = usable(read_site_data(trainer, data_dir, layout, fraction), trainer)
    return data.train.records, data.val.records


# ---------------------------------------------------------------- transforms


def spatial_preprocessing(trainer: dict, keys: list[str], label_map: dict[int, int] | None = None) -> list[dict]:
    """Load, remap label values, RAS, resample to ``pixdim``, window ``intensity_range`` to 0..1, optionally crop to
    the body.

    MONAI bundle config (see hcls.transform_config) over ``keys``: ``["image", "label"]`` for validation
    (labels resampled with nearest neighbours), ``["image"]`` for the bundle's inference. ``label_map`` (source
    label value -> job class) is applied with ``MapLabelValued`` unless it is the identity. A directory image
    (a DICOM series) is read by LoadImage's default DICOM reader (ITKReader).
    """
    a_min, a_max = trainer["intensity_range"]
    modes = ["bilinear", "nearest"][: len(keys)]
    transforms = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
    ]
    if "label" in keys and label_map and any(source != cls for source, cls in label_map.items()):
        values = sorted(label_map)
        transforms.append({"_target_": "MapLabelValued", "keys": "label", "orig_labels": values,
                           "target_labels": [label_map[v] for v in values]})  # fmt: skip
    transforms += [
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS", "labels": None},  # None: the MetaTensor's (RAS)
        {"_target_": "Spacingd", "keys": keys, "pixdim": trainer["pixdim"], "mode": modes},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": a_min, "a_max": a_max, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
    ]  # fmt: skip
    if trainer.get("crop_foreground", OPTIONAL_DEFAULTS["crop_foreground"]):  # voxels above a_min
        transforms.append({"_target_": "CropForegroundd", "keys": keys, "source_key": "image", "allow_smaller": True})
    return transforms


def inference_preprocessing(trainer: dict) -> list[dict]:
    """What validation does to an image, for the bundle's inference."""
    return spatial_preprocessing(trainer, ["image"])


def deterministic_transforms(trainer: dict, label_map: dict[int, int] | None = None) -> list:
    """The validation pre-processing of image and label (values through ``label_map``), as tensors without meta
    data (cached)."""
    keys = ["image", "label"]
    typed = EnsureTyped(keys=keys, dtype=(torch.float32, torch.uint8), track_meta=False)
    return [*transform_config.instantiate(spatial_preprocessing(trainer, keys, label_map)), typed]


def random_transforms(trainer: dict) -> list:
    """``num_samples`` crops of ``roi_size`` per volume (foreground:background = ``pos_neg_ratio``), intensity shift."""
    pos, neg = trainer["pos_neg_ratio"]
    return [
        RandCropByPosNegLabeld(
            keys=["image", "label"], label_key="label", spatial_size=trainer["roi_size"], pos=pos, neg=neg,
            num_samples=trainer["num_samples"], image_key="image", image_threshold=0.0,
        ),
        RandShiftIntensityd(keys="image", offsets=0.02, prob=0.5),
    ]  # fmt: skip


def train_transforms(trainer: dict, label_map: dict[int, int] | None = None) -> Compose:
    """Deterministic pre-processing, padding to at least ``roi_size``, then the random crops."""
    pad = SpatialPadd(keys=["image", "label"], spatial_size=trainer["roi_size"])
    return Compose([*deterministic_transforms(trainer, label_map), pad, *random_transforms(trainer)])


def val_transforms(trainer: dict, label_map: dict[int, int] | None = None) -> Compose:
    """Deterministic pre-processing only: validation sees whole volumes."""
    return Compose(deterministic_transforms(trainer, label_map))


def make_loader(records: list[dict], trainer: dict, train: bool, label_map: dict[int, int] | None = None):
    """A DataLoader over a CacheDataset (deterministic transforms cached, ``trainer.cache_rate``); label values
    through ``label_map`` (source value -> job class; None: already the job's).

    Training batches hold ``batch_size * num_samples`` crops; validation batches one whole volume.
    """
    transform = train_transforms(trainer, label_map) if train else val_transforms(trainer, label_map)
    cache_rate = trainer.get("cache_rate", OPTIONAL_DEFAULTS["cache_rate"])
    workers = trainer["num_workers"]
    dataset = CacheDataset(records, transform, cache_rate=cache_rate, num_workers=workers or None, progress=False)
    batch_size = trainer["batch_size"] if train else 1
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers)


# ---------------------------------------------------------------- loss and metric


def build_loss(trainer: dict, config_path: Path) -> torch.nn.Module:
    """The loss named by ``trainer.loss``, looked up in ``monai.losses``.

    A class ``weight`` list in its args (JSON) becomes a tensor and needs one value per
    class, background first (``len(labels) + 1``).
    """
    spec = trainer["loss"]
    factory = getattr(monai.losses, str(spec.get("name")), None)
    if not isinstance(factory, type):
        raise ValueError(f"{config_path}: trainer.loss.name = {spec.get('name')!r} is not a class in monai.losses")
    args = dict(spec.get("args", {}))
    if isinstance(args.get("weight"), list):
        n_classes = len(trainer["labels"]) + 1
        if len(args["weight"]) != n_classes:
            raise ValueError(
                f"{config_path}: trainer.loss.args.weight has {len(args['weight'])} values, "
                f"needs {n_classes} (background + trainer.labels)"
            )
        args["weight"] = torch.tensor(args["weight"], dtype=torch.float32)
    return factory(**args)


def new_dice_metric() -> DiceMetric:
    """Per-organ Dice accumulator: background excluded, empty ground truth ignored (NaN, not counted)."""
    return DiceMetric(include_background=False, reduction="mean_batch", get_not_nans=True, ignore_empty=True)


def post_transforms(n_classes: int) -> tuple[AsDiscrete, AsDiscrete]:
    """(prediction, label) post-processing to one-hot: argmax of the logits, one-hot of the label map."""
    return AsDiscrete(argmax=True, to_onehot=n_classes), AsDiscrete(to_onehot=n_classes)


def score_batch(metric: DiceMetric, logits: torch.Tensor, label: torch.Tensor, n_classes: int) -> None:
    """Add a batch to ``metric``: logits (B, n_classes, ...) against label maps (B, 1, ...)."""
    post_pred, post_label = post_transforms(n_classes)
    preds = [post_pred(x) for x in decollate_batch(logits)]
    targets = [post_label(y) for y in decollate_batch(label)]
    metric(y_pred=preds, y=targets)


def dice_metrics(metric: DiceMetric, labels: list[str], key_metric: str) -> dict:
    """``{key_metric: mean Dice, "val_dice_<organ>": ...}`` from the accumulated ``metric`` (see the module docstring)."""
    per_organ, counted = metric.aggregate()  # mean over volumes with the organ, and how many had it
    per_organ = torch.where(counted > 0, per_organ, torch.full_like(per_organ, math.nan))
    if per_organ.numel() != len(labels):
        raise ValueError(f"Dice has {per_organ.numel()} organ channels, trainer.labels has {len(labels)}")
    organs = {f"val_dice_{name}": float(d) for name, d in zip(labels, per_organ) if not math.isnan(float(d))}
    mean = float(np.mean(list(organs.values()))) if organs else math.nan
    return {key_metric: mean, **organs}


# ---------------------------------------------------------------- train / evaluate


def make_inferer(trainer: dict) -> SlidingWindowInferer:
    """Sliding-window inference over ``roi_size`` windows with ``trainer.sliding_window`` arguments."""
    return SlidingWindowInferer(roi_size=trainer["roi_size"], **trainer["sliding_window"])


def evaluate(model, loader: DataLoader, inferer, labels: list[str], device: torch.device, key_metric: str) -> dict:
    """Dice metrics of ``model`` on the whole validation volumes of ``loader``."""
    model.eval()
    metric = new_dice_metric()
    with torch.no_grad():
        for batch in loader:
            logits = inferer(batch["image"].to(device), model)
            score_batch(metric, logits, batch["label"].to(device), len(labels) + 1)
    return dice_metrics(metric, labels, key_metric)


# ---------------------------------------------------------------- the trainer


def load_settings(job: JobConfig) -> dict:
    """The job's trainer settings, with the ones this trainer depends on checked against the network."""
    trainer = job.trainer(REQUIRED_KEYS)
    net_args = job.network["args"]
    n_classes = len(trainer["labels"]) + 1
    if net_args.get("out_channels") != n_classes:
        raise ValueError(
            f"{job.server_path}: the network's out_channels ({net_args.get('out_channels')}) must be "
            f"len(trainer.labels) + 1 = {n_classes} (background + organs of {job.client_path})"
        )
    if not isinstance(net_args.get("blocks_down"), list):
        raise ValueError(f"{job.server_path}: the network's blocks_down must be a list (SegResNet's stages)")
    divisor = 2 ** (len(net_args["blocks_down"]) - 1)  # SegResNet downsamplings
    roi = trainer["roi_size"]
    if len(roi) != 3 or any(int(s) != s or s <= 0 or s % divisor for s in roi):
        raise ValueError(f"{job.client_path}: trainer.roi_size {roi} must be 3 positive multiples of {divisor}")
    if len(trainer["pixdim"]) != 3 or len(trainer["intensity_range"]) != 2 or len(trainer["pos_neg_ratio"]) != 2:
        raise ValueError(f"{job.client_path}: trainer.pixdim needs 3 values, intensity_range and pos_neg_ratio 2")
    check_label_remap(trainer.get("label_remap", OPTIONAL_DEFAULTS["label_remap"]), trainer["labels"], job.client_path)
    return trainer


def site_data(job: JobConfig, site: SiteConfig, trainer: dict) -> tuple[SiteData, Path, str]:
    """Every entry of the site's dataset checked (problems collected), its folder and how its layout was chosen."""
    data_dir = site.dataset_dir(JOB_NAME)
    layout, layout_from = site_layout(site, data_dir)
    fraction = msd_split(site) if layout == "msd" else None
    return read_site_data(trainer, data_dir, layout, fraction, job.client_path), data_dir, layout_from


def check_data(job: JobConfig, site: SiteConfig) -> dict:
    """What the site's CT data gives the job, without training: layout, volumes per split, per organ the volumes
    containing it, what each source label becomes and every problem (file relative to the dataset folder's
    parent, entry, field). No path beyond the dataset folder."""
    summary = {"job": JOB_NAME, "ok": False, "dataset": None, "layout": None, "layout_from": None, "errors": []}
    try:
        trainer = load_settings(job)
        summary["dataset"] = site.dataset_dir(JOB_NAME).name
        data, data_dir, summary["layout_from"] = site_data(job, site, trainer)
        summary["layout"] = data.layout
    except ValueError as err:
        summary["errors"].append({"file": None, "row": None, "column": None, "error": data_check.site_message(err, site)})
        return summary
    base, splits = data_dir.parent, {"training": data.train, "validation": data.val}
    if data.validation_fraction is not None:
        summary["msd_split"] = {"validation_fraction": data.validation_fraction}
    summary["splits"] = {
        name: {"file": Path(split.file).relative_to(base).as_posix(), "images": len(split.records),
               "dicom_series": sum(Path(record["image"]).is_dir() for record in split.records)}
        for name, split in splits.items()
    }  # fmt: skip
    summary["organs"] = {
        organ: {name: sum(cls in classes for classes in split.classes) for name, split in splits.items()}
        for cls, organ in enumerate(trainer["labels"], start=1)
    }
    summary["source_labels"] = data.source_labels
    errors = [problem.summary(base) for problem in data.problems]
    summary["ok"] = not errors
    summary["errors"] = summary.pop("errors") + errors  # last
    return summary


def add_residuals_out_of_place(model: torch.nn.Module) -> None:
    """Give every MONAI ``ResBlock`` of ``model`` a forward that adds its residual out of place. MONAI's adds it in
    place onto ``conv2``'s output, which the backward hooks of DP-SGD's per-sample gradients (Opacus) forbid.
    Same computation, same weights and ``state_dict``."""

    def forward(block, x):
        return block.conv2(block.act(block.norm2(block.conv1(block.act(block.norm1(x)))))) + x

    for module in model.modules():
        if isinstance(module, ResBlock):
            module.forward = types.MethodType(forward, module)


def build(job: JobConfig, site: SiteConfig, device: torch.device) -> Trainer:
    trainer = load_settings(job)
    labels = trainer["labels"]
    data = usable(site_data(job, site, trainer)[0], trainer)
    train_records, val_records = data.train.records, data.val.records
    unmapped = [name for name, becomes in data.source_labels.items() if becomes == UNMAPPED]
    print(f"{JOB_NAME}: {data.layout} layout" + (f"; made background: {', '.join(unmapped)}" if unmapped else ""))
    train_loader = make_loader(train_records, trainer, train=True, label_map=data.label_map)
    val_loader = make_loader(val_records, trainer, train=False, label_map=data.label_map)
    inferer = make_inferer(trainer)

    model = job.build_network().to(device)
    trained = train_only(model, trainer, job.client_path)
    optimizer = build_optimizer(trainer, job.client_path, trained)
    loss_fn = build_loss(trainer, job.client_path).to(device)
    dp_accounting = None
    if site.dp_policy:
        require_one_sample_per_record(trainer, "num_samples", "crop", job.client_path, site.path)
        add_residuals_out_of_place(model)
        epochs = job.num_rounds * trainer["local_epochs"]
        optimizer, train_loader, dp_accounting = make_private(model, optimizer, train_loader, site.dp_policy, epochs)

    def batch_loss(batch):
        logits = model(batch["image"].to(device))
        if logits.shape[0] == 0:  # DP-SGD's Poisson sampling drew no volume: no loss, no step
            return logits.sum()
        return loss_fn(logits, batch["label"].to(device))

    return Trainer(
        model=model,
        train=lambda: train_epochs(model, train_loader, optimizer, batch_loss, trainer["local_epochs"]),
        evaluate=lambda: evaluate(model, val_loader, inferer, labels, device, job.key_metric),
        n_train=len(train_records),
        dp_accounting=dp_accounting,
    )


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(data_check.main(JOB_NAME, check_data, sys.argv[1:]))
    client_loop.main(JOB_NAME, build)
