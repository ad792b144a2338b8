"""Interventions as data: small serialisable dataclasses, applied through the one hook mechanism (`hooks.run`).

Each intervention names a site, which positions of each prompt it touches (all, indices, "last", a slice, or the
tokens whose text matches), optionally which heads (for `attn.heads`) and which units (last axis), and what it writes
there. A list of interventions is the unit of an experiment; `to_json` / `from_json` round-trip it exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from modelrecon.errors import BadInputError
from modelrecon.hooks.run import RunResult, run
from modelrecon.hooks.trace import EditFn, HookContext
from modelrecon.models.model import Batch, Model
from modelrecon.models.sites import parse_site

# None: every position; int or list of ints (negative counts from the end); "last"; {"start": a, "stop": b};
# {"match": " Paris"}: the positions whose decoded token equals the text. On `attn.pattern` positions are query
# positions and `units` key positions. In generation the open-ended specs (None, {"start": a}) also cover the
# generated tokens; the others select prompt tokens only.
PositionSpec = None | int | list[int] | str | dict


@dataclass(frozen=True)
class Intervention:
    site: str
    positions: PositionSpec = None
    heads: list[int] | None = None  # only for attn.heads
    units: list[int] | None = None  # indices on the last axis

    op: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[Intervention]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Intervention._registry[cls.op] = cls

    def replace(self, selected: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """New values for the selected part of the site (`source`: the same part of a source run, for patches)."""
        raise NotImplementedError

    def source_run(self) -> str | None:
        """The name of the run whose values this intervention writes (None: it needs none)."""
        return None

    def to_dict(self) -> dict:
        return {"op": self.op, **asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> Intervention:
        data = dict(data)
        cls = Intervention._registry.get(data.pop("op", None))
        if cls is None:
            known = ", ".join(sorted(Intervention._registry))
            raise BadInputError(f"unknown intervention op in {data}; use one of: {known}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise BadInputError(f"intervention '{cls.op}' has no field(s) {sorted(unknown)}; it takes {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class Zero(Intervention):
    op: ClassVar[str] = "zero"

    def replace(self, selected, source):
        return torch.zeros_like(selected)


@dataclass(frozen=True)
class SetValue(Intervention):
    """Set the selected units to a value (a number, or one value per selected unit)."""

    value: float | list[float] = 0.0
    op: ClassVar[str] = "set"

    def replace(self, selected, source):
        return torch.as_tensor(self.value, dtype=selected.dtype, device=selected.device).expand_as(selected).clone()


@dataclass(frozen=True)
class MeanAblate(Intervention):
    """Replace with a mean activation (one value per selected unit), e.g. from a cube's average."""

    mean: list[float] | None = None
    op: ClassVar[str] = "mean"

    @classmethod
    def from_cube(cls, cube, site: str, **fields: Any) -> MeanAblate:
        """Mean ablation with the site's mean over every token a cube captured (`cube`: a `modelrecon.Cube`)."""
        info = parse_site(site)
        if info.kind in HEAD_KINDS:
            raise BadInputError(f"'{site}': a cube stores heads flattened; mean-ablate a whole-vector site instead")
        if info.kind not in cube.site_kinds or info.layer not in cube.layers(info.kind):
            raise BadInputError(f"the cube has no '{site}'; capture it, or give mean=[...] yourself")
        values = cube.get(info.kind, layers=[info.layer], as_torch=True)[:, 0].double()
        units = fields.get("units")
        mean = values.mean(0)
        return cls(site, mean=(mean if units is None else mean[units]).tolist(), **fields)

    def replace(self, selected, source):
        if self.mean is None:
            raise BadInputError(f"mean ablation of '{self.site}' needs mean=[...] values for its units")
        return torch.as_tensor(self.mean, dtype=selected.dtype, device=selected.device).expand_as(selected).clone()


@dataclass(frozen=True)
class Scale(Intervention):
    factor: float = 1.0
    op: ClassVar[str] = "scale"

    def replace(self, selected, source):
        return selected * self.factor


@dataclass(frozen=True)
class AddDirection(Intervention):
    """Steering: add `coeff * direction` (a vector over the site's last axis, or over the selected units)."""

    direction: list[float] | None = None
    coeff: float = 1.0
    op: ClassVar[str] = "add"

    def replace(self, selected, source):
        return selected + self.coeff * _vector(self.direction, selected, self)


@dataclass(frozen=True)
class ProjectOut(Intervention):
    """Remove the component along `direction` (normalised here)."""

    direction: list[float] | None = None
    op: ClassVar[str] = "project_out"

    def replace(self, selected, source):
        unit = _vector(self.direction, selected, self)
        unit = unit / unit.norm()
        return selected - (selected @ unit)[..., None] * unit


@dataclass(frozen=True)
class Patch(Intervention):
    """Write the values the same site had in a source run (by default the counterfactual prompt)."""

    source: str = "counterfactual"
    op: ClassVar[str] = "patch"

    def source_run(self) -> str | None:
        return self.source

    def replace(self, selected, source):
        return source.to(selected.dtype)


@dataclass(frozen=True)
class Resample(Intervention):
    """Resample ablation: the values the site had on another prompt, drawn (seeded) from `pool`.

    In an experiment the pool defaults to the other items' clean prompts of the same length.
    """

    pool: list[str] | None = None
    seed: int = 0
    op: ClassVar[str] = "resample"

    def source_run(self) -> str | None:
        return "resample"

    def replace(self, selected, source):
        return source.to(selected.dtype)


def _vector(values, selected: torch.Tensor, iv: Intervention) -> torch.Tensor:
    if values is None:
        raise BadInputError(f"'{iv.op}' at '{iv.site}' needs direction=[...]")
    vector = torch.as_tensor(values, dtype=selected.dtype, device=selected.device)
    if vector.shape != selected.shape[-1:]:
        raise BadInputError(
            f"direction for '{iv.site}' has {vector.shape[0]} values; the selected units number {selected.shape[-1]}"
        )
    return vector


def to_json(interventions: Sequence[Intervention]) -> str:
    return json.dumps([iv.to_dict() for iv in interventions])


def from_json(text: str) -> list[Intervention]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"interventions are not valid JSON ({exc.msg}); give a list of objects") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise BadInputError('interventions JSON must be a list of objects like {"op": "zero", "site": "..."}')
    return [Intervention.from_dict(d) for d in data]


def components_from_json(text: str, where: str = "components") -> dict[str, list[Intervention]]:
    """Named lists of interventions: `{"name": [{"op": ...}, ...], ...}` (what `modelrecon experiment` reads);
    `where` (the file) prefixes any error."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{where}: not valid JSON ({exc.msg}); give an object of named lists") from None
    if not isinstance(data, dict) or not data:
        raise BadInputError(f'{where}: must be a non-empty object like {{"ablate mlp 3": [{{"op": "zero", ...}}]}}')
    try:
        return {name: from_json(json.dumps(ivs)) for name, ivs in data.items()}
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None


# --- applying them ------------------------------------------------------------------------------------------------
def resolve_positions(spec: PositionSpec, token_texts: list[str], n_prompt: int | None = None) -> list[int]:
    """Positions (0-based) that a position spec selects among a prompt's tokens.

    n_prompt: how many of `token_texts` are the prompt (the rest were generated); open-ended specs cover them all.
    """
    n_all = len(token_texts)
    n = n_all if n_prompt is None else n_prompt
    if spec is None:
        return list(range(n_all))
    if spec == "last":
        return [n - 1]
    if isinstance(spec, dict) and "match" in spec:
        found = [i for i, text in enumerate(token_texts[:n]) if text == spec["match"]]
        if not found:
            raise BadInputError(f"no token {spec['match']!r} in the prompt; its tokens are {token_texts[:n]}")
        return found
    if isinstance(spec, dict) and spec and set(spec) <= {"start", "stop"}:
        upto = n if "stop" in spec else n_all
        return list(range(upto))[slice(spec.get("start"), spec.get("stop"))]
    chosen = [spec] if isinstance(spec, int) and not isinstance(spec, bool) else spec
    if not isinstance(chosen, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in chosen):
        raise BadInputError(
            f"bad positions {spec!r}: use null, an int, a list of ints, 'last', "
            '{"start": a, "stop": b} or {"match": "token"}'
        )
    for p in chosen:
        if not -n <= p < n:
            raise BadInputError(f"position {p} is outside a prompt of {n} tokens; use 0..{n - 1} or -1..-{n}")
    return [p % n for p in chosen]


# Per run name (e.g. "counterfactual"), per site, one value per prompt of the batch (`RunResult.acts` of that run).
Sources = dict[str, dict[str, list[torch.Tensor]]]


def edits_for(
    model: Model,
    batch: Batch,
    interventions: Sequence[Intervention] | Sequence[Sequence[Intervention]],
    sources: Sources | None = None,
    n_prompt: list[int] | None = None,
) -> dict[str, EditFn]:
    """Edit functions for `hooks.run` that apply the interventions, in order, per prompt of the batch.

    interventions: one list for every prompt, or one list per prompt (a sweep patches a different cell per row).
    sources: the values that `Patch` and `Resample` write. n_prompt: per prompt, how many tokens are the prompt
    (in generation; see `resolve_positions`).
    """
    per_prompt = _per_prompt(interventions, batch.size)
    # site -> [(prompt, intervention)], in the order given
    by_site: dict[str, list[tuple[int, Intervention]]] = {}
    resolved: dict[str, list[str]] = {}
    for i, ivs in enumerate(per_prompt):
        for iv in ivs:
            if iv.site not in resolved:
                resolved[iv.site] = model.resolve_sites(iv.site)
            for site in resolved[iv.site]:
                _check_axes(iv, site)
                by_site.setdefault(site, []).append((i, iv))
    n_prompt = n_prompt or batch.lengths
    texts: dict[int, list[str]] = {}

    def positions_of(iv: Intervention, i: int) -> list[int]:
        if i not in texts:  # decoding tokens is slow: only for the prompts that need it
            texts[i] = model.str_tokens(batch.tokens(i))
        return resolve_positions(iv.positions, texts[i], n_prompt[i])

    chosen = {(i, id(iv)): positions_of(iv, i) for cells in by_site.values() for i, iv in cells}

    def make_edit(site: str, cells: list[tuple[int, Intervention]]) -> EditFn:
        pattern = parse_site(site).kind == "attn.pattern"

        def edit(value: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            value = value.clone()
            view = value.transpose(1, 2) if pattern else value  # [batch, pos, ...], a view: writes reach value
            for i, iv in cells:
                start, length = batch.starts[i], batch.lengths[i]
                positions = chosen[(i, id(iv))]
                rows = torch.tensor(positions, dtype=torch.long, device=value.device) + start
                block = view[i, rows]
                target = _index(iv, pattern, start, length, value.device)
                source = None
                if iv.source_run() is not None:
                    source = _source_values(iv, site, i, positions, sources, pattern)
                    source = source.to(value.device)[_index(iv, pattern, 0, length, value.device)]
                block[target] = iv.replace(block[target], source)
                view[i, rows] = block
            return value

        return edit

    return {site: make_edit(site, cells) for site, cells in by_site.items()}


def _per_prompt(interventions, n: int) -> list[list[Intervention]]:
    items = list(interventions)
    if items and all(isinstance(x, (list, tuple)) for x in items):
        if len(items) != n:
            raise BadInputError(f"{len(items)} intervention lists for {n} prompts; give one list per prompt")
        lists = [list(x) for x in items]
    else:
        lists = [items] * n
    for iv in (iv for ivs in lists for iv in ivs):
        if not isinstance(iv, Intervention):
            raise BadInputError(f"{iv!r} is not an Intervention")
    return lists


def _source_values(
    iv: Intervention, site: str, i: int, chosen: list[int], sources: Sources | None, pattern: bool
) -> torch.Tensor:
    name = iv.source_run()
    values = (sources or {}).get(name, {}).get(site)
    if values is None:
        raise BadInputError(f"'{iv.op}' at '{site}' needs the '{name}' run's values of that site: pass sources=...")
    prompt_values = values[i].transpose(0, 1) if pattern else values[i]  # [pos, ...]
    if max(chosen) >= len(prompt_values):
        raise BadInputError(
            f"'{iv.op}' at '{site}': position {max(chosen)} is beyond the {name} prompt's {len(prompt_values)} "
            "tokens; give prompts of the same length or choose positions"
        )
    return prompt_values[chosen]


HEAD_KINDS = ("attn.q", "attn.k", "attn.v", "attn.pattern", "attn.heads")


def _check_axes(iv: Intervention, site: str) -> None:
    kind = parse_site(site).kind
    if iv.heads is not None and kind not in HEAD_KINDS:
        raise BadInputError(f"heads= applies to {', '.join(HEAD_KINDS)} sites, not '{site}'")


def _index(iv: Intervention, pattern: bool, key_offset: int, n_keys: int, device) -> tuple:
    """Index into one prompt's selected rows `[pos, ...]` for the intervention's heads and units.

    On patterns (seen as `[q, head, k]`) the units are key positions, shifted by the prompt's padding offset, and
    only the prompt's real keys are touched. Heads and units index as an outer product.
    """
    heads = None if iv.heads is None else torch.tensor(iv.heads, device=device)
    if pattern:
        keys = torch.arange(n_keys) if iv.units is None else torch.tensor(iv.units)
        units = (keys + key_offset).to(device)
    else:
        units = None if iv.units is None else torch.tensor(iv.units, device=device)
    if heads is not None and units is not None:
        return (slice(None), heads[:, None], units[None, :])
    if heads is not None:
        return (slice(None), heads)
    if units is not None:
        return (slice(None), ..., units)
    return (slice(None),)


def sites_by_source(model: Model, interventions: Sequence[Intervention]) -> dict[str, set[str]]:
    """Per source run the interventions read ("counterfactual", "resample", ...), the sites they read there."""
    needed: dict[str, set[str]] = {}
    for iv in interventions:
        if iv.source_run() is not None:
            needed.setdefault(iv.source_run(), set()).update(model.resolve_sites(iv.site))
    return needed


def source_acts(
    model: Model,
    prompts: list[str],
    interventions: Sequence[Intervention],
    sources: dict[str, list[str] | dict[str, list[torch.Tensor]]] | None = None,
) -> Sources:
    """The values each intervention's source run holds at its sites, one per prompt.

    sources: run name -> either its prompts (one per prompt, run here, recording what is needed) or values already
    recorded. `Resample` draws from its own pool.
    """
    given = dict(sources or {})
    out: Sources = {}
    for name, sites in sites_by_source(model, interventions).items():
        if name == "resample":
            out[name] = _resample_values(model, prompts, [iv for iv in interventions if isinstance(iv, Resample)])
            continue
        if name not in given:
            raise BadInputError(f"interventions patch from the '{name}' run: pass sources={{'{name}': prompts}}")
        value = given[name]
        if isinstance(value, dict):
            out[name] = value
            continue
        value = [value] if isinstance(value, str) else list(value)
        if len(value) != len(prompts):
            raise BadInputError(f"sources['{name}'] has {len(value)} prompts for {len(prompts)} prompts; give one each")
        out[name] = run(model, value, record=sorted(sites)).acts
    return out


def _resample_values(model: Model, prompts: list[str], resamples: list[Resample]) -> dict[str, list[torch.Tensor]]:
    values: dict[str, list[torch.Tensor]] = {}
    for iv in resamples:
        if not iv.pool:
            raise BadInputError(f"resample ablation of '{iv.site}' needs pool=[prompts] to draw values from")
        sites = model.resolve_sites(iv.site)
        pool_acts = run(model, list(iv.pool), record=sites).acts
        generator = torch.Generator().manual_seed(iv.seed)
        draws = torch.randint(len(iv.pool), (len(prompts),), generator=generator).tolist()
        for site in sites:
            values[site] = [pool_acts[site][j] for j in draws]
    return values


def run_with(
    model: Model,
    prompts: str | list[str],
    interventions: Sequence[Intervention],
    sources: dict[str, list[str] | Sources] | None = None,
    **run_kwargs: Any,
) -> RunResult:
    """`hooks.run` with the interventions applied.

    sources: for `Patch`, the source run's prompts (one per prompt; run here) or its recorded values
    (`{"counterfactual": run(...).acts}`).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch = model.tokenize(prompts, run_kwargs.pop("padding_side", "right"))
    values = source_acts(model, prompts, interventions, sources)
    return run(model, batch, edit=edits_for(model, batch, interventions, values), **run_kwargs)


@dataclass
class Generation:
    """Greedy continuation of one prompt: the generated token ids and text (prompt excluded)."""

    prompt: str
    tokens: list[int]
    text: str


def generate_with(
    model: Model,
    prompt: str,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 20,
    sources: dict[str, list[str] | Sources] | None = None,
) -> Generation:
    """Greedy generation with interventions applied at every step.

    Each step reruns the whole sequence (no key/value cache), so an intervention sees exactly the sequence a cached
    run would: closed position specs stay on the prompt, open-ended ones (None, {"start": a}) reach every generated
    token too. Stops at the end-of-sequence token.
    """
    if max_new_tokens < 1:
        raise BadInputError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    ids = model.encode(prompt)
    model.check_length(len(ids) + max_new_tokens, f"the prompt plus {max_new_tokens} new tokens",
                       "shorten the prompt or ask for fewer new tokens")  # fmt: skip
    values = source_acts(model, [prompt], interventions, sources)
    new: list[int] = []
    for _ in range(max_new_tokens):
        batch = model.batch_from_ids([ids + new])
        edits = edits_for(model, batch, interventions, values, n_prompt=[len(ids)])
        logits = run(model, batch, edit=edits, last_only=True).logits[0][-1]
        token = int(logits.argmax())
        if token == model.tokenizer.eos_token_id:
            break
        new.append(token)
    return Generation(prompt, new, model.tokenizer.decode(new))
