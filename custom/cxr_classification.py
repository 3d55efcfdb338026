"""NVFlare Client API trainer for the ``cxr_classification`` job: multi-label chest X-ray classification.

Run by NVFlare's ClientAPIExecutor from the job's app directory on a site::

    python3 -u custom/cxr_classification.py --config config/config_fed_client.json

Hyper-parameters come from the ``"trainer"`` object of ``--config``; the network
(the server persistor's model) and the key metric come from the job's server config
next to it (the app is deployed to all participants); the data
directory comes from the site config (``$HCLS_SITE_CONFIG``, key
``datasets.cxr_classification``). It holds CheXpert-format ``train.csv`` and
``val.csv`` whose ``Path`` column is relative to that directory.

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
record-level DP-SGD with Opacus (``hcls_common.make_private``) over all rounds and local epochs of the
job; it needs a network without batch normalisation or in-place activations (``profiles/dp.json``).

Key metric ``val_auc``: ROC AUC per label, averaged over the labels that have both
classes among their (unmasked) validation rows.
"""

import argparse
import csv
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, PILReader
from monai.metrics import compute_roc_auc
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandAffined, Resized, ScaleIntensityd

import hcls_common

JOB_NAME = "cxr_classification"
KEY_METRIC = "val_auc"
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


def to_grayscale(image):
    """PIL converter: any JPEG mode to 8-bit grayscale."""
    return image.convert("L")


def image_transforms(image_size: list[int], train: bool) -> Compose:
    """Load a JPEG as a 1-channel float image in 0..1 of ``image_size``; mild random affine on train."""
    transforms = [
        LoadImaged(keys="image", reader=PILReader(converter=to_grayscale), image_only=True),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        ScaleIntensityd(keys="image"),
        Resized(keys="image", spatial_size=image_size),
    ]
    if train:  # no flips: laterality matters in chest X-rays
        transforms.append(
            RandAffined(
                keys="image", prob=0.5, rotate_range=0.05, translate_range=[0.03 * s for s in image_size],
                scale_range=0.05, padding_mode="border",
            )
        )  # fmt: skip
    return Compose(transforms)


def make_loader(records: list[dict], trainer: dict, train: bool) -> DataLoader:
    """A MONAI DataLoader over ``records``; shuffled with augmentation for training."""
    dataset = Dataset(records, transform=image_transforms(trainer["image_size"], train))
    return DataLoader(dataset, batch_size=trainer["batch_size"], shuffle=train, num_workers=trainer["num_workers"])


# ---------------------------------------------------------------- loss and metric


def masked_loss(loss_fn: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Batch mean of each sample's mean element-wise ``loss_fn`` (reduction="none") over its unmasked labels.

    Each sample's loss depends on that sample only, as DP-SGD's per-sample gradients require.
    """
    per_sample = (loss_fn(logits, target) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return per_sample.mean()


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


# ---------------------------------------------------------------- train / evaluate


def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict:
    """``{"val_auc": ...}`` of ``model`` on ``loader``."""
    model.eval()
    scores, targets, masks = [], [], []
    with torch.no_grad():
        for batch in loader:
            scores.append(torch.sigmoid(model(batch["image"].to(device))).cpu())
            targets.append(batch["label"])
            masks.append(batch["mask"])
    return {KEY_METRIC: mean_auc(torch.cat(scores), torch.cat(targets), torch.cat(masks))}


def train(model, loader, optimizer, loss_fn, epochs: int, device: torch.device) -> tuple[float, int]:
    """Train ``epochs`` epochs; return the mean batch loss and the number of optimizer steps."""
    model.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            logits = model(batch["image"].to(device))
            loss = masked_loss(loss_fn, logits, batch["label"].to(device), batch["mask"].to(device))
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1), steps


# ---------------------------------------------------------------- entry point


def load_config(config_path: Path) -> dict:
    """The trainer config, with the settings this trainer depends on checked."""
    trainer = hcls_common.load_trainer_config(config_path, REQUIRED_KEYS)
    key_metric = hcls_common.key_metric(config_path)
    if key_metric != KEY_METRIC:
        server_config = hcls_common.server_config_path(config_path)
        raise ValueError(f"{server_config}: key_metric must be {KEY_METRIC!r} for this trainer, got {key_metric!r}")
    if trainer["uncertain_label_policy"] not in POLICIES:
        raise ValueError(
            f"{config_path}: trainer.uncertain_label_policy {trainer['uncertain_label_policy']!r} "
            f"is not one of {', '.join(POLICIES)}"
        )
    return trainer


def load_data(trainer: dict, data_dir: Path, blocked_fields=()) -> tuple[list[dict], list[dict]]:
    """Validated train and val records from ``data_dir``; a label among the site's ``blocked_fields`` is refused."""
    labels, policy = trainer["labels"], trainer["uncertain_label_policy"]
    blocked = [label for label in labels if label in blocked_fields]
    if blocked:
        raise ValueError(
            f"trainer.labels names {', '.join(blocked)}, blocked by this site "
            f"({hcls_common.site_config_path()}: privacy.blocked_data_fields): never loaded"
        )
    train_records = read_label_csv(data_dir / "train.csv", labels, policy, trainer["max_train_samples"])
    val_records = read_label_csv(data_dir / "val.csv", labels, policy, trainer["max_val_samples"])
    return train_records, val_records


def main() -> None:
    parser = argparse.ArgumentParser(description="CXR classification trainer (NVFlare Client API)")
    parser.add_argument("--config", type=Path, required=True, help="job client config with a 'trainer' object")
    config_path = parser.parse_args().config

    trainer = load_config(config_path)
    hcls_common.seed_everything(trainer["seed"])
    privacy = hcls_common.site_privacy()
    train_records, val_records = load_data(
        trainer, hcls_common.site_dataset_dir(JOB_NAME), privacy.get("blocked_data_fields", [])
    )
    train_loader = make_loader(train_records, trainer, train=True)
    val_loader = make_loader(val_records, trainer, train=False)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = hcls_common.build_network_from_spec(hcls_common.network_spec(config_path)).to(device)
    optimizer = hcls_common.build_optimizer(trainer, config_path, model.parameters())
    loss_fn = hcls_common.build_loss(trainer, config_path, reduction="none")
    dp, dp_accounting = hcls_common.site_dp_policy(), None
    if dp:
        epochs = hcls_common.num_rounds(config_path) * trainer["local_epochs"]
        optimizer, train_loader, dp_accounting = hcls_common.make_private(model, optimizer, train_loader, dp, epochs)

    hcls_common.run_federated(
        JOB_NAME, KEY_METRIC, model,
        evaluate=lambda: evaluate(model, val_loader, device),
        train=lambda: train(model, train_loader, optimizer, loss_fn, trainer["local_epochs"], device),
        n_train=len(train_records), dp_accounting=dp_accounting,
    )  # fmt: skip


if __name__ == "__main__":
    main()
