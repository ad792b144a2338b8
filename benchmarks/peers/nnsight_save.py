"""nnsight peer: `.save()` of the 30 decoder-layer outputs in one trace vs the plain HF forward, one process.

Runs in `.bench-venvs/nnsight` (see `make bench-env`), started by `benchmarks/capture_overhead.py`. The model is
`LanguageModel(local_dir, dispatch=True)` (offline); the plain forward is the very HF module nnsight wraps, called
directly on the same input_ids and attention_mask.
"""

from __future__ import annotations

import torch
from common import peer_args, read_tokens, side_by_side, write_peer_result
from nnsight import LanguageModel


def main() -> None:
    args = peer_args(__doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    ids = read_tokens(args.tokens)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lm = LanguageModel(args.model_dir, dispatch=True, dtype=torch.float32)
    hf = lm._module
    n_layers = len(lm.model.layers)

    def plain():
        return hf(**inputs, use_cache=False).logits

    def capture():
        saved = []
        with lm.trace(inputs):
            for layer in lm.model.layers:
                out = layer.output
                saved.append((out[0] if isinstance(out, tuple) else out).save())
        return saved

    with torch.inference_mode():
        captured = capture()
        assert len(captured) == n_layers == 30, len(captured)
        assert all(tuple(t.shape) == tuple(ids.shape) + (hf.config.hidden_size,) for t in captured)
        timings = side_by_side({"plain": plain, "capture": capture}, args.reps, args.warmup)

    write_peer_result(
        args.out,
        captured,
        tool_package="nnsight",
        timings=timings,
        hf_attn_implementation=hf.config._attn_implementation,
    )


if __name__ == "__main__":
    main()
