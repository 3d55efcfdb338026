"""Row "recovery": how long the federation takes to train again after a failure, on the local federation
(provision/project.yml's server and two sites as separate processes on this machine, mTLS, deployed by `make
deploy`), with real signals to the real processes during one running job:

* server killed: ``kill -9`` of the server mid-round (its pid file); the kit's start loop starts it again,
  ``job_recovery`` runs the job again under its id and ``hcls.fedavg`` continues from the round it was in.
  Measured: the kill -> a round started again (the server's ``rounds.json``), i.e. training again, and -> that
  round aggregated (it includes the sites' trainers starting again: they end with the old run).
* site frozen: ``SIGSTOP`` of a site's participant process and every process under it (job process, trainer),
  as a host that hangs or drops off the network looks to the server, held until the server closed a round without
  it (its ``train_timeout``), then ``SIGCONT``. Measured: the SIGCONT -> the end of the first round to which the
  site contributed again.

The job: cxr_classification as `make submit` builds it with the tiny DenseNet of row ``overhead`` (558
parameters: recovery, not training, is timed), 32 px images, ``min_clients`` 1 (a round goes on without a missing
site), ``train_timeout`` TRAIN_TIMEOUT s. Each failure is repeated REPEATS times (1 with QUICK), one after the other
in the same job; medians. The job is aborted once measured and the federation stopped.
"""

import json
import os
import signal
import statistics
import time
from datetime import datetime
from pathlib import Path

import psutil

from .overhead import SCRIPTS, SITES, TINY, deploy_local, job_network
from .table import Measurement, timed

REPO = Path(__file__).resolve().parents[2]
REPEATS = 3
TRAIN_TIMEOUT = 30  # s: how long the server waits for a frozen site before it closes the round without it
FROZEN_SITE = SITES[-1]


def run(quick: bool, work: Path) -> list[Measurement]:
    repeats = 1 if quick else REPEATS
    log = work / "recovery.log"
    env = deploy_local(work, log)
    federation = Federation(work / "workspace" / "local")
    try:
        job_id = submit(work, env, log)
        started, aggregated = zip(*[federation.kill_server(job_id) for _ in range(repeats)])
        site = [federation.freeze_site(job_id, FROZEN_SITE) for _ in range(repeats)]
        timed([SCRIPTS / "abort.sh", job_id], env, REPO, log)
    finally:
        federation.thaw()  # never leave a stopped process behind
        timed([SCRIPTS / "control.sh", "stop"], env, REPO, log)
    how = f"tiny CXR job, median of {repeats}"
    return [
        Measurement("recovery", f"server kill -9 mid-round -> a round started again (training again), {how}",
                    statistics.median(started), "s", samples=list(started)),
        Measurement("recovery", f"server kill -9 mid-round -> the first round after it aggregated, {how}",
                    statistics.median(aggregated), "s", samples=list(aggregated)),
        Measurement("recovery", f"site frozen (SIGSTOP) until a round closed without it, SIGCONT -> the end of its "
                    f"first contributed round, {how}", statistics.median(site), "s", samples=site),
    ]  # fmt: skip


def submit(work: Path, env: dict, log: Path) -> str:
    overlay = work / "recovery.json"
    overlay.write_text(json.dumps({
        "site_resources": None,
        "server": {"num_rounds": 1000, "min_clients": 1, "train_timeout": TRAIN_TIMEOUT,
                   "components": [{"id": "persistor", "args": {"model": {
                       "path": TINY["path"], "args": {**job_network()["args"], **TINY["args"]}}}}],
                   "workflows": [{"id": "cross_site_validation", "remove": True}]},
        "client": {"trainer": {"image_size": [32, 32], "batch_size": 8, "num_workers": 0}},
    }))  # fmt: skip
    timed([SCRIPTS / "approve.sh", "--install", "cxr_classification", str(overlay)], env, REPO, log)
    before = log.read_text()
    timed([SCRIPTS / "submit.sh", "cxr_classification", str(overlay)], env, REPO, log)
    return log.read_text()[len(before):].split("job id ", 1)[1].split()[0]


class Federation:
    """The local federation's processes and the server's round record of a job (``rounds.json``)."""

    def __init__(self, local: Path):
        self.local, self.frozen = local, []

    def rounds(self, job_id: str) -> dict:
        path = self.local / "flare-server" / job_id / "app_server" / "rounds.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or moved aside during a restart
            return {"rounds": [], "restarts": []}

    def kill_server(self, job_id: str) -> tuple[float, float]:
        """Kill the server mid-round; seconds until a round started again, and until the first round after the
        kill was aggregated (the sites' trainers, ended with the old run, started again)."""
        poll("a round in progress", lambda: self.current_round(job_id), 300)
        os.kill(int((self.local / "flare-server" / "pid.fl").read_text()), signal.SIGKILL)
        killed = time.time()
        again = poll("a round started after the kill", lambda: next(
            (r for r in self.rounds(job_id)["rounds"] if epoch(r["started"]) > killed), None), 300)  # fmt: skip
        done = poll("a round aggregated after the kill", lambda: next(
            (r for r in self.rounds(job_id)["rounds"] if epoch(r["started"]) > killed and r.get("finished")), None),
            300)  # fmt: skip
        return epoch(again["started"]) - killed, epoch(done["finished"]) - killed

    def current_round(self, job_id: str) -> dict | None:
        """The round in progress once a round finished since the job's last (re)start: the sites' trainers are up
        and the global model of a round is persisted, as in a job that has run for a while."""
        record = self.rounds(job_id)
        restarted = max((epoch(r["at"]) for r in record["restarts"]), default=0.0)
        since = [r for r in record["rounds"] if epoch(r["started"]) > restarted]
        if len(since) >= 2 and since[-2].get("finished") and not since[-1].get("finished"):
            return since[-1]
        return None

    def freeze_site(self, job_id: str, site: str) -> float:
        """Freeze SITE once it contributed to a round, until a round closed without it; seconds from the thaw
        to the end of its first contributed round after."""
        poll(f"a round with {site}", lambda: self.finished(job_id, site, True, after=time.time() - 5), 300)
        root = psutil.Process(int((self.local / site / "pid.fl").read_text()))
        self.frozen = [root, *root.children(recursive=True)]
        for proc in self.frozen:
            proc.send_signal(signal.SIGSTOP)
        stopped = time.time()
        poll(f"a round without {site}", lambda: self.finished(job_id, site, False, after=stopped),
             TRAIN_TIMEOUT + 120)  # fmt: skip
        thawed = self.thaw()
        back = poll(f"{site} contributing again", lambda: self.finished(job_id, site, True, after=thawed), 300)
        return epoch(back["finished"]) - thawed

    def finished(self, job_id: str, site: str, contributed: bool, after: float) -> dict | None:
        """The first round that finished after AFTER (epoch s) to which SITE contributed (or which it missed)."""
        return next((r for r in self.rounds(job_id)["rounds"] if r.get("finished") and epoch(r["finished"]) > after
                     and (site in r["contributed"]) == contributed), None)  # fmt: skip

    def thaw(self) -> float:
        for proc in self.frozen:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        self.frozen = []
        return time.time()


def poll(what: str, check, timeout: float):
    """``check()``'s first truthy value within TIMEOUT seconds, else an error naming WHAT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise RuntimeError(f"recovery: timed out after {timeout:g} s waiting for {what}")


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
