"""The site's privacy policy against a real federation: each test tries to break a promise.

Sites enforce their own policy (local/privacy.json, rendered by Ansible from site_configs/ and the
inventory's override) with site-side code in local/custom; jobs are the real CXR job, built with the
tiny profile and, for the attacks, a small forged trainer added to the job's custom code."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DenseNet121

from .conftest import REPO, approve, run

sys.path.insert(0, str(REPO / "custom"))
from ops import job_builder  # noqa: E402

TINY = json.loads((Path(__file__).resolve().parents[1] / "tiny_cxr_profile.json").read_text())  # 2 rounds, 32 px
FORGED_NO_DP = '''

# Forged, appended to the job's own copy of hcls/site_config.py: at hospital_a the job's code reads the site's
# policy as not requiring DP, and trains without it; hospital_b trains honestly (with DP).
_site_dp_policy = SiteConfig.dp_policy.fget
SiteConfig.dp_policy = property(lambda self: None if self.data["site_name"] == "hospital_a" else _site_dp_policy(self))
'''

FORGED_HOSTILE = '''"""Forged: the real CXR trainer; at hospital_a each train result carries one hostile thing
(HOSTILE[round]) and its first round streams a metric named after a patient; hospital_b trains honestly (min_clients 1: the job goes on while hospital_a's results are blocked)."""
import csv

import nvflare.client as flare
import torch
from nvflare.app_common.abstract.fl_model import ParamsType
from nvflare.client.tracking import SummaryWriter

import cxr_classification
from hcls import client_loop
from hcls.site_config import SiteConfig

HOSTILE = ["extra_tensor", "string_meta", "lower_cased_id", "id_number_without_prefix", "id_as_char_codes",
           "name_reordered", "birth_date_as_number"]
real_receive, real_send, received, rounds = flare.receive, flare.send, [], []


def patient():
    with open(SiteConfig.from_env().dataset_dir("cxr_classification") / "train.csv", newline="") as f:
        return next(csv.DictReader(f))


def receive(*args, **kwargs):
    model = real_receive(*args, **kwargs)
    received[:] = [model]
    return model


def send(model, *args, **kwargs):
    if flare.get_site_name() != "hospital_a" or not flare.is_train():
        return real_send(model, *args, **kwargs)
    hostile, row = HOSTILE[len(rounds) % len(HOSTILE)], patient()
    rounds.append(hostile)
    pid, (last, first), birth = row["PatientID"], row["PatientName"].split("^"), row["PatientBirthDate"]
    if len(rounds) == 1:  # a metric streamed to the server's TensorBoard, named after the patient
        SummaryWriter().add_scalar("val_auc_" + pid, 0.5, global_step=0)
    params = {k: v - received[0].params[k] for k, v in model.params.items()}  # the diff the Client API would send
    model.params, model.params_type = params, ParamsType.DIFF
    if hostile == "extra_tensor":
        params["leak.extra"] = torch.zeros(4)
    elif hostile == "string_meta":
        model.meta["note"] = "trained on the usual cohort"
    elif hostile == "lower_cased_id":
        model.metrics["val_auc_" + pid.lower()] = 0.5
    elif hostile == "id_number_without_prefix":
        model.metrics["val_auc"] = float(int(pid.split("-")[1].lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")))
    elif hostile == "id_as_char_codes":  # a real parameter, right shape and dtype, spelling the ID
        bias = params["class_layers.out.bias"]
        codes = [ord(c) for c in pid] + [32] * (bias.numel() - len(pid))
        params["class_layers.out.bias"] = torch.tensor(codes, dtype=bias.dtype)
    elif hostile == "name_reordered":
        model.metrics[f"val_auc_{first}_{last}".lower()] = 0.5
    elif hostile == "birth_date_as_number":
        model.meta["NUM_STEPS_CURRENT_ROUND"] = int(birth)
    print(f"[forged] round {len(rounds) - 1}: {hostile}")
    return real_send(model, *args, **kwargs)


flare.receive, flare.send = receive, send
client_loop.main(cxr_classification.JOB_NAME, cxr_classification.build)
'''
HOSTILE_REASONS = [  # what hospital_a's log gives as the reason, round by round (FORGED_HOSTILE's HOSTILE)
    r"parameter #\d+ of the result is not in the global model's state_dict",
    r"meta key #\d+ is not one the site allows",
    r"a value of blocked field PatientID \(train\.csv\) at /meta/initial_metrics \(a key\)",
    r"a value of blocked field PatientID \(train\.csv\) at /meta/initial_metrics/val_auc",
    r"a value of blocked field PatientID \(train\.csv\) at /data/class_layers\.out\.bias",
    r"a value of blocked field PatientName \(train\.csv\) at /meta/initial_metrics \(a key\)",
    r"a value of blocked field PatientBirthDate \(train\.csv\) at /meta/NUM_STEPS_CURRENT_ROUND",
]


def build(env, profile: dict, tmp_path: Path, forged: str = "", appended: dict | None = None) -> Path:
    """The real CXR job folder built with ``profile``; with ``forged``, that trainer replaces the job's script;
    ``appended`` ({path in the app's custom/: code}) adds code to the job's own modules."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    overlay = tmp_path / "profile.json"
    overlay.write_text(json.dumps(profile))
    job = Path(run("build_job.sh", "cxr_classification", str(overlay), env=env).stdout.strip())
    if forged:
        (job / "app" / "custom" / "forged_trainer.py").write_text(forged)
        config = job / "app" / "config" / "config_fed_client.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "app_script": "forged_trainer.py"}))
    for module, code in (appended or {}).items():
        with open(job / "app" / "custom" / module, "a") as f:
            f.write(code)
    copy = tmp_path / "job"
    shutil.copytree(job, copy)
    return copy


def submit(env, job: Path):
    """Approve (the sites approve a forged trainer too: what they test here is the site's filter) and submit."""
    approve(env, job)
    result = run("submit.sh", str(job), "", "1", env=env, check=False)
    job_id = re.search(r"job id (\S+)", result.stdout).group(1)
    return result, job_id


def server_job_log(env, job_id: str) -> str:
    """The server's log lines of the job (its job process logs into the participant's daemon.log)."""
    log = Path(env["HCLS_WORKSPACE"]) / "local" / "flare-server" / "daemon.log"
    return "\n".join(line for line in log.read_text(errors="replace").splitlines() if job_id in line)


def server_contents(env):
    """(path, bytes) of every file the server holds, zip archives (job storage) opened member by member."""
    for path in (Path(env["HCLS_WORKSPACE"]) / "local" / "flare-server").rglob("*"):
        if path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                yield from ((f"{path}:{m}", archive.read(m)) for m in archive.namelist())
        elif path.is_file():
            yield str(path), path.read_bytes()


def holding(contents, values: list[bytes]) -> list[str]:
    """The paths of ``contents`` ((path, bytes)) in which any of ``values`` occurs as bytes; a value of digits only
    (a birth date) counts where no digit adjoins it, as the number it is, not inside a longer one (NVFlare's timing
    statistics hold floats such as 0.019671201705932617). A content of 1 MiB or more is searched by grep in one pass
    (hundreds of values, each searched on its own through the gigabytes the server holds after the whole suite, took
    minutes)."""
    assert all(values) and not any(b"\n" in v for v in values)  # grep: one value a line, matched within a line
    numbers, texts = [v for v in values if v.isdigit()], [v for v in values if not v.isdigit()]
    number = re.compile(rb"(?<![0-9])(?:" + b"|".join(numbers) + rb")(?![0-9])") if numbers else None
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "texts").write_bytes(b"".join(v + b"\n" for v in texts))
        (Path(tmp) / "numbers").write_bytes(b"".join(b"(^|[^0-9])" + v + b"([^0-9]|$)\n" for v in numbers))
        for path, content in contents:
            if len(content) < 1 << 20:
                hit = any(v in content for v in texts) or bool(number and number.search(content))
            else:
                hit = any(grep(content, flag, Path(tmp) / name) for flag, name in (("-F", "texts"), ("-E", "numbers")))
            if hit:
                found.append(path)
    return found


def grep(content: bytes, flag: str, patterns: Path) -> bool:
    """Whether ``content`` matches any line of ``patterns`` (grep -F: strings, -E: extended regexes)."""
    if not patterns.stat().st_size:
        return False
    done = subprocess.run(["grep", "-a", flag, "-q", "-f", str(patterns)], input=content,
                          env=dict(os.environ, LC_ALL="C"), capture_output=True)  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


def identifiers(env) -> set[str]:
    values = set()
    for path in (Path(env["HCLS_WORKSPACE"]) / "data").glob("*/*/*.csv"):  # CXR in the project's layout (tiny_data.json)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        values |= {row[c] for row in rows for c in ("PatientName", "PatientID", "PatientBirthDate") if c in row}
    return values


@pytest.fixture
def site_policy(env, tmp_path):
    """Redeploy the sites with policy overrides ({host: {...}}, merged over the demo's), restore afterwards."""
    inventory = tmp_path / "inventory"

    def apply(overrides: dict):
        shutil.copytree(REPO / "ansible" / "inventories" / "local", inventory, dirs_exist_ok=True)
        (inventory / "host_vars").mkdir(exist_ok=True)
        for host, override in overrides.items():
            (inventory / "host_vars" / f"{host}.yml").write_text(
                json.dumps({"flare_participant_privacy": {"min_dataset_size": 2, **override}})
            )
        out = run("deploy.sh", env={**env, "INVENTORY": str(inventory / "hosts.sh")}).stdout
        # Each job process reads the site's policy when the job starts: a new policy restarts no participant.
        assert not re.search(r"hospital_[ab] (re)?started", out), out[-3000:]

    yield apply
    run("deploy.sh", env=env)


def test_policy_is_rendered_into_the_scope_and_enforced_by_site_code(deployed, env):
    local = Path(env["HCLS_WORKSPACE"]) / "local" / "hospital_a" / "local"
    privacy = json.loads((local / "privacy.json").read_text())
    site = json.loads((REPO / "site_configs" / "site_hospital_a" / "local_config.json").read_text())["privacy"]
    assert "default_scope" not in privacy
    (scope,) = privacy["scopes"]
    assert scope["name"] == site["scope"] == job_builder.resolve("cxr_classification")["meta"]["scope"]
    assert scope["properties"] == {**{k: v for k, v in site.items() if k != "scope"}, "min_dataset_size": 2}
    assert scope["task_result_filters"][0]["path"] == "site_privacy.components.SitePolicyFilter"
    assert scope["task_data_filters"][0]["path"] == "site_privacy.components.SitePolicyFilter"  # records the model
    assert (local / "custom" / "site_privacy" / "components.py").read_bytes() == (
        REPO / "custom" / "site_privacy" / "components.py"
    ).read_bytes()
    assert json.loads((local / "resources.json").read_text())["allow_log_streaming"] is False


@pytest.mark.parametrize("scope", ["", "research_open"])
def test_a_job_without_the_sites_scope_is_refused(deployed, env, tmp_path, scope):
    result, job_id = submit(env, build(env, {**TINY, "meta": {"scope": scope}}, tmp_path))
    assert result.returncode != 0 and "FINISHED:COMPLETED" not in result.stdout
    log = server_job_log(env, job_id)
    assert f"hospital_a: NVFLARE_ERROR: privacy scope '{scope}' is not allowed" in log
    assert not list((Path(env["HCLS_WORKSPACE"]) / "local" / "hospital_a").glob(f"{job_id}/app_hospital_a"))


def test_dp_job_spends_within_budget_and_a_site_skipping_dp_is_blocked(deployed, env, tmp_path, site_policy):
    """One DP job, min_clients 1: hospital_b trains with DP and spends within its budget; at hospital_a the job's
    code turns DP off, and the site blocks each of its results (no DP accounting) while the job completes."""
    dp = {"differential_privacy": {"enabled": True, "epsilon": 8, "delta": 1e-5, "max_grad_norm": 1}}
    site_policy({"hospital_a": dp, "hospital_b": dp})
    dp_profile = json.loads((REPO / "job_configs/cxr_classification/profiles/dp.json").read_text())
    dp_tiny = {**TINY, "server": {**TINY["server"], **dp_profile["server"], "min_clients": 1}}
    result, job_id = submit(env, build(env, dp_tiny, tmp_path, appended={"hcls/site_config.py": FORGED_NO_DP}))
    assert "FINISHED:COMPLETED" in result.stdout, result.stdout[-3000:]
    site_log = next((Path(env["HCLS_WORKSPACE"]) / "local" / "hospital_b").glob(f"{job_id}/log.txt")).read_text()
    spent = [float(e) for e in re.findall(r"DP epsilon (\S+) spent by job \S+ at this site \(the site's accountant\), "
                                           r"budget 8", site_log)]  # fmt: skip
    assert len(spent) >= 2 and spent == sorted(spent) and 0 < spent[-1] <= 8.0, spent
    shown = re.findall(r"Ignore the result from hospital_a at round \d+\. Result error code: "
                       r"PRIVACY_POLICY_BLOCKED by hospital_a: (.*)", result.stdout)  # what the operator sees
    assert shown and all("the result lacks DP accounting" in reason for reason in shown), result.stdout[-3000:]
    assert "Contribution from hospital_a" not in server_job_log(env, job_id)
    # The fetch builds the network from the job's own configuration: the GroupNorm variant, without naming it.
    run("fetch_model.sh", "cxr_classification", job_id, env=env)
    dp_network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=18, norm=("group", {"num_groups": 32}),
                             act=("relu", {"inplace": False}))  # fmt: skip
    best = Path(env["MODELS_DIR"]) / "cxr_classification" / "best_model.pt"
    dp_network.load_state_dict(torch.load(best, weights_only=True), strict=True)


def test_dp_fine_tuning_starts_from_pre_trained_weights_and_trains_only_the_named_layers(
    deployed, env, tmp_path, site_policy
):
    """The dp_pretrained recipe on the real federation, DP required at both sites: the server starts from the
    pre-trained weights the persistor names, the sites train denseblock4 and the classifier under DP-SGD with batch
    norm frozen, and the best model keeps every other weight and every batch norm statistic as pre-trained."""
    dp = {"differential_privacy": {"enabled": True, "epsilon": 8, "delta": 1e-5, "max_grad_norm": 1}}
    site_policy({"hospital_a": dp, "hospital_b": dp})
    network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=18, act=("relu", {"inplace": False}))
    network.load_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in network.state_dict().items()})
    pretrained = network.state_dict()
    torch.save(pretrained, tmp_path / "pretrained.pt")  # an absolute name: read on the server (local here)
    profile = json.loads((REPO / "job_configs/cxr_classification/profiles/dp_pretrained.json").read_text())
    profile["server"]["components"][0]["args"]["source_ckpt_file_full_name"] = str(tmp_path / "pretrained.pt")
    result, job_id = submit(env, build(env, job_builder.merge(TINY, profile, "test"), tmp_path / "build"))
    assert "FINISHED:COMPLETED" in result.stdout, result.stdout[-3000:]
    assert f"Loading checkpoint from {tmp_path / 'pretrained.pt'}" in server_job_log(env, job_id)
    for site in ("hospital_a", "hospital_b"):
        site_log = next((Path(env["HCLS_WORKSPACE"]) / "local" / site).glob(f"{job_id}/log.txt")).read_text()
        assert re.search(r"DP epsilon \S+ spent by job \S+ at this site", site_log), site_log[-3000:]
    run("fetch_model.sh", "cxr_classification", job_id, env=env)
    best = torch.load(Path(env["MODELS_DIR"]) / "cxr_classification" / "best_model.pt", weights_only=True)
    changed = {name for name, value in best.items() if not torch.equal(value, pretrained[name])}
    assert "class_layers.out.weight" in changed and any(n.startswith("features.denseblock4.") for n in changed)
    assert all(n.startswith(("features.denseblock4.", "class_layers.")) and ".norm" not in n for n in changed), changed


def test_a_site_below_min_dataset_size_sends_no_update(deployed, env, tmp_path):
    manifest = Path(env["HCLS_WORKSPACE"]) / "data" / "hospital_a" / "chexpert" / "train.csv"
    original = manifest.read_text()
    manifest.write_text("".join(original.splitlines(keepends=True)[:2]))  # one study, min_dataset_size is 2
    try:
        result, job_id = submit(env, build(env, TINY, tmp_path))
    finally:
        manifest.write_text(original)
    assert result.returncode != 0
    blocked = re.search(r"PRIVACY_POLICY_BLOCKED by hospital_a: (.*)", result.stdout)
    assert blocked and re.search(r"lists 1 samples .* fewer than min_dataset_size 2", blocked.group(1))
    assert "Contribution from hospital_a" not in server_job_log(env, job_id)
    trainer_log = next((Path(env["HCLS_WORKSPACE"]) / "local" / "hospital_a").glob(f"{job_id}/log.txt")).read_text()
    assert "privacy.min_dataset_size is 2 but dataset" in trainer_log and "gives 1 training samples" in trainer_log


def test_a_hostile_job_is_blocked_by_structure_and_by_identifiers_in_any_encoding(deployed, env, tmp_path):
    """One job, seven rounds: hospital_a's forged trainer sends an extra tensor, free-text meta, then identifiers
    of its first patient written otherwise (the ID lower-cased, its number without the prefix, the ID as
    character codes in a real parameter, the name in another order, the birth date as a number); hospital_b
    trains honestly. Every hostile result is blocked at hospital_a, whose log says why without the value; the
    server gets none of it and the job still completes on hospital_b's updates."""
    profile = {**TINY, "server": {**TINY["server"], "num_rounds": len(HOSTILE_REASONS), "min_clients": 1}}
    result, job_id = submit(env, build(env, profile, tmp_path, forged=FORGED_HOSTILE))
    assert "FINISHED:COMPLETED" in result.stdout, result.stdout[-3000:]
    shown = re.search(r"Ignore the result from hospital_a at round 0\. Result error code: "
                      r"PRIVACY_POLICY_BLOCKED by hospital_a: (.*)", result.stdout)  # what the operator sees
    assert shown and re.search(HOSTILE_REASONS[0], shown.group(1)), result.stdout[-3000:]
    site_log = next((Path(env["HCLS_WORKSPACE"]) / "local" / "hospital_a").glob(f"{job_id}/log.txt")).read_text()
    assert "privacy policy: stopped the outgoing event" in site_log  # the metric streamed to TensorBoard
    blocked = re.findall(rf"privacy policy: blocked the 'train' result of job {job_id}: (.*)", site_log)
    assert len(blocked) == len(HOSTILE_REASONS), blocked
    for reason, expected in zip(blocked, HOSTILE_REASONS):
        assert re.search(expected, reason), (reason, expected)
    with open(Path(env["HCLS_WORKSPACE"]) / "data" / "hospital_a" / "chexpert" / "train.csv", newline="") as f:
        row = next(csv.DictReader(f))
    pid, birth = row["PatientID"], row["PatientBirthDate"]
    number = pid.split("-")[1].lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    encodings = [pid, pid.lower(), number, *row["PatientName"].split("^"), birth, "trained on the usual cohort"]
    privacy_lines = [line for line in site_log.splitlines() if "privacy policy" in line]
    assert not [line for line in privacy_lines for e in encodings if e.lower() in line.lower()], privacy_lines
    server_log = server_job_log(env, job_id)
    assert server_log.count("PRIVACY_POLICY_BLOCKED by hospital_a") >= len(HOSTILE_REASONS)
    assert "Contribution from hospital_a" not in server_log  # COMPLETED with min_clients 1: hospital_b's counted
    last, first = row["PatientName"].split("^")
    values = [v.encode() for v in identifiers(env) | {pid.lower(), f"{first}_{last}".lower()}]  # every site's
    leaked = holding(server_contents(env), values)
    assert not leaked, leaked
