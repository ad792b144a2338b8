"""Graph batches: many prompts traced (`circuits.tracing.trace`), one graph file each, plus a summary table.

`trace_batch(source, prompts, out)` writes `out/NNNN/graph.json` for the prompt at index NNNN of the list (zero-padded,
so the names sort and stay stable), then `out/summary.json` and `out/summary.csv`: per prompt its target token, graph
size before and after pruning, the edge check's error, the causal check's figures, the seconds it took and the graph's
path. A prompt whose graph file exists is not traced again (a batch resumes where it stopped); its row comes from the
previous summary, or from the graph file itself. With `ray=ADDRESS` the prompts are spread over a pool of Ray actors,
each loading the model and transcoders once (`modelrecon.scale.graphs`); each graph is written by the worker that
traced it, atomically. Ray is imported only then.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modelrecon.circuits.graph import Graph
from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.errors import BadInputError
from modelrecon.models.model import Model, single_token

LEVELS = ("auto", "features", "components")


@dataclass(frozen=True)
class BatchPrompt:
    """One prompt of a batch, with its optional target token, wrong token (a logit-difference target) and, for a
    component graph, counterfactual prompt. `where`: the file and line it came from, for error messages."""

    prompt: str
    target: str | None = None
    wrong: str | None = None
    counterfactual: str | None = None
    where: str = "the prompt list"


def read_batch_prompts(path: str | Path) -> list[BatchPrompt]:
    """The prompts of a `.txt` file (one a line; blank lines skipped) or a `.jsonl` file (one object a line:
    `{"prompt", "target"? (or "answer"), "wrong"?, "counterfactual"?}`; other keys are ignored, so a graph-eval prompt
    file works). A bad line is a one-line error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"prompt file '{path}' does not exist; give a .txt (a prompt per line) or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read the prompt file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    suffix, prompts = path.suffix.lower(), []
    if suffix not in (".txt", ".text", ".jsonl", ".ndjson"):
        raise BadInputError(f"prompt file '{path}' has unknown format '{suffix or 'no suffix'}'; use .txt (a "
                            'prompt per line) or .jsonl ({"prompt": ..., "target"?: ...} per line)')  # fmt: skip
    for number, line in enumerate(lines, 1):
        where = f"{path} line {number}"
        if not line.strip():
            continue
        if suffix in (".txt", ".text"):
            prompts.append(BatchPrompt(line, where=where))
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{where} is not JSON ({exc.msg}); write one object per line") from None
        prompts.append(_prompt_from_dict(data, where))
    if not prompts:
        raise BadInputError(f"prompt file '{path}' holds no prompts; write one per line")
    return prompts


def _prompt_from_dict(data, where: str) -> BatchPrompt:
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        raise BadInputError(f'{where}: each line needs a non-empty "prompt" string')
    fields = {}
    for key in ("target", "answer", "wrong", "counterfactual"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise BadInputError(f'{where}: "{key}" must be a string')
        fields[key] = value
    if fields["target"] is not None and fields["answer"] is not None and fields["target"] != fields["answer"]:
        raise BadInputError(f'{where}: "target" and "answer" differ; give one of them')
    target = fields["target"] if fields["target"] is not None else fields["answer"]
    return BatchPrompt(data["prompt"], target, fields["wrong"], fields["counterfactual"], where)


@dataclass
class TraceSource:
    """What traces a prompt: the model (in memory, or a name / folder / .gguf / hub id loaded where it runs, on
    `device` in `dtype`) and its transcoders (in memory as dictionaries or a ReplacementModel, a name as `--transcoders`
    takes, or None for component graphs). `level` auto: features when the transcoders are named or the model has
    default ones, else components. A Ray worker receives this object and calls `load` once."""

    model: Model | str
    transcoders: ReplacementModel | list | str | None = "default"
    level: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    truncate: bool = False  # prompts longer than the model's context keep their first tokens (else: an error)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise BadInputError(f"--level must be auto, features or components, not {self.level!r}")

    def load(self, build: bool = True) -> tuple[Model, ReplacementModel | None, str | None]:
        """(model, replacement model or None for component graphs, a note to print or None). `build`: train the
        embedded model's demo transcoders when they are named and not built yet (Ray workers do not: several would
        train them at once)."""
        if isinstance(self.transcoders, ReplacementModel):
            if self.level == "components":
                return self.transcoders.model, None, None
            return self.transcoders.model, self.transcoders, None
        if isinstance(self.model, Model):
            model = self.model
        else:
            from modelrecon.models.loading import load

            model = load(self.model, device=self.device, dtype=self.dtype)
        model.truncate_prompts = model.truncate_prompts or self.truncate
        level, note = self.level, None
        if level == "auto":
            if self.transcoders is None:
                level = "components"
            elif isinstance(self.transcoders, str) and self.transcoders == "default":
                from modelrecon.dictionaries.defaults import default_transcoders_folder

                level = "features" if default_transcoders_folder(model) is not None else "components"
                if level == "components":
                    note = (f"{model.name} has no default transcoders: tracing heads and MLPs (EAP-IG); pass "
                            "--transcoders DIR for a feature graph")  # fmt: skip
            else:
                level = "features"
        if level == "components":
            return model, None, note
        if self.transcoders is None:
            raise BadInputError("a feature graph needs transcoders; give them or trace components")
        if isinstance(self.transcoders, str):
            from modelrecon.dictionaries.defaults import transcoders_by_name

            if not build:
                _check_built(model, self.transcoders)
            dictionaries = transcoders_by_name(model, self.transcoders)
        else:
            dictionaries = self.transcoders
        return model, ReplacementModel(model, dictionaries), note

    @property
    def transcoders_label(self) -> str:
        if isinstance(self.transcoders, str):
            return self.transcoders
        return "none" if self.transcoders is None else "in memory"


def _check_built(model: Model, name: str) -> None:
    from modelrecon.dictionaries.defaults import RECIPES, TIERS, built_tiers

    if model.name not in RECIPES or name not in ("default", *TIERS):
        return
    built = built_tiers(model)
    if (name == "default" and not built) or (name in TIERS and name not in built):
        tier = "demo" if name == "default" else name
        raise BadInputError(f"the {tier} transcoders of {model.name} are not built, and Ray workers do not build "
                            f"them: run modelrecon transcoders --model {model.name} --quality {tier}")  # fmt: skip


def check_prompts(model: Model, prompts: list[BatchPrompt], features: bool) -> None:
    """Every prompt's tokens, target and wrong token checked before the long work: a one-line error naming the line."""
    from modelrecon.circuits.attribute import prompt_ids

    for p in prompts:
        try:
            ids = prompt_ids(model, p.prompt)
            for token in (p.target, p.wrong):
                if token is not None:
                    single_token(model, token, "target")
            if features and p.wrong is not None and p.target is None:
                raise BadInputError('a logit-difference target needs "target" as well as "wrong"')
            if p.counterfactual is not None:
                if features:
                    raise BadInputError("a counterfactual prompt is for component graphs (--level components)")
                if len(model.encode(p.counterfactual)) != len(ids):
                    raise BadInputError("the counterfactual and the prompt differ in length; reword it")
        except BadInputError as exc:
            raise BadInputError(f"{p.where}: {exc}") from None


@dataclass
class TraceOptions:
    """The options every prompt of a batch is traced with (`circuits.tracing.trace`)."""

    max_feature_nodes: int = 1000
    batch_size: int = 32
    check_features: int = 10


def trace_one(model: Model, rm: ReplacementModel | None, index: int, prompt: BatchPrompt, path: Path,
              options: TraceOptions) -> dict:  # fmt: skip
    """Trace one prompt of a batch, write its pruned graph to `path` (atomically) and return its summary row."""
    from modelrecon.circuits.graph_file import save_graph
    from modelrecon.circuits.tracing import trace

    start = time.perf_counter()
    traced = trace(model, prompt.prompt, rm, target=prompt.target, wrong=prompt.wrong,
                   counterfactual=prompt.counterfactual, max_feature_nodes=options.max_feature_nodes,
                   batch_size=options.batch_size, check_features=options.check_features, progress=False)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    save_graph(traced.pruned, path)
    return summary_row(index, traced.pruned, path, time.perf_counter() - start, "traced")


COLUMNS = ("index", "prompt", "target", "nodes", "edges", "pruned_nodes", "pruned_edges", "edge_check_error",
           "replacement", "completeness", "causal_top_change", "causal_top_predicted", "causal_random_mean",
           "causal_accounted", "causal_agrees", "seconds", "status", "path")  # fmt: skip


def summary_row(index: int, pruned: Graph, path: Path, seconds: float | None, status: str) -> dict:
    """A prompt's row of the summary, from its pruned graph (what the graph file holds, so a resumed prompt's row
    is rebuilt from its file). `path` is kept relative to the batch folder."""
    meta = pruned.metadata
    pruning, check = meta.get("pruning", {}), meta.get("causal_check", {})
    scores = pruning.get("scores_before", {})
    return {"index": index, "prompt": pruned.prompt, "target": check.get("target"),
            "nodes": pruning.get("nodes_before"), "edges": pruning.get("edges_before"),
            "pruned_nodes": pruned.n_nodes, "pruned_edges": len(pruned.weights),
            "edge_check_error": meta.get("edge_check_error"), "replacement": scores.get("replacement"),
            "completeness": scores.get("completeness"), "causal_top_change": check.get("top_change"),
            "causal_top_predicted": check.get("top_predicted"), "causal_random_mean": check.get("random_mean"),
            "causal_accounted": check.get("accounted"), "causal_agrees": check.get("agrees"), "seconds": seconds,
            "status": status, "path": f"{path.parent.name}/{path.name}"}  # fmt: skip


@dataclass
class BatchSummary:
    """What `trace_batch` wrote: one row per prompt (`COLUMNS`, in prompt order), and the batch's settings."""

    out: Path
    model: str | None
    level: str | None
    transcoders: str
    options: TraceOptions
    rows: list[dict] = field(default_factory=list)
    total: int = 0
    note: str | None = None
    workers: int | None = None  # Ray actors (None: this process)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return len(self.rows) == self.total

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"model": self.model, "level": self.level, "transcoders": self.transcoders,
                "options": asdict(self.options), "prompts_total": self.total, "complete": self.complete,
                "workers": self.workers, "seconds": self.seconds, "prompts": self.rows}  # fmt: skip

    def write(self) -> tuple[Path, Path]:
        """summary.json and summary.csv in the batch folder, each written atomically."""
        from modelrecon.files import json_safe, write_text_atomic

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        data = json_safe(self.to_dict())
        return (write_text_atomic(self.out / "summary.json", json.dumps(data, indent=1)),
                write_text_atomic(self.out / "summary.csv", text.getvalue()))  # fmt: skip


def graph_paths(out: Path, count: int) -> list[Path]:
    width = max(4, len(str(count - 1)))
    return [out / f"{i:0{width}d}" / "graph.json" for i in range(count)]


def _resumed_row(index: int, prompt: BatchPrompt, path: Path, previous: dict[int, dict]) -> tuple[dict, str]:
    """The row of a prompt whose graph exists (its seconds from the previous summary when it has the row), and the
    graph's model."""
    from modelrecon.circuits.graph_file import load_graph

    graph = load_graph(path)
    if graph.prompt != prompt.prompt:
        raise BadInputError(f"{path} holds a graph of {graph.prompt[:60]!r}, not of {prompt.where}'s prompt "
                            f"{prompt.prompt[:60]!r}: the prompts changed; write the batch to a new --out")  # fmt: skip
    old = previous.get(index, {})
    seconds = old.get("seconds") if old.get("prompt") == prompt.prompt else None
    return summary_row(index, graph, path, seconds, "resumed"), graph.model


def _previous_rows(out: Path) -> tuple[dict, dict[int, dict]]:
    try:
        data = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        return data, {int(r["index"]): r for r in data.get("prompts", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}, {}


def trace_batch(
    source: TraceSource,
    prompts: list[BatchPrompt] | list[str],
    out: str | Path,
    options: TraceOptions | None = None,
    *,
    ray: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    on_start: Callable[[BatchSummary], None] | None = None,
) -> BatchSummary:
    """Trace every prompt not traced yet into `out/NNNN/graph.json` and write the summary (module docstring).

    `ray`: 'local', 'auto' or a cluster address, to trace on a pool of Ray actors (`workers` of them; default one
    per two CPUs of the cluster), each loading `source` once (an in-memory model is shipped to them with `ray.put`).
    `on_start(summary)` is called once the model is loaded (the summary's `model`, `level` and `note` set), before
    the first prompt is traced. The summary is written even when the batch stops early (an error, Ctrl-C): its
    `complete` says whether every prompt is in it."""
    options = options or TraceOptions()
    out = Path(out)
    items = [p if isinstance(p, BatchPrompt) else BatchPrompt(p, where=f"prompt {i}") for i, p in enumerate(prompts)]
    if not items:
        raise BadInputError("no prompts to trace")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the batch folder {out}: {exc.strerror}") from None
    paths = graph_paths(out, len(items))
    header, previous = _previous_rows(out)
    rows: dict[int, dict] = {}
    summary = BatchSummary(out, header.get("model"), header.get("level"), source.transcoders_label, options,
                           total=len(items))  # fmt: skip
    for i, path in enumerate(paths):
        if path.exists():
            rows[i], summary.model = _resumed_row(i, items[i], path, previous)
    pending = [(i, items[i], paths[i]) for i in range(len(items)) if i not in rows]
    start = time.perf_counter()
    try:
        if pending:
            _run(source, pending, options, summary, rows, ray, workers, progress, on_start)
    finally:
        summary.rows = [rows[i] for i in sorted(rows)]
        summary.seconds = time.perf_counter() - start
        summary.write()
    return summary


def _run(source, pending, options, summary, rows, ray, workers, progress, on_start) -> None:
    from modelrecon.progress import token_progress

    def started(model: str, level: str, note: str | None, n_workers: int | None) -> None:
        summary.model, summary.level, summary.note, summary.workers = model, level, note, n_workers
        if on_start is not None:
            on_start(summary)

    bar = token_progress(summary.total, summary.total - len(pending), enabled=progress, label="trace",
                         unit="prompts", rate_unit="prompt")  # fmt: skip
    if ray is not None:
        from modelrecon.scale.graphs import trace_on_ray

        with bar as advance:

            def done(row: dict) -> None:
                rows[row["index"]] = row
                advance(1, f"{row['nodes']} nodes")

            trace_on_ray(source, pending, options, done, started, address=ray, workers=workers)
        return
    model, rm, note = source.load()
    check_prompts(model, [p for _, p, _ in pending], features=rm is not None)
    started(model.name, "features" if rm is not None else "components", note, None)
    with bar as advance:
        for index, prompt, path in pending:
            rows[index] = trace_one(model, rm, index, prompt, path, options)
            advance(1, f"{rows[index]['nodes']} nodes")
