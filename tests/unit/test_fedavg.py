"""The fault-tolerance logic on real NVFlare and torch objects: the round record and its progress lines,
the persistor whose model file names its round, the best-model selector that keeps its best across a restart,
and the server's job recovery (its checks and its search for old server job processes)."""

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from hcls.fedavg import (  # noqa: E402
    BEST_FILE,
    ROUNDS_FILE,
    BestModelSelector,
    FedAvg,
    RoundPersistor,
    RoundsRecord,
    progress_line,
)
from job_recovery.recovery import JobRecovery, _old_job_processes, _sites_of  # noqa: E402

SITES = ["hospital_a", "hospital_b"]
NET = {"path": "torch.nn.Linear", "args": {"in_features": 3, "out_features": 2}}


def app_context(app_dir: Path, round_no=None) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app_dir), private=True, sticky=False)
    if round_no is not None:
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_no, private=True, sticky=False)
    return fl_ctx


def test_progress_lines_name_the_missing_sites():
    assert progress_line(7, ["hospital_a"], ["hospital_b"]) == "round 7: hospital_b missing, aggregated 1 of 2"
    assert progress_line(7, SITES, []) == "round 7: aggregated 2 of 2"
    assert progress_line(0, [], SITES) == "round 0: hospital_a, hospital_b missing, aggregated 0 of 2"


def test_rounds_record_keeps_only_persisted_rounds_after_a_restart(tmp_path):
    path = tmp_path / ROUNDS_FILE
    record = RoundsRecord(path, 1, SITES)
    assert not record.existed
    for round_no, contributed in ((0, SITES), (1, ["hospital_a"]), (2, SITES)):
        record.start_round(round_no)
        record.finish_round(round_no, contributed, sorted(set(SITES) - set(contributed)), aggregated=True)
        record.save()
    saved = json.loads(path.read_text())
    assert saved["min_clients"] == 1 and saved["sites"] == SITES and saved["restarts"] == []
    assert saved["rounds"][1]["contributed"] == ["hospital_a"] and saved["rounds"][1]["missing"] == ["hospital_b"]
    assert all(r["started"] <= r["finished"] for r in saved["rounds"])
    assert not list(tmp_path.glob(".*.tmp"))

    restarted = RoundsRecord(path, 1, SITES)  # round 2's model never reached the disk
    assert restarted.existed
    restarted.resume(committed_round=1, next_round=2)
    restarted.start_round(2)
    restarted.save()
    saved = json.loads(path.read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1, 2] and saved["rounds"][2]["finished"] is None
    assert [r["resumed_from_round"] for r in saved["restarts"]] == [2]

    again = RoundsRecord(path, 1, SITES)  # killed before any round was persisted
    again.resume(committed_round=None, next_round=0)
    assert again.rounds == [] and len(again.data["restarts"]) == 2


def test_the_global_model_file_names_its_round_and_a_new_run_starts_from_it(tmp_path):
    persistor = RoundPersistor(model=dict(NET))
    persistor.handle_event(EventType.START_RUN, app_context(tmp_path))
    first = persistor.load(app_context(tmp_path))
    assert persistor.saved_round is None
    weights = {k: v + 1.0 for k, v in first["weights"].items()}
    persistor.save(make_model_learnable(weights, {}), app_context(tmp_path, round_no=4))
    assert torch.load(tmp_path / "FL_global_model.pt", weights_only=True)["round"] == 4

    restarted = RoundPersistor(model=dict(NET))
    restarted.handle_event(EventType.START_RUN, app_context(tmp_path))
    loaded = restarted.load(app_context(tmp_path))
    assert restarted.saved_round == 4
    assert all((loaded["weights"][k] == weights[k]).all() for k in weights)


def test_a_job_starts_from_pre_trained_weights_and_resumes_from_its_own_round(tmp_path):
    pretrained = {k: torch.full_like(v, 0.5) for k, v in torch.nn.Linear(3, 2).state_dict().items()}
    torch.save(pretrained, tmp_path / "pretrained.pt")
    app = tmp_path / "app"
    persistor = RoundPersistor(model=dict(NET), source_ckpt_file_full_name=str(tmp_path / "pretrained.pt"))
    persistor.handle_event(EventType.START_RUN, app_context(app))
    first = persistor.load(app_context(app))
    assert all((first["weights"][k] == 0.5).all() for k in pretrained)
    persistor.save(make_model_learnable({k: v + 1.0 for k, v in first["weights"].items()}, {}), app_context(app, 2))

    restarted = RoundPersistor(model=dict(NET), source_ckpt_file_full_name=str(tmp_path / "pretrained.pt"))
    restarted.handle_event(EventType.START_RUN, app_context(app))
    loaded = restarted.load(app_context(app))  # the interrupted run's round 2, not the pre-trained weights
    assert restarted.saved_round == 2 and all((loaded["weights"][k] == 1.5).all() for k in pretrained)
    assert restarted.source_ckpt_file_full_name == str(tmp_path / "pretrained.pt")


def test_the_best_metric_survives_a_restart(tmp_path):
    (tmp_path / BEST_FILE).write_text(json.dumps({"round": 3, "value": 0.71, "raw_value": 0.71}))
    selector = BestModelSelector(key_metric="val_auc")
    selector.handle_event(EventType.START_RUN, app_context(tmp_path))
    assert selector.best_val_metric == 0.71 and selector.best_raw_val_metric == 0.71
    fresh = BestModelSelector(key_metric="val_auc")
    fresh.handle_event(EventType.START_RUN, app_context(tmp_path / "nothing"))
    assert fresh.best_val_metric == -float("inf")


def test_every_round_is_bounded():
    with pytest.raises(ValueError, match="train_timeout must be > 0"):
        FedAvg(min_clients=1, num_rounds=2, train_timeout=0)
    assert FedAvg(min_clients=1, num_rounds=2, train_timeout=30)._train_timeout == 30


def test_the_task_monitor_polls_at_the_configured_period():
    """NVFlare 2.9's task monitor keeps its own 0.2 s unless FedAvg hands it task_check_period (the end of every round
    waits for the monitor's next look)."""
    from nvflare.apis.impl.wf_comm_server import WFCommServer

    communicator = WFCommServer()
    assert communicator._task_check_period == 0.2  # NVFlare's own, whatever the controller was given
    FedAvg(min_clients=2, num_rounds=1, train_timeout=60, task_check_period=0.01).set_communicator(communicator)
    assert communicator._task_check_period == 0.01


def test_job_recovery_checks_its_settings():
    with pytest.raises(ValueError, match="settle_timeout must be a number > 0"):
        JobRecovery(settle_timeout=0)
    with pytest.raises(ValueError, match="max_restarts must be an integer >= 0"):
        JobRecovery(max_restarts=-1)


def test_job_recovery_knows_the_sites_and_sees_old_server_job_processes():
    class Job:
        meta = {"job_deploy_detail": ["server: OK", "hospital_a: OK", "hospital_b: no reply (deployment timeout)"]}

    assert _sites_of(Job) == {"hospital_a"}
    job_id = str(uuid.uuid4())
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "runner_process", "-n", job_id])
    try:
        deadline = time.monotonic() + 10
        while not _old_job_processes([job_id]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _old_job_processes([job_id]) == [old.pid]
        assert _old_job_processes([str(uuid.uuid4())]) == []
    finally:
        old.kill()
        old.wait()
    assert _old_job_processes([job_id]) == []
