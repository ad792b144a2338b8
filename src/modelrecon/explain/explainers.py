"""Explaining and scoring many features: examples from a cube, an explainer (lexical, or an LLM through `llm.py`),
the scorers, and the explanations file, saved after every batch (resumable; Ctrl-C keeps what was done).

The control of each feature's scores is the explanation of another feature of the same run (the next one in
order), so every score is read against what the same scorer gives an unrelated explanation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from modelrecon import storage
from modelrecon.errors import BadInputError
from modelrecon.explain.examples import FeatureExamples, sample_examples, split_prompts
from modelrecon.explain.lexical import lexical_explanation
from modelrecon.explain.prompts import PROMPT_VERSION, explain_messages, parse_explanation
from modelrecon.explain.scoring import SCORERS, causal_contexts, causal_score, score_explanation
from modelrecon.explain.store import new_document, resumable, save_explanations

LEXICAL = "lexical"


def promoted_tokens(rm, layer: int, feature: int, n: int = 3) -> list[str]:
    """The tokens the feature's decoder direction promotes most through the unembedding."""
    from modelrecon.explain.dashboards import _decoder_direction

    with torch.no_grad():
        unembed = rm.model.hf.get_output_embeddings().weight.detach().float()
        effect = unembed @ _decoder_direction(rm, layer, feature).float()
    return [rm.model.tokenizer.decode([int(i)]) for i in effect.topk(n).indices]


def explain_one(ex: FeatureExamples, client=None, promotes: list[str] | None = None) -> str | None:
    """An explanation of one feature: lexical without a client, else the client's answer parsed (None when the
    answer holds none)."""
    if client is None:
        return lexical_explanation(ex, promotes)
    if not ex.train:
        return "never fires in the train prompts"
    answer = client.chat(explain_messages(ex.train), max_tokens=120)
    return parse_explanation(answer.text)


def check_scorers(scorers: Iterable[str]) -> list[str]:
    chosen = [s.strip() for s in scorers if s.strip()]
    unknown = [s for s in chosen if s not in SCORERS]
    if unknown:
        raise BadInputError(f"unknown scorer {unknown[0]!r}; choose from {', '.join(SCORERS)}")
    return chosen


def explain_features(
    rm,
    cube,
    features: list[tuple[int, int]],
    out: str | Path,
    *,
    explainer=None,
    judge="lexical",
    scorers: Iterable[str] = ("detection", "fuzzing", "simulation"),
    dictionary: str = "",
    batch: int = 8,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Explain and score `features` from `cube`, writing the explanations file `out` (module docstring).
    `explainer`: None for the lexical explainer, or a `ChatClient`; `judge`: "lexical" or a `ChatClient`."""
    from modelrecon.progress import token_progress

    scorers = check_scorers(scorers)
    for client in (explainer, judge):
        if client is not None and not isinstance(client, str):
            _preflight(client)
    out = storage.location(out)  # a path or an fsspec URL
    explainer_name = LEXICAL if explainer is None else explainer.name
    judge_name = judge if isinstance(judge, str) else judge.name
    document = resumable(out, rm.model.name, explainer_name, PROMPT_VERSION) or new_document(
        rm.model.name, dictionary, str(cube.path), explainer_name, PROMPT_VERSION, judge_name
    )
    features = sorted(dict.fromkeys((int(layer), int(f)) for layer, f in features))
    todo = [f for f in features if not document["features"].get(f"{f[0]}_{f[1]}", {}).get("explanation")]
    examples = sample_examples(rm, cube, todo, seed=seed) if todo else {}
    explanations: dict[tuple[int, int], str | None] = {
        f: document["features"][f"{f[0]}_{f[1]}"].get("explanation") for f in features if f not in todo
    }
    cleans = []
    if "causal" in scorers and todo:  # the same test contexts for every feature: their clean runs are made once
        cleans = [rm.clean(ids) for ids in causal_contexts(cube, sorted(split_prompts(cube.n_prompts, seed)[1]))]
    done = len(features) - len(todo)
    with token_progress(len(features), done, progress, "explaining", "features", "feature") as advance:
        # a batch's explanations first, so that each feature's control (another's explanation) exists when scored
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            for f in chunk:
                explanations[f] = _explain_or_error(rm, examples[f], explainer, document)
            for f in chunk:
                if explanations[f] is not None:
                    scores = _scores(rm, cleans, examples[f], explanations[f], _control(features, explanations, f),
                                     scorers, judge)  # fmt: skip
                    document["features"][f"{f[0]}_{f[1]}"] = {
                        "layer": f[0], "feature": f[1], "explanation": explanations[f],
                        "frequency": round(examples[f].frequency, 6), "scores": scores,
                    }  # fmt: skip
            save_explanations(document, out)
            advance(len(chunk))
    if not todo:
        save_explanations(document, out)
    return document


def _preflight(client) -> None:
    """One tiny request, so that an unusable endpoint or model fails at once with its one-line error (any other
    failure, e.g. a malformed answer, is left to the items it happens to)."""
    from modelrecon.explain.llm import ClientUnusable, LLMError

    try:
        client.chat([{"role": "user", "content": "Answer with one word: ready?"}], max_tokens=1)
    except ClientUnusable:
        raise
    except LLMError:
        pass


def _explain_or_error(rm, ex: FeatureExamples, explainer, document: dict) -> str | None:
    """The feature's explanation; a failed request or an answer without one is recorded and the run goes on."""
    key = f"{ex.layer}_{ex.feature}"
    from modelrecon.explain.llm import ClientUnusable

    try:
        text = explain_one(ex, explainer, promoted_tokens(rm, ex.layer, ex.feature))
    except ClientUnusable:
        raise  # every other feature would fail the same way
    except BadInputError as exc:
        text, error = None, str(exc)
    else:
        error = "the explainer's answer held no explanation"
    if text is None:
        document["features"][key] = {"layer": ex.layer, "feature": ex.feature, "error": error}
    return text


def _control(features: list[tuple[int, int]], explanations: dict, f: tuple[int, int]) -> str:
    """The explanation of the next explained feature after `f` (wrapping), or a fixed unrelated one."""
    i = features.index(f)
    for other in features[i + 1 :] + features[:i]:
        if explanations.get(other):
            return explanations[other]
    return 'fires on "zzzz"'


def _scores(rm, cleans, ex: FeatureExamples, explanation: str, control: str, scorers: list[str], judge) -> dict:
    scores = {}
    for scorer in scorers:
        if scorer == "causal":
            scores[scorer] = causal_score(rm, ex, explanation, control, cleans).to_dict()
        else:
            scores[scorer] = score_explanation(scorer, explanation, control, ex, judge).to_dict()
    return scores
