"""Bad input stops the deploy of a host with a message naming the host and the value, before
anything on that host changes; the running federation is untouched. Includes the container
runtime's compose service as rendered on the controller and checked by `docker-compose config`, and SSH host keys:
a host without a pinned key, and a host whose key changed (make trust-hosts pinned them, ansible.cfg checks them)."""

import json
import re
import shutil
import subprocess
import tempfile

import pytest
import yaml
from .conftest import HOSTS, REPO, known_hosts, on_host, recap, run, sh, wait_for_ssh, write_inventory


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
    pinned = known_hosts(deployed["key"])
    saved = pinned.read_text()
    # Its key pinned at that port too, as if it had listened there when trusted: the deploy gets to connect.
    key_lines = [line for line in saved.splitlines() if line.split()[0] == HOSTS["hospital_b"]]
    pinned.write_text(saved + "".join(f"[{HOSTS['hospital_b']}]:2222 {line.split(None, 1)[1]}\n" for line in key_lines))
    try:
        bad = deploy_bad(deployed, tmp_path, "hospital_b", hosts=hosts)
    finally:
        pinned.write_text(saved)
    assert re.search(r"hospital_b.*UNREACHABLE", bad.stdout) and "Connection refused" in bad.stdout
    assert recap(bad.stdout)["hospital_b"][1] == 1


def test_host_without_a_pinned_key(deployed, tmp_path):
    """A deploy to a host whose key was never pinned (make trust-hosts) stops before anything runs, naming it."""
    pinned = known_hosts(deployed["key"])
    saved = pinned.read_text()
    before, pids = host_state(deployed["root"], "hospital_b"), running_pids(deployed["env"])
    pinned.write_text("".join(line + "\n" for line in saved.splitlines() if line.split()[0] != HOSTS["hospital_b"]))
    try:
        bad = run("deploy.sh", env=deployed["env"], check=False)
    finally:
        pinned.write_text(saved)
    assert bad.returncode != 0 and host_state(deployed["root"], "hospital_b") == before
    assert running_pids(deployed["env"]) == pids
    assert f"no pinned SSH host key in {pinned} for hospital_b ({HOSTS['hospital_b']}): run 'make trust-hosts" in bad.stderr
    assert "PLAY" not in bad.stdout  # refused before Ansible ran


def test_host_key_mismatch(deployed, tmp_path):
    """hospital_b's sshd gets a new host key (a reinstalled host, or someone in between): make trust-hosts refuses to
    replace the pinned key, naming the host; a deploy fails that host, naming it, before anything on it changes (the
    others deploy, unchanged); FORCE=1 replaces the pin. hospital_b gets its own key back afterwards."""
    env, name, address = deployed["env"], "hospital_b", HOSTS["hospital_b"]
    ssh_dir = deployed["root"] / name / "etc" / "hclsd-ssh"  # the host's /etc/hclsd-ssh (conftest.make_host)
    pinned = known_hosts(deployed["key"])
    pinned_before = pinned.read_text()
    before, pids = host_state(deployed["root"], name), running_pids(env)
    for f in ("ssh_host_key", "ssh_host_key.pub"):
        shutil.copy2(ssh_dir / f, tmp_path / f)

    def restart_sshd():
        on_host(deployed, name, "systemctl restart hclsd-sshd", timeout=60)
        wait_for_ssh(address, deployed["key"])

    try:
        for f in ("ssh_host_key", "ssh_host_key.pub"):
            (ssh_dir / f).unlink()
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh_dir / "ssh_host_key")
        restart_sshd()
        new_key = (ssh_dir / "ssh_host_key.pub").read_text().split()[1]

        trust = run("trust_hosts.sh", env=env, check=False, timeout=120)
        assert trust.returncode != 0, trust.stdout
        assert f"error: {name} ({address}): its host key differs from the one pinned in {pinned}: not replaced" in trust.stderr
        assert f"error: host keys not pinned for {name} (see above)" in trust.stderr
        assert f"flare-server ({HOSTS['flare-server']}): already pinned, unchanged" in trust.stdout
        assert pinned.read_text() == pinned_before

        # A fresh directory of control sockets (short: a socket's path has ~100 bytes): a connection Ansible kept
        # open (ControlPersist) was checked before the key changed.
        control_dir = tempfile.mkdtemp(prefix="hclscp-")
        try:
            bad = run("deploy.sh", env=dict(env, ANSIBLE_SSH_CONTROL_PATH_DIR=control_dir), check=False)
        finally:
            shutil.rmtree(control_dir, ignore_errors=True)
        assert bad.returncode != 0, bad.stdout
        assert re.search(rf"fatal: \[{name}\]: UNREACHABLE!", bad.stdout), bad.stdout
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in bad.stdout and "Host key verification failed" in bad.stdout
        assert recap(bad.stdout) == {**{h: (0, 0, 0) for h in HOSTS}, name: (0, 1, 0)}, bad.stdout
        assert host_state(deployed["root"], name) == before, "the deploy changed the host whose key changed"
        assert pinned.read_text() == pinned_before  # ssh learnt nothing (StrictHostKeyChecking=yes)

        # FORCE=1 replaces that host's pin (in a copy of the pins: the session's stay as they are).
        copy = tmp_path / "workspace"
        copy.mkdir()
        shutil.copy2(pinned, copy / "known_hosts")
        forced = run("trust_hosts.sh", name, env=dict(env, HCLS_WORKSPACE=str(copy), FORCE="1"), timeout=120)
        assert f"{name} ({address}): pinned keys replaced (FORCE)" in forced.stdout
        lines = (copy / "known_hosts").read_text().splitlines()
        assert [line.split()[1:] for line in lines if line.split()[0] == address] == [["ssh-ed25519", new_key]]
        others = [line for line in pinned_before.splitlines() if line.split()[0] != address]
        assert [line for line in lines if line.split()[0] != address] == others
    finally:
        for f in ("ssh_host_key", "ssh_host_key.pub"):
            shutil.copy2(tmp_path / f, ssh_dir / f)
        restart_sshd()
    assert running_pids(env) == pids, "the deploy restarted a participant"
    again = run("trust_hosts.sh", name, env=env, timeout=120)
    assert f"{name} ({address}): already pinned, unchanged" in again.stdout


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
