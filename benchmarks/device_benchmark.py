"""Every stage on one device, on random-weight models of real architectures (nothing downloaded): capture tokens/s
against the plain forward pass, dictionary-training tokens/s, and attribution-graph time and peak memory by prompt
length.

Models are built from configs with the shapes of SmolLM2-135M (Llama), Llama 3.2 1B and Gemma 2 2B, random weights,
and the tests' character tokenizer (one token per character, so a prompt of N characters is N tokens). The
transcoders are random skip transcoders (width 4096, TopK 32): timing and memory depend on shapes and on how many
features fire, not on what they mean. Sized to finish in under 8 minutes on one H100; `--small` shrinks everything
so that the test suite runs it on the CPU in seconds (so the script cannot rot).

    python benchmarks/device_benchmark.py --device cuda --json device.json
    python benchmarks/device_benchmark.py --device cpu --small --json small.json

On a machine without the internet carry what is not installed there (zarr and its dependencies for the capture
stage; gguf is not needed): `pip download zarr numcodecs crc32c donfig -d wheels`, then `pip install --no-index
--find-links wheels zarr` there. Without zarr the capture stage reports the hooked forward pass alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from modelrecon import Model  # noqa: E402
from modelrecon.circuits.attribute import attribute  # noqa: E402
from modelrecon.dictionaries import Dictionary, DictionaryConfig  # noqa: E402
from modelrecon.dictionaries.train import TrainOptions, train  # noqa: E402
from modelrecon.hooks.trace import hooked  # noqa: E402

from tiny import char_tokenizer  # noqa: E402

ARCHITECTURES = {  # real shapes, random weights
    "llama-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)),
    "gemma2-2b": ("gemma2", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                                 num_key_value_heads=4, head_dim=256, vocab_size=256000, sliding_window=4096,
                                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
}  # fmt: skip
SMALL = {  # the same families, tiny
    "llama-135m": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)),
    "gemma2-2b": ("gemma2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=16,
                                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
}  # fmt: skip


def build(name: str, spec: tuple, device: torch.device, dtype: torch.dtype) -> Model:
    family, config = spec
    config = AutoConfig.for_model(family, max_position_embeddings=16384, pad_token_id=0, bos_token_id=2,
                                  eos_token_id=2, **config)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return Model(hf.eval(), char_tokenizer(), name=f"random-{name}")


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int:
    """The device's peak allocation since the last reset (CUDA), else the process's resident high-water mark."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    synchronise(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronise(device)
    return (time.perf_counter() - start) / repeats


def random_ids(model: Model, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return (3 + torch.randint(0, 52, (batch, length), generator=generator)).tolist()


def capture_stage(model: Model, device: torch.device, batch: int, length: int, repeats: int) -> dict:
    """Plain forward pass against recording every layer's mlp.in and mlp.out: on the device (what training uses) and
    into a cube on disk (what `modelrecon capture` does)."""
    ids = random_ids(model, batch, length)
    tokens = batch * length
    plain_batch = model.batch_from_ids(ids)
    sites = ["layers.*.mlp.in", "layers.*.mlp.out"]

    def plain():
        with torch.inference_mode():
            model.forward(plain_batch, logits=False)

    def recorded():
        with torch.inference_mode(), hooked(model, plain_batch, record=sites):
            model.forward(plain_batch, logits=False)

    out = {"tokens_per_call": tokens, "plain_tok_s": tokens / timed(plain, device, repeats)}
    out["recorded_on_device_tok_s"] = tokens / timed(recorded, device, repeats)
    try:
        from modelrecon.cube.capture import capture
    except ImportError as exc:  # zarr not carried
        out["cube"] = f"skipped: {exc}"
        return out
    texts = ["".join(chr(ord("a") + (i * 7 + j) % 26) for j in range(length - 1)) for i in range(batch * repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        capture(model, texts, Path(tmp) / "cube.zarr", sites=sites, batch_size=batch, progress=False)
        synchronise(device)
        seconds = time.perf_counter() - start
    out["cube_tok_s"] = sum(len(model.encode(t)) for t in texts) / seconds
    out["cube_vs_plain"] = out["cube_tok_s"] / out["plain_tok_s"]
    out["recorded_vs_plain"] = out["recorded_on_device_tok_s"] / out["plain_tok_s"]
    return out


class _DeviceSource:
    """Batches of one layer's (mlp.in, mlp.out) recorded on the device, as `StreamSource` serves them."""

    def __init__(self, model: Model, batch: int, length: int, layer: int) -> None:
        self.model, self.batch, self.length, self.layer, self.seed = model, batch, length, layer, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.seed += 1
        ids = self.model.batch_from_ids(random_ids(self.model, self.batch // self.length, self.length, self.seed))
        sites = [f"layers.{self.layer}.mlp.in", f"layers.{self.layer}.mlp.out"]
        with torch.inference_mode(), hooked(self.model, ids, record=sites, dtype=torch.float32) as trace:
            self.model.forward(ids, logits=False)
        x, y = (torch.cat(trace.acts[s]) for s in sites)
        return x[:, None].clone(), y[:, None].clone()

    def state(self):
        return {}, {}


def training_stage(model: Model, device: torch.device, width: int, k: int, batch: int, steps: int) -> dict:
    """Skip-transcoder training on one layer: tokens/s of the optimiser steps alone (activations made beforehand) and
    with the model making them on the fly."""
    layer = model.n_layers // 2
    source = _DeviceSource(model, batch, 128 if batch >= 128 else batch, layer)
    config = DictionaryConfig("skip-transcoder", model.d_model, model.d_model, width, "topk", k,
                              (f"layers.{layer}.mlp.in",), (f"layers.{layer}.mlp.out",))  # fmt: skip
    made = [next(source) for _ in range(steps)]
    options = TrainOptions(tokens=steps * batch, batch_size=batch, lr=1e-3, seed=0, checkpoint_every=0)
    warm_up = TrainOptions(tokens=2 * batch, batch_size=batch, checkpoint_every=0)
    train(iter(made[:2]), [config], warm_up, progress=False, device=device)
    synchronise(device)
    start = time.perf_counter()
    train(iter(made), [config], options, progress=False, device=device)
    synchronise(device)
    steps_only = steps * batch / (time.perf_counter() - start)
    start = time.perf_counter()
    train(source, [config], options, progress=False, device=device)
    synchronise(device)
    return {"width": width, "k": k, "batch": batch, "steps_only_tok_s": steps_only,
            "with_model_tok_s": steps * batch / (time.perf_counter() - start)}  # fmt: skip


def random_transcoders(model: Model, width: int, k: int) -> list[Dictionary]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for layer in range(model.n_layers):
        d = Dictionary(DictionaryConfig("skip-transcoder", model.d_model, model.d_model, width, "topk", k,
                                        (f"layers.{layer}.mlp.in",), (f"layers.{layer}.mlp.out",)))  # fmt: skip
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        out.append(d)
    return out


def attribution_stage(model: Model, device: torch.device, lengths: list[int], width: int, k: int,
                      budget: int) -> list[dict]:  # fmt: skip
    transcoders = random_transcoders(model, width, k)
    rows = []
    for length in lengths:
        prompt = "".join(chr(ord("a") + (i * 11) % 26) for i in range(length))
        reset_peak(device)
        start = time.perf_counter()
        try:
            graph = attribute(model, prompt, transcoders, max_feature_nodes=budget, progress=False)
        except Exception as exc:  # an out-of-memory or a refusal is a result too
            rows.append({"tokens": length, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            continue
        synchronise(device)
        rows.append({"tokens": length, "seconds": time.perf_counter() - start, "peak_gib": peak_bytes(device) / 2**30,
                     "nodes": graph.n_nodes, "edges": len(graph.weights),
                     "edge_check_error": graph.metadata["edge_check_error"]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--small", action="store_true", help="tiny shapes and lengths (the test suite's CPU run)")
    parser.add_argument("--models", nargs="+", help="architectures (default: all of the chosen size)")
    parser.add_argument("--lengths", type=int, nargs="+", help="attribution prompt lengths")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    from modelrecon.models.loading import resolve_device, resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    specs = SMALL if args.small else ARCHITECTURES
    lengths = args.lengths or ([16, 64] if args.small else [128, 512, 2048, 8192])
    sizes = dict(width=64, k=4, batch=64, steps=4, budget=64, cap_batch=2, cap_len=32, repeats=2) if args.small else \
        dict(width=4096, k=32, batch=4096, steps=20, budget=1000, cap_batch=8, cap_len=512, repeats=5)  # fmt: skip
    report = {"device": str(device), "dtype": args.dtype, "torch": torch.__version__,
              "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "models": {}}  # fmt: skip
    for name in args.models or list(specs):
        model = build(name, specs[name], device, dtype)
        print(f"{name}: {model}", flush=True)
        entry = report["models"][name] = {}
        entry["capture"] = capture_stage(model, device, sizes["cap_batch"], sizes["cap_len"], sizes["repeats"])
        print(" capture", json.dumps(entry["capture"]), flush=True)
        entry["training"] = training_stage(model, device, sizes["width"], sizes["k"], sizes["batch"], sizes["steps"])
        print(" training", json.dumps(entry["training"]), flush=True)
        entry["attribution"] = attribution_stage(model, device, lengths, sizes["width"], sizes["k"], sizes["budget"])
        for row in entry["attribution"]:
            print(" attribution", json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
