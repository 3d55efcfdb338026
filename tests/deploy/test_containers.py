"""Containers on real parts. Always: the console compose file validated by docker-compose, and the stack's
inventory derived from provision/project.yml. Where a Docker engine can start: the participant image
built air-gapped (debootstrap root filesystem + local wheelhouse, no registry), the single-node stack
brought up by `make compose-prepare` (scripts/compose_prepare.sh: ansible/deploy.yml over
ansible/inventories/compose, every participant of project.yml a compose service rendered and started by
the role flare_participant, on one Docker network; then the console of docker/docker-compose.console.yml)
with freshly provisioned kits and tiny CXR data, a tiny job trained through the admin container, the
containers checked with testinfra's docker backend, a second compose-prepare changing nothing, and
everything torn down.

The engine is scripts/docker_engine.sh's private one, in its own network namespace: the stack's
published ports cannot collide with a federation on this machine.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra
import yaml
from .conftest import IMAGE_FAILED, TEST_TORCH, image_build, recap

REPO = Path(__file__).resolve().parents[2]
CONSOLE = REPO / "docker" / "docker-compose.console.yml"
COMPOSE_INVENTORY = REPO / "ansible" / "inventories" / "compose" / "hosts.sh"
LOCAL_INVENTORY = REPO / "ansible" / "inventories" / "local" / "hosts.sh"
ENGINE_NETNS = "/run/netns/hcls-docker"  # scripts/docker_engine.sh
# Participants and ports come from provision/project.yml, as everywhere else.
PROJECT = yaml.safe_load((REPO / "provision" / "project.yml").read_text())
SERVER = next(p for p in PROJECT["participants"] if p["type"] == "server")
SITES = [p["name"] for p in PROJECT["participants"] if p["type"] == "client"]
FL_PORTS = sorted({SERVER["fed_learn_port"], SERVER.get("admin_port", SERVER["fed_learn_port"])})
ADMIN = next(p["name"] for p in PROJECT["participants"] if p.get("role") == "project_admin")
# The test image's torch: TEST_TORCH (conftest.py), a CPU build; the SSH tests' container site runs the same image.
TINY_DATA = json.loads((Path(__file__).resolve().parents[1] / "tiny_data.json").read_text())
TINY_CXR = {k: v for k, v in TINY_DATA.items() if k.startswith("CXR_")}
TINY_PROFILE = json.loads((Path(__file__).resolve().parents[1] / "tiny_cxr_profile.json").read_text())  # 2 rounds, 32 px
# Run inside flare-admin with the FLARE API of the image: submit, wait, print the final status.
SUBMIT = """
import shutil, sys, tempfile
from nvflare.fuel.flare_api.flare_api import new_secure_session
job = shutil.copytree(sys.argv[1], tempfile.mkdtemp() + "/job")  # the API signs the folder it submits
session = new_secure_session(sys.argv[3], "/workspace", timeout=60)
try:
    job_id = session.submit_job(job)
    print("job id", job_id, flush=True)
    session.monitor_job(job_id, timeout=int(sys.argv[2]))
    print("status", session.get_job_meta(job_id)["status"])
finally:
    session.close()
"""
# Values for every variable the console file requires, to validate it without a prepared stack.
CONFIG_ENV = {
    "FLARE_IMAGE": "hcls-flare:test", "FLARE_NETWORK": "hcls-test", "FLARE_ADMIN_KIT": "/srv/admin",
    "FLARE_JOBS": "/srv/jobs", "FLARE_TENSORBOARD_EVENTS": "/srv/flare-server/tensorboard",
}  # fmt: skip


def mounts_a_key(source: str) -> bool:
    """Whether a mount's host path is a key file, a startup kit's startup/ or a folder holding one."""
    path = Path(source)
    return path.suffix == ".key" or "startup" in path.parts or (path.is_dir() and any(path.rglob("*.key")))


def container(participant: str) -> str:
    """The container of a participant, as the role names it."""
    return f"flare-{participant}"


def sh(*cmd, env=None, check=True, timeout=900, stdin=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in cmd], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, input=stdin
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def compose_config(*files: Path) -> subprocess.CompletedProcess:
    args = [a for f in files for a in ("-f", f)]
    return sh("docker-compose", *args, "config", "-q", env={**os.environ, **CONFIG_ENV}, check=False, timeout=60)


def test_every_compose_file_is_valid():
    result = compose_config(CONSOLE)
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (REPO / "docker").glob("docker-compose*.yml"))
    assert files == [CONSOLE.name]  # a new compose file gets validated here too
    for name in [SERVER["name"], *SITES, *map(str, FL_PORTS)]:  # participants are the role's to describe
        assert name not in CONSOLE.read_text()


@pytest.mark.parametrize("bind", [None, "0.0.0.0"], ids=["default", "TENSORBOARD_BIND"])
def test_tensorboard_publishes_on_localhost_and_mounts_only_its_events(bind):
    """docker-compose's own reading of the console file: TensorBoard's port on 127.0.0.1 unless TENSORBOARD_BIND says
    otherwise; one mount, read-only: the server's TensorBoard events (no key, no startup/ folder, no workspace)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORBOARD_")}
    env.update(CONFIG_ENV, **({"TENSORBOARD_BIND": bind} if bind else {}))
    config = yaml.safe_load(sh("docker-compose", "-f", CONSOLE, "config", env=env, timeout=60).stdout)
    tensorboard = config["services"]["tensorboard"]
    assert tensorboard["ports"] == [f"{bind or '127.0.0.1'}:6006:6006/tcp"]
    assert tensorboard["volumes"] == [f"{CONFIG_ENV['FLARE_TENSORBOARD_EVENTS']}:/runs:ro"]
    for service in config["services"].values():
        for volume in service["volumes"]:
            assert ".key" not in volume and "/startup" not in volume.split(":")[0], volume


def test_an_invalid_key_is_named(tmp_path):
    broken = tmp_path / CONSOLE.name
    admin = "    container_name: flare-admin\n"
    broken.write_text(CONSOLE.read_text().replace(admin, admin + "    restart_policy: always\n"))
    result = compose_config(broken)
    assert result.returncode != 0 and "restart_policy" in result.stderr, result.stderr


@pytest.mark.parametrize("inventory", [COMPOSE_INVENTORY, LOCAL_INVENTORY], ids=["compose", "local"])
def test_the_inventories_list_the_participants_of_project_yml(inventory):
    ansible_inventory = Path(sys.executable).parent / "ansible-inventory"
    listed = json.loads(sh(ansible_inventory, "-i", inventory, "--list", timeout=60).stdout)
    assert listed["flare_server"]["hosts"] == [SERVER["name"]]
    assert listed["flare_clients"]["hosts"] == SITES


@pytest.mark.parametrize("inventory", [COMPOSE_INVENTORY, LOCAL_INVENTORY], ids=["compose", "local"])
def test_local_connections_need_no_host_keys(inventory, tmp_path):
    """make trust-hosts and the deploy's host key check over the local and compose inventories (ansible_connection
    local): nothing to pin, nothing asked, no known_hosts written; the demo and the stack deploy without SSH keys."""
    env = {**os.environ, "INVENTORY": str(inventory), "HCLS_WORKSPACE": str(tmp_path / "workspace")}
    trusted = sh(REPO / "scripts" / "trust_hosts.sh", env=env, timeout=60)
    assert "is reached over SSH: no host key to pin" in trusted.stdout
    sh(REPO / "scripts" / "trust_hosts.sh", "--check", env=env, timeout=60)
    assert not (tmp_path / "workspace" / "known_hosts").exists()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The air-gapped image, and the stack up (make compose-prepare) with kits and tiny CXR data; torn down at the end."""
    built = image_build()  # conftest.py's, in the background: below, the image is up to date
    if built.startswith(IMAGE_FAILED):
        raise AssertionError(built)
    already_running = sh(REPO / "scripts" / "docker_engine.sh", "status", check=False).returncode == 0
    started = sh(REPO / "scripts" / "docker_engine.sh", "start", check=False, timeout=120)
    if started.returncode != 0:
        pytest.skip(f"no Docker engine can start on this machine: {started.stderr.strip()}")
    docker_host = re.search(r"DOCKER_HOST=(\S+)", started.stdout).group(1)
    saved_docker_host = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = docker_host  # for testinfra's docker backend
    work = tmp_path_factory.mktemp("containers")
    env = {**os.environ, "HCLS_WORKSPACE": str(work / "workspace"), "TORCH_REQUIREMENT": TEST_TORCH,
           "SERVER_HOST": SERVER["name"], "HCLS_SITE_CONFIGS": str(work / "site_configs"), **TINY_CXR}  # fmt: skip
    try:
        leftovers = sh("docker", "ps", "-aq", "--filter", "name=^flare-", env=env).stdout.split()  # a crashed run's
        if leftovers:
            sh("docker", "rm", "-f", *leftovers, env=env)
        # Cold: debootstrap ~1-2 min, wheelhouse ~15 s, docker build ~3-4 min on 2 idle cores; then cached by build key.
        sh(REPO / "scripts" / "build_image.sh", "airgapped", env=env, timeout=1800)
        sh(REPO / "scripts" / "provision.sh", env=env)
        sh(REPO / "scripts" / "generate_data.sh", "cxr_classification", env=env)
        profile = work / "tiny.json"
        profile.write_text(json.dumps(TINY_PROFILE))
        # Built as submit builds it, and approved at every site (HCLS_SITE_CONFIGS): the deploy installs the approval.
        sh(REPO / "scripts" / "approve.sh", "cxr_classification", profile, env=env)
        first = sh(REPO / "scripts" / "compose_prepare.sh", env=env, timeout=600)
        image = sh(REPO / "scripts" / "build_image.sh", "tag", env=env).stdout.strip()
        compose = work / "workspace" / "compose"
        network = yaml.safe_load((compose / SERVER["name"] / "compose.yml").read_text())["networks"]
        yield {"env": env, "work": work, "compose": compose, "image": image, "first": first,
               "network": next(iter(network.values()))["name"]}  # fmt: skip
    finally:
        for name in [SERVER["name"], *SITES, "admin", "tensorboard"]:
            print(f"--- {container(name)}\n" + sh("docker", "logs", "--tail", "30", container(name), env=env, check=False).stdout)
        down = sh(REPO / "scripts" / "compose_prepare.sh", "down", env=env, check=False, timeout=300)
        print(down.stdout[-3000:], down.stderr[-3000:])
        sh("docker", "network", "rm", "hcls-flare", env=env, check=False)
        if saved_docker_host is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = saved_docker_host
        if not already_running:
            sh(REPO / "scripts" / "docker_engine.sh", "stop", check=False, timeout=120)


def test_compose_prepare_deployed_every_participant_with_the_role(stack):
    hosts = recap(stack["first"].stdout)
    assert set(hosts) == {SERVER["name"], *SITES}, stack["first"].stdout
    assert all(changed > 0 and unreachable == failed == 0 for changed, unreachable, failed in hosts.values())
    for name in [SERVER["name"], *SITES]:
        service = yaml.safe_load((stack["compose"] / name / "compose.yml").read_text())["services"]
        (spec,) = service.values()
        assert "network_mode" not in spec and spec["networks"][stack["network"]]["aliases"] == [name]
        assert spec["container_name"] == container(name) and spec["user"] == "2710:2710"
        assert spec.get("ports", []) == ([f"{p}:{p}" for p in FL_PORTS] if name == SERVER["name"] else [])


def test_the_image_was_built_without_a_registry(stack):
    image = json.loads(sh("docker", "image", "inspect", stack["image"], env=stack["env"]).stdout)[0]
    assert image["Config"]["User"] == "flare"
    history = sh("docker", "history", "--format", "{{.Comment}}", stack["image"], env=stack["env"]).stdout.split("\n")
    assert history[-2] == "Imported from -"  # the base layer came from `docker import` of a debootstrap tree
    site = testinfra.get_host(f"docker://{container(SITES[0])}")
    versions = site.check_output(
        "python -c 'import nvflare, monai, torch; print(nvflare.__version__, monai.__version__, torch.__version__)'"
    )
    assert versions.split()[:2] == ["2.9.0", "1.6.1"] and versions.split()[2] == TEST_TORCH.split("==")[1]


def test_tiny_cxr_job_completes_in_the_stack(stack):
    env = stack["env"]
    submit = subprocess.Popen(["docker", "exec", "-i", "flare-admin", "python", "-", "/jobs/cxr_classification", "600",
                               ADMIN], env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    submit.stdin.write(SUBMIT)
    submit.stdin.close()
    first = ""
    while not (submitted := re.search(r"job id (\S+)", first)):
        line = submit.stdout.readline()
        assert line, f"no job id from flare-admin: {first}"
        first += line
    job_id = submitted.group(1)
    # While it runs, the site's flarectl.sh (what a deploy asks before restarting it) names the job.
    site_ctl = stack["compose"] / SITES[0] / "flarectl.sh"
    deadline = time.monotonic() + 120
    while job_id not in sh(site_ctl, "jobs", env=env).stdout:
        assert time.monotonic() < deadline, f"flarectl.sh jobs never listed {job_id} on {SITES[0]}"
        time.sleep(1)
    out = first + submit.stdout.read()
    assert submit.wait(timeout=700) == 0 and "status FINISHED:COMPLETED" in out, out
    server_log = sh("docker", "logs", container(SERVER["name"]), env=env).stdout
    assert "Round 1 finished" in server_log
    assert (stack["compose"] / SERVER["name"] / "storage" / "jobs-storage" / job_id).exists()


def test_sites_run_as_the_service_user_with_read_only_data(stack):
    for site in SITES:
        host = testinfra.get_host(f"docker://{container(site)}")
        assert host.user().name == "flare" and host.user().uid == 2710
        assert host.process.get(pid=1).comm == "docker-init"  # init: true
        python = host.process.filter(comm="python3")
        clients = [p for p in python if "client_train" in p.args and f"uid={site}" in p.args]
        assert len(clients) == 1 and clients[0].user == "flare"
        key = host.file("/workspace/startup/client.key")
        assert key.mode == 0o600 and key.user == "flare"
        data_root = str(stack["work"] / "workspace" / "data" / site)  # make data's; mounted at the same path
        site_config = json.loads(host.file("/workspace/local/site_config.json").content_string)
        assert site_config["site_name"] == site and site_config["data_root"] == data_root
        assert "ro" in host.mount_point(data_root).options
        assert host.file(f"{data_root}/{site_config['datasets']['cxr_classification']}/train.csv").exists
        assert host.run(f"touch {data_root}/written-by-a-job").rc != 0
        assert host.file("/workspace/local/custom/site_privacy").is_directory
        port = SERVER["fed_learn_port"]
        assert host.run(f"bash -c 'exec 3<>/dev/tcp/{SERVER['name']}/{port}'").rc == 0  # the server by its name


def test_check_data_runs_in_the_participant_image(stack):
    """make check-data over the compose inventory: the site's check runs in its image (docker run, no network)
    with the service's data mount and site config; only the summary comes back."""
    site, env = SITES[0], {**stack["env"], "INVENTORY": str(COMPOSE_INVENTORY)}
    out = sh(REPO / "scripts" / "check_data.sh", site, "cxr_classification", env=env, timeout=300).stdout
    assert f"== {site} cxr_classification: ok" in out, out
    saved = stack["work"] / "workspace" / "check-data" / site / "cxr_classification.json"
    summary = json.loads(saved.read_text())
    assert summary["ok"] and summary["splits"]["training"]["images"] == int(TINY_CXR["CXR_N_TRAIN"])
    assert str(stack["work"]) not in saved.read_text()


def test_server_admin_and_tensorboard(stack):
    server = testinfra.get_host(f"docker://{container(SERVER['name'])}")
    assert [p.user for p in server.process.filter(comm="python3") if "server_train" in p.args] == ["flare"]
    assert server.file("/workspace/startup/server.key").mode == 0o600
    assert "/workspace/storage" in server.file("/workspace/local/resources.json").content_string

    admin = testinfra.get_host("docker://flare-admin")
    assert admin.file("/workspace/startup/fed_admin.json").exists
    assert admin.user().uid == 2710 and admin.file("/jobs/cxr_classification/meta.json").exists
    assert admin.run("touch /jobs/written-by-the-admin").rc != 0
    assert not admin.process.filter(comm="python3")

    tensorboard = testinfra.get_host("docker://flare-tensorboard")
    assert [p for p in tensorboard.process.filter(user="flare") if "tensorboard --logdir /runs" in p.args]
    probe = "python -c 'import urllib.request; print(urllib.request.urlopen(\"http://localhost:6006\").status)'"
    assert tensorboard.check_output(probe) == "200"


def test_tensorboard_is_on_localhost_and_mounts_only_the_event_folders(stack):
    """The real containers (docker inspect): TensorBoard's port is published on 127.0.0.1 only; it mounts one folder,
    read-only: the server's tensorboard/, where the server linked the tiny job's events (they outlive the job's run
    folder, which the server deleted), and TensorBoard lists those runs. No container mounts a key it does not
    need: the admin its own kit, each participant its own workspace (the kit's key is its own)."""
    env, server = stack["env"], SERVER["name"]
    inspected = {c["Name"].lstrip("/"): c for c in json.loads(sh(
        "docker", "inspect", *map(container, [server, *SITES, "admin", "tensorboard"]), env=env).stdout)}  # fmt: skip
    tb = inspected["flare-tensorboard"]
    assert tb["HostConfig"]["PortBindings"] == {"6006/tcp": [{"HostIp": "127.0.0.1", "HostPort": "6006"}]}
    events = stack["compose"] / server / "tensorboard"
    assert [(m["Type"], m["Source"], m["Destination"], m["RW"]) for m in tb["Mounts"]] == [("bind", str(events), "/runs", False)]
    assert not mounts_a_key(str(events))
    admin_mounts = {m["Destination"]: m["Source"] for m in inspected["flare-admin"]["Mounts"]}
    assert admin_mounts == {"/workspace": str(stack["compose"] / "admin"), "/jobs": str(stack["work"] / "workspace" / "jobs")}
    for name in [server, *SITES]:
        keyed = [m["Source"] for m in inspected[container(name)]["Mounts"] if mounts_a_key(m["Source"])]
        assert keyed == [str(stack["compose"] / name)], f"{name} mounts keys of {keyed}"

    job_ids = [p.name for p in (stack["compose"] / server / "storage" / "jobs-storage").iterdir()]
    assert job_ids, "no job ran in the stack"
    for job_id in job_ids:
        assert not (stack["compose"] / server / job_id).exists()  # the run folder is gone, its events stay
        for site in SITES:
            assert list((events / job_id / "tb_events" / site).glob("events.out.tfevents.*")), f"{job_id} {site}"
    tensorboard = testinfra.get_host("docker://flare-tensorboard")
    assert not tensorboard.run("find /runs -name '*.key' -o -name startup").stdout.strip()
    runs_url = "http://localhost:6006/data/runs"
    probe = f"python -c 'import urllib.request; print(urllib.request.urlopen(\"{runs_url}\").read().decode())'"
    deadline = time.monotonic() + 60
    while not all(f"{job_ids[0]}/tb_events/{site}" in (runs := tensorboard.check_output(probe)) for site in SITES):
        assert time.monotonic() < deadline, f"TensorBoard lists {runs}"
        time.sleep(2)


def test_published_ports_answer_in_the_engines_namespace(stack):
    if not Path(ENGINE_NETNS).exists():
        pytest.skip("the engine is not scripts/docker_engine.sh's: its published ports are not probed")
    for port in (*FL_PORTS, 6006):
        probe = sh("nsenter", f"--net={ENGINE_NETNS}", "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}", check=False)
        assert probe.returncode == 0, f"port {port}: {probe.stderr}"


def test_second_compose_prepare_changes_nothing_and_day2_operations_see_the_stack(stack):
    env = stack["env"]
    ids = {name: sh("docker", "inspect", "-f", "{{.Id}}", container(name), env=env).stdout for name in [SERVER["name"], *SITES]}
    again = sh(REPO / "scripts" / "compose_prepare.sh", env=env, timeout=600)
    assert recap(again.stdout) == {name: (0, 0, 0) for name in [SERVER["name"], *SITES]}, again.stdout
    assert {name: sh("docker", "inspect", "-f", "{{.Id}}", container(name), env=env).stdout for name in ids} == ids

    status = sh(REPO / "scripts" / "control.sh", "status", env={**env, "INVENTORY": str(COMPOSE_INVENTORY)}).stdout
    status = " ".join(status.split())  # Ansible wraps long messages
    for name in [SERVER["name"], *SITES]:
        assert re.search(rf"{name} running \(pid \d+ in container {container(name)}, healthy\), 0 restarts", status), status
