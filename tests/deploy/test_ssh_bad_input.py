"""Bad input stops the deploy of a host with a message naming the host and the value, before
anything on that host changes; the running federation is untouched. Includes the container
runtime's compose service as rendered on the controller and checked by `docker-compose config`."""

import json
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import HOSTS, REPO, recap, run, write_inventory


def host_state(root, name: str) -> dict:
    """What a deploy may change on host NAME: its kit, local/ files, control script and /etc/hosts."""
    ws = root / name / "opt" / "hcls-flare" / name
    kit = sorted(p for d in ("startup", "local") for p in (ws / d).rglob("*") if p.is_file())
    files = [root / name / "etc" / "hosts", ws / "flarectl.sh", *kit]
    return {str(f): (f.stat().st_mode, f.stat().st_uid, f.stat().st_mtime_ns, f.read_bytes()) for f in files}


def running_pids(env) -> dict:
    return dict(re.findall(r"(\S+) running \(pid (\d+)[ )]", run("control.sh", "status", env=env).stdout))


def site_configs_with(tmp_path, site: str, **fields) -> str:
    configs = tmp_path / "site_configs"
    shutil.copytree(REPO / "site_configs", configs)
    path = configs / f"site_{site}" / "local_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return str(configs)


def deploy_bad(deployed, tmp_path, site, hosts=None, **inventory_vars):
    inventory = write_inventory(tmp_path / "bad.yml", deployed["key"], hosts, **inventory_vars)
    env = dict(deployed["env"], INVENTORY=str(inventory))
    before, pids = host_state(deployed["root"], "hospital_b"), running_pids(deployed["env"])
    result = run("deploy.sh", *([site] if site else []), env=env, check=False)
    assert result.returncode != 0, result.stdout
    assert host_state(deployed["root"], "hospital_b") == before, "the bad deploy changed hospital_b"
    assert running_pids(deployed["env"]) == pids, "the bad deploy restarted a participant"
    return result


def test_unknown_site_in_the_inventory(deployed, tmp_path):
    bad = deploy_bad(deployed, tmp_path, "", hosts={**HOSTS, "hospital_z": HOSTS["hospital_b"]})
    assert "inventory host 'hospital_z' is not a server or client of provision/project.yml" in bad.stdout
    assert {h: c for h, c in recap(bad.stdout).items() if h != "hospital_z"} == {h: (0, 0, 0) for h in HOSTS}


def test_host_refusing_ssh(deployed, tmp_path):
    hosts = {**HOSTS, "hospital_b": HOSTS["hospital_b"] + ":2222"}  # nothing listens there
    bad = deploy_bad(deployed, tmp_path, "hospital_b", hosts=hosts)
    assert re.search(r"hospital_b.*UNREACHABLE", bad.stdout) and "Connection refused" in bad.stdout
    assert recap(bad.stdout)["hospital_b"][1] == 1


def test_data_path_missing_on_the_host(deployed, tmp_path):
    bad = deploy_bad(deployed, tmp_path, "hospital_b", flare_participant_data_root="/opt/no_such_data")
    assert "hospital_b: data root /opt/no_such_data" in bad.stdout and "does not exist on the host" in bad.stdout


def test_gpu_id_the_host_lacks_and_the_rendered_compose_service(deployed, tmp_path):
    configs = site_configs_with(tmp_path, "hospital_b", gpu_ids=[0])
    bad = deploy_bad(deployed, tmp_path, "hospital_b", flare_participant_site_configs_dir=configs,
                     flare_participant_runtime="container")  # fmt: skip
    assert "hospital_b: gpu_ids [0] of " in bad.stdout and "not on the host (it has GPUs [] in /dev/nvidia*)" in bad.stdout

    # The compose service was rendered and checked on the controller before the host was asked.
    compose_file = deployed["root"] / "coordinator/provision/hcls-ai-factory/rendered/hospital_b.compose.yml"
    assert subprocess.run(["docker-compose", "-f", compose_file, "config", "-q"]).returncode == 0
    service = yaml.safe_load(compose_file.read_text())["services"]["hospital-b"]
    assert service["volumes"] == ["/opt/hcls-flare/hospital_b:/workspace", "/opt/data:/opt/data:ro"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]
    assert service["restart"] == "unless-stopped" and service["healthcheck"]["test"][0] == "CMD"
    assert service["user"] == "2710:2710" and service["extra_hosts"] == [f"flare-server:{HOSTS['flare-server']}"]
    assert service["network_mode"] == "host" and "ports" not in service  # no flare_participant_compose_network


def test_compose_service_with_an_invalid_key(deployed, tmp_path):
    bad = deploy_bad(deployed, tmp_path, "hospital_b", flare_participant_runtime="container",
                     flare_participant_compose_overrides={"no_such_key": 1})  # fmt: skip
    assert "hospital_b: the compose service rendered from flare_participant_compose_overrides" in bad.stdout
    assert "no_such_key" in bad.stdout


@pytest.mark.parametrize("gpu_ids", [["0"], "0"])
def test_gpu_ids_that_are_not_a_list_of_integers(deployed, tmp_path, gpu_ids):
    configs = site_configs_with(tmp_path, "hospital_b", gpu_ids=gpu_ids)
    bad = deploy_bad(deployed, tmp_path, "hospital_b", flare_participant_site_configs_dir=configs)
    assert "hospital_b: " in bad.stdout and f"gpu_ids={gpu_ids}" in bad.stdout
