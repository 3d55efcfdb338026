"""`make deploy` over real SSH to three test hosts (see conftest.py): first deploy, idempotent
second deploy, the hosts' state through pytest-testinfra's Ansible backend (the container site's participant a
compose service of its own Docker engine, the others systemd units), a site switching runtime and back, day-2
operations on one site, and an unreachable host. The tiny CXR job that trains across the hosts' addresses runs in
test_ssh_faults.py, where a deploy waits for it."""

import json
import re
import subprocess
import time

import pytest
import testinfra
from .conftest import HOSTS, REPO, on_host, recap, run, veth, write_inventory

def host(name: str, inventory) -> testinfra.host.Host:
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


def test_first_deploy_changes_every_host(deployed):
    hosts = recap(deployed["first"].stdout)
    assert set(hosts) == set(HOSTS)
    assert all(changed > 0 and unreachable == failed == 0 for changed, unreachable, failed in hosts.values())


def test_second_deploy_changes_nothing(deployed):
    again = run("deploy.sh", env=deployed["env"])
    assert recap(again.stdout) == {name: (0, 0, 0) for name in HOSTS}, again.stdout


def test_a_deploy_puts_back_what_was_changed_on_a_host(deployed):
    """A deploy that changes nothing runs no module for what one look at the host found as it would set it (users,
    the control script, the unit and its start at boot, the server's /etc/hosts line): changed by hand, each is put
    back by the next deploy, and the one after changes nothing again."""
    name, ws = "hospital_a", "/opt/hcls-flare/hospital_a"
    on_host(deployed, name, f"systemctl disable hcls-flare-{name}.service && chmod 0700 {ws}/flarectl.sh && "
            "gpasswd -d flare-job flare && usermod -s /bin/sh flare && sed -i 's/^.* flare-server$/10.77.0.99 flare-server/' /etc/hosts")  # fmt: skip
    fixed = run("deploy.sh", name, env=deployed["env"])
    assert recap(fixed.stdout)[name][0] >= 5, fixed.stdout
    h = host(name, deployed["inventory"])
    assert h.service(f"hcls-flare-{name}.service").is_enabled and h.file(f"{ws}/flarectl.sh").mode == 0o750
    assert "flare" in h.user("flare-job").groups and h.user("flare").shell == "/usr/sbin/nologin"
    assert f"{HOSTS['flare-server']} flare-server" in h.file("/etc/hosts").content_string.splitlines()
    again = run("deploy.sh", name, env=deployed["env"])
    assert recap(again.stdout) == {name: (0, 0, 0)}, again.stdout


@pytest.mark.parametrize("name", list(HOSTS))
def test_host_state(deployed, name):
    h = host(name, deployed["inventory"])
    ws = f"/opt/hcls-flare/{name}"
    user = h.user("flare")
    assert user.exists and user.uid == 2710 and user.shell == "/usr/sbin/nologin"
    key = h.file(f"{ws}/startup/{'server' if name == 'flare-server' else 'client'}.key")
    assert key.mode == 0o600 and key.user == "flare" and key.group == "flare"
    assert h.file(f"{ws}/startup/rootCA.pem").mode == 0o640
    assert h.file(f"{ws}/startup/sub_start.sh").mode == 0o750
    assert h.file(ws).mode == 0o750 and h.file(ws).user == "flare"
    processes = [p for p in h.process.filter(user="flare") if "nvflare.private.fed.app" in p.args]
    assert processes, f"no participant process of user flare on {name}"
    unit = h.service(f"hcls-flare-{name}.service")
    if name == deployed["container_site"]:
        # A compose service of the image on the host's own Docker engine (started at boot), the host's network.
        assert not h.file(f"/etc/systemd/system/hcls-flare-{name}.service").exists and not unit.is_running
        assert h.service("docker.service").is_enabled and h.service("docker.service").is_running
        fmt = "{{.HostConfig.RestartPolicy.Name}} {{.HostConfig.NetworkMode}} {{.Config.User}} {{.State.Running}}"
        assert h.check_output(f"docker inspect -f '{fmt}' flare-{name}") == "unless-stopped host 0:0 true"
        # Root with four capabilities and no way to more; setpriv runs the participant as flare (the processes above)
        # and its trainers as flare-job (README "Job code and the site's files").
        config = json.loads(h.check_output(f"docker inspect -f '{{{{json .HostConfig}}}}' flare-{name}"))
        assert {c.removeprefix("CAP_") for c in config["CapAdd"]} == {"SETUID", "SETGID", "KILL", "NET_ADMIN"}
        assert [c.removeprefix("CAP_") for c in config["CapDrop"]] == ["ALL"]
        assert "no-new-privileges:true" in config["SecurityOpt"]
        assert h.file(f"{ws}/compose.yml").exists
    else:
        assert unit.is_enabled and unit.is_running
    if name == "flare-server":
        assert h.socket("tcp://0.0.0.0:8003").is_listening and h.socket("tcp://0.0.0.0:8103").is_listening
    else:
        assert f"{HOSTS['flare-server']} flare-server" in h.file("/etc/hosts").content_string
        assert h.file(f"{ws}/local/site_config.json").contains('"data_root": "/opt/data"')
        assert h.file(f"{ws}/log.txt").contains(f"Successfully registered client:{name}")


def participant_processes(deployed, name: str) -> list[str]:
    """The host's NVFlare participant processes (client_train / server_train), native or in a container."""
    out = on_host(deployed, name, "ps -eo pid=,args=").stdout
    return [line for line in out.splitlines() if "nvflare.private.fed.app" in line and "_train" in line]


def test_switching_runtime_stops_the_other_participant(deployed, tmp_path):
    """The container site deployed native (its container removed, its unit enabled) and back to the container
    (the unit stopped, disabled and removed): one participant at every step, registered."""
    site, env = deployed["container_site"], deployed["env"]
    if site is None:
        pytest.skip(f"no container site: {deployed['native_reason']}")
    native_env = dict(env, INVENTORY=str(write_inventory(tmp_path / "native.yml", deployed["key"], host_vars={})))
    try:
        native = run("deploy.sh", site, env=native_env)
        said = " ".join(native.stdout.split())
        assert recap(native.stdout)[site][1:] == (0, 0) and f"{site} started (pid" in said, native.stdout
        assert on_host(deployed, site, f"docker ps -aq --filter name=^/?flare-{site}$").stdout.strip() == ""
        assert on_host(deployed, site, f"systemctl is-enabled hcls-flare-{site}.service").stdout.strip() == "enabled"
        assert len(participant_processes(deployed, site)) == 1, participant_processes(deployed, site)
    finally:
        back = run("deploy.sh", site, env=env)
    said = " ".join(back.stdout.split())
    assert recap(back.stdout)[site][1:] == (0, 0) and f"{site} started (pid" in said and "in container" in said, back.stdout
    assert on_host(deployed, site, f"test -e /etc/systemd/system/hcls-flare-{site}.service", check=False).returncode == 1
    assert on_host(deployed, site, f"systemctl is-active hcls-flare-{site}.service", check=False).stdout.strip() != "active"
    assert len(participant_processes(deployed, site)) == 1, participant_processes(deployed, site)
    again = run("deploy.sh", site, env=env)
    assert recap(again.stdout) == {site: (0, 0, 0)}, again.stdout


def test_one_site_stops_and_redeploys_while_the_others_run(deployed):
    env = deployed["env"]
    before = run("status.sh", env=env, coordinator=True).stdout
    pids = dict(re.findall(r"(\S+) running \(pid (\d+)[ )]", before))
    assert set(pids) == set(HOSTS), before

    make = ["make", "-s", "-o", ".venv/.installed", f"INVENTORY={env['INVENTORY']}"]  # the venv is there
    stopped = subprocess.run([*make, "stop", "SITE=hospital_b"], env=env, cwd=REPO, capture_output=True, text=True)
    assert stopped.returncode == 0 and "hospital_b stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    status = run("status.sh", env=env, coordinator=True).stdout
    assert "hospital_b stopped" in status and f"hospital_a running (pid {pids['hospital_a']})" in status

    logs = subprocess.run([*make, "logs", "SITE=hospital_a"], env=env, cwd=REPO, capture_output=True, text=True)
    assert logs.returncode == 0 and "Successfully registered client:hospital_a" in logs.stdout, logs.stdout

    again = subprocess.run([*make, "deploy", "SITE=hospital_b"], env=env, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and recap(again.stdout) == {"hospital_b": (1, 0, 0)}, again.stdout
    after = dict(re.findall(r"(\S+) running \(pid (\d+)[ )]", run("status.sh", env=env, coordinator=True).stdout))
    assert after["flare-server"] == pids["flare-server"] and after["hospital_a"] == pids["hospital_a"]
    assert after["hospital_b"] != pids["hospital_b"]


def test_unreachable_host_fails_fast_and_named_while_the_others_deploy(deployed):
    """The cut host fails within 60 s of the play's start (every host runs each task in the same step)."""
    subprocess.run(["ip", "link", "set", veth(2), "down"], check=True)  # cut hospital_b's link
    lines, play_started, failed_after = [], None, None
    try:
        deploy = subprocess.Popen([REPO / "scripts" / "deploy.sh"], env=deployed["env"], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        for line in deploy.stdout:
            lines.append(line)
            if line.startswith("PLAY [Deploy the FLARE participants]"):
                play_started = time.monotonic()
            if failed_after is None and re.match(r"fatal: \[hospital_b\]: UNREACHABLE", line):
                failed_after = time.monotonic() - play_started
        deploy.wait(timeout=600)
    finally:
        subprocess.run(["ip", "link", "set", veth(2), "up"], check=True)
    out = "".join(lines)
    hosts = recap(out)
    assert deploy.returncode != 0 and hosts["hospital_b"][1] == 1, out
    assert failed_after is not None and failed_after < 60, f"hospital_b failed after {failed_after}s:\n{out}"
    assert HOSTS["hospital_b"] in out  # the message names the host and its address
    assert hosts["flare-server"] == (0, 0, 0) and hosts["hospital_a"] == (0, 0, 0)
