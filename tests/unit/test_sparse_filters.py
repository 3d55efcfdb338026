"""Sparse updates on real NVFlare objects: the site and server filters, NVFlare's in-time FedAvg
aggregator, and the update of a real network (DenseNet-121 as in the CXR job)."""

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
from nvflare.app_common.app_constant import AppConstants

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
import sparse_update  # noqa: E402
from sparse_update import SparseUpdateDecoder, SparseUpdateEncoder, read_settings  # noqa: E402

SITES = ("hospital_a", "hospital_b")


@functools.cache
def site_updates(seed: int) -> dict:
    """One round of real-looking FedAvg diffs per site: two trained-apart DenseNet-121 state dicts."""
    torch.manual_seed(0)
    base = DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).state_dict()
    torch.manual_seed(seed)
    local = DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).state_dict()
    diffs = {k: local[k] - base[k] for k in base}
    return {k: (d * 0.01 if d.is_floating_point() else d).numpy() for k, d in diffs.items()}


def result(site: str, diff: dict, round_no: int, steps: int) -> Shareable:
    dxo = DXO(DataKind.WEIGHT_DIFF, data={k: v.copy() for k, v in diff.items()})
    dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, steps)
    shareable = dxo.to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_no)
    return shareable


def fedavg(results: list[Shareable], round_no: int) -> dict:
    aggregator = InTimeAccumulateWeightedAggregator(expected_data_kind="WEIGHT_DIFF")  # as in the job config
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_no, private=True, sticky=False)
    aggregator.handle_event(EventType.START_RUN, fl_ctx)
    for shareable in results:
        assert aggregator.accept(shareable, fl_ctx)
    return from_shareable(aggregator.aggregate(fl_ctx)).data


def through_filters(encoders: dict, decoder: SparseUpdateDecoder, diffs: dict, round_no: int) -> list[Shareable]:
    fl_ctx = FLContext()
    sent = [encoders[site].process(result(site, diffs[site], round_no, steps=3 + i), fl_ctx)
            for i, site in enumerate(SITES)]  # fmt: skip
    return [decoder.process(s, fl_ctx) for s in sent]


def encoders(top_k_percent: float) -> dict:
    out = {}
    for site in SITES:
        out[site] = SparseUpdateEncoder()
        out[site].top_k_percent = top_k_percent  # what START_RUN reads from the job's sparse_update block
    return out


def test_top_k_100_aggregates_exactly_like_dense(tmp_path):
    diffs = {site: site_updates(seed) for site, seed in zip(SITES, (1, 2))}
    dense = fedavg([result(site, diffs[site], 0, steps=3 + i) for i, site in enumerate(SITES)], 0)
    decoder = SparseUpdateDecoder()
    decoder.results_path = str(tmp_path / sparse_update.RESULT_FILE)
    sparse = fedavg(through_filters(encoders(100), decoder, diffs, 0), 0)
    assert dense.keys() == sparse.keys()
    for name in dense:
        np.testing.assert_array_equal(sparse[name], dense[name], err_msg=name)
    records = json.loads(Path(decoder.results_path).read_text())
    assert [r["site"] for r in records] == list(SITES)
    assert all(r["sent_bytes"] == r["dense_bytes"] > 27e6 for r in records)


def test_top_k_10_sends_under_a_quarter_and_restores_what_it_sent(tmp_path):
    diffs = {site: site_updates(seed) for site, seed in zip(SITES, (1, 2))}
    decoder = SparseUpdateDecoder()
    decoder.results_path = str(tmp_path / sparse_update.RESULT_FILE)
    encs = encoders(10)
    restored = [from_shareable(s).data for s in through_filters(encs, decoder, diffs, 0)]
    for site, dense in zip(SITES, restored):
        for name, diff in diffs[site].items():
            assert dense[name].shape == diff.shape and dense[name].dtype == diff.dtype
            if name.endswith(("running_mean", "running_var", "num_batches_tracked")):  # re-estimated each round
                np.testing.assert_array_equal(dense[name], diff)
                assert name not in encs[site].residual
            else:  # error feedback: sent + kept back == the update
                np.testing.assert_array_equal(dense[name] + encs[site].residual[name].reshape(diff.shape), diff)
        conv = "features.conv0.weight"
        kept = np.count_nonzero(dense[conv])
        assert kept == int(np.ceil(diffs[site][conv].size * 0.1))
        assert np.abs(dense[conv][dense[conv] != 0]).min() >= np.abs(diffs[site][conv][dense[conv] == 0]).max()
    records = json.loads(Path(decoder.results_path).read_text())
    assert all(r["sent_bytes"] <= 0.25 * r["dense_bytes"] for r in records), records


def test_error_feedback_sends_what_was_held_back():
    diff = {"w": np.array([5.0, 1.0, 0.5, 0.1] * 25, dtype=np.float32)}
    enc = encoders(10)["hospital_a"]
    first = enc.process_dxo(DXO(DataKind.WEIGHT_DIFF, data=dict(diff)), Shareable(), FLContext())
    assert sorted(first.data["w"]["values"]) == [5.0] * 10
    second = enc.process_dxo(DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros(100, np.float32)}), Shareable(), FLContext())
    assert sorted(second.data["w"]["values"]) == [5.0] * 10  # the held-back 5.0s, not zeros
    assert enc.residual["w"].sum() == pytest.approx(25 * 6.6 - 5.0 * 20, rel=1e-5)


def test_disabled_sends_the_update_unchanged():
    enc = encoders(10)["hospital_a"]
    enc.top_k_percent = None
    assert enc.process_dxo(DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(100)}), Shareable(), FLContext()) is None


@pytest.mark.parametrize(
    "block, error",
    [
        ({"enabled": "yes", "top_k_percent": 10}, "boolean 'enabled'"),
        ({"enabled": True, "top_k_percent": 0}, "sparse_update.top_k_percent' must be a number in (0, 100]"),
        ({"enabled": True, "top_k_percent": 150}, "got 150"),
        ({"enabled": True}, "got None"),
    ],
)
def test_bad_settings_name_the_file_and_field(tmp_path, block, error):
    config = tmp_path / "config_fed_client.json"
    config.write_text(json.dumps({"sparse_update": block}))
    with pytest.raises(ValueError, match=str(config)) as err:
        read_settings(str(config))
    assert error in str(err.value)


def test_settings(tmp_path):
    config = tmp_path / "config_fed_client.json"
    for block, expected in [(None, None), ({"enabled": False, "top_k_percent": 5}, None),
                            ({"enabled": True, "top_k_percent": 5}, 5.0)]:  # fmt: skip
        config.write_text(json.dumps({} if block is None else {"sparse_update": block}))
        assert read_settings(str(config)) == expected
