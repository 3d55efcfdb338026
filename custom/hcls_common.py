"""Helpers shared by the HCLS trainers: configs, components built by name, seeding.

Two configs reach a trainer:

* the job's trainer config: the top-level ``"trainer"`` object of the NVFlare client
  config passed with ``--config`` (hyper-parameters, optimizer, loss); the network
  and the key metric come from the server config next to it (see ``network_spec``);
* the site config: a JSON file rendered by deployment into the site's ``local/``
  folder, found through the ``HCLS_SITE_CONFIG`` environment variable. It says where
  this site's data lives; data is read only from there, never from the job. Its ``privacy``
  policy (minimum dataset size, blocked fields, differential privacy) applies to every job; the
  site also enforces it on everything that leaves (site_privacy, outside the job).

Every error names the file and field (or path) at fault, so that it is actionable
when it surfaces as a job error from a site.
"""

import copy
import importlib
import json
import math
import os
import time
from pathlib import Path

import torch
from monai.utils import set_determinism

SITE_CONFIG_ENV = "HCLS_SITE_CONFIG"


def read_json(path: Path) -> dict:
    """Read a JSON object from ``path``; a missing or malformed file raises ValueError."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def load_trainer_config(config_path: Path, required_keys: tuple[str, ...]) -> dict:
    """Return the ``"trainer"`` object of the job config, checking that ``required_keys`` are present."""
    trainer = read_json(config_path).get("trainer")
    if not isinstance(trainer, dict):
        raise ValueError(f"{config_path}: missing the top-level 'trainer' object")
    missing = [key for key in required_keys if key not in trainer]
    if missing:
        raise ValueError(f"{config_path}: 'trainer' lacks the field(s) {', '.join(missing)}")
    return trainer


def site_config_path() -> Path:
    """Path of this site's config file, taken from ``$HCLS_SITE_CONFIG``."""
    value = os.environ.get(SITE_CONFIG_ENV)
    if not value:
        raise ValueError(f"environment variable {SITE_CONFIG_ENV} is not set; it must name the site config JSON")
    return Path(value)


def site_dataset_dir(job_name: str) -> Path:
    """This site's data directory for ``job_name``: ``data_root / datasets[job_name]``."""
    path = site_config_path()
    site = read_json(path)
    data_root = site.get("data_root")
    dataset = site.get("datasets", {}).get(job_name)
    if not data_root:
        raise ValueError(f"{path}: field 'data_root' is missing or empty")
    if not dataset:
        raise ValueError(f"{path}: field 'datasets.{job_name}' is missing or empty")
    data_dir = Path(data_root) / dataset  # an absolute 'dataset' replaces data_root
    if not data_dir.is_dir():
        raise ValueError(f"{path}: dataset directory {data_dir} (datasets.{job_name}) does not exist")
    return data_dir


def site_privacy() -> dict:
    """This site's privacy policy: ``privacy`` of the site config."""
    path = site_config_path()
    privacy = read_json(path).get("privacy")
    if not isinstance(privacy, dict):
        raise ValueError(f"{path}: field 'privacy' is missing (the site's privacy policy)")
    return privacy


def check_dataset_size(job_name: str, n_train: int) -> None:
    """ValueError if ``n_train`` is below the site's ``privacy.min_dataset_size``: the site does not train."""
    minimum = site_privacy().get("min_dataset_size", 1)
    if n_train < minimum:
        raise ValueError(
            f"{site_config_path()}: privacy.min_dataset_size is {minimum} but dataset {site_dataset_dir(job_name)} "
            f"(datasets.{job_name}) gives {n_train} training samples: this site does not train on fewer"
        )


def site_dp_policy() -> dict | None:
    """The site's ``privacy.differential_privacy`` when enabled (epsilon, delta, max_grad_norm), else None."""
    dp = site_privacy().get("differential_privacy") or {}
    return dp if dp.get("enabled") else None


def num_rounds(config_path: Path) -> int:
    """The job's number of FL rounds (top-level ``num_rounds`` of the server config)."""
    path = server_config_path(config_path)
    rounds = read_json(path).get("num_rounds")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"{path}: field 'num_rounds' must be an integer >= 1, got {rounds!r}")
    return rounds


def make_private(model, optimizer, loader, dp: dict, epochs: int):
    """Record-level DP-SGD with Opacus for ``epochs`` epochs in all (every round's local epochs).

    Per-sample gradients are clipped to ``dp['max_grad_norm']`` and Gaussian noise is added with the
    noise multiplier that Opacus' accountant (PRV) computes so that all ``epochs`` on Poisson-sampled
    batches spend at most ``dp['epsilon']`` at ``dp['delta']``. The model is hooked in place (no wrapper),
    so its state_dict keys stay those of the network the server aggregates. Returns the DP optimizer, the
    Poisson-sampling loader and ``accounting()``: the DP meta of each result (epsilon spent so far).
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="prv")
    _, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=dp["epsilon"],
        target_delta=dp["delta"], epochs=epochs, max_grad_norm=dp["max_grad_norm"], wrap_model=False,
    )  # fmt: skip

    def accounting() -> dict:
        spent = engine.get_epsilon(dp["delta"]) if engine.accountant.history else 0.0
        return {
            "dp_epsilon": float(spent), "dp_delta": float(dp["delta"]), "dp_max_grad_norm": float(dp["max_grad_norm"]),
            "dp_noise_multiplier": float(dp_optimizer.noise_multiplier),
        }  # fmt: skip

    return dp_optimizer, dp_loader, accounting


def _build_by_name(module, spec: dict, config_path: Path, field: str, *args, **overrides):
    """Instantiate ``module.<spec['name']>(*args, **spec['args'], **overrides)``."""
    name = spec.get("name")
    factory = getattr(module, str(name), None)
    if not isinstance(factory, type):
        raise ValueError(f"{config_path}: trainer.{field}.name = {name!r} is not a class in {module.__name__}")
    return factory(*args, **{**spec.get("args", {}), **overrides})


def build_optimizer(trainer: dict, config_path: Path, params) -> torch.optim.Optimizer:
    """The optimizer named by ``trainer.optimizer``, looked up in ``torch.optim``."""
    return _build_by_name(torch.optim, trainer["optimizer"], config_path, "optimizer", params)


def build_loss(trainer: dict, config_path: Path, **overrides) -> torch.nn.Module:
    """The loss named by ``trainer.loss``, looked up in ``torch.nn``; ``overrides`` win over its args."""
    return _build_by_name(torch.nn, trainer["loss"], config_path, "loss", **overrides)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (MONAI's ``set_determinism``)."""
    set_determinism(seed=seed)


def server_config_path(config_path: Path) -> Path:
    """The job's server config, next to the client config in the app's config/ folder."""
    return Path(config_path).with_name("config_fed_server.json")


def network_spec(config_path: Path) -> dict:
    """The network the job trains, ``{"path", "args"}``: the server persistor's ``model``.

    One place for the architecture: the server builds the initial global model from it,
    the trainers and the model fetch build the same network from it.
    """
    path = server_config_path(config_path)
    for comp in read_json(path).get("components", []):
        model = comp.get("args", {}).get("model") if comp.get("id") == "persistor" else None
        if isinstance(model, dict) and "path" in model:
            return {"path": model["path"], "args": model.get("args", {})}
    raise ValueError(f"{path}: no 'persistor' component with args.model {{path, args}}")


def key_metric(config_path: Path) -> str:
    """The job's key metric (top-level ``key_metric`` of the server config, used by its model selector)."""
    path = server_config_path(config_path)
    name = read_json(path).get("key_metric")
    if not name:
        raise ValueError(f"{path}: field 'key_metric' is missing")
    return name


def build_network_from_spec(spec: dict) -> torch.nn.Module:
    """Instantiate ``spec['path']`` (a dotted class path) with ``spec['args']``."""
    module_name, _, class_name = spec["path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**spec.get("args", {}))


def run_federated(
    job_name: str, key_metric: str, model: torch.nn.Module, evaluate, train, n_train: int, dp_accounting=None
) -> None:
    """The NVFlare Client API loop every trainer runs (as in NVFlare's hello-pt client).

    ``model`` is the network whose state_dict is exchanged; ``evaluate()`` returns the metrics
    dict of its current weights (``key_metric`` among them); ``train()`` runs one round of local
    training and returns (mean loss, optimizer steps). The received global model is evaluated
    first: the server's best-model selection uses that metric. For cross-site validation the
    site submits its best local model.

    The site's privacy policy comes first: fewer than ``min_dataset_size`` training samples, or a
    site that requires differential privacy and a trainer without ``dp_accounting`` (see
    ``make_private``), stop the trainer before any training. With DP, every result that carries
    weights also carries the DP accounting (epsilon spent so far), which the site's filter checks.
    """
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.client.tracking import SummaryWriter

    flare.init()
    site = flare.get_site_name()
    check_dataset_size(job_name, n_train)
    if site_dp_policy() and dp_accounting is None:
        raise ValueError(
            f"{site_config_path()}: privacy.differential_privacy.enabled is true and the {job_name} trainer "
            "has no differential privacy support: this site does not train it"
        )
    dp_meta = dp_accounting or dict
    writer = SummaryWriter()
    best_local_state, best_local = None, -math.inf
    print(f"[{site}] {job_name}: n_train={n_train}" + (f" DP {dp_meta()}" if dp_accounting else ""))

    while flare.is_running():
        input_model = flare.receive()
        if flare.is_submit_model():
            params = model.state_dict() if best_local_state is None else best_local_state
            flare.send(FLModel(params=params, meta=dp_meta()))
            continue

        model.load_state_dict(input_model.params)
        metrics = evaluate()
        if flare.is_evaluate():
            flare.send(FLModel(metrics=metrics))
            continue

        round_no, started = input_model.current_round, time.time()
        train_loss, steps = train()
        local = evaluate()[key_metric]
        if local > best_local:  # nan never counts as better
            best_local_state, best_local = copy.deepcopy(model.state_dict()), local

        writer.add_scalar("train_loss", train_loss, global_step=round_no)
        for name, value in metrics.items():
            writer.add_scalar(name, value, global_step=round_no)
        writer.add_scalar(f"{key_metric}_local", local, global_step=round_no)
        privacy = dp_meta()
        if privacy:
            writer.add_scalar("dp_epsilon", privacy["dp_epsilon"], global_step=round_no)
        print(
            f"[{site}] round {round_no}: train_loss={train_loss:.4f} {key_metric}={metrics[key_metric]:.4f} "
            f"(global model) {key_metric}_local={local:.4f} steps={steps} {time.time() - started:.1f}s"
            + (f" dp_epsilon={privacy['dp_epsilon']:.3f} of {site_dp_policy()['epsilon']}" if privacy else "")
        )
        meta = {"NUM_STEPS_CURRENT_ROUND": steps, **privacy}
        flare.send(FLModel(params=model.state_dict(), metrics=metrics, meta=meta))
