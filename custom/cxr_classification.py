"""NVFlare Client API trainer for the ``cxr_classification`` job: multi-label chest X-ray classification.

Run by NVFlare's ClientAPIExecutor from the job's app directory on a site::

    python3 -u custom/cxr_classification.py --config config/config_fed_client.json

Hyper-parameters, the network and the key metric come from the job (``hcls.job_config.JobConfig``);
the data directory from the site config (``$HCLS_SITE_CONFIG``, key ``datasets.cxr_classification``).
It holds CheXpert-format ``train.csv`` and ``val.csv`` whose ``Path`` column is relative to that directory.

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
job; it needs a network without batch normalisation or in-place activations (``profiles/dp.json``).

Key metric (``val_auc`` in the job config): ROC AUC per label, averaged over the labels that have both
classes among their (unmasked) validation rows.
"""

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.metrics import compute_roc_auc
from monai.transforms import Compose, RandAffined

from hcls import client_loop, transform_config
from hcls.components import build_by_name, build_optimizer
from hcls.dp_sgd import make_private
from hcls.job_config import JobConfig
from hcls.site_config import SiteConfig
from hcls.training import Trainer, train_epochs

JOB_NAME = "cxr_classification"
POLICIES = {"ones": 1.0, "zeros": 0.0, "ignore": None}  # value given to an uncertain (-1) label; None = masked
REQUIRED_KEYS = (
    "labels", "uncertain_label_policy", "image_size", "optimizer", "loss", "local_epochs", "batch_size",
    "num_workers", "max_train_samples", "max_val_samples", "seed",
)  # fmt: skip
MAX_REPORTED_ERRORS = 20


# ---------------------------------------------------------------- CSV reading


def parse_cell(value: str) -> float | None:
    """A CheXpert label cell as 1.0, 0.0 or -1.0; None for blank; ValueError for anything else."""
    if value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if number not in (1.0, 0.0, -1.0):
        raise ValueError(f"value {value!r} is not one of 1.0, 0.0, -1.0 or blank")
    return number


def encode_labels(cells: list[float | None], policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Targets and loss mask (1 = used) for one row's parsed cells under ``policy``."""
    uncertain_value = POLICIES[policy]
    label, mask = [], []
    for cell in cells:
        if cell == -1.0:
            label.append(uncertain_value or 0.0)
            mask.append(0.0 if uncertain_value is None else 1.0)
        else:
            label.append(cell or 0.0)  # blank -> negative
            mask.append(1.0)
    return np.array(label, dtype=np.float32), np.array(mask, dtype=np.float32)


def check_header(csv_path: Path, fieldnames: list[str] | None, labels: list[str]) -> None:
    """ValueError if the CSV lacks the ``Path`` column or a configured label column."""
    missing = [column for column in ["Path", *labels] if column not in (fieldnames or [])]
    if missing:
        raise ValueError(f"{csv_path}, row 1 (header): missing column(s) {', '.join(repr(c) for c in missing)}")


def read_row(csv_path: Path, row: dict, labels: list[str], policy: str) -> dict:
    """One dataset record (image path, label, mask) from a CSV row; ValueError on a bad cell or image."""
    if not row["Path"]:
        raise ValueError("column 'Path': empty")
    image = csv_path.parent / row["Path"]
    if not image.is_file():
        raise ValueError(f"column 'Path': image file {image} does not exist")
    cells = []
    for column in labels:
        try:
            cells.append(parse_cell(row[column] or ""))
        except ValueError as err:
            raise ValueError(f"column {column!r}: {err}") from err
    label, mask = encode_labels(cells, policy)
    return {"image": str(image), "label": label, "mask": mask}


def read_label_csv(csv_path: Path, labels: list[str], policy: str, max_samples: int = 0) -> list[dict]:
    """Validate the whole CSV, then return its first ``max_samples`` records (0 = all).

    Only the ``Path`` and ``labels`` columns are taken from each row; the others are dropped as the row is read.
    """
    if not csv_path.is_file():
        raise ValueError(f"{csv_path}: CSV file not found")
    records, errors = [], []
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        check_header(csv_path, header, labels)
        columns = {name: header.index(name) for name in ["Path", *labels]}
        for cells in reader:
            if not cells:
                continue
            row = {name: cells[i] if i < len(cells) else "" for name, i in columns.items()}
            try:
                records.append(read_row(csv_path, row, labels, policy))
            except ValueError as err:
                errors.append(f"{csv_path}, row {reader.line_num}, {err}")
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise ValueError("\n".join(errors[:MAX_REPORTED_ERRORS]) + more)
    if not records:
        raise ValueError(f"{csv_path}: no data rows, the dataset is empty")
    return records[:max_samples] if max_samples > 0 else records


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
    return trainer


def load_data(trainer: dict, data_dir: Path, blocked_fields=(), site_config="the site config") -> tuple[list, list]:
    """Validated train and val records from ``data_dir``; a label among the site's ``blocked_fields`` is refused."""
    labels, policy = trainer["labels"], trainer["uncertain_label_policy"]
    blocked = [label for label in labels if label in blocked_fields]
    if blocked:
        raise ValueError(
            f"trainer.labels names {', '.join(blocked)}, blocked by this site "
            f"({site_config}: privacy.blocked_data_fields): never loaded"
        )
    train_records = read_label_csv(data_dir / "train.csv", labels, policy, trainer["max_train_samples"])
    val_records = read_label_csv(data_dir / "val.csv", labels, policy, trainer["max_val_samples"])
    return train_records, val_records


def build(job: JobConfig, site: SiteConfig, device: torch.device) -> Trainer:
    trainer = load_settings(job)
    train_records, val_records = load_data(trainer, site.dataset_dir(JOB_NAME), site.blocked_fields, site.path)
    train_loader = make_loader(train_records, trainer, train=True)
    val_loader = make_loader(val_records, trainer, train=False)

    model = job.build_network().to(device)
    optimizer = build_optimizer(trainer, job.client_path, model.parameters())
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
    client_loop.main(JOB_NAME, build)
