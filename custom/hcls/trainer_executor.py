"""NVFlare's Client API executor with one trainer process per job that is started again when it is lost.

NVFlare's ``ClientAPIExecutor`` (``execution_mode`` external_process) offers two lifetimes: a trainer per task
(``launch_once`` false), which pays the trainer's start (imports, data loading) for every train, validate and
submit_model task, and a trainer per job (``launch_once`` true), which latches an abort for the rest of the job
once its trainer died or hung, so that site never takes part again. ``RelaunchingClientAPIExecutor`` keeps
one trainer for the job and, when the next task arrives after the trainer was lost (process gone, heartbeat
silent for ``heartbeat_timeout``), stops what is left of it and starts a new one: the site misses the task
that was running and is back from the next. A run abort, an ended run and a lost result that another client
was still downloading (which fails the job in NVFlare) are final, as in NVFlare.

What a site needs across trainer processes lives in files (``client_loop``: best local model, DP history).

Where the site names a job user (``HCLS_JOB_USER``, set by the role's flarectl.sh for a native client under
systemd), the trainer runs as that user, not as the participant's: ``setpriv`` switches to it (the participant's
unit grants CAP_SETUID, CAP_SETGID and CAP_KILL for this, nothing else) with no capabilities and no new
privileges, so that job code cannot write the site's kit, policy and code nor read its keys (see README,
"Job code and the site's files"). Its HOME is ``<site workspace>/job_state``, the one folder it may write.
"""

import dataclasses
import os
import shutil
from pathlib import Path

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.executors.client_api.external_process_backend import ExternalProcessBackend, _LaunchAborted
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.security.logging import secure_format_traceback

from hcls.process_memory import release_large_blocks

JOB_USER_ENV = "HCLS_JOB_USER"


def job_user_command(user: str, argv: list, home: str) -> list:
    """``argv`` run as ``user`` (its own groups), with HOME=``home``, no capabilities and no way to gain any."""
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [setpriv, f"--reuid={user}", f"--regid={user}", "--init-groups", "--inh-caps=-all", "--ambient-caps=-all",
            "--no-new-privs", "--", shutil.which("env") or "/usr/bin/env", f"HOME={home}", *argv]  # fmt: skip


class RelaunchingBackend(ExternalProcessBackend):
    """``ExternalProcessBackend`` (``launch_once`` true) that replaces a lost trainer at the next task.

    The first trainer starts with the first task, not at the start of the run, so that a trainer that fails to
    start (a data error) fails its task, which the server counts as a missing site, rather than the site's run.
    """

    def initialize(self, context, fl_ctx):
        super().initialize(dataclasses.replace(context, launch_once=False), fl_ctx)
        self._context = context

    def _execute_admitted_task(self, task_name, shareable, fl_ctx, abort_signal):
        if self._context.launch_once and not abort_signal.triggered:
            lost = self._lost_trainer()
            if lost and self._clear_abort_latch():
                executor = self._context.executor
                if self._active_launch is None:
                    executor.log_info(fl_ctx, f"starting the trainer for task '{task_name}'")
                else:
                    executor.log_warning(fl_ctx, f"trainer lost ({lost}): starting a new one for task '{task_name}'")
                    self._stop_trainer(self._active_launch, natural_exit_wait=0.0)
                try:
                    self._launch_trainer(timeout=self._context.launch_timeout, abort_signal=abort_signal)
                except _LaunchAborted:
                    return make_reply(ReturnCode.TASK_ABORTED)
                except Exception:
                    self._latch_abort(f"the new trainer did not start for task '{task_name}'")
                    executor.log_error(fl_ctx, f"trainer relaunch failed: {secure_format_traceback()}")
                    return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        return super()._execute_admitted_task(task_name, shareable, fl_ctx, abort_signal)

    def _split_command(self, command):
        """The job's trainer command; as the site's job user where it names one (``HCLS_JOB_USER``)."""
        argv = super()._split_command(command)
        user = os.environ.get(JOB_USER_ENV, "")
        if not user:
            return argv
        # NVFlare writes the trainer's bootstrap (cell address, session token) owner-only; the job user reads it as a
        # member of the participant's group (the workspace is the participant's, 0750).
        os.chmod(self._active_launch.bootstrap_path, 0o640)
        return job_user_command(user, argv, home=str(Path(self._run_dir).parent / "job_state"))

    def _lost_trainer(self):
        """Why the job's trainer cannot take a task (None while it can)."""
        if self._abort:
            return self._abort_reason or "trainer aborted"
        trainer = self._active_launch
        if trainer is None:
            return "not started"
        if not trainer.ready.is_set():
            return "no established trainer session"
        return self._trainer_liveness_error(trainer)

    def _clear_abort_latch(self) -> bool:
        """Reset a trainer-loss abort; False where the run itself is ending (abort, failure, shutdown)."""
        with self._lifecycle_lock:
            run_aborted = self._run_abort_signal is not None and self._run_abort_signal.triggered
            if self._closed or self._terminal_intent is not None or run_aborted:
                return False
            self._abort, self._abort_reason = False, None
            return True


class RelaunchingClientAPIExecutor(ClientAPIExecutor):
    """``ClientAPIExecutor`` whose external_process trainer is started again after it was lost."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        release_large_blocks()  # this is the site's job process; the trainer is a process of its own

    def _create_external_process_backend(self):
        return RelaunchingBackend()
