"""TransformerLens peer: `run_with_cache` of the 30 `blocks.*.hook_resid_post` vs the plain HF forward, one process.

Runs in `.bench-venvs/transformerlens` (see `make bench-env`), started by `benchmarks/capture_overhead.py`. The
bridge is booted from the local model folder with `TransformerBridge.boot_transformers` (offline; raw HF weights, no
weight processing). The bridge forces eager attention, so besides the default HF forward (sdpa) the HF forward with
eager attention is timed too, in the same alternating loop.
"""

from __future__ import annotations

import torch
from common import peer_args, read_tokens, side_by_side, write_peer_result
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM


def main() -> None:
    args = peer_args(__doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    ids = read_tokens(args.tokens)
    mask = torch.ones_like(ids)
    hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, local_files_only=True).eval()
    hf_eager = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, local_files_only=True, attn_implementation="eager"
    ).eval()
    bridge = TransformerBridge.boot_transformers(args.model_dir, device="cpu", dtype=torch.float32)
    names = [f"blocks.{i}.hook_resid_post" for i in range(bridge.cfg.n_layers)]
    assert all(name in bridge.hook_dict for name in names), "bridge lacks some hook_resid_post"

    def plain():
        return hf(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def plain_eager():
        return hf_eager(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def capture():
        return bridge.run_with_cache(ids, names_filter=names)

    with torch.inference_mode():
        logits, cache = capture()
        # TransformerLens adds the canonical name of each alias it is asked for: the cache holds every tensor under
        # both `blocks.{i}.hook_resid_post` and `blocks.{i}.hook_out` (views of the same storage, not copies).
        captured = [cache[name] for name in names]
        assert len(names) == 30 and len({t.data_ptr() for t in cache.values()}) == 30, sorted(cache.keys())
        assert all(tuple(t.shape) == tuple(ids.shape) + (bridge.cfg.d_model,) for t in captured)
        logit_diff = float((logits - plain()).abs().max())
        timings = side_by_side({"plain": plain, "plain_eager": plain_eager, "capture": capture}, args.reps, args.warmup)

    write_peer_result(
        args.out,
        captured,
        tool_package="transformer-lens",
        timings=timings,
        logits_max_abs_diff_vs_hf=logit_diff,
        hf_attn_implementation=hf.config._attn_implementation,
        bridge_attn_implementation=bridge.original_model.config._attn_implementation,
    )


if __name__ == "__main__":
    main()
