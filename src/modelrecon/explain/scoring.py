"""Scores of an explanation, each on the feature's held-out (test) examples and each read against a control: the
same scorer given another feature's explanation, so a score means something only above its control.

- detection: tell activating windows from silent ones (random, and similar: around tokens the feature fires on
  elsewhere). Balanced accuracy, 0.5 is chance; AUC too when the judge gives log-probabilities.
- fuzzing: tell windows whose marked tokens are the active ones from windows with as many other tokens marked.
  Balanced accuracy (and AUC).
- simulation: the correlation of the simulated with the real activations over every token of the test windows (the
  lexical judge predicts from the tokens the explanation names; an LLM judge names the tokens it expects to fire).
- causal (output side, the project's thesis applied to explanations): steer the feature to its largest activation
  at the last token of test contexts and measure how much the log-probability of the tokens the explanation names
  rises, relative to the average token; the control is the rise for another explanation's tokens.

The judge is `lexical` (the simulator in `lexical.py`: deterministic, instant, no model) or a `ChatClient`
(`llm.py`), which answers Yes/No per window. Simulation is lexical only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from modelrecon.counterfactual.stats import roc_auc
from modelrecon.explain.examples import FeatureExamples, Window
from modelrecon.explain.lexical import Reading, read_explanation
from modelrecon.explain.prompts import (
    judge_messages,
    marked,
    parse_token_numbers,
    parse_yes_no,
    simulation_messages,
    yes_probability,
)

SCORERS = ("detection", "fuzzing", "simulation", "causal")


@dataclass
class Score:
    score: float | None  # balanced accuracy (detection, fuzzing), correlation (simulation), logprob rise (causal)
    control: float | None  # the same scorer given another feature's explanation
    n: int  # test items behind the score
    judge: str
    auc: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def balanced_accuracy(predicted: list[bool], truth: list[bool]) -> float | None:
    """Mean of the true-positive and true-negative rates; None without both classes."""
    p, t = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if t.all() or not t.any():
        return None
    return float(((p & t).sum() / t.sum() + (~p & ~t).sum() / (~t).sum()) / 2)


def detection_items(ex: FeatureExamples) -> list[tuple[str, bool, Window]]:
    """(text, fires, window) for every test window."""
    items = [(marked(w, set()), True, w) for w in ex.test_active]
    return items + [(marked(w, set()), False, w) for w in ex.test_random + ex.test_similar]


def fuzzing_items(ex: FeatureExamples, seed: int = 0) -> list[tuple[str, bool, Window, set[int]]]:
    """(text with marks, correctly marked, window, marks): each activating window twice, once with its active tokens
    marked and once with as many silent tokens marked; silent windows with random marks."""
    generator = np.random.default_rng(seed)
    items = []
    for w in ex.test_active:
        active = {i for i, a in enumerate(w.acts) if a > 0}
        silent = [i for i, a in enumerate(w.acts) if a <= 0]
        items.append((marked(w, active), True, w, active))
        if silent:
            wrong = set(generator.choice(silent, size=min(len(active), len(silent)), replace=False).tolist())
            items.append((marked(w, wrong), False, w, wrong))
    for w in ex.test_random + ex.test_similar:
        wrong = set(generator.choice(len(w.tokens), size=1, replace=False).tolist())
        items.append((marked(w, wrong), False, w, wrong))
    return items


def _first_position(w: Window) -> int:
    return w.position - w.focus


def lexical_detection(reading: Reading, ex: FeatureExamples) -> tuple[list[float], list[bool]]:
    items = detection_items(ex)
    return [float(any(reading.predict(w.tokens, _first_position(w)))) for _, _, w in items], [t for _, t, _ in items]


def lexical_fuzzing(reading: Reading, ex: FeatureExamples) -> tuple[list[float], list[bool]]:
    items = fuzzing_items(ex)
    scores = []
    for _, _, w, marks in items:
        predicted = reading.predict(w.tokens, _first_position(w))
        scores.append(float(np.mean([predicted[i] for i in marks])) if marks else 0.0)
    return scores, [t for _, t, _, _ in items]


def simulation(reading: Reading, ex: FeatureExamples) -> tuple[float | None, int]:
    """Pearson correlation of the simulated with the real activations over the test windows' tokens."""
    predicted, real = [], []
    for w in ex.test_active + ex.test_random + ex.test_similar:
        predicted += reading.predict(w.tokens, _first_position(w))
        real += w.acts
    if len(real) < 2 or np.std(predicted) == 0 or np.std(real) == 0:
        return (0.0 if real else None), len(real)
    return float(np.corrcoef(predicted, real)[0, 1]), len(real)


def _lexical(scorer: str, explanation: str, ex: FeatureExamples) -> tuple[float | None, int, float | None]:
    reading = read_explanation(explanation)
    if scorer == "simulation":
        value, n = simulation(reading, ex)
        return value, n, None
    scores, truth = (lexical_detection if scorer == "detection" else lexical_fuzzing)(reading, ex)
    return balanced_accuracy([s >= 0.5 for s in scores], truth), len(truth), None


def _llm_simulation(client, explanation: str, ex: FeatureExamples) -> tuple[float | None, int, float | None]:
    """The judge names the tokens of each test window it expects the feature to fire on; those are simulated at 1,
    the rest at 0, and correlated with the real activations (a window whose answer fails counts as all 0)."""
    windows = ex.test_active + ex.test_random + ex.test_similar
    if not windows:
        return None, 0, None
    answers = client.chat_many([simulation_messages(explanation, w) for w in windows], max_tokens=48)
    from modelrecon.explain.llm import ClientUnusable

    unusable = next((a for a in answers if isinstance(a, ClientUnusable)), None)
    if unusable is not None:
        raise unusable
    predicted, real = [], []
    for w, answer in zip(windows, answers, strict=True):
        named = set() if isinstance(answer, Exception) else parse_token_numbers(answer.text, len(w.tokens))
        predicted += [1.0 if i in named else 0.0 for i in range(len(w.tokens))]
        real += w.acts
    if np.std(predicted) == 0 or np.std(real) == 0:
        return 0.0, len(real), None
    return float(np.corrcoef(predicted, real)[0, 1]), len(real), None


def _llm(client, scorer: str, explanation: str, ex: FeatureExamples) -> tuple[float | None, int, float | None]:
    """Yes/No per test window from the judge; unparseable answers count as No (and are counted as such)."""
    if scorer == "simulation":
        return _llm_simulation(client, explanation, ex)
    if scorer == "detection":
        items = [(text, truth) for text, truth, _ in detection_items(ex)]
    else:
        items = [(text, truth) for text, truth, _, _ in fuzzing_items(ex)]
    if not items:
        return None, 0, None
    requests = [judge_messages(explanation, text, fuzzing=scorer == "fuzzing") for text, _ in items]
    answers = client.chat_many(requests, max_tokens=3, logprobs=True)
    from modelrecon.explain.llm import ClientUnusable

    unusable = next((a for a in answers if isinstance(a, ClientUnusable)), None)
    if unusable is not None:
        raise unusable
    said, probabilities = [], []
    for answer in answers:
        ok = not isinstance(answer, Exception)
        said.append(bool(ok and parse_yes_no(answer.text)))
        probabilities.append(yes_probability(answer.logprobs) if ok else None)
    truth = [t for _, t in items]
    area = roc_auc(probabilities, truth) if all(p is not None for p in probabilities) else None
    return balanced_accuracy(said, truth), len(items), area


def score_explanation(scorer: str, explanation: str, control: str, ex: FeatureExamples, judge="lexical") -> Score:
    """One scorer (detection, fuzzing, simulation) of `explanation` and of the `control` explanation on `ex`."""
    lexical = judge == "lexical"
    run = _lexical if lexical else (lambda s, e, x: _llm(judge, s, e, x))
    value, n, area = run(scorer, explanation, ex)
    control_value, _, _ = run(scorer, control, ex)
    return Score(value, control_value, n, "lexical" if lexical else judge.name, area)


def named_token_ids(tokenizer, reading: Reading) -> list[int]:
    """Token ids of what an explanation says the feature writes (after `promotes`), else of what it names: each name
    as a single token, with and without a leading space."""
    names = reading.writes or sorted(reading.names)
    ids = set()
    for name in names:
        for variant in {name, " " + name.strip(), name.strip()}:
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(int(encoded[0]))
    return sorted(ids)


def causal_score(rm, ex: FeatureExamples, explanation: str, control: str, cleans: list) -> Score:
    """Steer the feature to its largest activation at the last token of each clean run (`rm.clean` of a test
    context); the score is the mean rise in log-probability of the explanation's tokens minus the mean rise over the
    vocabulary (the control's likewise)."""
    from modelrecon.circuits.replacement import FeatureChange, intervene

    tokenizer = rm.model.tokenizer
    wanted = [named_token_ids(tokenizer, read_explanation(text)) for text in (explanation, control)]
    if not cleans or ex.max <= 0:
        return Score(None, None, 0, "steering")
    rises = [[], []]
    with torch.no_grad():
        for clean in cleans:
            change = FeatureChange(ex.layer, len(clean.ids) - 1, ex.feature, value=ex.max)
            steered = torch.log_softmax(intervene(rm, clean, [change]).double(), -1)
            delta = steered - torch.log_softmax(clean.logits.double(), -1)
            for slot, token_ids in enumerate(wanted):
                if token_ids:
                    rises[slot].append(float(delta[token_ids].mean() - delta.mean()))
    value, control_value = (float(np.mean(r)) if r else None for r in rises)
    return Score(value, control_value, len(cleans), "steering")


def causal_contexts(cube, prompts: list[int], n: int = 4, length: int = 24, seed: int = 0) -> list[list[int]]:
    """Token ids of `n` contexts from the test `prompts`: each a prompt's tokens up to a seeded position."""
    generator = np.random.default_rng(seed)
    contexts = []
    for prompt in sorted(prompts)[:n]:
        ids = cube.token_ids(prompt)
        end = int(generator.integers(min(len(ids), 8), len(ids) + 1)) if len(ids) > 1 else len(ids)
        contexts.append([int(i) for i in ids[:end][-length:]])
    return [c for c in contexts if c]
