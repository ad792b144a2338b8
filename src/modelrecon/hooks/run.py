"""`run(model, prompts, ...)`: a forward pass (and optionally a backward pass) with hooks, results per prompt."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from modelrecon.errors import BadInputError
from modelrecon.hooks.trace import EditFn, hooked
from modelrecon.models.model import Batch, Model


@dataclass
class RunResult:
    """Per-prompt results of `run`; padding is stripped everywhere.

    tokens[i]: token ids `[pos]`; logits[i]: `[pos, vocab]`; acts[site][i] and grads[site][i]: see `Trace`.
    """

    model: Model
    prompts: list[str] | None
    tokens: list[torch.Tensor]
    logits: list[torch.Tensor]
    acts: dict[str, list[torch.Tensor]]
    grads: dict[str, list[torch.Tensor]]

    def str_tokens(self, i: int = 0) -> list[str]:
        return self.model.str_tokens(self.tokens[i])

    def top_next_tokens(self, k: int = 5, i: int = 0) -> list[tuple[str, float]]:
        """The k most likely next tokens after prompt i, with probabilities."""
        probs = torch.softmax(self.logits[i][-1].float(), dim=-1)
        top = torch.topk(probs, k)
        return [(self.model.tokenizer.decode([int(t)]), float(p)) for p, t in zip(top.values, top.indices, strict=True)]


def run(
    model: Model,
    prompts: str | list[str] | Batch,
    *,
    record: Sequence[str] = (),
    edit: dict[str, EditFn] | None = None,
    grad: Sequence[str] = (),
    grad_of: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    positions: int | Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    padding_side: str = "right",
    last_only: bool = False,
) -> RunResult:
    """Run prompts through the model with sites recorded, edited, and (with `grad_of`) differentiated.

    grad_of: takes the per-prompt logits `[pos, vocab]` and returns the scalar whose gradients at the `grad` sites
    are recorded. Example: `grad_of=lambda logits: logits[0][-1, paris_id]`.
    last_only: unembed only each prompt's last token (`logits[i]` is then `[1, vocab]`); pass prompts as a
    left-padded Batch (or `padding_side="left"`) when their lengths differ.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    batch = prompts if isinstance(prompts, Batch) else model.tokenize(prompts, padding_side)
    if grad and grad_of is None:
        raise BadInputError("gradients asked for but no grad_of given: pass grad_of=lambda logits: <scalar>")
    with (
        torch.set_grad_enabled(bool(grad)),
        hooked(
            model, batch, record=record, edit=edit, grad=grad, positions=positions, dtype=dtype, device=device
        ) as trace,
    ):
        logits = model.forward(batch, last_only=last_only)
        per_prompt = [logits[i, -1:] if last_only else logits[i, batch.real(i)] for i in range(batch.size)]
        if grad:
            grad_of(per_prompt).backward()
            per_prompt = [x.detach() for x in per_prompt]
    return RunResult(
        model=model,
        prompts=None if isinstance(prompts, Batch) else list(prompts),
        tokens=[batch.tokens(i).cpu() for i in range(batch.size)],
        logits=per_prompt,
        acts=trace.acts,
        grads=trace.grads,
    )
