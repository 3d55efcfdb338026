"""Unit tests of the site privacy policy and of DP-SGD, on real objects: the site's NVFlare result
filter on real DXO shareables and generated manifests, the site config a trainer reads its policy from,
Opacus on a real network and data loader, and the DP trainer that a site requiring DP builds."""

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext, FLContextManager
from nvflare.apis.workspace import Workspace
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

CUSTOM = Path(__file__).resolve().parents[2] / "custom"
sys.path.insert(0, str(CUSTOM))

import cxr_classification as cxr  # noqa: E402
from datagen import cxr as datagen  # noqa: E402
from hcls.dp_sgd import make_private  # noqa: E402
from hcls.job_config import JobConfig  # noqa: E402
from hcls.site_config import SiteConfig  # noqa: E402
from ops import job_builder  # noqa: E402
from site_privacy import approval, dataset  # noqa: E402
from site_privacy.components import BLOCKED, DP_LEDGER_DIR, STATE_DIR, SitePolicyFilter  # noqa: E402
from site_privacy.dp_ledger import Ledger  # noqa: E402
from site_privacy.policy import parse_policy  # noqa: E402

POLICY = {
    "min_dataset_size": 10,
    "blocked_data_fields": ["PatientName", "PatientID", "PatientBirthDate"],
    "differential_privacy": {
        "enabled": False, "mechanism": "gaussian", "epsilon": 8, "delta": 1e-5, "max_grad_norm": 1,
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site workspace: local/site_config.json pointing at generated CheXpert data (12 training studies)."""
    root = tmp_path_factory.mktemp("site")
    datagen.generate(root / "data" / "chexpert", n_train=12, n_val=4, seed=3, size=32)
    (root / "local").mkdir()
    (root / "startup").mkdir()  # an NVFlare workspace has one (the kit)
    config = {"data_root": str(root / "data"), "datasets": {"cxr_classification": "chexpert"}}
    (root / "local" / "site_config.json").write_text(json.dumps(config))
    return root


class SiteEngine:
    """The one engine service the filter uses: the site's NVFlare workspace."""

    def __init__(self, root: Path):
        self.workspace = Workspace(str(root), "hospital_a")

    def get_workspace(self) -> Workspace:
        return self.workspace


GLOBAL_MODEL = {  # the global model the server sends: names, shapes and dtypes the site records
    "features.conv0.weight": np.zeros((2, 2), dtype=np.float32),
    "features.norm0.running_mean": np.zeros(2, dtype=np.float32),
    "features.norm0.num_batches_tracked": np.array(0, dtype=np.int64),
    "class_layers.out.bias": np.zeros(3, dtype=np.float32),
}


def approve_app(site_root: Path, job_id: str, name: str) -> Path:
    """A deployed app of job ``job_id`` (one config file naming ``name``: each name its own digest) that the site
    approves under ``name`` in local/approved_jobs.json, as make approve and deployment leave it; the app folder."""
    app = Path(Workspace(str(site_root), "hospital_a").get_app_dir(job_id))
    if not app.exists():
        (app / "config").mkdir(parents=True)
        (app / "config" / "config_fed_client.json").write_text(json.dumps({"approved_as": name}))
    approval.record(site_root / "local" / approval.APPROVED_FILE, name, [approval.app_digest(app)])
    return app


def job_context(site_root: Path, policy: dict, job: str = "cxr_classification", task: str = "train",
                job_id: str | None = None, approved_as: str | None = None) -> FLContext:  # fmt: skip
    """The FL context of a site job process: job id, meta and the job's scope as sticky props (see ClientRunManager).
    The site approves the job's app under ``approved_as`` (default: the job's meta name; "" approves nothing)."""
    job_id = job_id or f"job-{uuid.uuid4()}"
    if approved_as != "":
        approve_app(site_root, job_id, approved_as or job)
    stickers = {
        ReservedKey.RUN_NUM: job_id,
        FLContextKey.JOB_META: {"name": job},
        FLContextKey.EFFECTIVE_JOB_SCOPE_NAME: "hospital_policy",
        FLContextKey.SCOPE_PROPERTIES: policy,
    }
    manager = FLContextManager(engine=SiteEngine(site_root), identity_name="hospital_a", private_stickers=stickers)
    ctx = manager.new_context()
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    return ctx


def receive_global_model(ctx: FLContext, params: dict | None = None) -> None:
    """The site's filter, installed as a task data filter of the scope, sees the server's task data."""
    task_data = DXO(DataKind.WEIGHTS, data=dict(GLOBAL_MODEL if params is None else params)).to_shareable()
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.IN, private=True, sticky=False)
    assert SitePolicyFilter().process(task_data, ctx) is task_data
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.OUT, private=True, sticky=False)


def weight_diff(metrics: dict, **meta) -> DXO:
    params = {"features.conv0.weight": np.ones((2, 2), dtype=np.float32)}
    meta = {"initial_metrics": metrics, "NUM_STEPS_CURRENT_ROUND": 3, **meta}
    return DXO(DataKind.WEIGHT_DIFF, data=params, meta=meta)


def first_patient(site_root: Path, field: str) -> str:
    import csv

    with open(site_root / "data" / "chexpert" / "train.csv", newline="") as f:
        return next(csv.DictReader(f))[field]


def run_filter(site_root, policy, dxo, **context):
    """``dxo`` as a task result through the site's filter, after the site received the job's global model."""
    ctx = job_context(site_root, policy, **context)
    receive_global_model(ctx)
    return SitePolicyFilter().process(dxo.to_shareable(), ctx)


# ---------------------------------------------------------------- site policy


def test_policy_errors_name_the_file_and_field():
    with pytest.raises(ValueError, match=r"privacy.json: min_dataset_size must be an integer >= 1, got '50'"):
        parse_policy({**POLICY, "min_dataset_size": "50"}, "local/privacy.json")
    bad_dp = {**POLICY, "differential_privacy": {**POLICY["differential_privacy"], "delta": 2}}
    with pytest.raises(ValueError, match=r"differential_privacy.delta must be a number in \(0.0, 1.0\), got 2"):
        parse_policy(bad_dp, "local/privacy.json")
    with pytest.raises(ValueError, match="the privacy scope has no properties"):
        parse_policy(None, "local/privacy.json")


def test_site_counts_its_own_manifest(site, tmp_path):
    assert dataset.count_training_samples(site / "data" / "chexpert") == 12
    (tmp_path / "train_data.json").write_text(json.dumps({"training": [{"image": "a"}, {"image": "b"}]}))
    assert dataset.count_training_samples(tmp_path) == 2
    values = dataset.blocked_values(site / "data" / "chexpert", ("PatientID",))
    assert len(values) == 16 and first_patient(site, "PatientID") in values  # train and val studies


@pytest.mark.parametrize("layout", ["chexpert-small", "nih"])
def test_site_counts_public_cxr_releases_itself(tmp_path, layout):
    """CheXpert: the frontal rows of train.csv (laterals not counted); NIH: the images of train_val_list.txt."""
    datagen.generate_layout(layout, tmp_path, n_train=6, n_val=3, seed=1, size=16)
    assert dataset.count_training_samples(tmp_path) == 6
    if layout == "chexpert-small":
        assert dataset.count_training_samples(tmp_path / "CheXpert-v1.0-small") == 6


def test_site_counts_luna16_series_of_its_own_training_subsets(tmp_path):
    for number in range(10):
        (tmp_path / f"subset{number}").mkdir()
    for number, uid in ((0, "1.2.3"), (3, "1.2.4"), (9, "1.2.5")):
        (tmp_path / f"subset{number}" / f"{uid}.mhd").write_text("NDims = 3\n")
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    assert dataset.count_training_samples(tmp_path) == 2  # default luna16_split.train: subsets 0-7
    assert dataset.count_training_samples(tmp_path, {"luna16_split": {"train": [9], "val": [0]}}) == 1
    with pytest.raises(ValueError, match="luna16_split.train must be a list"):
        dataset.count_training_samples(tmp_path, {"luna16_split": {"train": 9}})


def test_site_counts_an_msd_training_list(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "training": [{}, {}, {}]}))
    assert dataset.count_training_samples(tmp_path) == 3
    (tmp_path / "dataset.json").unlink()
    with pytest.raises(ValueError, match="no training manifest"):
        dataset.count_training_samples(tmp_path)


def test_a_clean_result_passes_unchanged(site):
    dxo = weight_diff({"val_auc": 0.5})
    out = run_filter(site, POLICY, dxo)
    assert out.get_return_code() == ReturnCode.OK and out == dxo.to_shareable()


def test_a_dataset_below_min_dataset_size_sends_no_update(site):
    out = run_filter(site, {**POLICY, "min_dataset_size": 13}, weight_diff({"val_auc": 0.5}))
    assert out.get_return_code().startswith(BLOCKED) and "lists 12 samples" in out.get_return_code()
    assert "DXO" not in out and len(out) == 1  # headers only: no weights, no metrics


@pytest.mark.parametrize(
    "where",
    ["metric_name", "metric_value", "meta_value", "string_array"],
)
def test_identifier_values_and_blocked_names_are_blocked_anywhere(site, where):
    patient = first_patient(site, "PatientID")
    dxo = {
        "metric_name": weight_diff({"val_auc": 0.5, f"val_auc_{patient}": 0.5}),
        "metric_value": weight_diff({"val_auc": 0.5, "note": f"worst case {patient}"}),
        "meta_value": weight_diff({"val_auc": 0.5}, extra={"nested": [patient]}),
        "string_array": weight_diff({"val_auc": 0.5}, names=np.array(["x", patient])),
    }[where]
    code = run_filter(site, POLICY, dxo).get_return_code()
    assert code.startswith(BLOCKED) and "a value of blocked field PatientID (train.csv)" in code
    assert patient not in code  # the reason never repeats the identifier


def test_a_blocked_field_name_is_blocked(site):
    code = run_filter(site, POLICY, weight_diff({"val_auc": 0.5, "patientbirthdate_mean": 1.0})).get_return_code()
    assert code.startswith(BLOCKED) and "blocked field name PatientBirthDate" in code


def test_a_job_without_dataset_at_the_site_is_blocked(site):
    code = run_filter(site, POLICY, weight_diff({}), job="not_a_job_of_this_site").get_return_code()
    assert "this site has no dataset for job 'not_a_job_of_this_site'" in code


DP_ON = {**POLICY, "differential_privacy": {**POLICY["differential_privacy"], "enabled": True}}


RECORDED = {"dp_noise_multiplier": 1.0, "dp_sample_rate": 0.1, "dp_steps": 10, "dp_max_grad_norm": 1.0}


@pytest.mark.parametrize(
    "meta, reason",
    [
        ({}, "lacks DP accounting (dp_noise_multiplier, dp_sample_rate, dp_steps, dp_max_grad_norm)"),
        ({**RECORDED, "dp_noise_multiplier": 0.7, "dp_steps": 300, "dp_epsilon": 0.1},  # epsilon 25.8
         "(the site's accountant, this result included) exceeds the site's budget 8.0"),
        ({**RECORDED, "dp_max_grad_norm": 5.0}, "exceeds the site's max_grad_norm"),
    ],
)  # fmt: skip
def test_dp_required_blocks_results_without_accounting_or_over_budget(site, meta, reason):
    code = run_filter(site, DP_ON, weight_diff({"val_auc": 0.5}, **meta)).get_return_code()
    assert code.startswith(BLOCKED) and reason in code


def test_dp_within_budget_passes_is_recorded_and_metrics_need_no_accounting(site):
    """The site's ledger of the job grows by each result it lets out; its epsilon is the site's own."""
    ctx = job_context(site, DP_ON)
    receive_global_model(ctx)
    for sent in (1, 2):
        result = weight_diff({"val_auc": 0.5}, **RECORDED).to_shareable()
        assert SitePolicyFilter().process(result, ctx).get_return_code() == ReturnCode.OK
        ledger = Ledger(Path(ctx.get_workspace().get_root_dir()) / STATE_DIR / DP_LEDGER_DIR, ctx.get_job_id())
        assert ledger.entries() == [[1.0, 0.1, 10 * sent]]
    metrics_only = DXO(DataKind.METRICS, data={"val_auc": 0.5})
    assert run_filter(site, DP_ON, metrics_only).get_return_code() == ReturnCode.OK


# ---------------------------------------------------------------- the site config a trainer reads


def site_config(site_root: Path, tmp_path: Path, privacy: dict | None) -> SiteConfig:
    """The site's config (data of the ``site`` fixture) with ``privacy`` as its policy (none when None)."""
    config = json.loads((site_root / "local" / "site_config.json").read_text())
    path = tmp_path / "site_config.json"
    path.write_text(json.dumps(config | ({"privacy": privacy} if privacy is not None else {})))
    return SiteConfig(path)


def test_trainers_read_the_sites_policy(site, tmp_path):
    config = site_config(site, tmp_path, POLICY)
    assert config.blocked_fields == POLICY["blocked_data_fields"]
    assert config.dp_policy is None  # differential_privacy.enabled is false
    assert site_config(site, tmp_path, DP_ON).dp_policy == DP_ON["differential_privacy"]
    with pytest.raises(ValueError, match=r"site_config.json: field 'privacy' is missing"):
        site_config(site, tmp_path, None).dp_policy


def test_a_dataset_below_min_dataset_size_is_not_trained(site, tmp_path):
    config = site_config(site, tmp_path, {**POLICY, "min_dataset_size": 13})
    config.check_dataset_size("cxr_classification", 13)
    with pytest.raises(ValueError) as err:
        config.check_dataset_size("cxr_classification", 12)
    message = str(err.value)
    assert message.startswith(f"{config.path}: privacy.min_dataset_size is 13 but dataset ")
    assert str(site / "data" / "chexpert") in message and "gives 12 training samples" in message


# ---------------------------------------------------------------- DP-SGD (Opacus)


def dp_setup(n=24, batch=6, epochs=4, epsilon=8.0, delta=1e-5, max_grad_norm=0.5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))  # fmt: skip
    loader = DataLoader(TensorDataset(torch.randn(n, 1, 8, 8), torch.rand(n, 3).round()), batch_size=batch)
    dp = {"epsilon": epsilon, "delta": delta, "max_grad_norm": max_grad_norm}
    optimizer, dp_loader, accounting = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loader, dp, epochs
    )
    return model, optimizer, dp_loader, accounting, dp, len(loader)


def test_every_per_sample_gradient_is_clipped_to_max_grad_norm():
    model, optimizer, loader, _, dp, _ = dp_setup()
    x, y = next(iter(loader))
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(x) * 50, y).backward()  # large gradients
    per_sample = torch.cat([p.grad_sample.reshape(len(x), -1) for p in model.parameters()], dim=1)
    assert per_sample.norm(dim=1).max() > 3 * dp["max_grad_norm"]  # unclipped, they are larger
    optimizer.pre_step()  # Opacus' clipping (and noise) as in optimizer.step()
    clipped = torch.cat([p.summed_grad.reshape(1, -1) for p in model.parameters()], dim=1)
    factors = (dp["max_grad_norm"] / (per_sample.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert torch.allclose(clipped[0], (per_sample * factors[:, None]).sum(0), atol=1e-4)
    assert (per_sample * factors[:, None]).norm(dim=1).max() <= dp["max_grad_norm"] * (1 + 1e-4)


def test_noise_and_final_epsilon_are_the_accountants_for_all_rounds_and_steps():
    rounds, local_epochs = 2, 2
    model, optimizer, loader, accounting, dp, batches = dp_setup(epochs=rounds * local_epochs)
    sample_rate = 1 / batches
    expected_sigma = get_noise_multiplier(
        target_epsilon=dp["epsilon"], target_delta=dp["delta"], sample_rate=sample_rate,
        epochs=rounds * local_epochs, accountant="prv",
    )  # fmt: skip
    assert optimizer.noise_multiplier == pytest.approx(expected_sigma)
    assert accounting()["dp_epsilon"] == 0.0
    steps = 0
    for _ in range(rounds * local_epochs):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
            optimizer.step()
            steps += 1
    assert steps == rounds * local_epochs * batches
    reference = create_accountant("prv")
    reference.history = [(expected_sigma, sample_rate, steps)]
    report = accounting()
    assert report["dp_epsilon"] == pytest.approx(reference.get_epsilon(delta=dp["delta"]), rel=1e-3)
    assert report["dp_epsilon"] <= dp["epsilon"]
    assert report["dp_noise_multiplier"] == pytest.approx(expected_sigma)
    assert set(report) >= {"dp_epsilon", "dp_delta", "dp_max_grad_norm"}
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]


def dp_job(tmp_path: Path, overlay: dict | None = None) -> JobConfig:
    """The CXR job built with its DP profile (and ``overlay`` on top)."""
    config = job_builder.resolve("cxr_classification", "dp")
    config = job_builder.merge(config, overlay, "test overlay") if overlay else config
    return JobConfig.from_job_folder(job_builder.write_job(config, tmp_path / "job"))


def test_the_dp_profile_network_is_one_opacus_can_train(tmp_path):
    """DP-SGD needs per-sample gradients: no batch normalisation (the production DenseNet-121 has it)."""
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(dp_job(tmp_path).build_network(), strict=False) == []
    production = JobConfig.from_job_folder(
        job_builder.write_job(job_builder.resolve("cxr_classification"), tmp_path / "production")
    )
    assert ModuleValidator.validate(production.build_network(), strict=False)  # BatchNorm: refused


def test_a_site_requiring_dp_builds_a_dp_trainer(site, tmp_path, monkeypatch):
    """The CXR job with its DP profile at a site that requires DP: DP-SGD at the site's budget over all the
    job's rounds and local epochs, the epsilon spent reported with each result, and the exchanged state_dict
    still the network's (no Opacus wrapper). A small DenseNet (per-sample gradients of DenseNet-121 take
    long on a CPU), with the DP profile's normalisation and activation."""
    network = {"path": "monai.networks.nets.DenseNet", "args": {
        "init_features": 8, "growth_rate": 4, "block_config": [2, 2], "norm": ["group", {"num_groups": 4}]}}
    small = {
        "server": {"num_rounds": 2, "components": [{"id": "persistor", "args": {"model": network}}]},
        "client": {"trainer": {"image_size": [32, 32], "batch_size": 4, "num_workers": 0, "local_epochs": 1,
                               "max_train_samples": 8, "max_val_samples": 4}},
    }  # fmt: skip
    job = dp_job(tmp_path, small)
    assert job.network["args"]["act"] == ["relu", {"inplace": False}]  # from the DP profile
    calls = []
    monkeypatch.setattr(cxr, "make_private", lambda *args: calls.append(args) or make_private(*args))
    torch.manual_seed(0)
    trainer = cxr.build(job, site_config(site, tmp_path, DP_ON), torch.device("cpu"))
    ((model, _, _, dp, epochs),) = calls
    assert model is trainer.model and dp == DP_ON["differential_privacy"]
    assert epochs == job.num_rounds * job.trainer()["local_epochs"] == 2  # the budget covers the whole job
    assert trainer.n_train == 8 and trainer.dp_accounting is not None
    before = trainer.dp_accounting()
    assert before["dp_epsilon"] == 0.0 and (before["dp_delta"], before["dp_max_grad_norm"]) == (1e-5, 1.0)
    assert before["dp_noise_multiplier"] > 0

    loss, steps = trainer.train()
    assert steps == 2 and np.isfinite(loss)  # 1 local epoch of 8 / 4 Poisson-sampled batches
    spent = trainer.dp_accounting()["dp_epsilon"]
    assert 0.0 < spent < DP_ON["differential_privacy"]["epsilon"]  # one of 2 rounds: a part of the budget
    assert list(trainer.model.state_dict()) == list(job.build_network().state_dict())
    assert set(trainer.evaluate()) == {job.key_metric}


def test_an_empty_first_poisson_batch_of_dict_samples_is_an_empty_batch(monkeypatch):
    """Poisson sampling can draw an empty batch, the first one included; the trainers' samples are dicts.

    Opacus builds an empty batch from the first non-empty one; before there is one, from the items of
    ``dataset[0]``, which for a dict are its keys (dtype ``str``): a TypeError that stops the round.
    """
    import opacus.privacy_engine

    monkeypatch.setattr(opacus.privacy_engine, "get_noise_multiplier", lambda **_: 1.0)  # the loader is the subject
    data = [{"image": torch.randn(1, 8, 8), "label": np.ones(3, np.float32)} for _ in range(6)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    dp = {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}
    _, loader, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, 3), dp, 2)
    empty = loader.collate_fn([])  # what the DP loader yields when the sampler draws no sample
    assert {key: tuple(value.shape) for key, value in empty.items()} == {"image": (0, 1, 8, 8), "label": (0, 3)}
