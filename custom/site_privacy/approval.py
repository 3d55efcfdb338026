"""The site approves the code that runs on its data (issue 13, item 2).

A site lists the job code it accepts in ``<site workspace>/local/approved_jobs.json`` (deployment copies it there
from ``site_configs/site_<name>/approved_jobs.json``; ``make approve`` records a built job's digest)::

    {"cxr_classification": ["<sha256 of the job's app folder>", ...], ...}

* ``ApprovingAppDeployer`` (the client's ``app_deployer`` component, ``local/resources.json``) deploys a job's
  app as NVFlare's own deployer does (signature, authorization, privacy scope), then computes the app's digest
  (``app_digest``) and refuses the job, removing what it deployed, unless the site approves that digest: nothing of
  the job has run yet. The refusal names the digest; the site logs it and the server records it in the job's
  ``job_deploy_detail`` (``make submit WAIT=1`` and ``make wait`` print it).
* ``approved_job_name``: in the job process, the name under which the site approves the deployed app; the job's
  identity for the site's privacy checks (``components.job_identity``), never the name the job gives itself.
  It is computed when the run starts, before any task reaches a trainer, and kept for the job.

A missing file approves nothing (fail closed); a file that cannot be read refuses every job, naming the file and
the field. The file is read for each job: a new approval needs no restart of the site.

``python -m site_privacy.approval record JOB_DIR NAME FILE...`` (scripts/approve.sh) prints the digest of each
app a built job deploys to sites and adds it under NAME to each approvals FILE.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from nvflare.apis.app_deployer_spec import AppDeployerSpec
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey
from nvflare.apis.workspace import Workspace
from nvflare.private.fed.utils.app_deployer import AppDeployer

APPROVED_FILE = "approved_jobs.json"  # in the site's local/ folder
# NVFlare's signature files, which the admin client writes into every folder of a job it submits signed
# (nvflare.lighter.tool_consts NVFLARE_SIG_FILE, NVFLARE_SUBMITTER_CRT_FILE): not part of the job's code.
SIGNING_FILES = frozenset({".__nvfl_sig.json", ".__nvfl_submitter.crt"})
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

_names: dict[str, str] = {}  # job id -> the name the site approves its app under (this job process)


def app_digest(app_dir: Path) -> str:
    """sha256 over every file of a job's app folder: per file its path relative to the folder (posix), a zero byte,
    and the sha256 of its content, in path order; ``__pycache__`` and NVFlare's signature files left out.
    hcls.job_config.folder_digest is the same recipe (job code imports nothing of the site's)."""
    app_dir = Path(app_dir)
    files = sorted(
        (p.relative_to(app_dir).as_posix(), p)
        for p in app_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name not in SIGNING_FILES
    )
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def approvals_file(workspace: Workspace) -> Path:
    return Path(workspace.get_site_config_dir()) / APPROVED_FILE


def read_approvals(path: Path) -> dict[str, list[str]]:
    """{job name: [digest, ...]} of an approvals file; {} when there is none; ValueError naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ValueError(f"{path}: cannot read the site's approved jobs: {err}") from err
    try:
        approvals = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(approvals, dict):
        raise ValueError(f"{path}: must be an object mapping job names to lists of app sha256 digests, "
                         f"not {type(approvals).__name__}")  # fmt: skip
    for name, digests in approvals.items():
        if not isinstance(digests, list) or not all(isinstance(d, str) and _DIGEST.match(d) for d in digests):
            raise ValueError(f"{path}: field '{name}' must be a list of app sha256 digests (64 lower-case "
                             f"hexadecimal digits), got {json.dumps(digests)[:120]}")  # fmt: skip
    return approvals


def approved_name(approvals: dict[str, list[str]], digest: str, source: str) -> str | None:
    """The job name the site approves ``digest`` under; None when none; ValueError when several (ambiguous)."""
    names = sorted(name for name, digests in approvals.items() if digest in digests)
    if len(names) > 1:
        raise ValueError(f"{source}: app sha256 {digest} is approved under several job names ({', '.join(names)})")
    return names[0] if names else None


def check_app(workspace: Workspace, app_dir: Path, claimed: str) -> tuple[str | None, str]:
    """(approved name, "") when the site approves the app in ``app_dir``, else (None, the reason)."""
    path = approvals_file(workspace)
    digest = app_digest(app_dir)
    try:
        name = approved_name(read_approvals(path), digest, str(path))
    except ValueError as err:
        return None, f"job code not approved at {workspace.site_name}: app sha256 {digest} (job '{claimed}'): {err}"
    if name is None:
        shown = f"local/{APPROVED_FILE}" if path.is_file() else f"local/{APPROVED_FILE} (the site has none)"
        return None, (f"job code not approved at {workspace.site_name}: app sha256 {digest} (job '{claimed}') "
                      f"is not in {shown}")  # fmt: skip
    return name, ""


class ApprovingAppDeployer(AppDeployerSpec, FLComponent):
    """NVFlare's client app deployer, then the site's approval of the deployed app's digest."""

    def deploy(
        self, workspace: Workspace, job_id: str, job_meta: dict, app_name: str, app_data: bytes, fl_ctx: FLContext
    ) -> str:
        err = AppDeployer().deploy(workspace, job_id, job_meta, app_name, app_data, fl_ctx)
        if err:
            return err
        claimed = str((job_meta or {}).get(JobMetaKey.JOB_NAME.value, ""))
        try:
            name, reason = check_app(workspace, Path(workspace.get_app_dir(job_id)), claimed)
        except OSError as err:  # the deployed app cannot be read: refuse
            name, reason = None, f"job code not approved at {workspace.site_name}: cannot read the deployed app: {err}"
        if name is None:
            shutil.rmtree(workspace.get_run_dir(job_id), ignore_errors=True)
            self.log_error(fl_ctx, f"refused job {job_id}: {reason}", fire_event=False)
            return reason
        self.log_info(fl_ctx, f"job {job_id}: app approved as '{name}' (job '{claimed}')", fire_event=False)
        return ""


def approved_job_name(fl_ctx: FLContext, refresh: bool = False) -> str:
    """The name under which the site approves this job's deployed app (computed once per job process: at the start
    of the run, ``refresh``). ValueError when the site does not approve it."""
    job_id = fl_ctx.get_job_id()
    if refresh or job_id not in _names:
        _names.pop(job_id, None)
        workspace = fl_ctx.get_workspace()
        claimed = (fl_ctx.get_prop(FLContextKey.JOB_META) or {}).get(JobMetaKey.JOB_NAME.value, "")
        name, reason = check_app(workspace, Path(workspace.get_app_dir(job_id)), str(claimed))
        if name is None:
            raise ValueError(reason)
        _names[job_id] = name
    return _names[job_id]


# ------------------------------------------------------------ make approve (scripts/approve.sh)


def site_apps(job_dir: Path) -> list[str]:
    """The apps of a job folder that its meta.json deploys to sites (to @ALL or to a participant but the server)."""
    meta = json.loads((job_dir / "meta.json").read_text())
    deploy_map = meta.get("deploy_map") or {}
    apps = sorted(app for app, sites in deploy_map.items() if any(s != "server" for s in sites))
    if not apps:
        raise ValueError(f"{job_dir}/meta.json: its deploy_map sends no app to the sites")
    return apps


def record(approvals_path: Path, name: str, digests: list[str]) -> bool:
    """Add ``digests`` under ``name`` to an approvals file (created when missing); whether it changed."""
    approvals = read_approvals(approvals_path)
    known = approvals.setdefault(name, [])
    new = [d for d in digests if d not in known]
    if not new:
        return False
    known.extend(new)
    approvals_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = approvals_path.with_name(f".{approvals_path.name}.tmp")
    tmp.write_text(json.dumps(approvals, indent=2, sort_keys=True) + "\n")
    tmp.chmod(0o640)  # as deployment installs it
    os.replace(tmp, approvals_path)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m site_privacy.approval")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="print the digest of a built job's site apps and approve them under NAME")
    rec.add_argument("job_dir", type=Path)
    rec.add_argument("name")
    rec.add_argument("files", type=Path, nargs="*", help="approvals files (approved_jobs.json) to record into")
    args = parser.parse_args(argv)
    try:
        digests = []
        for app in site_apps(args.job_dir):
            digests.append(app_digest(args.job_dir / app))
            print(f"{args.name}: app '{app}' sha256 {digests[-1]}")
        for path in args.files:
            changed = record(path, args.name, digests)
            print(f"  {'approved in' if changed else 'already approved in'} {path}")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
