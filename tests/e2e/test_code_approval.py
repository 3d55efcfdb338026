"""The site approves the code that runs on its data (issue 13, item 2), in the real federation: each site's
ApprovingAppDeployer (local/resources.json) refuses a job whose app digest its local/approved_jobs.json does not
list, before any of the job's code runs, and a job approved under one name is that job at the site whatever its
meta.json calls it."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO, approve, run

sys.path.insert(0, str(REPO / "custom"))
from site_privacy.approval import app_digest  # noqa: E402

TINY = json.loads((REPO / "tests" / "tiny_cxr_profile.json").read_text())  # 2 rounds, 32 px
SHORT = {**TINY, "server": {**TINY.get("server", {}), "num_rounds": 1}}
SITES = ("hospital_a", "hospital_b")


def built(env, tmp_path: Path, profile: dict) -> tuple[Path, Path]:
    """The CXR job built as submit builds it with ``profile``: (the profile file, a copy of the job folder)."""
    overlay = tmp_path / "profile.json"
    overlay.write_text(json.dumps(profile))
    job = tmp_path / "job"
    shutil.copytree(run("build_job.sh", "cxr_classification", str(overlay), env=env).stdout.strip(), job)
    return overlay, job


def site_ws(env, site: str) -> Path:
    return Path(env["HCLS_WORKSPACE"]) / "local" / site


def test_a_job_whose_code_the_sites_did_not_approve_is_refused_before_it_runs(deployed, env, tmp_path):
    """The tiny CXR job with one byte changed in its client configuration (a batch size of 9 instead of 8:
    harmless, but not the job the sites reviewed)."""
    _, job = built(env, tmp_path, SHORT)
    config = job / "app" / "config" / "config_fed_client.json"
    text = config.read_text()
    assert '"batch_size": 8' in text
    config.write_text(text.replace('"batch_size": 8', '"batch_size": 9', 1))
    digest = app_digest(job / "app")
    result = run("submit.sh", str(job), "", "1", env={**env, "TIMEOUT": "120"}, check=False)
    job_id = re.search(r"job id (\S+)", result.stdout).group(1)
    assert result.returncode != 0 and "FINISHED:FAILED_TO_RUN" in result.stdout, result.stdout[-3000:]
    for site in SITES:
        refusal = (f"job code not approved at {site}: app sha256 {digest} (job 'cxr_classification') "
                   "is not in local/approved_jobs.json")  # fmt: skip
        assert refusal in result.stdout, result.stdout[-3000:]  # the submitter sees which digest each site refused
        log = (site_ws(env, site) / "log.txt").read_text(errors="replace")
        assert f"refused job {job_id}: {refusal}" in log  # the site's log says why
        assert not (site_ws(env, site) / job_id).exists()  # nothing deployed is left, no job process ran
        assert "checked as" not in "\n".join(line for line in log.splitlines() if job_id in line)


def test_a_job_approved_under_one_name_is_that_job_whatever_its_meta_says(deployed, env, tmp_path):
    overlay, job = built(env, tmp_path, SHORT)
    digest = approve(env, "cxr_classification", overlay)  # the sites reviewed and approved the CXR job's code
    for site in SITES:  # written into the running sites: read for each job, no restart
        ensure = subprocess.run([str(site_ws(env, site) / "flarectl.sh"), "ensure"], capture_output=True, text=True)
        assert ensure.returncode == 0 and f"{site} up to date" in ensure.stdout, ensure.stdout + ensure.stderr
    meta = json.loads((job / "meta.json").read_text())
    (job / "meta.json").write_text(json.dumps({**meta, "name": "ct_segmentation"}))  # it calls itself another job
    assert app_digest(job / "app") == digest
    result = run("submit.sh", str(job), "", "1", env={**env, "TIMEOUT": "300"}, check=False)
    job_id = re.search(r"job id (\S+)", result.stdout).group(1)
    assert "FINISHED:COMPLETED" in result.stdout, result.stdout[-3000:]
    for site in SITES:
        log = (site_ws(env, site) / "log.txt").read_text(errors="replace")
        assert f"job {job_id}: app approved as 'cxr_classification' (job 'ct_segmentation')" in log
        job_log = (site_ws(env, site) / job_id / "log.txt").read_text(errors="replace")
        assert (f"job {job_id} is checked as 'cxr_classification', the job the site approved its code as "
                "(its meta name: 'ct_segmentation')") in job_log  # fmt: skip
        assert "privacy policy: blocked" not in job_log
