"""Capture overhead: a forward pass that records every `resid_post` in memory, divided by the plain forward pass.

On the embedded `smollm2-135m`, 8 prompts x 128 tokens (seeded random token ids, no padding), under
`torch.inference_mode`. modelrecon's plain forward and its recording forward are timed alternately in one process
(see `peers/common.py: side_by_side`); the ratio is median(recording) / median(plain), with a 95% bootstrap interval.
An extra row, timed in its own alternating loop, records every site (`*`).

Then, where their venvs exist (`make bench-env`), the same is measured for the peers, each in its own process and venv,
on the same local model folder and the same token ids: TransformerLens `run_with_cache` (`peers/tl_run_with_cache.py`)
and nnsight `.save()` (`peers/nnsight_save.py`). Each peer times the plain Hugging Face forward of its own venv against
its own capture, side by side in its process, and hands back its last-layer `resid_post` and the norms of all 30, which
are checked against modelrecon's.

Run: `make bench` or `.venv/bin/python benchmarks/capture_overhead.py [--reps N] [--threads N] [--no-peers] [--json F]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

import modelrecon as mr
from modelrecon.models.embedded import EMBEDDED
from modelrecon.models.loading import gguf_to_folder
from peers.common import run_peer_script, side_by_side

MODEL = "smollm2-135m"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = {  # tool -> (venv, script, what it captures)
    "TransformerLens": ("transformerlens", "tl_run_with_cache.py", "run_with_cache, 30 × hook_resid_post"),
    "nnsight": ("nnsight", "nnsight_save.py", "trace + .save(), 30 × layer output"),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class CpuUse:
    """CPU seconds used by other processes and stolen by the hypervisor while the benchmark ran (Linux only).

    Timings on a shared or virtual machine are only as good as the quiet around them; this says how quiet it was.
    """

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float, float] | None:
        try:
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
        ours = sum(
            getattr(resource.getrusage(who), field)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for field in ("ru_utime", "ru_stime")
        )
        return (user + nice + system + irq + softirq) / hz, steal / hz, ours, time.monotonic()

    def report(self) -> str:
        end = self._snapshot()
        if self.start is None or end is None:
            return "CPU use of other processes: unknown (no /proc/stat)"
        busy, steal, ours, wall = (b - a for a, b in zip(self.start, end, strict=True))
        others = max(0.0, busy - ours)
        return (
            f"during the {wall:.0f} s run: this benchmark used {ours:.0f} CPU-s, other processes {others:.0f} CPU-s, "
            f"the hypervisor stole {steal:.0f} CPU-s (of {wall * (os.cpu_count() or 1):.0f} CPU-s on "
            f"{os.cpu_count()} cores); more than a few CPU-s of others or steal means the timings were disturbed"
        )


# glibc's malloc moves its mmap threshold as a process frees large blocks, so whether the forward pass's intermediate
# tensors come from the heap or from fresh, page-faulted mmaps depends on what the process did before. On this kind of
# machine that alone moves the plain HF forward between ~1.2 s and ~1.4 s, and it moves differently in each tool's
# process, which swamps the few percent being measured. Fixed thresholds make every process allocate alike.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def with_fixed_malloc() -> None:
    """Re-run this script with MALLOC_TUNABLES in GLIBC_TUNABLES (inherited by the peers) unless already set."""
    if platform.system() != "Linux" or MALLOC_TUNABLES in os.environ.get("GLIBC_TUNABLES", ""):
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": tunables})


def token_ids(n_prompts: int, n_tokens: int, vocab_size: int, first_ordinary: int, seed: int) -> list[list[int]]:
    """Seeded random ids of ordinary (non-special) tokens: `n_prompts` prompts of exactly `n_tokens` each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(first_ordinary, vocab_size, (n_prompts, n_tokens), generator=generator)
    return ids.tolist()


def norms(tensors_per_layer: list[torch.Tensor]) -> list[float]:
    return [float(t.double().norm()) for t in tensors_per_layer]


class Row:
    """One line of the table: a capture and the plain forward it is divided by, both timed in the same loop."""

    def __init__(
        self, tool: str, captured: str, baseline: str, plain: list[float], capture: list[float], disturbed: int
    ):
        self.tool, self.captured, self.baseline = tool, captured, baseline
        self.plain, self.capture, self.disturbed = plain, capture, disturbed

    @property
    def ratio(self) -> float:
        return median(self.capture) / median(self.plain)

    def interval(self, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """95% bootstrap interval of the ratio of medians, resampling repetitions (each keeps its pair of calls)."""
        rng = random.Random(seed)
        reps = range(len(self.plain))
        ratios = []
        for _ in range(resamples):
            chosen = [rng.choice(reps) for _ in reps]
            ratios.append(median(self.capture[i] for i in chosen) / median(self.plain[i] for i in chosen))
        ratios.sort()
        return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]

    def cells(self) -> list[str]:
        ms = [f"{1e3 * f(t):.0f}" for t in (self.plain, self.capture) for f in (median, min)]
        low, high = self.interval()
        ratio_of_mins = min(self.capture) / min(self.plain)
        return [
            self.tool,
            self.captured,
            self.baseline,
            *ms,
            f"**{self.ratio:.3f}**",
            f"{low:.3f} – {high:.3f}",
            f"{ratio_of_mins:.3f}",
            f"{len(self.plain)} ({self.disturbed})",
        ]


def print_table(rows: list[Row]) -> None:
    head = [
        "tool",
        "captured",
        "divided by",
        "plain ms median",
        "plain ms min",
        "capture ms median",
        "capture ms min",
        "ratio of medians",
        "95% interval",
        "ratio of mins",
        "reps (thrown away)",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


def peer_command(python: Path, script: str, model_dir: Path, tokens_file: Path, out: Path, args) -> list[str]:
    """The command line of a peer script (`peers/common.py: peer_args` reads it)."""
    options = {"--model-dir": model_dir, "--tokens": tokens_file, "--out": out, "--threads": args.threads,
               "--reps": args.peer_reps, "--warmup": args.warmup}  # fmt: skip
    return [str(python), str(HERE / "peers" / script), *(str(x) for pair in options.items() for x in pair)]


def run_peer(tool: str, model_dir: Path, tokens_file: Path, work: Path, args, reference: dict) -> list[Row]:
    venv, script, captured = PEERS[tool]
    python = ROOT / ".bench-venvs" / venv / "bin" / "python"
    if not python.exists():
        print(f"[{tool}] skipped: no venv at {python.parent.parent}; create it with `make bench-env`")
        return []
    out = work / venv
    command = peer_command(python, script, model_dir, tokens_file, out, args)
    if not run_peer_script(tool, command, args.peer_timeout):
        return []
    result = json.loads((out / "result.json").read_text())
    last = torch.load(out / "last_resid_post.pt", weights_only=True)
    # The peer must have captured the same 30 tensors: same count and shapes, same values.
    assert result["n_captured"] == reference["n_captured"], (tool, result["n_captured"])
    assert result["shape"] == reference["shape"], (tool, result["shape"])
    ref = reference["last"]
    diff, scale = float((last - ref).abs().max()), float(ref.abs().max())
    rel = float((last - ref).norm() / ref.norm())
    norm_rel = max(abs(a - b) / b for a, b in zip(result["norms"], reference["norms"], strict=True))
    # Same tensors up to float32 rounding: relative error below 1e-4. Not bit-equality: eager and sdpa attention sum in
    # different orders, and even the same kernels round differently with differently aligned buffers in another process
    # (seen: max |diff| 0.7 on values up to 4.6e3 after 30 layers, relative error ~1e-6).
    same = rel <= 1e-4 and norm_rel <= 1e-5
    print(
        f"[{tool}] {result['versions']}; captured {result['n_captured']} × {result['shape']}; last-layer resid_post "
        f"vs modelrecon: relative error {rel:.1e}, max |diff| {diff:.1e} (values up to {scale:.0f}); worst relative "
        f"norm difference over the 30 layers {norm_rel:.1e} -> {'SAME' if same else 'DIFFERENT'}"
    )
    if "logits_max_abs_diff_vs_hf" in result:
        logits_diff = result["logits_max_abs_diff_vs_hf"]
        print(f"[{tool}] its logits vs the plain HF forward (sdpa) in its venv: max |diff| {logits_diff:.1e}")
    if not same:
        print(f"[{tool}] WARNING: its captured tensors differ from modelrecon's; its timing is not comparable")
    label = f"{tool} {result['versions'][result['tool_package']]}"
    seconds, disturbed = result["seconds"], result["disturbed_reps"]
    hf_default = f"HF forward ({result['hf_attn_implementation']})"
    rows = [Row(label, captured, hf_default, seconds["plain"], seconds["capture"], disturbed)]
    if "plain_eager" in seconds:
        rows.append(Row(label, captured, "HF forward (eager)", seconds["plain_eager"], seconds["capture"], disturbed))
    return rows


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark script shares: torch threads and the malloc setting."""
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's adaptive malloc thresholds (noisier, see above)"
    )


def start_run(args: argparse.Namespace) -> CpuUse:
    """Fix malloc and the thread count, print what the machine is, and start counting others' CPU use."""
    if not args.default_malloc:
        with_fixed_malloc()
    cpu_use = CpuUse()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {os.cpu_count()} CPU cores ({cpu_name()}), python {platform.python_version()}, torch "
        f"{torch.__version__}, torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"
    )
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (all processes; --default-malloc to leave unset)")
    return cpu_use


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions of plain and resid_post recording")
    parser.add_argument("--peer-reps", type=int, default=12, help="timed repetitions in each peer")
    parser.add_argument("--all-sites-reps", type=int, default=6, help="repetitions of the every-site row; 0 skips it")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each variant first")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-peers", action="store_true", help="skip TransformerLens and nnsight")
    parser.add_argument("--peer-timeout", type=int, default=600)
    parser.add_argument("--json", type=Path, help="also write every row with its raw per-call seconds to this file")
    args = parser.parse_args()
    cpu_use = start_run(args)

    model = mr.load(MODEL)
    model_dir, _ = gguf_to_folder(EMBEDDED[MODEL].gguf_parts(), MODEL)
    import transformers

    print(
        f"model: {model!r}, fp32, folder {model_dir}; modelrecon {mr.__version__}, transformers "
        f"{transformers.__version__}"
    )
    first_ordinary = max(model.tokenizer.all_special_ids) + 1
    ids = token_ids(args.prompts, args.tokens, model.vocab_size, first_ordinary, args.seed)
    batch = model.batch_from_ids(ids)
    print(
        f"input: {args.prompts} prompts × {args.tokens} tokens (seeded random ids, seed {args.seed}); "
        f"{args.warmup} warm-up + {args.reps} timed calls of each variant, alternating (peers: {args.peer_reps}; "
        f"every-site row: {args.all_sites_reps})"
    )

    resid_post = ["layers.*.resid_post"]

    def plain():
        return model.forward(batch)

    def record(sites):
        def call():
            with mr.hooked(model, batch, record=sites) as trace:
                model.forward(batch)
            return trace

        return call

    with torch.inference_mode():
        trace = record(resid_post)()
        sites = model.resolve_sites(resid_post)
        assert list(trace.acts) == sites and len(sites) == model.n_layers, list(trace.acts)
        assert all(len(trace.acts[s]) == args.prompts for s in sites)
        assert all(tuple(t.shape) == (args.tokens, model.d_model) for s in sites for t in trace.acts[s])
        layers = [torch.stack(trace.acts[s]) for s in sites]  # each [batch, pos, d_model]
        reference = {
            "n_captured": len(layers),
            "shape": list(layers[0].shape),
            "last": layers[-1],
            "norms": norms(layers),
        }
        print(
            f"modelrecon records {len(sites)} resid_post sites × {args.prompts} prompts × {list(layers[0].shape[1:])}"
        )
        del trace, layers
        timed = side_by_side({"plain": plain, "resid_post": record(resid_post)}, args.reps, args.warmup)
        if args.all_sites_reps:  # its own loop, so its large copies do not disturb the goal measurement above
            every = side_by_side({"plain": plain, "all": record(["*"])}, args.all_sites_reps, 1)

    label = f"modelrecon {mr.__version__}"
    baseline = f"HF forward ({model.hf.config._attn_implementation})"
    rows = [Row(label, "hooked(), 30 × resid_post", baseline, *timed.seconds.values(), timed.disturbed)]
    if args.all_sites_reps:
        every_site = f"hooked(), all {len(model.site_names())} sites (`*`)"
        rows.append(Row(label, every_site, baseline, *every.seconds.values(), every.disturbed))

    if args.no_peers:
        print("peers skipped (--no-peers)")
    else:
        with tempfile.TemporaryDirectory(prefix="capture-overhead-") as tmp:
            work = Path(tmp)
            tokens_file = work / "tokens.json"
            tokens_file.write_text(json.dumps(ids))
            ran = {tool: run_peer(tool, model_dir, tokens_file, work, args, reference) for tool in PEERS}
            rows += [row for tool_rows in ran.values() for row in tool_rows]
            if not all(ran.values()):
                print("some peers did not run; `make bench-env` creates their venvs in .bench-venvs/")

    print(f"\n{cpu_use.report()}")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps([vars(row) for row in rows], indent=2))
        print(f"raw per-call seconds written to {args.json}")
    goal = rows[0].ratio
    print(f"\nmodelrecon resid_post ratio {goal:.3f} (goal ≤ 1.03: {'met' if goal <= 1.03 else 'NOT met'})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
