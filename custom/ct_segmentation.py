"""NVFlare Client API trainer for the ``ct_segmentation`` job: 3D multi-organ CT segmentation.

Run by NVFlare's ClientAPIExecutor from the job's app directory on a site::

    python3 -u custom/ct_segmentation.py --config config/config_fed_client.json

Hyper-parameters, the network and the key metric come from the job (``hcls.job_config.JobConfig``);
the data directory from the site config (``$HCLS_SITE_CONFIG``, key ``datasets.ct_segmentation``).

Data: MONAI decathlon layout. The data directory holds ``train_data.json`` and
``val_data.json``, each ``{"training": [{"image": ..., "label": ...}, ...]}`` with paths
relative to that directory, pointing to NIfTI (``.nii``/``.nii.gz``) CT volumes and label
maps (0 = background, ``i`` = ``trainer.labels[i - 1]``). Both lists are checked whole,
before training: a missing, malformed or empty list, an entry naming a missing or
non-NIfTI file, a label whose shape differs from its image's, or label values that are
not integers in ``0..len(labels)`` is a ValueError naming the list file, the entry
(``training[i]``, 0-based) and the file.

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
these defaults when absent: ``crop_foreground`` (true) and ``cache_rate`` (1.0: the
pre-processed volumes are cached in memory; lower it for large datasets).
"""

import math
from pathlib import Path

import monai.losses
import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, decollate_batch
from monai.inferers import SlidingWindowInferer
from monai.metrics import DiceMetric
from monai.transforms import AsDiscrete, Compose, EnsureTyped, RandCropByPosNegLabeld, RandShiftIntensityd, SpatialPadd

from hcls import client_loop, transform_config
from hcls.components import build_optimizer
from hcls.job_config import JobConfig
from hcls.json_files import read_json
from hcls.site_config import SiteConfig
from hcls.training import Trainer, train_epochs

JOB_NAME = "ct_segmentation"
TRAIN_LIST, VAL_LIST = "train_data.json", "val_data.json"
REQUIRED_KEYS = (
    "labels", "pixdim", "intensity_range", "roi_size", "num_samples", "pos_neg_ratio", "optimizer", "loss",
    "sliding_window", "local_epochs", "batch_size", "num_workers", "max_train_samples", "max_val_samples", "seed",
)  # fmt: skip
OPTIONAL_DEFAULTS = {"crop_foreground": True, "cache_rate": 1.0}  # read with these defaults when absent
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_REPORTED_ERRORS = 20


# ---------------------------------------------------------------- data lists


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


def check_label_values(label: nib.Nifti1Image, path: Path, n_labels: int) -> None:
    """ValueError unless every voxel of ``label`` is an integer in ``0..n_labels``."""
    try:
        values = np.unique(np.asanyarray(label.dataobj))
    except Exception as err:  # truncated or corrupt data
        raise ValueError(f"label file {path}: cannot read its data: {err}") from err
    bad = values[(values != np.round(values)) | (values < 0) | (values > n_labels) | ~np.isfinite(values)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise ValueError(f"label file {path}: values {shown} are not integers in 0..{n_labels}")


def check_entry(data_dir: Path, entry, n_labels: int) -> dict:
    """One dataset record (absolute image and label paths) from a list entry; ValueError if it is bad."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object with 'image' and 'label', got {entry!r}")
    paths = {}
    for key in ("image", "label"):
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"field {key!r} is missing or not a file path")
        paths[key] = data_dir / value
    try:
        image = check_nifti(paths["image"])
    except ValueError as err:
        raise ValueError(f"'image': {err}") from None
    try:
        label = check_nifti(paths["label"])
    except ValueError as err:
        raise ValueError(f"'label': {err}") from None
    image_shape, label_shape = tuple(image.shape), tuple(label.shape)
    if label_shape != image_shape:
        raise ValueError(
            f"'label': label file {paths['label']} has shape {label_shape}, "
            f"its image {paths['image']} has shape {image_shape}"
        )
    try:
        check_label_values(label, paths["label"], n_labels)
    except ValueError as err:
        raise ValueError(f"'label': {err}") from None
    return {"image": str(paths["image"]), "label": str(paths["label"])}


def read_datalist(list_path: Path, n_labels: int, max_samples: int = 0) -> list[dict]:
    """Check the whole decathlon list ``list_path``, then return its first ``max_samples`` records (0 = all)."""
    entries = read_json(list_path).get("training")
    if not isinstance(entries, list):
        raise ValueError(f"{list_path}: no 'training' list of {{image, label}} entries")
    if not entries:
        raise ValueError(f"{list_path}: the 'training' list is empty, the dataset is empty")
    records, errors = [], []
    for i, entry in enumerate(entries):
        try:
            records.append(check_entry(list_path.parent, entry, n_labels))
        except ValueError as err:
            errors.append(f"{list_path}, entry training[{i}], {err}")
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise ValueError("\n".join(errors[:MAX_REPORTED_ERRORS]) + more)
    return records[:max_samples] if max_samples > 0 else records


# ---------------------------------------------------------------- transforms


def spatial_preprocessing(trainer: dict, keys: list[str]) -> list[dict]:
    """Load, RAS, resample to ``pixdim``, window ``intensity_range`` to 0..1, optionally crop to the body.

    MONAI bundle config (see hcls.transform_config) over ``keys``: ``["image", "label"]`` for validation
    (labels resampled with nearest neighbours), ``["image"]`` for the bundle's inference.
    """
    a_min, a_max = trainer["intensity_range"]
    modes = ["bilinear", "nearest"][: len(keys)]
    transforms = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
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


def deterministic_transforms(trainer: dict) -> list:
    """The validation pre-processing of image and label, as tensors without meta data (cached)."""
    keys = ["image", "label"]
    typed = EnsureTyped(keys=keys, dtype=(torch.float32, torch.uint8), track_meta=False)
    return [*transform_config.instantiate(spatial_preprocessing(trainer, keys)), typed]


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


def train_transforms(trainer: dict) -> Compose:
    """Deterministic pre-processing, padding to at least ``roi_size``, then the random crops."""
    pad = SpatialPadd(keys=["image", "label"], spatial_size=trainer["roi_size"])
    return Compose([*deterministic_transforms(trainer), pad, *random_transforms(trainer)])


def val_transforms(trainer: dict) -> Compose:
    """Deterministic pre-processing only: validation sees whole volumes."""
    return Compose(deterministic_transforms(trainer))


def make_loader(records: list[dict], trainer: dict, train: bool) -> DataLoader:
    """A DataLoader over a CacheDataset (deterministic transforms cached, ``trainer.cache_rate``).

    Training batches hold ``batch_size * num_samples`` crops; validation batches one whole volume.
    """
    transform = train_transforms(trainer) if train else val_transforms(trainer)
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
    return trainer


def load_data(trainer: dict, data_dir: Path) -> tuple[list[dict], list[dict]]:
    """Validated train and val records from ``data_dir`` (both lists checked whole before any training)."""
    n_labels = len(trainer["labels"])
    train_records = read_datalist(data_dir / TRAIN_LIST, n_labels, trainer["max_train_samples"])
    val_records = read_datalist(data_dir / VAL_LIST, n_labels, trainer["max_val_samples"])
    return train_records, val_records


def build(job: JobConfig, site: SiteConfig, device: torch.device) -> Trainer:
    trainer = load_settings(job)
    labels = trainer["labels"]
    train_records, val_records = load_data(trainer, site.dataset_dir(JOB_NAME))
    train_loader = make_loader(train_records, trainer, train=True)
    val_loader = make_loader(val_records, trainer, train=False)
    inferer = make_inferer(trainer)

    model = job.build_network().to(device)
    optimizer = build_optimizer(trainer, job.client_path, model.parameters())
    loss_fn = build_loss(trainer, job.client_path).to(device)

    def batch_loss(batch):
        return loss_fn(model(batch["image"].to(device)), batch["label"].to(device))

    return Trainer(
        model=model,
        train=lambda: train_epochs(model, train_loader, optimizer, batch_loss, trainer["local_epochs"]),
        evaluate=lambda: evaluate(model, val_loader, inferer, labels, device, job.key_metric),
        n_train=len(train_records),
    )


if __name__ == "__main__":
    client_loop.main(JOB_NAME, build)
