"""Deterministic generator of CheXpert-format demo chest X-ray data.

Writes ``OUT/train.csv``, ``OUT/val.csv`` and
``OUT/images/patientNNNNN/study1/view1_frontal.jpg`` (8-bit grayscale JPEG).

Every image is a chest-like background (body, two darker lungs, spine) with noise.
Each label owns a distinctive pattern (a blob, ring, bar, ... at its own place on a
grid over the chest) that is drawn iff the finding is present, so the labels are
learnable. Each finding is present in ``PREVALENCE`` of the studies.

As in CheXpert, train.csv is "report-labelled": some present findings are written
as uncertain (-1.0) and some absent ones are left blank (not mentioned); val.csv
is "expert-labelled" and holds only 1.0 / 0.0. The CSVs also carry fake but realistic patient
identifiers (PatientName as DICOM ``Last^First``, PatientID as a site medical record number,
PatientBirthDate consistent with Age), drawn from their own seeded stream, that the trainers must
never load and a site's privacy policy blocks.

The same arguments give byte-identical CSVs and identical images.

    python -m datagen.cxr --out DIR   (from custom/) --n-train 160 --n-val 60 --seed 1 --site-prefix A

``--layout`` writes the same kind of data in a public dataset's own layout instead (``custom/cxr_layouts.py``
reads them); a finding is drawn as the pattern of the job output it feeds (``trainer.label_sources`` of the job),
so sites of different layouts teach the same network the same thing:

* ``chexpert`` / ``chexpert-small``: ``OUT/CheXpert-v1.0[-small]/train.csv`` and ``valid.csv`` (``Path`` starting
  with the folder name; ``Path, Sex, Age, Frontal/Lateral, AP/PA`` and the 14 observations; ``1.0``/``0.0``/
  ``-1.0``/blank in train.csv, ``1.0``/``0.0`` in valid.csv; ``No Finding`` 1.0 or blank), a frontal image per
  study and a lateral one for every third study, ``train/patientNNNNN/studyN/view1_frontal.jpg``;
* ``nih``: ``OUT/Data_Entry_2017.csv`` (``|``-joined ``Finding Labels`` or ``No Finding``, one to three follow-ups
  per patient), ``train_val_list.txt`` / ``test_list.txt`` (disjoint patients), PNGs in ``images_001/images/`` and
  ``images_002/images/``; ``--n-train``/``--n-val`` count images;
* ``project`` (the default): the layout above.
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ops import job_builder

JOB_TRAINER = job_builder.resolve("cxr_classification")["client"]["trainer"]
DEFAULT_LABELS = JOB_TRAINER["labels"]  # the job's outputs
LAYOUTS = ("project", "chexpert", "chexpert-small", "nih")
CHEXPERT_FOLDER = {"chexpert": "CheXpert-v1.0", "chexpert-small": "CheXpert-v1.0-small"}
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
CHEXPERT_OBSERVATIONS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
]  # fmt: skip
NIH_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]  # fmt: skip
NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]  # fmt: skip
LATERAL_EVERY = 3  # CheXpert: every third study also has a lateral view
HEALTHY_RATE = 0.3  # CheXpert and NIH layouts: share of studies with no finding at all ("No Finding")
EXTRA_COLUMNS = ["Sex", "Age", "Frontal/Lateral", "AP/PA"]
IDENTIFIER_COLUMNS = ["PatientName", "PatientID", "PatientBirthDate"]
LAST_NAMES = ["Smith", "Garcia", "Mueller", "Rossi", "Nguyen", "Kowalski", "Okafor", "Tanaka", "Silva", "Novak",
              "Johansson", "Dubois", "Haddad", "Ivanova", "Murphy", "Costa", "Schneider", "Kim", "Patel", "Moreau"]
FIRST_NAMES = ["Anna", "James", "Maria", "Li", "Fatima", "Lukas", "Sofia", "Omar", "Emma", "Noah", "Yuki", "Elena",
               "David", "Amara", "Jonas", "Chloe", "Mateo", "Ingrid", "Ravi", "Zoe"]
STUDY_YEAR = 2024  # Age is the age at the study
PREVALENCE = 0.3  # chance that a finding is present
UNCERTAIN_RATE = 0.1  # train.csv: share of present findings written as -1.0
BLANK_RATE = 0.15  # train.csv: share of absent findings left blank
# SIGNAL and NOISE are tuned so that DenseNet121 at 64x64 with 160 train studies per site
# reaches val_auc > 0.9 after about 4 FedAvg rounds of one local epoch.
SIGNAL = 0.40  # peak brightness added by a finding's pattern (image range 0..1)
NOISE = 0.06  # standard deviation of the Gaussian pixel noise
GRID_COLUMNS = 6  # finding patterns sit on a GRID_COLUMNS-wide grid over the chest
SHAPES = ("blob", "ring", "hbar", "vbar", "cross", "square")
JPEG_QUALITY = 95


def chest_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A chest-like radiograph background in 0..1: bright body, dark lungs, bright spine."""
    y, x = np.mgrid[0:size, 0:size] / size
    dx, dy = rng.uniform(-0.02, 0.02, size=2)
    body = ((x - 0.5 - dx) / 0.42) ** 2 + ((y - 0.55 - dy) / 0.5) ** 2 < 1
    lungs = [((x - cx - dx) / 0.16) ** 2 + ((y - 0.5 - dy) / 0.3) ** 2 < 1 for cx in (0.3, 0.7)]
    spine = np.abs(x - 0.5 - dx) < 0.04
    image = 0.1 + 0.45 * body - 0.25 * (lungs[0] | lungs[1]) + 0.2 * (spine & body)
    return image * rng.uniform(0.9, 1.1)


def pattern_centre(index: int, n_labels: int) -> tuple[float, float]:
    """Centre (x, y), as fractions of the image size, of the pattern of label ``index``."""
    rows = -(-n_labels // GRID_COLUMNS)
    column, row = index % GRID_COLUMNS, index // GRID_COLUMNS
    return 0.14 + 0.72 * column / (GRID_COLUMNS - 1), 0.25 + 0.55 * row / max(rows - 1, 1)


def pattern(shape: str, size: int, centre: tuple[float, float]) -> np.ndarray:
    """A unit-peak mask of ``shape`` centred at ``centre`` (fractions), sized relative to the image."""
    y, x = np.mgrid[0:size, 0:size] / size
    dx, dy = x - centre[0], y - centre[1]
    r, w = 0.045, 0.016  # pattern radius and stroke half-width
    radius = np.hypot(dx, dy)
    masks = {
        "blob": np.exp(-(radius**2) / (2 * (r / 1.5) ** 2)),
        "ring": np.abs(radius - r) < w * 1.5,
        "hbar": (np.abs(dx) < r) & (np.abs(dy) < w),
        "vbar": (np.abs(dy) < r) & (np.abs(dx) < w),
        "cross": ((np.abs(dx) < r) & (np.abs(dy) < w)) | ((np.abs(dy) < r) & (np.abs(dx) < w)),
        "square": (np.abs(dx) < r * 0.8) & (np.abs(dy) < r * 0.8),
    }
    return masks[shape].astype(np.float64)


def render_image(findings: np.ndarray, size: int, rng: np.random.Generator, outputs=None,
                 signal: float = SIGNAL) -> np.ndarray:  # fmt: skip
    """An 8-bit grayscale image with the pattern of every present finding; ``outputs[i]``: the index among
    ``n`` job outputs whose pattern finding ``i`` draws (None: none), as ``(indices, n)``; default: itself.
    ``signal``: a pattern's peak brightness (lower is harder to learn)."""
    image = chest_background(size, rng)
    indices, n_outputs = outputs or (list(range(len(findings))), len(findings))
    for index in (indices[i] for i in np.flatnonzero(findings)):
        if index is None:
            continue
        cx, cy = pattern_centre(index, n_outputs)
        jitter = rng.uniform(-0.015, 0.015, size=2)
        shape = SHAPES[(index + index // GRID_COLUMNS) % len(SHAPES)]
        image += signal * rng.uniform(0.8, 1.2) * pattern(shape, size, (cx + jitter[0], cy + jitter[1]))
    image += rng.normal(0.0, NOISE, size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def report_labels(findings: np.ndarray, rng: np.random.Generator, expert: bool) -> list[str]:
    """CheXpert label cells for ``findings``: "1.0"/"0.0", plus "-1.0"/"" unless ``expert``."""
    cells = []
    for present in findings:
        if not expert and present and rng.random() < UNCERTAIN_RATE:
            cells.append("-1.0")
        elif not expert and not present and rng.random() < BLANK_RATE:
            cells.append("")
        else:
            cells.append("1.0" if present else "0.0")
    return cells


def patient_identifiers(seed: int, patient: int, age: int, site_prefix: str) -> list[str]:
    """PatientName, PatientID and PatientBirthDate of ``patient``, from their own stream (labels and images
    do not depend on them)."""
    rng = np.random.default_rng([seed, patient])
    name = f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}"
    record_number = f"MRN-{site_prefix}{int(rng.integers(1_000_000, 10_000_000))}"
    birth = f"{STUDY_YEAR - age:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"  # DICOM DA
    return [name, record_number, birth]


def write_split(out: Path, split: str, patients: list[int], labels: list[str], size: int, site_prefix: str,
                seed: int, rng: np.random.Generator, signal: float = SIGNAL) -> None:  # fmt: skip
    """Write ``OUT/<split>.csv`` and one frontal image per patient."""
    with open(out / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Path", *EXTRA_COLUMNS, *labels, *IDENTIFIER_COLUMNS])
        for patient in patients:
            findings = rng.random(len(labels)) < PREVALENCE
            rel_path = f"images/patient{patient:05d}/study1/view1_frontal.jpg"
            (out / rel_path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_image(findings, size, rng, signal=signal)).save(out / rel_path, quality=JPEG_QUALITY)
            sex, age, view = rng.choice(["Male", "Female"]), rng.integers(20, 91), rng.choice(["AP", "PA"])
            writer.writerow(
                [rel_path, sex, age, "Frontal", view, *report_labels(findings, rng, expert=split == "val"),
                 *patient_identifiers(seed, patient, int(age), site_prefix)]
            )  # fmt: skip


def generate(out: Path, n_train: int, n_val: int, seed: int, size: int = 128,
             labels: list[str] = DEFAULT_LABELS, site_prefix: str = "A", signal: float = SIGNAL) -> None:
    """Write a train and a val split of distinct, seed-dependent patients into ``out``."""
    rng = np.random.default_rng(seed)
    patients = [int(p) for p in rng.choice(np.arange(1, 100_000), size=n_train + n_val, replace=False)]
    out.mkdir(parents=True, exist_ok=True)
    write_split(out, "train", sorted(patients[:n_train]), labels, size, site_prefix, seed, rng, signal)
    write_split(out, "val", sorted(patients[n_train:]), labels, size, site_prefix, seed, rng, signal)


def output_indices(layout: str, sources: list[str], labels: list[str] = DEFAULT_LABELS,
                   label_sources: dict | None = None) -> tuple[list[int | None], int]:  # fmt: skip
    """For each source finding of ``layout``, the index of the job output it feeds (None: none), and the number
    of outputs: the job's ``trainer.label_sources``."""
    mapping = (label_sources or JOB_TRAINER.get("label_sources", {})).get(layout, {})
    return [labels.index(mapping[s]) if mapping.get(s) in labels else None for s in sources], len(labels)


def chexpert_cells(findings: np.ndarray, rng: np.random.Generator, expert: bool) -> list[str]:
    """The 14 observation cells: report labels for the 13 pathologies/devices, ``No Finding`` 1.0 or blank."""
    cells = report_labels(findings[1:], rng, expert)
    return ["1.0" if not findings[1:].any() else ("0.0" if expert else ""), *cells]


def generate_chexpert(out: Path, n_train: int, n_val: int, seed: int, size: int = 128, small: bool = True) -> None:
    """CheXpert v1.0 as distributed: ``out/CheXpert-v1.0[-small]/{train,valid}.csv`` and ``{train,valid}/``."""
    rng = np.random.default_rng(seed)
    folder = CHEXPERT_FOLDER["chexpert-small" if small else "chexpert"]
    outputs = output_indices("chexpert", CHEXPERT_OBSERVATIONS)
    patients = [int(p) for p in rng.choice(np.arange(1, 64_541), size=n_train + n_val, replace=False)]
    (out / folder).mkdir(parents=True, exist_ok=True)
    splits = (("train", "train.csv", patients[:n_train]), ("valid", "valid.csv", patients[n_train:]))
    for split, csv_name, group in splits:
        with open(out / folder / csv_name, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([*CHEXPERT_COLUMNS, *CHEXPERT_OBSERVATIONS])
            for number, patient in enumerate(sorted(group)):
                findings = np.concatenate([[False], rng.random(len(CHEXPERT_OBSERVATIONS) - 1) < PREVALENCE])
                findings &= rng.random() >= HEALTHY_RATE
                cells = chexpert_cells(findings, rng, expert=split == "valid")
                sex, age = rng.choice(["Male", "Female"]), int(rng.integers(20, 91))
                views = [("view1_frontal.jpg", "Frontal", str(rng.choice(["AP", "PA"])))]
                if number % LATERAL_EVERY == LATERAL_EVERY - 1:
                    views.append(("view2_lateral.jpg", "Lateral", ""))
                for file_name, view, ap_pa in views:
                    rel_path = f"{folder}/{split}/patient{patient:05d}/study1/{file_name}"
                    (out / rel_path).parent.mkdir(parents=True, exist_ok=True)
                    image = render_image(findings, size, rng, outputs)
                    Image.fromarray(image).save(out / rel_path, quality=JPEG_QUALITY)
                    writer.writerow([rel_path, sex, age, view, ap_pa, *cells])


def generate_nih(out: Path, n_train: int, n_val: int, seed: int, size: int = 128) -> None:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv``, ``train_val_list.txt``, ``test_list.txt``, ``images_00N/images``."""
    rng = np.random.default_rng(seed)
    outputs = output_indices("nih", NIH_FINDINGS)
    rows, lists, patient = [], {"train_val_list.txt": [], "test_list.txt": []}, int(rng.integers(1, 20_000))
    for list_name, n_images in (("train_val_list.txt", n_train), ("test_list.txt", n_val)):
        while len(lists[list_name]) < n_images:
            patient += int(rng.integers(1, 7))
            age, sex = int(rng.integers(20, 91)), str(rng.choice(["M", "F"]))
            for follow_up in range(min(int(rng.integers(1, 4)), n_images - len(lists[list_name]))):
                name = f"{patient:08d}_{follow_up:03d}.png"
                findings = (rng.random(len(NIH_FINDINGS)) < PREVALENCE) & (rng.random() >= HEALTHY_RATE)
                labels = "|".join(f for f, present in zip(NIH_FINDINGS, findings, strict=True) if present)
                view = str(rng.choice(["PA", "AP"]))
                width, height = int(rng.integers(2000, 3000)), int(rng.integers(2000, 3000))
                rows.append([name, labels or "No Finding", follow_up, patient, age, sex, view, width, height,
                             0.143, 0.143])  # fmt: skip
                lists[list_name].append(name)
                folder = out / f"images_{1 + len(rows) % 2:03d}" / "images"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(render_image(findings, size, rng, outputs)).save(folder / name)
    with open(out / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(NIH_HEADER)
        writer.writerows(sorted(rows))
    for list_name, names in lists.items():
        (out / list_name).write_text("".join(f"{name}\n" for name in sorted(names)))


def generate_layout(layout: str, out: Path, n_train: int, n_val: int, seed: int, size: int = 128,
                    labels: list[str] = DEFAULT_LABELS, site_prefix: str = "A") -> None:  # fmt: skip
    """Write ``layout`` (one of ``LAYOUTS``) into ``out``."""
    if layout == "project":
        generate(out, n_train, n_val, seed, size, labels, site_prefix)
    elif layout in CHEXPERT_FOLDER:
        generate_chexpert(out, n_train, n_val, seed, size, small=layout == "chexpert-small")
    elif layout == "nih":
        generate_nih(out, n_train, n_val, seed, size)
    else:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")


def labels_from(config_path: Path) -> list[str]:
    """The ``trainer.labels`` list of a job's client config (e.g. ``app/config/config_fed_client.json`` of a built job)."""
    return json.loads(config_path.read_text())["trainer"]["labels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n-train", type=int, required=True, help="number of train studies")
    parser.add_argument("--n-val", type=int, required=True, help="number of val studies")
    parser.add_argument("--seed", type=int, required=True, help="random seed (use one per site)")
    parser.add_argument("--size", type=int, default=128, help="image width and height in pixels")
    parser.add_argument("--labels-from", type=Path, help="job client config whose trainer.labels to use")
    parser.add_argument("--site-prefix", default="A", help="site tag used in the fake PatientID")
    parser.add_argument("--layout", choices=LAYOUTS, default="project", help="file layout (default: project)")
    args = parser.parse_args()
    labels = labels_from(args.labels_from) if args.labels_from else DEFAULT_LABELS
    generate_layout(args.layout, args.out, args.n_train, args.n_val, args.seed, args.size, labels, args.site_prefix)
    what = f"{len(labels)} labels" if args.layout == "project" else f"{args.layout} layout"
    print(f"wrote {args.n_train} train + {args.n_val} val studies, {what}, to {args.out}")


if __name__ == "__main__":
    main()
