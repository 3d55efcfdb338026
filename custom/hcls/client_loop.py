"""The NVFlare Client API loop that runs a job's ``Trainer`` at a site (as in NVFlare's hello-pt client).

Every trainer script ends with ``client_loop.main(JOB_NAME, build)``; NVFlare's ClientAPIExecutor starts it as
``python3 -u custom/<trainer>.py --config config/config_fed_client.json`` from the job's app folder, once per
job, and again at the next task after it died or hung (``hcls.trainer_executor``): that costs its site one
round. So nothing the site needs later lives only in the trainer's memory: its best local model is a file.
"""

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from monai.utils import set_determinism

from hcls.job_config import JobConfig
from hcls.site_config import SiteConfig
from hcls.training import Trainer, default_device


def main(job_name: str, build) -> None:
    parser = argparse.ArgumentParser(description=f"{job_name} trainer (NVFlare Client API)")
    parser.add_argument("--config", type=Path, required=True, help="the job's client config (with a 'trainer' object)")
    job = JobConfig.from_client_config(parser.parse_args().config)
    site = SiteConfig.from_env()
    set_determinism(seed=job.trainer().get("seed", 0))
    try:
        run(job_name, job, site, build(job, site, default_device()))
    except Exception:
        # Once flare.init() ran, the Client API's threads keep a failed trainer's process alive, and its site would
        # wait client.trainer_heartbeat_timeout for a task result that never comes: say why (the site's log) and end.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def run(job_name: str, job: JobConfig, site: SiteConfig, trainer: Trainer) -> None:
    """Receive the global model, evaluate it, train, send the update, until the job ends.

    The received global model is evaluated first: the server's best-model selection uses that metric.
    For cross-site validation the site submits its local model: with ``trainer.local_model`` "best" (the default)
    the best by the key metric, evaluated after every round's training; with "last" the last round's, not
    evaluated (one evaluation a round less). The site's privacy policy comes first: fewer than
    ``min_dataset_size`` training samples, or a site that requires differential privacy and a trainer without
    ``dp_accounting``, stop the trainer before any training. With DP, every result
    that carries weights also carries the DP accounting (epsilon spent so far), which the site's filter checks.
    """
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.client.tracking import SummaryWriter

    flare.init()
    name = flare.get_site_name()
    site.check_dataset_size(job_name, trainer.n_train)
    if site.dp_policy and trainer.dp_accounting is None:
        raise ValueError(
            f"{site.path}: privacy.differential_privacy.enabled is true and the {job_name} trainer "
            "has no differential privacy support: this site does not train it"
        )
    key_metric, model = job.key_metric, trainer.model
    keep_best = local_model_choice(job) == "best"
    dp_meta = trainer.dp_accounting or dict
    writer = SummaryWriter()
    writer.add_scalar("n_train", trainer.n_train, global_step=0)  # the model passport's training-sample count
    state_dir = site_job_dir(flare.get_job_id())
    best_path = state_dir / "best_local_model.pt"
    if trainer.dp_accounting is not None:
        trainer.dp_accounting.keep_in(state_dir / "dp_history.json")
    print(f"[{name}] {job_name}: n_train={trainer.n_train}" + (f" DP {dp_meta()}" if trainer.dp_accounting else ""))

    while flare.is_running():
        input_model = flare.receive()
        if flare.is_submit_model():
            best = load_best_local(best_path)
            if best is None:
                raise RuntimeError(f"[{name}] no best local model in {best_path}: this site never trained this job")
            flare.send(FLModel(params=best["state_dict"], meta=dp_meta()))
            continue

        started = time.time()
        input_model.params = shaped_like(model, input_model.params)  # the Client API diffs the result against it
        model.load_state_dict(input_model.params)
        metrics = trainer.evaluate()
        if flare.is_evaluate():
            flare.send(FLModel(metrics=metrics))
            continue

        round_no = input_model.current_round
        train_loss, steps = trainer.train()
        local_text = ""
        if keep_best:  # the local model after training, kept when it beats the best one so far
            local = trainer.evaluate()[key_metric]
            best = load_best_local(best_path)
            if local > (best["value"] if best else -math.inf):  # nan never counts as better
                save_best_local(best_path, model.state_dict(), local, round_no)
            writer.add_scalar(f"{key_metric}_local", local, global_step=round_no)
            local_text = f" {key_metric}_local={local:.4f}"
        else:  # the last local model, not evaluated
            save_best_local(best_path, model.state_dict(), None, round_no)

        writer.add_scalar("train_loss", train_loss, global_step=round_no)
        for metric, value in metrics.items():
            writer.add_scalar(metric, value, global_step=round_no)
        privacy = dp_meta()
        if privacy:
            writer.add_scalar("dp_epsilon", privacy["dp_epsilon"], global_step=round_no)
        print(
            f"[{name}] round {round_no}: train_loss={train_loss:.4f} {key_metric}={metrics[key_metric]:.4f} "
            f"(global model){local_text} steps={steps} compute {time.time() - started:.3f}s"
            + (f" dp_epsilon={privacy['dp_epsilon']:.3f} of {site.dp_policy['epsilon']}" if privacy else "")
        )
        meta = {"NUM_STEPS_CURRENT_ROUND": steps, **privacy}
        flare.send(FLModel(params=model.state_dict(), metrics=metrics, meta=meta))


LOCAL_MODELS = ("best", "last")


def local_model_choice(job: JobConfig) -> str:
    """``trainer.local_model``: which local model the site submits for cross-site validation."""
    choice = job.trainer().get("local_model", "best")
    if choice not in LOCAL_MODELS:
        raise ValueError(f"{job.client_path}: trainer.local_model {choice!r} is not one of {', '.join(LOCAL_MODELS)}")
    return choice


def shaped_like(model, params: dict) -> dict:
    """``params`` with each tensor in the shape of the model's own. NVFlare's numpy -> torch conversion restores
    shapes only from what the same trainer process sent before, and a trainer's first task (or a new trainer's,
    after one was lost) gets decrypted HE weights flat. A tensor of another size is left as it is, for load_state_dict to refuse."""
    own = model.state_dict()
    return {
        k: v.reshape(own[k].shape) if k in own and v.shape != own[k].shape and v.numel() == own[k].numel() else v
        for k, v in params.items()
    }


def site_job_dir(job_id: str) -> Path:
    """``<site workspace>/job_state/<job id>``: what a site keeps of a job across its trainers (best local model,
    DP accounting). Outside the job's run folder, which NVFlare deletes when it deploys the job again after a
    server restart (a trainer runs in ``<site workspace>/<job id>/app_<site>``)."""
    return Path.cwd().parents[1] / "job_state" / job_id


def load_best_local(path: Path):
    """``{"state_dict", "value", "round"}`` of the local model the site submits for cross-site validation (the best
    so far, or the last: ``value`` nan), or None."""
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def save_best_local(path: Path, state_dict: dict, value: float | None, round_no: int) -> None:
    """Atomically: a trainer killed while saving leaves the previous one. ``value`` None: not evaluated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"state_dict": state_dict, "value": math.nan if value is None else float(value), "round": round_no}, tmp)
    os.replace(tmp, path)
