"""Metrics of a run's next-token prediction: what an intervention's effect is measured in.

Every metric takes the last-position logits of one prompt (`[vocab]`) and returns a float tensor (a scalar), so it can
also be differentiated (`run(grad_of=...)`). Answers are token-id lists: a multi-token answer is scored by the sum of
its token log-probabilities where that is well defined (`answer_logprob` on a full run), and rejected with a clear
error by the metrics that need a single token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from modelrecon.errors import BadInputError


def logit_diff(logits: torch.Tensor, answer: int, wrong: int) -> torch.Tensor:
    return logits[answer] - logits[wrong]


def prob(logits: torch.Tensor, answer: int) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)[answer]


def logprob(logits: torch.Tensor, answer: int) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)[answer]


def rank(logits: torch.Tensor, answer: int) -> torch.Tensor:
    """0 when the answer is the top prediction."""
    return (logits > logits[answer]).sum()


def top1(logits: torch.Tensor, answer: int) -> torch.Tensor:
    return (rank(logits, answer) == 0).float()


def kl_to(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || this run) over the next-token distribution, in nats."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    cur = torch.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - cur)).sum()


def answer_logprob(position_logits: torch.Tensor, answer_ids: Sequence[int]) -> torch.Tensor:
    """Sum of log-probabilities of a (multi-token) answer, from the logits of a run on prompt + answer.

    position_logits: `[pos, vocab]` of that run; the answer's tokens are the last len(answer_ids) of the input.
    """
    n = len(answer_ids)
    if n == 0 or position_logits.shape[0] <= n:
        raise BadInputError("answer_logprob needs a run on the prompt followed by the answer's tokens")
    logprobs = torch.log_softmax(position_logits[-n - 1 : -1].float(), dim=-1)
    return logprobs[torch.arange(n), torch.tensor(list(answer_ids))].sum()


# --- metrics of an experiment item -----------------------------------------------------------------------------------
# An item metric takes the last-position logits `[vocab]` of a run and the item (its answer and wrong token ids and
# the clean run's logits) and returns a scalar. Users may pass their own callable of that shape.
ItemMetric = Callable[[torch.Tensor, "ScoredItem"], torch.Tensor | float]


@dataclass
class ScoredItem:
    answer: int
    wrong: int | None
    clean_logits: torch.Tensor | None = None


def _needs_wrong(item: ScoredItem) -> int:
    if item.wrong is None:
        raise BadInputError("metric logit_diff needs a wrong answer for every item")
    return item.wrong


ITEM_METRICS: dict[str, ItemMetric] = {
    "logit_diff": lambda logits, item: logit_diff(logits, item.answer, _needs_wrong(item)),
    "prob": lambda logits, item: prob(logits, item.answer),
    "logprob": lambda logits, item: logprob(logits, item.answer),
    "rank": lambda logits, item: rank(logits, item.answer),
    "top1": lambda logits, item: top1(logits, item.answer),
    "kl": lambda logits, item: kl_to(item.clean_logits, logits),
}


def item_metric(metric: str | ItemMetric) -> tuple[str, ItemMetric]:
    """(name, function) for a metric name or a user callable `fn(logits, item) -> scalar`."""
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    if metric not in ITEM_METRICS:
        raise BadInputError(f"unknown metric {metric!r}; use one of {', '.join(ITEM_METRICS)} or a callable")
    return metric, ITEM_METRICS[metric]
