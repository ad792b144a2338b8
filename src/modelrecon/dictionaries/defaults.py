"""Default transcoders for the embedded models: built once on this machine, then cached.

Committing trained weights for every layer would put tens of megabytes into the repository, so each quality tier is
a recipe instead: `default_transcoders(model, quality)` trains it the first time (`demo`: a few minutes on two CPU
cores; `standard`: up to an hour) and keeps it under the modelrecon cache, keyed by the model's weights and the
recipe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from modelrecon.dictionaries.formats import load_dictionaries, save_dictionaries
from modelrecon.dictionaries.model import Dictionary
from modelrecon.dictionaries.tiers import RECIPES, TIERS
from modelrecon.dictionaries.train import bf16_is_fast, train_on_model
from modelrecon.errors import BadInputError
from modelrecon.models.loading import cache_root
from modelrecon.models.model import Model


def _folder(model: Model, recipe: dict) -> Path:
    spec = json.dumps({**recipe, "options": asdict(recipe["options"]), "weights": model.weights_sha256()},
                      sort_keys=True)  # fmt: skip
    return cache_root() / "transcoders" / f"{model.name}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def default_transcoders(model: Model, quality: str = "demo", build: bool = True,
                         progress: bool = True) -> list[Dictionary]:  # fmt: skip
    """The model's transcoders of one quality tier (one per layer), trained and cached on first use when `build`.
    A killed build resumes from its checkpoint."""
    recipe = _recipe(model, quality)
    folder = _folder(model, recipe)
    if (folder / "config.json").exists():
        return load_dictionaries(folder)
    if not build:
        raise BadInputError(f"the {quality} transcoders of {model.name} are not built yet; run modelrecon "
                            f"transcoders --quality {quality}")  # fmt: skip
    checkpoint = folder.with_name(folder.name + ".checkpoint")  # a killed build resumes here
    dictionaries = train_on_model(
        model, recipe["kind"], recipe["site"], recipe["width"], recipe["options"], activation=recipe["activation"],
        k=recipe["k"], corpus=_corpus(model, recipe["corpus"], progress), context_length=recipe["context_length"],
        checkpoint=checkpoint,
        progress=progress,
    )  # fmt: skip
    save_dictionaries(dictionaries, folder)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return load_dictionaries(folder)


def _corpus(model: Model, name: str, progress: bool) -> str:
    """A recipe's corpus: `sample` (shipped), or `default:N`, the offline default corpus of N tokens (built once)."""
    if not name.startswith("default:"):
        return name
    from modelrecon.corpus import default_corpus

    return str(default_corpus(int(name.split(":")[1]), model.tokenizer, progress=progress))


def default_transcoders_folder(model: Model, quality: str = "demo") -> Path | None:
    """Where a tier is cached (None when the model has no recipes)."""
    return _folder(model, _recipe(model, quality)) if model.name in RECIPES else None


def built_tiers(model: Model) -> list[str]:
    """The tiers of the model that are built and cached here."""
    if model.name not in RECIPES:
        return []
    return [
        t for t in TIERS if t in RECIPES[model.name] and (_folder(model, _recipe(model, t)) / "config.json").exists()
    ]


def transcoders_by_name(model: Model, name: str) -> list[Dictionary]:
    """Transcoders named on the command line: a tier (`demo`, `standard`), `default` (the best tier built here, else
    the demo tier, built on first use), or anything `dictionaries.hub.open_dictionaries` reads (a folder, a
    circuit-tracer config, a hub repo, a SAELens release). Only the demo tier is built implicitly: the standard one
    takes up to an hour and is built by `modelrecon transcoders`."""
    from modelrecon.dictionaries.hub import looks_like_hub_name, open_dictionaries

    if name == "default":
        built = built_tiers(model)
        return default_transcoders(model, built[-1] if built else "demo")
    if name in TIERS:
        return default_transcoders(model, name, build=name == "demo")
    from modelrecon import storage

    if not storage.is_url(name) and not storage.local_path(name).exists() and not looks_like_hub_name(name):
        raise BadInputError(f"--transcoders {name!r} is neither a folder, a URL (s3://bucket/folder), a hub "
                            f"name (org/repo[/path], saelens:RELEASE/ID) nor one of default, "
                            f"{', '.join(TIERS)}")  # fmt: skip
    return open_dictionaries(name)


def check_tier(model: Model, quality: str) -> None:
    """A one-line error for an unknown tier, or a model without recipes."""
    _recipe(model, quality)


def _recipe(model: Model, quality: str = "demo") -> dict:
    if quality not in TIERS:
        raise BadInputError(f"unknown transcoder quality {quality!r}; use one of {', '.join(TIERS)}")
    recipes = RECIPES.get(model.name)
    if recipes is None:
        raise BadInputError(
            f"no default transcoders for {model.name}; train some with modelrecon train --kind skip-transcoder "
            f"--site 'layers.*.mlp' --out DIR and pass that folder (defaults exist for {', '.join(RECIPES)})"
        )
    recipe = recipes.get(quality)
    if recipe is None:
        raise BadInputError(f"{model.name} has no {quality} transcoders; its tiers: {', '.join(recipes)}")
    options = recipe["options"]
    return {**recipe, "options": replace(options, bf16=options.bf16 and bf16_is_fast())}
