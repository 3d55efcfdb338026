"""Optimizers and losses named in the trainer settings (``{"name": <class>, "args": {...}}``), built by name."""

from pathlib import Path

import torch


def build_by_name(module, spec: dict, config_path: Path, field: str, *args, **overrides):
    """``module.<spec['name']>(*args, **spec['args'], **overrides)``; ValueError naming the file and field."""
    name = spec.get("name")
    factory = getattr(module, str(name), None)
    if not isinstance(factory, type):
        raise ValueError(f"{config_path}: trainer.{field}.name = {name!r} is not a class in {module.__name__}")
    return factory(*args, **{**spec.get("args", {}), **overrides})


def build_optimizer(trainer: dict, config_path: Path, params) -> torch.optim.Optimizer:
    """The optimizer named by ``trainer.optimizer``, looked up in ``torch.optim``."""
    return build_by_name(torch.optim, trainer["optimizer"], config_path, "optimizer", params)
