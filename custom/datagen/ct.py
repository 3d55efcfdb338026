"""Deterministic generator of abdominal CT demo data, in the project's lists or as an MSD task ships.

The ``project`` layout (the default: the project's own decathlon-style lists) writes into ``OUT``::

    train_data.json   {"training": [{"image": "imagesTr/ct_0001.nii.gz", "label": "labelsTr/ct_0001.nii.gz"}, ...]}
    val_data.json     the same for the validation cases
    imagesTr/ct_NNNN.nii.gz   int16 Hounsfield units
    labelsTr/ct_NNNN.nii.gz   uint8 labels, 0 = background, 1..13 = the BTCV organs of ``LABELS``

Every volume is a small CT-like abdomen: air (-1000 HU) around an elliptic body of soft
tissue (~40 HU) under a rim of subcutaneous fat (~-100 HU), a vertebra (bone), and
organ-like structures drawn as ellipsoids and tubes (liver large in the right upper
abdomen, spleen left posterior, paired kidneys posterior, aorta and IVC as vertical
tubes in front of the spine, ...). Each organ has its own mean intensity, position and
size, jittered per volume, plus Gaussian noise, so that a network can learn the organs
from intensity and position. The adrenal glands and the portal/splenic veins are too
small at demo sizes and are never drawn; the gallbladder is missing from some volumes
(as after a cholecystectomy), so organs absent from a volume are exercised too.

The voxel grid is stored as DICOM-converted CT usually is: the affine has anisotropic
spacing (1.5 x 1.5 x 2.0 mm), flipped first two axes (LPS-like voxel order) and a
non-zero origin, so a reader must honour the affine (orientation and spacing).

The ``msd`` layout writes what a Medical Segmentation Decathlon task ships: ``dataset.json`` (name,
description, reference, licence, tensorImageSize, modality, labels, numTraining, numTest, training, test),
``imagesTr/abdomen_NNN.nii.gz``, ``labelsTr/abdomen_NNN.nii.gz`` and ``imagesTs/`` (one test image). All
``n_train + n_val`` cases go into ``training`` (MSD has no validation list: the trainer splits it by the site's
``msd_split``). Its labels are numbered and named as another source would (``MSD_LABELS``: BTCV's short names in
another order) and add ``vertebrae`` (the spine, background for the job), so the job's ``trainer.label_remap``
and the data check's unmapped-label report are exercised; after the remap a case's label equals the project one.

``--dicom`` writes each image (either layout) as a DICOM series folder, as a PACS export holds it: one CT file
per slice (``NNNN.dcm``), stored values = HU + 1024 with RescaleSlope 1 / RescaleIntercept -1024,
ImagePositionPatient / ImageOrientationPatient / PixelSpacing / SliceThickness from the affine (LPS), one
SeriesInstanceUID per case; every UID is derived from the seed and the case. Labels stay NIfTI in the series'
geometry.

The same arguments give identical files (gzip headers carry no timestamp; DICOM files carry no date).

    cd custom && python -m datagen.ct --out DIR --n-train 10 --n-val 4 --seed 1 [--size 48]   # the demo sizes
    cd custom && python -m datagen.ct --out DIR --n-train 10 --n-val 4 --seed 1 --layout msd --dicom
"""

import argparse
import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = [  # BTCV order: label value = index + 1
    "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_and_splenic_veins", "pancreas", "right_adrenal_gland", "left_adrenal_gland",
]  # fmt: skip
SPACING = (1.5, 1.5, 2.0)  # mm per voxel along the stored axes
AIR_HU, FAT_HU, TISSUE_HU, BONE_HU = -1000.0, -100.0, 40.0, 450.0
NOISE_HU = 15.0  # standard deviation of the Gaussian noise
GALLBLADDER_RATE = 0.75  # share of volumes that have a gallbladder

# Organs in painting order (later ones overwrite earlier ones). Positions and radii are
# fractions of the body's semi-axes in patient coordinates: u to the patient's right,
# v anterior, w superior (RAS). Ellipsoids: centre (u, v, w) and radii (u, v, w);
# tubes: a vertical cylinder at centre (u, v) of the given radius, from w0 to w1.
ORGANS = [
    {"name": "liver", "hu": 95.0, "centre": (0.35, 0.05, 0.3), "radii": (0.45, 0.55, 0.5)},
    {"name": "spleen", "hu": 125.0, "centre": (-0.55, -0.2, 0.3), "radii": (0.3, 0.35, 0.4)},
    {"name": "stomach", "hu": 15.0, "centre": (-0.3, 0.4, 0.3), "radii": (0.32, 0.3, 0.35)},
    {"name": "right_kidney", "hu": 190.0, "centre": (0.45, -0.45, -0.25), "radii": (0.24, 0.28, 0.4)},
    {"name": "left_kidney", "hu": 190.0, "centre": (-0.45, -0.45, -0.2), "radii": (0.24, 0.28, 0.4)},
    {"name": "gallbladder", "hu": -5.0, "centre": (0.3, 0.5, -0.1), "radii": (0.17, 0.18, 0.25)},
    {"name": "pancreas", "hu": 70.0, "centre": (-0.1, 0.1, -0.1), "radii": (0.45, 0.16, 0.16)},
    {"name": "aorta", "hu": 230.0, "centre": (-0.1, -0.45), "radius": 0.15, "w": (-1.0, 1.0)},
    {"name": "inferior_vena_cava", "hu": 150.0, "centre": (0.2, -0.38), "radius": 0.14, "w": (-1.0, 0.55)},
    {"name": "esophagus", "hu": 30.0, "centre": (-0.05, -0.25), "radius": 0.11, "w": (0.6, 1.0)},
]  # fmt: skip
BODY_SEMI_AXES = (0.44, 0.36)  # body ellipse (left-right, anterior-posterior) as fractions of the field of view
FAT_RIM = 0.85  # normalised body radius beyond which the body is subcutaneous fat
SPINE = {"centre": (0.0, -0.78), "radius": 0.16}
LAYOUTS = ("project", "msd")
# The msd layout's label numbering and names (another source's): BTCV short names in another order, plus the
# spine ("vertebrae"), which the job's label_remap does not name: it becomes background.
MSD_LABELS = [
    "background", "liver", "spleen", "rkid", "lkid", "gall", "eso", "sto", "aorta", "IVC", "veins", "pancreas",
    "rad", "lad", "vertebrae",
]  # fmt: skip
MSD_JOB_NAMES = {  # msd name -> job label (LABELS) it stands for
    "liver": "liver", "spleen": "spleen", "rkid": "right_kidney", "lkid": "left_kidney", "gall": "gallbladder",
    "eso": "esophagus", "sto": "stomach", "aorta": "aorta", "IVC": "inferior_vena_cava",
    "veins": "portal_and_splenic_veins", "pancreas": "pancreas", "rad": "right_adrenal_gland",
    "lad": "left_adrenal_gland",
}  # fmt: skip
N_TEST = 1  # test images the msd layout ships (imagesTs/)
HU_OFFSET = 1024  # DICOM stored value = HU + HU_OFFSET (RescaleIntercept = -HU_OFFSET)
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root, for UIDs derived from the seed


def affine_for(size: int, rng: np.random.Generator) -> np.ndarray:
    """A DICOM-like affine: anisotropic spacing, first two axes flipped, non-zero origin."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    centre = np.array([20.0, 180.0, -400.0]) + rng.uniform(-10.0, 10.0, size=3)  # world position of the centre
    affine[:3, 3] = centre - affine[:3, :3] @ np.full(3, (size - 1) / 2)
    return affine


def world_grid(size: int, affine: np.ndarray) -> np.ndarray:
    """World (RAS, mm) coordinates of every voxel, shape (3, size, size, size)."""
    index = np.indices((size, size, size), dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:]).reshape(3, size, size, size)


def render_volume(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One case: int16 HU image, uint8 label (job numbering), the affine and the spine mask (background)."""
    affine = affine_for(size, rng)
    world = world_grid(size, affine)
    centre = affine[:3, :3] @ np.full(3, (size - 1) / 2) + affine[:3, 3]
    fov = np.array(SPACING) * size
    scale = rng.uniform(0.9, 1.05)  # body size
    semi = np.array([BODY_SEMI_AXES[0] * fov[0], BODY_SEMI_AXES[1] * fov[1], 0.5 * fov[2]]) * scale
    shift = np.append(rng.uniform(-0.04, 0.04, size=2) * fov[:2], 0.0)
    u, v, w = ((world[i] - centre[i] - shift[i]) / semi[i] for i in range(3))
    # u is +right because RAS x already points to the patient's right

    body_radius = np.hypot(u, v)
    body = body_radius < 1.0
    image = np.full(u.shape, AIR_HU)
    image[body] = TISSUE_HU
    image[body & (body_radius > FAT_RIM * rng.uniform(0.95, 1.03))] = FAT_HU
    spine = np.hypot(u - SPINE["centre"][0], v - SPINE["centre"][1]) < SPINE["radius"]
    image[spine & body] = BONE_HU
    label = np.zeros(u.shape, dtype=np.uint8)

    for organ in ORGANS:
        jitter = rng.uniform(-0.06, 0.06, size=3)
        grow = rng.uniform(0.85, 1.15)
        if organ["name"] == "gallbladder" and rng.random() >= GALLBLADDER_RATE:
            continue
        if "radii" in organ:  # ellipsoid
            c, r = np.add(organ["centre"], jitter), np.multiply(organ["radii"], grow)
            mask = ((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2 + ((w - c[2]) / r[2]) ** 2 < 1.0
        else:  # tube
            c, r = np.add(organ["centre"], jitter[:2]), organ["radius"] * grow
            w0, w1 = organ["w"]
            mask = (np.hypot(u - c[0], v - c[1]) < r) & (w >= w0 + jitter[2]) & (w <= w1 + jitter[2])
        mask &= body & ~spine
        image[mask] = organ["hu"] + rng.uniform(-10.0, 10.0)
        label[mask] = LABELS.index(organ["name"]) + 1

    image += rng.normal(0.0, NOISE_HU, size=image.shape)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label, affine, spine & body


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``data`` as a gzipped NIfTI-1 file with a timestamp-free gzip header."""
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    buffer = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    path.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0))


def dicom_geometry(affine: np.ndarray) -> dict:
    """The DICOM (LPS) geometry of a RAS ``affine`` whose first two axes are in-plane and third is the slice normal:
    row/column direction cosines, pixel spacing (row, column), slice spacing and the LPS affine."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    cosines = lps[:3, :3] / spacing
    if not np.allclose(np.cross(cosines[:, 0], cosines[:, 1]), cosines[:, 2]):
        raise ValueError("the affine's third axis must be the slice normal (row x column)")
    return {"row": cosines[:, 0], "column": cosines[:, 1], "pixel_spacing": [spacing[1], spacing[0]],
            "slice_spacing": spacing[2], "lps": lps}  # fmt: skip


def write_dicom_series(image: np.ndarray, affine: np.ndarray, folder: Path, uids: dict) -> None:
    """Write ``image`` (int16 HU, axes i, j, k with the RAS ``affine``) as a CT series: one file per k slice.

    A slice's pixel (row r, column c) is voxel (c, r, k): DICOM columns run along i, rows along j.
    """
    import pydicom  # only the --dicom output needs it
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    geometry = dicom_geometry(affine)
    folder.mkdir(parents=True)
    columns, rows, slices = image.shape
    for k in range(slices):
        sop_uid = generate_uid(UID_ROOT, [uids["series"], f"/slice {k}"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop_uid, "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
        ds.FrameOfReferenceUID = uids["frame"]
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        position = geometry["lps"] @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position[:3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in [*geometry["row"], *geometry["column"]]]
        ds.PixelSpacing = [f"{v:.4f}" for v in geometry["pixel_spacing"]]
        ds.SliceThickness = f"{geometry['slice_spacing']:.4f}"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -HU_OFFSET, 1, "HU"
        ds.PixelData = (image[:, :, k].T.astype(np.int32) + HU_OFFSET).astype("<u2").tobytes()
        pydicom.dcmwrite(folder / f"{k + 1:04d}.dcm", ds, enforce_file_format=True)


def case_uids(seed: int, case_name: str) -> dict:
    """Study, series and frame-of-reference UIDs of one case, derived from the seed and the case's name."""
    from pydicom.uid import generate_uid

    return {kind: generate_uid(UID_ROOT, [f"seed {seed}/{case_name}/{kind}"]) for kind in ("study", "series", "frame")}


def save_image(image: np.ndarray, affine: np.ndarray, stem: Path, dicom: bool, seed: int) -> str:
    """Write an image as ``stem.nii.gz`` or, with ``dicom``, as the DICOM series folder ``stem/``; its file name."""
    if dicom:
        write_dicom_series(image, affine, stem, case_uids(seed, stem.name))
        return stem.name
    save_nifti(image, affine, stem.with_name(stem.name + ".nii.gz"))
    return stem.name + ".nii.gz"


def write_split(out: Path, json_name: str, case_ids: list[int], size: int, rng, dicom: bool, seed: int) -> None:
    """Write the cases of one split and its decathlon-style list (the project layout)."""
    entries = []
    for case_id in case_ids:
        image, label, affine, _ = render_volume(size, rng)
        name = f"ct_{case_id:04d}"
        entry = {"image": f"imagesTr/{save_image(image, affine, out / 'imagesTr' / name, dicom, seed)}",
                 "label": f"labelsTr/{name}.nii.gz"}  # fmt: skip
        save_nifti(label, affine, out / entry["label"])
        entries.append(entry)
    (out / json_name).write_text(json.dumps({"training": entries}, indent=2) + "\n")


def msd_label(label: np.ndarray, spine: np.ndarray) -> np.ndarray:
    """A job-numbered ``label`` in the msd numbering (``MSD_LABELS``), the spine labelled ``vertebrae``."""
    lookup = np.zeros(len(LABELS) + 1, dtype=np.uint8)
    for value, name in enumerate(MSD_LABELS):
        if name in MSD_JOB_NAMES:
            lookup[LABELS.index(MSD_JOB_NAMES[name]) + 1] = value
    out = lookup[label]
    out[spine] = MSD_LABELS.index("vertebrae")
    return out


def write_msd(out: Path, n_cases: int, size: int, rng: np.random.Generator, dicom: bool, seed: int) -> None:
    """Write an MSD task: ``n_cases`` training cases, ``N_TEST`` test images and ``dataset.json``."""
    training, test = [], []
    for case_id in range(1, n_cases + N_TEST + 1):
        image, label, affine, spine = render_volume(size, rng)
        name = f"abdomen_{case_id:03d}"
        if case_id > n_cases:
            test.append(f"./imagesTs/{save_image(image, affine, out / 'imagesTs' / name, dicom, seed)}")
            continue
        entry = {"image": f"./imagesTr/{save_image(image, affine, out / 'imagesTr' / name, dicom, seed)}",
                 "label": f"./labelsTr/{name}.nii.gz"}  # fmt: skip
        save_nifti(msd_label(label, spine), affine, out / entry["label"])
        training.append(entry)
    dataset = {
        "name": "SyntheticAbdomen", "description": "Synthetic abdominal CT, multi-organ (demo data)",
        "reference": "generated by datagen.ct", "licence": "CC-BY-SA 4.0", "release": "1.0",
        "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {str(value): name for value, name in enumerate(MSD_LABELS)},
        "numTraining": len(training), "numTest": len(test), "training": training, "test": test,
    }  # fmt: skip
    (out / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")


def generate(
    out: Path, n_train: int, n_val: int, seed: int, size: int = 48, layout: str = "project", dicom: bool = False
) -> None:
    """Write ``n_train`` + ``n_val`` cases into ``out`` in ``layout`` (see the module docstring)."""
    if n_train < 1 or n_val < 1 or size < 16:
        raise ValueError("need n_train >= 1, n_val >= 1 and size >= 16")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    rng = np.random.default_rng(seed)
    folders = ("imagesTr", "labelsTr") + (("imagesTs",) if layout == "msd" else ())
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    if layout == "msd":
        write_msd(out, n_train + n_val, size, rng, dicom, seed)
        return
    write_split(out, "train_data.json", list(range(1, n_train + 1)), size, rng, dicom, seed)
    write_split(out, "val_data.json", list(range(n_train + 1, n_train + n_val + 1)), size, rng, dicom, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n-train", type=int, required=True, help="number of training cases")
    parser.add_argument("--n-val", type=int, required=True, help="number of validation cases")
    parser.add_argument("--seed", type=int, required=True, help="random seed (use one per site)")
    parser.add_argument("--size", type=int, default=48, help="voxels along each axis")
    parser.add_argument("--layout", choices=LAYOUTS, default="project", help="the project's lists or an MSD task")
    parser.add_argument("--dicom", action="store_true", help="images as DICOM series folders (one file per slice)")
    args = parser.parse_args()
    generate(args.out, args.n_train, args.n_val, args.seed, args.size, args.layout, args.dicom)
    kind = "DICOM-series" if args.dicom else "NIfTI"
    print(f"wrote {args.n_train} train + {args.n_val} val {kind} CT cases of {args.size}^3 voxels ({args.layout} "
          f"layout) to {args.out}")


if __name__ == "__main__":
    main()
