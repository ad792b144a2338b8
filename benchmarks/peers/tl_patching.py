"""TransformerLens peer: `patching.get_act_patch_resid_pre` over every [layer, position] of one prompt pair.

Runs in `.bench-venvs/transformerlens` (see `make bench-env`), started by `benchmarks/patch_sweep.py`. The bridge is
booted from the local model folder exactly as in `tl_run_with_cache.py` (`TransformerBridge.boot_transformers`,
offline, raw HF weights, no weight processing; the bridge forces eager attention).

No adaptation was needed: TransformerLens 4.3.0's patching utilities accept a `TransformerBridge` as the model. The
bridge exposes the legacy hook names as aliases (`blocks.{l}.hook_resid_pre` of `blocks.{l}.hook_in`), so
`utils.get_act_name("resid_pre", l)` resolves, `run_with_cache` stores the clean values under that name, and
`run_with_hooks` attaches the patching hook there; `model.cfg` has `n_layers`, `n_heads`, `device`. The only call
made for the utility is `bridge.eval()`, which it requires (`require_eval_mode`); the bridge boots in eval mode, so
it is a no-op kept as a guard. The corrupted tokens are given as ids (the prompt pair of `common.PATCH_PAIR`,
tokenised without a BOS token, as modelrecon does; checked against the ids the main script passes), so no BOS is
prepended.

The metric is the normalised logit difference at the last position, ld = logit[answer] - logit[wrong]:
(ld(patched) - ld(corrupted)) / (ld(clean) - ld(corrupted)), with ld(clean) and ld(corrupted) from the bridge's own
unpatched runs. One timed call is the whole pipeline from token ids to the grid: the clean `run_with_cache`, the
corrupted forward for the baseline, and `get_act_patch_resid_pre` (n_layers x n_positions patched forwards), under
`torch.inference_mode()` as the main script times modelrecon. result.json holds the grid, the logit differences and
the seconds per call.
"""

from __future__ import annotations

import torch
from common import PATCH_PAIR, peer_args, read_tokens, side_by_side, versions, write_json
from transformer_lens import patching
from transformer_lens.model_bridge import TransformerBridge


def main() -> None:
    args = peer_args(__doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    bridge = TransformerBridge.boot_transformers(args.model_dir, device="cpu", dtype=torch.float32)
    bridge.eval()
    tokenizer = bridge.tokenizer

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    clean_ids, corrupted_ids = ids(PATCH_PAIR["clean"]), ids(PATCH_PAIR["corrupted"])
    assert len(clean_ids) == len(corrupted_ids), ("prompts of different lengths", clean_ids, corrupted_ids)
    given = read_tokens(args.tokens)
    assert given.tolist() == [clean_ids, corrupted_ids], ("other tokens than the main script's", given.tolist())
    (answer,), (wrong,) = ids(PATCH_PAIR["answer"]), ids(PATCH_PAIR["wrong"])
    clean, corrupted = given[:1], given[1:]
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(bridge.cfg.n_layers)]
    assert all(name in bridge.hook_dict for name in names), "bridge lacks some hook_resid_pre"

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, answer] - logits[0, -1, wrong]

    def sweep() -> tuple[torch.Tensor, float, float]:
        clean_logits, clean_cache = bridge.run_with_cache(clean)
        ld_clean = logit_diff(clean_logits)
        ld_corrupted = logit_diff(bridge(corrupted))

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return (logit_diff(logits) - ld_corrupted) / (ld_clean - ld_corrupted)

        grid = patching.get_act_patch_resid_pre(bridge, corrupted, clean_cache, metric)
        return grid, float(ld_clean), float(ld_corrupted)

    with torch.inference_mode():
        grid, ld_clean, ld_corrupted = sweep()
        assert tuple(grid.shape) == (bridge.cfg.n_layers, clean.shape[1]), grid.shape
        timings = side_by_side({"sweep": sweep}, args.reps, args.warmup)

    write_json(
        args.out,
        tool_package="transformer-lens",
        versions=versions("transformer-lens"),
        threads=torch.get_num_threads(),
        grid=grid.tolist(),
        logit_diff_clean=ld_clean,
        logit_diff_corrupted=ld_corrupted,
        n_forwards_per_call=2 + grid.numel(),
        seconds=timings.seconds,
        disturbed_reps=timings.disturbed,
        bridge_attn_implementation=bridge.original_model.config._attn_implementation,
    )


if __name__ == "__main__":
    main()
