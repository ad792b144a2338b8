"""Graph batches and graph-eval on Ray: a pool of actors, each loading the model and transcoders once (by name or
folder where it runs, or an in-memory model shipped with `ray.put`), with the prompts handed out one at a time to
whichever actor is free. Each actor traces a prompt exactly as one process would (`circuits.batch.trace_one`,
`circuits.evaluate.evaluate_prompt`): it writes the graph file itself, atomically, and returns the prompt's row; the
driver assembles the summary or the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from modelrecon.circuits.batch import BatchPrompt, TraceOptions, TraceSource
from modelrecon.errors import ModelreconError, reason
from modelrecon.scale.cluster import connect, worker_cpus


class GraphWorker:
    """One Ray actor: the model and its replacement model, loaded once by `load`; then prompts, one per call."""

    def __init__(self, source: TraceSource, threads: int) -> None:
        self.source, self.threads = source, threads
        self.model = self.rm = None

    def load(self) -> dict:
        import torch

        torch.set_num_threads(self.threads)
        self.model, self.rm, note = self.source.load(build=False)
        self.source = None  # the loaded objects are all that is needed now
        level = "components" if self.rm is None else "features"
        return {"model": self.model.name, "level": level, "note": note}

    def check(self, prompts: list[BatchPrompt]) -> None:
        from modelrecon.circuits.batch import check_prompts

        check_prompts(self.model, prompts, features=self.rm is not None)

    def check_answers(self, prompts: list) -> None:
        from modelrecon.circuits.evaluate import check_answers

        check_answers(self.model, prompts)

    def trace(self, job: tuple, options: TraceOptions) -> dict:
        from modelrecon.circuits.batch import trace_one

        index, prompt, path = job
        return trace_one(self.model, self.rm, index, prompt, path, options)

    def evaluate(self, job: tuple, options: dict) -> tuple[int, dict]:
        from modelrecon.circuits.evaluate import evaluate_prompt

        index, prompt = job
        return index, evaluate_prompt(self.model, self.rm, prompt, **options)


@contextmanager
def _errors(ray) -> Iterator[None]:
    """A worker's modelrecon error is raised here as itself (one line in the CLI); a dead worker is one line too."""
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ModelreconError):
            raise cause from None
        raise
    except ray.exceptions.RayActorError as exc:
        raise ModelreconError(f"a Ray worker died ({reason(exc)}); give each more memory (fewer --workers) or "
                              "look at the Ray logs") from None  # fmt: skip


@contextmanager
def worker_pool(source: TraceSource, address: str | None, workers: int | None, jobs: int) -> Iterator[tuple]:
    """(ray, actors, what the first one loaded): at most `jobs` actors, each with its share of the cluster's CPUs
    (and as many torch threads), every one loaded before this yields; killed on the way out."""
    ray = connect(address)
    n, cpus = worker_cpus(ray, workers)
    remote = ray.remote(GraphWorker).options(num_cpus=cpus)
    shared = ray.put(source)  # one copy in the object store, whatever the number of actors
    actors = [remote.remote(shared, max(1, int(cpus))) for _ in range(max(1, min(n, jobs)))]
    try:
        with _errors(ray):
            info = ray.get([a.load.remote() for a in actors])[0]
        yield ray, actors, info
    finally:
        for actor in actors:
            ray.kill(actor)


def _map(ray, actors, call: Callable, jobs: list) -> Iterator:
    """Each job's result as it arrives; a free actor takes the next job."""
    from ray.util import ActorPool

    with _errors(ray):
        yield from ActorPool(actors).map_unordered(call, jobs)


def trace_on_ray(source: TraceSource, jobs: list[tuple], options: TraceOptions, on_row: Callable[[dict], None],
                 on_start: Callable, *, address: str | None, workers: int | None) -> None:  # fmt: skip
    """Trace `jobs` ((index, BatchPrompt, graph path) each) on a pool of actors; `on_row(row)` as each finishes.
    `on_start(model, level, note, workers)` once every actor has loaded and the prompts have been checked."""
    with worker_pool(source, address, workers, len(jobs)) as (ray, actors, info):
        with _errors(ray):
            ray.get(actors[0].check.remote([prompt for _, prompt, _ in jobs]))
        on_start(info["model"], info["level"], info["note"], len(actors))
        for row in _map(ray, actors, lambda actor, job: actor.trace.remote(job, options), jobs):
            on_row(row)


def evaluate_on_ray(source: TraceSource, prompts: list, options: dict, on_row: Callable[[dict], None], *,
                    address: str | None, workers: int | None) -> tuple[str, list[dict]]:  # fmt: skip
    """graph-eval's rows (`evaluate_prompt`), in the prompts' order, computed on a pool of actors; and the model's
    name. `on_row(row)` as each finishes."""
    rows: dict[int, dict] = {}
    with worker_pool(source, address, workers, len(prompts)) as (ray, actors, info):
        with _errors(ray):
            ray.get(actors[0].check_answers.remote(prompts))
        jobs = list(enumerate(prompts))
        for index, row in _map(ray, actors, lambda actor, job: actor.evaluate.remote(job, options), jobs):
            rows[index] = row
            on_row(row)
    return info["model"], [rows[i] for i in range(len(prompts))]
