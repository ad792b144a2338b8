"""Evaluating sparse dictionaries on a model: reconstruction quality, sparsity, and the language-model loss with the
dictionary spliced into the forward pass (`modelrecon eval-dict`). Definitions are in docs/dictionaries.md.

Positions: every real (non-padding) token of a window, except its first when `skip_first` (the default: the first
token, often a BOS, is an attention sink with outsized activations, and training leaves it out too). The dictionary
reads and writes those positions only; the reconstruction figures average over them; the loss figures average the
next-token predictions made at them (the last position of a window has no next token).

Per row (a one-layer dictionary, or one output layer of a CLT), over the evaluated positions t:

- `fvu` = sum_t ||y_t - ŷ_t||² / sum_t ||y_t - ȳ||², ȳ the mean of y over the evaluated positions; y the output
  site's clean value, ŷ the dictionary's prediction from the clean input(s).
- `l0`: mean number of non-zero latents per position; `dead`: fraction of latents that are zero on every position;
  `dense`: fraction of latents non-zero on more than `dense_threshold` (10%) of positions. A CLT's row for layer m
  counts the latents of its encoder at layer m (which write to layer m and every later one).
- `cosine`: mean over positions of cos(y_t, ŷ_t).
- `ce_clean`, `ce_spliced`, `ce_ablated`: mean next-token cross-entropy (nats) of the clean model, with the output
  site replaced by the dictionary's prediction, and with it ablated (zero, or the mean of its clean value over the
  batch's evaluated positions); `ce_recovered` = (ce_ablated - ce_spliced) / (ce_ablated - ce_clean);
  `delta_loss` = ce_spliced - ce_clean; `kl` = mean over predictions of KL(clean || spliced) in nats.

The splice: in one forward pass the dictionary reads its input site(s) as that pass computes them and replaces its
output site by its prediction. Each row splices one dictionary layer alone; the `all` row splices every dictionary
layer at once (an input downstream of an earlier splice then reads the spliced stream); it is left out when there
is only one layer, or when two dictionaries write the same site (they are then alternatives, not parts of one
replacement).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from modelrecon.dictionaries.model import Dictionary
from modelrecon.errors import BadInputError
from modelrecon.files import json_safe
from modelrecon.models.model import Batch, Model
from modelrecon.models.sites import parse_site

ABLATIONS = ("zero", "mean")
SPLICES = ("both", "each", "all", "none")
FIGURES = (
    "fvu", "l0", "dead", "dense", "cosine",
    "ce_clean", "ce_spliced", "ce_ablated", "ce_recovered", "delta_loss", "kl",
)  # fmt: skip


@dataclass
class EvalRow:
    """One row of the report: dictionary `dictionary`'s layer `layer` (both None for the `all` row)."""

    dictionary: int | None
    layer: int | None
    kind: str
    input_site: str
    output_site: str
    fvu: float = math.nan
    l0: float = math.nan
    dead: float = math.nan
    dense: float = math.nan
    cosine: float = math.nan
    ce_clean: float = math.nan
    ce_spliced: float = math.nan
    ce_ablated: float = math.nan
    ce_recovered: float = math.nan
    delta_loss: float = math.nan
    kl: float = math.nan

    @property
    def label(self) -> str:
        if self.dictionary is None:
            return "all"
        return f"{self.dictionary}:{self.layer} {self.output_site}"


@dataclass
class EvalReport:
    model: str
    tokens: int  # evaluated positions
    predictions: int  # next-token predictions the loss figures average over
    windows: int
    context_length: int
    ablation: str
    skip_first: bool
    dense_threshold: float
    dictionaries: list[dict] = field(default_factory=list)  # kind, activation, width, sites, provenance
    rows: list[EvalRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "rows": [{"label": r.label, **asdict(r)} for r in self.rows]}

    def to_json(self) -> str:
        import json

        return json.dumps(json_safe(self.to_dict()), indent=1)

    def _cells(self, row: EvalRow) -> list[str]:
        def num(value: float, spec: str) -> str:
            return "" if value is None or not math.isfinite(value) else format(value, spec)

        return [
            row.label,
            num(row.fvu, ".4f"), num(row.l0, ".1f"), num(row.dead, ".3f"), num(row.dense, ".3f"),
            num(row.cosine, ".4f"), num(row.ce_clean, ".4f"), num(row.ce_spliced, ".4f"), num(row.ce_ablated, ".4f"),
            num(row.ce_recovered, ".4f"), num(row.delta_loss, ".4f"), num(row.kl, ".4f"),
        ]  # fmt: skip

    HEADERS = ("row", "FVU", "L0", "dead", "dense", "cos", "CE clean", "CE spliced", "CE ablated", "CE recovered",
               "ΔLM loss", "KL")  # fmt: skip

    def table(self):
        """A rich Table of the rows."""
        from rich.table import Table

        title = (
            f"{self.model}: {self.tokens} tokens in {self.windows} windows of {self.context_length}, "
            f"{self.ablation} ablation"
        )
        table = Table(*self.HEADERS, title=title)
        table.columns[0].no_wrap = True
        for row in self.rows:
            table.add_row(*self._cells(row))
        return table

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADERS) + " |", "|" + "---|" * len(self.HEADERS)]
        lines += ["| " + " | ".join(self._cells(row)) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


# --- checks -----------------------------------------------------------------------------------------------------------
def _site_width(model: Model, site: str) -> int:
    shape = model.site_shape(site)
    if parse_site(site).kind == "attn.pattern" or not all(isinstance(d, int) for d in shape[2:]):
        raise BadInputError(f"site '{site}' is not a per-token vector; a dictionary reads a site like mlp.in")
    return math.prod(shape[2:])


def check_dictionaries(model: Model, dictionaries: Sequence[Dictionary]) -> None:
    """Every site exists on the model with the dictionary's width (BadInputError naming the first that does not)."""
    if not dictionaries:
        raise BadInputError("no dictionary given: pass at least one")
    names = set(model.site_names())
    for i, d in enumerate(dictionaries):
        if not isinstance(d, Dictionary):
            raise BadInputError(f"dictionary {i} is a {type(d).__name__}, not a modelrecon Dictionary")
        for sites, width, what in ((d.config.input_sites, d.config.d_in, "d_in"),
                                   (d.config.output_sites, d.config.d_out, "d_out")):  # fmt: skip
            for site in sites:
                if site not in names:
                    raise BadInputError(
                        f"dictionary {i} uses site '{site}', which {model.name} lacks "
                        f"(layers 0..{model.n_layers - 1}); was it trained on another model?"
                    )
                if _site_width(model, site) != width:
                    raise BadInputError(
                        f"dictionary {i} has {what}={width} but {model.name}'s '{site}' has width "
                        f"{_site_width(model, site)}; was it trained on another model?"
                    )


# --- windows of tokens ------------------------------------------------------------------------------------------------
def _windows(model: Model, data, context_length: int) -> Iterator[list[int]]:
    """Token windows of at most `context_length` from texts (cut by corpus.token_stream), token id lists or Batches."""
    if isinstance(data, (str, Batch)):
        data = [data]
    items = iter(data)
    first = next(items, None)
    if first is None:
        return
    rest = _chain(first, items)
    if isinstance(first, str):
        from modelrecon.corpus import token_stream

        yield from token_stream(rest, model.tokenizer, context_length)
        return
    for item in rest:
        rows = [item.tokens(i).tolist() for i in range(item.size)] if isinstance(item, Batch) else [item]
        for ids in rows:
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]
            for start in range(0, len(ids), context_length):
                yield ids[start : start + context_length]


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _limited(windows: Iterable[list[int]], max_tokens: int | None) -> Iterator[list[int]]:
    total = 0
    for window in windows:
        if max_tokens is not None:
            window = window[: max_tokens - total]
            if len(window) < 2:
                return
        total += len(window)
        yield window


def _batched(windows: Iterable[list[int]], size: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for window in windows:
        if len(window) >= 2:  # a single token has no next-token prediction
            batch.append(window)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- accumulation -----------------------------------------------------------------------------------------------------
class _Stats:
    """Running sums for one row's reconstruction figures (float64)."""

    def __init__(self, width: int, d: int) -> None:
        self.n = 0
        self.err2 = 0.0
        self.y2 = 0.0
        self.y = torch.zeros(d, dtype=torch.float64)
        self.cos = 0.0
        self.active = 0.0
        self.fired = torch.zeros(width, dtype=torch.float64)

    def add(self, y: torch.Tensor, pred: torch.Tensor, f: torch.Tensor) -> None:
        y, pred = y.double(), pred.double()
        self.n += y.shape[0]
        self.err2 += float((y - pred).pow(2).sum())
        self.y2 += float(y.pow(2).sum())
        self.y += y.sum(0).cpu()
        self.cos += float(torch.nn.functional.cosine_similarity(y, pred, dim=-1, eps=1e-12).sum())
        on = f != 0
        self.active += float(on.sum())
        self.fired += on.sum(0).double().cpu()

    def into(self, row: EvalRow, dense_threshold: float) -> None:
        if not self.n:
            return
        variance = self.y2 - float(self.y.pow(2).sum()) / self.n
        row.fvu = self.err2 / variance if variance > 0 else math.nan
        row.cosine = self.cos / self.n
        row.l0 = self.active / self.n
        row.dead = float((self.fired == 0).double().mean())
        row.dense = float((self.fired / self.n > dense_threshold).double().mean())


@dataclass
class _Loss:
    ce: float = 0.0
    kl: float = 0.0


def _losses(logits: torch.Tensor, clean_logp: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> _Loss:
    """Summed cross-entropy of `targets` and KL(clean || this) over the kept predictions."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[keep]
    ce = -logp.gather(-1, targets[:, None]).sum()
    kl = (clean_logp.exp() * (clean_logp - logp)).sum()
    return _Loss(float(ce), float(kl))


# --- the splice -------------------------------------------------------------------------------------------------------
def _flat(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(*value.shape[:2], -1)


def _predict(dictionary: Dictionary, inputs: list[torch.Tensor | None], layer: int) -> torch.Tensor:
    """The dictionary's prediction at output `layer` from inputs `[batch, pos, d]` of layers 0..layer (later layers,
    unknown yet in a forward pass, enter as zeros: no decoder reads them into `layer`)."""
    p = dictionary.W_enc
    n = dictionary.config.n_layers
    if n == 1:
        return dictionary(inputs[0].to(p.device, p.dtype))[0]
    shape = inputs[layer].shape
    x = torch.stack([inputs[i] if i <= layer else inputs[layer].new_zeros(shape) for i in range(n)], -2)
    return dictionary(x.to(p.device, p.dtype))[0][..., layer, :]


def _spliced_logits(
    model: Model,
    batch: Batch,
    evaluated: torch.Tensor,
    dictionaries: Sequence[Dictionary],
    layers: dict[int, list[int]],
    mode: str,
    means: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Logits with the output sites of `layers` ({dictionary: [layer, ...]}) spliced (mode "splice") or ablated
    ("zero" / "mean"). At a site, per dictionary in order: it is read (if an input), then written (if an output)."""
    from modelrecon.hooks.trace import hooked

    actions: dict[str, list[tuple[str, int, int]]] = {}
    for i, chosen in layers.items():
        config = dictionaries[i].config
        if mode == "splice":
            for layer in range(max(chosen) + 1):
                actions.setdefault(config.input_sites[layer], []).append(("read", i, layer))
        for layer in chosen:
            actions.setdefault(config.output_sites[layer], []).append(("write", i, layer))
    stored: dict[int, list[torch.Tensor | None]] = {i: [None] * dictionaries[i].config.n_layers for i in layers}
    where = evaluated[..., None]

    def edit_for(site: str):
        def edit(value: torch.Tensor, ctx) -> torch.Tensor | None:
            current = _flat(value)
            changed = False
            for action, i, layer in actions[site]:
                if action == "read":
                    stored[i][layer] = current
                    continue
                if mode == "splice":
                    new = _predict(dictionaries[i], stored[i], layer)
                elif mode == "mean":
                    new = means[site].expand_as(current)
                else:
                    new = torch.zeros_like(current)
                current = torch.where(where, new.to(current.device, current.dtype), current)
                changed = True
            return current.reshape(value.shape) if changed else None

        return edit

    with hooked(model, batch, edit={site: edit_for(site) for site in actions}):
        return model.forward(batch)


def _clean_pass(model: Model, batch: Batch, sites: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from modelrecon.hooks.trace import hooked

    values: dict[str, torch.Tensor] = {}

    def edit_for(site: str):
        def edit(value: torch.Tensor, ctx) -> None:
            values[site] = _flat(value).detach()

        return edit

    with hooked(model, batch, edit={site: edit_for(site) for site in sites}):
        logits = model.forward(batch)
    return logits, values


# --- evaluate ---------------------------------------------------------------------------------------------------------
def evaluate(
    model: Model,
    dictionaries: Dictionary | Sequence[Dictionary],
    data: str | Iterable[str] | Iterable[Sequence[int]] | Batch | Iterable[Batch],
    *,
    batch_size: int = 8,
    context_length: int = 128,
    max_tokens: int | None = None,
    ablation: str = "zero",
    splice: str = "both",
    skip_first: bool = True,
    dense_threshold: float = 0.1,
    progress: bool = False,
) -> EvalReport:
    """Evaluate dictionaries on `model` over `data` (see the module docstring for every figure).

    data: texts (laid end to end and cut into windows of `context_length` tokens by `corpus.token_stream`), token id
    windows (lists or tensors; longer ones are cut into `context_length` pieces), or Batches.
    max_tokens: stop after this many tokens (the last window is cut short). ablation: "zero" or "mean".
    splice: "each" (one dictionary layer at a time), "all" (every layer at once), "both" or "none" (skip the loss
    figures: one forward pass per batch).
    """
    if isinstance(dictionaries, Dictionary):
        dictionaries = [dictionaries]
    dictionaries = list(dictionaries)
    if ablation not in ABLATIONS:
        raise BadInputError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")
    if splice not in SPLICES:
        raise BadInputError(f"unknown splice {splice!r}; use one of {', '.join(SPLICES)}")
    if context_length < 2 or batch_size < 1 or (max_tokens is not None and max_tokens < 2):
        raise BadInputError("context_length and max_tokens need at least 2 tokens and batch_size at least 1")
    check_dictionaries(model, dictionaries)

    rows: list[EvalRow] = []
    stats: list[_Stats] = []
    for i, d in enumerate(dictionaries):
        c = d.config
        for layer in range(c.n_layers):
            rows.append(EvalRow(i, layer, c.kind, c.input_sites[layer], c.output_sites[layer]))
            stats.append(_Stats(c.width, c.d_out))
    each = [(i, layer) for i, d in enumerate(dictionaries) for layer in range(d.config.n_layers)]
    every = {i: list(range(d.config.n_layers)) for i, d in enumerate(dictionaries)}
    outputs = [s for d in dictionaries for s in d.config.output_sites]
    all_row = len(each) > 1 and splice in ("both", "all") and len(set(outputs)) == len(outputs)
    if all_row:  # (dictionaries that write the same site are alternatives: no row splices them together)
        rows.append(EvalRow(None, None, "all", "", "all"))
    splices: list[tuple[int, dict[int, list[int]]]] = []  # (row index, layers)
    if splice in ("both", "each") or (splice == "all" and not all_row):
        splices += [(r, {i: [layer]}) for r, (i, layer) in enumerate(each)]
    if all_row:
        splices.append((len(rows) - 1, every))
    spliced_losses = {r: _Loss() for r, _ in splices}
    ablated_losses = {r: _Loss() for r, _ in splices}
    clean_ce = 0.0
    n_tokens = n_predictions = n_windows = 0
    sites = {s for d in dictionaries for s in (*d.config.input_sites, *d.config.output_sites)}

    from modelrecon.progress import token_progress

    windows = _limited(_windows(model, data, context_length), max_tokens)
    with torch.no_grad(), token_progress(max_tokens, enabled=progress, label="evaluating") as advance:
        for ids in _batched(windows, batch_size):
            batch = model.batch_from_ids(ids, "right")
            real = batch.attention_mask.bool()
            evaluated = real.clone()
            if skip_first:
                evaluated &= batch.position_ids != 0
            keep = evaluated[:, :-1] & real[:, 1:]  # predictions made at evaluated positions of a real next token
            targets = batch.input_ids[:, 1:][keep]

            clean_logits, values = _clean_pass(model, batch, sites)
            clean_logp = torch.log_softmax(clean_logits[:, :-1].float(), dim=-1)[keep]
            clean_ce += float(-clean_logp.gather(-1, targets[:, None]).sum())
            row = 0
            for d in dictionaries:
                c = d.config
                x = torch.stack([values[s][evaluated] for s in c.input_sites], -2)
                y = torch.stack([values[s][evaluated] for s in c.output_sites], -2)
                p = d.W_enc
                pred, f = d(x.to(p.device, p.dtype) if c.n_layers > 1 else x[:, 0].to(p.device, p.dtype))
                if c.n_layers == 1:
                    pred, f = pred[:, None], f[:, None]
                for layer in range(c.n_layers):
                    stats[row].add(y[:, layer].to(pred.device), pred[:, layer], f[:, layer])
                    row += 1

            means = {}
            if ablation == "mean":
                count = evaluated.sum().clamp_min(1)
                means = {s: (v * evaluated[..., None]).sum((0, 1)) / count for s, v in values.items()}
            for r, layers in splices:
                logits = _spliced_logits(model, batch, evaluated, dictionaries, layers, "splice", means)
                _add(spliced_losses[r], _losses(logits, clean_logp, targets, keep))
                logits = _spliced_logits(model, batch, evaluated, dictionaries, layers, ablation, means)
                _add(ablated_losses[r], _losses(logits, clean_logp, targets, keep))

            n_tokens += int(evaluated.sum())
            n_predictions += int(keep.sum())
            n_windows += batch.size
            advance(sum(batch.lengths))
    if not n_tokens:
        raise BadInputError(
            f"no tokens to evaluate: the text gives no complete window of {context_length} tokens; "
            "give more text or a shorter context length"
        )

    for row, stat in zip(rows, stats, strict=False):
        stat.into(row, dense_threshold)
    for r, _ in splices:
        row = rows[r]
        row.ce_clean = clean_ce / max(n_predictions, 1)
        row.ce_spliced = spliced_losses[r].ce / max(n_predictions, 1)
        row.ce_ablated = ablated_losses[r].ce / max(n_predictions, 1)
        row.kl = spliced_losses[r].kl / max(n_predictions, 1)
        row.delta_loss = row.ce_spliced - row.ce_clean
        gap = row.ce_ablated - row.ce_clean
        row.ce_recovered = (row.ce_ablated - row.ce_spliced) / gap if gap != 0 else math.nan
    return EvalReport(
        model=model.name,
        tokens=n_tokens,
        predictions=n_predictions,
        windows=n_windows,
        context_length=context_length,
        ablation=ablation,
        skip_first=skip_first,
        dense_threshold=dense_threshold,
        dictionaries=[_describe(d) for d in dictionaries],
        rows=rows,
    )


def _add(total: _Loss, part: _Loss) -> None:
    total.ce += part.ce
    total.kl += part.kl


def _describe(d: Dictionary) -> dict:
    c = d.config
    return {
        "kind": c.kind,
        "activation": c.activation,
        "k": c.k,
        "width": c.width,
        "input_sites": list(c.input_sites),
        "output_sites": list(c.output_sites),
        "provenance": dict(c.provenance),
    }
