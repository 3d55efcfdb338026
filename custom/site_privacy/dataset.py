"""What the site knows from its own data, never from a job: where a job's dataset lives
(``local/site_config.json``: ``data_root`` + ``datasets[<job name>]``), how many training samples its
manifest lists, and the values of blocked identifier fields found in its manifests.

This is site code: it reads the releases' own manifests itself and imports nothing of a job's. The
training manifest, by the dataset folder's files (checked in this order):

* CheXpert v1.0(-small): the ``CheXpert-v1.0*`` folder (the dataset folder or its sub-folder): the
  frontal rows of its ``train.csv`` (a lower bound when a job also trains on lateral views);
* NIH ChestX-ray14 (``Data_Entry_2017.csv``): the images of ``train_val_list.txt`` (the job's
  validation images come out of it too: an upper bound);
* LUNA16 as distributed (``subset*/`` folders and ``annotations.csv``): the ``.mhd`` series of the
  subsets the site config's ``luna16_split.train`` names (default 0-7);
* the project's lists: ``train.csv`` rows or the ``training`` list of ``train_data.json``;
* an MSD task (``dataset.json``): its ``training`` list (including the cases a site without a
  ``validation`` list holds out for validation: an upper bound).
"""

import csv
import json
import re
from pathlib import Path

TRAINING_MANIFESTS = ("train.csv", "train_data.json")
CHEXPERT_PREFIX, NIH_ENTRY, NIH_TRAIN_LIST = "CheXpert-v1.0", "Data_Entry_2017.csv", "train_val_list.txt"
LUNA16_ANNOTATIONS, LUNA16_DEFAULT_TRAIN_SUBSETS = "annotations.csv", list(range(8))
MSD_DATASET = "dataset.json"
MIN_IDENTIFIER_LENGTH = 4  # shorter values (e.g. "1") would match harmless numbers


def read_site_config(site_config: Path) -> dict:
    try:
        return json.loads(Path(site_config).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{site_config}: cannot read the site configuration: {err}") from err


def dataset_dir(site_config: Path, job_name: str) -> Path:
    """The data directory of ``job_name`` at this site; ValueError naming the file and field."""
    config = read_site_config(site_config)
    dataset = config.get("datasets", {}).get(job_name)
    if not config.get("data_root") or not dataset:
        raise ValueError(f"{site_config}: this site has no dataset for job '{job_name}' (datasets.{job_name})")
    return Path(config["data_root"]) / dataset


def chexpert_folders(data_dir: Path) -> list[Path]:
    """The ``CheXpert-v1.0*`` folders holding a ``train.csv``: ``data_dir`` itself or its sub-folders."""
    own = data_dir.name.startswith(CHEXPERT_PREFIX)
    candidates = [data_dir] if own else sorted(data_dir.glob(f"{CHEXPERT_PREFIX}*"))
    return [folder for folder in candidates if (folder / "train.csv").is_file()]


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def luna16_train_subsets(site_config: dict) -> list[int]:
    split = site_config.get("luna16_split") or {}
    train = split.get("train", LUNA16_DEFAULT_TRAIN_SUBSETS) if isinstance(split, dict) else None
    if not isinstance(train, list):
        raise ValueError(f"the site config's luna16_split.train must be a list of subset numbers, got {train!r}")
    return train


def count_training_samples(data_dir: Path, site_config: dict | None = None) -> int:
    """Samples the training manifest of ``data_dir`` lists (see the module docstring for each layout)."""
    chexpert = chexpert_folders(data_dir)
    if chexpert:
        rows = [row for folder in chexpert for row in csv_rows(folder / "train.csv")]
        return sum(row.get("Frontal/Lateral") == "Frontal" for row in rows)
    if (data_dir / NIH_ENTRY).is_file():
        listed = data_dir / NIH_TRAIN_LIST
        if not listed.is_file():
            raise ValueError(f"{data_dir}: NIH ChestX-ray14 layout without {NIH_TRAIN_LIST}")
        return sum(1 for line in listed.read_text().splitlines() if line.strip())
    subsets = [p for p in data_dir.glob("subset*") if p.is_dir() and re.fullmatch(r"subset\d+", p.name)]
    if subsets and (data_dir / LUNA16_ANNOTATIONS).is_file():
        train = set(luna16_train_subsets(site_config or {}))
        return sum(len(list(p.glob("*.mhd"))) for p in subsets if int(p.name[len("subset"):]) in train)
    for name in (*TRAINING_MANIFESTS, MSD_DATASET):
        path = data_dir / name
        if not path.is_file():
            continue
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                return max(sum(1 for row in csv.reader(f) if row) - 1, 0)  # minus the header
        entries = json.loads(path.read_text())
        entries = entries.get("training", []) if isinstance(entries, dict) else entries
        return len(entries) if isinstance(entries, list) else 0
    raise ValueError(
        f"{data_dir}: no training manifest (a CheXpert-v1.0* folder, {NIH_ENTRY}, LUNA16 subset*/ folders, "
        f"{', '.join(TRAINING_MANIFESTS)} or {MSD_DATASET})"
    )


def blocked_values(data_dir: Path, fields: tuple[str, ...]) -> dict[str, str]:
    """``{value: "<field> (<manifest>)"}`` for every value of a blocked field in the manifests of ``data_dir``
    (its CSV and JSON files, and the CSVs of its CheXpert folder)."""
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

    for manifest in sorted(p for folder in [data_dir, *chexpert_folders(data_dir)] for p in folder.glob("*.csv")):
        with open(manifest, newline="") as f:
            for row in csv.DictReader(f):
                for field in fields:
                    if row.get(field):
                        add(row[field], field, manifest)
    for manifest in sorted(data_dir.glob("*.json")):
        walk_json(json.loads(manifest.read_text()), manifest)
    return found
