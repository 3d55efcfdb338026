"""A site joins and leaves the running federation of the SSH test hosts (conftest.py): `make add-site` adds a fourth
host as hospital_c (the others' deployed kits byte for byte the same, none restarted), a tiny job trains across the
three sites, `make remove-site` removes it (stopped for good; the server refuses its registration from then on), and
`make renew SITE=all` gives every participant a new certificate from the same root CA, one at a time (the server
first), after which a job trains again.

The test edits the repository's provision/project.yml and site_configs/ as a coordinator would, and puts both back
at the end, also on failure."""

import hashlib
import json
import re
import shutil

import pytest

from .conftest import HOSTS, REPO, SPARE_HOSTS, on_host, run

NEW = "hospital_c"
PROJECT = REPO / "provision" / "project.yml"
TINY_ONE_ROUND = {**json.loads((REPO / "tests" / "tiny_cxr_profile.json").read_text()), "server": {"num_rounds": 1}}


def kit_digests(deployed) -> dict:
    """sha256 of every file of each deployed participant's startup kit, as its host holds it."""
    digests = {}
    for name in HOSTS:
        kit = deployed["root"] / name / "opt" / "hcls-flare" / name / "startup"
        digests[name] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(kit.iterdir())}
    return digests


def main_pids(env) -> dict:
    return dict(re.findall(r"(\S+) running \(pid (\d+)[ )]", run("control.sh", "status", env=env).stdout))


@pytest.fixture
def coordinator_files():
    """provision/project.yml and site_configs/ as they were: restored afterwards."""
    project = PROJECT.read_bytes()
    try:
        yield project
    finally:
        PROJECT.write_bytes(project)
        shutil.rmtree(REPO / "site_configs" / f"site_{NEW}", ignore_errors=True)


def test_a_site_is_added_to_and_removed_from_the_running_federation(deployed, coordinator_files, tmp_path):
    env = deployed["env"]
    deployed["boot_spare"](NEW)
    shutil.copytree(deployed["root"] / "hospital_a" / "opt" / "data", deployed["root"] / NEW / "opt" / "data")
    kits, pids = kit_digests(deployed), main_pids(env)

    # Bad input first: nothing changes.
    exists = run("add_site.sh", "hospital_b", "hospital_b", "10.77.0.99", env=env, check=False)
    assert exists.returncode != 0 and "participants already has 'hospital_b'" in exists.stderr, exists.stderr
    unknown_org = run("add_site.sh", NEW, "nowhere", SPARE_HOSTS[NEW], env=env, check=False)
    assert unknown_org.returncode != 0 and "ORG='nowhere' is not an org of" in unknown_org.stderr
    server = run("remove_site.sh", "flare-server", env=env, check=False)
    assert server.returncode != 0 and "'flare-server' is a server, not a site" in server.stderr
    assert PROJECT.read_bytes() == coordinator_files and NEW not in deployed["inventory"].read_text()

    added = run("add_site.sh", NEW, "hospital_a", SPARE_HOSTS[NEW], env=env)
    print(added.stdout[-3000:])
    assert f"{NEW} added" in added.stdout
    assert (REPO / "site_configs" / f"site_{NEW}" / "local_config.json").exists()
    assert f"{NEW}:" in deployed["inventory"].read_text()
    assert on_host(deployed, NEW, f"/opt/hcls-flare/{NEW}/flarectl.sh status").returncode == 0
    # The others: kits byte for byte as they were, not restarted.
    assert kit_digests(deployed) == kits
    assert {k: v for k, v in main_pids(env).items() if k in pids} == pids

    # A job built now counts three sites; every site approves it, and the approvals reach the sites without a restart.
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(TINY_ONE_ROUND))
    run("approve.sh", "cxr_classification", profile, env=env)
    run("deploy.sh", env=env)
    assert kit_digests(deployed) == kits and {k: v for k, v in main_pids(env).items() if k in pids} == pids
    submitted = run("submit.sh", "cxr_classification", profile, "1", env=env, coordinator=True)
    assert "FINISHED:COMPLETED" in submitted.stdout, submitted.stdout[-4000:]
    assert "round 0: aggregated 3 of 3" in submitted.stdout, submitted.stdout[-4000:]

    removed = run("remove_site.sh", NEW, env=env, coordinator=True)
    print(removed.stdout[-2000:])
    assert f"{NEW}: disabled at the server" in removed.stdout and f"{NEW} removed" in removed.stdout
    assert NEW not in PROJECT.read_text() and f"{NEW}:" not in deployed["inventory"].read_text()
    unit = f"hcls-flare-{NEW}.service"
    assert on_host(deployed, NEW, f"systemctl is-active {unit}", check=False).stdout.strip() != "active"
    assert on_host(deployed, NEW, f"systemctl is-enabled {unit}", check=False).stdout.strip() == "disabled"
    server_ws = deployed["root"] / "flare-server" / "opt" / "hcls-flare" / "flare-server"
    assert json.loads((server_ws / "disabled_clients.json").read_text())["disabled_clients"] == [NEW]
    # Its kit still holds a valid certificate: started by hand, it is refused at registration.
    on_host(deployed, NEW, f"systemctl start {unit}")
    log = server_ws / "log.txt"
    refused = f"Reject disabled client registration: {NEW}"
    for _ in range(60):
        if refused in log.read_text(errors="replace"):
            break
        on_host(deployed, NEW, "sleep 1")
    assert refused in log.read_text(errors="replace")
    on_host(deployed, NEW, f"systemctl stop {unit}")
    assert {k: v for k, v in main_pids(env).items() if k in pids} == pids

    # Every certificate renewed, the root CA the same; a job trains again.
    run("approve.sh", "cxr_classification", profile, env=env)  # two sites again: another job digest
    renewed = run("renew.sh", "all", env=env)
    print(renewed.stdout[-2000:])
    # The server first: the sites' session tokens carry its old key's signature, their restart registers them again.
    assert [line.split(":")[0] for line in renewed.stdout.splitlines() if line.endswith("renewed and deployed")] == [
        "flare-server", "hospital_a", "hospital_b"]
    now = kit_digests(deployed)
    for name, cert in (("flare-server", "server.crt"), ("hospital_a", "client.crt"), ("hospital_b", "client.crt")):
        assert now[name]["rootCA.pem"] == kits[name]["rootCA.pem"] and now[name][cert] != kits[name][cert], name
    again = run("submit.sh", "cxr_classification", profile, "1", env=env, coordinator=True)
    assert "FINISHED:COMPLETED" in again.stdout and "round 0: aggregated 2 of 2" in again.stdout, again.stdout[-4000:]
