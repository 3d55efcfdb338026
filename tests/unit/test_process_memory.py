"""hcls.process_memory: a job process gives the freed blocks of a model message back to the system; without it glibc
keeps them. Each side runs in a fresh interpreter, through glibc's own malloc and free."""

import subprocess
import sys
from pathlib import Path

CUSTOM = Path(__file__).resolve().parents[2] / "custom"

# A model-sized message (24 MiB, served from its own mapping, which raises glibc's threshold past it), then 64 MiB
# in 8 MiB blocks, each followed by a small block that stays (so that the heap cannot simply shrink), then those
# blocks freed: prints how many MiB of them the process still holds.
PROBE = """
import ctypes, sys
from hcls.process_memory import release_large_blocks
if sys.argv[1] == "release":
    release_large_blocks()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20

def rss_mb():
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))

def touched(size):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block

libc.free(touched(24 * MB))
before = rss_mb()
blocks, kept = [], []
for _ in range(8):
    blocks.append(touched(8 * MB))
    kept.append(touched(100 * 1024))
for block in blocks:
    libc.free(block)
print(rss_mb() - before)
"""


def held_mb(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=CUSTOM, env={"PYTHONPATH": str(CUSTOM)},
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout)


def test_freed_model_sized_blocks_go_back_to_the_system():
    assert held_mb("default") >= 48  # glibc's own policy keeps them in the heap
    assert held_mb("release") <= 16  # each in its own mapping, unmapped when freed
