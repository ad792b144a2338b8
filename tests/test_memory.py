"""keep_freed_memory: large temporaries reuse heap pages instead of faulting in fresh ones every time."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
import modelrecon.memory as memory
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory() and memory.keep_freed_memory()  # idempotent
def churn():
    for _ in range(20):
        torch.ones(16 * 2**20)  # 64 MB, freed at once: above glibc's largest default mmap threshold
# Warm up: torch's aligned allocations leave small remainders in glibc's per-size caches (7 slots) that keep freed
# blocks from merging until those fill, so the first few grow the heap; a training run is past that in a few steps.
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 16 * 2**20 * 4 // 4096
    assert _faults("default") > 15 * pages  # every allocation faults its pages in afresh
    assert _faults("keep") < pages  # once warm, every one reuses freed heap pages
