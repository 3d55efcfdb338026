"""Deterministic generator of LUNA16-format demo chest CT data for lung nodule detection.

Writes into ``OUT``:

* ``images/<seriesuid>.nii.gz``: int16 CT volumes in Hounsfield units: air (-1000)
  around a soft-tissue body (~40 HU) holding two lungs (~-800 HU), Gaussian noise,
  and 1-3 bright spherical nodules (~+50 HU, ``DIAMETER_MM`` in diameter, at most 80% of the
  lungs' narrowest width: 5-11.5 mm at the default spacing and ``--size 64``) in the lungs;
* ``annotations/annotations.csv``: ``seriesuid,coordX,coordY,coordZ,diameter_mm``, one
  row per nodule, its centre in LUNA16's world coordinates: ITK/LPS millimetres;
* ``train_data.json`` / ``val_data.json``: the series of each split,
  ``{"training": [{"image": "images/<uid>.nii.gz", "seriesuid": "<uid>"}, ...]}``
  (key ``"validation"`` in ``val_data.json``).

Every volume has anisotropic spacing (``--spacing``, default LUNA16-like 0.7 x 0.7 x 1.25 mm,
x/y jittered per series by up to ``SPACING_JITTER``), a non-zero origin and a direction that
flips at least one axis of the LPS frame, so a reader that takes world coordinates for voxel
indices, or ignores the direction, or the LPS -> RAS change (NIfTI affines are RAS), misplaces
the nodules.
Series uids are dotted numeric strings like LUNA16's.

With ``--layout luna16`` it writes LUNA16 as distributed instead (the same series, nodules and
annotation values; no ``images/``, ``annotations/`` or split lists):

* ``subsetN/<seriesuid>.mhd`` + ``.raw``: MetaImage volumes (MET_SHORT, HU, little-endian, x fastest)
  with LPS geometry (``Offset``, ``ElementSpacing``, ``TransformMatrix``); train series go
  round-robin to ``subset0`` .. ``subset7``, val series to ``subset8`` and ``subset9`` (the trainer's
  default ``luna16_split``); all ten folders are written. The direction is the identity, as in
  LUNA16, unless ``--flip-direction`` keeps the flipped axes of the NIfTI layout;
* ``annotations.csv``: at the top level, as above.

The same arguments give byte-identical files.

    python -m datagen.luna16 --out DIR --n-train 16 --n-val 4 --seed 1 --size 64   # custom/ on PYTHONPATH
    python -m datagen.luna16 --out DIR --n-train 16 --n-val 4 --seed 1 --layout luna16 [--flip-direction]
"""

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."  # LUNA16 (LIDC-IDRI) series uid root
ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
SPLIT_KEYS = {"train": "training", "val": "validation"}
DEFAULT_SPACING = (0.7, 0.7, 1.25)  # mm (x, y, z), LUNA16-like (the job resamples to 0.703 x 0.703 x 1.25)
SPACING_JITTER = 0.1  # x/y spacing of each series: DEFAULT_SPACING * U(1 - j, 1 + j)
HU_AIR, HU_BODY, HU_LUNG, HU_NODULE = -1000.0, 40.0, -800.0, 50.0
NOISE_HU = 25.0  # standard deviation of the Gaussian noise
LAYOUTS = ("nifti", "luna16")
LUNA16_SUBSETS = {"train": list(range(8)), "val": [8, 9]}  # the trainer's default luna16_split
DIAMETER_MM = (5.0, 15.0)  # nodule diameter range (the upper end capped to fit the lungs)
NODULES_PER_SCAN = (1, 3)


def series_uid(rng: np.random.Generator) -> str:
    """A LUNA16-like series instance uid: the LIDC root and a 30-digit suffix."""
    digits = rng.integers(0, 10, size=30)
    digits[0] = rng.integers(1, 10)
    return UID_PREFIX + "".join(str(d) for d in digits)


def geometry(size: int, spacing: tuple[float, float, float], rng: np.random.Generator, flip: bool = True):
    """Shape, LPS direction-times-spacing matrix, LPS origin and RAS (NIfTI) affine of one series.

    ``flip=False``: the identity direction (the random draws are the same, so the series are too)."""
    shape = (size, size, max(size // 2, 8))
    jitter = rng.uniform(1 - SPACING_JITTER, 1 + SPACING_JITTER)
    voxel_mm = np.array([spacing[0] * jitter, spacing[1] * jitter, spacing[2]])
    while True:  # a direction with at least one flipped axis in the LPS frame
        signs = rng.choice([-1.0, 1.0], size=3)
        if (signs < 0).any():
            break
    lps_matrix = np.diag((signs if flip else 1.0) * voxel_mm)  # world_lps = origin + lps_matrix @ index
    origin = np.array([-rng.uniform(120, 220), -rng.uniform(120, 260), -rng.uniform(150, 400)])
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = lps_to_ras @ lps_matrix, lps_to_ras @ origin
    return shape, lps_matrix, origin, affine


def lung_masks(shape: tuple[int, int, int]):
    """Body and lung masks, and the lungs' centres and semi-axes (all in voxel units)."""
    grid = np.indices(shape, dtype=np.float64)
    nx, ny, nz = shape
    body = ((grid[0] - nx / 2) / (0.46 * nx)) ** 2 + ((grid[1] - ny / 2) / (0.40 * ny)) ** 2 < 1
    lungs = []
    for cx in (0.3 * nx, 0.7 * nx):
        centre, axes = np.array([cx, ny / 2, nz / 2]), np.array([0.16 * nx, 0.28 * ny, 0.42 * nz])
        mask = (((grid - centre[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0) < 1
        lungs.append((mask, centre, axes))
    return body, lungs


def place_nodules(lungs, voxel_mm: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    """1-3 non-overlapping (centre index, diameter mm) nodules, each sphere inside a lung."""
    n = int(rng.integers(NODULES_PER_SCAN[0], NODULES_PER_SCAN[1] + 1))
    largest = 2 * 0.8 * min(float((axes * voxel_mm).min()) for _, _, axes in lungs)  # fits a small volume's lungs
    nodules: list[tuple[np.ndarray, float]] = []
    for _ in range(10_000):
        if len(nodules) == n:
            return nodules
        diameter = float(rng.uniform(DIAMETER_MM[0], max(DIAMETER_MM[0], min(DIAMETER_MM[1], largest))))
        _, centre, axes = lungs[int(rng.integers(len(lungs)))]
        room = 1 - (diameter / 2) / (axes * voxel_mm)  # keep the sphere inside the lung ellipsoid
        if (room <= 0.1).any():
            continue
        direction = rng.normal(size=3)
        point = centre + axes * room * direction / np.linalg.norm(direction) * rng.uniform(0, 1) ** (1 / 3)
        if all(np.linalg.norm((point - c) * voxel_mm) > (diameter + d) / 2 + 2 for c, d in nodules):
            nodules.append((point, diameter))
    raise ValueError(f"cannot place {n} nodules of {DIAMETER_MM} mm in the lungs: the volume is too small")


def render(shape, voxel_mm: np.ndarray, body, lungs, nodules, rng: np.random.Generator) -> np.ndarray:
    """The int16 HU volume with body, lungs, the nodules (spheres in millimetres) and noise."""
    volume = np.full(shape, HU_AIR)
    volume[body] = HU_BODY
    for mask, _, _ in lungs:
        volume[mask] = HU_LUNG
    grid = np.indices(shape, dtype=np.float64)
    for centre, diameter in nodules:
        dist_mm = np.sqrt((((grid - centre[:, None, None, None]) * voxel_mm[:, None, None, None]) ** 2).sum(0))
        volume[dist_mm <= diameter / 2] = HU_NODULE + rng.normal(0, 10)
    volume += rng.normal(0.0, NOISE_HU, size=shape)
    return np.clip(volume.round(), -1024, 3071).astype(np.int16)


def write_metaimage(header: Path, volume: np.ndarray, lps_matrix: np.ndarray, origin: np.ndarray) -> None:
    """``header`` (.mhd) and its ``.raw``: MET_SHORT, little-endian, x fastest; LPS geometry."""
    spacing = np.linalg.norm(lps_matrix, axis=0)
    direction = lps_matrix / spacing  # columns: the LPS directions of the i, j, k axes
    numbers = lambda values: " ".join(f"{float(v):.12g}" for v in values)  # noqa: E731
    raw = header.with_suffix(".raw")
    raw.write_bytes(np.ascontiguousarray(volume.astype("<i2").transpose(2, 1, 0)).tobytes())
    header.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"CompressedData = False\nTransformMatrix = {numbers(direction.T.ravel())}\n"
        f"Offset = {numbers(origin)}\nCenterOfRotation = 0 0 0\nAnatomicalOrientation = RAI\n"
        f"ElementSpacing = {numbers(spacing)}\nDimSize = {' '.join(str(n) for n in volume.shape)}\n"
        f"ElementType = MET_SHORT\nElementDataFile = {raw.name}\n"
    )


def write_series(out: Path, size: int, spacing, rng: np.random.Generator, layout: str = "nifti",
                 subset: int = 0, flip: bool = True) -> tuple[str, list[list[str]]]:
    """Write one volume; return its uid and its annotation rows (LPS world mm)."""
    uid = series_uid(rng)
    shape, lps_matrix, origin, affine = geometry(size, spacing, rng, flip)
    voxel_mm = np.abs(np.diag(lps_matrix))
    body, lungs = lung_masks(shape)
    nodules = place_nodules(lungs, voxel_mm, rng)
    volume = render(shape, voxel_mm, body, lungs, nodules, rng)
    if layout == "luna16":
        write_metaimage(out / f"subset{subset}" / f"{uid}.mhd", volume, lps_matrix, origin)
    else:
        image = nib.Nifti1Image(volume, affine)
        image.header.set_xyzt_units("mm")
        image.set_qform(affine, code=1)  # scanner coordinates
        image.set_sform(affine, code=1)
        nib.save(image, out / "images" / f"{uid}.nii.gz")
    rows = []
    for centre, diameter in nodules:
        world = origin + lps_matrix @ centre  # ITK/LPS world position of the nodule centre
        rows.append([uid, *(f"{v:.6f}" for v in world), f"{diameter:.6f}"])
    return uid, rows


def generate(out: Path, n_train: int, n_val: int, seed: int, size: int = 64,
             spacing: tuple[float, float, float] = DEFAULT_SPACING, layout: str = "nifti",
             flip_direction: bool = False) -> None:
    """Write ``n_train`` + ``n_val`` distinct, seed-dependent series and their annotations into ``out``.

    ``layout``: ``"nifti"`` (the default: images/, annotations/, split lists) or ``"luna16"`` (subsetN/ of
    MetaImage, top-level annotations.csv); ``flip_direction`` applies to ``"luna16"`` (NIfTI always flips).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    rng = np.random.default_rng(seed)
    luna16 = layout == "luna16"
    if luna16:
        for number in range(10):
            (out / f"subset{number}").mkdir(parents=True, exist_ok=True)
    else:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
    all_rows = []
    for split, count in (("train", n_train), ("val", n_val)):
        entries = []
        for index in range(count):
            subsets = LUNA16_SUBSETS[split]
            uid, rows = write_series(
                out, size, spacing, rng, layout, subsets[index % len(subsets)], flip_direction or not luna16
            )  # fmt: skip
            entries.append({"image": f"images/{uid}.nii.gz", "seriesuid": uid})
            all_rows.extend(rows)
        if not luna16:
            (out / f"{split}_data.json").write_text(json.dumps({SPLIT_KEYS[split]: entries}, indent=2) + "\n")
    csv_path = out / "annotations.csv" if luna16 else out / "annotations" / "annotations.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(ANNOTATION_COLUMNS)
        writer.writerows(all_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n-train", type=int, required=True, help="number of train series")
    parser.add_argument("--n-val", type=int, required=True, help="number of val series")
    parser.add_argument("--seed", type=int, required=True, help="random seed (use one per site)")
    parser.add_argument("--size", type=int, default=64, help="voxels along x and y (z gets size // 2)")
    parser.add_argument(
        "--spacing", type=float, nargs=3, default=DEFAULT_SPACING, metavar=("X", "Y", "Z"),
        help="voxel spacing in mm before the per-series x/y jitter",
    )  # fmt: skip
    parser.add_argument("--layout", choices=LAYOUTS, default="nifti",
                        help="nifti (default): images/ + split lists; luna16: subsetN/<uid>.mhd/.raw as distributed")
    parser.add_argument("--flip-direction", action="store_true",
                        help="luna16 layout: flip at least one axis (default: identity direction, as in LUNA16)")
    args = parser.parse_args()
    generate(args.out, args.n_train, args.n_val, args.seed, args.size, tuple(args.spacing), args.layout,
             args.flip_direction)  # fmt: skip
    print(f"wrote {args.n_train} train + {args.n_val} val series to {args.out}")


if __name__ == "__main__":
    main()
