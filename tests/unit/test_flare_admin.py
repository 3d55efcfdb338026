"""The coordinator's admin operations (custom/ops/flare_admin.py) that need no server: the round record a fetch
puts into best_model.json, the progress lines a wait prints, and the TIMEOUT it accepts. Following, reconnecting,
aborting and the sites' reasons run against a real federation in tests/e2e/test_admin.py."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from test_bundle import build_job, fake_result

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from ops import flare_admin  # noqa: E402

ROUNDS = {
    "min_clients": 1,
    "sites": ["hospital_a", "hospital_b"],
    "rounds": [
        {"round": 0, "contributed": ["hospital_a", "hospital_b"], "missing": [], "aggregated": True,
         "started": "2026-12-03T04:00:00+00:00", "finished": "2026-12-03T04:00:09+00:00"},
        {"round": 1, "contributed": ["hospital_a"], "missing": ["hospital_b"], "aggregated": True,
         "started": "2026-12-03T04:00:10+00:00", "finished": "2026-12-03T04:00:19+00:00"},
    ],
    "restarts": [{"at": "2026-12-03T04:00:15+00:00", "resumed_from_round": 1}],
}  # fmt: skip


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """A CXR job result laid out as download_job_result leaves it, without rounds.json (an older job)."""
    root = tmp_path_factory.mktemp("result")
    job = build_job("cxr_classification", "demo", root / "workspace")
    torch.manual_seed(0)
    return fake_result(root, job, job.build_network().state_dict())


def with_rounds(result: Path, tmp_path: Path, record) -> Path:
    copy = tmp_path / "result"
    shutil.copytree(result, copy)
    text = record if isinstance(record, str) else json.dumps(record)
    (copy / "workspace" / "app_server" / "rounds.json").write_text(text)
    return copy


def test_best_model_json_carries_the_round_record_and_a_copy_of_it(result, tmp_path):
    out = tmp_path / "models" / "cxr_classification"
    info = flare_admin.stage(with_rounds(result, tmp_path, ROUNDS), "cxr_classification", "job-1", tmp_path / "staged")
    flare_admin.swap_in(tmp_path / "staged", out)

    best = json.loads((out / "best_model.json").read_text())
    assert best == info
    assert best["rounds"] == [
        {"round": 0, "contributed": ["hospital_a", "hospital_b"], "missing": []},
        {"round": 1, "contributed": ["hospital_a"], "missing": ["hospital_b"]},
    ]
    assert best["restarts"] == [{"at": "2026-12-03T04:00:15+00:00", "resumed_from_round": 1}]
    assert json.loads((out / "rounds.json").read_text()) == ROUNDS


def test_an_older_job_without_rounds_json_has_no_round_record_and_loses_the_earlier_one(result, tmp_path):
    out = tmp_path / "models" / "cxr_classification"
    flare_admin.stage(with_rounds(result, tmp_path, ROUNDS), "cxr_classification", "job-1", tmp_path / "staged")
    flare_admin.swap_in(tmp_path / "staged", out)

    info = flare_admin.stage(result, "cxr_classification", "job-0", tmp_path / "staged0")
    flare_admin.swap_in(tmp_path / "staged0", out)
    assert "rounds" not in info and "restarts" not in info
    assert json.loads((out / "best_model.json").read_text())["job_id"] == "job-0"
    assert not (out / "rounds.json").exists()  # job-1's record does not describe job-0


@pytest.mark.parametrize("record, error", [
    ("{not json", "JSONDecodeError"),
    ({"rounds": [{"round": 0, "contributed": ["hospital_a"]}]}, "KeyError: 'missing'"),
    ({"restarts": []}, "KeyError: 'rounds'"),
])  # fmt: skip
def test_a_broken_round_record_is_refused_before_anything_is_written(result, tmp_path, record, error):
    out = tmp_path / "models" / "cxr_classification"
    out.mkdir(parents=True)
    (out / "best_model.json").write_text('{"job_id": "earlier"}')
    with pytest.raises(flare_admin.AdminError, match=f"job job-2: its rounds.json is not a round record .*{error}"):
        flare_admin.stage(with_rounds(result, tmp_path, record), "cxr_classification", "job-2", tmp_path / "staged")
    assert json.loads((out / "best_model.json").read_text()) == {"job_id": "earlier"}


@pytest.mark.parametrize("line, shown", [
    ("2026-12-03 10:41:07,101 - ScatterAndGather - INFO - [identity=server, run=j]: Round 1 started.",
     "10:41:07 Round 1 started."),
    ("2026-12-03 10:41:20,500 - FedAvgRounds - INFO - [identity=server, run=j]: round 7: hospital_b missing, "
     "aggregated 1 of 2", "10:41:20 round 7: hospital_b missing, aggregated 1 of 2"),
    ("2026-12-03 10:41:21,000 - FedAvgRounds - INFO - [identity=server, run=j]: round 7: aggregated 2 of 2",
     "10:41:21 round 7: aggregated 2 of 2"),
    ("2026-12-03 10:41:22,000 - FedAvg - WARNING - [identity=server, run=j, peer=hospital_a, peer_rc=PRIVACY_POLICY_"
     "BLOCKED by hospital_a: the result lacks DP accounting (dp_steps), task_name=train, task_id=t]: Ignore the result "
     "from hospital_a at round 0. Result error code: PRIVACY_POLICY_BLOCKED by hospital_a: the result lacks DP "
     "accounting (dp_steps). Remaining good clients (1) >= min_responses (1).",
     "10:41:22 Ignore the result from hospital_a at round 0. Result error code: PRIVACY_POLICY_BLOCKED by hospital_a: "
     "the result lacks DP accounting (dp_steps). Remaining good clients (1) >= min_responses (1)."),
])  # fmt: skip
def test_round_lines_of_the_servers_job_log_are_progress(line, shown):
    assert flare_admin.PROGRESS.search(line)
    assert flare_admin._short(line) == shown


def test_routine_lines_are_not_progress():
    line = "2026-12-03 10:41:07,101 - ServerRunner - INFO - [identity=server, run=j]: got task assignment request"
    assert not flare_admin.PROGRESS.search(line)


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "10s", "abc", " 5"])
def test_a_timeout_that_is_not_a_whole_number_of_seconds_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        flare_admin.main(["wait", "--kit", "kit", "--job-id", "j", "--timeout", value])
    assert "TIMEOUT must be a whole number of seconds > 0" in capsys.readouterr().err


# Lines as a real run wrote them (tests/e2e/test_admin.py's trainer error, hospital_b's val.csv emptied).
SERVER_LOG = [
    "2026-12-03 10:56:11,201 - ScatterAndGather - INFO - [identity=server, run=j1]: Round 0 started.",
    "2026-12-03 10:56:36,860 - ServerRunner - ERROR - [identity=server, run=j1]: Aborting current RUN due to "
    "FATAL_SYSTEM_ERROR received: Result from hospital_b is bad, error code: EXECUTION_EXCEPTION. Cannot reach "
    "min_responses: remaining good clients (1) < min_responses (2). FedAvg exiting at round 0.",
]  # fmt: skip
SITE_LOG = "\n".join([
    "2026-12-03 10:56:12,466 - ExternalProcessBackend - INFO - launching external trainer (launch 1)",
    "2026-12-03 10:56:31,135 - ExternalProcessBackend - INFO - Traceback (most recent call last):",
    "2026-12-03 10:56:31,144 - ExternalProcessBackend - INFO -     raise ValueError(listed)",
    "2026-12-03 10:56:31,144 - ExternalProcessBackend - INFO - ValueError: /data/hospital_b/chestxray14/val.csv: "
    "no data rows, the dataset is empty",
    "2026-12-03 10:56:36,863 - ClientAPIExecutor - ERROR - [identity=hospital_b, run=j1]: per-task trainer launch "
    "failed: Traceback (most recent call last):",
    "RuntimeError: trainer process group exited (rc=1) before completing the HELLO handshake",
])  # fmt: skip


class StoredReplies:
    """The two FLARE API reads site_reasons makes, answering what a server answered for a job."""

    def __init__(self, meta: dict, logs: dict):
        self.meta, self.logs = meta, logs

    def get_job_meta(self, job_id):
        return self.meta

    def get_job_logs(self, job_id, target):
        assert target == "all"
        return {"logs": self.logs}


def test_a_site_that_streams_its_log_shows_its_trainers_error_and_nothing_of_nvflares():
    server = StoredReplies({"job_deploy_detail": ["server: OK", "hospital_b: OK", "hospital_a: OK"]},
                           {"server": "\n".join(SERVER_LOG), "hospital_b": SITE_LOG, "hospital_a": "all fine"})
    assert flare_admin.site_reasons(server, "j1", SERVER_LOG) == [
        "server: 10:56:36 " + SERVER_LOG[1].split("]: ", 1)[1],
        "hospital_b: ValueError: /data/hospital_b/chestxray14/val.csv: no data rows, the dataset is empty",
    ]


def test_a_site_that_keeps_its_log_is_named_with_where_the_log_is():
    server = StoredReplies({"job_deploy_detail": ["server: OK", "hospital_b: OK", "hospital_a: OK"]}, {})
    assert flare_admin.site_reasons(server, "j1", SERVER_LOG)[1:] == [
        "hospital_b: its job log stays on the site (not streamed to the server): j1/log.txt in its workspace",
    ]


def test_a_refusal_at_deployment_is_each_sites_answer():
    detail = ["server: OK", "hospital_a: NVFLARE_ERROR: privacy scope '' is not allowed",
              "hospital_b: NVFLARE_ERROR: privacy scope '' is not allowed", "num_ok_sites 0 < required_min_sites 2"]
    assert flare_admin.site_reasons(StoredReplies({"job_deploy_detail": detail}, {}), "j2", []) == [
        "hospital_a: privacy scope '' is not allowed",
        "hospital_b: privacy scope '' is not allowed",
        "num_ok_sites 0 < required_min_sites 2",
    ]
