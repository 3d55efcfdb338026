"""Row "overhead": how much of a FedAvg round is orchestration rather than training, for this project's job
configuration and for a stock NVFlare FedAvg job, on the local federation (provision/project.yml's server and two
sites as separate processes on this machine, mTLS, deployed by `make deploy`).

* This project's job: cxr_classification as `make submit` builds it (job_configs/, base: the external-process
  Client API executor, hcls.fedavg), with the network swapped for each model, images at 32 px, no cross-site
  validation; each site trains on its generated CXR data.
* The stock job: NVFlare's own FedAvg recipe (``FedAvgRecipe``: in-process Client API, full weights) whose client
  (bench/stock_client.py) sends back the weights it received without training. Its meta.json names the sites'
  privacy scope, as any job must to be admitted.

Overhead of round r = (start of round r+1 - start of round r, from the server's job log) - the slowest site's
compute in round r (its trainer's own log line: receiving the weights into the network, evaluating, training,
evaluating). Round 0 (trainer start) and the last round are left out; the median over the others (ROUNDS - 2).
Models: a tiny DenseNet (558 parameters) and DenseNet-121 (6.97 M parameters, 28 MB). Targets for this project's
job: <= 0.1 s tiny, <= 1.0 s at 28 MB. The federation is stopped at the end.
"""

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
from datetime import datetime
from pathlib import Path

from hcls.job_config import persistor_args
from ops import job_builder

from .table import Measurement, timed

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
ROUNDS, QUICK_ROUNDS = 10, 4
DATA = {"CXR_N_TRAIN": "24", "CXR_N_VAL": "16", "CXR_SIZE": "32", "CXR_LAYOUTS": "project"}
SITES = job_builder.client_sites(REPO / "provision" / "project.yml")
TINY = {"path": "monai.networks.nets.DenseNet", "args": {  # the job's inputs and outputs, 558 parameters
    "init_features": 4, "growth_rate": 4, "block_config": [1], "bn_size": 1}}  # fmt: skip
TARGETS = {"tiny DenseNet": 0.1, "DenseNet-121": 1.0}  # seconds of overhead a round, this project's job
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
ROUND_STARTED = re.compile(r"Round (\d+) started\.")
SITE_COMPUTE = re.compile(r"round (\d+): .*compute ([0-9.]+)s")


def run(quick: bool, work: Path) -> list[Measurement]:
    rounds = QUICK_ROUNDS if quick else ROUNDS
    log = work / "overhead.log"
    env = deploy_local(work, log)
    rows = []
    try:
        network = job_network()
        models = {"tiny DenseNet": {"path": TINY["path"], "args": {**network["args"], **TINY["args"]}},
                  "DenseNet-121": network}  # fmt: skip
        for name, model in list(models.items())[: 1 if quick else None]:
            target = TARGETS[name]
            ours = overheads(work, env, log, our_job(work, name, model, rounds))
            stock = overheads(work, env, log, stock_job(work, name, model, rounds))
            what = (f"round overhead, {name}: round wall time - slowest site's compute, median of {rounds - 2} rounds; "
                    "reference: stock NVFlare FedAvg recipe")  # fmt: skip
            rows.append(Measurement("overhead", what, statistics.median(ours), "s", target=f"<= {target:g} s",
                                    met=statistics.median(ours) <= target, reference=statistics.median(stock),
                                    reference_what="stock NVFlare", samples=ours))  # fmt: skip
    finally:
        timed([SCRIPTS / "control.sh", "stop"], env, REPO, log)
    return rows


def deploy_local(work: Path, log: Path) -> dict:
    """Provision and deploy the local federation in a fresh WORK folder, with small CXR data at each site; the
    environment for the project's scripts (their output goes to LOG)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, **DATA, "HCLS_WORKSPACE": str(work / "workspace"), "MODELS_DIR": str(work / "models"),
           "HCLS_SITE_CONFIGS": str(work / "site_configs")}  # fmt: skip
    env.pop("INVENTORY", None)  # the local federation's
    for step in (["provision.sh"], ["generate_data.sh", "cxr_classification"], ["deploy.sh"]):
        timed([SCRIPTS / step[0], *step[1:]], env, REPO, log)
    return env


def job_network() -> dict:
    """The network of the cxr_classification job: the server persistor's ``model`` ({path, args})."""
    return persistor_args(job_builder.resolve("cxr_classification")["server"])["model"]


def our_job(work: Path, name: str, model: dict, rounds: int) -> tuple[str, str]:
    """(JOB, PROFILE) for submit.sh: cxr_classification with an overlay profile."""
    overlay = work / f"{name.replace(' ', '_')}.json"
    overlay.write_text(json.dumps({
        "site_resources": None,
        "server": {"num_rounds": rounds, "components": [{"id": "persistor", "args": {"model": model}}],
                   "workflows": [{"id": "cross_site_validation", "remove": True}]},
        "client": {"trainer": {"image_size": [32, 32], "batch_size": 8, "num_workers": 0}},
    }))  # fmt: skip
    return "cxr_classification", str(overlay)


def stock_job(work: Path, name: str, model: dict, rounds: int) -> tuple[str, str]:
    """(job folder, "") of NVFlare's FedAvg recipe, named as the job the sites know (their data checks use it)."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    out = work / "stock" / name.replace(" ", "_")
    with contextlib.chdir(REPO / "custom"):  # the script's path in the job: relative to the job's custom/ folder
        FedAvgRecipe(name="cxr_classification", model={"class_path": model["path"], "args": model["args"]},
                     min_clients=len(SITES), num_rounds=rounds, train_script="bench/stock_client.py").export(str(out))
    # the one change the sites require of any job: it names their privacy scope (job_configs/base/meta.json)
    meta_path = out / "cxr_classification" / "meta.json"
    scope = json.loads((REPO / "job_configs" / "base" / "meta.json").read_text())["scope"]
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "scope": scope}, indent=2))
    return str(out / "cxr_classification"), ""


def overheads(work: Path, env: dict, log: Path, job: tuple[str, str]) -> list[float]:
    """Approve and run the job; the overhead of each round but the first and the last."""
    timed([SCRIPTS / "approve.sh", "--install", *job], env, REPO, log)
    done = subprocess.run([SCRIPTS / "submit.sh", job[0], job[1], "1"], env=env, cwd=REPO, capture_output=True,
                          text=True)  # fmt: skip
    with log.open("a") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"submit.sh {' '.join(job)} failed ({done.returncode}), see {log}")
    job_id = re.search(r"job id (\S+)", done.stdout).group(1)
    starts = round_starts(server_log(env, job_id))
    compute = {}
    for site in SITES:
        text = (work / "workspace" / "local" / site / job_id / "log.txt").read_text()
        for round_no, seconds in SITE_COMPUTE.findall(text):
            compute[int(round_no)] = max(compute.get(int(round_no), 0.0), float(seconds))
    rounds = sorted(starts)
    missing = [r for r in rounds[1:-1] if r not in compute]
    if missing:
        raise RuntimeError(f"job {job_id}: no site compute logged for rounds {missing}, see {log}")
    return [starts[r + 1] - starts[r] - compute[r] for r in rounds[1:-1]]


def server_log(env: dict, job_id: str) -> str:
    """The server's log of the job, through the admin API (as `make logs` reads it)."""
    from ops import flare_admin

    kit = subprocess.run(["bash", "-c", f"source {SCRIPTS / 'common.sh'} && admin_kit"], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    with flare_admin.session(kit) as sess:
        return sess.get_job_logs(job_id, target="server").get("logs", {}).get("server", "")


def round_starts(text: str) -> dict[int, float]:
    """{round: seconds since the epoch} of each "Round N started." message (NVFlare's FedAvg controller writes it on
    a line of its own below the timestamped one)."""
    starts, stamp = {}, None
    for line in text.splitlines():
        if TIMESTAMP.match(line):
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if (started := ROUND_STARTED.search(line)) and stamp is not None:
            starts[int(started.group(1))] = stamp
    return starts
