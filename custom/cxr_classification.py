"""NVFlare Client API trainer for the ``cxr_classification`` job: multi-label chest X-ray classification.

Run by NVFlare's ClientAPIExecutor from the job's app directory on a site::

    python3 -u custom/cxr_classification.py --config config/config_fed_client.json

Hyper-parameters, the network and the key metric come from the job (``hcls.job_config.JobConfig``);
the data directory from the site config (``$HCLS_SITE_CONFIG``, key ``datasets.cxr_classification``).
Its layout (``cxr_layouts``) is the project's own (``train.csv`` and ``val.csv`` whose ``Path`` column is relative
to that directory and which carry every output label), CheXpert v1.0 as distributed, or NIH ChestX-ray14: detected
from the files or named by the site (``dataset_layouts.cxr_classification``). ``trainer.label_sources`` says which
CheXpert column / NIH finding feeds which output label; an output the site's layout does not feed is masked out of
that site's loss and AUC. A patient with both training and validation rows stops the site.

Check a site's data without training (no server, no NVFlare)::

    HCLS_SITE_CONFIG=local/site_config.json python3 custom/cxr_classification.py --check --config CONFIG

Label policy (CheXpert cell values):

* ``1.0`` -> 1 (positive), ``0.0`` -> 0 (negative);
* blank (not mentioned in the report) -> 0 (negative);
* ``-1.0`` (uncertain) -> per ``trainer.uncertain_label_policy``:
  ``"ones"`` (U-Ones, the default) -> 1, ``"zeros"`` (U-Zeros) -> 0,
  ``"ignore"`` -> masked out of the loss and out of that label's AUC.

Any other value, a missing CSV, ``Path`` or label column, or a missing image file
is a ValueError naming the CSV, the row (the file's line number, the header being
row 1) and the column, raised for the whole CSV before training starts. Only the
``Path`` and label columns are kept from each row (any other column, patient identifiers included,
never reaches a record), and a label that the site lists in ``privacy.blocked_data_fields`` is refused.

Differential privacy, when the site config requires it (``privacy.differential_privacy``), is
record-level DP-SGD with Opacus (``hcls.dp_sgd.make_private``) over all rounds and local epochs of the
job. Opacus trains no batch norm (it mixes a batch's samples) and no in-place activation: either the network
swaps them (``profiles/dp.json``: GroupNorm, trained from scratch) or it is fine-tuned from pre-trained weights with
its batch norms frozen (``profiles/dp_pretrained.json``: ``trainer.freeze_batch_norm``, ``trainer.trained_layers``,
``hcls.training.train_only``), the recipe that keeps the accuracy (README, row ``dp``).

Key metric (``val_auc`` in the job config): ROC AUC per label, averaged over the labels that have both
classes among their (unmasked) validation rows.
"""

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.metrics import compute_roc_auc
from monai.transforms import Compose, RandAffined

from cxr_layouts import (  # noqa: F401 (parse_cell, encode_labels: the cell policy, used by tests)
    POLICIES, Problem, check_label_sources, detect_layout, encode_labels, label_counts, parse_cell, raise_problems,
    read_project_csv, read_site_data,
)  # fmt: skip
from hcls import client_loop, data_check, transform_config
from hcls.components import build_by_name, build_optimizer
from hcls.dp_sgd import make_private
from hcls.job_config import JobConfig
from hcls.site_config import SiteConfig
from hcls.training import Trainer, train_epochs, train_only

JOB_NAME = "cxr_classification"
REQUIRED_KEYS = (
    "labels", "uncertain_label_policy", "image_size", "optimizer", "loss", "local_epochs", "batch_size",
    "num_workers", "max_train_samples", "max_val_samples", "seed",
)  # fmt: skip


# ---------------------------------------------------------------- CSV reading (the project layout)


def read_label_csv(csv_path: Path, labels: list[str], policy: str, max_samples: int = 0) -> list[dict]:
    """Validate the whole project-layout CSV, then return its first ``max_samples`` records (0 = all).

    Only the ``Path`` and ``labels`` columns are taken from each row; the others are dropped as the row is read.
    """
    problems: list[Problem] = []
    split = read_project_csv(csv_path, labels, policy, problems)
    raise_problems(problems)
    if not split.records:
        raise ValueError(f"{csv_path}: no data rows, the dataset is empty")
    return split.records[:max_samples] if max_samples > 0 else split.records


# ---------------------------------------------------------------- images


def inference_preprocessing(trainer: dict) -> list[dict]:
    """A JPEG/PNG as a 1-channel float image in 0..1 of ``image_size`` (MONAI bundle config; see hcls.transform_config)."""
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True,
         "reader": {"_target_": "PILReader", "converter": "$lambda image: image.convert('L')"}},  # any mode -> 8-bit gray
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
        {"_target_": "ScaleIntensityd", "keys": "image"},
        {"_target_": "Resized", "keys": "image", "spatial_size": trainer["image_size"]},
    ]  # fmt: skip


def image_transforms(trainer: dict, train: bool) -> Compose:
    """The validation pre-processing; training adds a mild random affine."""
    transforms = transform_config.instantiate(inference_preprocessing(trainer))
    if train:  # no flips: laterality matters in chest X-rays
        transforms.append(
            RandAffined(
                keys="image", prob=0.5, rotate_range=0.05, translate_range=[0.03 * s for s in trainer["image_size"]],
                scale_range=0.05, padding_mode="border",
            )
        )  # fmt: skip
    return Compose(transforms)


def make_loader(records: list[dict], trainer: dict, train: bool) -> DataLoader:
    """A MONAI DataLoader over ``records``; shuffled with augmentation for training."""
    dataset = Dataset(records, transform=image_transforms(trainer, train))
    return DataLoader(dataset, batch_size=trainer["batch_size"], shuffle=train, num_workers=trainer["num_workers"])


# ---------------------------------------------------------------- loss and metric


def masked_loss(loss_fn: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Batch mean of each sample's mean element-wise ``loss_fn`` (reduction="none") over its unmasked labels.

    Each sample's loss depends on that sample only, as DP-SGD's per-sample gradients require. An empty batch
    (DP-SGD's Poisson sampling can draw one) has loss 0, not nan.
    """
    per_sample = (loss_fn(logits, target) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return per_sample.sum() / max(per_sample.numel(), 1)


def mean_auc(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """ROC AUC per label on its unmasked rows, averaged over labels with both classes; nan if none."""
    aucs = []
    for j in range(target.shape[1]):
        rows = mask[:, j] > 0
        y = target[rows, j]
        if y.unique().numel() == 2:
            aucs.append(compute_roc_auc(scores[rows, j], y))
    if not aucs:
        warnings.warn("val_auc is nan: no label has both classes in the validation set", stacklevel=2)
        return math.nan
    return float(np.mean(aucs))


def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, key_metric: str) -> dict:
    """``{key_metric: mean AUC}`` of ``model`` on ``loader``."""
    model.eval()
    scores, targets, masks = [], [], []
    with torch.no_grad():
        for batch in loader:
            scores.append(torch.sigmoid(model(batch["image"].to(device))).cpu())
            targets.append(batch["label"])
            masks.append(batch["mask"])
    return {key_metric: mean_auc(torch.cat(scores), torch.cat(targets), torch.cat(masks))}


# ---------------------------------------------------------------- the trainer


def load_settings(job: JobConfig) -> dict:
    """The job's trainer settings, with the ones this trainer depends on checked."""
    trainer = job.trainer(REQUIRED_KEYS)
    if trainer["uncertain_label_policy"] not in POLICIES:
        raise ValueError(
            f"{job.client_path}: trainer.uncertain_label_policy {trainer['uncertain_label_policy']!r} "
            f"is not one of {', '.join(POLICIES)}"
        )
    out_channels = job.network["args"].get("out_channels")
    if out_channels != len(trainer["labels"]):
        raise ValueError(
            f"{job.server_path}: the network's out_channels ({out_channels}) must be "
            f"len(trainer.labels) = {len(trainer['labels'])} ({job.client_path})"
        )
    check_label_sources(trainer.get("label_sources"), trainer["labels"], job.client_path)
    return trainer


def site_layout(site: SiteConfig, data_dir: Path) -> tuple[str, str]:
    """The layout of the site's CXR dataset and how it was chosen ("site config" or "detected")."""
    named = (site.data.get("dataset_layouts") or {}).get(JOB_NAME)
    return detect_layout(data_dir, named, site.path), "site config" if named else "detected"


def read_data(trainer: dict, data_dir: Path, blocked_fields=(), site_config="the site config", layout=None):
    """Every row of the site's dataset (``cxr_layouts.SiteData``, problems collected); a label or mapped source
    column among the site's ``blocked_fields`` is refused."""
    labels, policy = trainer["labels"], trainer["uncertain_label_policy"]
    layout = layout or detect_layout(data_dir, None, site_config)
    label_sources = trainer.get("label_sources") or {}
    sources = list(label_sources.get(layout, {})) if layout != "project" else []
    blocked = [name for name in [*labels, *sources] if name in blocked_fields]
    if blocked:
        raise ValueError(
            f"trainer.labels names {', '.join(blocked)}, blocked by this site "
            f"({site_config}: privacy.blocked_data_fields): never loaded"
        )
    return read_site_data(data_dir, layout, labels, label_sources, policy, trainer.get("include_lateral", False))


def load_data(trainer: dict, data_dir: Path, blocked_fields=(), site_config="the site config", layout=None):
    """Validated train and val records from ``data_dir`` (its layout detected unless named); ValueError naming
    file, row and column for every problem; then the first ``max_train_samples``/``max_val_samples`` (0 = all)."""
    data = read_data(trainer, data_dir, blocked_fields, site_config, layout)
    raise_problems(data.problems)
    train, val = data.train.records, data.val.records
    n_train, n_val = trainer["max_train_samples"], trainer["max_val_samples"]
    return (train[:n_train] if n_train > 0 else train), (val[:n_val] if n_val > 0 else val)


def check_data(job: JobConfig, site: SiteConfig) -> dict:
    """What the site's CXR data gives the job, without training: layout, images, patients, per output label the
    positives, negatives and masked rows of each split, the masked labels and every problem (file relative to the
    dataset folder's parent, row, column). No patient identifier, image name or path beyond the dataset folder."""
    summary = {"job": JOB_NAME, "ok": False, "dataset": None, "layout": None, "layout_from": None, "errors": []}
    try:
        trainer = load_settings(job)
        data_dir = site.dataset_dir(JOB_NAME)
        summary["dataset"] = data_dir.name
        layout, summary["layout_from"] = site_layout(site, data_dir)
        summary["layout"] = layout
        data = read_data(trainer, data_dir, site.blocked_fields, site.path, layout)
    except ValueError as err:
        summary["errors"].append({"file": None, "row": None, "column": None, "error": data_check.site_message(err, site)})
        return summary
    labels, base = trainer["labels"], data_dir.parent
    splits = {}
    for name, split in (("training", data.train), ("validation", data.val)):
        splits[name] = {"file": Path(split.file).relative_to(base).as_posix(), "images": len(split.records),
                        "patients": len({p for p in split.patients if p is not None})}  # fmt: skip
        if layout == "chexpert":
            splits[name]["laterals_skipped"] = split.laterals_skipped
    train_counts, val_counts = label_counts(data.train.records, labels), label_counts(data.val.records, labels)
    errors = [problem.summary(base) for problem in data.problems]
    summary.update(ok=not errors, splits=splits)
    summary["masked_labels"] = [label for label, source in zip(labels, data.sources, strict=True) if source is None]
    summary["labels"] = {label: {"source": source, "training": train_counts[label], "validation": val_counts[label]}
                         for label, source in zip(labels, data.sources, strict=True)}  # fmt: skip
    summary["errors"] = summary.pop("errors") + errors  # last
    return summary


def build(job: JobConfig, site: SiteConfig, device: torch.device) -> Trainer:
    trainer = load_settings(job)
    data_dir = site.dataset_dir(JOB_NAME)
    layout, _ = site_layout(site, data_dir)
    train_records, val_records = load_data(trainer, data_dir, site.blocked_fields, site.path, layout)
    supervised = np.stack([record["mask"] for record in train_records]).any(axis=0)
    masked = [label for label, used in zip(trainer["labels"], supervised, strict=True) if not used]
    print(f"{JOB_NAME}: {layout} layout; {len(masked)} of {len(trainer['labels'])} outputs never supervised here"
          + (f" ({', '.join(masked)})" if masked else ""))  # fmt: skip
    train_loader = make_loader(train_records, trainer, train=True)
    val_loader = make_loader(val_records, trainer, train=False)

    model = job.build_network().to(device)
    trained = train_only(model, trainer, job.client_path)
    optimizer = build_optimizer(trainer, job.client_path, trained)
    loss_fn = build_by_name(torch.nn, trainer["loss"], job.client_path, "loss", reduction="none")
    dp_accounting = None
    if site.dp_policy:
        epochs = job.num_rounds * trainer["local_epochs"]
        optimizer, train_loader, dp_accounting = make_private(model, optimizer, train_loader, site.dp_policy, epochs)

    def batch_loss(batch):
        logits = model(batch["image"].to(device))
        return masked_loss(loss_fn, logits, batch["label"].to(device), batch["mask"].to(device))

    return Trainer(
        model=model,
        train=lambda: train_epochs(model, train_loader, optimizer, batch_loss, trainer["local_epochs"]),
        evaluate=lambda: evaluate(model, val_loader, device, job.key_metric),
        n_train=len(train_records),
        dp_accounting=dp_accounting,
    )


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(data_check.main(JOB_NAME, check_data, sys.argv[1:]))
    client_loop.main(JOB_NAME, build)
