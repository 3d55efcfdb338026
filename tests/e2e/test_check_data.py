"""`make check-data` on the local federation (scripts/check_data.sh over the local inventory, Ansible with a
local connection): each job's own data check runs in the deployed site's workspace with the site's rendered
local/site_config.json, trains nothing, brings back only its summary (no path, no patient id), fails naming the
file and the row of bad data, and leaves the running participants alone."""

import json
import re
from pathlib import Path

from .conftest import REPO, run

PATIENT_ID = re.compile(r"patient\d{3,}|MRN-[A-Z]*\d+|\d+(\.\d+){4,}", re.I)  # CXR folders and MRNs, series uids
ABSOLUTE_PATH = re.compile(r"(^|[\s'\"(=:,])/[\w.~-]")


def printed_summaries(out: str) -> dict:
    """{job: summary} from check_data.sh's stdout: a line '== SITE JOB: status', then the job's JSON summary."""
    decoder, found = json.JSONDecoder(), {}
    for header in re.finditer(r"^== \S+ (\S+): .*\n", out, re.M):
        found[header.group(1)], _ = decoder.raw_decode(out, header.end())
    return found


def strings(value) -> list[str]:
    """Every key and string value of a JSON document."""
    if isinstance(value, dict):
        return [*value, *(s for v in value.values() for s in strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def running(env) -> dict:
    """{participant: pid} of the running participants (scripts/control.sh status)."""
    return dict(re.findall(r"(\S+) running \(pid (\d+)\)", run("control.sh", "status", env=env).stdout))


def dataset_dir(env, site: str, job: str) -> Path:
    config = json.loads((REPO / "site_configs" / f"site_{site}" / "local_config.json").read_text())
    return Path(env["HCLS_WORKSPACE"]) / "data" / site / config["datasets"][job]


def assert_private(summary: dict, env):
    """No absolute path (host, workspace or data) and no patient identifier anywhere in a summary."""
    text = json.dumps(summary)
    assert env["HCLS_WORKSPACE"] not in text and not PATIENT_ID.search(text), text
    assert not [s for s in strings(summary) if ABSOLUTE_PATH.search(s)], text


def test_check_data_of_one_job_on_one_site(deployed, env):
    before = running(env)
    assert len(before) == 3, before
    out = run("check_data.sh", "hospital_b", "cxr_classification", env=env).stdout
    saved = json.loads((Path(env["HCLS_WORKSPACE"]) / "check-data" / "hospital_b" / "cxr_classification.json").read_text())
    assert printed_summaries(out) == {"cxr_classification": saved}, out
    assert "== hospital_b cxr_classification: ok" in out and "check-data hospital_b: ok" in out
    assert saved["ok"] and saved["errors"] == []
    assert saved["dataset"] == dataset_dir(env, "hospital_b", "cxr_classification").name  # the deployed site config
    assert saved["splits"]["training"]["images"] > 0 and saved["splits"]["validation"]["images"] > 0
    assert_private(saved, env)
    assert env["HCLS_WORKSPACE"] not in out  # nor in what it printed
    # The temporary copy of the job is gone; the participants were not touched.
    assert not list((Path(env["HCLS_WORKSPACE"]) / "local" / "hospital_b").glob("check-data.*/"))
    assert running(env) == before


def test_a_bad_row_fails_the_check_naming_file_and_row_after_every_job(deployed, env):
    """A label value outside {1, 0, -1, blank} appended to hospital_a's CXR training CSV (restored afterwards):
    every job's summary is printed and saved, the CXR one names the file, row and column, the exit status is 1."""
    before = running(env)
    csv = dataset_dir(env, "hospital_a", "cxr_classification") / "train.csv"
    original = csv.read_bytes()
    lines = original.decode().splitlines()
    header, last = lines[0].split(","), lines[-1].split(",")
    column = header.index("Atelectasis")
    bad = [*last[:column], "2.0", *last[column + 1:]]
    try:
        csv.write_text("\n".join([*lines, ",".join(bad)]) + "\n")
        result = run("check_data.sh", "hospital_a", env=env, check=False)
    finally:
        csv.write_bytes(original)
    assert result.returncode == 1, result.stdout + result.stderr
    printed = printed_summaries(result.stdout)
    jobs = sorted(p.parent.name for p in (REPO / "job_configs").glob("*/job.json"))
    assert sorted(printed) == jobs, result.stdout
    saved_dir = Path(env["HCLS_WORKSPACE"]) / "check-data" / "hospital_a"
    for job, summary in printed.items():
        assert json.loads((saved_dir / f"{job}.json").read_text()) == summary
        assert {"job", "ok", "errors"} <= set(summary) and summary["job"] == job
        assert_private(summary, env)
    cxr = printed["cxr_classification"]
    assert not cxr["ok"] and "== hospital_a cxr_classification: FAILED" in result.stdout
    assert {"file": f"{csv.parent.name}/train.csv", "row": len(lines) + 1, "column": "Atelectasis"}.items() \
        <= cxr["errors"][0].items(), cxr["errors"]  # fmt: skip
    assert printed["lung_nodule_detection"]["ok"], printed["lung_nodule_detection"]
    assert re.search(r"^check-data hospital_a: failed: .*cxr_classification", result.stdout, re.M)
    assert running(env) == before


def test_unknown_site_or_job_is_refused(env):
    server = run("check_data.sh", "flare-server", env=env, check=False)
    assert server.returncode == 1 and "unknown SITE 'flare-server'" in server.stderr and "hospital_a" in server.stderr
    job = run("check_data.sh", "hospital_a", "no_such_job", env=env, check=False)
    assert job.returncode == 1 and "unknown JOB 'no_such_job'" in job.stderr and "cxr_classification" in job.stderr
