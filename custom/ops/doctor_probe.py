"""What `make doctor` reads on a participant's host (ansible/doctor.yml runs it as root with the host's python3; standard
library only). Reads, changes nothing, prints one JSON object on stdout:

    python3 doctor_probe.py '{"ws": ..., "runtime": "native"|"container", "python_bin": ..., "container": ...,
                              "image": ..., "is_server": bool, "server_ports": [fed_learn_port, admin_port]}'

- time: this host's clock (UTC epoch seconds), read first; elapsed: seconds the probe took after reading it;
- versions: nvflare, monai, torch of the python that runs the participant (the venv; the running container, else a
  one-off container of the image), from the installed packages' metadata;
- certs: the kit's public certificates (startup/*.crt, rootCA.pem) as PEM text, never a key;
- privacy: the scope names of local/privacy.json (clients);
- gpus: /dev/nvidia<N> present, the site's gpu_ids (local/site_config.json) and the GPUs its resource manager offers
  (local/resources.json);
- disk: free and total bytes of the filesystem of the workspace;
- reach: whether the server named by the kit (startup/fed_client.json) accepts TCP connections on each port, from
  where the participant runs (the participant's python: in its container for the container runtime) (clients);
- preflight: NVFlare's own preflight rule for a client kit (nvflare.tool.package_checker CheckServerAvailable:
  a mutual-TLS connection to the server with the kit's certificates), run by the participant's python (clients);
- running: flarectl.sh status.
Each fact that could not be read is {"error": "..."} in its place; the probe itself never fails on one.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

TIMEOUT = 60  # seconds for each command the probe runs
PACKAGES = ("nvflare", "monai", "torch")
VERSIONS = (
    "import importlib.metadata as m, json\n"
    "def v(p):\n"
    "    try:\n"
    "        return m.version(p)\n"
    "    except m.PackageNotFoundError:\n"
    "        return None\n"
    f"print(json.dumps({{p: v(p) for p in {PACKAGES!r}}}))\n"
)
# A TCP connection to the server on each port: {port: {"ok", "seconds" or "error"}}.
REACH = (
    "import json, socket, sys, time\n"
    "out = {}\n"
    "for port in json.loads(sys.argv[2]):\n"
    "    t = time.monotonic()\n"
    "    try:\n"
    "        socket.create_connection((sys.argv[1], int(port)), timeout=5).close()\n"
    "        out[str(port)] = {'ok': True, 'seconds': round(time.monotonic() - t, 3)}\n"
    "    except OSError as err:\n"
    "        out[str(port)] = {'ok': False, 'error': f'{type(err).__name__}: {err}'}\n"
    "print(json.dumps(out))\n"
)
# NVFlare's client-side preflight rule (nvflare preflight-check runs it, then a dry run of a second participant with
# the same identity, which must not happen beside the running one): problem "PASSED" or what is wrong.
PREFLIGHT = (
    "import json, sys\n"
    "from nvflare.tool.package_checker.check_rule import CheckServerAvailable\n"
    "r = CheckServerAvailable(name='Check server available', role='client')(sys.argv[1], None)\n"
    "print(json.dumps({'problem': r.problem, 'solution': r.solution}))\n"
)


def run(argv, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def last_json(out: str):
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def fact(fn):
    try:
        return fn()
    except Exception as err:  # every fact independent: one unreadable fact is reported, the others still are
        return {"error": f"{type(err).__name__}: {err}"}


def container_running(name: str) -> bool:
    r = run(["docker", "inspect", "-f", "{{.State.Running}}", name])
    return r.returncode == 0 and r.stdout.strip() == "true"


def python_cmd(args: dict, code: str, *extra) -> list:
    """argv running CODE with the participant's python: the venv's (native), inside its running container, or a
    one-off container of its image with no network (container runtime, participant stopped)."""
    if args["runtime"] == "container":
        if container_running(args["container"]):
            return ["docker", "exec", "-e", "PYTHONDONTWRITEBYTECODE=1", args["container"], "python3", "-c", code, *extra]
        return ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", args["image"], "-c", code, *extra]
    return [os.path.join(args["python_bin"], "python3"), "-c", code, *extra]


def versions(args: dict) -> dict:
    r = run(python_cmd(args, VERSIONS))
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return {"source": "image " + args["image"] if args["runtime"] == "container" else args["python_bin"], **last_json(r.stdout)}


def certs(ws: str) -> dict:
    found = sorted(glob.glob(os.path.join(ws, "startup", "*.crt"))) + [os.path.join(ws, "startup", "rootCA.pem")]
    return {os.path.basename(p): open(p).read() for p in found if os.path.isfile(p)}


def privacy(ws: str) -> dict:
    path = os.path.join(ws, "local", "privacy.json")
    with open(path) as f:
        policy = json.load(f)
    return {"file": path, "scopes": [s.get("name") for s in policy.get("scopes", [])],
            "default_scope": policy.get("default_scope")}  # fmt: skip


def gpus(ws: str) -> dict:
    present = sorted(int(p[len("/dev/nvidia"):]) for p in glob.glob("/dev/nvidia[0-9]*") if p[len("/dev/nvidia"):].isdigit())
    names = []
    if shutil.which("nvidia-smi"):
        r = run(["nvidia-smi", "-L"], timeout=30)
        names = r.stdout.splitlines() if r.returncode == 0 else [f"nvidia-smi failed: {r.stderr.strip()}"]
    out = {"present": present, "nvidia_smi": names}
    site_config = os.path.join(ws, "local", "site_config.json")
    if os.path.isfile(site_config):
        with open(site_config) as f:
            out["gpu_ids"] = json.load(f).get("gpu_ids", [])
    resources = os.path.join(ws, "local", "resources.json")
    if os.path.isfile(resources):
        with open(resources) as f:
            for c in json.load(f).get("components", []):
                if c.get("id") == "resource_manager":
                    out["offered"] = c.get("args", {}).get("num_of_gpus")
    return out


def disk(ws: str) -> dict:
    usage = shutil.disk_usage(ws)
    return {"path": ws, "free": usage.free, "total": usage.total}


def reach(args: dict) -> dict:
    """From where the participant runs (its container's network for the container runtime, else this host's)."""
    with open(os.path.join(args["ws"], "startup", "fed_client.json")) as f:
        target = json.load(f)["servers"][0]["service"]["target"]
    host = target.rsplit(":", 1)[0]
    r = run(python_cmd(args, REACH, host, json.dumps(args["server_ports"])))
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return {"server": host, "ports": last_json(r.stdout)}


def preflight(args: dict) -> dict:
    kit = "/workspace" if args["runtime"] == "container" and container_running(args["container"]) else args["ws"]
    r = run(python_cmd(args, PREFLIGHT, kit))
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return {"rule": "CheckServerAvailable", **last_json(r.stdout)}


def running(ws: str) -> dict:
    r = run([os.path.join(ws, "flarectl.sh"), "status"])
    return {"rc": r.returncode, "status": (r.stdout or r.stderr).strip()}


def main() -> int:
    now, started = time.time(), time.monotonic()
    args = json.loads(sys.argv[1])
    ws = args["ws"]
    report = {"time": now, "deployed": os.path.isfile(os.path.join(ws, "flarectl.sh")) and os.path.isdir(os.path.join(ws, "startup"))}
    if report["deployed"]:
        report["running"] = fact(lambda: running(ws))
        report["versions"] = fact(lambda: versions(args))
        report["certs"] = fact(lambda: certs(ws))
        report["disk"] = fact(lambda: disk(ws))
        report["gpus"] = fact(lambda: gpus(ws))
        if not args["is_server"]:
            report["privacy"] = fact(lambda: privacy(ws))
            report["reach"] = fact(lambda: reach(args))
            report["preflight"] = fact(lambda: preflight(args))
    report["elapsed"] = time.monotonic() - started  # the controller's "after" minus this brackets "time"
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
