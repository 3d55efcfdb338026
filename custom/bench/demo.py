"""Row "demo" (the issue's row "operations", its demo part): `make demo` end to end on a fresh workspace (provision,
data, approvals, deploy, every job trained with the demo profile, the best models fetched, the federation stopped),
and the federation's peak memory during it. Targets: the three jobs in <= 15 minutes on 2 cores, the federation's
memory <= 3 GB.

The memory is sampled every SAMPLE_S seconds over every process of the federation: the server's and the sites' NVFlare
processes started from the workspace and every process under them (job processes, trainers). Each sample
sums, over those processes, PSS (shared pages such as torch's libraries shared out between the processes that map
them, so each is counted once) and RSS (shared pages counted in each process); the row reports the peak of each.
QUICK: the CXR job alone on small data (no target)."""

import os
import re
import shutil
import threading
from pathlib import Path

from .table import Measurement, timed

REPO = Path(__file__).resolve().parents[2]
SAMPLE_S = 2.0
QUICK_DATA = {"CXR_N_TRAIN": "24", "CXR_N_VAL": "16", "CXR_SIZE": "32", "CXR_LAYOUTS": "project"}


def proc_kib(path: Path, field: str) -> int:
    """The ``field:`` line's kB of a /proc file (0 if the process is gone or the field absent)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def federation_pids(workspace: str) -> list[int]:
    """The server's and the sites' NVFlare processes of ``workspace`` (``nvflare.private.fed.app`` with the workspace
    in their command line) and every process under them: job processes and trainers."""
    parent, roots = {}, []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if "nvflare.private.fed.app" in cmdline and workspace in cmdline:
            roots.append(int(proc.name))
    children = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return sorted(found)


def command(pid: int) -> str:
    """``<pid> <what it runs>``: the last part of the module ``-m`` names, else its first ``.py`` argument."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return str(pid)
    modules = [args[i + 1].rsplit(".", 1)[-1] for i, a in enumerate(args[:-1]) if a == "-m"]
    return f"{pid} {(modules + [a for a in args if a.endswith('.py')] + args)[0]}"


class MemorySampler(threading.Thread):
    """Peak summed PSS and RSS (bytes) of the federation's processes, and the most processes seen at once."""

    def __init__(self, workspace: Path):
        super().__init__(daemon=True)
        self.workspace, self.done = str(workspace.resolve()), threading.Event()
        self.peak_pss = self.peak_rss = self.peak_processes = 0
        self.peak_detail = {}  # at the PSS peak: "<pid> <what it runs>" -> PSS bytes

    def run(self):
        while not self.done.wait(SAMPLE_S):
            pss = {p: proc_kib(Path(f"/proc/{p}/smaps_rollup"), "Pss") * 1024 for p in federation_pids(self.workspace)}
            rss = sum(proc_kib(Path(f"/proc/{p}/status"), "VmRSS") for p in pss) * 1024
            if sum(pss.values()) > self.peak_pss:
                self.peak_pss, self.peak_detail = sum(pss.values()), {command(p): n for p, n in pss.items()}
            self.peak_rss, self.peak_processes = max(self.peak_rss, rss), max(self.peak_processes, len(pss))

    def stop(self):
        self.done.set()
        self.join()


def steps(log: str) -> list[tuple[str, int]]:
    """(step, seconds it took) of each step of a demo.sh log (its ``== <step> (<seconds since start>s)`` lines)."""
    marks = [(m.group(1), int(m.group(2))) for m in re.finditer(r"^== (.+) \((\d+)s\)$", log, re.MULTILINE)]
    return [(step, marks[i + 1][1] - at) for i, (step, at) in enumerate(marks[:-1])]


def run(quick: bool, work: Path) -> list[Measurement]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    workspace = work / "workspace"
    env = {**os.environ, "HCLS_WORKSPACE": str(workspace), "MODELS_DIR": str(work / "models"),
           **(QUICK_DATA if quick else {})}  # fmt: skip
    env.pop("INVENTORY", None)  # the local federation's
    jobs = "cxr_classification" if quick else ""  # empty: every job
    sampler = MemorySampler(workspace)
    sampler.start()
    try:
        seconds = timed([REPO / "scripts" / "demo.sh", "", jobs], env, REPO, work / "demo.log")
    finally:
        sampler.stop()
    for step, took in steps((work / "demo.log").read_text()):
        print(f"bench:   {step}: {took} s", flush=True)
    for process, pss in sorted(sampler.peak_detail.items(), key=lambda item: -item[1]):
        print(f"bench:   at the memory peak: {process} PSS {pss / 1e9:.2f} GB", flush=True)
    what = ("`make demo JOB=cxr_classification`, small data (QUICK)" if quick else
            "`make demo`, three jobs, fresh workspace")  # fmt: skip
    target = {} if quick else {"target": "<= 900 s", "met": seconds <= 900}
    memory = {} if quick else {"target": "<= 3 GB", "met": sampler.peak_pss <= 3e9}
    return [
        Measurement("demo", what, seconds, "s", **target),
        Measurement("demo", f"peak memory of the federation during it, PSS summed over its processes "
                    f"({sampler.peak_processes} at most), sampled every {SAMPLE_S:g} s", sampler.peak_pss / 1e9, "GB",
                    **memory),
        Measurement("demo", "peak memory of the federation during it, RSS summed (shared pages in each process)",
                    sampler.peak_rss / 1e9, "GB"),
    ]  # fmt: skip
