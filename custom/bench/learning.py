"""Rows "federated", "bandwidth" and "dp": what FedAvg learns, side by side with the alternatives, through the
trainers' own code.

Every side is built by the job's trainer (``cxr_classification.build``: its data reading, network, loss, optimizer,
DP-SGD) from the job configuration that ``make submit`` would send (job_configs/ with the demo profile, plus the dp
profile for the DP row), on CXR data generated in the project's layout for two sites (seeds 1 and 2). FedAvg runs
in this one process: each site's trainer starts the round from the global weights, trains its local epochs and
sends its update (a ``WEIGHT_DIFF`` DXO) through the same filters the job configures (``sparse_update``, NVFlare's
``ModelQuantizer``/``ModelDequantizer``); NVFlare's ``WeightedAggregationHelper`` averages the updates weighted by
optimizer steps, as the server's ``InTimeAccumulateWeightedAggregator`` does. The bytes a site sends are the
update serialized by NVFlare (FOBS) after the site's filters. Transport, mTLS and orchestration are not in these
rows (row "overhead" measures them on the real federation).

Every model is evaluated on the same validation set, both sites' validation studies pooled; the figure is the key
metric after the last round (the metric after each round is in ``samples``). Centralized training trains the same
network from the same initial weights on both sites' training studies pooled, for as many epochs as FedAvg has
rounds (the same number of passes over the data). One seed per run (SEED): the table states it.
"""

import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.utils import set_determinism
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.decomposers import common_decomposers
from nvflare.fuel.utils import fobs

from hcls.job_config import JobConfig
from hcls.site_config import SiteConfig
from ops import job_builder

from .table import Measurement

JOB = "cxr_classification"
SITES = ("site1", "site2")  # the two sites of the in-process federation
SEED = 0


@dataclass(frozen=True)
class Sizes:
    n_train: int  # training studies per site
    n_val: int  # validation studies per site
    pixels: int  # generated image width and height
    signal: float  # a finding's peak brightness (datagen.cxr.SIGNAL is the demo's: 0.40, pooled training reaches 0.998)
    rounds: int  # FedAvg rounds = centralized epochs


FULL = Sizes(n_train=300, n_val=150, pixels=64, signal=0.2, rounds=14)
QUICK = Sizes(n_train=24, n_val=16, pixels=32, signal=0.15, rounds=2)


# ---------------------------------------------------------------- data and configuration


def generate_data(work: Path, sizes: Sizes) -> Path:
    """``work/data/<site>`` for each site and ``work/data/pooled``: every site's studies, each patient's folder
    linked as ``images/patient<site number><NNNNN>`` (two sites' patient numbers may coincide); the data root."""
    from datagen import cxr

    root = work / "data"
    (root / "pooled" / "images").mkdir(parents=True)
    for split in ("train", "val"):
        lines = []
        for index, site in enumerate(SITES, start=1):
            if split == "train":
                cxr.generate(root / site, sizes.n_train, sizes.n_val, seed=index, size=sizes.pixels,
                             site_prefix=site[-1].upper(), signal=sizes.signal)  # fmt: skip
            header, *rows = (root / site / f"{split}.csv").read_text().splitlines()
            lines = lines or [header]
            for row in rows:  # Path (images/patientNNNNN/study1/...) is the first column
                _, patient, rest = row.split("/", 2)
                pooled = f"patient{index}{patient.removeprefix('patient')}"
                (root / "pooled" / "images" / pooled).symlink_to(root / site / "images" / patient)
                lines.append(f"images/{pooled}/{rest}")
        (root / "pooled" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def site_config(work: Path, dataset: str, dp: dict | None = None) -> SiteConfig:
    """A site config whose CXR dataset is ``data/<dataset>``; DP-SGD at ``dp`` ({epsilon, delta, max_grad_norm})."""
    privacy = {"min_dataset_size": 0,
               "blocked_data_fields": ["PatientName", "PatientID", "PatientBirthDate"],
               "differential_privacy": {"enabled": dp is not None, "mechanism": "gaussian", **(dp or {})}}  # fmt: skip
    path = work / "sites" / (dataset + (f"_dp{dp['epsilon']:g}" if dp else "") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data_root": str(work / "data"), "datasets": {JOB: dataset}, "privacy": privacy}))
    return SiteConfig(path)


def job_config(work: Path, name: str, profiles: list[str], sizes: Sizes, quick: bool) -> JobConfig:
    """The job as ``make submit JOB=cxr_classification PROFILE=<first>`` builds it, with the further profiles
    layered on, ``sizes.rounds`` rounds and (QUICK) images resized to the generated size."""
    config = job_builder.resolve(JOB, profiles[0])
    for profile in profiles[1:]:
        path = job_builder.profile_path(JOB, profile)
        config = job_builder.merge(config, job_builder.read_layer(path), str(path))
    config["server"]["num_rounds"] = sizes.rounds
    if quick:
        config["client"]["trainer"]["image_size"] = [sizes.pixels, sizes.pixels]
    return JobConfig.from_job_folder(job_builder.write_job(config, work / "jobs" / name))


def trainer_module():
    import cxr_classification

    return cxr_classification


# ---------------------------------------------------------------- what a site sends


class Channel:
    """A site's update on its way to the aggregator: the site's result filters, serialization, the server's."""

    name = "dense"

    def __init__(self):
        self.fl_ctx = FLContext()

    def site(self, dxo: DXO) -> DXO:
        return dxo

    def server(self, dxo: DXO) -> DXO:
        return dxo

    def send(self, dxo: DXO) -> tuple[DXO, int]:
        sent = self.site(dxo)
        return self.server(sent), len(fobs.dumps(sent.to_shareable()))


class TopK(Channel):
    """The job's ``sparse_update`` filters: top-k per tensor with error feedback (custom/sparse_update.py)."""

    def __init__(self, top_k_percent: float):
        from sparse_update import SparseUpdateDecoder, SparseUpdateEncoder

        super().__init__()
        self.name = f"top-k {top_k_percent:g} %"
        self.encoder, self.decoder = SparseUpdateEncoder(), SparseUpdateDecoder()
        self.encoder.top_k_percent = top_k_percent  # what START_RUN reads from the job's sparse_update block

    def site(self, dxo):
        return self.encoder.process_dxo(dxo, dxo.to_shareable(), self.fl_ctx) or dxo

    def server(self, dxo):
        return self.decoder.process_dxo(dxo, dxo.to_shareable(), self.fl_ctx) or dxo


class Quantized(Channel):
    """NVFlare's ``ModelQuantizer`` on the site, ``ModelDequantizer`` on the server, then optionally top-k of the
    quantized update. NVFlare's quantizer refuses integer tensors (BatchNorm's ``num_batches_tracked``): they
    travel beside it, unquantized."""

    def __init__(self, quantization_type: str, top_k_percent: float | None = None):
        from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
        from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

        super().__init__()
        self.name = quantization_type + (f" + top-k {top_k_percent:g} %" if top_k_percent else "")
        self.quantizer, self.dequantizer = ModelQuantizer(quantization_type), ModelDequantizer()
        self.top_k = TopK(top_k_percent) if top_k_percent else Channel()

    def send(self, dxo):
        floats = {k: v for k, v in dxo.data.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}
        others = {k: v for k, v in dxo.data.items() if k not in floats}
        floats = DXO(dxo.data_kind, floats, dict(dxo.meta))
        quantized = self.quantizer.process_dxo(floats, floats.to_shareable(), self.fl_ctx)
        sent = self.top_k.site(quantized)
        nbytes = len(fobs.dumps(DXO(dxo.data_kind, {**sent.data, **others}, sent.meta).to_shareable()))
        arrived = self.top_k.server(sent)
        restored = self.dequantizer.process_dxo(arrived, arrived.to_shareable(), self.fl_ctx)
        return DXO(dxo.data_kind, {**restored.data, **others}, dxo.meta), nbytes


# ---------------------------------------------------------------- training


@dataclass
class Outcome:
    metric: float  # the key metric after the last round / epoch
    curve: list[float]  # after each round / epoch
    sent_bytes: float = 0.0  # median bytes one site sent per round


def initial_state(job: JobConfig) -> dict:
    set_determinism(seed=SEED)
    return {k: v.clone() for k, v in job.build_network().state_dict().items()}


def fedavg(job: JobConfig, sites: list[SiteConfig], evaluator, channel_of, sizes: Sizes) -> Outcome:
    """``sizes.rounds`` rounds of FedAvg over ``sites`` (each with its own ``channel_of()``), the global model
    evaluated by ``evaluator`` after each round."""
    module, device = trainer_module(), torch.device("cpu")
    start = initial_state(job)
    trainers = [module.build(job, site, device) for site in sites]
    channels = [channel_of() for _ in sites]
    global_np = {k: v.numpy().copy() for k, v in start.items()}
    curve, sent = [], []
    for round_no in range(sizes.rounds):
        helper = WeightedAggregationHelper()
        for site, trainer, channel in zip(sites, trainers, channels, strict=True):
            trainer.model.load_state_dict({k: torch.as_tensor(v) for k, v in global_np.items()})
            _, steps = trainer.train()
            local = trainer.model.state_dict()
            diff = {k: local[k].detach().cpu().numpy() - v for k, v in global_np.items()}
            received, nbytes = channel.send(DXO(DataKind.WEIGHT_DIFF, diff, {"NUM_STEPS_CURRENT_ROUND": steps}))
            helper.add(received.data, steps, site.path.stem, round_no)
            sent.append(nbytes)
        update = helper.get_result()
        global_np = {k: np.asarray(v + np.asarray(update[k]), dtype=v.dtype) for k, v in global_np.items()}
        curve.append(evaluate(evaluator, job, global_np))
        print(f"bench:   {channel.name} round {round_no}: {job.key_metric} {curve[-1]:.4f}", flush=True)
    return Outcome(curve[-1], curve, statistics.median(sent))


def evaluate(evaluator, job: JobConfig, state: dict) -> float:
    evaluator.model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return float(evaluator.evaluate()[job.key_metric])


def centralized(job: JobConfig, pooled: SiteConfig, sizes: Sizes) -> Outcome:
    """The same network from the same initial weights, trained on the pooled data for ``sizes.rounds`` epochs."""
    start = initial_state(job)
    trainer = trainer_module().build(job, pooled, torch.device("cpu"))
    trainer.model.load_state_dict(start)
    curve = []
    for epoch in range(sizes.rounds):
        trainer.train()
        curve.append(float(trainer.evaluate()[job.key_metric]))
        print(f"bench:   centralized epoch {epoch}: {job.key_metric} {curve[-1]:.4f}", flush=True)
    return Outcome(curve[-1], curve)


class Setup:
    """Data, site configs and the pooled evaluator of one bench run, shared by the rows that run in it."""

    def __init__(self, quick: bool, work: Path):
        common_decomposers.register()
        torch.set_num_threads(os.cpu_count() or 1)
        self.quick, self.work, self.sizes = quick, work, QUICK if quick else FULL
        shutil.rmtree(work, ignore_errors=True)
        generate_data(work, self.sizes)
        self.sites = [site_config(work, site) for site in SITES]
        self.pooled = site_config(work, "pooled")
        self._evaluators, self._dense = {}, {}

    def job(self, name: str, profiles: list[str]) -> JobConfig:
        return job_config(self.work, name, profiles, self.sizes, self.quick)

    def evaluator(self, job: JobConfig):
        """A trainer over the pooled data, only its ``evaluate`` used (the same validation set for every side)."""
        if job.config_dir not in self._evaluators:
            self._evaluators[job.config_dir] = trainer_module().build(job, self.pooled, torch.device("cpu"))
        return self._evaluators[job.config_dir]

    def dense(self, name: str, job: JobConfig) -> Outcome:
        """FedAvg with dense updates of job ``name`` (run once, shared by the rows)."""
        if name not in self._dense:
            self._dense[name] = fedavg(job, self.sites, self.evaluator(job), Channel, self.sizes)
        return self._dense[name]

    def describe(self) -> str:
        s = self.sizes
        return (f"CXR DenseNet-121 at {s.pixels} px, 2 sites x ({s.n_train} train + {s.n_val} val) studies, "
                f"signal {s.signal}, {s.rounds} rounds x 1 local epoch, seed {SEED}")  # fmt: skip


_setups: dict = {}


def setup(quick: bool, work: Path) -> Setup:
    """One Setup per bench run (the rows of this module share it)."""
    key = (quick, work.parent)
    if key not in _setups:
        _setups[key] = Setup(quick, work.parent / "learning")
    return _setups[key]


# ---------------------------------------------------------------- the rows


def federated(quick: bool, work: Path) -> list[Measurement]:
    """Row 1: FedAvg against centralized training on the pooled data. Target: >= 0.98 x centralized."""
    s = setup(quick, work)
    job = s.job("demo", ["demo"])
    fl, central = s.dense("demo", job), centralized(job, s.pooled, s.sizes)
    ratio = fl.metric / central.metric
    return [Measurement("federated", f"{job.key_metric} of FedAvg; reference: the same network trained centralized on "
                        f"the pooled data for as many epochs; {s.describe()}", fl.metric, job.key_metric,
                        target=">= 0.98 x centralized", met=ratio >= 0.98, reference=central.metric,
                        reference_what="centralized", samples=fl.curve)]  # fmt: skip


BANDWIDTH_OPTIONS = {
    "top-k 10 %": lambda: TopK(10), "top-k 1 %": lambda: TopK(1), "float16": lambda: Quantized("float16"),
    "adaquant": lambda: Quantized("adaquant"), "float16 + top-k 10 %": lambda: Quantized("float16", 10),
}  # fmt: skip


def bandwidth(quick: bool, work: Path) -> list[Measurement]:
    """Row 3: bytes a site sends per round and the final metric of each option against dense updates. Target: an
    option at <= 0.25 x dense bytes and >= 0.97 x the dense metric. NVFlare's 8-bit and 4-bit quantizers
    (blockwise8, float4, normfloat4) run on CUDA only (bitsandbytes on a GPU): not measurable on this machine."""
    s = setup(quick, work)
    job = s.job("demo", ["demo"])
    dense = s.dense("demo", job)
    rows = [Measurement("bandwidth", f"bytes a site sends per round, dense; {s.describe()}", dense.sent_bytes / 1e6,
                        "MB")]  # fmt: skip
    for option, channel in BANDWIDTH_OPTIONS.items():
        out = fedavg(job, s.sites, s.evaluator(job), channel, s.sizes)
        rows += [
            Measurement("bandwidth", f"bytes a site sends per round, {option}", out.sent_bytes / 1e6, "MB",
                        target="<= 0.25 x dense", met=out.sent_bytes <= 0.25 * dense.sent_bytes,
                        reference=dense.sent_bytes / 1e6, reference_what="dense"),
            Measurement("bandwidth", f"{job.key_metric} after the last round, {option}", out.metric, job.key_metric,
                        target=">= 0.97 x dense", met=out.metric >= 0.97 * dense.metric, reference=dense.metric,
                        reference_what="dense", samples=out.curve),
        ]  # fmt: skip
    return rows


DP = {"delta": 1e-5, "max_grad_norm": 1.0}


def dp(quick: bool, work: Path) -> list[Measurement]:
    """Row 4: FedAvg with record-level DP-SGD at every site (epsilon 8 and 1 over the whole job) against the same
    network (the dp profile: GroupNorm, no in-place activations) without DP. Target: >= 0.90 x at epsilon 8."""
    s = setup(quick, work)
    job = s.job("dp", ["demo", "dp"])
    plain = s.dense("dp", job)
    rows = []
    for epsilon in (8, 1):
        sites = [site_config(s.work, site, {"epsilon": epsilon, **DP}) for site in SITES]
        out = fedavg(job, sites, s.evaluator(job), Channel, s.sizes)
        target = {"target": ">= 0.90 x no DP", "met": out.metric >= 0.90 * plain.metric} if epsilon == 8 else {}
        rows.append(Measurement("dp", f"{job.key_metric}, DP-SGD at every site, epsilon {epsilon} (delta "
                                f"{DP['delta']:g}, clip {DP['max_grad_norm']:g}); GroupNorm {s.describe()}",
                                out.metric, job.key_metric, reference=plain.metric, reference_what="no DP",
                                samples=out.curve, **target))  # fmt: skip
    return rows
