"""The capture's writer: a separate process that compresses and stores chunks while the model runs the next batch.

A writer thread would share the interpreter lock with the forward pass (zarr's write path is Python and asyncio,
about 0.1 s of CPU per 35 MB chunk), so the two slowed each other down; a process does not. Chunk buffers are
shared memory (a file in /dev/shm, or in the temporary folder when /dev/shm is small): the capturing process fills a
buffer set in place, the writer writes it to the cube and hands it back. Jobs run in order, so a prompt's attention
patterns are stored before the chunk holding its first token is reported done, and a chunk is reported only once it
is on storage: the progress the capture records is always true.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modelrecon.errors import CubeError

_STATS = np.float32  # the summaries' dtype


def _shared_folder(nbytes: int) -> str:
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 * nbytes:
        return str(shm)
    return tempfile.gettempdir()


def _views(path: str, layout: list, chunk: int, n_stats: int, dtype: str, n_sets: int, mode: str) -> list[dict]:
    """numpy views of the shared file: per set, per kind, (values [chunk, *shape], summaries [chunk, layers, n])."""
    memory = np.memmap(path, dtype=np.uint8, mode=mode)
    views, at = [], 0
    for _ in range(n_sets):
        sets = {}
        for kind, shape in layout:
            parts = []
            for part_dtype, part_shape in ((np.dtype(dtype), (chunk, *shape)), (_STATS, (chunk, shape[0], n_stats))):
                size = int(np.prod(part_shape)) * np.dtype(part_dtype).itemsize
                parts.append(memory[at : at + size].view(part_dtype).reshape(part_shape))
                at += size
            sets[kind] = tuple(parts)
        views.append(sets)
    return views


class ChunkWriter:
    """Buffer sets in shared memory, and the process writing them; `take` a set, fill it, `send` it."""

    def __init__(self, location, shapes: dict[str, tuple[int, ...]], chunk: int, dtype: str, n_stats: int,
                 on_chunk: Callable[[int, int], None] | None = None, n_sets: int = 3) -> None:  # fmt: skip
        import torch

        self.layout = [(kind, tuple(int(s) for s in shape)) for kind, shape in shapes.items()]
        per_set = sum(chunk * (int(np.prod(s)) * np.dtype(dtype).itemsize + s[0] * n_stats * 4) for _, s in self.layout)
        handle, self.path = tempfile.mkstemp(prefix="modelrecon-capture-", dir=_shared_folder(per_set * n_sets))
        os.ftruncate(handle, per_set * n_sets)
        os.close(handle)
        views = _views(self.path, self.layout, chunk, n_stats, dtype, n_sets, "r+")
        # torch views of the same memory: torch casts to fp16 vectorised and multi-threaded, numpy does not
        self.sets = [{k: tuple(torch.from_numpy(p) for p in parts) for k, parts in s.items()} for s in views]
        self.free: list[int] = list(range(n_sets))
        self.on_chunk, self.chunk, self.pending = on_chunk, chunk, 0
        # fork: fast, and it does not re-run the user's script (spawn would need an `if __name__ == "__main__"`
        # guard there); the child uses only numpy and zarr (which resets its I/O thread after a fork).
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.jobs, self.done = context.Queue(), context.Queue()
        args = (str(location), self.path, self.layout, chunk, n_stats, dtype, n_sets, self.jobs, self.done)
        self.process = context.Process(target=_write_loop, args=args, daemon=True, name="modelrecon-cube-writer")
        try:
            self.process.start()
            self._collect(block=True)  # "ready": the writer has mapped the buffers
        finally:
            Path(self.path).unlink(missing_ok=True)  # the mappings stay; nothing is left behind if either dies

    def take(self) -> tuple[int, dict]:
        """A free buffer set (index, {kind: (values, summaries)}); waits for the writer to free one."""
        while not self.free:
            self._collect(block=True)
        index = self.free.pop(0)
        return index, self.sets[index]

    def send(self, index: int, begin: int, end: int) -> None:
        """Write tokens [begin, end) of the cube from buffer set `index` (its first end - begin rows)."""
        self._collect(block=False)
        self.jobs.put(("chunk", index, begin, end))
        self.pending += 1

    def put_pattern(self, prompt: int, patterns: np.ndarray) -> None:
        self.jobs.put(("pattern", prompt, patterns))

    def close(self) -> None:
        """Wait for every queued write (their progress is reported), then stop the writer and free the memory."""
        try:
            if self.process.is_alive():
                self.jobs.put(None)
            while self.pending:
                self._collect(block=True)
        finally:
            self.process.join(timeout=60)
            if self.process.is_alive():
                self.process.kill()

    def _collect(self, block: bool) -> None:
        while True:
            try:
                message = self.done.get(timeout=0.5) if block else self.done.get_nowait()
            except queue.Empty:
                if block and not self.process.is_alive():
                    raise CubeError("the cube writer process died; re-run the same command to resume") from None
                if block:
                    continue
                return
            if message[0] == "error":
                self.pending = 0
                raise CubeError(message[1])
            if message[0] == "ready":
                return
            _, index, begin, end = message
            self.pending -= 1
            self.free.append(index)
            if self.on_chunk is not None:
                self.on_chunk(begin // self.chunk, -(-end // self.chunk))
            if block:
                return


def _exit_with(parent: int) -> None:
    """Exit when the capture is killed: nothing will record what this would write (and a message it was sending
    when it died would block the reading loop forever)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _write_loop(location, path, layout, chunk, n_stats, dtype, n_sets, jobs, done) -> None:
    """The writer process: store each job in order, report each chunk; exits at None or when its parent dies."""
    import zarr

    from modelrecon import storage
    from modelrecon.cube.layout import compressors

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the capture, which then lets this finish
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    views = _views(path, layout, chunk, n_stats, dtype, n_sets, "r")
    done.put(("ready",))
    group = zarr.open_group(storage.zarr_store(location), mode="r+")
    arrays = {kind: (group[f"sites/{kind}"], group[f"summaries/{kind}"]) for kind, _ in layout}
    failed = False
    while True:
        job = jobs.get()
        if job is None:
            return
        if failed:
            continue
        try:
            if job[0] == "pattern":
                _, prompt, patterns = job
                group.create_array(f"attention/prompt_{prompt}", data=patterns, chunks=patterns.shape, overwrite=True,
                                   compressors=compressors())  # fmt: skip
                group[f"attention/prompt_{prompt}"].attrs.update({"axes": ["layer", "head", "q", "k"]})
                continue
            _, index, begin, end = job
            for kind, (values, summaries) in arrays.items():
                values[begin:end] = views[index][kind][0][: end - begin]
                summaries[begin:end] = views[index][kind][1][: end - begin]
            done.put(("chunk", index, begin, end))
        except OSError as exc:
            failed = True
            done.put(("error", f"writing the cube failed: {exc.strerror or exc}; free space or fix permissions, "
                               "then re-run to resume"))  # fmt: skip
        except Exception as exc:  # reported on the capturing side, which stops
            failed = True
            done.put(("error", f"writing the cube failed ({type(exc).__name__}: {exc}); re-run to resume"))
