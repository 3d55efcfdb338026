"""Chest X-ray dataset layouts: one output space (the job's ``trainer.labels``), many sources.

A site's CXR dataset folder (``datasets.cxr_classification`` of its site config) is in one of three layouts:

* ``project``: the project's own layout, ``train.csv`` and ``val.csv`` with ``Path`` (relative to the dataset
  folder) and one column per output label (identity map);
* ``chexpert``: CheXpert v1.0 as distributed, the folder ``CheXpert-v1.0/`` or ``CheXpert-v1.0-small/`` (the
  dataset folder itself or its one such sub-folder) with ``train.csv`` (training) and ``valid.csv``
  (validation); ``Path`` starts with that folder's name (it is relative to the folder's parent); the 14
  observations under CheXpert's names; frontal images only unless ``trainer.include_lateral``;
  patient id = the ``patientNNNNN`` component of ``Path``;
* ``nih``: NIH ChestX-ray14, ``Data_Entry_2017.csv`` (``|``-joined ``Finding Labels``), ``train_val_list.txt``
  (training) and ``test_list.txt`` (validation), images under ``images_NNN/images/`` or ``images/``; patient id
  = ``Patient ID``.

The layout is named by the site (``dataset_layouts.cxr_classification`` of its site config) or detected: a
``CheXpert-v1.0*`` folder with ``train.csv``/``valid.csv`` -> chexpert, a ``Data_Entry_2017.csv`` -> nih, else
project. ``trainer.label_sources`` maps, per layout, a source column (chexpert) or finding (nih) to an output
label. An output label that the site's layout does not feed is masked (mask 0) for every row of that site: out
of its loss and its AUC. A source column or finding with no output label is ignored. NIH findings are
exhaustive: a mapped finding absent from a row's list is a negative.

Cell values (project, chexpert): ``1``/``1.0`` positive, ``0`` negative, blank negative, ``-1`` uncertain (per
``trainer.uncertain_label_policy``). Every problem (a missing file, column or image, a bad value, an unknown NIH
finding, a CheXpert ``Path`` prefix that names no folder, a patient in both training and validation) is a
``Problem`` naming the file, the row and the column; the whole dataset is checked before training starts.

No torch, no NVFlare: this module only reads files (``--check`` uses it on sites without a GPU).
"""

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LAYOUTS = ("project", "chexpert", "nih")
POLICIES = {"ones": 1.0, "zeros": 0.0, "ignore": None}  # value given to an uncertain (-1) label; None = masked
CHEXPERT_FOLDERS = ("CheXpert-v1.0", "CheXpert-v1.0-small")
CHEXPERT_SPLITS = ("train.csv", "valid.csv")
CHEXPERT_OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)  # fmt: skip
CHEXPERT_VIEW_COLUMN = "Frontal/Lateral"
NIH_ENTRY = "Data_Entry_2017.csv"
NIH_SPLITS = ("train_val_list.txt", "test_list.txt")
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NIH_NO_FINDING = "No Finding"
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")  # the ones read; the others are never kept
VOCABULARY = {"chexpert": CHEXPERT_OBSERVATIONS, "nih": NIH_FINDINGS}  # source names a label map may use
PATIENT_COMPONENT = re.compile(r"^patient\d+$")
MAX_REPORTED_ERRORS = 20


# ---------------------------------------------------------------- problems


@dataclass
class Problem:
    """One bad input: its file, row (the file's line number; CSV header = row 1), column and what is wrong.

    ``message`` may name the image path; ``public`` (default: ``message``) is what a data-check summary shows,
    without paths or identifiers.
    """

    file: Path
    row: int | None
    column: str | None
    message: str
    public: str | None = None
    header: bool = False

    def __str__(self) -> str:
        where = str(self.file)
        if self.row is not None:
            where += f", row {self.row}" + (" (header)" if self.header else "")
        if self.column is not None:
            where += f", column {self.column!r}"
        return f"{where}: {self.message}"

    def summary(self, base: Path) -> dict:
        """File relative to ``base`` (the dataset folder's parent), row, column, identifier-free message."""
        try:
            file = Path(self.file).relative_to(base).as_posix()
        except ValueError:
            file = Path(self.file).name
        return {"file": file, "row": self.row, "column": self.column, "error": self.public or self.message}


def raise_problems(problems: list[Problem]) -> None:
    """ValueError listing the first ``MAX_REPORTED_ERRORS`` problems, if any."""
    if problems:
        more = len(problems) - MAX_REPORTED_ERRORS
        listed = "\n".join(map(str, problems[:MAX_REPORTED_ERRORS]))
        raise ValueError(listed + (f"\n... and {more} more" if more > 0 else ""))


@dataclass
class Split:
    """The records of one split (image, label, mask), with each record's source row and patient (never in a
    record: only the split check reads them)."""

    file: Path
    records: list[dict] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    patients: list[str | None] = field(default_factory=list)
    laterals_skipped: int = 0

    def add(self, record: dict, row: int, patient: str | None) -> None:
        self.records.append(record)
        self.rows.append(row)
        self.patients.append(patient)


# ---------------------------------------------------------------- cells and labels


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


def encode_labels(
    cells: list[float | None], policy: str, fed: list[bool] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Targets and loss mask (1 = used) for one row's parsed cells under ``policy``; an output that the layout
    does not feed (``fed[j]`` false) is masked."""
    uncertain_value = POLICIES[policy]
    label, mask = [], []
    for j, cell in enumerate(cells):
        if fed is not None and not fed[j]:
            label.append(0.0)
            mask.append(0.0)
        elif cell == -1.0:
            label.append(uncertain_value or 0.0)
            mask.append(0.0 if uncertain_value is None else 1.0)
        else:
            label.append(cell or 0.0)  # blank -> negative
            mask.append(1.0)
    return np.array(label, dtype=np.float32), np.array(mask, dtype=np.float32)


def check_label_sources(label_sources, labels: list[str], where) -> dict:
    """``trainer.label_sources`` checked: per layout (chexpert, nih) a map source name -> output label, each
    source known to the layout, each output of ``labels`` fed by at most one source (an output not in ``labels``
    is ignored). ValueError naming ``where`` (the job's client config) otherwise."""
    if label_sources is None:
        return {}
    if not isinstance(label_sources, dict):
        raise ValueError(f"{where}: trainer.label_sources must be an object {{layout: {{source: label}}}}")
    for layout, mapping in label_sources.items():
        if layout not in VOCABULARY:
            known = ", ".join(VOCABULARY)
            raise ValueError(f"{where}: trainer.label_sources.{layout}: unknown layout (one of {known})")
        if not isinstance(mapping, dict):
            raise ValueError(f"{where}: trainer.label_sources.{layout} must be an object {{source: label}}")
        fed = {}
        for source, label in mapping.items():
            if source not in VOCABULARY[layout]:
                raise ValueError(f"{where}: trainer.label_sources.{layout}: {source!r} is not a {layout} label")
            if not isinstance(label, str):
                raise ValueError(f"{where}: trainer.label_sources.{layout}.{source} must be a label name")
            if label not in labels:
                continue  # an output left out of trainer.labels (a profile may drop one): its sources are ignored
            if label in fed:
                raise ValueError(
                    f"{where}: trainer.label_sources.{layout}: {label!r} is fed by both {fed[label]!r} and {source!r}"
                )
            fed[label] = source
    return label_sources


def output_sources(layout: str, labels: list[str], label_sources: dict) -> list[str | None]:
    """For each output label, the source column/finding of ``layout`` that feeds it, or None (masked)."""
    if layout == "project":
        return list(labels)
    if layout not in label_sources:
        raise ValueError(f"trainer.label_sources has no {layout!r} map: the job cannot read a {layout} dataset")
    inverse = {label: source for source, label in label_sources[layout].items()}
    return [inverse.get(label) for label in labels]


# ---------------------------------------------------------------- layout detection


def chexpert_folder(data_dir: Path) -> Path | None:
    """The CheXpert folder of ``data_dir`` (itself or its one ``CheXpert-v1.0*`` sub-folder), if any."""

    def is_chexpert(folder: Path) -> bool:
        return folder.name.startswith("CheXpert-v1.0") and any((folder / f).is_file() for f in CHEXPERT_SPLITS)

    if is_chexpert(data_dir):
        return data_dir
    found = sorted(p for p in data_dir.glob("CheXpert-v1.0*") if p.is_dir() and is_chexpert(p))
    if len(found) > 1:
        raise ValueError(
            f"{data_dir}: several CheXpert folders ({', '.join(p.name for p in found)}); "
            "name one of them in datasets.cxr_classification"
        )
    return found[0] if found else None


def detect_layout(data_dir: Path, named: str | None = None, where="the site config") -> str:
    """The layout named by the site (``named``) or detected from the files of ``data_dir``."""
    if named:
        if named not in LAYOUTS:
            known = ", ".join(LAYOUTS)
            raise ValueError(f"{where}: dataset_layouts.cxr_classification {named!r} is not one of {known}")
        return named
    if chexpert_folder(data_dir) is not None:
        return "chexpert"
    if (data_dir / NIH_ENTRY).is_file():
        return "nih"
    if (data_dir / "train.csv").is_file() or (data_dir / "val.csv").is_file():
        return "project"
    raise ValueError(f"{data_dir}: not a chest X-ray dataset this job reads: no CheXpert-v1.0*/ folder with "
                     f"{' or '.join(CHEXPERT_SPLITS)} (CheXpert), no {NIH_ENTRY} (NIH ChestX-ray14), no train.csv or "
                     "val.csv (the project's layout)")  # fmt: skip


# ---------------------------------------------------------------- CSV readers


def read_csv_rows(csv_path: Path, required: list[str], problems: list[Problem]):
    """(line number, {column: cell}) for each non-empty row, keeping only ``required`` columns; problems for
    a missing file or column (then no rows)."""
    if not csv_path.is_file():
        problems.append(Problem(csv_path, None, None, "CSV file not found"))
        return
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        missing = [column for column in required if column not in header]
        if missing:
            message = f"missing column(s) {', '.join(repr(c) for c in missing)}"
            problems.append(Problem(csv_path, 1, None, message, header=True))
            return
        columns = {name: header.index(name) for name in required}
        for cells in reader:
            if cells:
                yield reader.line_num, {name: cells[i] if i < len(cells) else "" for name, i in columns.items()}


def read_cells(row: dict, sources: list[str | None]) -> list[float | None]:
    """Parsed cells of the fed outputs (None where not fed); ValueError naming the column on a bad value."""
    cells = []
    for column in sources:
        try:
            cells.append(parse_cell(row[column] or "") if column is not None else None)
        except ValueError as err:
            raise ColumnError(column, str(err)) from err
    return cells


class ColumnError(ValueError):
    def __init__(self, column: str, message: str, public: str | None = None):
        super().__init__(message)
        self.column, self.message, self.public = column, message, public


def patient_of(path: str) -> str | None:
    """The ``patientNNNNN`` component of an image path, if any."""
    return next((part for part in Path(path).parts if PATIENT_COMPONENT.match(part)), None)


def read_project_csv(csv_path: Path, labels: list[str], policy: str, problems: list[Problem]) -> Split:
    """The project layout: ``Path`` relative to the CSV's folder, one column per output label."""
    split = Split(csv_path)
    for line, row in read_csv_rows(csv_path, ["Path", *labels], problems):
        try:
            if not row["Path"]:
                raise ColumnError("Path", "empty")
            image = csv_path.parent / row["Path"]
            if not image.is_file():
                raise ColumnError("Path", f"image file {image} does not exist", "image file does not exist")
            label, mask = encode_labels(read_cells(row, labels), policy)
        except ColumnError as err:
            problems.append(Problem(csv_path, line, err.column, err.message, err.public))
            continue
        split.add({"image": str(image), "label": label, "mask": mask}, line, patient_of(row["Path"]))
    return split


def read_chexpert_csv(
    csv_path: Path, sources: list[str | None], policy: str, include_lateral: bool, problems: list[Problem]
) -> Split:
    """A CheXpert v1.0 CSV: ``Path`` relative to the CheXpert folder's parent, CheXpert's observation columns."""
    split, base = Split(csv_path), csv_path.parent.parent
    fed = [source is not None for source in sources]
    columns = ["Path", CHEXPERT_VIEW_COLUMN, *[s for s in sources if s is not None]]
    for line, row in read_csv_rows(csv_path, columns, problems):
        try:
            path = row["Path"]
            if not path:
                raise ColumnError("Path", "empty")
            view = row[CHEXPERT_VIEW_COLUMN]
            if view not in ("Frontal", "Lateral"):
                raise ColumnError(CHEXPERT_VIEW_COLUMN, f"value {view!r} is not Frontal or Lateral")
            if view == "Lateral" and not include_lateral:
                split.laterals_skipped += 1
                continue
            prefix = Path(path).parts[0]
            if len(Path(path).parts) < 2 or not (base / prefix).is_dir():
                expected = f"(expected {csv_path.parent.name}/...)"
                raise ColumnError(
                    "Path", f"prefix {prefix!r} of {path} names no folder beside {csv_path.parent.name}/ {expected}",
                    f"Path prefix names no folder {expected}",
                )  # fmt: skip
            image = base / path
            if not image.is_file():
                raise ColumnError("Path", f"image file {image} does not exist", "image file does not exist")
            patient = patient_of(path)
            if patient is None:
                raise ColumnError("Path", f"{path} has no patientNNNNN component", "no patientNNNNN component")
            label, mask = encode_labels(read_cells(row, sources), policy, fed)
        except ColumnError as err:
            problems.append(Problem(csv_path, line, err.column, err.message, err.public))
            continue
        split.add({"image": str(image), "label": label, "mask": mask}, line, patient)
    return split


def nih_images(data_dir: Path) -> dict[str, Path]:
    """Image file name -> path, over ``images/`` and every ``images_NNN/images/``."""
    index = {}
    for folder in [data_dir / "images", *sorted(data_dir.glob("images_*/images"))]:
        if folder.is_dir():
            for path in folder.iterdir():
                index.setdefault(path.name, path)
    return index


def read_nih(data_dir: Path, sources: list[str | None], problems: list[Problem]) -> tuple[Split, Split]:
    """NIH ChestX-ray14: findings of ``Data_Entry_2017.csv``, training/validation images from the two lists."""
    entry_path = data_dir / NIH_ENTRY
    known = set(NIH_FINDINGS) | {NIH_NO_FINDING}
    entries = {}  # image name -> (findings, patient)
    for line, row in read_csv_rows(entry_path, list(NIH_COLUMNS), problems):
        names = [name.strip() for name in row["Finding Labels"].split("|")]
        unknown = [name for name in names if name not in known]
        if unknown or not row["Finding Labels"].strip():
            what = f"unknown finding(s) {', '.join(map(repr, unknown))}" if unknown else "empty"
            problems.append(Problem(entry_path, line, "Finding Labels", what))
            entries[row["Image Index"]] = None  # reported here, not again where a list names it
            continue
        if not row["Image Index"] or not row["Patient ID"]:
            column = "Image Index" if not row["Image Index"] else "Patient ID"
            problems.append(Problem(entry_path, line, column, "empty"))
            continue
        entries[row["Image Index"]] = (set(names), row["Patient ID"])
    images = nih_images(data_dir)
    fed = [source is not None for source in sources]
    splits = []
    for list_name in NIH_SPLITS:
        list_path = data_dir / list_name
        split = Split(list_path)
        splits.append(split)
        if not list_path.is_file():
            problems.append(Problem(list_path, None, None, "image list not found"))
            continue
        for line, name in enumerate(list_path.read_text().splitlines(), start=1):
            name = name.strip()
            if not name:
                continue
            if name not in entries:
                if entry_path.is_file():  # a missing Data_Entry_2017.csv is reported once
                    problems.append(Problem(list_path, line, None, f"image {name} is not in {NIH_ENTRY}",
                                            f"image not in {NIH_ENTRY}"))  # fmt: skip
                continue
            if entries[name] is None:  # its Data_Entry_2017.csv row is reported
                continue
            if name not in images:
                problems.append(Problem(list_path, line, None, f"image file {name} not found under images_*/images/ "
                                        "or images/", "image file not found"))  # fmt: skip
                continue
            findings, patient = entries[name]
            cells = [float(source in findings) if source is not None else None for source in sources]
            label, mask = encode_labels(cells, "ones", fed)
            split.add({"image": str(images[name]), "label": label, "mask": mask}, line, patient)
    return splits[0], splits[1]


def check_patients(train: Split, val: Split, problems: list[Problem]) -> None:
    """A problem at the first validation row whose patient also has training rows (the patient COUNT, never an id)."""
    shared = {p for p in train.patients if p is not None} & {p for p in val.patients if p is not None}
    if shared:
        row = next(r for r, p in zip(val.rows, val.patients, strict=True) if p in shared)
        message = (f"{len(shared)} patient(s) have both training ({train.file.name}) and validation "
                   f"({val.file.name}) rows; each patient must be in one split only")  # fmt: skip
        problems.append(Problem(val.file, row, None, message))


# ---------------------------------------------------------------- a site's dataset


@dataclass
class SiteData:
    layout: str
    data_dir: Path
    sources: list[str | None]  # per output label: the source feeding it, or None (masked)
    train: Split
    val: Split
    problems: list[Problem]


def read_site_data(data_dir: Path, layout: str, labels: list[str], label_sources: dict, policy: str,
                   include_lateral: bool = False) -> SiteData:  # fmt: skip
    """Every row of both splits of a site's dataset in ``layout``, with all problems found (none raised)."""
    problems: list[Problem] = []
    sources = output_sources(layout, labels, label_sources)
    if layout == "project":
        train = read_project_csv(data_dir / "train.csv", labels, policy, problems)
        val = read_project_csv(data_dir / "val.csv", labels, policy, problems)
    elif layout == "chexpert":
        folder = chexpert_folder(data_dir)
        if folder is None:
            raise ValueError(f"{data_dir}: no CheXpert-v1.0*/ folder with {' and '.join(CHEXPERT_SPLITS)}")
        train = read_chexpert_csv(folder / "train.csv", sources, policy, include_lateral, problems)
        val = read_chexpert_csv(folder / "valid.csv", sources, policy, include_lateral, problems)
    else:
        train, val = read_nih(data_dir, sources, problems)
    check_patients(train, val, problems)
    for split in (train, val):
        if split.file.is_file() and not split.records and not any(p.file == split.file for p in problems):
            problems.append(Problem(split.file, None, None, "no data rows, the dataset is empty"))
    return SiteData(layout, data_dir, sources, train, val, problems)


def label_counts(records: list[dict], labels: list[str]) -> dict:
    """Per output label: positives, negatives (unmasked) and masked rows."""
    if not records:
        return {label: {"positives": 0, "negatives": 0, "masked": 0} for label in labels}
    label = np.stack([r["label"] for r in records])
    mask = np.stack([r["mask"] for r in records]) > 0
    return {
        name: {"positives": int((mask[:, j] & (label[:, j] == 1)).sum()),
               "negatives": int((mask[:, j] & (label[:, j] == 0)).sum()), "masked": int((~mask[:, j]).sum())}
        for j, name in enumerate(labels)
    }  # fmt: skip
