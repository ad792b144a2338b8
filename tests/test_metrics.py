"""Metrics against direct computation on known logits, and multi-token answers handled or rejected."""

import math

import pytest
import torch

import modelrecon as mr
from modelrecon.counterfactual import metrics
from modelrecon.errors import BadInputError
from modelrecon.models.model import answer_tokens, single_token


def test_metrics_on_known_logits():
    logits = torch.tensor([2.0, 0.0, 1.0, -1.0])
    z = sum(math.exp(x) for x in logits.tolist())
    assert float(metrics.logit_diff(logits, 0, 2)) == 1.0
    assert float(metrics.prob(logits, 2)) == pytest.approx(math.exp(1.0) / z)
    assert float(metrics.logprob(logits, 3)) == pytest.approx(-1.0 - math.log(z))
    assert [int(metrics.rank(logits, i)) for i in range(4)] == [0, 2, 1, 3]
    assert [float(metrics.top1(logits, i)) for i in range(4)] == [1.0, 0.0, 0.0, 0.0]
    assert float(metrics.kl_to(logits, logits)) == pytest.approx(0.0, abs=1e-7)
    other = torch.tensor([0.0, 0.0, 0.0, 0.0])
    p = torch.softmax(logits, -1)
    assert float(metrics.kl_to(logits, other)) == pytest.approx(float((p * (p.log() - math.log(0.25))).sum()))


def test_answers_on_the_real_model(smollm2):
    paris = single_token(smollm2, " Paris")
    result = mr.run(smollm2, "The capital of France is")
    assert float(metrics.top1(result.logits[0][-1], paris)) == 1.0
    multi = answer_tokens(smollm2, " Kuala Lumpur")
    assert len(multi) > 1
    with pytest.raises(BadInputError, match=r"is 6 tokens \[' K', 'ual', .*\]; give a single-token answer"):
        single_token(smollm2, " Kuala Lumpur")
    # Multi-token: the sum of per-token log-probs equals scoring token by token with growing prompts.
    prompt = "The capital of Malaysia is"
    full = mr.run(smollm2, prompt + " Kuala Lumpur")
    prompt_ids = smollm2.encode(prompt)
    assert full.tokens[0].tolist() == prompt_ids + multi
    total = metrics.answer_logprob(full.logits[0], multi)
    step = 0.0
    for k, token in enumerate(multi):
        batch = smollm2.batch_from_ids([prompt_ids + multi[:k]])
        step += float(torch.log_softmax(smollm2.forward(batch)[0, -1], -1)[token])
    assert float(total) == pytest.approx(step, abs=1e-4)
