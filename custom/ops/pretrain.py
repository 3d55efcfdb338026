"""Pre-train a job's network on public data, for the profiles that start from pre-trained weights (dp_pretrained):

    python -m ops.pretrain JOB DATA [--epochs N] [--profile NAME] [--out FILE]      (custom/ on PYTHONPATH)

DATA is a public release as it ships, in any layout the job's trainer reads (CXR: CheXpert, NIH ChestX-ray14;
CT: a Decathlon task, a NIfTI list; nodules: LUNA16), with its own validation split. The network is the job's
(``job_configs/<JOB>`` with PROFILE), trained by the job's own trainer without DP and with every layer trained;
after each epoch it is evaluated on DATA's validation split and the best epoch's ``state_dict`` is written to
``--out`` (default ``custom/pretrained/<JOB>.pt``, where the dp_pretrained profiles name it), replacing a previous
file only once training has finished. The file is then checked as ``make submit`` checks it (every key and
shape of the job's network).
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from monai.utils import set_determinism

from hcls.job_config import JobConfig, persistor_args
from hcls.site_config import SiteConfig
from hcls.training import default_device
from ops import job_builder

SEED = 0
# The trainer settings that a fine-tuning profile adds and pre-training does not use: every layer is trained.
FINE_TUNING = ("trained_layers", "freeze_batch_norm")


def pretraining_job(job: str, profile: str, work: Path) -> JobConfig:
    """``job`` with ``profile``, its trainer training every layer, starting from the network's own initial weights."""
    config = job_builder.resolve(job, profile)
    for key in FINE_TUNING:
        config["client"]["trainer"].pop(key, None)
    persistor_args(config["server"]).pop("source_ckpt_file_full_name", None)
    return JobConfig.from_job_folder(job_builder.write_job(config, work / "job"))


def public_site(job: str, data: Path, work: Path) -> SiteConfig:
    """A site config whose dataset of ``job`` is ``data``: public data, so no privacy policy applies."""
    path = work / "public_site.json"
    path.write_text(json.dumps({"data_root": str(data.parent), "datasets": {job: str(data)},
                                "privacy": {"min_dataset_size": 0}}))  # fmt: skip
    return SiteConfig(path)


def pretrain(job: JobConfig, site: SiteConfig, epochs: int, out: Path, device: torch.device | None = None) -> float:
    """Train ``job``'s network with its trainer on ``site``'s data for ``epochs`` epochs; write the best epoch's
    ``state_dict`` (by the job's key metric on the data's validation split) to ``out``. Returns that metric."""
    device = device or default_device()
    set_determinism(seed=SEED)
    trainer = importlib.import_module(Path(job.client["app_script"]).stem).build(job, site, device)
    best, best_state = float("-inf"), None
    for epoch in range(epochs):
        trainer.train()
        metric = float(trainer.evaluate()[job.key_metric])
        print(f"pretrain: epoch {epoch + 1}/{epochs}: {job.key_metric} {metric:.4f} (validation split)", flush=True)
        if metric > best:
            best, best_state = metric, {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(best_state, partial)
    os.replace(partial, out)  # an interrupted run leaves the previous weights as they were
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("data", type=Path, help="the public data set, as it ships")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--profile", default="", help="a profile of the job (e.g. demo), or a profile .json file")
    parser.add_argument("--out", type=Path, help="default: custom/pretrained/<job>.pt")
    args = parser.parse_args(argv)
    out = (args.out or job_builder.REPO / "custom" / "pretrained" / f"{args.job}.pt").resolve()
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: at least 1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            job = pretraining_job(args.job, args.profile, Path(tmp))
            site = public_site(args.job, args.data.resolve(), Path(tmp))
            site.dataset_dir(args.job)  # a missing folder is named before any work
            best = pretrain(job, site, args.epochs, out)
            job_builder.check_checkpoint(job.network, out, str(out))
    except (ValueError, FileNotFoundError) as err:  # BuildError, the trainers' data and layout errors
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"pretrain: wrote {out}: {args.job}'s network, best {job.key_metric} {best:.4f} on the validation split "
          f"of {args.data}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
