"""The three SSH test hosts of custom/ops/ssh_test_hosts.py (flare-server, hospital_a, hospital_b: network
namespaces booted like machines, systemd and sshd in each), shared by the package's tests: provisioned, with tiny
demo data under /opt/data, and deployed. Everything made here is removed at the end, also on failure, and first of
all leftovers of a crashed run. One site can run its participant as a container of the air-gapped image."""

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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "custom"))

from ops import ssh_test_hosts  # noqa: E402
from ops.ssh_test_hosts import (  # noqa: E402, F401 (the package's tests import these from here)
    ALL_HOSTS, DOCKER_DATA_ROOT, HOSTS, PREFIX, SPARE_HOSTS, boot_host, known_hosts, make_host,
    netns, remove_booted, remove_hosts, sh, veth, wait_for_ssh,
)

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

# The site that runs its participant as a compose service of the air-gapped image (flare_participant_runtime:
# container) under a Docker engine of its own systemd, when one can run here; the other sites stay native.
CONTAINER_SITE = "hospital_b"
# Host variables of the session's inventories (write_inventory): the container site's, once ssh_hosts chose it.
HOST_VARS: dict = {}


def write_inventory(path: Path, key: Path, hosts: dict | None = None, host_vars: dict | None = None,
                    **extra_vars) -> Path:
    """ssh_test_hosts.write_inventory, with the session's HOST_VARS unless HOST_VARS is given."""
    return ssh_test_hosts.write_inventory(path, key, hosts, HOST_VARS if host_vars is None else host_vars, **extra_vars)
ENGINE = REPO / "scripts" / "docker_engine.sh"
# The test image installs a CPU build of torch (in pip's find-links on these machines, ~200 MB) instead
# of the pinned CUDA build (~5 GB) so that it builds in a few minutes; torchvision, which needs the
# pinned torch, is left out (the CXR job does not use it). nvflare and MONAI are requirements.txt's.
TEST_TORCH = "torch==2.13.0+cpu"


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
    if reason := ssh_test_hosts.can_make_hosts():
        pytest.skip(reason)
    native_reason = image_build()
    container_site = None if native_reason else CONTAINER_SITE
    HOST_VARS.clear()
    if container_site:
        HOST_VARS[container_site] = {"flare_participant_runtime": "container"}
    else:
        print(f"SSH test hosts: every participant native: {native_reason}")
    root = tmp_path_factory.mktemp("ssh_hosts")
    key = root / "id_ed25519"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    booted = ssh_test_hosts.boot_hosts(root, key, HOSTS, docker_site=container_site)
    try:
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
        remove_booted(booted)


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
