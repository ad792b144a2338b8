"""Process-wide memory settings for long CPU runs.

glibc hands every allocation over its mmap threshold (at most 32 MB) straight to the kernel and returns it on free,
so each training step's large temporaries (a 30-layer stack of latents is 126 MB) arrive as fresh pages that fault
in one at a time: on two cores that was a third of a standard-tier build's CPU time, spent in the kernel. Keeping
freed memory in the heap instead costs resident memory up to the run's peak, which a training run reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters, from glibc's malloc.h
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse rather than unmap it (once per process; a no-op and False
    elsewhere than Linux with glibc)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # thresholds are ints: 1 GiB keeps every tensor of a training step in the heap
    _done = all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, 2**30), (_M_TRIM_THRESHOLD, 2**30),
                                                (_M_TOP_PAD, 64 * 2**20)))  # fmt: skip
    return _done


def available_bytes(device) -> int | None:
    """Memory free for new tensors on `device`: CUDA's free memory, or the host's MemAvailable (None where it
    cannot be read)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
