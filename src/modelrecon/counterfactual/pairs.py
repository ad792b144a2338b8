"""Datasets of prompt pairs: a clean prompt, a counterfactual that changes the answer, the answer and a wrong answer.

The file format is JSONL, one object per line: `{"clean": ..., "counterfactual": ..., "answer": ..., "wrong": ...}`
(answers with their leading space, e.g. `" Paris"`). See docs/counterfactual.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelrecon.errors import BadInputError
from modelrecon.files import read_text
from modelrecon.models.model import Model, single_token

FIELDS = ("clean", "counterfactual", "answer", "wrong")
# Datasets shipped with the package, usable by name wherever a pairs file is asked for.
DATASETS = {"capitals": Path(__file__).resolve().parent.parent / "data" / "capitals.jsonl"}


@dataclass(frozen=True)
class Pair:
    clean: str
    counterfactual: str
    answer: str
    wrong: str


@dataclass(frozen=True)
class PairTokens:
    """A pair as token ids; clean and counterfactual have the same length (so positions correspond)."""

    clean: list[int]
    counterfactual: list[int]
    answer: int
    wrong: int

    @property
    def length(self) -> int:
        return len(self.clean)


def read_pairs(path: str | Path) -> list[Pair]:
    """Read a JSONL file of pairs (or a shipped dataset by name, e.g. "capitals").

    A bad line raises an error naming the file, the line and the fix.
    """
    path = Path(path)
    if not path.is_file() and str(path) in DATASETS:
        path = DATASETS[str(path)]
    if not path.is_file():
        raise BadInputError(
            f"pairs file {path} does not exist; give a JSONL file with one pair per line "
            f"or a shipped dataset ({', '.join(DATASETS)})"
        )
    pairs = []
    for number, line in enumerate(read_text(path, "pairs file").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{where} is not valid JSON ({exc.msg}); write one JSON object per line") from None
        pairs.append(pair_from_dict(data, where))
    if not pairs:
        raise BadInputError(f"pairs file {path} has no pairs; write one JSON object per line")
    return pairs


def pair_from_dict(data: object, where: str = "pair") -> Pair:
    if not isinstance(data, dict):
        raise BadInputError(f"{where}: a pair must be a JSON object with fields {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise BadInputError(f"{where}: missing field(s) {', '.join(missing)}; every pair needs {', '.join(FIELDS)}")
    for f in FIELDS:
        if not isinstance(data[f], str) or not data[f]:
            raise BadInputError(f"{where}: field '{f}' must be a non-empty string")
    return Pair(*(data[f] for f in FIELDS))


def tokenize_pairs(model: Model, pairs: Sequence[Pair | PairTokens]) -> list[PairTokens]:
    """Token ids of every pair (pairs already tokenised pass through). Rejects pairs whose prompts differ in length
    and answers that are not one token."""
    if not pairs:
        raise BadInputError("no pairs given; give at least one (clean, counterfactual, answer, wrong) pair")
    out = []
    for number, pair in enumerate(pairs):
        if isinstance(pair, PairTokens) and len(pair.clean) == len(pair.counterfactual):
            out.append(pair)
            continue
        if not isinstance(pair, Pair):
            raise BadInputError(f"pair {number} is {type(pair).__name__}, not a Pair")
        clean, counterfactual = model.encode(pair.clean), model.encode(pair.counterfactual)
        if len(clean) != len(counterfactual):
            raise BadInputError(
                f"pair {number}: clean and counterfactual tokenise to {len(clean)} and {len(counterfactual)} tokens "
                f"({model.str_tokens(clean)} vs {model.str_tokens(counterfactual)}); positions must correspond, so "
                "reword one of them to the same number of tokens"
            )
        try:
            answer, wrong = single_token(model, pair.answer), single_token(model, pair.wrong)
        except BadInputError as exc:
            raise BadInputError(f"pair {number}: {exc}") from None
        out.append(PairTokens(clean, counterfactual, answer, wrong))
    return out
