"""What every `modelrecon` command shares: the app the command modules register on, the result console, the common
options, model loading, and the prompt-pair options.

Start-up time matters (`modelrecon --help` should answer in well under a second): modules of this package import only
typer, rich and the standard library at module level; everything heavier (torch, transformers, zarr) is imported
inside the command that needs it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from modelrecon.errors import BadInputError

app = typer.Typer(
    help="modelrecon: record, share, test causally and trace what happens inside language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stdout = Console(soft_wrap=True)

ModelOption = Annotated[str, typer.Option("--model", "-m", help="embedded name, local folder, .gguf file or hub id")]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, mps or auto (a GPU when present)")]
TRANSCODERS_HELP = (
    "a tier (demo, standard), default, a folder, a circuit-tracer config.yaml, org/repo\\[/path]\\[@rev] or "
    "saelens:RELEASE/ID"
)
DtypeOption = Annotated[str, typer.Option("--dtype", help="the model's weights: float32, bfloat16 or float16")]
RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="run on Ray (extra 'scale'): local (a cluster on this machine, or RAY_ADDRESS), auto (the one "
        "`ray start` began here) or HOST:PORT",
    ),
]
WorkersOption = Annotated[int | None, typer.Option("--workers", min=1, help="with --ray: workers (default: CPUs / 2)")]


TruncateOption = Annotated[
    bool,
    typer.Option(
        "--truncate", help="cut a prompt longer than the model's context to its first tokens (else: an error)"
    ),
]


def load_model(name: str, device: str = "auto", dtype: str = "float32", truncate: bool = False):
    """The model a command runs, on its device and in its dtype (`load` checks both before reading any weights);
    `truncate`: prompts longer than its context keep their first tokens instead of failing (--truncate)."""
    from modelrecon.models.loading import load

    model = load(name, device=device, dtype=dtype)
    model.truncate_prompts = truncate
    return model


def split_patterns(values: list[str]) -> list[str]:
    """Repeatable options that also take comma- or space-separated lists."""
    return [p for v in values for p in v.replace(",", " ").split()]


def interrupted(out) -> None:
    """Ctrl-C during resumable work: say how to resume, exit 130."""
    import sys

    Console(stderr=True).print(f"interrupted: re-run the same command to resume {out}", markup=False)
    sys.exit(130)


PairsOption = Annotated[
    str | None, typer.Option("--pairs", help="JSONL file of pairs, or a shipped dataset name (capitals)")
]
CleanOption = Annotated[str | None, typer.Option("--clean", help="the clean prompt (instead of --pairs)")]
CorruptOption = Annotated[str | None, typer.Option("--corrupt", help="the counterfactual prompt")]
AnswerOption = Annotated[str | None, typer.Option("--answer", help="the clean answer, with its leading space")]
WrongOption = Annotated[str | None, typer.Option("--wrong", help="the counterfactual's answer")]


SweepOption = Annotated[
    str,
    typer.Option("--sweep", help="resid_pre, resid_post, attn, mlp (layer x position); heads, q, k, v (layer x head)"),
]


def check_sweep(sweep: str) -> None:
    from modelrecon.counterfactual.sweep import SWEEPS

    if sweep not in SWEEPS:
        raise BadInputError(f"unknown --sweep {sweep!r}; use one of {', '.join(SWEEPS)}")


def read_pair_options(pairs: str | None, clean, corrupt, answer, wrong) -> list:
    """The pairs from --pairs, or the one pair given by --clean --corrupt --answer --wrong."""
    from modelrecon.counterfactual.pairs import pair_from_dict, read_pairs

    one = {"clean": clean, "counterfactual": corrupt, "answer": answer, "wrong": wrong}
    given = {k for k, v in one.items() if v is not None}
    if pairs is not None and given:
        raise BadInputError("give either --pairs FILE or --clean/--corrupt/--answer/--wrong, not both")
    if pairs is not None:
        return read_pairs(pairs)
    if len(given) < 4:
        names = {"clean": "--clean", "counterfactual": "--corrupt", "answer": "--answer", "wrong": "--wrong"}
        missing = " ".join(names[k] for k in one if k not in given)
        raise BadInputError(f"missing {missing}: give all four of --clean --corrupt --answer --wrong, or --pairs")
    return [pair_from_dict(one, "the command line")]
