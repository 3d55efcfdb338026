"""Coordinator-side FLARE admin operations through the FLARE API (mutual TLS, admin startup kit).

    python -m ops.flare_admin submit  --kit KIT --job-dir DIR [--wait [--timeout S]]
    python -m ops.flare_admin wait    --kit KIT --job-id ID [--timeout S]
    python -m ops.flare_admin abort   --kit KIT --job-id ID
    python -m ops.flare_admin fetch   --kit KIT --job NAME --out models/NAME [--job-id ID] [--dest DIR]
    python -m ops.flare_admin status  --kit KIT

Fetch reads everything (network, key metric, trainer settings) from the downloaded job's own definition,
never from job_configs/: a job trained with any profile is fetched by its name alone. Without a job id it takes the
latest finished job of that name that the kit's own admin submitted (a job anyone else submitted under the name is
fetched only by its id), loads model files as weights only (never a pickle that could run code), stages the new set
next to models/<job>/ and swaps it in with one rename, keeping the set it replaces as models/<job>.prev/.

Errors are one line on stderr and exit code 1 (2: the job was still running when the wait's timeout passed);
nothing already fetched is overwritten until the new model is complete.
"""

import argparse
import ctypes
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, redirect_stdout
from datetime import datetime, timezone
from pathlib import Path

import sparse_update
from hcls.job_config import SERVER_CONFIG, JobConfig
from ops import bundle

COMPLETED = "FINISHED:COMPLETED"
# Why a job ended other than COMPLETED, in the operator's words (the statuses of nvflare.apis.job_def.RunStatus).
ENDED = {
    "FINISHED:ABORTED": "it was aborted (make abort, or the server aborted it)",
    "FINISHED:ABANDONED": "the server restarted while it ran and did not take it up again",
    "FINISHED:FAILED_TO_RUN": "it never started: the sites or the server refused it",
    "FINISHED:EXECUTION_EXCEPTION": "a participant's job raised an error",
    "FINISHED:ABNORMAL": "its job process ended abnormally",
    "FINISHED:CAN_NOT_SCHEDULE": "the server could not schedule it (sites or resources missing)",
}
PROGRESS = re.compile(
    r"(Round \d+ started|Round \d+ finished|round \d+: .*aggregated \d+ of \d+|validation metric \S+ from client \S+"
    r"|Ignore the result from \S+ at round \d+"  # a site's result the round went on without, and why
    r"|new best validation metric at round \d+: \S+|Cross-site|Task .*(error|exception)|Exception|ERROR)"
)
BEST = re.compile(r"new best validation metric at round (\d+): (\S+)")
# In a site's job log, the last line of a traceback that the trainer process printed (NVFlare relays the trainer's
# output at INFO under the launcher's name): the trainer's own error message, which names files and fields, never
# values. NVFlare's own error lines around it are left out.
TRAINER_ERROR = re.compile(r" - (?:ExternalProcessBackend|RelaunchingBackend|SubprocessLauncher) - INFO - (\w*(?:Error|Exception): .+)$")
# A fetched job's name: it names models/<name>/ and models/<name>.prev/, so no separators, dots or leading dash.
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
JOB_ID = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")  # NVFlare job ids are UUIDs
WEIGHT_SUFFIXES = {".pt", ".pth", ".ckpt", ".ts", ".safetensors", ".onnx"}  # fetched files that hold weights: 0600
CONNECT_S = 30  # how long one connection attempt may take
OPEN_TRIES, OPEN_PAUSE_S = 3, 2.0  # a command's first session: tries, pause between them
RETRY_S = (1.0, 30.0)  # reconnection backoff: first pause, longest pause


class AdminError(Exception):
    exit_code = 1


class StillRunning(AdminError):
    """The overall timeout passed before the job ended; the job goes on (exit code 2)."""

    exit_code = 2


class ServerLost(Exception):
    """The admin session failed (server down or restarting, link dropped): a new session may work."""


def connect(kit: str, timeout: float = CONNECT_S):
    """A new admin session with the startup kit ``kit`` (close it after use); ServerLost if the server is silent."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit_path = Path(kit)
    fed_admin = kit_path / "startup" / "fed_admin.json"
    if not fed_admin.is_file():
        raise AdminError(f"admin startup kit {kit} has no startup/fed_admin.json: run 'make provision'")
    username = json.loads(fed_admin.read_text())["admin"]["username"]
    try:
        with redirect_stdout(io.StringIO()):  # "Connecting to FLARE ..." at every attempt
            return new_secure_session(username, str(kit_path), timeout=timeout)
    except Exception as e:  # the server is down or the kit belongs to another federation
        raise ServerLost(f"{type(e).__name__}: {e}") from e


def open_session(kit: str):
    """``connect``, for a command's first session: a server that does not answer is an error, nothing to follow on.

    A login that fails fast (seen once in many hundreds: the server's reply to the identity challenge carried no
    certificate while it was busy ending a job) is tried again, OPEN_TRIES times in all, OPEN_PAUSE_S apart, within
    CONNECT_S; a server that is down takes the whole CONNECT_S in the first try and is not tried again."""
    deadline = time.monotonic() + CONNECT_S
    for attempt in range(1, OPEN_TRIES + 1):
        try:
            return connect(kit, max(1.0, deadline - time.monotonic()))
        except ServerLost as e:
            error = e
        if attempt == OPEN_TRIES or time.monotonic() + OPEN_PAUSE_S >= deadline:
            break
        time.sleep(OPEN_PAUSE_S)
    raise AdminError(f"cannot reach the FLARE server with {kit} (try {attempt}: {error}): run 'make deploy' first") from error


@contextmanager
def session(kit: str):
    sess = open_session(kit)
    try:
        yield sess
    finally:
        sess.close()


def submit(kit: str, job_dir: str, wait: bool, timeout: float = None) -> str:
    """Submit ``job_dir``; with ``wait``, follow the job until it ends (see ``follow``)."""
    with session(kit) as sess:
        try:
            job_id = sess.submit_job(os.path.abspath(job_dir))
        except Exception as e:  # the server validates the job folder and the submitter's rights
            raise AdminError(f"the server refused job folder {job_dir}: {e}") from e
    print(f"submitted {Path(job_dir).name}: job id {job_id}", flush=True)
    if wait:
        follow(kit, job_id, timeout)
    return job_id


def abort(kit: str, job_id: str) -> None:
    """Abort a job on the server and every site; a job that already ended is left as it is."""
    from nvflare.fuel.flare_api.api_spec import JobNotRunning

    with session(kit) as sess:
        status = job_status(sess, job_id)
        if _finished(status):
            raise AdminError(f"job {job_id} already ended {status}: nothing to abort")
        try:
            sess.abort_job(job_id)
        except JobNotRunning:  # it ended between the two calls
            status = job_status(sess, job_id)
            raise AdminError(f"job {job_id} already ended {status}: nothing to abort") from None
        except Exception as e:
            raise AdminError(f"the server did not abort job {job_id}: {e}") from e
    print(f"job {job_id}: abort requested (it was {status}); make wait JOB_ID={job_id} shows its end", flush=True)


def disable_site(kit: str, site: str) -> None:
    """Stop the server admitting ``site`` from now on (NVFlare's disable_client: its session is dropped and its
    registrations refused; the server keeps the list in its workspace, disabled_clients.json, across restarts)."""
    with session(kit) as sess:
        try:
            result = sess.disable_client(site)
        except Exception as e:
            raise AdminError(f"the server did not disable {site}: {e}") from e
    entry = next((c for c in (result or {}).get("clients", []) if c.get("client_name") == site), None)
    if not entry or entry.get("state") != "disabled":
        raise AdminError(f"the server did not disable {site}: it answered {result}")
    was = "was already disabled" if entry.get("already_disabled") else "disabled"
    dropped = ", its session dropped" if entry.get("active_session_removed") else ""
    print(f"{site}: {was} at the server{dropped}; its registrations are refused from now on", flush=True)


def follow(kit: str, job_id: str, timeout: float = None, poll_s: float = 3.0) -> str:
    """Follow the job until it ends: its status changes and the progress lines of the server's job log.

    A failed admin session (server restarted, link dropped) is replaced by a new one, retried with a bounded
    backoff, and the log is followed on without reprinting a line (lines carry their time to the millisecond,
    so a line already printed is recognised even if the server's log was rewritten or cut to its tail).
    A job that goes SUBMITTED or RUNNING again (taken up after a server restart) is followed on.
    ``timeout`` bounds the whole follow in seconds (None: until the job ends). Returns FINISHED:COMPLETED;
    any other end prints each site's reason and raises AdminError; the timeout raises StillRunning.
    """
    logging.getLogger("nvflare").setLevel(logging.CRITICAL)  # its warnings on a lost link: one line below says it
    started = time.monotonic()
    deadline = started + timeout if timeout else float("inf")
    printed, status, lost, pause = set(), None, False, RETRY_S[0]
    sess = open_session(kit)
    try:
        while True:
            try:
                if sess is None:
                    sess = connect(kit, max(1.0, min(CONNECT_S, deadline - time.monotonic())))
                    print("reconnected", flush=True)
                    lost, pause = False, RETRY_S[0]
                now = _call(job_status, sess, job_id)
                lines = _call(_server_log_lines, sess, job_id)
            except ServerLost as e:
                _close(sess)
                sess = None
                if not lost:
                    print(f"lost the server ({e}), reconnecting", flush=True)
                    lost = True
                if time.monotonic() >= deadline:
                    raise StillRunning(_still(job_id, status, started, lost=True)) from None
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                pause = min(2 * pause, RETRY_S[1])
                continue
            for line in lines:
                if PROGRESS.search(line) and line not in printed:
                    printed.add(line)
                    print(f"  {_short(line)}", flush=True)
            if now != status:
                status = now
                print(f"job {job_id}: {status}", flush=True)
            if _finished(status):
                break
            if time.monotonic() >= deadline:
                raise StillRunning(_still(job_id, status, started))
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
        if status != COMPLETED:
            for reason in site_reasons(sess, job_id, lines):
                print(f"  {reason}", flush=True)
            raise AdminError(f"job {job_id} ended {status}: {ENDED.get(status, 'see the reasons above')}")
        return status
    finally:
        _close(sess)


def _call(fn, sess, *args):
    """``fn(sess, *args)``, any failure of the session but 'no such job' and 'not allowed' as ServerLost."""
    from nvflare.fuel.flare_api.api_spec import AuthenticationError, AuthorizationError

    try:
        return fn(sess, *args)
    except (AdminError, AuthenticationError, AuthorizationError):
        raise
    except Exception as e:
        raise ServerLost(f"{type(e).__name__}: {e}") from e


def _close(sess) -> None:
    if sess is not None:
        try:
            sess.close()
        except Exception:  # a session to a server that is gone cannot log out
            pass


def _finished(status: str) -> bool:
    return status is not None and status.startswith("FINISHED")


def _still(job_id: str, status, started: float, lost: bool = False) -> str:
    where = f"{status or 'not seen'}" + (" (the server does not answer)" if lost else "")
    return (f"job {job_id} is still {where} after {time.monotonic() - started:.0f} s; "
            f"make wait JOB_ID={job_id} follows it again")  # fmt: skip


def site_reasons(sess, job_id: str, server_lines: list) -> list:
    """Why the sites did not run or finish the job, as far as the server knows: each site's answer when the
    server deployed the job (a refusal, e.g. the site's privacy scope), the server's job log lines that report an
    error and name a site, and the trainer's error lines from the job log of each site in trouble where the site
    streams it to the server (resources.json ``allow_log_streaming``); a site that keeps its log says where it is.
    """
    try:
        meta = sess.get_job_meta(job_id)
        logs = sess.get_job_logs(job_id, target="all").get("logs", {})
    except Exception as e:  # the server went away again: say so, the end status is known already
        return [f"(no site reasons: the server did not answer: {e})"]
    detail = meta.get("job_deploy_detail") or []  # ["server: OK", "<site>: NVFLARE_ERROR: ...", ...]
    refused = [d for d in detail if not d.endswith(": OK")]
    reasons = [d.replace("NVFLARE_ERROR: ", "") for d in refused]
    deployed = sorted(d.split(": ", 1)[0] for d in detail if d.endswith(": OK") and not d.startswith("server:"))
    errors = [line for line in server_lines if re.search(r" - (ERROR|WARNING) - ", line)]
    named = [s for s in deployed if any(re.search(rf"\b{re.escape(s)}\b", line) for line in errors)]
    reasons += [f"server: {_short(line)}" for line in errors if any(s in line for s in named)]
    for site in named or deployed:  # the sites the server blames, else every site that ran the job
        if site in logs:
            lines = [m.group(1) for m in map(TRAINER_ERROR.search, logs[site].splitlines()) if m]
            reasons += [f"{site}: {line}" for line in lines[-3:]]
        else:
            reasons.append(f"{site}: its job log stays on the site (not streamed to the server): "
                           f"{job_id}/log.txt in its workspace")  # fmt: skip
    return reasons


def _server_log_lines(sess, job_id: str) -> list:
    logs = sess.get_job_logs(job_id, target="server").get("logs", {})  # no log yet: empty
    text = logs.get("server", "")
    return text.splitlines() if isinstance(text, str) else []


def _short(line: str) -> str:
    # "2026-11-28 17:10:01,123 - IntimeModelSelector - INFO - [identity=..., ...]: message" -> time + message
    parts = line.split(" - ")
    message = parts[-1].split("]: ", 1)[-1]
    return f"{parts[0][11:19]} {message}" if len(parts) > 2 else line


def job_status(sess, job_id: str) -> str:
    from nvflare.fuel.flare_api.api_spec import JobNotFound

    try:
        status = sess.get_job_status(job_id)
    except JobNotFound:
        status = None
    if status is None:
        raise AdminError(f"job {job_id} does not exist on the server")
    return status


def kit_admin(kit: str) -> str:
    """The admin name of the startup kit ``kit`` (the name the server records as a job's ``submitter_name``)."""
    fed_admin = Path(kit) / "startup" / "fed_admin.json"
    try:
        return json.loads(fed_admin.read_text())["admin"]["username"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdminError(f"admin startup kit {kit}: no admin name in startup/fed_admin.json ({e}): run 'make provision'") from e


def latest_finished(sess, job_name: str, submitter: str) -> str:
    """The latest COMPLETED job named ``job_name`` that ``submitter`` submitted (job meta ``submitter_name``).

    Anyone with submit rights can submit a job under any name: a job of another submitter is never picked by name,
    only by its id (JOB_ID=).
    """
    named = [j for j in sess.list_jobs(detailed=True, name_prefix=job_name) if j.get("name") == job_name]
    if not named:
        raise AdminError(f"no job named {job_name} on the server: run 'make submit JOB={job_name}'")
    jobs = [j for j in named if j.get("submitter_name") == submitter]
    if not jobs:
        others = ", ".join(sorted({str(j.get("submitter_name") or "unknown") for j in named}))
        raise AdminError(
            f"no {job_name} job submitted by {submitter} (this kit's admin); the server has {len(named)} submitted by "
            f"{others}: fetch one of those only by its id, JOB_ID=<id> ('make status' lists the jobs)"
        )
    done = [j for j in jobs if j.get("status") == COMPLETED]
    if not done:
        latest = max(jobs, key=lambda j: j.get("submit_time", 0))
        raise AdminError(
            f"no finished {job_name} job of {submitter} yet (latest {latest['job_id']} is {latest.get('status')}); "
            f"wait with 'make submit ... WAIT=1' or pass JOB_ID="
        )
    return max(done, key=lambda j: j.get("submit_time", 0))["job_id"]


def check_job_id(sess, job_id: str, job_name: str, submitter: str) -> None:
    """A job given by id (JOB_ID=) is taken whoever submitted it, but it must be a ``job_name`` job."""
    try:
        meta = sess.get_job_meta(job_id) or {}
    except Exception as e:  # e.g. no such job: job_status says so in the operator's words
        job_status(sess, job_id)
        raise AdminError(f"cannot read job {job_id}'s meta from the server: {e}") from e
    name = meta.get("name")
    if name and name != job_name:
        raise AdminError(f"job {job_id} is a {name} job, not {job_name}: fetch it with JOB={name}")
    by = meta.get("submitter_name")
    if by and by != submitter:
        print(f"job {job_id} was submitted by {by}, not by this kit's admin {submitter}: fetched as its id says")


def fetch(kit: str, job_name: str, out: str, job_id: str = "", dest: str = "") -> Path:
    """Download a finished job and write ``out``: its best global model as a plain state_dict, its metrics,
    TensorBoard streams, update bytes and the model as a MONAI bundle (``bundle/``, see ops.bundle).

    Without ``job_id``: the latest finished ``job_name`` job that the kit's admin submitted. ``out`` is replaced as a
    whole (``fetch_into``); ``dest`` gets a copy of best_model.pt and best_model.json."""
    if not JOB_NAME.fullmatch(job_name):
        raise AdminError(f"JOB name {job_name!r} is not a job name: letters, digits, _ - (starting with a letter or digit)")
    if job_id and not JOB_ID.fullmatch(job_id):
        raise AdminError(f"JOB_ID={job_id!r} is not an NVFlare job id (a UUID: 8-4-4-4-12 hexadecimal digits)")
    submitter = kit_admin(kit)
    with session(kit) as sess, tempfile.TemporaryDirectory(prefix="fetch-") as tmp:
        if job_id:
            check_job_id(sess, job_id, job_name, submitter)
        else:
            job_id = latest_finished(sess, job_name, submitter)
        status = job_status(sess, job_id)
        if status != COMPLETED:
            raise AdminError(f"job {job_id} is {status}, not {COMPLETED}: nothing to fetch")
        # the job result: job/ (the job definition as submitted), meta.json and workspace/ (the server's run)
        result = Path(sess.download_job_result(job_id, destination=tmp))
        out_dir = Path(out)
        info = fetch_into(result, job_name, job_id, out_dir)
    if dest:
        copy_out(out_dir, Path(dest))
    print(f"best model of {job_name} job {job_id}: {out_dir / 'best_model.pt'}")
    print(f"  round {info['round']}, {info['key_metric']} = {info['value']} "
          f"(untrained initial model: {info['initial_value']})")  # fmt: skip
    print(f"  MONAI bundle: {out_dir / 'bundle'} (configs/metadata.json 'passport' says where it comes from)")
    return out_dir


def fetch_into(result: Path, job_name: str, job_id: str, out_dir: Path) -> dict:
    """Stage every fetched file of the downloaded ``result`` in a folder next to ``out_dir`` and swap it in
    (``swap_in``). Any error, or an interruption, leaves ``out_dir`` and ``out_dir.prev`` as they were and no
    staging folder behind. Returns best_model.json's content."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.fetch-", dir=out_dir.parent))  # 0700
    try:
        staged = holder / out_dir.name
        info = stage(result, job_name, job_id, staged)
        swap_in(staged, out_dir)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    return info


def copy_out(out_dir: Path, dest: Path) -> None:
    """best_model.pt and best_model.json into ``dest`` (DEST=), each written whole (a temporary file renamed)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("best_model.pt", "best_model.json"):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest)
        os.close(fd)
        try:
            shutil.copyfile(out_dir / name, tmp)
            os.chmod(tmp, _mode(Path(name)))
            os.replace(tmp, dest / name)
        finally:
            Path(tmp).unlink(missing_ok=True)


def submitted_job(result: Path, job_name: str, job_id: str) -> JobConfig:
    """The job as submitted (the result's ``job/`` folder): its one app's configuration and code."""
    job_root = result / "job"
    apps = sorted(p.parent.parent for p in job_root.rglob(f"config/{SERVER_CONFIG}")) if job_root.is_dir() else []
    job_dirs = sorted({app.parent for app in apps})
    if len(job_dirs) != 1:
        found = "none" if not job_dirs else ", ".join(str(d.relative_to(result)) for d in job_dirs)
        raise AdminError(
            f"job {job_id}: the downloaded result has no single job definition under job/ (found {found}); "
            "cannot tell which network and settings it trained"
        )
    meta = job_dirs[0] / "meta.json"
    name = json.loads(meta.read_text()).get("name") if meta.is_file() else None
    if name and name != job_name:
        raise AdminError(f"job {job_id} is a {name} job, not {job_name}: fetch it with JOB={name}")
    try:
        return JobConfig.from_job_folder(job_dirs[0])
    except ValueError as e:
        raise AdminError(f"job {job_id}: {e}") from e


def stage(result: Path, job_name: str, job_id: str, staged: Path) -> dict:
    """Write every fetched file into ``staged`` from a downloaded job result; returns best_model.json's content."""
    job = submitted_job(result, job_name, job_id)
    try:
        network, key_metric = job.network, job.key_metric
    except ValueError as e:
        raise AdminError(f"job {job_id}: {e}") from e
    model_path = _find(result, "best_FL_global_model.pt")
    if model_path is None:
        raise AdminError(
            f"job {job_id} has no best model (best_FL_global_model.pt): the server keeps one only after a "
            f"round > 0 reports {key_metric or 'the key metric'}; run more rounds"
        )
    best_round, best_value = _best_from_log(result)
    tb_events = _find(result, "tb_events")
    staged.mkdir(mode=0o700)
    state_dict = _plain_state_dict(model_path, job, f"job {job_id}: {model_path.relative_to(result)}")
    import torch

    torch.save(state_dict, staged / "best_model.pt")
    info = {
        "job": job_name,
        "job_id": job_id,
        "round": best_round,
        "key_metric": key_metric,
        "value": best_value,
        "initial_value": _initial_metric(tb_events, key_metric),
        "network": network,
        "job_digest": job.digest(),
        "sha256": hashlib.sha256((staged / "best_model.pt").read_bytes()).hexdigest(),
        "nvflare_version": _nvflare_version(),
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    rounds = _find(result / "workspace", "rounds.json")  # the server's round record (app_server/); older jobs: none
    if rounds is not None:
        info.update(_round_record(rounds, job_id))
        shutil.copy(rounds, staged / "rounds.json")
    (staged / "best_model.json").write_text(json.dumps(info, indent=2) + "\n")
    cross_site = _find(result, "cross_val_results.json")
    if cross_site is not None:
        shutil.copy(cross_site, staged / "cross_site_val.json")
    update_bytes = _find(result, sparse_update.RESULT_FILE)  # bytes each site sent per round, dense vs sent
    if update_bytes is not None:
        shutil.copy(update_bytes, staged / sparse_update.RESULT_FILE)
    if tb_events is not None:
        shutil.copytree(tb_events, staged / "tensorboard")
    try:
        passport = bundle.passport_from_result(result, job, job_name, job_id)
        bundle.write_bundle(job, state_dict, passport, staged / "bundle", job_name=job_name)
    except bundle.BundleError as e:
        raise AdminError(f"job {job_id}: no MONAI bundle: {e}") from e
    return info


def swap_in(staged: Path, out_dir: Path) -> None:
    """Make the complete set ``staged`` the fetched set ``out_dir`` with one rename; the set it replaces becomes
    ``out_dir.prev`` (one generation is kept: an older .prev goes). Called only once ``staged`` is complete.

    Where the system can (Linux renameat2 RENAME_EXCHANGE) the two folders are exchanged atomically, so ``out_dir``
    always holds a complete set; elsewhere the earlier set steps aside just before the rename (and comes back if
    the rename fails). Weight files become 0600, other files 0644, folders 0755 (``_mode``).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _set_modes(staged)
    prev = out_dir.with_name(out_dir.name + ".prev")
    holder = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.swap-", dir=out_dir.parent))  # same filesystem as out_dir
    try:
        if os.stat(staged).st_dev != os.stat(out_dir.parent).st_dev:  # a rename cannot cross filesystems
            shutil.move(str(staged), str(holder / "new"))
            staged = holder / "new"
        if not out_dir.exists() and not out_dir.is_symlink():
            os.rename(staged, out_dir)
            return
        if _exchange(staged, out_dir):
            old = staged  # out_dir is the new set; the earlier set is where staged was
        else:
            old = holder / "old"
            os.rename(out_dir, old)
            try:
                os.rename(staged, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
        if prev.exists() or prev.is_symlink():
            os.rename(prev, holder / "older")  # removed with holder below
        os.rename(old, prev)
        for weights in (p for p in prev.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
            weights.chmod(0o600)  # a set fetched before weight files were owner-only
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Exchange two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem or kernel without the exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _mode(path: Path) -> int:
    return 0o600 if path.suffix in WEIGHT_SUFFIXES else 0o644


def _set_modes(root: Path) -> None:
    """Weight files owner-only (0600); summaries, TensorBoard events and bundle configs 0644; folders 0755."""
    os.chmod(root, 0o755)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(Path(folder) / d, 0o755)
        for f in files:
            os.chmod(Path(folder) / f, _mode(Path(f)))


def load_weights(model_path: Path, label: str = ""):
    """torch.load ``model_path`` as weights only: tensors, numeric numpy arrays, bytes (CKKS ciphertexts) and plain
    values. A file that needs anything else (a pickle that would call a function, e.g. os.system) is refused naming
    the file, before any of it runs."""
    import numpy as np
    import torch

    label = label or str(model_path)
    reconstruct = np._core.multiarray._reconstruct  # numpy 2's name; files saved with numpy 1 use numpy.core's
    numpy_arrays = [np.ndarray, np.dtype, reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct")]
    numpy_arrays += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                                 np.int64, np.uint8, np.bool_)]  # fmt: skip
    try:
        with torch.serialization.safe_globals(numpy_arrays), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the refusal below says what matters
            ckpt = torch.load(model_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a global or an instruction that weights-only loading does not allow
        text = str(e)
        why = re.search(r"(?:WeightsUnpickler error:\s*|Trying to load )([^\n]+)", text)
        raise AdminError(
            f"{label} refused: it is not a weights-only checkpoint (tensors, numeric arrays and plain values), "
            f"its pickle asks for more ({why.group(1).strip() if why else text.splitlines()[0][:200]}); "
            "nothing in it was run"
        ) from None
    except Exception as e:  # not a torch.save file at all (truncated, another format)
        raise AdminError(f"{label} is not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    weights = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    if not isinstance(weights, dict) or not weights:
        raise AdminError(f"{label} holds no model weights (a dict of tensors, or one under 'model')")
    for key, value in weights.items():
        numeric = isinstance(value, np.ndarray) and value.dtype.kind in "biuf"
        if not (torch.is_tensor(value) or numeric or isinstance(value, bytes)):
            raise AdminError(f"{label}: weight {key!r} is a {type(value).__name__}, not a tensor")
    return weights


def _plain_state_dict(model_path: Path, job: JobConfig, label: str = "") -> dict:
    import numpy as np
    import torch

    weights = load_weights(model_path, label)
    if any(isinstance(v, bytes) for v in weights.values()):
        raise AdminError(
            f"{model_path.name} holds CKKS ciphertexts (a job run with profiles/he.json): the server never sees "
            "the plaintext model; only a site's client_context.tenseal can decrypt it"
        )
    state_dict = {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for k, v in weights.items()}
    try:
        net = job.build_network()
    except (ImportError, AttributeError, TypeError) as e:
        raise AdminError(f"cannot build the job's network {job.network['path']}: {e}") from e
    try:
        net.load_state_dict(state_dict, strict=True)  # proves it loads before anything is written
    except RuntimeError as e:
        raise AdminError(f"{model_path.name} does not load into the job's network {job.network['path']}: {e}") from e
    return net.state_dict()


def _round_record(path: Path, job_id: str) -> dict:
    """From the server's rounds.json: which sites contributed to each round and which were missing, and the
    server restarts the job was resumed after (best_model.json's ``rounds`` and ``restarts``)."""
    try:
        record = json.loads(path.read_text())
        rounds = [{"round": r["round"], "contributed": r["contributed"], "missing": r["missing"]}
                  for r in record["rounds"]]  # fmt: skip
        return {"rounds": rounds, "restarts": record.get("restarts", [])}
    except (ValueError, KeyError, TypeError) as e:
        raise AdminError(f"job {job_id}: its {path.name} is not a round record ({type(e).__name__}: {e})") from e


def _best_from_log(result: Path):
    log = _find(result, "log.txt")
    matches = BEST.findall(log.read_text()) if log else []
    if not matches:
        return None, None
    rnd, value = matches[-1]
    return int(rnd), float(value)


def _initial_metric(tb_events, key_metric: str):
    """Mean over sites of the key metric of the initial global model (round 0), from the sites' TensorBoard streams."""
    if tb_events is None:
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for site_dir in sorted(p for p in Path(tb_events).iterdir() if p.is_dir()):
        events = EventAccumulator(str(site_dir))
        events.Reload()
        if key_metric in events.Tags().get("scalars", []):
            values.append(min(events.Scalars(key_metric), key=lambda e: e.step).value)
    return sum(values) / len(values) if values else None


def _find(root: Path, name: str):
    hits = sorted(root.rglob(name))
    return hits[0] if hits else None


def _nvflare_version() -> str:
    from importlib.metadata import version

    return version("nvflare")


def status(kit: str) -> None:
    with session(kit) as sess:
        info = sess.get_system_info()
        print(f"server: {info.server_info}")
        for c in info.client_info:
            print(f"client: {c.name} (last connected {datetime.fromtimestamp(c.last_connect_time):%H:%M:%S})")
        jobs = sess.list_jobs(detailed=True)
        for j in sorted(jobs, key=lambda j: j.get("submit_time", 0))[-10:]:
            print(f"job {j['job_id']} {j.get('name')}: {j.get('status')} (submitted {j.get('submit_time_iso', '')[:19]})")


def _seconds(text: str) -> float:
    """A TIMEOUT value: a whole number of seconds > 0."""
    if not re.fullmatch(r"[1-9][0-9]*", text):
        raise argparse.ArgumentTypeError(f"TIMEOUT must be a whole number of seconds > 0, not {text!r}")
    return float(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flare_admin")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit")
    s.add_argument("--kit", required=True)
    s.add_argument("--job-dir", required=True)
    s.add_argument("--wait", action="store_true")
    s.add_argument("--timeout", type=_seconds, help="with --wait: stop following after this many seconds")
    w = sub.add_parser("wait")
    w.add_argument("--kit", required=True)
    w.add_argument("--job-id", required=True)
    w.add_argument("--timeout", type=_seconds, help="stop following after this many seconds (default: no limit)")
    ab = sub.add_parser("abort")
    ab.add_argument("--kit", required=True)
    ab.add_argument("--job-id", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--kit", required=True)
    f.add_argument("--job", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--job-id", default="")
    f.add_argument("--dest", default="")
    st = sub.add_parser("status")
    st.add_argument("--kit", required=True)
    ds = sub.add_parser("disable-site")
    ds.add_argument("--kit", required=True)
    ds.add_argument("--site", required=True)
    a = p.parse_args(argv)
    try:
        if a.cmd == "submit":
            submit(a.kit, a.job_dir, a.wait, a.timeout)
        elif a.cmd == "wait":
            follow(a.kit, a.job_id, a.timeout)
        elif a.cmd == "abort":
            abort(a.kit, a.job_id)
        elif a.cmd == "fetch":
            fetch(a.kit, a.job, a.out, a.job_id, a.dest)
        elif a.cmd == "disable-site":
            disable_site(a.kit, a.site)
        else:
            status(a.kit)
    except AdminError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
