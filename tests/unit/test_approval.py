"""The site approves the code that runs on its data (issue 13, item 2), on real parts: a job built as submit builds
it (scripts/approve.sh, which prints and records its digest), signed by the lead's admin key as NVFlare's admin
client signs a submitted job, zipped as NVFlare's job store sends an app, and deployed by the site's
ApprovingAppDeployer into a site workspace of a real provisioned kit (NVFlare's deployer checks the signature
against the kit's root CA). The roles the same provisioning writes come from provision/project.yml."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContextManager
from nvflare.apis.workspace import Workspace
from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes
from nvflare.lighter.tool_consts import NVFLARE_SIG_FILE, NVFLARE_SUBMITTER_CRT_FILE
from nvflare.lighter.utils import load_private_key_file, sign_folders

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "custom"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hcls.job_config import folder_digest  # noqa: E402
from site_privacy import approval, components  # noqa: E402
from site_privacy.approval import APPROVED_FILE, ApprovingAppDeployer, app_digest  # noqa: E402
from test_site_privacy import POLICY, SiteEngine  # noqa: E402

TINY = str(REPO / "tests" / "tiny_cxr_profile.json")
LEAD = "lead@hospital-a.org"


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Provisioned kits (scripts/provision.sh, project.yml) and the tiny CXR job approved with scripts/approve.sh
    into a private site_configs: {env, kits, job (the built job folder), digest (as approve.sh printed it)}."""
    root = tmp_path_factory.mktemp("approval")
    env = dict(os.environ, HCLS_WORKSPACE=str(root / "workspace"), HCLS_SITE_CONFIGS=str(root / "site_configs"))
    run = lambda *args: subprocess.run([str(REPO / "scripts" / args[0]), *args[1:]], env=env, cwd=REPO,  # noqa: E731
                                       capture_output=True, text=True, check=True, timeout=300).stdout  # fmt: skip
    kits = Path(re.search(r"startup kits: (\S+)", run("provision.sh")).group(1))
    out = run("approve.sh", "cxr_classification", TINY, "hospital_a")
    digest = re.search(r"^cxr_classification: app 'app' sha256 ([0-9a-f]{64})$", out, re.M).group(1)
    job = root / "workspace" / "jobs" / "cxr_classification"
    return {"env": env, "kits": kits, "job": job, "digest": digest, "root": root, "run": run}


def submitted(job: Path, kits: Path, dest: Path, change=None) -> Path:
    """A copy of a built job as the admin client submits it: signed in every folder with the lead's key and
    certificate (sign_folders, as nvflare.fuel.hci.client.file_transfer push_folder does)."""
    shutil.copytree(job, dest)
    if change:
        change(dest)
    startup = kits / LEAD / "startup"
    sign_folders(str(dest), load_private_key_file(str(startup / "client.key")), str(startup / "client.crt"))
    return dest


def site_workspace(kits: Path, root: Path, approvals=None) -> Path:
    """A site workspace with hospital_a's kit (startup/: root CA) and, unless None, local/approved_jobs.json."""
    ws = root / "hospital_a"
    shutil.copytree(kits / "hospital_a" / "startup", ws / "startup")
    (ws / "local").mkdir()
    if approvals is not None:
        text = approvals if isinstance(approvals, str) else json.dumps(approvals)
        (ws / "local" / APPROVED_FILE).write_text(text)
    return ws


def deploy(ws: Path, job: Path, job_id: str = "job-1", name: str = "cxr_classification") -> str:
    """ApprovingAppDeployer.deploy of the job's app, zipped as NVFlare's job store sends it to a site."""
    workspace = Workspace(str(ws), "hospital_a")
    ctx = FLContextManager(engine=SiteEngine(ws), identity_name="hospital_a").new_context()
    meta = {"name": name, "submitter_name": LEAD, "submitter_org": "hospital_a", "submitter_role": "lead"}
    return ApprovingAppDeployer().deploy(workspace, job_id, meta, "app", zip_directory_to_bytes(str(job / "app"), ""), ctx)


def job_ctx(ws: Path, job_id: str, name: str):
    stickers = {ReservedKey.RUN_NUM: job_id, FLContextKey.JOB_META: {"name": name},
                FLContextKey.EFFECTIVE_JOB_SCOPE_NAME: "hospital_policy", FLContextKey.SCOPE_PROPERTIES: POLICY}  # fmt: skip
    return FLContextManager(engine=SiteEngine(ws), identity_name="hospital_a", private_stickers=stickers).new_context()


# ------------------------------------------------------------ the digest


def test_the_digest_leaves_out_signing_files_and_pycache_and_is_the_jobs_own(federation, tmp_path):
    job = submitted(federation["job"], federation["kits"], tmp_path / "signed")
    app = job / "app"
    assert (app / NVFLARE_SIG_FILE).is_file() and (app / "custom" / NVFLARE_SUBMITTER_CRT_FILE).is_file()
    (app / "custom" / "__pycache__").mkdir()
    (app / "custom" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert app_digest(app) == app_digest(federation["job"] / "app") == federation["digest"]
    # The job's own copy of the recipe (hcls.job_config.folder_digest: best_model.json's job_digest) agrees.
    assert folder_digest(app) == folder_digest(federation["job"] / "app") == federation["digest"]
    config = app / "config" / "config_fed_client.json"
    config.write_bytes(config.read_bytes().replace(b"1", b"2", 1))  # one byte
    assert app_digest(app) == folder_digest(app) != federation["digest"]


def test_approve_records_the_digest_in_the_sites_file_only(federation):
    configs = Path(federation["env"]["HCLS_SITE_CONFIGS"])
    assert json.loads((configs / "site_hospital_a" / APPROVED_FILE).read_text()) == {
        "cxr_classification": [federation["digest"]]}  # fmt: skip
    assert not (configs / "site_hospital_b").exists()  # SITE=hospital_a
    again = federation["run"]("approve.sh", "cxr_classification", TINY, "hospital_a")
    assert "already approved in" in again  # built again: the same digest


# ------------------------------------------------------------ the deployer


def test_an_approved_signed_job_is_deployed_and_keeps_its_approved_name(federation, tmp_path):
    """A job approved as cxr_classification whose meta calls it ct_segmentation: deployed (its signature checked
    by NVFlare's deployer), and its identity at the site is the approved name, fixed when the run starts."""
    approvals = json.loads((Path(federation["env"]["HCLS_SITE_CONFIGS"]) / "site_hospital_a" / APPROVED_FILE).read_text())
    ws = site_workspace(federation["kits"], tmp_path, approvals)
    job = submitted(federation["job"], federation["kits"], tmp_path / "signed")
    assert deploy(ws, job, "job-ok", name="ct_segmentation") == ""
    app = Path(Workspace(str(ws), "hospital_a").get_app_dir("job-ok"))
    assert (app / "config" / "config_fed_client.json").is_file() and app_digest(app) == federation["digest"]
    ctx = job_ctx(ws, "job-ok", "ct_segmentation")
    components.OutgoingEventGuard().handle_event(EventType.START_RUN, ctx)
    assert components.job_identity(ctx) == "cxr_classification"
    (app / "custom" / "written_by_the_job.py").write_text("")  # later: the name stays the one approved at start
    assert components.job_identity(ctx) == "cxr_classification"
    with pytest.raises(ValueError, match="is not in local/approved_jobs.json"):
        approval.approved_job_name(ctx, refresh=True)  # a new start would see an app the site did not approve


def test_a_job_with_one_changed_byte_is_refused_before_it_runs(federation, tmp_path):
    ws = site_workspace(federation["kits"], tmp_path, {"cxr_classification": [federation["digest"]]})

    def change(job):
        config = job / "app" / "config" / "config_fed_client.json"
        config.write_text(config.read_text().replace('"num_workers"', ' "num_workers"', 1))

    job = submitted(federation["job"], federation["kits"], tmp_path / "changed", change)
    digest = app_digest(job / "app")
    err = deploy(ws, job, "job-bad")
    assert err == (f"job code not approved at hospital_a: app sha256 {digest} (job 'cxr_classification') "
                   "is not in local/approved_jobs.json")  # fmt: skip
    assert not Path(Workspace(str(ws), "hospital_a").get_run_dir("job-bad")).exists()  # nothing of it is left


def test_a_site_without_approvals_refuses_every_job(federation, tmp_path):
    ws = site_workspace(federation["kits"], tmp_path)
    err = deploy(ws, submitted(federation["job"], federation["kits"], tmp_path / "signed"))
    assert err.endswith(f"app sha256 {federation['digest']} (job 'cxr_classification') is not in "
                        "local/approved_jobs.json (the site has none)")  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "approved_jobs.json: not valid JSON"),
        ('["cxr_classification"]', "approved_jobs.json: must be an object mapping job names to lists of app sha256"),
        ('{"cxr_classification": "DIGEST"}', "approved_jobs.json: field 'cxr_classification' must be a list of app sha256"),
        ('{"cxr_classification": ["DIGEST", "abc"]}', "approved_jobs.json: field 'cxr_classification' must be a list"),
        ('{"cxr_classification": ["DIGEST"], "ct_segmentation": ["DIGEST"]}',
         "is approved under several job names (ct_segmentation, cxr_classification)"),
    ],
    ids=["bad_json", "not_an_object", "not_a_list", "not_a_digest", "two_names"],
)  # fmt: skip
def test_an_unreadable_approvals_file_refuses_naming_the_file_and_field(federation, tmp_path, text, message):
    ws = site_workspace(federation["kits"], tmp_path, text.replace("DIGEST", federation["digest"]))
    err = deploy(ws, submitted(federation["job"], federation["kits"], tmp_path / "signed"))
    assert err.startswith(f"job code not approved at hospital_a: app sha256 {federation['digest']}"), err
    assert str(ws / "local" / APPROVED_FILE) in err and message in err, err


def test_the_components_identity_fails_closed_without_approval(federation, tmp_path):
    ws = site_workspace(federation["kits"], tmp_path, {})
    app = Path(Workspace(str(ws), "hospital_a").get_app_dir("job-x"))
    shutil.copytree(federation["job"] / "app", app)
    with pytest.raises(ValueError, match=f"app sha256 {federation['digest']} \\(job 'cxr_classification'\\)"):
        components.job_identity(job_ctx(ws, "job-x", "cxr_classification"))


# ------------------------------------------------------------ roles


def test_provisioning_writes_the_roles_of_project_yml_not_nvflares_default(federation):
    project = yaml.safe_load((REPO / "provision" / "project.yml").read_text())
    builder = next(b for b in project["builders"] if b["path"] == "ops.kit_builder.AuthorizationBuilder")
    for participant in ("flare-server", "hospital_a", "hospital_b"):
        local = federation["kits"] / participant / "local"
        policy = json.loads((local / "authorization.json").read_text())
        assert policy == {"format_version": "1.0", "permissions": builder["args"]["permissions"]}
        assert not (local / "authorization.json.default").exists()
    permissions = builder["args"]["permissions"]
    assert permissions["project_admin"] == "any"
    assert permissions["org_admin"]["submit_job"] == permissions["org_admin"]["byoc"] == "none"
    assert permissions["lead"]["submit_job"] == permissions["lead"]["byoc"] == "any"
    assert permissions["lead"]["manage_job"] == "n:submitter" and permissions["org_admin"]["operate"] == "o:site"
