"""How well a set of transcoders explains the model: attribution graphs traced on held-out prompts and scored.

Per prompt (`graph_quality`, on the unpruned graph traced to the answer's logit):
- `replacement` and `completeness`: circuit-tracer's graph scores (`circuits.prune`);
- `error_share`: the error nodes' share of the influence that the graph's inner nodes (features and errors) have on
  the target, `sum_errors I / (sum_errors I + sum_features I)`: 0 when every inner node is a feature;
- `through_features`: the share of the input tokens' influence that reaches the target through at least one feature
  node, `1 - direct / total` (direct: the embeddings' own edges into the logit, `sum_s w B[logit, s]`);
- `top_inputs`: the three input tokens with the most influence, and `subject_share`, the subject's tokens' share of
  all input tokens' influence, where the prompt names its subject;
- the causal check (`circuits.check.causal_check`): the graph's top features ablated, measured against predicted.

The held-out prompt set (`data/graph_eval.jsonl`) was written for this benchmark and filtered only by whether the
model answers it (greedy top-1); nothing was trained or tuned on it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from modelrecon.circuits.graph import Graph
from modelrecon.circuits.prune import (
    completeness_score,
    logit_weights,
    node_influence,
    normalised_weights,
    replacement_score,
)
from modelrecon.errors import BadInputError
from modelrecon.files import read_text
from modelrecon.models.model import single_token

PROMPT_KINDS = ("factual", "multi-hop", "ioi", "induction", "arithmetic", "opposites")


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    answer: str  # one token, with its leading space
    kind: str = "other"
    subject: str | None = None  # a substring of the prompt whose tokens decide the answer

    @classmethod
    def from_dict(cls, data: dict, where: str) -> EvalPrompt:
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not isinstance(
                data.get("answer"), str):  # fmt: skip
            raise BadInputError(f'{where}: each line needs "prompt" and "answer" strings')
        subject = data.get("subject")
        if subject is not None and subject not in data["prompt"]:
            raise BadInputError(f"{where}: the subject {subject!r} is not in the prompt {data['prompt']!r}")
        return cls(data["prompt"], data["answer"], str(data.get("kind", "other")), subject)


def read_prompts(path: str | Path | None = None) -> list[EvalPrompt]:
    """The prompts of a JSONL file (`{"prompt", "answer", "kind"?, "subject"?}` per line), or the shipped set."""
    if path is None:
        text = resources.files("modelrecon.data").joinpath("graph_eval.jsonl").read_text()
        where = "graph_eval.jsonl"
    else:
        text = read_text(path, "prompt file")
        where = str(path)
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{where} line {number} is not JSON ({exc.msg}); write one object per line") from exc
        prompts.append(EvalPrompt.from_dict(data, f"{where} line {number}"))
    if not prompts:
        raise BadInputError(f'{where} has no prompts; write one {{"prompt": ..., "answer": ...}} per line')
    return prompts


def subject_positions(tokens: list[str], prompt: str, subject: str) -> list[int]:
    """The positions of the tokens that overlap the subject's first occurrence in the prompt (token texts laid end
    to end must spell the prompt)."""
    if "".join(tokens) != prompt:
        raise BadInputError("the tokens do not spell the prompt (a tokenizer that adds text); give no subject")
    start = prompt.index(subject)
    end, out, at = start + len(subject), [], 0
    for position, token in enumerate(tokens):
        if at < end and at + len(token) > start and token.strip():
            out.append(position)
        at += len(token)
    return out


@dataclass
class GraphQuality:
    replacement: float
    completeness: float
    error_share: float
    through_features: float
    top_inputs: list[tuple[str, float]]  # (token, its share of the input tokens' influence), the three largest
    subject_share: float | None = None
    subject_top: bool | None = None  # the most influential input token is one of the subject's

    def to_dict(self) -> dict:
        return {"replacement": self.replacement, "completeness": self.completeness, "error_share": self.error_share,
                "through_features": self.through_features,
                "top_inputs": [{"token": t, "share": s} for t, s in self.top_inputs],
                "subject_share": self.subject_share, "subject_top": self.subject_top}  # fmt: skip


def graph_quality(graph: Graph, subject: list[int] | None = None) -> GraphQuality:
    """The scores of one graph (module docstring); `subject`: the positions of the subject's tokens."""
    influence = node_influence(graph)
    kinds = [node.kind for node in graph.nodes]
    kind_of = {k: torch.tensor([x == k for x in kinds], dtype=torch.bool) for k in ("embedding", "feature", "error")}
    errors, features = float(influence[kind_of["error"]].sum()), float(influence[kind_of["feature"]].sum())
    embeddings = influence[kind_of["embedding"]]
    total_input = float(embeddings.sum())
    # the embeddings' direct influence: one step of w B from the logits, nothing in between
    w = logit_weights(graph)
    sources, targets = graph.sources.to(torch.int64), graph.targets.to(torch.int64)
    b = normalised_weights(graph.n_nodes, targets, graph.weights)
    direct = torch.zeros(graph.n_nodes, dtype=torch.float64).index_add_(0, sources, w[targets] * b)
    direct_input = float(direct[kind_of["embedding"]].sum())
    positions = [graph.nodes[i].position for i in kind_of["embedding"].nonzero().flatten().tolist()]
    shares = (embeddings / total_input).tolist() if total_input > 0 else [0.0] * len(positions)
    ranked = sorted(zip(positions, shares, strict=True), key=lambda p: -p[1])
    nan = float("nan")
    out = GraphQuality(
        replacement=replacement_score(graph),
        completeness=completeness_score(graph),
        error_share=errors / (errors + features) if errors + features > 0 else nan,
        through_features=1 - direct_input / total_input if total_input > 0 else nan,
        top_inputs=[(graph.tokens[p], s) for p, s in ranked[:3]],
    )
    if subject:
        out.subject_share = sum(s for p, s in ranked if p in subject)
        out.subject_top = bool(ranked) and ranked[0][0] in subject
    return out


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


@dataclass
class EvalReport:
    model: str
    transcoders: str
    rows: list[dict] = field(default_factory=list)  # per prompt: the prompt, its quality, the causal check

    SCORES = ("replacement", "completeness", "error_share", "through_features", "subject_share")

    def averages(self, rows: list[dict] | None = None) -> dict:
        rows = self.rows if rows is None else rows
        out = {name: _mean(r[name] for r in rows) for name in self.SCORES}
        out["subject_top"] = _mean(float(r["subject_top"]) for r in rows if r["subject_top"] is not None)
        out["causal_agrees"] = _mean(float(r["causal"]["agrees"]) for r in rows)
        # a median: the share is a ratio, and one check with a near-zero measured change would swamp a mean
        accounted = [r["causal"]["accounted"] for r in rows if math.isfinite(r["causal"]["accounted"])]
        out["causal_accounted"] = statistics.median(accounted) if accounted else math.nan
        out["prompts"] = len(rows)
        return out

    def by_kind(self) -> dict:
        kinds = dict.fromkeys(r["kind"] for r in self.rows)
        return {k: self.averages([r for r in self.rows if r["kind"] == k]) for k in kinds}

    def to_dict(self) -> dict:
        return {"model": self.model, "transcoders": self.transcoders, "average": self.averages(),
                "by_kind": self.by_kind(), "prompts": self.rows}  # fmt: skip


def check_answers(model, prompts: list[EvalPrompt]) -> list[int]:
    """Each prompt's answer as one token id: a bad answer fails before the long work."""
    return [single_token(model, p.answer) for p in prompts]


def evaluate_prompt(model, rm, prompt: EvalPrompt, max_feature_nodes: int = 1000, check_features: int = 10) -> dict:
    """One prompt's row of the report: traced to its answer, scored, and checked by intervention (the clean run of
    the replacement model computed once, for both)."""
    from modelrecon.circuits.attribute import attribute, prompt_ids
    from modelrecon.circuits.check import causal_check

    answer = single_token(model, prompt.answer)
    clean = rm.clean(prompt_ids(model, prompt.prompt))
    graph = attribute(model, prompt.prompt, rm, target=prompt.answer, max_feature_nodes=max_feature_nodes,
                      progress=False, clean=clean)  # fmt: skip
    subject = subject_positions(graph.tokens, prompt.prompt, prompt.subject) if prompt.subject else None
    quality = graph_quality(graph, subject)
    check = causal_check(rm, clean, graph, n_features=check_features)
    return {"prompt": prompt.prompt, "answer": prompt.answer, "kind": prompt.kind, "subject": prompt.subject,
            "correct": int(clean.logits.argmax()) == answer, **quality.to_dict(), "causal": check.to_dict(),
            "nodes": graph.n_nodes, "edge_check_error": graph.metadata["edge_check_error"]}  # fmt: skip


def _progress_status(row: dict) -> str:
    return f"replacement {row['replacement']:.2f} completeness {row['completeness']:.2f}"


def evaluate_graphs(model, rm, prompts: list[EvalPrompt], transcoders: str = "", max_feature_nodes: int = 1000,
                    check_features: int = 10, progress: bool = True) -> EvalReport:  # fmt: skip
    """Trace each prompt to its answer (`attribute` with `target=answer`), score the graph and run its causal
    check (`evaluate_prompt`). A prompt the model does not answer (greedy) is still traced; its row says
    `correct: false`."""
    from modelrecon.progress import token_progress

    check_answers(model, prompts)
    report = EvalReport(model.name, transcoders)
    bar = token_progress(len(prompts), enabled=progress, label="graph-eval", unit="prompts", rate_unit="prompt")
    with bar as advance:
        for p in prompts:
            report.rows.append(evaluate_prompt(model, rm, p, max_feature_nodes, check_features))
            advance(1, _progress_status(report.rows[-1]))
    return report


def evaluate_batch(source, prompts: list[EvalPrompt], max_feature_nodes: int = 1000, check_features: int = 10,
                   progress: bool = True, ray: str | None = None, workers: int | None = None,
                   ) -> EvalReport:  # fmt: skip
    """`evaluate_graphs` on the model and transcoders of `source` (a `circuits.batch.TraceSource`), in this process
    or, with `ray` ('local', 'auto' or an address), on a pool of Ray actors that each load them once and evaluate one
    prompt at a time; the report is assembled here, in the prompts' order, with the same figures."""
    from dataclasses import replace

    source = replace(source, level="features")
    if ray is None:
        model, rm, _ = source.load()
        return evaluate_graphs(model, rm, prompts, source.transcoders_label, max_feature_nodes, check_features,
                               progress)  # fmt: skip
    from modelrecon.progress import token_progress
    from modelrecon.scale.graphs import evaluate_on_ray

    options = {"max_feature_nodes": max_feature_nodes, "check_features": check_features}
    bar = token_progress(len(prompts), enabled=progress, label="graph-eval", unit="prompts", rate_unit="prompt")
    with bar as advance:
        name, rows = evaluate_on_ray(source, prompts, options, lambda row: advance(1, _progress_status(row)),
                                     address=ray, workers=workers)  # fmt: skip
    return EvalReport(name, source.transcoders_label, rows)
