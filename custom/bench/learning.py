"""Rows "federated", "bandwidth" and "dp": what FedAvg learns, side by side with the alternatives, through the
trainers' own code.

Every side is built by the job's trainer (``<job>.build``: its data reading, network, loss, optimizer, DP-SGD)
from the job configuration that ``make submit`` would send (job_configs/ with the demo profile, plus the DP
profiles for the DP row), on data generated in the project's layouts for two sites (seeds 1 and 2). FedAvg runs
in this one process: each site's trainer starts the round from the global weights, trains its local epochs and
sends its update (a ``WEIGHT_DIFF`` DXO) through the same filters the job configures (``sparse_update``, NVFlare's
``ModelQuantizer``/``ModelDequantizer``); NVFlare's ``WeightedAggregationHelper`` averages the updates weighted by
optimizer steps, as the server's ``InTimeAccumulateWeightedAggregator`` does. The bytes a site sends are the
update serialized by NVFlare (FOBS) after the site's filters. Transport, mTLS and orchestration are not in these
rows (row "overhead" measures them on the real federation).

Every model is evaluated on the same validation set, both sites' validation cases pooled; the figure is the key
metric after the last round (the metric after each round is in ``samples``). Centralized training trains the same
network from the same initial weights on both sites' training cases pooled, as many local epochs per round as
FedAvg (the same number of passes over the data). One seed per run (SEED): the table states it. Row
"federated" runs each of the three jobs; row "bandwidth" the CXR job; row "dp" all three.
"""

import importlib
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

from hcls.job_config import JobConfig, persistor_args
from hcls.site_config import SiteConfig
from ops import job_builder

from .table import Measurement

CXR = "cxr_classification"
SITES = ("site1", "site2")  # the two sites of the in-process federation
SEED = 0


@dataclass(frozen=True)
class Sizes:
    n_train: int  # training cases per site
    n_val: int  # validation cases per site
    size: int  # generated image width and height (CXR), volume edge in voxels (CT, LUNA16 x and y)
    rounds: int  # FedAvg rounds; centralized training runs as many rounds of the job's local epochs
    signal: float | None = None  # CXR: a finding's peak brightness (the demo's 0.40 lets pooled training reach 0.998)


# per job: (full, QUICK) sizes. 3D: the demo's volume sizes and local epochs, more cases and rounds than the demo.
SIZES = {
    CXR: (Sizes(300, 150, 64, 14, signal=0.2), Sizes(24, 16, 32, 2, signal=0.15)),
    "ct_segmentation": (Sizes(16, 6, 48, 8), Sizes(2, 1, 48, 1)),
    "lung_nodule_detection": (Sizes(16, 6, 48, 8), Sizes(2, 1, 48, 1)),
}  # fmt: skip


# ---------------------------------------------------------------- data and configuration


def generate_site(job: str, out: Path, sizes: Sizes, index: int) -> None:
    """One site's data in the project's layout (datagen), seed ``index``."""
    from datagen import ct, cxr, luna16

    if job == CXR:
        cxr.generate(out, sizes.n_train, sizes.n_val, seed=index, size=sizes.size, site_prefix=str(index),
                     signal=sizes.signal)  # fmt: skip
    elif job == "ct_segmentation":
        ct.generate(out, sizes.n_train, sizes.n_val, seed=index, size=sizes.size)
    else:
        luna16.generate(out, sizes.n_train, sizes.n_val, seed=index, size=sizes.size)


def pool_cxr(root: Path) -> None:
    """``pooled/``: every site's studies, each patient's folder linked as ``images/patient<site number><NNNNN>``
    (two sites' patient numbers may coincide)."""
    (root / "pooled" / "images").mkdir(parents=True)
    for split in ("train", "val"):
        lines = []
        for index, site in enumerate(SITES, start=1):
            header, *rows = (root / site / f"{split}.csv").read_text().splitlines()
            lines = lines or [header]
            for row in rows:  # Path (images/patientNNNNN/study1/...) is the first column
                _, patient, rest = row.split("/", 2)
                pooled = f"patient{index}{patient.removeprefix('patient')}"
                (root / "pooled" / "images" / pooled).symlink_to(root / site / "images" / patient)
                lines.append(f"images/{pooled}/{rest}")
        (root / "pooled" / f"{split}.csv").write_text("\n".join(lines) + "\n")


def pool_lists(root: Path, rewrite) -> None:
    """``pooled/train_data.json`` and ``val_data.json``: every site's entries, each passed through
    ``rewrite(site, entry)``."""
    for name in ("train_data.json", "val_data.json"):
        merged = {}
        for site in SITES:
            for key, entries in json.loads((root / site / name).read_text()).items():
                merged.setdefault(key, []).extend(rewrite(site, entry) for entry in entries)
        (root / "pooled" / name).write_text(json.dumps(merged, indent=1) + "\n")


def pool_ct(root: Path) -> None:
    """``pooled/<site>`` links each site's folder; the lists name ``<site>/imagesTr/ct_NNNN.nii.gz`` (every site
    numbers its cases from 1)."""
    (root / "pooled").mkdir()
    for site in SITES:
        (root / "pooled" / site).symlink_to(root / site)
    pool_lists(root, lambda site, entry: {k: f"{site}/{v}" for k, v in entry.items()})


def pool_luna16(root: Path) -> None:
    """``pooled/images/<seriesuid>.nii.gz`` links every site's series (the uids are unique), and
    ``annotations/annotations.csv`` holds every site's nodules."""
    (root / "pooled" / "images").mkdir(parents=True)
    (root / "pooled" / "annotations").mkdir()
    lines = []
    for site in SITES:
        for image in sorted((root / site / "images").iterdir()):
            (root / "pooled" / "images" / image.name).symlink_to(image)
        header, *rows = (root / site / "annotations" / "annotations.csv").read_text().splitlines()
        lines = (lines or [header]) + rows
    (root / "pooled" / "annotations" / "annotations.csv").write_text("\n".join(lines) + "\n")
    pool_lists(root, lambda site, entry: entry)


POOL = {CXR: pool_cxr, "ct_segmentation": pool_ct, "lung_nodule_detection": pool_luna16}


def generate_data(job: str, work: Path, sizes: Sizes) -> Path:
    """``work/data/<site>`` for each site and ``work/data/pooled`` (every site's cases); the data root."""
    root = work / "data"
    for index, site in enumerate(SITES, start=1):
        generate_site(job, root / site, sizes, index)
    POOL[job](root)
    return root


def site_config(job: str, work: Path, dataset: str, dp: dict | None = None) -> SiteConfig:
    """A site config whose dataset of ``job`` is ``data/<dataset>``; DP-SGD at ``dp`` ({epsilon, delta,
    max_grad_norm})."""
    privacy = {"min_dataset_size": 0,
               "blocked_data_fields": ["PatientName", "PatientID", "PatientBirthDate"],
               "differential_privacy": {"enabled": dp is not None, "mechanism": "gaussian", **(dp or {})}}  # fmt: skip
    path = work / "sites" / (dataset + (f"_dp{dp['epsilon']:g}" if dp else "") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data_root": str(work / "data"), "datasets": {job: dataset}, "privacy": privacy}))
    return SiteConfig(path)


def job_config(job: str, work: Path, name: str, profiles: list[str], sizes: Sizes, quick: bool,
               checkpoint: Path | None = None) -> JobConfig:  # fmt: skip
    """``job`` as ``make submit JOB=<job> PROFILE=<first>`` builds it, with the further profiles layered on,
    ``sizes.rounds`` rounds, (CXR, QUICK) images resized to the generated size and the pre-trained weights that a
    profile names taken from ``checkpoint`` (an absolute path, as on a server)."""
    config = job_builder.resolve(job, profiles[0])
    for profile in profiles[1:]:
        path = job_builder.profile_path(job, profile)
        config = job_builder.merge(config, job_builder.read_layer(path), str(path))
    config["server"]["num_rounds"] = sizes.rounds
    if quick and job == CXR:
        config["client"]["trainer"]["image_size"] = [sizes.size, sizes.size]
    if checkpoint is not None:
        persistor_args(config["server"])["source_ckpt_file_full_name"] = str(checkpoint)
    return JobConfig.from_job_folder(job_builder.write_job(config, work / "jobs" / name))


def trainer_module(job: JobConfig):
    """The job's trainer (custom/<app_script>), whose ``build`` the client loop calls."""
    return importlib.import_module(Path(job.client["app_script"]).stem)


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
    """The weights the server starts from: the pre-trained ones the persistor names, else the network's from SEED."""
    set_determinism(seed=SEED)
    checkpoint = persistor_args(job.server).get("source_ckpt_file_full_name")
    if checkpoint:
        return torch.load(checkpoint, weights_only=True)
    return {k: v.clone() for k, v in job.build_network().state_dict().items()}


def fedavg(job: JobConfig, sites: list[SiteConfig], evaluator, channel_of, sizes: Sizes) -> Outcome:
    """``sizes.rounds`` rounds of FedAvg over ``sites`` (each with its own ``channel_of()``), the global model
    evaluated by ``evaluator`` after each round."""
    module, device = trainer_module(job), torch.device("cpu")
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
    """The same network from the same initial weights, trained on the pooled data for ``sizes.rounds`` rounds of the
    job's local epochs."""
    start = initial_state(job)
    trainer = trainer_module(job).build(job, pooled, torch.device("cpu"))
    trainer.model.load_state_dict(start)
    curve = []
    for epoch in range(sizes.rounds):
        trainer.train()
        curve.append(float(trainer.evaluate()[job.key_metric]))
        print(f"bench:   centralized round {epoch}: {job.key_metric} {curve[-1]:.4f}", flush=True)
    return Outcome(curve[-1], curve)


class Setup:
    """One job's data, site configs and pooled evaluator in one bench run, shared by the rows that run in it."""

    def __init__(self, job: str, quick: bool, work: Path):
        common_decomposers.register()
        torch.set_num_threads(os.cpu_count() or 1)
        self.name, self.quick, self.work, self.sizes = job, quick, work, SIZES[job][1 if quick else 0]
        shutil.rmtree(work, ignore_errors=True)
        generate_data(job, work, self.sizes)
        self.sites = [site_config(job, work, site) for site in SITES]
        self.pooled = site_config(job, work, "pooled")
        self._evaluators, self._dense = {}, {}

    def job(self, name: str, profiles: list[str], checkpoint: Path | None = None) -> JobConfig:
        return job_config(self.name, self.work, name, profiles, self.sizes, self.quick, checkpoint)

    def evaluator(self, job: JobConfig):
        """A trainer over the pooled data, only its ``evaluate`` used (the same validation set for every side)."""
        if job.config_dir not in self._evaluators:
            self._evaluators[job.config_dir] = trainer_module(job).build(job, self.pooled, torch.device("cpu"))
        return self._evaluators[job.config_dir]

    def dense(self, name: str, job: JobConfig) -> Outcome:
        """FedAvg with dense updates of job ``name`` (run once, shared by the rows)."""
        if name not in self._dense:
            self._dense[name] = fedavg(job, self.sites, self.evaluator(job), Channel, self.sizes)
        return self._dense[name]

    def describe(self, job: JobConfig) -> str:
        s, network = self.sizes, job.network["path"].rsplit(".", 1)[1]
        epochs = job.client["trainer"]["local_epochs"]
        data = {CXR: f"CXR {network} at {s.size} px, 2 sites x ({s.n_train} train + {s.n_val} val) studies, "
                     f"signal {s.signal}",
                "ct_segmentation": f"CT {network}, 2 sites x ({s.n_train} train + {s.n_val} val) volumes of "
                                   f"{s.size}^3 voxels",
                "lung_nodule_detection": f"LUNA16 {network}, 2 sites x ({s.n_train} train + {s.n_val} "
                                         f"val) series of {s.size}x{s.size}x{s.size // 2} voxels"}[self.name]  # fmt: skip
        return f"{data}, {s.rounds} rounds x {epochs} local epochs, seed {SEED}"


_setups: dict = {}


def setup(job: str, quick: bool, work: Path) -> Setup:
    """One Setup per job and bench run (the rows of this module share it)."""
    key = (job, quick, work.parent)
    if key not in _setups:
        _setups[key] = Setup(job, quick, work.parent / "learning" / job)
    return _setups[key]


# ---------------------------------------------------------------- the rows


def federated(quick: bool, work: Path) -> list[Measurement]:
    """Row 1: FedAvg against centralized training on the pooled data, per job. Target: >= 0.98 x centralized."""
    rows = []
    for name in SIZES:
        s = setup(name, quick, work)
        job = s.job("demo", ["demo"])
        fl, central = s.dense("demo", job), centralized(job, s.pooled, s.sizes)
        rows.append(Measurement("federated", f"{job.key_metric} of FedAvg; reference: the same network trained "
                                f"centralized on the pooled data for as many epochs; {s.describe(job)}", fl.metric,
                                job.key_metric, target=">= 0.98 x centralized", met=fl.metric >= 0.98 * central.metric,
                                reference=central.metric, reference_what="centralized", samples=fl.curve))  # fmt: skip
    return rows


BANDWIDTH_OPTIONS = {
    "top-k 10 %": lambda: TopK(10), "top-k 1 %": lambda: TopK(1), "float16": lambda: Quantized("float16"),
    "adaquant": lambda: Quantized("adaquant"), "float16 + top-k 10 %": lambda: Quantized("float16", 10),
}  # fmt: skip


def bandwidth(quick: bool, work: Path) -> list[Measurement]:
    """Row 3: bytes a site sends per round and the final metric of each option against dense updates. Target: an
    option at <= 0.25 x dense bytes and >= 0.97 x the dense metric. NVFlare's 8-bit and 4-bit quantizers
    (blockwise8, float4, normfloat4) run on CUDA only (bitsandbytes on a GPU): not measurable on this machine."""
    s = setup(CXR, quick, work)
    job = s.job("demo", ["demo"])
    dense = s.dense("demo", job)
    rows = [Measurement("bandwidth", f"bytes a site sends per round, dense; {s.describe(job)}", dense.sent_bytes / 1e6,
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
# Public pre-training for the DP row, per job: (full, QUICK) cases for training and validation, epochs. Generated
# with seed 3 in a public release's layout: CXR NIH ChestX-ray14's (14 of the 18 outputs) at the generator's default
# signal (stronger than the sites'); CT the Medical Segmentation Decathlon's (dataset.json, its own label names);
# LUNA16 its release's (subsetN/<uid>.mhd, annotations.csv; subsets 8-9 for validation).
PUBLIC = {CXR: ((600, 150, 6), (24, 16, 1)), "ct_segmentation": ((32, 8, 12), (4, 1, 1)),
          "lung_nodule_detection": ((32, 8, 10), (2, 1, 1))}  # fmt: skip
PUBLIC_WHAT = {CXR: "NIH ChestX-ray14 layout, 14 of 18 labels", "ct_segmentation": "Decathlon layout",
               "lung_nodule_detection": "LUNA16 release layout"}  # fmt: skip


def generate_public(s: Setup, out: Path, n_train: int, n_val: int) -> None:
    """The public data of ``s``'s job in ``out``: ``n_train`` + ``n_val`` cases in a public release's layout."""
    from datagen import ct, cxr, luna16

    if s.name == CXR:
        cxr.generate_nih(out, n_train, n_val, seed=3, size=s.sizes.size)
    elif s.name == "ct_segmentation":  # the msd layout splits off its validation cases itself (msd_split, 0.2)
        ct.generate(out, n_train, n_val, seed=3, size=s.sizes.size, layout="msd")
    else:
        luna16.generate(out, n_train, n_val, seed=3, size=s.sizes.size, layout="luna16")


def pretrain(s: Setup) -> tuple[Path, float, str]:
    """The job's demo network (CXR and LUNA16: its batch-norm one) trained without DP on generated public data, as a
    consortium would start from a public release. Returns the file its weights are saved in (the dp_pretrained
    job's persistor is pointed at it by absolute path), its key metric on the sites' pooled validation set and what
    it was trained on."""
    n_train, n_val, epochs = PUBLIC[s.name][1 if s.quick else 0]
    generate_public(s, s.work / "data" / "public", n_train, n_val)
    job = s.job("public", ["demo"])
    set_determinism(seed=SEED)
    trainer = trainer_module(job).build(job, site_config(s.name, s.work, "public"), torch.device("cpu"))
    for epoch in range(epochs):
        trainer.train()
        print(f"bench:   public pre-training epoch {epoch}: {job.key_metric} {trainer.evaluate()[job.key_metric]:.4f} "
              "(public validation set)", flush=True)  # fmt: skip
    checkpoint = s.work / "pretrained" / f"{s.name}.pt"
    checkpoint.parent.mkdir(exist_ok=True)
    torch.save(trainer.model.state_dict(), checkpoint)
    public = (f"pre-trained without DP on {n_train} + {n_val} public cases ({PUBLIC_WHAT[s.name]}, seed 3), "
              f"{epochs} epochs")  # fmt: skip
    return checkpoint, evaluate(s.evaluator(job), job, trainer.model.state_dict()), public


def dp_pretrained(s: Setup, recipe: str) -> list[Measurement]:
    """The job's dp_pretrained profile: pre-trained on public data, fine-tuned at the sites without DP and with
    DP-SGD at epsilon 8 and 1; and the pre-trained network before fine-tuning."""
    checkpoint, start, public = pretrain(s)
    job = s.job("dp_pretrained", ["demo", "dp_pretrained"], checkpoint)
    plain = s.dense("dp_pretrained", job)
    rows = [Measurement("dp", f"{job.key_metric} of the pre-trained network before fine-tuning ({public})", start,
                        job.key_metric, reference=plain.metric, reference_what="fine-tuned, no DP")]  # fmt: skip
    return rows + dp_runs(s, job, plain, f"the dp_pretrained profile: {public}, {recipe}")


def dp(quick: bool, work: Path) -> list[Measurement]:
    """Row 4: FedAvg with record-level DP-SGD at every site (epsilon 8 and 1 over the whole job) against the same
    network and recipe without DP. Target: >= 0.90 x no DP at epsilon 8.

    CXR, the dp_pretrained profile: the BatchNorm DenseNet-121 pre-trained without DP on public data, then
    fine-tuned at the sites with its batch norms frozen in eval mode and only the last dense block and the
    classifier trained. CT, the dp_pretrained profile: SegResNet (GroupNorm) pre-trained without DP on public data,
    then its full-resolution decoder stage and output convolution fine-tuned, one crop per volume. LUNA16, the
    dp_pretrained profile: the batch-norm RetinaNet pre-trained without DP on public data, then its batch norms
    frozen and only its two output convolutions fine-tuned, one patch per volume."""
    rows = dp_pretrained(setup(CXR, quick, work), "DenseNet-121 fine-tuned with batch norm frozen, denseblock4 and "
                         "the classifier trained")  # fmt: skip
    rows += dp_pretrained(setup("ct_segmentation", quick, work), "SegResNet fine-tuned: up_samples.2, up_layers.2 "
                          "and conv_final trained, one crop per volume")  # fmt: skip
    return rows + dp_pretrained(setup("lung_nodule_detection", quick, work), "RetinaNet fine-tuned with batch norm "
                                "frozen, cls_logits and bbox_reg trained, one patch per volume")  # fmt: skip


def dp_runs(s: Setup, job: JobConfig, plain: Outcome, recipe: str) -> list[Measurement]:
    """FedAvg of ``job`` with DP-SGD at every site at epsilon 8 and 1, against ``plain`` (the same without DP)."""
    rows = []
    for epsilon in (8, 1):
        sites = [site_config(s.name, s.work, site, {"epsilon": epsilon, **DP}) for site in SITES]
        out = fedavg(job, sites, s.evaluator(job), Channel, s.sizes)
        target = {"target": ">= 0.90 x no DP", "met": out.metric >= 0.90 * plain.metric} if epsilon == 8 else {}
        rows.append(Measurement("dp", f"{job.key_metric}, DP-SGD at every site, epsilon {epsilon} (delta "
                                f"{DP['delta']:g}, clip {DP['max_grad_norm']:g}); {recipe}; {s.describe(job)}",
                                out.metric, job.key_metric, reference=plain.metric, reference_what="no DP",
                                samples=out.curve, **target))  # fmt: skip
    return rows
