"""SSH test hosts for deploying over real SSH on one machine (tests/deploy and row "operations" of make bench):
the participants of provision/project.yml (the server and the sites), each a network namespace on a bridge with its
own address, booted like a machine: a pid namespace whose PID 1 is systemd (the host's supervisor of the
participants), which runs the host's sshd as a unit. Each host has its own /etc, /opt, /root, /tmp and /run (bind
mounts and a tmpfs in its mount namespace) and its own cgroup (hclsd/<host> in systemd's hierarchies); units a
container does not need are masked in its /etc. The hosts have the project venv at /opt/hcls-flare/venv
(read-only), as production hosts have theirs. Needs root and openssh-server (scripts/setup.sh installs it). One set
at a time on a machine: boot_hosts removes what another set left (its names and addresses are these)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

PREFIX = "hclsd"  # namespaces hclsd-h<i>, root-side veths hclsd-v<i>, bridge hclsd-br
BRIDGE, BRIDGE_ADDR = f"{PREFIX}-br", "10.77.0.1"
_PARTICIPANTS = yaml.safe_load((REPO / "provision" / "project.yml").read_text())["participants"]
SERVER = next(p["name"] for p in _PARTICIPANTS if p["type"] == "server")
SITES = [p["name"] for p in _PARTICIPANTS if p["type"] == "client"]
# provision/project.yml's server and sites (one host each) at .10, .11, ... of the bridge's network
HOSTS = {name: f"10.77.0.{10 + i}" for i, name in enumerate([SERVER, *SITES])}
DATA_ROOT = "/opt/data"  # on every client host
# A host that test_ssh_sites.py adds to the running federation (make add-site): made and booted only there.
SPARE_HOSTS = {"hospital_c": f"10.77.0.{10 + len(HOSTS)}"}
ALL_HOSTS = {**HOSTS, **SPARE_HOSTS}
DOCKER_DATA_ROOT = "/var/lib/hcls-docker"  # scripts/docker_engine.sh's, which holds the image test_containers built
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
    # The host's sshd reads its files from the host's own /etc (its /tmp, where a test keeps this, is private).
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
    for all and HOST_VARS per host (e.g. a container site's runtime; they win over EXTRA_VARS)."""
    host_vars = host_vars or {}
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


def can_make_hosts() -> str:
    """Why SSH test hosts cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return "making SSH test hosts needs root (network namespaces, mounts)"
    if shutil.which("sshd", path="/usr/sbin:/usr/bin") is None:
        return "making SSH test hosts needs openssh-server (scripts/setup.sh installs it)"
    return ""


def boot_hosts(root: Path, key: Path, hosts: dict, docker_site: str | None = None) -> dict:
    """Make and boot HOSTS (name -> address) under ROOT on a new bridge, each reachable over SSH with KEY (its
    public half authorized); DOCKER_SITE also gets a Docker engine. Leftovers of a crashed run are removed first.
    Returns {name: the host's process} (killing it pulls the host's plug); on failure every host is removed."""
    remove_hosts()
    booted = {}
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for name, address in hosts.items():
            index = list(ALL_HOSTS).index(name)
            make_host(index, name, address, root, key, docker=name == docker_site)
            booted[name] = boot_host(index, name, root)
        for address in hosts.values():
            wait_for_ssh(address, key)
    except BaseException:
        remove_booted(booted)
        raise
    return booted


def remove_booted(booted: dict) -> None:
    """Kill the hosts BOOTED (boot_hosts, boot_host) and remove every test host."""
    for host in booted.values():
        host.kill()
    remove_hosts()
