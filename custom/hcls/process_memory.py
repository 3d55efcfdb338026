"""A job process (the server's FedAvg, a site's executor) gives each large block back to the system once freed.

These processes pass whole models around (the server receives every site's result, averages and persists; a
site's job process downloads the global model, hands it to its trainer, and filters and uploads the trainer's
result), so each round allocates and frees blocks of the model's size. glibc's threshold for serving a block from
its own mapping grows with the largest such block freed, up to 32 MiB: past that, the models' blocks come from the
heap, and what is freed there mostly stays with the process. A fixed threshold of 4 MiB keeps every block of that
size or more (download chunks, serialized models) in a mapping of its own, unmapped when freed; smaller ones (most
single tensors) stay in the heap, where the next round reuses them. make bench ONLY=demo,overhead, one run after
the other (README, row `demo`): peak PSS 5.73 -> 4.89 GB; 128 KiB gave the same memory but slowed the rounds.
Trainers are left as they are: they allocate large tensors at every step.
"""

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt parameter, <malloc.h>
LARGE_BLOCK = 4 * 1024 * 1024


def release_large_blocks() -> None:
    """mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK) in this process; nothing where the C library is not glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)
