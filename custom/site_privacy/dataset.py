"""What the site knows from its own data, never from a job: where a job's dataset lives
(``local/site_config.json``: ``data_root`` + ``datasets[<job name>]``), how many training samples its
manifest lists, and the values of blocked identifier fields found in its manifests.

Manifests are the files the trainers read: ``train.csv`` / ``val.csv`` (CheXpert; one row per
sample) and ``train_data.json`` / ``val_data.json`` (MONAI decathlon style; a ``training`` list).
"""

import csv
import json
from pathlib import Path

TRAINING_MANIFESTS = ("train.csv", "train_data.json")
MIN_IDENTIFIER_LENGTH = 4  # shorter values (e.g. "1") would match harmless numbers


def dataset_dir(site_config: Path, job_name: str) -> Path:
    """The data directory of ``job_name`` at this site; ValueError naming the file and field."""
    try:
        config = json.loads(Path(site_config).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{site_config}: cannot read the site configuration: {err}") from err
    dataset = config.get("datasets", {}).get(job_name)
    if not config.get("data_root") or not dataset:
        raise ValueError(f"{site_config}: this site has no dataset for job '{job_name}' (datasets.{job_name})")
    return Path(config["data_root"]) / dataset


def count_training_samples(data_dir: Path) -> int:
    """Samples listed by the training manifest in ``data_dir``: CSV data rows or the ``training`` list."""
    for name in TRAINING_MANIFESTS:
        path = data_dir / name
        if not path.is_file():
            continue
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                return max(sum(1 for row in csv.reader(f) if row) - 1, 0)  # minus the header
        entries = json.loads(path.read_text())
        entries = entries.get("training", []) if isinstance(entries, dict) else entries
        return len(entries) if isinstance(entries, list) else 0
    raise ValueError(f"{data_dir}: no training manifest ({' or '.join(TRAINING_MANIFESTS)})")


def blocked_values(data_dir: Path, fields: tuple[str, ...]) -> dict[str, str]:
    """``{value: "<field> (<manifest>)"}`` for every value of a blocked field in the manifests of ``data_dir``."""
    found: dict[str, str] = {}

    def add(value, field: str, manifest: Path) -> None:
        text = str(value).strip()
        if len(text) >= MIN_IDENTIFIER_LENGTH:
            found.setdefault(text, f"{field} ({manifest.name})")

    def walk_json(node, manifest: Path) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in fields and not isinstance(value, (dict, list)):
                    add(value, key, manifest)
                walk_json(value, manifest)
        elif isinstance(node, list):
            for item in node:
                walk_json(item, manifest)

    for manifest in sorted(data_dir.glob("*.csv")):
        with open(manifest, newline="") as f:
            for row in csv.DictReader(f):
                for field in fields:
                    if row.get(field):
                        add(row[field], field, manifest)
    for manifest in sorted(data_dir.glob("*.json")):
        walk_json(json.loads(manifest.read_text()), manifest)
    return found
