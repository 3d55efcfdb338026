"""Sparse model updates: each site sends only the top-k percent of its update, with error feedback.

Two NVFlare filters on the ``train`` task's result (a ``WEIGHT_DIFF`` DXO), shipped with every job:

* ``SparseUpdateEncoder`` (site, ``task_result_filters`` of the client config) keeps, per tensor,
  the ``top_k_percent`` of entries with the largest magnitude and sends them as compact arrays
  (int32 indices + values). What it did not send stays in a residual that is added to the next
  round's update (error feedback), so nothing is dropped, only delayed. A tensor is sent dense
  when that is not larger (small tensors, non-float buffers, ``top_k_percent: 100``), and so are
  running statistics (BatchNorm's running mean and variance): each round re-estimates them, so a
  held-back remainder would be counted twice (it drove variances negative and the model to NaN).
* ``SparseUpdateDecoder`` (server, ``task_result_filters`` of the server config) restores dense
  diffs before the aggregator and records the bytes each site sent per round, dense versus
  as sent, in ``update_bytes.json`` of the job's server run folder (fetched to models/<job>/).

Settings: the top-level ``"sparse_update": {"enabled": bool, "top_k_percent": number}`` of the
job's client config (off when the block is absent or ``enabled`` is false).
"""

import json
import math
import os
import re

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

CONFIG_KEY = "sparse_update"
META_KEY = "sparse_update_top_k_percent"  # set on a DXO whose tensors may be sparse
RESULT_FILE = "update_bytes.json"
INDEX_DTYPE = np.int32
RUNNING_STATISTICS = r"running_(mean|var)$"  # tensors sent dense, without error feedback


def read_settings(config_path: str) -> float | None:
    """``top_k_percent`` from the client config's ``sparse_update`` block; None when disabled."""
    with open(config_path) as f:
        block = json.load(f).get(CONFIG_KEY)
    if block is None:
        return None
    if not isinstance(block, dict) or not isinstance(block.get("enabled"), bool):
        raise ValueError(f"{config_path}: '{CONFIG_KEY}' must be an object with a boolean 'enabled'")
    if not block["enabled"]:
        return None
    top_k = block.get("top_k_percent")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not 0 < top_k <= 100:
        raise ValueError(f"{config_path}: '{CONFIG_KEY}.top_k_percent' must be a number in (0, 100], got {top_k!r}")
    return float(top_k)


def sparsify(update: np.ndarray, top_k_percent: float):
    """(sent, residual): ``sent`` is the dense array or {"indices", "values", "shape"} of the top-k entries."""
    flat = np.asarray(update).ravel()
    k = max(1, math.ceil(flat.size * top_k_percent / 100))
    if k * (np.dtype(INDEX_DTYPE).itemsize + flat.itemsize) >= flat.nbytes:
        return update, np.zeros_like(flat)
    indices = np.sort(np.argpartition(np.abs(flat), flat.size - k)[-k:]).astype(INDEX_DTYPE)
    residual = flat.copy()
    residual[indices] = 0
    return {"indices": indices, "values": flat[indices], "shape": list(np.shape(update))}, residual


def densify(sent) -> np.ndarray:
    """The dense array of what ``sparsify`` sent."""
    if not isinstance(sent, dict):
        return sent
    flat = np.zeros(int(np.prod(sent["shape"])), dtype=sent["values"].dtype)
    flat[sent["indices"]] = sent["values"]
    return flat.reshape(sent["shape"])


def payload_bytes(sent) -> int:
    """Bytes of array data in one tensor as sent (dense array, or indices + values)."""
    if isinstance(sent, dict):
        return int(sent["indices"].nbytes + sent["values"].nbytes)
    return int(np.asarray(sent).nbytes)


class SparseUpdateEncoder(DXOFilter):
    """Site side: top-k per tensor with error feedback (the residual lives for the whole job)."""

    def __init__(self, dense_vars: str = RUNNING_STATISTICS):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF], data_kinds_to_filter=[DataKind.WEIGHT_DIFF])
        self.dense_vars = re.compile(dense_vars)
        self.top_k_percent = None
        self.residual = {}

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            workspace = fl_ctx.get_engine().get_workspace()
            self.top_k_percent = read_settings(workspace.get_client_app_config_file_path(fl_ctx.get_job_id()))
            self.residual = {}
            if self.top_k_percent is not None:
                self.log_info(fl_ctx, f"sparse updates: top {self.top_k_percent}% per tensor, error feedback")

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext):
        if self.top_k_percent is None:
            return None
        sent_data = {}
        for name, diff in dxo.data.items():
            diff = np.asarray(diff)
            if not np.issubdtype(diff.dtype, np.floating) or self.dense_vars.search(name):
                sent_data[name] = diff  # counters (num_batches_tracked) and running statistics go dense
                continue
            update = diff + self.residual[name].reshape(diff.shape) if name in self.residual else diff
            sent_data[name], self.residual[name] = sparsify(update, self.top_k_percent)
        sparse = DXO(data_kind=dxo.data_kind, data=sent_data, meta=dxo.meta)
        sparse.set_meta_prop(META_KEY, self.top_k_percent)
        return sparse


class SparseUpdateDecoder(DXOFilter):
    """Server side: dense diffs for the aggregator; bytes per site and round into update_bytes.json."""

    def __init__(self):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF], data_kinds_to_filter=[DataKind.WEIGHT_DIFF])
        self.records = []
        self.results_path = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self.results_path = os.path.join(run_dir, RESULT_FILE)
            self.records = []

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext):
        top_k = dxo.get_meta_prop(META_KEY)
        sent_bytes = sum(payload_bytes(v) for v in dxo.data.values())
        dense = {name: densify(v) for name, v in dxo.data.items()}
        self._record(fl_ctx, shareable, top_k, sent_bytes, sum(int(np.asarray(v).nbytes) for v in dense.values()))
        if top_k is None:
            return None
        restored = DXO(data_kind=dxo.data_kind, data=dense, meta=dxo.meta)
        restored.remove_meta_props([META_KEY])
        return restored

    def _record(self, fl_ctx: FLContext, shareable: Shareable, top_k, sent_bytes: int, dense_bytes: int) -> None:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        round_no = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        self.records.append(
            {"site": site, "round": round_no, "top_k_percent": top_k, "dense_bytes": dense_bytes,
             "sent_bytes": sent_bytes, "sent_fraction": round(sent_bytes / dense_bytes, 4) if dense_bytes else None}
        )  # fmt: skip
        self.log_info(fl_ctx, f"update from {site} round {round_no}: {sent_bytes} bytes sent, {dense_bytes} dense")
        if self.results_path:
            with open(self.results_path + ".tmp", "w") as f:
                json.dump(self.records, f, indent=1)
            os.replace(self.results_path + ".tmp", self.results_path)
