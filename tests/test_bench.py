"""The benchmark's smoke run (`make bench ONLY=<row> QUICK=1`): each row still produces its numbers. Benchmarks are
not tests; the figures themselves are not checked here (README "Measured", bench/results/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))

from ops import ssh_test_hosts  # noqa: E402


def bench(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "INVENTORY")}
    env.update(HCLS_WORKSPACE=str(tmp_path / "workspace"), BENCH_RESULTS=str(tmp_path / "results"))
    return subprocess.run(["make", "-s", "bench", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_an_unknown_row_is_refused(tmp_path):
    run = bench(tmp_path, "ONLY=nothing")
    rows = "federated, bandwidth, dp, overhead, operations, demo, recovery"
    assert run.returncode != 0 and f"ONLY=nothing: no row nothing (rows: {rows})" in run.stderr, run.stderr


def test_the_operations_row_measures_provision_and_deploys_locally_and_over_ssh(tmp_path):
    run = bench(tmp_path, "ONLY=operations", "QUICK=1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "bench.json").read_text())["rows"]
    if reason := ssh_test_hosts.can_make_hosts():  # the row says so and leaves the SSH deploys out
        assert f"no deploys over SSH: {reason}" in run.stdout and len(rows) == 3, rows
        pytest.skip(reason)
    assert [r["what"].split(",")[:2] for r in rows] == [
        ["`make provision`", " 3 participants + admin (1 run (QUICK))"],
        ["first `make deploy`", " 3 local participants (1 run (QUICK))"],
        ["no-op `make deploy` (changed=0)", " 3 local participants (1 run (QUICK))"],
        ["first `make deploy`", " 3 SSH test hosts (network namespaces"],
        ["no-op `make deploy` (changed=0)", " 3 SSH test hosts (network namespaces"],
    ]  # fmt: skip
    assert all(r["value"] > 0 and r["row"] == "operations" for r in rows), rows
    assert [r["target"] for r in rows] == ["", "<= 30 s", "<= 15 s", "<= 30 s", "<= 15 s"]
    assert (tmp_path / "results" / "bench.md").read_text().strip() in run.stdout  # printed as written
    assert "hclsd-h0" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_the_learning_rows_measure_fedavg_against_centralized_per_job_bandwidth_and_dp(tmp_path):
    run = bench(tmp_path, "ONLY=federated,bandwidth,dp", "QUICK=1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "bench.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["federated"] * 3 + ["bandwidth"] * 11 + ["dp"] * 9
    *federated, dense_bytes = rows[:4]
    options = rows[4:14]
    # each job's key metric, FedAvg against the pooled data, one value per round (CXR 2 rounds, the 3D jobs 1)
    assert [(r["unit"], r["reference_what"], len(r["samples"])) for r in federated] == [
        ("val_auc", "centralized", 2), ("val_mean_dice", "centralized", 1), ("val_froc", "centralized", 1)]  # fmt: skip
    assert all(0 <= r["value"] <= 1 and 0 <= r["reference"] <= 1 for r in federated), federated
    assert "SegResNet" in federated[1]["what"] and "RetinaNet" in federated[2]["what"], federated
    federated = federated[0]
    # the bytes as NVFlare serializes a DenseNet-121 update (6.97 M float32), then what each option sends
    assert 27e6 < dense_bytes["value"] * 1e6 < 30e6, dense_bytes
    sent = {r["what"].removeprefix("bytes a site sends per round, "): r["ratio"] for r in options[::2]}
    assert list(sent) == ["top-k 10 %", "top-k 1 %", "float16", "adaquant", "float16 + top-k 10 %"]
    assert sent["top-k 1 %"] < sent["top-k 10 %"] < 0.25 and 0.45 < sent["float16"] < 0.55, sent
    assert sent["float16 + top-k 10 %"] < sent["top-k 10 %"], sent
    assert all(r["reference"] == federated["value"] for r in options[1::2])  # dense FedAvg, run once
    # DP: the pre-trained network's metric, then DP fine-tuning at epsilon 8 and 1, all against fine-tuning without DP
    pretrained, epsilon8, epsilon1, ct_pretrained, ct8, ct1, luna_pretrained, luna8, luna1 = rows[14:]
    assert pretrained["reference"] == epsilon8["reference"] == epsilon1["reference"] and 0 <= pretrained["value"] <= 1
    assert pretrained["what"].startswith("val_auc of the pre-trained network") and epsilon8["target"] == ">= 0.90 x no DP"
    assert "epsilon 8" in epsilon8["what"] and "epsilon 1" in epsilon1["what"] and "dp_pretrained" in epsilon8["what"]
    # CT likewise: SegResNet pre-trained on public data (Decathlon layout), fine-tuned with and without DP-SGD
    assert [(r["unit"], r["reference_what"], len(r["samples"])) for r in (ct8, ct1)] == [("val_mean_dice", "no DP", 1)] * 2
    assert ct8["reference"] == ct1["reference"] == ct_pretrained["reference"] and ct8["target"] == ">= 0.90 x no DP"
    assert ct_pretrained["what"].startswith("val_mean_dice of the pre-trained network") and "Decathlon" in ct8["what"]
    assert "SegResNet" in ct8["what"] and "dp_pretrained" in ct8["what"]
    # LUNA16 likewise: the RetinaNet pre-trained on public data (LUNA16's release layout)
    assert [(r["unit"], r["reference_what"], len(r["samples"])) for r in (luna8, luna1)] == [("val_froc", "no DP", 1)] * 2
    assert luna8["reference"] == luna1["reference"] == luna_pretrained["reference"] and "RetinaNet" in luna8["what"]
    assert luna_pretrained["what"].startswith("val_froc of the pre-trained network") and "LUNA16 release" in luna8["what"]


def test_the_overhead_row_times_rounds_of_this_projects_job_and_of_a_stock_nvflare_job(tmp_path):
    run = bench(tmp_path, "ONLY=overhead", "QUICK=1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (row,) = json.loads((tmp_path / "results" / "bench.json").read_text())["rows"]
    assert row["what"].startswith("round overhead, tiny DenseNet") and row["target"] == "<= 0.1 s", row
    assert row["reference_what"] == "stock NVFlare" and len(row["samples"]) == 2  # rounds 1 and 2 of 4
    # a round of either job takes longer than its slowest site's compute: orchestration is never free
    assert row["value"] > 0 and row["reference"] > 0, row


def test_the_demo_row_times_make_demo_and_samples_the_federations_memory(tmp_path):
    run = bench(tmp_path, "ONLY=demo", "QUICK=1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    duration, pss, rss = json.loads((tmp_path / "results" / "bench.json").read_text())["rows"]
    assert duration["what"].startswith("`make demo JOB=cxr_classification`") and duration["value"] > 0, duration
    # server, two sites, their job processes and trainers: several processes, each at least tens of MB
    processes = int(pss["what"].split("(")[1].split(" at most")[0])
    assert processes >= 5 and 0.1 < pss["value"] <= rss["value"], (pss, rss)
    assert (tmp_path / "workspace" / "bench" / "demo" / "models" / "cxr_classification" / "best_model.json").is_file()


def test_the_recovery_row_times_a_killed_server_and_a_frozen_site_back_to_training(tmp_path):
    run = bench(tmp_path, "ONLY=recovery", "QUICK=1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    started, aggregated, site = json.loads((tmp_path / "results" / "bench.json").read_text())["rows"]
    assert started["what"].startswith("server kill -9 mid-round -> a round started again"), started
    assert aggregated["what"].startswith("server kill -9 mid-round -> the first round after it aggregated"), aggregated
    assert site["what"].startswith("site frozen (SIGSTOP)"), site
    # the kit's loop restarts the server and the job resumes within minutes; a thawed site is back within a few rounds
    assert 0 < started["value"] < aggregated["value"] < 300 and 0 < site["value"] < 300, (started, aggregated, site)
