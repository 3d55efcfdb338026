"""The interface every job's trainer implements, and the one local training loop they share.

A job's trainer module exposes ``build(job, site, device) -> Trainer``: it reads the job's settings
(``JobConfig``) and this site's data (``SiteConfig``), and returns the network whose state_dict is
exchanged with the server, how to train it for one round and how to evaluate it. The federated loop
(``client_loop``), GPU sizing (``ops.gpu_sizing``) and the tests all use that interface.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Trainer:
    model: torch.nn.Module  # the network whose state_dict is exchanged with the server
    train: Callable[[], tuple[float, int]]  # one round of local training -> (mean batch loss, optimizer steps)
    evaluate: Callable[[], dict]  # metrics of the model's current weights, the job's key metric among them
    n_train: int  # training samples at this site (what the privacy policy's min_dataset_size counts)
    dp_accounting: Callable[[], dict] | None = None  # DP meta of each result (hcls.dp_sgd.Accounting) when the site runs DP


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_epochs(
    model: torch.nn.Module, loader, optimizer, batch_loss: Callable, epochs: int, scaler=None, scheduler=None
) -> tuple[float, int]:
    """Train ``epochs`` epochs over ``loader``: one optimizer step per batch on ``batch_loss(batch)``.

    ``scaler``: a ``torch.amp.GradScaler`` for mixed precision; ``scheduler``: a learning-rate scheduler
    stepped after every optimizer step. Returns the mean batch loss and the number of optimizer steps.
    """
    model.train()
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
