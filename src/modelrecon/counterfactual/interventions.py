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
# {"match": " Paris"}: the positions whose decoded token equals the text.
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

    def replace(self, selected, source):
        if source is None:
            raise BadInputError(f"patch of '{self.site}' needs the '{self.source}' run: pass sources=...")
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


# --- applying them ------------------------------------------------------------------------------------------------
def resolve_positions(spec: PositionSpec, token_texts: list[str]) -> list[int]:
    """Positions (0-based, in the prompt's own tokens) that a position spec selects."""
    n = len(token_texts)
    if spec is None:
        return list(range(n))
    if spec == "last":
        return [n - 1]
    if isinstance(spec, dict) and "match" in spec:
        found = [i for i, text in enumerate(token_texts) if text == spec["match"]]
        if not found:
            raise BadInputError(f"no token {spec['match']!r} in the prompt; its tokens are {token_texts}")
        return found
    if isinstance(spec, dict) and set(spec) <= {"start", "stop"}:
        return list(range(n))[slice(spec.get("start"), spec.get("stop"))]
    chosen = [spec] if isinstance(spec, int) else spec
    if not isinstance(chosen, list) or not all(isinstance(p, int) for p in chosen):
        raise BadInputError(
            f"bad positions {spec!r}: use null, an int, a list of ints, 'last', "
            '{"start": a, "stop": b} or {"match": "token"}'
        )
    for p in chosen:
        if not -n <= p < n:
            raise BadInputError(f"position {p} is outside a prompt of {n} tokens; use 0..{n - 1} or -1..-{n}")
    return [p % n for p in chosen]


def edits_for(
    model: Model,
    batch: Batch,
    interventions: Sequence[Intervention],
    sources: dict[str, dict[str, list[torch.Tensor]]] | None = None,
) -> dict[str, EditFn]:
    """Edit functions for `hooks.run` that apply the interventions, in order, per prompt of the batch.

    sources: run name -> site -> per-prompt values (`RunResult.acts` of that run), for `Patch`.
    """
    by_site: dict[str, list[Intervention]] = {}
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise BadInputError(f"{iv!r} is not an Intervention")
        for site in model.resolve_sites(iv.site):
            if parse_site(site).kind == "attn.pattern":
                raise BadInputError(
                    f"'{site}': interventions on attention patterns are not supported yet; "
                    "edit them with a function through run(edit=...)"
                )
            by_site.setdefault(site, []).append(iv)
    texts = [model.str_tokens(batch.tokens(i)) for i in range(batch.size)]

    def make_edit(site: str, ivs: list[Intervention]) -> EditFn:
        def edit(value: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            value = value.clone()
            for i in range(batch.size):
                for iv in ivs:
                    positions = resolve_positions(iv.positions, texts[i])
                    rows = torch.tensor(positions, dtype=torch.long) + batch.starts[i]
                    index = _index(value, iv, site)
                    selected = value[i, rows][index]
                    source = None
                    if isinstance(iv, Patch):
                        run_values = (sources or {}).get(iv.source, {}).get(site)
                        if run_values is None:
                            raise BadInputError(f"patch of '{site}' needs the '{iv.source}' run's values of that site")
                        source_prompt = run_values[i]
                        if max(positions) >= len(source_prompt):
                            raise BadInputError(
                                f"patch of '{site}': position {max(positions)} is beyond the {iv.source} prompt's "
                                f"{len(source_prompt)} tokens; align the prompts or choose positions"
                            )
                        source = source_prompt.to(value.device)[positions][index]
                    block = value[i, rows]
                    block[index] = iv.replace(selected, source)
                    value[i, rows] = block
            return value

        return edit

    return {site: make_edit(site, ivs) for site, ivs in by_site.items()}


def _index(value: torch.Tensor, iv: Intervention, site: str) -> tuple:
    """Index into one prompt's selected rows ([pos, ...]) for the intervention's heads and units."""
    heads_axis = parse_site(site).kind == "attn.heads"
    if iv.heads is not None and not heads_axis:
        raise BadInputError(f"heads= applies to attn.heads sites, not '{site}'")
    index: list = [slice(None)]
    if heads_axis:
        index.append(slice(None) if iv.heads is None else torch.tensor(iv.heads))
    if iv.units is not None:
        if iv.heads is not None:
            raise BadInputError("give heads= or units= on attn.heads, not both")
        index.append(torch.tensor(iv.units))
    return tuple(index)


def run_with(
    model: Model,
    prompts: str | list[str] | Batch,
    interventions: Sequence[Intervention],
    sources: dict[str, dict[str, list[torch.Tensor]]] | None = None,
    **run_kwargs: Any,
) -> RunResult:
    """`hooks.run` with the interventions applied."""
    batch = prompts if isinstance(prompts, Batch) else model.tokenize(prompts, run_kwargs.pop("padding_side", "right"))
    return run(model, batch, edit=edits_for(model, batch, interventions, sources), **run_kwargs)
