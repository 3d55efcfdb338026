"""What a site keeps of a job across its one-task trainers, on real torch and Opacus objects: the best local model
(for cross-site validation) and the DP accountant's history (epsilon spent by every earlier round)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from hcls.client_loop import load_best_local, local_model_choice, save_best_local, shaped_like  # noqa: E402
from hcls.dp_sgd import make_private  # noqa: E402
from hcls.job_config import JobConfig  # noqa: E402
from ops import job_builder  # noqa: E402

DP = {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}


def test_the_best_local_model_is_a_file(tmp_path):
    path = tmp_path / "job_state" / "job" / "best_local_model.pt"
    assert load_best_local(path) is None
    model = torch.nn.Linear(3, 2)
    save_best_local(path, model.state_dict(), 0.6, round_no=2)
    best = load_best_local(path)
    assert (best["value"], best["round"]) == (0.6, 2)
    assert all(torch.equal(best["state_dict"][k], v) for k, v in model.state_dict().items())
    assert not list(path.parent.glob(".*.tmp"))


def test_the_last_local_model_is_kept_without_a_value(tmp_path):
    path = tmp_path / "best_local_model.pt"
    save_best_local(path, torch.nn.Linear(3, 2).state_dict(), None, round_no=4)
    last = load_best_local(path)
    assert last["round"] == 4 and last["value"] != last["value"]  # nan: not evaluated


@pytest.mark.parametrize("job", ["cxr_classification", "ct_segmentation", "lung_nodule_detection"])
def test_which_local_model_a_site_submits_for_cross_site_validation(tmp_path, job):
    """The best by the key metric unless a profile says the last (the demo profiles: one evaluation a round less);
    any other value is refused naming the file and the field."""
    def built(profile, overlay=None):
        config = job_builder.resolve(job, profile)
        config = job_builder.merge(config, overlay, "test overlay") if overlay else config
        return JobConfig.from_job_folder(job_builder.write_job(config, tmp_path / f"{profile}{bool(overlay)}"))

    assert local_model_choice(built("")) == "best"
    assert local_model_choice(built("demo")) == "last"
    wrong = built("", {"client": {"trainer": {"local_model": "final"}}})
    message = r"config_fed_client.json: trainer.local_model 'final' is not one of best, last"
    with pytest.raises(ValueError, match=message):
        local_model_choice(wrong)


def test_a_new_trainer_takes_flat_weights_in_its_networks_shapes():
    """Decrypted HE weights reach a freshly started trainer flat; a tensor of another size is still refused."""
    source, model = torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(1, 4, 3)
    model.load_state_dict(shaped_like(model, {k: v.flatten() for k, v in source.state_dict().items()}))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    wrong = {**source.state_dict(), "weight": torch.zeros(35)}
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        model.load_state_dict(shaped_like(model, wrong))


def one_trainer(history: Path):
    """A trainer process's DP-SGD: a tiny model, Poisson batches; its accounting kept in ``history``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    optimizer, dp_loader, accounting = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, DP, 2)
    accounting.keep_in(history)
    return model, optimizer, dp_loader, accounting


def train_one_epoch(model, optimizer, loader):
    for x, y in loader:
        if len(x):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()


def test_dp_spending_adds_up_across_trainers(tmp_path):
    history = tmp_path / "dp_history.json"
    model, optimizer, loader, accounting = one_trainer(history)
    assert accounting()["dp_epsilon"] == 0.0
    train_one_epoch(model, optimizer, loader)
    first = accounting()["dp_epsilon"]  # taken before the round's result is sent: written to the file
    assert 0 < first < DP["epsilon"] and history.is_file()

    model, optimizer, loader, accounting = one_trainer(history)  # the next round's trainer
    assert accounting()["dp_epsilon"] == first
    train_one_epoch(model, optimizer, loader)
    assert first < accounting()["dp_epsilon"] <= DP["epsilon"]


def test_each_result_records_its_own_steps_and_the_sites_accountant_agrees(tmp_path):
    """dp_steps counts the steps since the previous result, across trainer restarts; the site's ledger,
    fed only those records, recomputes the trainer's epsilon."""
    from site_privacy.dp_ledger import Ledger
    from site_privacy.policy import DifferentialPrivacy

    site_dp = DifferentialPrivacy(True, "dp-sgd", DP["epsilon"], DP["delta"], 1.0)
    ledger = Ledger(tmp_path / "dp_ledger", "job-1")
    history = tmp_path / "dp_history.json"
    model, optimizer, loader, accounting = one_trainer(history)
    for trainer_round in range(2):
        assert accounting()["dp_steps"] == 0  # nothing trained since the last result (or since the file)
        train_one_epoch(model, optimizer, loader)
        meta = accounting()
        assert (meta["dp_steps"], meta["dp_sample_rate"], meta["dp_noise_multiplier"] > 0) == (4, 0.25, True)
        reason, entries = ledger.check("WEIGHT_DIFF", meta, site_dp, n_train=16)
        assert reason is None
        ledger.record(entries)
        assert entries == [[meta["dp_noise_multiplier"], 0.25, 4 * (trainer_round + 1)]]
        model, optimizer, loader, accounting = one_trainer(history)  # the next round's trainer
    assert epsilon_of(ledger, site_dp) == pytest.approx(accounting()["dp_epsilon"], rel=1e-6)


def epsilon_of(ledger, dp) -> float:
    from site_privacy.dp_ledger import epsilon

    return epsilon(ledger.entries(), dp.delta)
