"""Activation-patching sweep: every [layer, position] `resid_pre` patch of one prompt pair, three ways, in one run.

On the embedded `smollm2-135m`, the pair of `peers/common.py: PATCH_PAIR` ("The capital of France is" -> " Paris"
against "The capital of Italy is" -> " Rome", 5 tokens each): the clean prompt's `resid_pre` of one layer at one
position is patched into the corrupted run, for all 30 x 5 cells, and each cell's effect is the normalised logit
difference at the last position, (ld(patched) - ld(corrupted)) / (ld(clean) - ld(corrupted)) with
ld = logit[" Paris"] - logit[" Rome"] (1 where the patch restores the clean answer, 0 where it does nothing).

Timed, each call going from the prompts to the whole [layer, position] grid (clean and corrupted baselines included):
  (a) modelrecon's batched sweep: `counterfactual.sweep(model, [Pair(...)], kind="resid_pre", direction="denoise",
      metric="logit_diff")`, its `.effect`;
  (b) the one-cell-at-a-time loop a user writes with the existing API: `run(model, clean, record=["*.resid_pre"])`
      once, then one `run_with(model, corrupted, [Patch(site, positions=p, source="clean")], sources=...)` per cell;
  (c) TransformerLens 4.3.0's own `patching.get_act_patch_resid_pre` on a `TransformerBridge` of the same local model
      folder, in its own venv and process (`peers/tl_patching.py`; `make bench-env` creates the venv).
(a) and (b) are timed alternately in this process (`peers/common.py: side_by_side`), under `torch.inference_mode`,
with the same torch thread count as the peer. Printed: seconds per call (median, min), the ratios ours/TransformerLens
and ours/loop, and the largest absolute difference between each two of the three effect grids.

(a) needs `modelrecon.counterfactual.sweep`; where it is missing, (b) and (c) run alone.

Run: `.venv/bin/python benchmarks/patch_sweep.py [--reps N] [--peer-reps N] [--threads N] [--no-peer] [--json F]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch

import modelrecon as mr
from capture_overhead import MODEL, ROOT, add_run_arguments, peer_command, start_run
from modelrecon.counterfactual import Patch, run_with
from modelrecon.counterfactual.metrics import logit_diff, single_token
from modelrecon.models.embedded import EMBEDDED
from modelrecon.models.loading import gguf_to_folder
from peers.common import PATCH_PAIR, run_peer_script, side_by_side

TL_VENV = ROOT / ".bench-venvs" / "transformerlens"


def have_sweep() -> bool:
    try:
        from modelrecon.counterfactual import Pair, sweep  # noqa: F401
    except ImportError:
        return False
    return True


def batched_sweep(model: mr.Model) -> torch.Tensor:
    """(a): the whole grid from modelrecon's sweep, `[n_layers, n_positions]`."""
    from modelrecon.counterfactual import Pair, sweep

    pair = Pair(
        clean=PATCH_PAIR["clean"],
        counterfactual=PATCH_PAIR["corrupted"],
        answer=PATCH_PAIR["answer"],
        wrong=PATCH_PAIR["wrong"],
    )
    return sweep(model, [pair], kind="resid_pre", direction="denoise", metric="logit_diff").effect


def loop_sweep(model: mr.Model, n_positions: int) -> torch.Tensor:
    """(b): the whole grid one cell at a time, with `run` and `run_with` as they are."""
    answer, wrong = single_token(model, PATCH_PAIR["answer"]), single_token(model, PATCH_PAIR["wrong"])
    clean, corrupted = PATCH_PAIR["clean"], PATCH_PAIR["corrupted"]
    clean_run = mr.run(model, clean, record=["*.resid_pre"])
    clean_acts = clean_run.acts
    ld_clean = logit_diff(clean_run.logits[0][-1], answer, wrong)
    ld_corrupted = logit_diff(mr.run(model, corrupted).logits[0][-1], answer, wrong)
    grid = torch.empty(model.n_layers, n_positions)
    for layer in range(model.n_layers):
        for p in range(n_positions):
            patch = Patch(site=f"layers.{layer}.resid_pre", positions=p, source="clean")
            logits = run_with(model, corrupted, [patch], sources={"clean": clean_acts}).logits[0][-1]
            grid[layer, p] = (logit_diff(logits, answer, wrong) - ld_corrupted) / (ld_clean - ld_corrupted)
    return grid


def run_tl_peer(model_dir: Path, ids: list[list[int]], args) -> dict | None:
    """(c): TransformerLens in its venv; its result.json (grid, seconds per call), or None if it did not run."""
    python = TL_VENV / "bin" / "python"
    if not python.exists():
        print(f"[TransformerLens] skipped: no venv at {TL_VENV}; create it with `make bench-env`")
        return None
    with tempfile.TemporaryDirectory(prefix="patch-sweep-") as tmp:
        tokens_file = Path(tmp) / "tokens.json"
        tokens_file.write_text(json.dumps(ids))
        out = Path(tmp) / "transformerlens"
        command = peer_command(python, "tl_patching.py", model_dir, tokens_file, out, args)
        if not run_peer_script("TransformerLens", command, args.peer_timeout):
            return None
        return json.loads((out / "result.json").read_text())


def print_grid(name: str, grid: torch.Tensor, tokens: list[str]) -> None:
    print(f"\n{name} effect grid (rows: layers; columns: positions {tokens}):")
    for layer, row in enumerate(grid.tolist()):
        print(f"  {layer:2d} " + " ".join(f"{v:6.3f}" for v in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--reps", type=int, default=5, help="timed calls of (a) and (b), alternating")
    parser.add_argument("--peer-reps", type=int, default=5, help="timed calls of TransformerLens")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each first")
    parser.add_argument("--no-peer", action="store_true", help="skip TransformerLens")
    parser.add_argument("--peer-timeout", type=int, default=1800)
    parser.add_argument("--json", type=Path, help="also write the per-call seconds and the grids to this file")
    args = parser.parse_args()
    cpu_use = start_run(args)

    model = mr.load(MODEL)
    model_dir, _ = gguf_to_folder(EMBEDDED[MODEL].gguf_parts(), MODEL)
    ids = [model.tokenize([PATCH_PAIR[k]]).tokens(0).tolist() for k in ("clean", "corrupted")]
    assert len(ids[0]) == len(ids[1]), f"the prompts tokenise to different lengths: {ids}"
    n_positions = len(ids[0])
    tokens = model.str_tokens(ids[0])
    cells = model.n_layers * n_positions
    print(f"model: {model!r}, fp32, folder {model_dir}; modelrecon {mr.__version__}")
    print(
        f"pair: {PATCH_PAIR}; clean tokens {tokens}, corrupted {model.str_tokens(ids[1])}; "
        f"{model.n_layers} layers x {n_positions} positions = {cells} cells"
    )

    variants = {"loop": lambda: loop_sweep(model, n_positions)}
    if have_sweep():
        variants = {"sweep": lambda: batched_sweep(model), **variants}
    else:
        print("(a) skipped: modelrecon.counterfactual has no `sweep` yet")
    with torch.inference_mode():
        grids = {name: fn().float() for name, fn in variants.items()}
        for name, grid in grids.items():
            assert tuple(grid.shape) == (model.n_layers, n_positions), (name, tuple(grid.shape))
        print(f"timing {' and '.join(variants)}: {args.warmup} warm-up + {args.reps} timed calls each, alternating")
        timed = side_by_side(variants, args.reps, args.warmup)
    seconds = dict(timed.seconds)
    disturbed = {name: timed.disturbed for name in variants}

    peer = None if args.no_peer else run_tl_peer(model_dir, ids, args)
    if peer is not None:
        grids["TransformerLens"] = torch.tensor(peer["grid"])
        seconds["TransformerLens"] = peer["seconds"]["sweep"]
        disturbed["TransformerLens"] = peer["disturbed_reps"]
        print(
            f"[TransformerLens] {peer['versions']}, {peer['threads']} threads, bridge attention "
            f"{peer['bridge_attn_implementation']}; ld(clean) {peer['logit_diff_clean']:.4f}, "
            f"ld(corrupted) {peer['logit_diff_corrupted']:.4f}"
        )

    print(f"\n{cpu_use.report()}")
    labels = {
        "sweep": "(a) modelrecon sweep(), batched",
        "loop": "(b) modelrecon run_with(), one cell per call",
        "TransformerLens": "(c) TransformerLens get_act_patch_resid_pre",
    }
    print("\n| variant | s per grid, median | s per grid, min | ms per cell, median | reps (thrown away) |")
    print("|---|---|---|---|---|")
    for name, values in seconds.items():
        print(
            f"| {labels[name]} | {median(values):.3f} | {min(values):.3f} | {1e3 * median(values) / cells:.1f} "
            f"| {len(values)} ({disturbed[name]}) |"
        )

    print()
    for ours, other in (("sweep", "TransformerLens"), ("sweep", "loop"), ("loop", "TransformerLens")):
        if ours in seconds and other in seconds:
            of_medians = median(seconds[ours]) / median(seconds[other])
            of_mins = min(seconds[ours]) / min(seconds[other])
            print(f"{ours}/{other}: {of_medians:.3f} (ratio of medians), {of_mins:.3f} (ratio of mins)")

    print()
    names = list(grids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            print(f"max |effect difference| {a} vs {b}: {float((grids[a] - grids[b]).abs().max()):.2e}")
    print_grid(names[0], grids[names[0]], tokens)

    if args.json:
        data = {"seconds": seconds, "disturbed_reps": disturbed, "grids": {k: g.tolist() for k, g in grids.items()}}
        args.json.write_text(json.dumps(data, indent=2))
        print(f"per-call seconds and grids written to {args.json}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
