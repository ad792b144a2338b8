"""The quality tiers of the embedded models' default transcoders: each a recipe (trained once, then cached by
dictionaries/defaults.py) and what it measured. Plain data, so `modelrecon models` lists them without torch."""

from __future__ import annotations

from modelrecon.dictionaries.options import TrainOptions

TIERS = ("demo", "standard")

# Skip transcoders: the linear skip path takes the MLP's linear part, so few latents reach a usable FVU. reuse 2: each
# streamed token is trained on twice from one forward pass (the same FVU as two passes, measured). bf16 where this
# machine runs it fast (`bf16_is_fast`); the recipe key records which, so the two builds are cached apart. How each
# tier was chosen, and what it measures, is in docs/dictionaries.md ("Quality tiers", from
# benchmarks/transcoder_frontier.py).
RECIPES: dict[str, dict[str, dict]] = {
    "smollm2-135m": {
        # what `make demo` builds: a few minutes on two cores from the shipped sample corpus
        "demo": {
            "kind": "skip-transcoder",
            "site": "layers.*.mlp",
            "width": 512,
            "activation": "topk",
            "k": 32,
            "corpus": "sample",
            "context_length": 128,
            "options": TrainOptions(
                tokens=65_536, batch_size=256, lr=2e-3, seed=0, checkpoint_every=64, bf16=True, reuse=2
            ),
        },
        # the best point found within an hour on two cores: 4x wider, 4x more tokens, and the offline default corpus
        # (built once from the installed Debian packages: more varied text than the sample, a better held-out FVU)
        "standard": {
            "kind": "skip-transcoder",
            "site": "layers.*.mlp",
            "width": 2048,
            "activation": "topk",
            "k": 32,
            "corpus": "default:1000000",
            "context_length": 128,
            "options": TrainOptions(
                tokens=262_144, batch_size=512, lr=2e-3, seed=0, checkpoint_every=32, bf16=True, reuse=2
            ),
        },
    },
}


# Gemma 3 270M (18 layers, d_model 640, a 262k vocabulary): the demo recipe of SmolLM2, which the frontier found
# best per CPU-minute there; only the demo tier (the standard one has not been measured on this model).
RECIPES["gemma3-270m"] = {"demo": RECIPES["smollm2-135m"]["demo"]}

# What each tier measured on this kind of machine (2 cores, fp32), shown by `modelrecon models`; the numbers and the
# commands that produced them are in docs/dictionaries.md ("Quality tiers").
MEASURED: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "demo": "about 3 min; graph-eval: replacement 0.32, completeness 0.74; held-out FVU 0.57",
        "standard": "35 min; graph-eval: replacement 0.37, completeness 0.78; held-out FVU 0.40",
    },
}


def tier_rows() -> list[tuple[str, str, str, str]]:
    """(model, tier, recipe, measured) for every model with recipes: what `modelrecon models` lists."""
    rows = []
    for model, recipes in RECIPES.items():
        for tier, r in recipes.items():
            options = r["options"]
            corpus = "the shipped sample" if r["corpus"] == "sample" else "the offline default corpus"
            recipe = f"{r['kind']} width {r['width']}, k {r['k']}, {options.tokens:,} tokens of {corpus}"
            rows.append((model, tier, recipe, MEASURED.get(model, {}).get(tier, "")))
    return rows
