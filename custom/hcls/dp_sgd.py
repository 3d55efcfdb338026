"""Record-level differential privacy (DP-SGD with Opacus) for the sites that require it."""

import json
import os
from pathlib import Path

import torch.utils.data


def make_private(model, optimizer, loader, dp: dict, epochs: int, loss_reduction: str = "mean", empty_batch=None):
    """DP-SGD with Opacus for ``epochs`` epochs in all (every round's local epochs).

    Per-sample gradients are clipped to ``dp['max_grad_norm']`` and Gaussian noise is added with the
    noise multiplier that Opacus' accountant (PRV) computes so that all ``epochs`` on Poisson-sampled
    batches spend at most ``dp['epsilon']`` at ``dp['delta']``. ``loss_reduction``: how the trainer's loss
    combines the samples of a batch ("mean", or "sum": the update is then not divided by the expected batch
    size). ``empty_batch``: what the trainer gets when Poisson sampling draws no sample (default: the first
    batch's structure with empty tensors, which Opacus makes; a trainer whose samples hold strings, which it cannot
    empty, passes its own, e.g. ``[]``). The model is hooked in place (no wrapper),
    so its state_dict keys stay those of the network the server aggregates. Returns the DP optimizer, the
    Poisson-sampling loader and the ``Accounting`` (below).
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="prv")
    _, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=dp["epsilon"],
        target_delta=dp["delta"], epochs=epochs, max_grad_norm=dp["max_grad_norm"], wrap_model=False,
        loss_reduction=loss_reduction,
    )  # fmt: skip
    # Poisson sampling can draw an empty batch. Opacus shapes it after dataset[0], which for the trainers'
    # dict samples are its keys (strings) and fails; give it a real first batch to take shapes and dtypes from.
    if empty_batch is not None:  # Opacus empties the first batch's structure: an empty list stays one
        dp_loader.collate_fn.first_batch = empty_batch
    elif getattr(dp_loader.collate_fn, "first_batch", "unset") is None and len(loader.dataset):
        collate = loader.collate_fn or torch.utils.data.default_collate
        dp_loader.collate_fn.first_batch = collate([loader.dataset[0]])

    return dp_optimizer, dp_loader, Accounting(engine, dp, dp_optimizer, dp_loader.sample_rate)


def require_one_sample_per_record(trainer: dict, field: str, what: str, job_config: Path, site_config: Path) -> None:
    """Record-level DP-SGD clips each sample's gradient: a volume's several crops or patches would be one record in
    several samples. ValueError naming the job's field and the site's policy unless ``trainer[field]`` is 1."""
    if trainer[field] != 1:
        raise ValueError(
            f"{job_config}: trainer.{field} is {trainer[field]}, and this site requires differential privacy "
            f"({site_config}): record-level DP-SGD needs one {what} per volume ({field} 1)"
        )


class Accounting:
    """``accounting()``: the DP meta of a result about to be sent.

    It records what the site's own accountant needs to recompute the epsilon spent
    (``site_privacy.dp_ledger``): the noise multiplier, the Poisson sample rate, the clipping norm and
    ``dp_steps``, the DP-SGD steps taken since the previous result. ``dp_epsilon`` is this trainer's own
    figure over every round of the job at this site (for its log; the site does not trust it).

    A trainer may be started again mid-job, so the accountant's history (noise multiplier, sample rate,
    steps) is kept in a file (``keep_in``): read at start, written each time a result's accounting is
    taken, before it is sent. Steps of a round whose result was never sent (the trainer died) release
    nothing and are not counted.
    """

    def __init__(self, engine, dp: dict, dp_optimizer, sample_rate: float):
        self.engine, self.dp, self.dp_optimizer, self.path = engine, dp, dp_optimizer, None
        self.sample_rate = sample_rate  # of the Poisson-sampling loader: expected batch size / training samples
        self.accounted_steps = 0  # steps in the history when the last result's accounting was taken

    def keep_in(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_file():
            self.engine.accountant.history = [tuple(h) for h in json.loads(self.path.read_text())]
        self.accounted_steps = self._steps()

    def _steps(self) -> int:
        return sum(int(steps) for _, _, steps in self.engine.accountant.history)

    def __call__(self) -> dict:
        history = self.engine.accountant.history
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(history))
            os.replace(tmp, self.path)
        steps, self.accounted_steps = self._steps() - self.accounted_steps, self._steps()
        spent = self.engine.get_epsilon(self.dp["delta"]) if history else 0.0
        return {
            "dp_epsilon": float(spent), "dp_delta": float(self.dp["delta"]),
            "dp_max_grad_norm": float(self.dp["max_grad_norm"]),
            "dp_noise_multiplier": float(self.dp_optimizer.noise_multiplier),
            "dp_sample_rate": float(self.sample_rate),
            "dp_steps": steps,
        }  # fmt: skip
