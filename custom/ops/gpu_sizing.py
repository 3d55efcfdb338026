"""GPU sizing: one production-profile training step of each job, with its peak GPU memory.

Checks the GPU memory that each job's meta.json asks of a site (resource_spec mem_per_gpu_in_GiB). Each
job is built from job_configs/ as `make submit` builds it (production profile), trimmed to one batch, and
runs through its trainer's own ``build(job, site, device)`` interface (data path, network, loss,
optimizer) on data from the project's generators at a size that fills the production crops, for one
round of one optimizer step:

    python -m ops.gpu_sizing --out gpu_sizing.json      (custom/ on PYTHONPATH; needs CUDA)
"""

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.utils import set_determinism

from hcls.job_config import JobConfig
from hcls.site_config import SiteConfig
from ops import job_builder

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


def prepare_job(job: str, work: Path) -> tuple[JobConfig, dict]:
    """The production job folder, its trainer trimmed to one batch of one local epoch; and its meta.json."""
    config = job_builder.resolve(job)
    trainer = config["client"]["trainer"]
    trainer.update(max_train_samples=trainer["batch_size"], max_val_samples=1, local_epochs=1)
    folder = job_builder.write_job(config, work / job)
    return JobConfig.from_job_folder(folder), config["meta"]


def prepare_site(job: str, work: Path, seed: int = 1) -> SiteConfig:
    module, args = GENERATORS[job]
    data_root = work / "data"
    command = [sys.executable, "-m", module, "--out", str(data_root / job), "--seed", str(seed), *args]
    subprocess.run(command, check=True, cwd=REPO / "custom")
    site = {"site_name": "gpu_sizing", "data_root": str(data_root), "datasets": {job: job}, "privacy": {}}
    (work / "site_config.json").write_text(json.dumps(site))
    return SiteConfig(work / "site_config.json")


def one_step(job: str, job_config: JobConfig, site: SiteConfig, meta: dict, device: torch.device) -> dict:
    set_determinism(seed=0)
    cuda = device.type == "cuda"
    trainer = importlib.import_module(job).build(job_config, site, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.time()
    loss, steps = trainer.train()
    if cuda:
        torch.cuda.synchronize(device)
    requested = max((spec["mem_per_gpu_in_GiB"] for spec in meta["resource_spec"].values()), default=None)
    return {
        "job": job,
        "batch_size": job_config.trainer()["batch_size"],
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
            job_config, meta = prepare_job(job, work)
            result = one_step(job, job_config, prepare_site(job, work), meta, device)
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
