"""Logit lens: the model's own final norm and unembedding applied to the residual stream after every layer.

Row 0 is the residual stream entering layer 0 (the embeddings); row i + 1 is `layers.{i}.resid_post`. The last row
is the model's own logits (tested on every family). The lens reads what each layer "would predict"; it is a
correlational view, and the counterfactual sweeps check it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from modelrecon.display import RichDisplay
from modelrecon.hooks.run import run
from modelrecon.models.model import Model, single_token


@dataclass
class LensResult(RichDisplay):
    prompt: str
    tokens: list[str]
    rows: list[str]  # "embed", "layer 0", ..., "layer N-1"
    top_ids: torch.Tensor  # [rows, pos, k]
    top_probs: torch.Tensor  # [rows, pos, k]
    top_tokens: list[list[list[str]]]
    target: str | None = None
    target_probs: torch.Tensor | None = None  # [rows, pos]
    target_ranks: torch.Tensor | None = None  # [rows, pos], 0 = top

    def to_dict(self) -> dict:
        out = {
            "prompt": self.prompt,
            "tokens": self.tokens,
            "rows": self.rows,
            "top": [
                [
                    [{"token": t, "id": int(i), "prob": float(p)} for t, i, p in zip(ts, ids, ps, strict=True)]
                    for ts, ids, ps in zip(row_t, row_i, row_p, strict=True)
                ]
                for row_t, row_i, row_p in zip(self.top_tokens, self.top_ids, self.top_probs, strict=True)
            ],
        }
        if self.target is not None:
            out |= {
                "target": self.target,
                "target_prob": self.target_probs.tolist(),
                "target_rank": self.target_ranks.tolist(),
            }
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def residual_rows(model: Model, prompt: str) -> tuple[torch.Tensor, list[int]]:
    """`[rows, pos, d_model]`: the residual stream entering layer 0, then after every layer; and the prompt's ids."""
    sites = ["layers.0.resid_pre", *(f"layers.{i}.resid_post" for i in range(model.n_layers))]
    result = run(model, prompt, record=sites)
    return torch.stack([result.acts[s][0] for s in sites]), result.tokens[0].tolist()


def logit_lens(model: Model, prompt: str, k: int = 5, target: str | None = None) -> LensResult:
    """Top-k next tokens at every (layer, position), and the probability and rank of `target` (e.g. " Paris")."""
    resid, ids = residual_rows(model, prompt)
    with torch.no_grad():
        probs = torch.softmax(model.unembed(resid).float(), dim=-1)  # [rows, pos, vocab]
    top = torch.topk(probs, min(k, model.vocab_size), dim=-1)
    decode = {int(i): model.tokenizer.decode([int(i)]) for i in top.indices.unique()}
    result = LensResult(
        prompt=prompt,
        tokens=model.str_tokens(ids),
        rows=["embed", *(f"layer {i}" for i in range(model.n_layers))],
        top_ids=top.indices,
        top_probs=top.values,
        top_tokens=[[[decode[int(i)] for i in cell] for cell in row] for row in top.indices],
    )
    if target is not None:
        tid = single_token(model, target)
        result.target = target
        result.target_probs = probs[..., tid]
        result.target_ranks = (probs > probs[..., tid : tid + 1]).sum(-1)
    return result
