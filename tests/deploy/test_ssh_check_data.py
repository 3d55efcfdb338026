"""`make check-data` over real SSH (see conftest.py): a job's own data check runs on a deployed site host as the
job user flare-job (as the trainers run), from the host's venv, with the host's local/site_config.json and its data
under /opt/data; only the summary comes back, the temporary copy of the job is removed, and the running participant
is untouched."""

import json
import re
from pathlib import Path

import testinfra
from .conftest import run


def running_pids(env) -> dict:
    return dict(re.findall(r"(\S+) running \(pid (\d+)[ )]", run("control.sh", "status", env=env).stdout))


def test_check_data_runs_on_the_site_host_as_the_job_user(deployed):
    env = deployed["env"]
    before = running_pids(env)
    result = run("check_data.sh", "hospital_a", "cxr_classification", env=env)
    assert "== hospital_a cxr_classification: ok" in result.stdout, result.stdout + result.stderr
    saved = json.loads((Path(env["HCLS_WORKSPACE"]) / "check-data" / "hospital_a" / "cxr_classification.json").read_text())
    assert saved["ok"] and saved["errors"] == [] and saved["splits"]["training"]["images"] > 0
    assert "/opt/" not in json.dumps(saved)  # no host path: files are named from the dataset folder on
    host = testinfra.get_host(f"ansible://hospital_a?ansible_inventory={deployed['inventory']}")
    ws = "/opt/hcls-flare/hospital_a"
    assert host.run(f"ls -d {ws}/check-data.*/").rc != 0  # the temporary copy of the job is gone
    log = host.file(f"{ws}/check-data.cxr_classification.log")  # the check's other output stays on the host
    assert log.user == "flare" and log.mode == 0o600  # the site's, readable by no one else
    # The check is the job's code: it ran as the job user (README "Job code and the site's files"), in group flare.
    assert "check-data: custom/cxr_classification.py runs as flare-job (uid 2711, groups 2711 2710)" in log.content_string
    after = running_pids(env)
    assert after["hospital_a"] == before["hospital_a"], (before, after)
