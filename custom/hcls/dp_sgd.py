"""Record-level differential privacy (DP-SGD with Opacus) for the sites that require it."""

import torch.utils.data


def make_private(model, optimizer, loader, dp: dict, epochs: int):
    """DP-SGD with Opacus for ``epochs`` epochs in all (every round's local epochs).

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
    # Poisson sampling can draw an empty batch. Opacus shapes it after dataset[0], which for the trainers'
    # dict samples are its keys (strings) and fails; give it a real first batch to take shapes and dtypes from.
    if getattr(dp_loader.collate_fn, "first_batch", "unset") is None and len(loader.dataset):
        collate = loader.collate_fn or torch.utils.data.default_collate
        dp_loader.collate_fn.first_batch = collate([loader.dataset[0]])

    def accounting() -> dict:
        spent = engine.get_epsilon(dp["delta"]) if engine.accountant.history else 0.0
        return {
            "dp_epsilon": float(spent), "dp_delta": float(dp["delta"]), "dp_max_grad_norm": float(dp["max_grad_norm"]),
            "dp_noise_multiplier": float(dp_optimizer.noise_multiplier),
        }  # fmt: skip

    return dp_optimizer, dp_loader, accounting
