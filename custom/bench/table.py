"""The benchmark's table: one Measurement per line, written as JSON and Markdown with the machine it ran on."""

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path


@dataclass
class Measurement:
    row: str  # the row (operations, ...)
    what: str  # what was measured, with its data sizes and repeats
    value: float  # this project's figure (the median where repeated)
    unit: str
    target: str = ""  # e.g. "<= 15 s"; empty when the row has none
    met: bool | None = None  # whether value meets target (None: no target)
    reference: float | None = None  # the alternative's figure, measured in the same run
    reference_what: str = ""
    samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return None if not self.reference else self.value / self.reference


def timed(cmd: list, env: dict, cwd: Path, log: Path) -> float:
    """Seconds CMD took; it must succeed (its output goes to LOG, named in the error)."""
    started = time.monotonic()
    with log.open("a") as out:
        done = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({done.returncode}), see {log}")
    return seconds


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return {
        "cpus": os.cpu_count(), "cpu": cpu, "memory_gib": memory, "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("nvflare", "monai", "torch")},
    }  # fmt: skip


def write(measurements: list[Measurement], out: Path, started: float) -> str:
    """Write out/bench.json and out/bench.md; return the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    header = (f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, {info['cpus']} cores ({info['cpu']}), "
              f"{info['memory_gib']} GiB, nvflare {info['nvflare']}, monai {info['monai']}, torch {info['torch']}; "
              f"{time.time() - started:.0f} s")  # fmt: skip
    lines = [header, "", "| row | what | this project | reference | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for m in measurements:
        reference = f"{m.reference:.3g} {m.unit} ({m.reference_what})" if m.reference is not None else ""
        ratio = f"{m.ratio:.2f}" if m.ratio is not None else ""
        met = "" if m.met is None else ("yes" if m.met else "**no**")
        lines.append(f"| {m.row} | {m.what} | {m.value:.3g} {m.unit} | {reference} | {ratio} | {m.target} | {met} |")
    table = "\n".join(lines) + "\n"
    (out / "bench.md").write_text(table)
    rows = [{**asdict(m), "ratio": m.ratio} for m in measurements]
    (out / "bench.json").write_text(json.dumps({"machine": info, "started": started, "rows": rows}, indent=2) + "\n")
    return table
