"""Three test hosts for deploying over real SSH: flare-server, hospital_a and hospital_b, each a
network namespace on a bridge with its own address, booted like a machine: a pid namespace whose PID 1
is systemd (the host's supervisor of the participants), which runs the host's sshd as a unit. Each host
has its own /etc, /opt, /root, /tmp and /run (bind mounts and a tmpfs in its mount namespace) and its own
cgroup (hclsd/<host> in systemd's hierarchies); units a container does not need are masked in its /etc.
The hosts have the project venv at /opt/hcls-flare/venv, as production hosts do, and their demo data
under /opt/data. Everything made here is removed at the end, also on failure, and first of all leftovers
of a crashed run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# pytest-testinfra's Ansible backend calls ansible-inventory from PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"


TINY_DATA = json.loads((REPO / "tests" / "tiny_data.json").read_text())  # generator sizes (scripts/generate_data.sh)
TINY_PROFILE = json.loads((REPO / "tests" / "tiny_cxr_profile.json").read_text())  # 2 rounds, 32 px
# test_ssh_faults: a site cut off longer than a round (8 rounds, min_clients 1, training only: CI time).
CUT_OFF_TRAIN_TIMEOUT = 60  # round 0 includes the first trainer start (~30 s cold)
# Rounds with both sites take a second or two: 30 of them keep the job running until the cut-off site is back.
CUT_OFF_PROFILE = {**TINY_PROFILE, "server": {
    **TINY_PROFILE["server"], "num_rounds": 30, "min_clients": 1, "train_timeout": CUT_OFF_TRAIN_TIMEOUT,
    "workflows": [{"id": "cross_site_validation", "remove": True}],
}}  # fmt: skip
# A job that outlasts the deploys a test makes while it runs (a 2- or 8-round job can end first): it is aborted.
LONG_PROFILE = {**TINY_PROFILE, "server": {**TINY_PROFILE["server"], "num_rounds": 200}}
# The profiles of the CXR jobs the SSH tests submit: every site approves them (make approve) before the deploy.
APPROVED_PROFILES = [TINY_PROFILE, CUT_OFF_PROFILE, LONG_PROFILE]

PREFIX = "hclsd"  # namespaces hclsd-h<i>, root-side veths hclsd-v<i>, bridge hclsd-br
BRIDGE, BRIDGE_ADDR = f"{PREFIX}-br", "10.77.0.1"
HOSTS = {"flare-server": "10.77.0.10", "hospital_a": "10.77.0.11", "hospital_b": "10.77.0.12"}
DATA_ROOT = "/opt/data"  # on every client host
# A host that test_ssh_sites.py adds to the running federation (make add-site): made and booted only there.
SPARE_HOSTS = {"hospital_c": "10.77.0.13"}
ALL_HOSTS = {**HOSTS, **SPARE_HOSTS}
# The site that runs its participant as a compose service of the air-gapped image (flare_participant_runtime:
# container) under a Docker engine of its own systemd, when one can run here; the other sites stay native.
CONTAINER_SITE = "hospital_b"
# Host variables of the session's inventories (write_inventory): the container site's, once ssh_hosts chose it.
HOST_VARS: dict = {}
ENGINE = REPO / "scripts" / "docker_engine.sh"
DOCKER_DATA_ROOT = "/var/lib/hcls-docker"  # scripts/docker_engine.sh's, which holds the image test_containers built
# The test image installs a CPU build of torch (in pip's find-links on these machines, ~200 MB) instead
# of the pinned CUDA build (~5 GB) so that it builds in a few minutes; torchvision, which needs the
# pinned torch, is left out (the CXR job does not use it). nvflare and MONAI are requirements.txt's.
TEST_TORCH = "torch==2.13.0+cpu"
# The machine's cgroup v1 controllers, mounted for the container site's dockerd only (runc needs them).
CONTROLLERS = "cpu cpuacct cpuset memory devices freezer blkio pids"


def sh(*cmd, check=True):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {result.stderr.strip()}")
    return result.stdout


def netns(index: int) -> str:
    return f"{PREFIX}-h{index}"


def veth(index: int) -> str:
    return f"{PREFIX}-v{index}"


# systemd's own cgroup hierarchies; every host's systemd is rooted in hclsd/<host> of each.
CGROUPS = {"systemd": "-t cgroup -o none,name=systemd cgroup", "unified": "-t cgroup2 cgroup2"}
# Units of this machine's systemd that a test host must not run: they would act on the whole machine
# (tmpfiles clean /tmp and /var, udev, sysctl, kernel mounts) or need a console, D-Bus or logind.
# Every unit the distribution's targets pull in is masked, except journald (the units' logs).
KEEP_UNITS = {"systemd-journald.service", "systemd-journald.socket", "systemd-journald-dev-log.socket"}
EXTRA_MASKED = ["getty.target", "console-getty.service", "dbus.service", "systemd-logind.service",
                "systemd-tmpfiles-clean.service", "systemd-update-utmp.service", "systemd-networkd.service",
                "systemd-remount-fs.service"]  # fmt: skip


def remove_hosts():
    """Kill every process in our namespaces (systemd, sshd, participants, trainers), delete namespaces,
    bridge and the hosts' cgroups."""
    existing = sh("ip", "netns", "list", check=False)
    for index in range(len(ALL_HOSTS)):
        if netns(index) not in existing:
            continue
        for pid in sh("ip", "netns", "pids", netns(index), check=False).split():
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", netns(index), check=False)
    for link in [veth(i) for i in range(len(ALL_HOSTS))] + [BRIDGE]:
        sh("ip", "link", "del", link, check=False)
    # Also the container site's containers' cgroups (its dockerd's cgroup-parent hclsd/<site>-docker).
    for hierarchy in [*CGROUPS, *CONTROLLERS.split()]:
        remove_cgroup(Path("/sys/fs/cgroup") / hierarchy / PREFIX)


def remove_cgroup(top: Path, timeout: float = 10):
    """rmdir a cgroup tree, deepest first, once the killed processes have left it."""
    deadline = time.monotonic() + timeout
    while top.exists():
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
            try:
                d.rmdir()
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"cgroup {top} still busy: {sh('find', top, '-name', 'cgroup.procs', check=False)}")
        time.sleep(0.2)


# The container site's dockerd, in a mount namespace of its own (unshare --mount): runc needs every cgroup v1
# controller mounted, but the host's systemd mounted only those it could (not cpu and cpuacct, separate here). A fresh
# /sys/fs/cgroup gets the named hierarchy, cgroup2, the controllers the host's systemd mounted (with their options:
# runc also reads the covered mounts from mountinfo and must find them at the same paths) and the missing ones.
DOCKERD_WRAPPER = f"""#!/bin/sh
set -e
mounted=$(sed -n 's|^[^ ]* [^ ]* [^ ]* / \\(/sys/fs/cgroup/[^ ]*\\) .* - cgroup cgroup \\(.*\\)$|\\1 \\2|p' /proc/self/mountinfo \\
  | grep -v name=) || true
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
echo "$mounted" | while read -r dir opts; do
  [ -n "$dir" ] && [ ! -d "$dir" ] || continue
  mkdir "$dir"; mount -t cgroup -o "$opts" cgroup "$dir"
done
for c in {CONTROLLERS}; do
  [ -d /sys/fs/cgroup/$c ] || {{ mkdir /sys/fs/cgroup/$c; mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; }}
done
exec /usr/sbin/dockerd
"""


def docker_unit(units: Path, name: str):
    """A Docker engine as a unit of host NAME's systemd, enabled (as Debian's docker.io is): its data root is the
    machine's DOCKER_DATA_ROOT (the image is there), no iptables rules and no bridge (the participant uses the
    host's network), containers in the cgroup hclsd/NAME-docker. It runs in a mount namespace of its own where
    the machine's cgroup controllers are mounted (the host's systemd sees none), which shares the host's /opt."""
    etc = units.parents[1]
    (etc / "docker").mkdir(exist_ok=True)
    (etc / "docker" / "daemon.json").write_text(json.dumps({
        "data-root": DOCKER_DATA_ROOT, "iptables": False, "ip-masq": False, "bridge": "none",
        "cgroup-parent": f"/{PREFIX}/{name}-docker"}, indent=2) + "\n")  # fmt: skip
    (etc / "docker" / "hclsd-dockerd.sh").write_text(DOCKERD_WRAPPER)
    unit = units / "docker.service"
    if unit.is_symlink():
        unit.unlink()
    unit.write_text(
        f"[Unit]\nDescription=Docker engine of test host {name}\nAfter=network-online.target\n[Service]\n"
        "Type=notify\nExecStart=/usr/bin/unshare --mount /bin/sh /etc/docker/hclsd-dockerd.sh\n"
        "Delegate=yes\nKillMode=process\nRestart=always\nRestartSec=2\nTimeoutStartSec=60\nLimitNOFILE=1048576\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    (units / "multi-user.target.wants" / "docker.service").symlink_to(unit)


def container_site_reason(work: Path) -> str:
    """Why CONTAINER_SITE cannot run the container runtime here ("" when it can): the image (built air-gapped
    into DOCKER_DATA_ROOT by scripts/build_image.sh, as test_containers.py does; cached) must be there, and no
    other Docker engine may use that data root while the site's engine runs."""
    if os.environ.get("HCLS_SSH_CONTAINER_SITE", "1") in ("0", "", "no", "false"):
        return "HCLS_SSH_CONTAINER_SITE=0: every SSH test host runs its participant natively"
    if not shutil.which("dockerd", path="/usr/sbin:/usr/bin") or not shutil.which("docker-compose"):
        return "no dockerd or docker-compose on this machine (scripts/setup.sh installs docker.io and docker-compose)"
    if subprocess.run([ENGINE, "status"], capture_output=True).returncode == 0:
        return f"scripts/docker_engine.sh's engine runs on {DOCKER_DATA_ROOT}: a second engine must not share it"
    started = subprocess.run([ENGINE, "start"], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        return f"no Docker engine can start on this machine: {started.stderr.strip()}"
    try:
        env = dict(os.environ, DOCKER_HOST=re.search(r"DOCKER_HOST=(\S+)", started.stdout).group(1),
                   TORCH_REQUIREMENT=TEST_TORCH, HCLS_WORKSPACE=str(work))  # fmt: skip
        if IMAGE_BUILD.get("cancelled"):
            return f"{IMAGE_FAILED}: the session ended first"
        # Up to date after test_containers.py (seconds); else built cold (4-6 min). In a process group of its own,
        # which pytest_sessionfinish stops if the session ends first.
        with subprocess.Popen([REPO / "scripts" / "build_image.sh", "airgapped"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) as built:  # fmt: skip
            IMAGE_BUILD["process"] = built
            try:
                _, stderr = built.communicate(timeout=1800)
            finally:
                if built.poll() is None:
                    os.killpg(built.pid, signal.SIGKILL)
        if built.returncode != 0:
            cause = "the session ended first" if IMAGE_BUILD.get("cancelled") else stderr.strip()[-2000:]
            return f"{IMAGE_FAILED}: {cause}"
        # A killed session's participant containers: their restart policy would restart them in the new hosts.
        left = subprocess.run(["docker", "ps", "-aq", "--filter", "name=^flare-"], env=env, capture_output=True,
                              text=True, timeout=60).stdout.split()  # fmt: skip
        if left:
            subprocess.run(["docker", "rm", "-f", *left], env=env, capture_output=True, timeout=120)
    finally:
        subprocess.run([ENGINE, "stop"], capture_output=True, timeout=120)
    return ""


# The image takes 4-6 min to build cold. Once collection shows that the session uses it (a test of ssh_hosts or of
# test_containers.py's stack), container_site_reason runs in a thread while the tests ordered before tests/deploy run
# (tests/conftest.py); ssh_hosts and stack wait for its answer.
IMAGE_FIXTURES = {"ssh_hosts", "stack"}
IMAGE_FAILED = "the participant image could not be built"
IMAGE_BUILD: dict = {}  # "thread"; when it ended "reason" (or "error") and "seconds"; "process": build_image.sh


def pytest_collection_finish(session):
    if session.config.option.collectonly or os.geteuid() != 0:  # ssh_hosts skips, stack's engine cannot start
        return
    if any(IMAGE_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        start_image_build()


def start_image_build():
    if "thread" in IMAGE_BUILD:
        return
    work = Path(tempfile.mkdtemp(prefix="hcls-image-"))

    def build():
        started = time.monotonic()
        try:
            remove_hosts()  # a crashed run's hosts, whose Docker engine may hold the data root
            IMAGE_BUILD["reason"] = container_site_reason(work)
            if not IMAGE_BUILD["reason"].startswith(IMAGE_FAILED):  # else its logs stay, named in the reason
                shutil.rmtree(work, ignore_errors=True)
        except BaseException as error:  # re-raised where a fixture waits for it
            IMAGE_BUILD["error"] = error
        IMAGE_BUILD["seconds"] = time.monotonic() - started

    IMAGE_BUILD["thread"] = threading.Thread(target=build, name="air-gapped image", daemon=True)
    IMAGE_BUILD["thread"].start()


def image_build() -> str:
    """container_site_reason's answer from the background build (started now if it was not), once it has ended."""
    start_image_build()
    IMAGE_BUILD["thread"].join()
    if "error" in IMAGE_BUILD:
        raise RuntimeError("the background build of the air-gapped image failed") from IMAGE_BUILD["error"]
    return IMAGE_BUILD["reason"]


def pytest_sessionfinish(session):
    """A session that ends before the background build (-x, Ctrl-C) stops it; its Docker engine is stopped."""
    thread = IMAGE_BUILD.get("thread")
    while thread and thread.is_alive():
        IMAGE_BUILD["cancelled"] = True
        process = IMAGE_BUILD.get("process")
        if process and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        thread.join(timeout=1)


def pytest_terminal_summary(terminalreporter):
    if "seconds" not in IMAGE_BUILD:
        return
    outcome = repr(IMAGE_BUILD["error"]) if "error" in IMAGE_BUILD else IMAGE_BUILD["reason"] or "ready"
    seconds = IMAGE_BUILD["seconds"]
    terminalreporter.write_line(f"air-gapped participant image (background build, {seconds:.0f} s): {outcome}")


def make_host(index: int, name: str, address: str, root: Path, client_key: Path, docker: bool = False):
    """One host's files and network: private /etc (sshd as a systemd unit, units masked; DOCKER: a Docker engine
    unit too), /opt, /root, /tmp; namespace and veth on the bridge with ADDRESS."""
    host = root / name
    shutil.copytree("/etc", host / "etc", symlinks=True)
    etc = host / "etc"
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{address} {name}\n")
    (etc / "fstab").write_text("")
    for db in ("passwd", "shadow", "group", "gshadow"):  # a fresh host: no service user yet
        path = etc / db
        if path.exists():
            kept = [line for line in path.read_text().splitlines(True) if not line.startswith("flare:")]
            path.write_text("".join(kept))
    # systemd: nothing of this machine's enabled units or init scripts; journal in memory only.
    units = etc / "systemd" / "system"
    shutil.rmtree(units)
    units.mkdir()
    for link in etc.glob("rc?.d/S*"):
        link.unlink()
    (etc / "systemd" / "journald.conf").write_text("[Journal]\nStorage=volatile\n")
    wanted = {u.name for u in Path("/lib/systemd/system").glob("*.wants/*")}
    for unit in sorted(wanted - KEEP_UNITS) + EXTRA_MASKED:
        if not (units / unit).is_symlink():
            (units / unit).symlink_to("/dev/null")
    (units / "hclsd-sshd.service").write_text(
        f"[Unit]\nDescription=sshd of test host {name}\n[Service]\n"
        "ExecStart=/usr/sbin/sshd -D -e -f /etc/hclsd-ssh/sshd_config\nRuntimeDirectory=sshd\nKillMode=process\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    (units / "multi-user.target.wants").mkdir()
    (units / "multi-user.target.wants" / "hclsd-sshd.service").symlink_to(units / "hclsd-sshd.service")
    if docker:
        docker_unit(units, name)
    (host / "opt" / "hcls-flare" / "venv").mkdir(parents=True)
    (host / "root").mkdir(mode=0o711)
    (host / "tmp").mkdir()
    (host / "tmp").chmod(0o1777)
    base = Path(sys.base_prefix)  # boot_host binds the venv's python there
    if base.is_relative_to("/root"):
        (host / "root" / base.relative_to("/root")).mkdir(parents=True)
    # The host's sshd reads its files from the host's own /etc (its /tmp, where pytest keeps this, is private).
    ssh = etc / "hclsd-ssh"
    ssh.mkdir()
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh / "ssh_host_key")
    (ssh / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
    (ssh / "sshd_config").write_text(
        f"ListenAddress {address}\nHostKey /etc/hclsd-ssh/ssh_host_key\nAuthorizedKeysFile /etc/hclsd-ssh/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPidFile none\nSubsystem sftp internal-sftp\n"
    )
    sh("ip", "netns", "add", netns(index))
    sh("ip", "link", "add", veth(index), "type", "veth", "peer", "name", "eth0", "netns", netns(index))
    sh("ip", "link", "set", veth(index), "master", BRIDGE, "up")
    for cmd in ("addr add {address}/24 dev eth0", "link set eth0 up", "link set lo up"):
        sh("ip", "netns", "exec", netns(index), "ip", *cmd.format(address=address).split())


def boot_host(index: int, name: str, root: Path) -> subprocess.Popen:
    """Boot host NAME: in its network namespace, a new pid and mount namespace whose PID 1 becomes systemd,
    with the host's own cgroup, /run, /tmp, /etc, /opt and /root. Killing the returned process (unshare,
    --kill-child) kills the whole host, as pulling its plug would; booting again brings up what is enabled."""
    host = root / name
    binds = [(REPO / ".venv", host / "opt" / "hcls-flare" / "venv")]  # read-only, into the host's tree first
    base = Path(sys.base_prefix)  # the venv's python must be reachable from the host's /root too
    if base.is_relative_to("/root"):
        binds.append((base, host / "root" / base.relative_to("/root")))
    script = "set -e; mount --make-rprivate /\n"
    # ip netns exec gave us a fresh /sys: mount systemd's hierarchies only (no resource controllers, so the
    # host's processes stay in this machine's memory and cpu cgroups) and enter this host's cgroup.
    script += "mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup\n"
    for hierarchy, mount in CGROUPS.items():
        cgroup = f"/sys/fs/cgroup/{hierarchy}"
        script += f"mkdir {cgroup}; mount {mount} {cgroup}; mkdir -p {cgroup}/{PREFIX}/{name}\n"
        script += f"echo $$ > {cgroup}/{PREFIX}/{name}/cgroup.procs\n"
    script += "".join(f"mount --bind {src} {dst}; mount -o remount,bind,ro {dst}\n" for src, dst in binds)
    script += "".join(f"mount --rbind {host}{path} {path}\n" for path in ("/etc", "/opt", "/root", "/tmp"))
    script += "mount -t tmpfs -o mode=755 tmpfs /run\n"
    # container=: systemd behaves as a container's init (keeps this stdout, touches no console or hardware).
    script += "exec env -i container=hclsd /lib/systemd/systemd --system --unit=multi-user.target --show-status=false\n"
    log = open(root / f"{name}.boot.log", "a")
    return subprocess.Popen(
        ["ip", "netns", "exec", netns(index), "unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
         "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


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


def known_hosts(key: Path) -> Path:
    """The SSH host keys pinned by scripts/trust_hosts.sh (make trust-hosts) for the session's hosts: the file of
    the coordinator's workspace (HCLS_WORKSPACE, root/coordinator) beside KEY (root/id_ed25519)."""
    return Path(key).parent / "coordinator" / "known_hosts"


def write_inventory(path: Path, key: Path, hosts: dict | None = None, host_vars: dict | None = None,
                    **extra_vars) -> Path:
    """An inventory of the test hosts (HOSTS, or other name -> address[:port]), over SSH as root, with EXTRA_VARS
    for all and HOST_VARS (default: the session's, the container site's runtime; they win over EXTRA_VARS)."""
    host_vars = HOST_VARS if host_vars is None else host_vars
    hosts = hosts or HOSTS
    inventory = {"all": {
        "vars": {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key),
            # Ansible checks host keys by ansible/ansible.cfg (the keys trust_hosts.sh pinned, strictly); this
            # says the same for pytest-testinfra's Ansible backend, which builds its own ssh command from it.
            "ansible_ssh_common_args": f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={known_hosts(key)} "
                                       "-o GlobalKnownHostsFile=/dev/null",
            "flare_participant_server_address": "{{ hostvars['flare-server'].ansible_host }}",
            "flare_participant_data_root": DATA_ROOT,
            "flare_participant_env": {"OMP_NUM_THREADS": 1},
            "flare_participant_privacy": {"min_dataset_size": 2},  # tiny data, as the local inventory's demo
            **extra_vars,
        },
        "children": {
            "flare_server": {"hosts": {n: address(a) for n, a in hosts.items() if n == "flare-server"}},
            "flare_clients": {"hosts": {n: {**address(a), **host_vars.get(n, {})} for n, a in hosts.items()
                                        if n != "flare-server"}},
        },
    }}  # fmt: skip
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def on_host(hosts, name: str, cmd: str, check=True, timeout=300) -> subprocess.CompletedProcess:
    """CMD in a root shell on host NAME, over SSH."""
    result = subprocess.run(
        ["ssh", "-i", hosts["key"], "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "LogLevel=ERROR",
         "-o", "UserKnownHostsFile=/dev/null", f"root@{ALL_HOSTS[name]}", cmd], capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0 or not check, f"{name}: {cmd}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="package")
def ssh_hosts(tmp_path_factory):
    """{"root": dir of the hosts' files, "key": SSH key, "inventory": hosts.yml, "env": for scripts/,
    "container_site": CONTAINER_SITE or None, "native_reason": why it is None, "trusted": scripts/trust_hosts.sh's
    result}. The hosts' SSH host keys are pinned by scripts/trust_hosts.sh (make trust-hosts) in known_hosts(key),
    and every deploy, testinfra connection and control.sh call checks them strictly; only the harness's own root
    shell (wait_for_ssh, on_host) skips the check."""
    if os.geteuid() != 0 or shutil.which("sshd", path="/usr/sbin:/usr/bin") is None:
        pytest.skip("needs root and openssh-server (scripts/setup.sh installs it) to make SSH test hosts")
    native_reason = image_build()
    remove_hosts()
    container_site = None if native_reason else CONTAINER_SITE
    HOST_VARS.clear()
    if container_site:
        HOST_VARS[container_site] = {"flare_participant_runtime": "container"}
    else:
        print(f"SSH test hosts: every participant native: {native_reason}")
    root = tmp_path_factory.mktemp("ssh_hosts")
    key = root / "id_ed25519"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    booted = {}
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for index, (name, address) in enumerate(HOSTS.items()):
            make_host(index, name, address, root, key, docker=name == container_site)
            booted[name] = boot_host(index, name, root)
        for address in HOSTS.values():
            wait_for_ssh(address, key)

        def reboot(name: str) -> float:
            """Kill host NAME's whole pid namespace and boot it again; seconds until its sshd answers."""
            booted[name].kill()
            booted[name].wait(timeout=30)
            started = time.monotonic()
            booted[name] = boot_host(list(HOSTS).index(name), name, root)
            wait_for_ssh(HOSTS[name], key)
            return time.monotonic() - started

        def boot_spare(name: str) -> None:
            """Make and boot the spare host NAME (SPARE_HOSTS), native; removed with the others at the end."""
            index = list(ALL_HOSTS).index(name)
            make_host(index, name, ALL_HOSTS[name], root, key)
            booted[name] = boot_host(index, name, root)
            wait_for_ssh(ALL_HOSTS[name], key)

        # The coordinator (this machine) resolves the server name only for the admin's own processes.
        (root / "coordinator_hosts").write_text(f"127.0.0.1 localhost\n{HOSTS['flare-server']} flare-server\n")
        env = dict(os.environ, HCLS_WORKSPACE=str(root / "coordinator"), MODELS_DIR=str(root / "models"),
                   HCLS_SITE_CONFIGS=str(root / "site_configs"),  # the sites' approvals of job code
                   INVENTORY=str(write_inventory(root / "hosts.yml", key)), SERVER_HOST="flare-server",
                   ANSIBLE_CONFIG=str(REPO / "ansible" / "ansible.cfg"), **TINY_DATA)  # fmt: skip
        # Host keys pinned as a user pins them (make trust-hosts): every deploy checks them strictly.
        trusted = run("trust_hosts.sh", env=env, timeout=120)
        assert known_hosts(key).exists(), trusted.stdout
        hosts = {"root": root, "key": key, "inventory": Path(env["INVENTORY"]), "env": env, "reboot": reboot,
                 "boot_spare": boot_spare,
                 "container_site": container_site, "native_reason": native_reason, "trusted": trusted}  # fmt: skip
        yield hosts
    finally:
        if container_site and container_site in booted:
            # No container may stay in the shared data root (scripts/docker_engine.sh's engine would start it
            # again): remove it, and stop the host's engine cleanly before the host is killed.
            try:
                on_host({"key": key}, container_site, f"docker rm -f flare-{container_site}; systemctl stop docker; "
                        f"rmdir /sys/fs/cgroup/*/{PREFIX}/{container_site}-docker/* /sys/fs/cgroup/*/{PREFIX}/{container_site}-docker "
                        f"/sys/fs/cgroup/*/{PREFIX}", check=False, timeout=120)  # fmt: skip
            except (subprocess.SubprocessError, OSError) as error:
                print(f"{container_site}: could not stop its Docker engine: {error}")
        for host in booted.values():
            host.kill()
        remove_hosts()


@pytest.fixture(scope="package")
def provisioned(ssh_hosts):
    """Kits that dial flare-server, tiny CXR data on each client host under /opt/data, and the jobs the tests submit
    (APPROVED_PROFILES) approved at every site (HCLS_SITE_CONFIGS: the deploy installs the approvals)."""
    env = ssh_hosts["env"]
    run("provision.sh", env=env)
    run("generate_data.sh", "cxr_classification", env=env)
    for i, profile in enumerate(APPROVED_PROFILES):
        path = ssh_hosts["root"] / f"approved_{i}.json"
        path.write_text(json.dumps(profile))
        run("approve.sh", "cxr_classification", path, env=env)
    for site in ("hospital_a", "hospital_b"):
        (Path(env["HCLS_WORKSPACE"]) / "data" / site).rename(ssh_hosts["root"] / site / "opt" / "data")
    return ssh_hosts


def server_job_file(deployed, job_id: str, name: str) -> Path:
    """A file of the server's run folder of job JOB_ID (there while the job runs)."""
    return deployed["root"] / "flare-server" / "opt" / "hcls-flare" / "flare-server" / job_id / name


def round_record(deployed, job_id: str) -> list[dict]:
    """The rounds of the server's rounds.json (hcls.fedavg) of a running job; [] before it is written."""
    try:
        return json.loads(server_job_file(deployed, job_id, "app_server/rounds.json").read_text())["rounds"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def command(*args, env, coordinator=False) -> list:
    """scripts/ARGS[0] ARGS[1:] (or ARGS as they are when ARGS[0] is an absolute path); coordinator=True: with
    /etc/hosts resolving flare-server to the server host, for the admin's processes only (a private mount
    namespace), as a coordinator's DNS would."""
    cmd = [str(args[0] if Path(args[0]).is_absolute() else REPO / "scripts" / args[0]), *map(str, args[1:])]
    if coordinator:
        hosts = Path(env["HCLS_WORKSPACE"]).parent / "coordinator_hosts"
        cmd = ["unshare", "--mount", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$0" "$@"', *cmd]
    return cmd


def run(*args, env, check=True, timeout=900, coordinator=False):
    """command(ARGS...) run to its end (see command)."""
    cmd = command(*args, env=env, coordinator=coordinator)
    started = time.monotonic()
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    result.seconds = time.monotonic() - started
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="package")
def deployed(provisioned):
    """The federation deployed to the three hosts; {"first": the first deploy's result, ...provisioned}."""
    return {**provisioned, "first": run("deploy.sh", env=provisioned["env"])}


RECAP = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def recap(out: str) -> dict:
    """{host: (changed, unreachable, failed)} from the PLAY RECAP."""
    return {host: tuple(map(int, counts)) for host, *counts in RECAP.findall(out)}
