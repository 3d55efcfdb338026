"""Three test hosts for deploying over real SSH: flare-server, hospital_a and hospital_b, each a
network namespace on a bridge with its own address and its own sshd, and its own /etc, /opt and
/root (bind mounts in the sshd's mount namespace). The hosts have the project venv at
/opt/hcls-flare/venv, as production hosts do, and their demo data under /opt/data.
Everything made here is removed at the end, also on failure, and first of all leftovers of a crashed run."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# pytest-testinfra's Ansible backend calls ansible-inventory from PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"


TINY_DATA = json.loads((REPO / "tests" / "tiny_data.json").read_text())  # generator sizes (scripts/generate_data.sh)

PREFIX = "hclsd"  # namespaces hclsd-h<i>, root-side veths hclsd-v<i>, bridge hclsd-br
BRIDGE, BRIDGE_ADDR = f"{PREFIX}-br", "10.77.0.1"
HOSTS = {"flare-server": "10.77.0.10", "hospital_a": "10.77.0.11", "hospital_b": "10.77.0.12"}
DATA_ROOT = "/opt/data"  # on every client host


def sh(*cmd, check=True):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {result.stderr.strip()}")
    return result.stdout


def netns(index: int) -> str:
    return f"{PREFIX}-h{index}"


def veth(index: int) -> str:
    return f"{PREFIX}-v{index}"


def remove_hosts():
    """Kill every process in our namespaces (sshd, participants, trainers), delete namespaces and bridge."""
    existing = sh("ip", "netns", "list", check=False)
    for index in range(len(HOSTS)):
        if netns(index) not in existing:
            continue
        for pid in sh("ip", "netns", "pids", netns(index), check=False).split():
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", netns(index), check=False)
    for link in [veth(i) for i in range(len(HOSTS))] + [BRIDGE]:
        sh("ip", "link", "del", link, check=False)


def start_sshd(index: int, name: str, address: str, root: Path, client_key: Path) -> subprocess.Popen:
    """One host: namespace, veth on the bridge, private /etc /opt /root, sshd on ADDRESS:22."""
    host = root / name
    shutil.copytree("/etc", host / "etc", symlinks=True)
    (host / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n{address} {name}\n")
    for db in ("passwd", "shadow", "group", "gshadow"):  # a fresh host: no service user yet
        path = host / "etc" / db
        if path.exists():
            kept = [line for line in path.read_text().splitlines(True) if not line.startswith("flare:")]
            path.write_text("".join(kept))
    (host / "opt" / "hcls-flare" / "venv").mkdir(parents=True)
    (host / "root").mkdir(mode=0o711)
    base = Path(sys.base_prefix)  # the venv's python must be reachable from the host's /root too
    binds = [(REPO / ".venv", host / "opt" / "hcls-flare" / "venv")]  # read-only, into the host's tree first
    if base.is_relative_to("/root"):
        binds.append((base, host / "root" / base.relative_to("/root")))
        binds[-1][1].mkdir(parents=True)
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host / "ssh_host_key")
    (host / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
    (host / "sshd_config").write_text(
        f"ListenAddress {address}\nHostKey {host}/ssh_host_key\nAuthorizedKeysFile {host}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPidFile none\nSubsystem sftp internal-sftp\n"
    )
    sh("ip", "netns", "add", netns(index))
    sh("ip", "link", "add", veth(index), "type", "veth", "peer", "name", "eth0", "netns", netns(index))
    sh("ip", "link", "set", veth(index), "master", BRIDGE, "up")
    for cmd in ("addr add {address}/24 dev eth0", "link set eth0 up", "link set lo up"):
        sh("ip", "netns", "exec", netns(index), "ip", *cmd.format(address=address).split())
    script = "set -e; mkdir -p /run/sshd\n"
    script += "".join(f"mount --bind {src} {dst}; mount -o remount,bind,ro {dst}\n" for src, dst in binds)
    script += "".join(f"mount --rbind {host}{path} {path}\n" for path in ("/etc", "/opt", "/root"))
    script += f"exec /usr/sbin/sshd -D -e -f {host}/sshd_config\n"
    log = open(root / f"{name}.sshd.log", "w")
    return subprocess.Popen(
        ["ip", "netns", "exec", netns(index), "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=log, stderr=subprocess.STDOUT,
    )


def wait_for_ssh(address: str, key: Path, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(
            ["ssh", "-i", key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", f"root@{address}", "true"],
            capture_output=True, text=True,
        )  # fmt: skip
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd on {address} did not answer: {probe.stderr.strip()}")
        time.sleep(0.5)


def address(host_port: str) -> dict:
    host, _, port = host_port.partition(":")
    return {"ansible_host": host, **({"ansible_port": int(port)} if port else {})}


def write_inventory(path: Path, key: Path, hosts: dict | None = None, **extra_vars) -> Path:
    """An inventory of the test hosts (HOSTS, or other name -> address[:port]), over SSH as root."""
    hosts = hosts or HOSTS
    inventory = {"all": {
        "vars": {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no",
            "flare_participant_server_address": "{{ hostvars['flare-server'].ansible_host }}",
            "flare_participant_data_root": DATA_ROOT,
            "flare_participant_env": {"OMP_NUM_THREADS": 1},
            "flare_participant_privacy": {"min_dataset_size": 2},  # tiny data, as the local inventory's demo
            **extra_vars,
        },
        "children": {
            "flare_server": {"hosts": {n: address(a) for n, a in hosts.items() if n == "flare-server"}},
            "flare_clients": {"hosts": {n: address(a) for n, a in hosts.items() if n != "flare-server"}},
        },
    }}  # fmt: skip
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory):
    """{"root": dir of the hosts' files, "key": SSH key, "inventory": hosts.yml, "env": for scripts/}."""
    if os.geteuid() != 0 or shutil.which("sshd", path="/usr/sbin:/usr/bin") is None:
        pytest.skip("needs root and openssh-server (scripts/setup.sh installs it) to make SSH test hosts")
    remove_hosts()
    root = tmp_path_factory.mktemp("ssh_hosts")
    key = root / "id_ed25519"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    sshds = []
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for index, (name, address) in enumerate(HOSTS.items()):
            sshds.append(start_sshd(index, name, address, root, key))
        for address in HOSTS.values():
            wait_for_ssh(address, key)
        # The coordinator (this machine) resolves the server name only for the admin's own processes.
        (root / "coordinator_hosts").write_text(f"127.0.0.1 localhost\n{HOSTS['flare-server']} flare-server\n")
        env = dict(os.environ, HCLS_WORKSPACE=str(root / "coordinator"), MODELS_DIR=str(root / "models"),
                   INVENTORY=str(write_inventory(root / "hosts.yml", key)), SERVER_HOST="flare-server",
                   ANSIBLE_CONFIG=str(REPO / "ansible" / "ansible.cfg"), **TINY_DATA)  # fmt: skip
        yield {"root": root, "key": key, "inventory": Path(env["INVENTORY"]), "env": env}
    finally:
        for sshd in sshds:
            sshd.kill()
        remove_hosts()


@pytest.fixture(scope="session")
def provisioned(ssh_hosts):
    """Kits that dial flare-server, and tiny CXR data on each client host under /opt/data."""
    env = ssh_hosts["env"]
    run("provision.sh", env=env)
    run("generate_data.sh", "cxr_classification", env=env)
    for site in ("hospital_a", "hospital_b"):
        (Path(env["HCLS_WORKSPACE"]) / "data" / site).rename(ssh_hosts["root"] / site / "opt" / "data")
    return ssh_hosts


def run(*args, env, check=True, timeout=900, coordinator=False):
    """scripts/ARGS[0] ARGS[1:]; coordinator=True: with /etc/hosts resolving flare-server to the server
    host, for the admin's processes only (a private mount namespace), as a coordinator's DNS would."""
    cmd = [str(REPO / "scripts" / args[0]), *args[1:]]
    if coordinator:
        hosts = Path(env["HCLS_WORKSPACE"]).parent / "coordinator_hosts"
        cmd = ["unshare", "--mount", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$0" "$@"', *cmd]
    started = time.monotonic()
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    result.seconds = time.monotonic() - started
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def deployed(provisioned):
    """The federation deployed to the three hosts; {"first": the first deploy's result, ...provisioned}."""
    return {**provisioned, "first": run("deploy.sh", env=provisioned["env"])}


RECAP = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def recap(out: str) -> dict:
    """{host: (changed, unreachable, failed)} from the PLAY RECAP."""
    return {host: tuple(map(int, counts)) for host, *counts in RECAP.findall(out)}
