"""Safe admin tooling: a fetched model is loaded as weights only and swapped in whole (custom/ops/flare_admin.py), a
fetch by name takes only the kit admin's own jobs, and every `make` variable is checked against a strict pattern
before a target does anything (scripts/common.sh check_make_vars, the Makefile's check-vars): a value is data, never
make or shell syntax. The make invocations below are real and fail in check-vars, before setup or any script runs."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from test_bundle import build_job, fake_result

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "custom"))
from ops import flare_admin, job_builder  # noqa: E402

JOB = "cxr_classification"
UUID = "0b1c2d3e-0000-4000-8000-00000000abcd"


class RunsCode:
    """Unpickling this calls os.system: what a checkpoint submitted by anyone could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# The CXR job with a small DenseNet (as tests/e2e/test_he.py trains it): each fetch takes a fraction of a second.
TINY = {"server": {"components": [{"id": "persistor", "args": {"model": {"path": "monai.networks.nets.DenseNet", "args": {
    "init_features": 8, "growth_rate": 8, "block_config": [2, 2], "bn_size": 2}}}}]}}  # fmt: skip


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("result")
    (root / "tiny.json").write_text(json.dumps(TINY))
    job = build_job(JOB, str(root / "tiny.json"), root / "workspace")
    assert job.network["path"] == "monai.networks.nets.DenseNet"
    torch.manual_seed(0)
    return fake_result(root, job, job.build_network().state_dict(), dp=False)


def variant(result: Path, tmp_path: Path, model=None, rounds=None) -> Path:
    """A copy of the job result with another best_FL_global_model.pt (``model``: what torch.save writes, or bytes)
    and/or rounds.json."""
    copy = tmp_path / "variant"
    shutil.copytree(result, copy)
    server = copy / "workspace" / "app_server"
    if isinstance(model, bytes):
        (server / "best_FL_global_model.pt").write_bytes(model)
    elif model is not None:
        torch.save(model, server / "best_FL_global_model.pt")
    if rounds is not None:
        (server / "rounds.json").write_text(rounds)
    return copy


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(models: Path) -> list:
    """Staging or swap folders left next to the fetched sets."""
    return sorted(p.name for p in models.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def fetched(result, tmp_path_factory):
    """models/ after two fetches of the same job result (job-1, then job-2)."""
    models = tmp_path_factory.mktemp("models")
    flare_admin.fetch_into(result, JOB, "job-1", models / JOB)
    flare_admin.fetch_into(result, JOB, "job-2", models / JOB)
    return models


# ---- weights only -------------------------------------------------------------------------------------------------


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_nothing_runs(result, fetched, tmp_path):
    marker = tmp_path / "marker"
    bad = variant(result, tmp_path, {"model": {"w": torch.zeros(1)}, "meta_props": RunsCode(marker)})
    before = snapshot(fetched / JOB), snapshot(fetched / f"{JOB}.prev")
    with pytest.raises(flare_admin.AdminError) as refused:
        flare_admin.fetch_into(bad, JOB, "job-3", fetched / JOB)
    message = str(refused.value)
    assert message.startswith("job job-3: workspace/app_server/best_FL_global_model.pt refused: it is not a "
                              "weights-only checkpoint")  # fmt: skip
    assert "posix.system" in message and "nothing in it was run" in message
    assert not marker.exists()
    assert (snapshot(fetched / JOB), snapshot(fetched / f"{JOB}.prev")) == before
    assert leftovers(fetched) == []


def test_a_bare_pickle_is_refused_too(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "model.pt").write_bytes(pickle.dumps({"model": RunsCode(marker)}))
    with pytest.raises(flare_admin.AdminError, match=r"model.pt refused: it is not a weights-only checkpoint"):
        flare_admin.load_weights(tmp_path / "model.pt")
    assert not marker.exists()


def test_nvflare_checkpoints_load_as_weights_only(tmp_path):
    # As PTFileModelPersistor writes them (tensors, meta and train_conf, hcls.fedavg's round), as numpy arrays, and
    # as CKKS ciphertexts (bytes: refused later, with their own message).
    checkpoints = {
        "tensors": OrderedDict(model=OrderedDict(w=torch.ones(2)), meta_props={}, train_conf={"train": {"model": "N"}},
                               round=3),  # fmt: skip
        "numpy": {"model": {"w": np.ones(3, dtype=np.float32), "n": np.arange(2)}},
        "ckks": {"model": {"w": b"ciphertext"}},
    }
    for name, ckpt in checkpoints.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
        assert set(flare_admin.load_weights(tmp_path / f"{name}.pt")) == set(ckpt["model"]), name
    torch.save({"model": {"w": np.array([{"a": 1}], dtype=object)}}, tmp_path / "objects.pt")
    with pytest.raises(flare_admin.AdminError, match="objects.pt refused"):
        flare_admin.load_weights(tmp_path / "objects.pt")
    torch.save({"model": {"w": "text"}}, tmp_path / "text.pt")
    with pytest.raises(flare_admin.AdminError, match="text.pt: weight 'w' is a str, not a tensor"):
        flare_admin.load_weights(tmp_path / "text.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "tensors.pt").read_bytes()[:100])
    with pytest.raises(flare_admin.AdminError, match="cut.pt is not a PyTorch checkpoint"):
        flare_admin.load_weights(tmp_path / "cut.pt")


# ---- one rename, one previous set, modes -------------------------------------------------------------------------


def test_a_fetch_swaps_in_the_whole_set_and_keeps_the_previous_one(fetched):
    assert json.loads((fetched / JOB / "best_model.json").read_text())["job_id"] == "job-2"
    assert json.loads((fetched / f"{JOB}.prev" / "best_model.json").read_text())["job_id"] == "job-1"
    assert sorted(p.name for p in fetched.iterdir()) == [JOB, f"{JOB}.prev"]


def test_weight_files_are_owner_only(fetched):
    modes = {str(p.relative_to(fetched)): p.stat().st_mode & 0o777 for p in fetched.rglob("*")}
    weights = {k: m for k, m in modes.items() if k.endswith(".pt")}
    assert set(weights) == {f"{d}/{f}" for d in (JOB, f"{JOB}.prev") for f in ("best_model.pt", "bundle/models/model.pt")}
    assert set(weights.values()) == {0o600}
    others = {k: m for k, m in modes.items() if k not in weights}
    assert {m for k, m in others.items() if (fetched / k).is_dir()} == {0o755}
    assert {m for k, m in others.items() if (fetched / k).is_file()} == {0o644}  # summaries, events, bundle configs


def test_a_set_fetched_by_earlier_tooling_becomes_the_previous_one_with_owner_only_weights(result, tmp_path):
    earlier = tmp_path / "models" / JOB
    (earlier / "bundle" / "models").mkdir(parents=True)
    for f in ("best_model.pt", "bundle/models/model.pt", "best_model.json"):
        (earlier / f).write_text(f)
        (earlier / f).chmod(0o644)
    flare_admin.fetch_into(result, JOB, "job-1", earlier)
    prev = tmp_path / "models" / f"{JOB}.prev"
    assert (prev / "best_model.json").read_text() == "best_model.json"
    assert {f: (prev / f).stat().st_mode & 0o777 for f in ("best_model.pt", "bundle/models/model.pt", "best_model.json")} \
        == {"best_model.pt": 0o600, "bundle/models/model.pt": 0o600, "best_model.json": 0o644}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_an_error_after_files_were_staged_leaves_the_previous_set_and_no_staging_folder(
    result, tmp_path, monkeypatch, exchange
):
    models = tmp_path / "models"
    flare_admin.fetch_into(result, JOB, "job-1", models / JOB)
    flare_admin.fetch_into(result, JOB, "job-2", models / JOB)
    before = snapshot(models / JOB), snapshot(models / f"{JOB}.prev")
    if not exchange:  # a system without RENAME_EXCHANGE: the earlier set steps aside just before the rename
        monkeypatch.setattr(flare_admin, "_exchange", lambda a, b: False)
    # best_model.pt is staged before the round record is read: a broken one fails the fetch half way
    broken = variant(result, tmp_path, rounds="{not json")
    with pytest.raises(flare_admin.AdminError, match="its rounds.json is not a round record"):
        flare_admin.fetch_into(broken, JOB, "job-3", models / JOB)
    assert (snapshot(models / JOB), snapshot(models / f"{JOB}.prev")) == before
    assert leftovers(models) == []
    # a good fetch afterwards swaps in as usual; job-2's set becomes the previous one and job-1's goes
    flare_admin.fetch_into(result, JOB, "job-4", models / JOB)
    assert json.loads((models / JOB / "best_model.json").read_text())["job_id"] == "job-4"
    assert snapshot(models / f"{JOB}.prev") == before[0]
    assert sorted(p.name for p in models.iterdir()) == [JOB, f"{JOB}.prev"]


def test_a_model_that_does_not_load_leaves_the_previous_set(result, fetched, tmp_path):
    wrong = variant(result, tmp_path, {"model": {"not.a.layer": torch.zeros(2)}})
    before = snapshot(fetched / JOB)
    with pytest.raises(flare_admin.AdminError, match="does not load into the job's network"):
        flare_admin.fetch_into(wrong, JOB, "job-3", fetched / JOB)
    assert snapshot(fetched / JOB) == before and leftovers(fetched) == []


def test_dest_gets_whole_copies_with_the_same_modes(fetched, tmp_path):
    flare_admin.copy_out(fetched / JOB, tmp_path / "agent")
    assert sorted(p.name for p in (tmp_path / "agent").iterdir()) == ["best_model.json", "best_model.pt"]
    assert (tmp_path / "agent" / "best_model.pt").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "agent" / "best_model.pt").read_bytes() == (fetched / JOB / "best_model.pt").read_bytes()


# ---- which job a fetch takes --------------------------------------------------------------------------------------


class JobList:
    """The server's answer to list_jobs(detailed=True): each job's meta, as NVFlare 2.9 sends it."""

    def __init__(self, jobs):
        self.jobs = jobs

    def list_jobs(self, detailed, name_prefix):
        assert detailed
        return [j for j in self.jobs if j["name"].startswith(name_prefix)]


def meta(job_id, submitter, status="FINISHED:COMPLETED", t=0, name=JOB):
    return {"job_id": job_id, "name": name, "submitter_name": submitter, "status": status, "submit_time": t}


def test_fetch_by_name_takes_the_latest_finished_job_of_the_kits_own_admin():
    server = JobList([
        meta("mine-old", "admin@hcls-ai-factory.org", t=1),
        meta("mine", "admin@hcls-ai-factory.org", t=2),
        meta("mine-running", "admin@hcls-ai-factory.org", "RUNNING", t=4),
        meta("theirs", "lead@hospital-a.org", t=3),  # newer, same name, another submitter
        meta("other-job", "admin@hcls-ai-factory.org", t=5, name=f"{JOB}_x"),
    ])  # fmt: skip
    assert flare_admin.latest_finished(server, JOB, "admin@hcls-ai-factory.org") == "mine"


def test_a_job_only_someone_else_submitted_is_not_fetched_by_name():
    server = JobList([meta("theirs", "lead@hospital-a.org")])
    with pytest.raises(flare_admin.AdminError) as refused:
        flare_admin.latest_finished(server, JOB, "admin@hcls-ai-factory.org")
    assert str(refused.value) == (
        f"no {JOB} job submitted by admin@hcls-ai-factory.org (this kit's admin); the server has 1 submitted by "
        "lead@hospital-a.org: fetch one of those only by its id, JOB_ID=<id> ('make status' lists the jobs)"
    )


def test_the_submitter_that_counts_is_the_kits_admin(tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "startup" / "fed_admin.json").write_text(json.dumps({"admin": {"username": "lead@hospital-a.org"}}))
    assert flare_admin.kit_admin(str(tmp_path)) == "lead@hospital-a.org"


@pytest.mark.parametrize("name, job_id, error", [
    ("../etc", "", "JOB name '../etc' is not a job name"),
    ("x.prev", "", "JOB name 'x.prev' is not a job name"),
    (JOB, "1;touch x", "JOB_ID='1;touch x' is not an NVFlare job id"),
])  # fmt: skip
def test_fetch_refuses_a_name_or_id_that_is_not_one_before_connecting(tmp_path, name, job_id, error):
    with pytest.raises(flare_admin.AdminError, match=re.escape(error)):
        flare_admin.fetch(str(tmp_path / "no-kit"), name, str(tmp_path / "models" / name), job_id)
    assert not (tmp_path / "models").exists()


# ---- job and profile names that would leave job_configs/ ------------------------------------------------------------


@pytest.mark.parametrize("job", ["cxr_classification/profiles/..", "../job_configs/cxr_classification", "base"])
def test_the_job_builder_takes_only_job_names(job):
    with pytest.raises(job_builder.BuildError, match="unknown JOB"):
        job_builder.resolve(job)


def test_a_profile_name_cannot_leave_the_jobs_profiles():
    with pytest.raises(job_builder.BuildError, match=r"PROFILE '../../ct_segmentation/profiles/demo' is not a profile"):
        job_builder.resolve(JOB, "../../ct_segmentation/profiles/demo")


def test_a_layer_cannot_give_the_job_a_name_that_is_a_path(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"meta": {"name": "../../models/x"}}))
    with pytest.raises(job_builder.BuildError, match=r"meta.name '../../models/x' of cxr_classification is not a job"):
        job_builder.resolve(JOB, str(tmp_path / "p.json"))


# ---- make variables -------------------------------------------------------------------------------------------------


def make(tmp_path, *args, **env):
    """`make -s ARGS` in the repository, with private workspace and models folders."""
    environ = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    environ.update(HCLS_WORKSPACE=str(tmp_path / "workspace"), MODELS_DIR=str(tmp_path / "models"), **env)
    return subprocess.run(["make", "-s", *args], cwd=REPO, env=environ, capture_output=True, text=True, timeout=60)


INJECTIONS = ["$(touch {m})", "$$(touch {m})", "`touch {m}`", "x; touch {m}", "$(shell touch {m})", "x' \"$(touch {m})"]
TARGETS = {  # each variable, with a target that uses it
    "SITE": "deploy", "JOB": "fetch-model", "JOB_ID": "wait", "PROFILE": "submit", "WAIT": "submit",
    "DEST": "fetch-model", "KEEP": "demo", "HE": "provision", "FORCE": "deploy", "INSTALL": "approve",
    "TIMEOUT": "wait", "SERVER_HOST": "provision", "INVENTORY": "status", "ORG": "add-site", "HOST": "add-site",
    "ONLY": "bench", "QUICK": "bench", "DATA": "pretrain", "EPOCHS": "pretrain",
}  # fmt: skip
ALLOWED = {
    "SITE": "a participant name: letters, digits, _ . -",
    "JOB": "nor a job folder: a path: letters, digits, space and _ . / + , = @ % : -",
    "JOB_ID": "an NVFlare job id: a UUID",
    "PROFILE": "a profile name (letters, digits, _ -) or a .json file",
    "DEST": "a path: letters, digits, space and _ . / + , = @ % : -",
    "DATA": "a path: letters, digits, space and _ . / + , = @ % : -",
    "EPOCHS": "a whole number > 0: digits",
    "TIMEOUT": "a whole number of seconds > 0: digits",
    "SERVER_HOST": "a host name",
    "HOST": "a host name",
    "ORG": "an NVFlare org name: letters, digits, _",
    "INVENTORY": "a path",
    "ONLY": "benchmark rows: lower-case names separated by commas",
    **{b: "a yes/no value: 1, true or yes (on); 0, false, no or empty (off)"
       for b in ("WAIT", "KEEP", "HE", "FORCE", "INSTALL", "QUICK")},
}


@pytest.mark.parametrize("var", sorted(TARGETS))
def test_a_command_in_any_make_variable_is_refused_before_anything_runs(tmp_path, var):
    target = TARGETS[var]
    others = {"JOB": JOB, "JOB_ID": UUID, "SITE": "hospital_a", "ORG": "hospital_a"}  # the target's others, valid
    for i, injection in enumerate(INJECTIONS):
        marker = tmp_path / f"marker{i}"
        value = injection.format(m=marker)
        args = [f"{k}={v}" for k, v in others.items() if k != var] + [f"{var}={value}"]
        run = make(tmp_path, target, *args)
        assert run.returncode != 0, (value, run.stdout)
        shown = value.replace("\n", "?")
        assert f"error: {var}='{shown}' is not " in run.stderr and ALLOWED[var] in run.stderr, (value, run.stderr)
        assert "check-vars" in run.stderr  # it stopped in check-vars: no script, no setup ran
        assert not marker.exists(), value
        assert not (tmp_path / "workspace").exists() and not (tmp_path / "models").exists()


def test_a_job_path_with_dotdot_is_refused(tmp_path):
    run = make(tmp_path, "fetch-model", "JOB=cxr_classification/profiles/..")
    assert run.returncode != 0
    assert "error: JOB='cxr_classification/profiles/..' has a '..' in its path" in run.stderr


def test_a_job_folders_meta_name_cannot_be_a_path(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "meta.json").write_text(json.dumps({"name": "../../etc"}))
    run = subprocess.run([REPO / "scripts" / "fetch_model.sh", str(job)], capture_output=True, text=True,
                         env=dict(os.environ, HCLS_WORKSPACE=str(tmp_path / "ws"), MODELS_DIR=str(tmp_path / "m")))  # fmt: skip
    assert run.returncode == 1 and "is named '../../etc' (meta.json name): not a job name" in run.stderr


def test_good_values_pass_including_a_job_folder_with_a_space(tmp_path):
    job = tmp_path / "my jobs" / "job"
    job.mkdir(parents=True)
    (job / "meta.json").write_text("{}")
    ok = make(tmp_path, "check-vars", "SITE=hospital_a", f"JOB={job}", f"JOB_ID={UUID}", "PROFILE=demo", "WAIT=yes",
              f"DEST={tmp_path / 'a b'}", "KEEP=0", "HE=False", "FORCE=TRUE", "INSTALL=1", "TIMEOUT=30", f"DATA={tmp_path / 'NIH data'}", "EPOCHS=12",
              "SERVER_HOST=flare.hcls.example.org", "INVENTORY=ansible/inventories/local/hosts.sh", "ORG=hospital_a",
              "HOST=10.77.0.13")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert make(tmp_path, "check-vars", "JOB=cxr_classification lung_nodule_detection").returncode == 0


def test_every_target_checks_its_variables_before_setup():
    rules = re.findall(r"^([a-z-]+): (.*?)(?: ##.*)?$", (REPO / "Makefile").read_text(), flags=re.M)
    with_venv = {target: prereqs.split() for target, prereqs in rules if "$(VENV)" in prereqs}
    assert len(with_venv) > 15
    assert {t: p[:2] for t, p in with_venv.items()} == {t: ["check-vars", "$(VENV)"] for t in with_venv}
    venv_rule = r"^\$\(VENV\): requirements.txt requirements-coordinator.txt constraints.txt \| check-vars$"
    assert re.search(venv_rule, (REPO / "Makefile").read_text(), flags=re.M)


def test_upgrade_refuses_an_unknown_site_missing_pins_and_pins_without_nvflare_before_anything_changes(tmp_path):
    pins = tmp_path / "requirements.txt"
    pins.write_text("monai==1.6.1\n")
    for args, env, error in (
        (["SITE=nowhere"], {}, "unknown SITE 'nowhere'"),
        ([], {"HCLS_REQUIREMENTS": str(tmp_path / "none.txt")}, f"HCLS_REQUIREMENTS={tmp_path / 'none.txt'}: no such file"),
        ([], {"HCLS_REQUIREMENTS": str(pins)}, f"{pins}: no nvflare==<version> line"),
        ([], {}, "no startup kits under"),
    ):
        run = make(tmp_path, "upgrade", *args, **env)
        assert run.returncode != 0 and f"error: {error}" in run.stderr, (args, run.stderr)
        assert not (tmp_path / "workspace").exists()


def flag(name: str, value: str):
    return subprocess.run(["bash", "-c", f'source scripts/common.sh && flag {name}'], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, **{name: value}))  # fmt: skip


@pytest.mark.parametrize("name", ["HE", "WAIT", "KEEP", "FORCE", "INSTALL", "QUICK"])
def test_yes_no_variables_mean_what_they_say(name):
    for value in ("1", "true", "yes", "TRUE", "Yes"):
        assert flag(name, value).stdout == "true\n", value
    for value in ("", "0", "false", "no", "NO", "False"):
        assert flag(name, value).stdout == "false\n", value
    for value in ("2", "on", "off", "y", " 1"):
        wrong = flag(name, value)
        assert wrong.returncode == 1 and f"error: {name}='{value}' is not a yes/no value" in wrong.stderr, value


def test_he_0_provisions_without_he_and_he_1_with_it(tmp_path):
    off = make(tmp_path, "provision", "HE=0")
    assert off.returncode == 0, off.stderr
    provision = tmp_path / "workspace" / "provision"
    assert not (provision / "project_he.yml").exists() and not list(provision.rglob("*.tenseal"))
    on = make(tmp_path, "provision", "HE=yes")
    assert on.returncode == 0, on.stderr
    assert (provision / "project_he.yml").exists() and list(provision.rglob("server_context.tenseal"))


def test_wait_0_submits_without_following(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "meta.json").write_text(json.dumps({"name": JOB}))
    kit = tmp_path / "workspace" / "provision" / "hcls-ai-factory" / "prod_00" / "admin@hcls-ai-factory.org"
    kit.mkdir(parents=True)  # no startup/fed_admin.json: the submit stops right after it was called
    for value, follows in (("0", False), ("false", False), ("1", True)):
        run = make(tmp_path, "submit", f"JOB={job}", f"WAIT={value}", SHELLOPTS="xtrace")  # scripts trace their commands
        called = [line for line in run.stderr.splitlines() if "python -m ops.flare_admin submit" in line]
        assert run.returncode != 0 and len(called) == 1, run.stderr
        assert ("--wait" in called[0]) == follows, (value, called)
