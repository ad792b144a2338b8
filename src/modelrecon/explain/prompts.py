"""The prompt templates of the LLM explainer and scorers (docs/explanations.md shows them filled in).

`PROMPT_VERSION` is saved with every explanation and score and is part of the response cache's key, so changing a
template here re-asks the model instead of reusing answers to the old wording. Activating tokens are marked
`<<like this>>` (delphi's convention); the explainer gives its answer on a last line that starts `Explanation:`.
"""

from __future__ import annotations

from modelrecon.explain.examples import Window

PROMPT_VERSION = "v2"  # v2: the simulation prompt

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher. You are shown text excerpts in which one feature of a language model "
    "is active; the tokens where it is active are marked <<like this>>. Say in one short phrase what the marked "
    "tokens have in common: the words, their meaning, or their role in the text. Quote exact tokens in double "
    "quotes when the feature is about specific words."
)
EXPLAIN_USER = "{examples}\n\nGive your answer on the last line, starting with 'Explanation:'."

JUDGE_SYSTEM = (
    "You check descriptions of features of a language model against text. Answer with exactly one word: Yes or No."
)
DETECTION_USER = (
    "Feature description: {explanation}\n\nText: {text}\n\nDoes this text contain what the description describes? "
    "Answer Yes or No."
)
FUZZING_USER = (
    "Feature description: {explanation}\n\nIn the text below some tokens are marked <<like this>>.\n\nText: {text}"
    "\n\nAre the marked tokens what the description describes? Answer Yes or No."
)

SIMULATION_USER = (
    "Feature description: {explanation}\n\nThe tokens of a text, numbered:\n{tokens}\n\nOn which tokens is this "
    "feature active? Answer with their numbers separated by commas, or None."
)
SIMULATION_SYSTEM = (
    "You predict where a feature of a language model is active, from its description. Answer with token numbers only."
)


def marked(window: Window, marks: set[int] | None = None, threshold: float = 0.0) -> str:
    """The window's text with `marks` (token indices; default: the tokens active above `threshold`) in << >>."""
    if marks is None:
        marks = {i for i, a in enumerate(window.acts) if a > threshold}
    out = []
    for i, token in enumerate(window.tokens):
        if i in marks:
            stripped = token.lstrip()
            out.append(f"{token[: len(token) - len(stripped)]}<<{stripped}>>")
        else:
            out.append(token)
    return "".join(out).replace("\n", " ").strip()


def explain_messages(windows: list[Window]) -> list[dict[str, str]]:
    """The chat that asks for an explanation of a feature from its train windows (tokens above a fifth of the
    strongest activation marked)."""
    peak = max((max(w.acts) for w in windows), default=0.0)
    lines = [f"Example {i}: {marked(w, threshold=0.2 * peak)}" for i, w in enumerate(windows, 1)]
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": EXPLAIN_USER.format(examples="\n".join(lines))}]  # fmt: skip


def judge_messages(explanation: str, text: str, fuzzing: bool) -> list[dict[str, str]]:
    template = FUZZING_USER if fuzzing else DETECTION_USER
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": template.format(explanation=explanation, text=text)}]  # fmt: skip


def simulation_messages(explanation: str, window: Window) -> list[dict[str, str]]:
    """The chat that asks on which tokens of a window the described feature fires (one token per numbered line)."""
    tokens = "\n".join(f"{i}: {t!r}" for i, t in enumerate(window.tokens))
    return [{"role": "system", "content": SIMULATION_SYSTEM},
            {"role": "user", "content": SIMULATION_USER.format(explanation=explanation, tokens=tokens)}]  # fmt: skip


def parse_token_numbers(answer: str, n: int) -> set[int]:
    """The token numbers in a simulation answer (those in 0..n-1; anything else is ignored)."""
    import re

    return {int(m) for m in re.findall(r"\d+", answer) if int(m) < n}


def parse_explanation(answer: str) -> str | None:
    """The explanation in a model's answer: after the last `Explanation:`, else its last non-empty line."""
    lowered = answer.lower()
    at = lowered.rfind("explanation:")
    text = answer[at + len("explanation:") :] if at >= 0 else answer
    lines = [line.strip(" *-\t") for line in text.strip().splitlines() if line.strip(" *-\t")]
    if not lines:
        return None
    return (lines[0] if at >= 0 else lines[-1])[:300] or None


def parse_yes_no(answer: str) -> bool | None:
    """True for an answer starting Yes, False for No, None otherwise."""
    word = answer.strip().strip("*\"'.").split(maxsplit=1)
    if not word:
        return None
    first = word[0].strip(".,!:").lower()
    return True if first == "yes" else False if first == "no" else None


def yes_probability(logprobs: dict[str, float] | None) -> float | None:
    """P(Yes) / (P(Yes) + P(No)) from the first answer token's top log-probabilities."""
    import math

    if not logprobs:
        return None
    yes = sum(math.exp(v) for k, v in logprobs.items() if k.strip().lower() == "yes")
    no = sum(math.exp(v) for k, v in logprobs.items() if k.strip().lower() == "no")
    return yes / (yes + no) if yes + no > 0 else None
