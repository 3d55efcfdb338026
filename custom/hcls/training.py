"""The interface every job's trainer implements, and the one local training loop they share.

A job's trainer module exposes ``build(job, site, device) -> Trainer``: it reads the job's settings
(``JobConfig``) and this site's data (``SiteConfig``), and returns the network whose state_dict is
exchanged with the server, how to train it for one round and how to evaluate it. The federated loop
(``client_loop``), GPU sizing (``ops.gpu_sizing``) and the tests all use that interface.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Trainer:
    model: torch.nn.Module  # the network whose state_dict is exchanged with the server
    train: Callable[[], tuple[float, int]]  # one round of local training -> (mean batch loss, optimizer steps)
    evaluate: Callable[[], dict]  # metrics of the model's current weights, the job's key metric among them
    n_train: int  # training samples at this site (what the privacy policy's min_dataset_size counts)
    dp_accounting: Callable[[], dict] | None = None  # DP meta of each result (hcls.dp_sgd.Accounting) when the site runs DP


def train_only(model: torch.nn.Module, trainer: dict, config_path: Path):
    """Fine-tuning, as the job's ``trainer`` settings (from ``config_path``) say: train only the parameters under
    ``trained_layers`` (module names, e.g. ``features.denseblock4``; absent or empty: all), and with
    ``freeze_batch_norm`` no batch norm. A batch norm outside the trained layers, or every one with
    ``freeze_batch_norm``, is frozen whole: no trained parameter, and ``set_train_mode`` keeps it in eval mode,
    normalising with its stored statistics (a fixed per-channel affine map, which DP-SGD accepts: it no longer
    mixes the samples of a batch). Returns the trained parameters; ValueError naming the file and field for a name
    that is not one of the model's modules."""
    trained_layers, freeze_batch_norm = trainer.get("trained_layers"), trainer.get("freeze_batch_norm", False)
    names = dict(model.named_modules())
    unknown = [name for name in trained_layers or [] if name not in names]
    if unknown:
        raise ValueError(f"{config_path}: trainer.trained_layers: {', '.join(map(repr, unknown))} not a module of "
                         f"{type(model).__name__}")  # fmt: skip
    if trained_layers:
        for param in model.parameters():
            param.requires_grad_(False)
        for name in trained_layers:
            for param in names[name].parameters():
                param.requires_grad_(True)
    for name, module in names.items():
        trained = not trained_layers or any(name == t or name.startswith(t + ".") for t in trained_layers)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and (freeze_batch_norm or not trained):
            module.frozen_batch_norm = True
            for param in module.parameters():
                param.requires_grad_(False)
    return [param for param in model.parameters() if param.requires_grad]


def set_train_mode(model: torch.nn.Module) -> None:
    """``model.train()``, except for the batch norms that ``train_only`` froze: eval mode."""
    model.train()
    for module in model.modules():
        if getattr(module, "frozen_batch_norm", False):
            module.eval()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_epochs(
    model: torch.nn.Module, loader, optimizer, batch_loss: Callable, epochs: int, scaler=None, scheduler=None
) -> tuple[float, int]:
    """Train ``epochs`` epochs over ``loader``: one optimizer step per batch on ``batch_loss(batch)``.

    ``scaler``: a ``torch.amp.GradScaler`` for mixed precision; ``scheduler``: a learning-rate scheduler
    stepped after every optimizer step. Returns the mean batch loss and the number of optimizer steps.
    """
    set_train_mode(model)
    total, steps = 0.0, 0
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(batch)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            if scheduler is not None:
                scheduler.step()
            total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1), steps
