"""Row "operations": how long the coordinator's commands take for the three participants of the local federation
(provision/project.yml's server and two sites as native processes on this machine, the default inventory): `make
provision`, the first `make deploy` into an empty workspace, and `make deploy` again with nothing changed
(changed=0). Targets (issue "make bench"): first deploy <= 30 s, no-op deploy <= 15 s. Medians over REPEATS runs
(1 with QUICK). The federation is stopped at the end."""

import os
import shutil
from pathlib import Path

from .table import Measurement, median, timed

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
REPEATS = 5
# Small demo data: the deploy checks each site's data root; its size does not matter to a deploy.
DATA = {"CXR_N_TRAIN": "24", "CXR_N_VAL": "16", "CXR_SIZE": "32", "CXR_LAYOUTS": "project"}


def run(quick: bool, work: Path) -> list[Measurement]:
    repeats = 1 if quick else REPEATS
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, **DATA, "HCLS_WORKSPACE": str(work / "workspace"), "MODELS_DIR": str(work / "models")}
    env.pop("INVENTORY", None)  # the local federation's
    log = work / "operations.log"
    provision = [timed([SCRIPTS / "provision.sh"], env, REPO, log) for _ in range(repeats)]
    timed([SCRIPTS / "generate_data.sh", "cxr_classification"], env, REPO, log)
    try:
        first = [timed([SCRIPTS / "deploy.sh"], env, REPO, log)]
        again = [timed([SCRIPTS / "deploy.sh"], env, REPO, log) for _ in range(repeats)]
        for _ in range(repeats - 1):  # first deploys again: stop everything, empty the deployment, deploy
            timed([SCRIPTS / "control.sh", "stop"], env, REPO, log)
            shutil.rmtree(work / "workspace" / "local")
            first.append(timed([SCRIPTS / "deploy.sh"], env, REPO, log))
    finally:
        timed([SCRIPTS / "control.sh", "stop"], env, REPO, log)
    n = f"median of {repeats}" if repeats > 1 else "1 run (QUICK)"
    return [
        Measurement("operations", f"`make provision`, 3 participants + admin ({n})", median(provision), "s",
                    samples=provision),
        Measurement("operations", f"first `make deploy`, 3 local participants ({n})", median(first), "s",
                    target="<= 30 s", met=median(first) <= 30, samples=first),
        Measurement("operations", f"no-op `make deploy` (changed=0), 3 local participants ({n})", median(again), "s",
                    target="<= 15 s", met=median(again) <= 15, samples=again),
    ]  # fmt: skip
