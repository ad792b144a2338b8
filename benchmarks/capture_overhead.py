"""Capture overhead: a forward pass that records every `resid_post` in memory, divided by the plain forward pass.

On the embedded `smollm2-135m`, 8 prompts x 128 tokens (seeded random token ids, no padding), under
`torch.inference_mode`. modelrecon's plain forward and its recording forward are timed alternately in one process
(see `peers/common.py: side_by_side`); the ratio is median(recording) / median(plain).

Then, where their venvs exist (`make bench-env`), the same is measured for the peers, each in its own process and venv,
on the same local model folder and the same token ids: TransformerLens `run_with_cache` (`peers/tl_run_with_cache.py`)
and nnsight `.save()` (`peers/nnsight_save.py`). Each peer times the plain Hugging Face forward of its own venv against
its own capture, side by side in its process, and hands back its last-layer `resid_post` and the norms of all 30, which
are checked against modelrecon's.

Run: `make bench` or `.venv/bin/python benchmarks/capture_overhead.py [--reps N] [--threads N] [--no-peers]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch
from peers.common import side_by_side

import modelrecon as mr
from modelrecon.models.embedded import EMBEDDED
from modelrecon.models.loading import gguf_to_folder

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


def token_ids(n_prompts: int, n_tokens: int, vocab_size: int, first_ordinary: int, seed: int) -> list[list[int]]:
    """Seeded random ids of ordinary (non-special) tokens: `n_prompts` prompts of exactly `n_tokens` each."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(first_ordinary, vocab_size, (n_prompts, n_tokens), generator=generator)
    return ids.tolist()


def norms(tensors_per_layer: list[torch.Tensor]) -> list[float]:
    return [float(t.double().norm()) for t in tensors_per_layer]


class Row:
    def __init__(self, tool: str, version: str, captured: str, plain: list[float], capture: list[float]):
        self.tool, self.version, self.captured = tool, version, captured
        self.plain, self.capture = plain, capture

    @property
    def ratio(self) -> float:
        return median(self.capture) / median(self.plain)

    def cells(self) -> list[str]:
        ms = [
            f"{median(self.plain) * 1e3:.0f}",
            f"{min(self.plain) * 1e3:.0f}",
            f"{median(self.capture) * 1e3:.0f}",
            f"{min(self.capture) * 1e3:.0f}",
        ]
        return [f"{self.tool} {self.version}", self.captured, *ms, f"{self.ratio:.3f}", f"{min(self.capture) / min(self.plain):.3f}"]


def print_table(rows: list[Row]) -> None:
    head = ["tool", "captured", "plain ms (median)", "plain ms (min)", "capture ms (median)", "capture ms (min)",
            "ratio (medians)", "ratio (mins)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


def run_peer(tool: str, model_dir: Path, tokens_file: Path, work: Path, args, reference: dict) -> Row | None:
    venv, script, captured = PEERS[tool]
    python = ROOT / ".bench-venvs" / venv / "bin" / "python"
    if not python.exists():
        print(f"[{tool}] skipped: no venv at {python.parent.parent}; create it with `make bench-env`")
        return None
    out = work / venv
    command = [str(python), str(HERE / "peers" / script), "--model-dir", str(model_dir), "--tokens", str(tokens_file),
               "--out", str(out), "--threads", str(args.threads), "--reps", str(args.reps), "--warmup", str(args.warmup)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    print(f"[{tool}] running {' '.join(command[:2])} ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.peer_timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        print(f"[{tool}] FAILED (exit {done.returncode}); last lines:\n{tail}")
        return None
    result = json.loads((out / "result.json").read_text())
    last = torch.load(out / "last_resid_post.pt", weights_only=True)
    # The peer must have captured the same 30 tensors: same count and shapes, same values.
    assert result["n_captured"] == reference["n_captured"], (tool, result["n_captured"])
    assert result["shape"] == reference["shape"], (tool, result["shape"])
    diff = float((last - reference["last"]).abs().max())
    scale = float(reference["last"].abs().max())
    norm_rel = max(abs(a - b) / b for a, b in zip(result["norms"], reference["norms"]))
    same = diff <= 1e-4 and norm_rel <= 1e-5
    print(f"[{tool}] {result['versions']}; captured {result['n_captured']} × {result['shape']}; last-layer resid_post "
          f"max |diff| vs modelrecon = {diff:.2e} (values up to {scale:.1f}); worst relative norm diff over 30 layers "
          f"= {norm_rel:.1e} -> {'SAME' if same else 'DIFFERENT'}")
    if not same:
        print(f"[{tool}] WARNING: its captured tensors differ from modelrecon's; its timing is not comparable")
    version = result["versions"].get(result["tool_package"], "?")
    return Row(tool, version, captured, result["plain_s"], result["capture_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions of each variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each variant first")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-all-sites", action="store_true", help="skip the extra row recording every site (`*`)")
    parser.add_argument("--no-peers", action="store_true", help="skip TransformerLens and nnsight")
    parser.add_argument("--peer-timeout", type=int, default=600)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} CPU cores ({cpu_name()}), python {platform.python_version()}, torch "
          f"{torch.__version__}, torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})")

    model = mr.load(MODEL)
    model_dir, _ = gguf_to_folder(EMBEDDED[MODEL].gguf_parts(), MODEL)
    import transformers

    print(f"model: {model!r}, fp32, folder {model_dir}; modelrecon {mr.__version__}, transformers "
          f"{transformers.__version__}")
    first_ordinary = max(model.tokenizer.all_special_ids) + 1
    ids = token_ids(args.prompts, args.tokens, model.vocab_size, first_ordinary, args.seed)
    batch = model.batch_from_ids(ids)
    print(f"input: {args.prompts} prompts × {args.tokens} tokens (seeded random ids, seed {args.seed}); "
          f"{args.warmup} warm-up + {args.reps} timed calls of each variant, alternating")

    resid_post = ["layers.*.resid_post"]

    def plain():
        return model.forward(batch)

    def record(sites):
        def call():
            with mr.hooked(model, batch, record=sites) as trace:
                model.forward(batch)
            return trace

        return call

    variants = {"plain": plain, "resid_post": record(resid_post)}
    if not args.no_all_sites:
        variants["all"] = record(["*"])

    with torch.inference_mode():
        trace = record(resid_post)()
        sites = model.resolve_sites(resid_post)
        assert list(trace.acts) == sites and len(sites) == model.n_layers, list(trace.acts)
        assert all(len(trace.acts[s]) == args.prompts for s in sites)
        assert all(tuple(t.shape) == (args.tokens, model.d_model) for s in sites for t in trace.acts[s])
        layers = [torch.stack(trace.acts[s]) for s in sites]  # each [batch, pos, d_model]
        reference = {"n_captured": len(layers), "shape": list(layers[0].shape), "last": layers[-1],
                     "norms": norms(layers)}
        print(f"modelrecon records {len(sites)} resid_post sites × {args.prompts} prompts × {list(layers[0].shape[1:])}")
        del trace, layers
        seconds = side_by_side(variants, args.reps, args.warmup)

    rows = [Row("modelrecon", mr.__version__, "hooked(), 30 × resid_post", seconds["plain"], seconds["resid_post"])]
    if "all" in seconds:
        n_all = len(model.site_names())
        rows.append(Row("modelrecon", mr.__version__, f"hooked(), all {n_all} sites (`*`)", seconds["plain"],
                        seconds["all"]))

    if args.no_peers:
        print("peers skipped (--no-peers)")
    else:
        with tempfile.TemporaryDirectory(prefix="capture-overhead-") as tmp:
            work = Path(tmp)
            tokens_file = work / "tokens.json"
            tokens_file.write_text(json.dumps(ids))
            missing = False
            for tool in PEERS:
                row = run_peer(tool, model_dir, tokens_file, work, args, reference)
                missing |= row is None
                if row is not None:
                    rows.append(row)
            if missing:
                print("some peers did not run; `make bench-env` creates their venvs in .bench-venvs/")

    print()
    print_table(rows)
    goal = rows[0].ratio
    print(f"\nmodelrecon resid_post ratio {goal:.3f} (goal ≤ 1.03: {'met' if goal <= 1.03 else 'NOT met'})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
