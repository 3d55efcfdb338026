"""A fetched model as a MONAI bundle that runs without this repository.

    from ops.bundle import write_bundle, passport_from_result
    passport = passport_from_result(result_dir, job, job_name, job_id)   # facts of a downloaded job result
    write_bundle(job, state_dict, passport, out_dir)                     # job: hcls.job_config.JobConfig

writes, in MONAI's bundle layout::

    out_dir/models/model.pt          the state_dict (plain tensors)
    out_dir/configs/inference.json   MONAI bundle inference workflow (ConfigWorkflow, "inference" properties)
    out_dir/configs/metadata.json    MONAI metadata, plus "passport": where the model comes from
    out_dir/configs/logging.conf     the logging MONAI's bundle tools set up (as model-zoo bundles have)
    out_dir/docs/README.md           what the model is and how to run it
    out_dir/scripts/detection.py     detection jobs only: evaluator, inferer and saver (as MONAI's
                                     lung_nodule_ct_detection bundle ships its own scripts/)

Everything comes from the job as NVFlare ran it (``JobConfig``): the network is the server persistor's
model, the pre-processing is the job trainer's ``inference_preprocessing(trainer settings)`` (the
transforms its validation applies to an image, taken from the job's own code), the inferer and the
detector settings are the trainer settings. Run it with MONAI's bundle tools (they need ``fire`` and
``pytorch-ignite`` besides MONAI)::

    python -m monai.bundle run --config_file B/configs/inference.json --meta_file B/configs/metadata.json \\
        --bundle_root B --input IMAGE --output_dir OUT

Networks: MONAI classes (``monai.networks.nets.*``) are named as they are; a class of this repository describes
itself with MONAI's parts (``NoduleRetinaNet.bundle_config``: MONAI's ResNet, ``resnet_fpn_feature_extractor`` and
``RetinaNet``, same state_dict keys and shapes). Any other network is refused (``BundleError``).

The passport (``metadata.json`` key ``passport``) records facts read from the job result; a fact that
cannot be read is ``null`` with the reason, never guessed.
"""

import hashlib
import importlib.util
import json
import math
import re
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

BUNDLE_VERSION = "1.0.0"
SERVER_BEST_MODEL = "SRV_best_FL_global_model.pt"  # the server's best global model in cross_val_results.json
ACCEPTED = re.compile(r"Contribution from (\S+) (ACCEPTED|REJECTED) by the aggregator at round (\d+)")
ROUND_STARTED = re.compile(r"Round (\d+) started")
BEST = re.compile(r"new best validation metric at round (\d+): (\S+)")
LICENCE_NOTE = (
    "No licence is granted by this bundle. The weights were trained by federated learning on the participating "
    "sites' data under their data-use agreements; ask the federation's data owners before any use beyond them. "
    "Not a medical device: research use only."
)
IMAGE_PATTERNS = {"classification": ("*.jpg", "*.jpeg", "*.png"), "segmentation": ("*.nii.gz", "*.nii"),
                  "detection": ("*.nii.gz", "*.nii")}  # fmt: skip
TASKS = {  # the job's trainer (client config "app_script") -> what its model does
    "cxr_classification": "classification",
    "ct_segmentation": "segmentation",
    "lung_nodule_detection": "detection",
}


SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
IGNITE_MIN = "0.4.11"  # monai.utils.IgniteInfo.OPT_IMPORT_VERSION: the oldest pytorch-ignite MONAI 1.x accepts
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


class BundleError(ValueError):
    pass


# ---------------------------------------------------------------- the job


def task_of(job) -> str:
    script = Path(str(job.client.get("app_script", ""))).stem
    if script not in TASKS:
        raise BundleError(f"{job.client_path}: app_script {script!r} is none of {', '.join(TASKS)}: no bundle for it")
    return TASKS[script]


def job_preprocessing(job) -> tuple[list[dict], str]:
    """The trainer's ``inference_preprocessing(trainer settings)`` and where it came from.

    The job's own code (``<app>/custom/<app_script>``) is used when it has the function; a job built before
    trainers had it falls back to this repository's trainer module (the source says so).
    """
    script = str(job.client.get("app_script", ""))
    trainer = job.trainer()
    path = job.app_dir / "custom" / script
    if path.is_file() and "def inference_preprocessing" in path.read_text():
        module = _import_job_module(path)
        return module.inference_preprocessing(trainer), f"the job's own code: {path.parent.name}/{path.name}"
    module = importlib.import_module(Path(script).stem)  # this repository's custom/ on PYTHONPATH
    return module.inference_preprocessing(trainer), (
        f"this repository's {Path(script).name} at fetch time: the job's code has no inference_preprocessing"
    )


def _import_job_module(path: Path):
    """Import a trainer file of a job under a private name; modules it brings from the job's folder are dropped."""
    before = set(sys.modules)
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"_hcls_job_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))
        for name in set(sys.modules) - before:  # keep this process's imports as they were
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith(str(path.parent)):
                del sys.modules[name]


def network_config(network: dict) -> dict:
    """Bundle config entries for the job's network (``{"path", "args"}``): ``network_def`` and its parts.

    A MONAI (or torch) class is named as it is; a class of the job's own code describes itself with MONAI's
    parts through a ``bundle_config(**args)`` class method (``NoduleRetinaNet``), so the bundle needs no code
    of this repository.
    """
    path, args = network["path"], dict(network.get("args", {}))
    _check_plain(args, f"network {path} args")
    if path.split(".")[0] in ("monai", "torch", "torchvision"):
        return {"network_def": {"_target_": path, **args}}
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise BundleError(f"network {path} cannot be imported: {err}") from None
    if not hasattr(cls, "bundle_config"):
        raise BundleError(
            f"network {path} needs this repository's code and has no bundle_config() describing it with MONAI's parts"
        )
    try:
        return cls.bundle_config(**args)
    except TypeError as err:
        raise BundleError(f"network {path}: {err}") from None


def _check_plain(value, where: str) -> None:
    """Network args must stay literal in a bundle config: no strings that MONAI's parser would evaluate."""
    if isinstance(value, dict):
        if "_target_" in value:
            raise BundleError(f"{where}: '_target_' would be instantiated by MONAI's config parser")
        for v in value.values():
            _check_plain(v, where)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_plain(v, where)
    elif isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise BundleError(f"{where}: {value!r} would be evaluated by MONAI's config parser")


# ---------------------------------------------------------------- configs/inference.json


def inference_config(job, task: str, preprocessing: list[dict]) -> dict:
    """The bundle's inference workflow (MONAI ConfigWorkflow with the "inference" properties)."""
    trainer = job.trainer()
    patterns = IMAGE_PATTERNS[task]
    globs = " + ".join(f"glob.glob(os.path.join(@dataset_dir, '**', '{p}'), recursive=True)" for p in patterns)
    config = {
        "imports": ["$import glob", "$import os", "$import sys"],
        "bundle_root": ".",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "input": "",
        "image_files": f"$sorted(set({globs}))",
        "datalist": "$[{'image': os.path.abspath(@input)}] if @input else [{'image': f} for f in @image_files]",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        **network_config(job.network),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "checkpoint": {"_target_": "CheckpointLoader", "load_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
                       "load_dict": {"model": "@network"}, "map_location": "@device", "strict": True},
    }  # fmt: skip
    evaluator = {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
        "amp": False,
    }
    if task == "classification":
        labels = trainer["labels"]
        config.update({
            "labels": labels,
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]},
            "handlers": [
                "@checkpoint",
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "ClassificationSaver", "output_dir": "@output_dir", "filename": "predictions.csv",
                 "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
                 "output_transform": "$lambda output: [item['pred'] for item in output]"},
            ],
        })  # fmt: skip
    elif task == "segmentation":
        config.update({
            "labels": ["background", *trainer["labels"]],
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": trainer["roi_size"],
                        **trainer.get("sliding_window", {})},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                # back to the input image's grid (undoes crop, resampling and orientation), then labels
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                 "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
                 "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False},
            ]},
            "handlers": ["@checkpoint", {"_target_": "StatsHandler", "iteration_log": False}],
        })  # fmt: skip
    else:
        inference, anchors = trainer["inference"], trainer["anchors"]
        config.update({
            "labels": ["nodule"],
            "infer_patch_size": trainer["val_patch_size"],
            "score_thresh": inference["score_thresh"],
            "topk_candidates_per_level": inference["topk_candidates_per_level"],
            "nms_thresh": inference["nms_thresh"],
            "detections_per_img": inference["detections_per_img"],
            "anchor_generator": {
                "_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
                "feature_map_scales": anchors["feature_map_scales"],
                "base_anchor_shapes": anchors["base_anchor_shapes"],
            },
            "detector": {"_target_": "monai.apps.detection.networks.retinanet_detector.RetinaNetDetector",
                         "network": "@network", "anchor_generator": "@anchor_generator"},
            "detector_ops": [
                "$@detector.set_target_keys(box_key='box', label_key='label')",
                "$@detector.set_box_selector_parameters(score_thresh=@score_thresh, "
                "topk_candidates_per_level=@topk_candidates_per_level, nms_thresh=@nms_thresh, "
                "detections_per_img=@detections_per_img)",
                "$@detector.set_sliding_window_inferer(roi_size=@infer_patch_size, overlap=0.25, sw_batch_size=1, "
                "mode='constant', device='cpu')",
            ],
            # the bundle's own scripts/ package, wherever the bundle lies and whatever the working directory
            "scripts_on_path": "$None if os.path.abspath(@bundle_root) in sys.path "
                               "else sys.path.insert(0, os.path.abspath(@bundle_root))",
            "inferer": {"_target_": "scripts.detection.RetinaNetInferer", "_requires_": "@scripts_on_path",
                        "detector": "@detector"},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "CopyItemsd", "keys": "box", "names": "box_voxel"},
                # the trainer's boxes put voxel k at [k, k+1] (lung_nodule_detection.voxel_box_corners):
                # back to voxel-centre indices, then through the pre-processed image's affine to LPS world mm
                {"_target_": "Lambdad", "keys": "box", "func": "$lambda box: box - 0.5"},
                {"_target_": "AffineBoxToWorldCoordinated", "box_keys": "box", "box_ref_image_keys": "image",
                 "affine_lps_to_ras": True},
                {"_target_": "ConvertBoxModed", "box_keys": "box", "src_mode": "xyzxyz", "dst_mode": "cccwhd"},
            ]},
            "handlers": [
                "@checkpoint",
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "scripts.detection.DetectionSaver", "_requires_": "@scripts_on_path",
                 "output_dir": "@output_dir",
                 "filename": "predictions.json", "labels": "@labels"},
            ],
        })  # fmt: skip
        evaluator.update({"_target_": "scripts.detection.DetectionEvaluator",
                          "_requires_": ["@scripts_on_path", "@detector_ops"]})
        config["dataloader"]["collate_fn"] = "$monai.data.utils.no_collation"
    config["evaluator"] = evaluator
    config["run"] = ["$@evaluator.run()"]
    return config


# ---------------------------------------------------------------- configs/metadata.json


def _version(package: str):
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def metadata(job, task: str, job_name: str, passport: dict) -> dict:
    import numpy
    import torch

    import monai

    trainer, network = job.trainer(), job.network
    required = {"nvflare": _version("nvflare")}
    required["pillow" if task == "classification" else "nibabel"] = _version(
        "pillow" if task == "classification" else "nibabel"
    )
    if task == "detection":
        required["torchvision"] = _version("torchvision")
    # MONAI's bundle tools: `python -m monai.bundle` needs fire, its engines and handlers pytorch-ignite
    required.update({"pytorch-ignite": _version("pytorch-ignite") or IGNITE_MIN, "fire": _version("fire") or "any"})
    best = passport["best"]["value"] or {}
    meta = {
        "schema": SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"best global model of NVFlare job {passport['job_id']} ({job_name})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {k: v for k, v in required.items() if v},
        "name": f"{job_name} (federated, NVFlare job {passport['job_id']})",
        "task": {
            "classification": "Chest X-ray multi-label classification",
            "segmentation": "CT multi-organ segmentation",
            "detection": "Lung nodule detection in chest CT",
        }[task],
        "description": f"{_meta_description(job) or job_name}. The server's best global model (by "
        f"{job.key_metric}) of NVFlare job {passport['job_id']}; network {network['path']}.",
        "authors": "the federation's sites (see passport.sites), fetched with the HCLS AI factory's make fetch-model",
        "copyright": "the federation's data owners and operators",
        "data_source": "the participating sites' own data; it never left them",
        "data_type": "jpeg/png" if task == "classification" else "nifti",
        "intended_use": "Research and evaluation of the federated model only; not for clinical decisions.",
        "license": LICENCE_NOTE,
        "eval_metrics": {job.key_metric: best.get("value")},
        "references": [],
        "network_data_format": network_data_format(task, trainer, job.network),
        "passport": passport,
    }
    if task == "classification":
        meta["label_classes"] = trainer["labels"]
    return meta


def _meta_description(job) -> str:
    meta = job.app_dir.parent / "meta.json"
    try:
        return json.loads(meta.read_text()).get("description", "")
    except (OSError, ValueError):
        return ""


def _tensor(kind: str, fmt: str, shape: list, names: list[str], patch: bool, value_range=(0, 1), **extra) -> dict:
    """One entry of MONAI's network_data_format (an input or an output)."""
    return {
        "type": kind, "format": fmt, **extra, "num_channels": len(names), "spatial_shape": shape, "dtype": "float32",
        "value_range": list(value_range), "is_patch_data": patch, "channel_def": dict(enumerate(names)),
    }  # fmt: skip


def network_data_format(task: str, trainer: dict, network: dict) -> dict:
    """MONAI's network_data_format of the job's network: what goes in, what comes out."""
    if task == "classification":
        labels = trainer["labels"]
        image = _tensor("image", "magnitude", list(trainer["image_size"]), ["image"], False, modality="XR")
        pred = _tensor("probabilities", "classes", [len(labels)], labels, False)
    elif task == "segmentation":
        image = _tensor("image", "hounsfield", list(trainer["roi_size"]), ["image"], True, modality="CT")
        pred = _tensor("image", "segmentation", list(trainer["roi_size"]), ["background", *trainer["labels"]], True)
    else:
        image = _tensor("image", "hounsfield", list(trainer["val_patch_size"]), ["image"], False, modality="CT")
        columns = ["coordX (LPS mm)", "coordY (LPS mm)", "coordZ (LPS mm)", "width (mm)", "height (mm)", "depth (mm)",
                   "score"]  # fmt: skip
        pred = _tensor("object", "bbox", ["*", len(columns)], columns, False, value_range=("*", "*"))
    return {"inputs": {"image": image}, "outputs": {"pred": pred}}


# ---------------------------------------------------------------- the passport


def _fact(value, source: str = "", reason: str = "") -> dict:
    """A passport fact: its value and source, or null and why (a non-finite number is not a value)."""
    if isinstance(value, float) and not math.isfinite(value):
        value, reason = None, f"the recorded value is {value} ({source})"
    return {"value": value, "source": source} if value is not None else {"value": None, "reason": reason}


def _scalars(tb_dir: Path | None) -> tuple[dict, str]:
    """``{site: {tag: [(step, value), ...]}}`` from the server's TensorBoard receiver folder, and why empty."""
    if tb_dir is None or not Path(tb_dir).is_dir():
        return {}, "the job result has no tb_events/ (no TensorBoard receiver on the server)"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sites = {}
    for site_dir in sorted(p for p in Path(tb_dir).iterdir() if p.is_dir()):
        events = EventAccumulator(str(site_dir), size_guidance={"scalars": 0})
        events.Reload()
        sites[site_dir.name] = {
            tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags().get("scalars", [])
        }
    return sites, "" if sites else f"{tb_dir} holds no site folders"


def _log_facts(log: Path | None) -> tuple[dict, dict, str]:
    """Rounds with their accepted (and rejected) contributors, and the best round, from the server log."""
    if log is None:
        return {}, {}, "the job result has no server log.txt"
    rounds: dict[int, dict] = {}
    best = {}
    for line in log.read_text(errors="replace").splitlines():
        if m := ROUND_STARTED.search(line):
            rounds.setdefault(int(m.group(1)), {"accepted": [], "rejected": []})
        elif m := ACCEPTED.search(line):
            entry = rounds.setdefault(int(m.group(3)), {"accepted": [], "rejected": []})
            entry["accepted" if m.group(2) == "ACCEPTED" else "rejected"].append(m.group(1))
        elif m := BEST.search(line):
            best = {"round": int(m.group(1)), "value": float(m.group(2))}
    return rounds, best, ""


def passport_from_result(result: Path, job, job_name: str, job_id: str) -> dict:
    """The model passport of a downloaded job result (``download_job_result``'s folder); see the module docstring."""
    result = Path(result)
    key_metric = job.key_metric
    scalars, tb_reason = _scalars(_find(result, "tb_events"))
    log = _find(result, "log.txt")  # the server's job log (as ops.flare_admin reads the best round from)
    rounds, best, log_reason = _log_facts(log)
    cross_file = _find(result, "cross_val_results.json")
    cross = json.loads(cross_file.read_text()) if cross_file else None
    sites = sorted(set(scalars) | {s for r in rounds.values() for s in r["accepted"] + r["rejected"]}
                   | set(cross or {}))  # fmt: skip

    site_facts = {}
    for site in sites:
        n_train = scalars.get(site, {}).get("n_train")
        epsilon = scalars.get(site, {}).get("dp_epsilon")
        site_facts[site] = {
            "n_train": _fact(
                int(n_train[0][1]) if n_train else None, "the site's n_train scalar (tb_events)",
                tb_reason or f"{site} streamed no n_train scalar (a trainer from before the passport)",
            ),
            "dp_epsilon_spent": _fact(
                float(epsilon[-1][1]) if epsilon else None,
                f"the site's last dp_epsilon scalar (round {epsilon[-1][0]})" if epsilon else "",
                tb_reason or f"{site} streamed no dp_epsilon: it trained without differential privacy",
            ),
            "contributed_rounds": _fact(
                sorted(r for r, e in rounds.items() if site in e["accepted"]) if rounds else None,
                "server log.txt", log_reason or "the server log names no contribution",
            ),
        }  # fmt: skip

    cross_metric = {}
    if cross is not None:
        for site in sorted(cross):
            value = (cross[site].get(SERVER_BEST_MODEL) or {}).get(key_metric)
            cross_metric[site] = _fact(
                float(value) if isinstance(value, int | float) else None,
                f"cross_val_results.json[{site}][{SERVER_BEST_MODEL}]",
                f"{site} reported no {key_metric} for {SERVER_BEST_MODEL}",
            )
    num_rounds = None
    try:
        num_rounds = job.num_rounds
    except ValueError:
        pass
    return {
        "job": job_name,
        "job_id": job_id,
        "job_digest": _fact(job.digest(), f"sha256 of the job's app folder {job.app_dir.name}/ (code + configuration)"),
        "network": job.network,
        "key_metric": key_metric,
        "versions": {
            "nvflare": _version("nvflare"), "monai": _version("monai"), "torch": _version("torch"),
            "source": "the fetching environment; participants must run the same nvflare (mixed versions are "
                      "unsupported), and the job result does not record the sites' monai and torch",
        },  # fmt: skip
        "sites": _fact(site_facts or None, "tb_events, server log.txt, cross_val_results.json",
                       tb_reason or log_reason or "no site is named in the job result"),
        "rounds": _fact(
            {"planned": num_rounds, "run": sorted(rounds),
             "contributors": {str(r): e["accepted"] for r, e in sorted(rounds.items())},
             "rejected": {str(r): e["rejected"] for r, e in sorted(rounds.items()) if e["rejected"]}}
            if rounds else None,
            "server log.txt (ScatterAndGather)", log_reason or "the server log has no round lines",
        ),  # fmt: skip
        "best": _fact(
            {"round": best["round"], "key_metric": key_metric, "value": best["value"]} if best else None,
            "server log.txt (IntimeModelSelector: mean of the sites' key metric on the received global model)",
            log_reason or "the server log has no 'new best validation metric' line",
        ),
        "cross_site_validation": _fact(
            cross_metric or None,
            f"{key_metric} of the best global model on every site's validation data (cross_val_results.json)",
            "the job result has no cross_val_results.json (no cross-site validation ran)"
            if cross is None else "cross_val_results.json names no site",
        ),  # fmt: skip
        "model_sha256": None,  # written by write_bundle, of models/model.pt
        "licence": LICENCE_NOTE,
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _find(root: Path, name: str):
    hits = sorted(Path(root).rglob(name)) if Path(root).is_dir() else []
    return hits[0] if hits else None


# ---------------------------------------------------------------- writing


def write_bundle(job, state_dict: dict, passport: dict, out_dir: Path, job_name: str = "",
                 preprocessing: list[dict] | None = None) -> Path:  # fmt: skip
    """Write the bundle of ``job``'s network with ``state_dict`` into ``out_dir`` (created; must not exist)."""
    import torch

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise BundleError(f"{out_dir} exists: a bundle is written into a new folder")
    task = task_of(job)
    job_name = job_name or passport.get("job") or job.app_dir.parent.name
    if preprocessing is None:
        preprocessing, source = job_preprocessing(job)
    else:
        source = "given by the caller"
    config = inference_config(job, task, preprocessing)
    for sub in ("models", "configs", "docs"):
        (out_dir / sub).mkdir(parents=True)
    model = out_dir / "models" / "model.pt"
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, model)
    passport = {**passport, "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                "preprocessing_source": source}  # fmt: skip
    meta = metadata(job, task, job_name, passport)
    (out_dir / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    (out_dir / "configs" / "logging.conf").write_text(LOGGING_CONF)
    if task == "detection":
        (out_dir / "scripts").mkdir()
        (out_dir / "scripts" / "__init__.py").write_text("")
        (out_dir / "scripts" / "detection.py").write_text(DETECTION_SCRIPT)
    (out_dir / "docs" / "README.md").write_text(readme(task, job_name, meta, passport))
    return out_dir


def _fmt(fact: dict, fmt=str) -> str:
    return fmt(fact["value"]) if fact.get("value") is not None else f"unknown ({fact.get('reason')})"


def _best_text(best: dict) -> str:
    return f"round {best['round']}, {best['value']:.4f}"


def readme(task: str, job_name: str, meta: dict, passport: dict) -> str:
    fmt = meta["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    example = {"classification": "chest_xray.jpg", "segmentation": "ct.nii.gz", "detection": "chest_ct.nii.gz"}[task]
    outputs = {
        "classification": "`eval/predictions.csv`: one row per image, the file name then one sigmoid score per "
        "label in `configs/metadata.json` `label_classes` order (also `network_data_format.outputs.pred.channel_def`).",
        "segmentation": "`eval/<image name>_seg.nii.gz`: a label map (uint8, 0 = background, 1..13 as in "
        "`network_data_format.outputs.pred.channel_def`) on the input image's own voxel grid and affine.",
        "detection": "`eval/predictions.json`: per image, `box` (N x 6: nodule centre coordX/Y/Z in LPS world mm "
        "and its size in mm, LUNA16's convention), `box_voxel` (N x 6 xyzxyz in the pre-processed image's voxels), "
        "`score` (N) and `label` (N, 0 = nodule).",
    }[task]
    lines = [
        f"# {job_name}: federated model (NVFlare job {passport['job_id']})",
        "",
        meta["description"],
        "",
        f"Intended use: {meta['intended_use']}",
        "",
        "## Inputs and outputs",
        "",
        f"- Input: one {image['modality']} image ({'JPEG/PNG' if task == 'classification' else 'NIfTI'}), "
        f"pre-processed exactly as the job's validation did (`preprocessing` in `configs/inference.json`) "
        f"to {image['num_channels']} channel, values {image['value_range']}"
        + (f", {image['spatial_shape']} pixels." if task == "classification" else "."),
        f"- Output: {outputs}",
        f"- Network: the job's `{passport['network']['path']}` {json.dumps(passport['network']['args'])}"
        + (" (spelled out in `configs/inference.json` with MONAI's ResNet, FPN feature extractor and RetinaNet, "
           "inside MONAI's RetinaNetDetector with the job's anchors, box selection and sliding window)"
           if task == "detection" else f" ({pred['num_channels']} output channels)")
        + "; weights in `models/model.pt` (a plain state_dict).",
        "",
        "## Running it",
        "",
        "Needs Python with " + ", ".join(
            f"{k}=={v}" for k, v in {"monai": meta["monai_version"], "torch": meta["pytorch_version"],
                                     **meta["required_packages_version"]}.items()
            if k not in ("nvflare", "pytorch-ignite", "fire")
        ) + ", and what MONAI's bundle tools need: `fire` and `pytorch-ignite` (>= "
        + f"{IGNITE_MIN}); not this repository, and not NVFlare.",
        "",
        "```bash",
        "python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\",
        "    --meta_file BUNDLE/configs/metadata.json --bundle_root BUNDLE \\",
        f"    --input {example} --output_dir OUT",
        "```",
        "",
        "Without `--input`, every image under `--dataset_dir` (default `BUNDLE/data`) is run. Other overrides: "
        "`--device`" + (", `--score_thresh`, `--nms_thresh`, `--detections_per_img`, `--infer_patch_size`"
                        if task == "detection" else "") + ".",
        "",
        "## Passport",
        "",
        f"- Job `{passport['job']}`, id `{passport['job_id']}`, job digest `{_fmt(passport['job_digest'])}`.",
        f"- Versions at fetch: nvflare {passport['versions']['nvflare']}, monai {passport['versions']['monai']}, "
        f"torch {passport['versions']['torch']}.",
        f"- Best round and {passport['key_metric']}: {_fmt(passport['best'], _best_text)}.",
    ]
    rounds = passport["rounds"]
    if rounds["value"]:
        contributors = "; ".join(f"{r}: {', '.join(s) or 'none'}" for r, s in rounds["value"]["contributors"].items())
        lines.append(f"- Rounds run {len(rounds['value']['run'])} of {rounds['value']['planned']}; "
                     f"contributions accepted per round: {contributors}.")  # fmt: skip
    else:
        lines.append(f"- Rounds: {_fmt(rounds)}.")
    sites = passport["sites"]
    if sites["value"]:
        for site, facts in sites["value"].items():
            cross = (passport["cross_site_validation"]["value"] or {}).get(site)
            lines.append(
                f"- Site `{site}`: {_fmt(facts['n_train'])} training samples; DP epsilon spent: "
                f"{_fmt(facts['dp_epsilon_spent'])}; {passport['key_metric']} of the best model on its validation "
                f"data: {_fmt(cross) if cross else _fmt(passport['cross_site_validation'])}."
            )
    else:
        lines.append(f"- Sites: {_fmt(sites)}.")
    lines += [
        f"- sha256 of models/model.pt: `{passport['model_sha256']}`.",
        f"- Pre-processing from {passport.get('preprocessing_source', 'the job')}.",
        "",
        "All facts, with their sources (or why one is unknown), are in `configs/metadata.json` under `passport`.",
        "",
        "## Licence",
        "",
        LICENCE_NOTE,
        "",
    ]
    return "\n".join(lines)


DETECTION_SCRIPT = '''"""Detection inference for this bundle (as in MONAI's lung_nodule_ct_detection bundle's scripts/).

MONAI's RetinaNetDetector takes a list of images (one volume each, no collation) and returns, per image, a
dict of boxes, labels and scores; MONAI's SupervisedEvaluator expects batched tensors. These three pieces
bridge the two; the detector itself is configured in configs/inference.json.
"""

import json
import os

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer


def prepare_batch(batchdata, device=None, non_blocking=False, **kwargs):
    """The images of a list batch (``no_collation``) as plain tensors on ``device``; no targets."""
    images = [item["image"].as_tensor() if isinstance(item["image"], MetaTensor) else item["image"]
              for item in batchdata]
    return [image.to(device=device, non_blocking=non_blocking, **kwargs) for image in images], None


class DetectionEvaluator(SupervisedEvaluator):
    """SupervisedEvaluator over list batches; output items: the detector's ``box``, ``label``, ``label_scores``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("prepare_batch", prepare_batch)
        super().__init__(*args, **kwargs)

    def _register_decollate(self):
        @self.on(IterationEvents.MODEL_COMPLETED)
        def _decollate(engine):
            engine.state.output = [dict(pred) for pred in engine.state.output["pred"]]


class RetinaNetInferer(Inferer):
    """Runs the detector on whole images; sliding windows only for an image larger than the window in some axis."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def __call__(self, inputs, network, *args, **kwargs):
        self.detector.network = network
        self.detector.training = network.training
        roi = self.detector.inferer.roi_size if self.detector.inferer is not None else None
        outputs = []
        for image in inputs:  # one volume at a time, as the job's validation did
            use_inferer = roi is not None and any(s > r for s, r in zip(image.shape[1:], roi))
            outputs += self.detector([image], use_inferer=use_inferer, *args, **kwargs)
        return outputs


class DetectionSaver:
    """Writes ``output_dir/filename``: per image, ``box`` (N x 6), ``box_voxel``, ``score`` (N), ``label`` (N)."""

    def __init__(self, output_dir: str, filename: str = "predictions.json", labels=("nodule",)):
        self.output_dir, self.filename, self.labels = output_dir, filename, list(labels)
        self.results = []

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.results.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def __call__(self, engine):
        for item, output in zip(engine.state.batch, engine.state.output):
            image = item["image"]
            meta = image.meta if isinstance(image, MetaTensor) else item.get("image_meta_dict", {})
            self.results.append({
                "image": str(meta.get("filename_or_obj", "")),
                "box": _list(output["box"]),
                "box_mode": "cccwhd, LPS world mm (LUNA16: coordX, coordY, coordZ, then the size)",
                "box_voxel": _list(output["box_voxel"]),
                "score": _list(output["label_scores"]),
                "label": _list(output["label"]),
                "label_names": self.labels,
            })

    def write(self, _engine=None):
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, self.filename), "w") as f:
            json.dump(self.results, f, indent=2)


def _list(value):
    return value.detach().cpu().tolist() if isinstance(value, torch.Tensor) else list(value)
'''
