"""GPU sizing: one production-profile training step of each job, with its peak GPU memory.

Checks the GPU memory that each job's meta.json asks of a site (resource_spec
mem_per_gpu_in_GiB). Each job runs its own trainer's data path, network, loss and
optimizer exactly as job_configs/<job>/ configure them (production profile), on data
from the project's generators at a size that fills the production crops, for one
optimizer step of one production batch:

    python -m ops.gpu_sizing --out gpu_sizing.json      (custom/ on PYTHONPATH; needs CUDA)
"""

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import hcls_common

REPO = Path(__file__).resolve().parents[2]
# job -> (generator module, generator arguments filling the production crop sizes)
GENERATORS = {
    "cxr_classification": ("datagen.cxr", ["--n-train", "16", "--n-val", "2", "--size", "320"]),
    "ct_segmentation": ("datagen.ct", ["--n-train", "2", "--n-val", "1", "--size", "112"]),
    "lung_nodule_detection": (
        "datagen.luna16",
        ["--n-train", "4", "--n-val", "1", "--size", "224", "--spacing", "0.703125", "0.703125", "1.25"],
    ),
}


def prepare_app(job: str, work: Path) -> Path:
    """A job app folder (config/) with the production configs, trimmed to one batch."""
    config_dir = work / job / "app" / "config"
    config_dir.mkdir(parents=True)
    for name in ("config_fed_server.json", "config_fed_client.json"):
        shutil.copy(REPO / "job_configs" / job / name, config_dir / name)
    client_path = config_dir / "config_fed_client.json"
    client = json.loads(client_path.read_text())
    client["trainer"].update(max_train_samples=client["trainer"]["batch_size"], max_val_samples=1, local_epochs=1)
    client_path.write_text(json.dumps(client))
    return client_path


def prepare_site(job: str, work: Path, seed: int = 1) -> None:
    module, args = GENERATORS[job]
    data_root = work / "data"
    command = [sys.executable, "-m", module, "--out", str(data_root / job), "--seed", str(seed), *args]
    subprocess.run(command, check=True, cwd=REPO / "custom")
    site = {"site_name": "gpu_sizing", "data_root": str(data_root), "datasets": {job: job}}
    (work / "site_config.json").write_text(json.dumps(site))
    os.environ[hcls_common.SITE_CONFIG_ENV] = str(work / "site_config.json")


def one_step(job: str, config_path: Path, device: torch.device) -> dict:
    trainer_module = importlib.import_module(job)
    trainer = trainer_module.load_config(config_path)
    train_records, _ = trainer_module.load_data(trainer, hcls_common.site_dataset_dir(job))
    loader = trainer_module.make_loader(train_records, trainer, train=True)
    network = hcls_common.build_network_from_spec(hcls_common.network_spec(config_path))

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.time()
    if job == "lung_nodule_detection":
        detector = trainer_module.build_detector(network, trainer, config_path).to(device)
        optimizer = hcls_common.build_optimizer(trainer, config_path, detector.network.parameters())
        amp = bool(trainer.get("amp", True))
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        loss, steps = trainer_module.train(detector, loader, optimizer, scaler, 1, device, amp)
    else:
        model = network.to(device)
        optimizer = hcls_common.build_optimizer(trainer, config_path, model.parameters())
        if job == "cxr_classification":
            loss_fn = hcls_common.build_loss(trainer, config_path, reduction="none")
        else:
            loss_fn = trainer_module.build_loss(trainer, config_path)
        loss, steps = trainer_module.train(model, loader, optimizer, loss_fn, 1, device)
    if cuda:
        torch.cuda.synchronize(device)
    meta = json.loads((REPO / "job_configs" / job / "meta.json").read_text())
    requested = max(spec["mem_per_gpu_in_GiB"] for spec in meta["resource_spec"].values())
    return {
        "job": job,
        "batch_size": trainer["batch_size"],
        "steps": steps,
        "loss": round(float(loss), 4),
        "seconds": round(time.time() - started, 1),
        "peak_allocated_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "peak_reserved_GiB": round(torch.cuda.max_memory_reserved(device) / 2**30, 2) if cuda else None,
        "meta_json_GiB": requested,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--jobs", nargs="*", default=list(GENERATORS))
    parser.add_argument("--device", default="cuda", help="cuda (memory is measured only there) or cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: GPU sizing needs a CUDA device", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__, "jobs": []}
    for job in args.jobs:
        with tempfile.TemporaryDirectory(prefix=f"sizing-{job}-") as tmp:
            work = Path(tmp)
            config_path = prepare_app(job, work)
            prepare_site(job, work)
            result = one_step(job, config_path, device)
        results["jobs"].append(result)
        print(json.dumps(result), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'job':<24}{'batch':>6}{'step s':>8}{'peak alloc GiB':>16}{'peak reserved GiB':>19}{'meta.json GiB':>15}")
    for r in results["jobs"]:
        print(
            f"{r['job']:<24}{r['batch_size']:>6}{r['seconds']:>8}{str(r['peak_allocated_GiB']):>16}"
            f"{str(r['peak_reserved_GiB']):>19}{r['meta_json_GiB']:>15}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
