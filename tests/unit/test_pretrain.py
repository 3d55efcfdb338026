"""make pretrain: a job's network trained by the job's own trainer on a public data set as it ships, written where
the dp_pretrained profile names it and checked against that profile's network; bad input is named first."""

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "custom"))

from datagen import cxr  # noqa: E402
from hcls.job_config import JobConfig  # noqa: E402
from ops import job_builder  # noqa: E402

JOB = "cxr_classification"


def pretrain(tmp_path, *args):
    environ = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    environ.update(HCLS_WORKSPACE=str(tmp_path / "workspace"))
    return subprocess.run(["make", "-s", "pretrain", *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_pretraining_on_nih_chestxray14_as_it_ships_gives_the_dp_pretrained_profiles_weights(tmp_path):
    cxr.generate_nih(tmp_path / "nih", n_train=12, n_val=8, seed=3, size=32)  # Data_Entry_2017.csv, images_00N/
    done = pretrain(tmp_path, f"JOB={JOB}", f"DATA={tmp_path / 'nih'}", "EPOCHS=2", f"DEST={tmp_path / 'out'}",
                    "PROFILE=demo")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pretrain: epoch ") == 2 and f"pretrain: wrote {tmp_path / 'out' / JOB}.pt" in done.stdout
    weights = torch.load(tmp_path / "out" / f"{JOB}.pt", weights_only=True)
    config = job_builder.resolve(JOB, "dp_pretrained")  # the network that fine-tunes from it, strictly
    job_builder.persistor_args(config["server"])["source_ckpt_file_full_name"] = str(tmp_path / "out" / f"{JOB}.pt")
    network = JobConfig.from_job_folder(job_builder.write_job(config, tmp_path / "job")).build_network()
    network.load_state_dict(weights, strict=True)
    assert not list((tmp_path / "out").glob("*.partial"))


def test_bad_input_is_named_and_leaves_the_previous_weights(tmp_path):
    (tmp_path / "out").mkdir()
    previous = tmp_path / "out" / f"{JOB}.pt"
    previous.write_bytes(b"the weights of last month")
    (tmp_path / "empty").mkdir()
    for args, error in (
        ([f"JOB={JOB}"], "usage: make pretrain JOB=<job> DATA=<public data set folder>"),
        ([f"JOB={JOB}", f"DATA={tmp_path / 'nope'}"], f"DATA='{tmp_path / 'nope'}': no such folder"),
        ([f"JOB={JOB}", f"DATA={tmp_path}", "EPOCHS=0"], "EPOCHS='0' is not a whole number > 0"),
        ([f"JOB={JOB}", f"DATA={tmp_path / 'empty'}"], f"{tmp_path / 'empty'}"),  # no layout the trainer reads
    ):
        done = pretrain(tmp_path, *args, f"DEST={tmp_path / 'out'}")
        assert done.returncode != 0 and error in done.stderr, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert previous.read_bytes() == b"the weights of last month"
