"""Default transcoders for the embedded models: built once on this machine, then cached.

Committing trained weights for every layer would put tens of megabytes into the repository, so the default set is
a recipe instead: `default_transcoders(model)` trains it the first time (about 5 minutes on two CPU cores, from
the shipped sample corpus) and keeps it under the modelrecon cache, keyed by the model's weights and the recipe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from modelrecon.dictionaries.formats import load_dictionaries, save_dictionaries
from modelrecon.dictionaries.model import Dictionary
from modelrecon.dictionaries.train import TrainOptions, bf16_is_fast, train_on_model
from modelrecon.errors import BadInputError
from modelrecon.models.loading import cache_root
from modelrecon.models.model import Model

# Skip transcoders: the linear skip path takes the MLP's linear part, so few latents reach a usable FVU. reuse 2: the
# sample corpus has 70k tokens, so each is trained on twice from one forward pass (the same FVU as two passes,
# measured). 65,536 tokens in 256 steps of 256 keep `make demo` under 10 minutes on two cores without fast bf16 (mean
# FVU 0.39 against 0.37 for twice the tokens, benchmarks/transcoder_recipe.py). bf16 where this machine runs it fast
# (`bf16_is_fast`); the recipe key records which, so the two builds are cached apart.
RECIPES: dict[str, dict] = {
    "smollm2-135m": {
        "kind": "skip-transcoder",
        "site": "layers.*.mlp",
        "width": 512,
        "activation": "topk",
        "k": 16,
        "corpus": "sample",
        "context_length": 128,
        "options": TrainOptions(
            tokens=65_536, batch_size=256, lr=2e-3, seed=0, checkpoint_every=64, bf16=True, reuse=2
        ),
    },
}


def _folder(model: Model, recipe: dict) -> Path:
    spec = json.dumps({**recipe, "options": asdict(recipe["options"]), "weights": model.weights_sha256()},
                      sort_keys=True)  # fmt: skip
    return cache_root() / "transcoders" / f"{model.name}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def default_transcoders(model: Model, build: bool = True, progress: bool = True) -> list[Dictionary]:
    """The model's default transcoders (one per layer), trained and cached on first use when `build`."""
    recipe = _recipe(model)
    if recipe is None:
        raise BadInputError(
            f"no default transcoders for {model.name}; train some with modelrecon train --kind skip-transcoder "
            f"--site 'layers.*.mlp' --out DIR and pass that folder (defaults exist for {', '.join(RECIPES)})"
        )
    folder = _folder(model, recipe)
    if (folder / "config.json").exists():
        return load_dictionaries(folder)
    if not build:
        raise BadInputError(f"the default transcoders of {model.name} are not built yet; run modelrecon transcoders")
    checkpoint = folder.with_name(folder.name + ".checkpoint")  # a killed build resumes here
    dictionaries = train_on_model(
        model, recipe["kind"], recipe["site"], recipe["width"], recipe["options"], activation=recipe["activation"],
        k=recipe["k"], corpus=recipe["corpus"], context_length=recipe["context_length"], checkpoint=checkpoint,
        progress=progress,
    )  # fmt: skip
    save_dictionaries(dictionaries, folder)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return load_dictionaries(folder)


def default_transcoders_folder(model: Model) -> Path | None:
    """Where the default set is cached (None when the model has no recipe)."""
    recipe = _recipe(model)
    return None if recipe is None else _folder(model, recipe)


def _recipe(model: Model) -> dict | None:
    recipe = RECIPES.get(model.name)
    if recipe is None:
        return None
    options = recipe["options"]
    return {**recipe, "options": replace(options, bf16=options.bf16 and bf16_is_fast())}
