"""``JobRecovery``: run again, under the same job id, the jobs that a server crash left RUNNING.

NVFlare 2.9 does not resume jobs: after ``kill -9`` of the server, the kit's ``sub_start.sh`` loop starts the
server again and the interrupted job stays RUNNING with no process behind it. This component, installed in
the server's ``local/resources.json``, does on server start:

1. find the jobs left RUNNING or DISPATCHED in the job store;
2. wait (at most ``settle_timeout`` seconds) until the old server job process is gone and every site that ran the
   job has sent two heartbeats to the new server: the first one makes the site abort its own process of the old
   run (the server answers with the jobs it does not run), so the site can take the job again;
3. move the job's run folder aside (NVFlare deletes the run folder when it deploys a job), set the job back to
   SUBMITTED and let the scheduler deploy it again;
4. when the job is deployed, before its server process starts, copy the old run's files back (global and best
   model, ``rounds.json``, ``best_metric.json``, the job log, metrics): ``hcls.fedavg`` continues from there.

A job interrupted more than ``max_restarts`` times is marked FINISHED:ABANDONED instead, so a job that
crashes the server every time never loops and is never left RUNNING.
"""

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey, RunStatus

SCHEDULED_TAG = "scheduled"  # NVFlare's job store marks a job it will not schedule again with this file
RESTARTS_KEY = "hcls_restarts"  # job meta: how many times JobRecovery ran the job again
ASIDE_DIR = "interrupted"  # <server workspace>/interrupted/<job id>: the old run while the job is redeployed
HEARTBEATS = 2


class JobRecovery(FLComponent):
    def __init__(self, settle_timeout: float = 60.0, max_restarts: int = 3):
        """settle_timeout: the most seconds to wait for the sites before running a job again;
        max_restarts: how many times one job is run again before it is abandoned."""
        super().__init__()
        if not isinstance(settle_timeout, (int, float)) or settle_timeout <= 0:
            raise ValueError(f"JobRecovery: settle_timeout must be a number > 0, got {settle_timeout!r}")
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"JobRecovery: max_restarts must be an integer >= 0, got {max_restarts!r}")
        self.settle_timeout = settle_timeout
        self.max_restarts = max_restarts
        self._heard = Counter()  # site name -> heartbeats processed since this server started
        self._aside = {}  # job id -> its old run folder, until the job is deployed again
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.SYSTEM_START:
            self._on_start(fl_ctx)
        elif event_type == EventType.CLIENT_HEARTBEAT_PROCESSED:
            peer = fl_ctx.get_peer_context()
            if peer is not None:
                with self._lock:
                    self._heard[peer.get_identity_name()] += 1
        elif event_type == EventType.JOB_DEPLOYED:
            self._restore(fl_ctx)

    def _on_start(self, fl_ctx: FLContext) -> None:
        engine = fl_ctx.get_engine()
        jobs = engine.get_component(SystemComponents.JOB_MANAGER).get_jobs_by_status(
            [RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx
        )
        if jobs:
            self.log_info(fl_ctx, f"jobs interrupted by a server stop: {', '.join(j.job_id for j in jobs)}")
            threading.Thread(target=self._recover, args=(engine, jobs), name="job_recovery", daemon=True).start()

    def _recover(self, engine, jobs) -> None:
        sites = {s for job in jobs for s in _sites_of(job)}
        job_ids = [job.job_id for job in jobs]
        waited = self._wait_for_sites(engine, sites, job_ids)
        with engine.new_context() as fl_ctx:
            self.log_info(fl_ctx, f"sites {', '.join(sorted(sites)) or 'none'} settled after {waited:.0f}s")
            for job in jobs:
                try:
                    self._run_again(job, engine, fl_ctx)
                except Exception as e:  # one job's trouble must not stop the others
                    self.log_error(fl_ctx, f"cannot run job {job.job_id} again: {e}")

    def _wait_for_sites(self, engine, sites: set, job_ids: list) -> float:
        """Seconds waited until the sites were heard twice and no old server job process is left (bounded)."""
        started = time.monotonic()
        while time.monotonic() - started < self.settle_timeout:
            with self._lock:
                names = sites or {c.name for c in engine.get_clients()}
                heard = bool(names) and all(self._heard[s] >= HEARTBEATS for s in names)
            if heard and not _old_job_processes(job_ids):
                break
            time.sleep(1.0)
        return time.monotonic() - started

    def _run_again(self, job, engine, fl_ctx: FLContext) -> None:
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        restarts = int(job.meta.get(RESTARTS_KEY, 0))
        if restarts >= self.max_restarts:
            job_manager.set_status(job.job_id, RunStatus.ABANDONED, fl_ctx)
            self.log_error(fl_ctx, f"job {job.job_id} was interrupted {restarts + 1} times: abandoned")
            return
        workspace = engine.get_workspace()
        run_dir = Path(workspace.get_run_dir(job.job_id))
        aside = Path(workspace.get_root_dir()) / ASIDE_DIR / job.job_id
        if run_dir.is_dir():
            if aside.exists():  # a copy back that did not finish: the run folder holds nothing newer
                shutil.rmtree(run_dir)
            else:
                aside.parent.mkdir(exist_ok=True)
                run_dir.rename(aside)
        with self._lock:
            self._aside[job.job_id] = aside
        job_manager.update_meta(job.job_id, {RESTARTS_KEY: restarts + 1}, fl_ctx)
        job_manager.set_status(job.job_id, RunStatus.SUBMITTED, fl_ctx)
        store = engine.get_component(job_manager.job_store_id)  # a FilesystemStorage: the tag is a file
        tag = Path(store._object_path(job_manager.job_uri(job.job_id))) / SCHEDULED_TAG
        tag.unlink(missing_ok=True)  # the store skips a tagged job for good; set SUBMITTED first, then untag
        self.log_info(fl_ctx, f"job {job.job_id} submitted again after a server stop (restart {restarts + 1})")

    def _restore(self, fl_ctx: FLContext) -> None:
        job_id = fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID)
        with self._lock:
            aside = self._aside.pop(job_id, None)
        if aside is None or not aside.is_dir():
            return
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(job_id))
        for old in sorted(p for p in aside.rglob("*") if p.is_file()):
            new = run_dir / old.relative_to(aside)
            if not new.exists():  # the job's own definition comes from the new deploy
                new.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(old, new)
        shutil.rmtree(aside)
        self.log_info(fl_ctx, f"job {job_id}: the interrupted run's models and records are back in {run_dir}")


def _sites_of(job) -> set:
    """The sites the job was deployed to (``job_deploy_detail``: ``"<site>: OK"``)."""
    detail = job.meta.get(JobMetaKey.JOB_DEPLOY_DETAIL.value) or []
    return {d.split(":")[0] for d in detail if d.endswith(": OK") and not d.startswith("server:")}


def _old_job_processes(job_ids: list) -> list:
    """Server job processes of these jobs still running (they stop within seconds of losing their parent)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "runner_process" in cmdline and any(j in cmdline for j in job_ids):
            found.append(proc.info["pid"])
    return found
