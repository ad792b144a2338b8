"""Attribution graphs against circuit-tracer: the same adjacency, and time and peak memory by prompt length.

In this (the project's) venv: a seeded tiny Llama (by default 4 layers, d_model 64; `--layers`, `--d-model`; a
character tokenizer that puts BOS first) is saved as a Hugging Face folder, and one ReLU skip transcoder per layer
with seeded random weights (encoder biases set so that about `--active` features fire per position and layer) is
exported with `export_circuit_tracer`. For each prompt length (token ids, BOS included) two processes attribute the
same prompt with the same node budget: modelrecon's `attribute` (this script with `--worker`, the transcoders read
back with `import_circuit_tracer`) and circuit-tracer 0.5's `attribute` with the nnsight backend
(`peers/ct_attribute.py`, in a peer venv); each side's replacement model is built once, before the timed calls.
Each process warms up on 8 tokens, then times `--repeats` calls and records its resident high-water mark during the
first. The sides alternate for `--rounds` rounds (this machine's speed drifts by up to 2x over minutes); the median
and the fastest of each side's calls are reported. Memory is reported two ways: the whole process's peak (mostly the
loaded libraries, about 370 MiB for modelrecon and 420 MiB for circuit-tracer before any attribution) and the
attribution's own peak, the peak minus the resident memory just before the call, which is what grows with the
prompt.

The graphs are compared node by node: circuit-tracer's dense adjacency (rows targets, columns sources; its node
order: selected features, error nodes layer by layer, token nodes, logit nodes) against modelrecon's edge lists.
Reported: whether the logit targets and the attributed features are the same sets and the largest absolute
difference over every (target, source) pair either graph has, on the target rows both computed (all of them when the
budget covers every active feature). Pass: <= 1e-4.

Run: `.venv/bin/python benchmarks/trace_vs_circuit_tracer.py --peer-python .bench-venvs/interop/bin/python`
(`make interop-env` builds that venv; a larger model: `--layers 8 --d-model 256 --width 1024 --lengths 8 32 128`).
Exit code 1 when a graph differs or a side fails.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from capture_overhead import ROOT, add_run_arguments, start_run
from peers.common import PEER_ENV, run_peer_script, write_json
from peers.ct_attribute import reset_peak_rss, rss_mib

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-4


def build(work: Path, seed: int, active: float, layers: int, d_model: int, width: int,
          positions: int = 256) -> tuple[Path, Path]:  # fmt: skip
    """The model folder (MLP width 2 x d_model, 4 heads, 2 kv heads) and the circuit-tracer transcoder folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizers import processors

    from modelrecon import Model
    from modelrecon.dictionaries import Dictionary, DictionaryConfig
    from modelrecon.dictionaries.formats import export_circuit_tracer
    from modelrecon.hooks.run import run

    from tiny import char_tokenizer, tiny_model

    model_dir, tc_dir = work / "model", work / "transcoders"
    tiny = tiny_model("llama", seed, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                      max_position_embeddings=positions)  # fmt: skip
    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)]
    )
    tiny.hf.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config_path = model_dir / "tokenizer_config.json"  # transformers 5 writes a class name 4.x does not know
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    model = Model(tiny.hf, tokenizer, name="tiny-llama")
    # Encoder biases from the MLP inputs of a random 256-token text: each feature fires on `active / width` of them.
    generator = torch.Generator().manual_seed(seed + 1)
    sample = torch.randint(3, len(tokenizer), (255,), generator=generator).tolist()
    sites = [f"layers.{i}.mlp.in" for i in range(layers)]
    with torch.no_grad():
        acts = run(model, model.batch_from_ids([[tokenizer.bos_token_id, *sample]]), record=sites).acts
    transcoders = []
    for layer in range(layers):
        d = Dictionary(DictionaryConfig("skip-transcoder", d_model, d_model, width, "relu", None,
                                        (f"layers.{layer}.mlp.in",), (f"layers.{layer}.mlp.out",)))  # fmt: skip
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            d.W_enc.copy_(torch.randn(d.W_enc.shape, generator=generator) / d_model**0.5)
            pre = acts[sites[layer]][0][1:] @ d.W_enc[0]  # [pos, width]
            d.b_enc[0].copy_(-torch.quantile(pre, 1 - active / width, dim=0))
        transcoders.append(d.eval())
    export_circuit_tracer(transcoders, tc_dir)
    return model_dir, tc_dir


def prompt_ids(length: int, seed: int) -> list[int]:
    """BOS and `length - 1` seeded random letters (one token each)."""
    import string

    generator = torch.Generator().manual_seed(seed + 1000 + length)
    letters = string.ascii_letters
    return [2] + [3 + int(i) for i in torch.randint(0, len(letters), (length - 1,), generator=generator)]


def worker(args: argparse.Namespace) -> None:
    """modelrecon's side, in its own process: warm up on 8 tokens, then time one attribution."""
    from modelrecon import load
    from modelrecon.circuits.attribute import attribute
    from modelrecon.dictionaries.formats import import_circuit_tracer

    torch.set_num_threads(args.threads)
    model = load(args.model_dir)
    from modelrecon.circuits.replacement import ReplacementModel

    # built once, outside the timed calls, as circuit-tracer's ReplacementModel is
    transcoders = ReplacementModel(model, import_circuit_tracer(args.transcoders))
    ids = json.loads(Path(args.ids).read_text())
    prompt = "".join(model.tokenizer.convert_ids_to_tokens(ids[1:]))  # one character per token
    if model.encode(prompt) != ids:
        raise SystemExit(f"the prompt does not tokenise back to the ids: {model.encode(prompt)} != {ids}")
    kwargs = dict(max_logits=10, cumulative=0.95, batch_size=args.batch_size, progress=False)
    attribute(model, prompt[:7], transcoders, max_feature_nodes=min(args.max_feature_nodes, 64),
              **kwargs)  # fmt: skip
    loaded = rss_mib()
    reset_peak_rss()
    start = time.perf_counter()
    graph = attribute(model, prompt, transcoders, max_feature_nodes=args.max_feature_nodes, **kwargs)
    times = [time.perf_counter() - start]
    peak = reset_peak_rss()  # of the first timed call
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        attribute(model, prompt, transcoders, max_feature_nodes=args.max_feature_nodes, **kwargs)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    keys = [node_key(n) for n in graph.nodes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"keys": keys, "sources": graph.sources, "targets": graph.targets, "weights": graph.weights,
                "token_ids": graph.token_ids, "logits": [t["token_id"] for t in graph.metadata["targets"]],
                "active": graph.metadata["active_features"]}, out / "graph.pt")  # fmt: skip
    write_json(out, seconds=seconds, all_seconds=times, rss_before_mib=loaded, peak_rss_mib=peak,
               threads=torch.get_num_threads(),
               process_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip


def node_key(node) -> tuple:
    if node.kind == "feature":
        return ("feature", node.layer, node.position, node.feature)
    if node.kind == "error":
        return ("error", node.layer, node.position)
    if node.kind == "embedding":
        return ("embedding", node.position)
    return ("logit", node.feature)


def compare(ours: dict, theirs: dict) -> dict:
    """Both graphs as dense matrices over circuit-tracer's node order, on the target rows both computed."""
    n_layers, ids = theirs["n_layers"], theirs["input_tokens"]
    n_pos = len(ids)
    active = theirs["active_features"]
    keys = [("feature", *map(int, active[i].tolist())) for i in theirs["selected_features"].tolist()]
    keys += [("error", layer, p) for layer in range(n_layers) for p in range(n_pos)]
    keys += [("embedding", p) for p in range(n_pos)] + [("logit", t) for t in theirs["logit_tokens"]]
    index = {k: i for i, k in enumerate(keys)}
    our_keys = ours["keys"]
    missing = [k for k in our_keys if k not in index]  # our nodes circuit-tracer has no column for
    a_theirs = theirs["adjacency"].double()
    a_ours = torch.zeros_like(a_theirs)
    ok = torch.tensor([k in index for k in our_keys])
    column = torch.tensor([index.get(k, -1) for k in our_keys])
    s, t, w = ours["sources"], ours["targets"], ours["weights"].double()
    kept = ok[s] & ok[t]
    a_ours[column[t[kept]], column[s[kept]]] = w[kept]
    # rows both computed: logits and the features both attributed (each computes a row for each attributed feature)
    ours_features = {k for k in our_keys if k[0] == "feature"}
    theirs_features = {k for k in keys if k[0] == "feature"}
    rows = [index[k] for k in keys if k[0] == "logit" or k in ours_features]
    # and source columns both have (with a smaller budget than the active features, each keeps the edges from the
    # features it attributed only)
    columns = [index[k] for k in keys if k[0] != "feature" or k in ours_features]
    diff = (a_ours[rows][:, columns] - a_theirs[rows][:, columns]).abs()
    return {
        "same_ids": ours["token_ids"] == ids,
        "same_logits": ours["logits"] == theirs["logit_tokens"],
        "n_features": (len(ours_features), len(theirs_features), len(ours_features & theirs_features)),
        "n_active": (ours["active"], int(active.shape[0])),
        "missing": len(missing),
        "max_diff": float(diff.max()),
        "max_abs": float(a_theirs[rows][:, columns].abs().max()),
        "edges": (int(w.ne(0).sum()), int(a_theirs.ne(0).sum())),
    }


def _pooled(runs: list[dict]) -> dict:
    """One side's rounds together: the median and the fastest of all timed calls; memory from the first round."""
    times = sorted(t for r in runs for t in r["all_seconds"])
    return {**runs[0], "seconds": times[len(times) // 2], "fastest": times[0], "all_seconds": times}


def run_ours(args, work: Path, ids_file: Path, out: Path) -> bool:
    command = [sys.executable, __file__, "--worker", "--model-dir", str(work / "model"), "--transcoders",
               str(work / "transcoders"), "--ids", str(ids_file), "--out", str(out), "--threads", str(args.threads),
               "--max-feature-nodes", str(args.max_feature_nodes), "--batch-size", str(args.batch_size),
               "--repeats", str(args.repeats)]  # fmt: skip
    print(f"[modelrecon] attributing {ids_file.stem} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env={**__import__("os").environ, **PEER_ENV},
                          timeout=args.timeout)  # fmt: skip
    if done.returncode != 0:
        print("[modelrecon] FAILED:\n" + "\n".join((done.stdout + done.stderr).splitlines()[-15:]))
    return done.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    default_peer = ROOT / ".bench-venvs" / "interop" / "bin" / "python"
    parser.add_argument("--peer-python", type=Path, default=default_peer, help="python of a venv with circuit-tracer")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[8, 32, 128, 512], help="prompt lengths, BOS included"
    )
    parser.add_argument("--max-feature-nodes", type=int, default=1024, help="node budget, both sides")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per backward pass, both sides")
    parser.add_argument("--active", type=float, default=3, help="features active per position and layer (target)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the tiny Llama")
    parser.add_argument("--d-model", type=int, default=64, help="its width (MLP: twice that)")
    parser.add_argument("--width", type=int, default=256, help="transcoder width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process (the median is reported)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per side and length, the sides alternating")
    parser.add_argument("--keep", type=Path, help="work in this folder (kept) instead of a temporary one")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model-dir", "--transcoders", "--ids", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    start_run(args)
    if not args.peer_python.exists():
        print(f"no peer python at {args.peer_python}; `make interop-env` or pass --peer-python")
        return 1
    with tempfile.TemporaryDirectory(prefix="modelrecon-ct-") as temp:
        work = args.keep or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        build(work, args.seed, args.active, args.layers, args.d_model, args.width, max(256, max(args.lengths)))
        results = []
        for length in args.lengths:
            ids_file = work / f"ids_{length}.json"
            ids_file.write_text(json.dumps(prompt_ids(length, args.seed)))
            rounds = []
            for round_ in range(args.rounds):  # the sides alternate: the machine's speed drifts over minutes
                ours_out, theirs_out = work / f"ours_{length}_{round_}", work / f"ct_{length}_{round_}"
                ok = run_ours(args, work, ids_file, ours_out)
                command = [str(args.peer_python), str(HERE / "peers" / "ct_attribute.py"), "--model-dir",
                           str(work / "model"), "--transcoders", str(work / "transcoders"), "--ids", str(ids_file),
                           "--out", str(theirs_out), "--threads", str(args.threads), "--max-feature-nodes",
                           str(args.max_feature_nodes), "--batch-size", str(args.batch_size),
                           "--repeats", str(args.repeats)]  # fmt: skip
                ok = run_peer_script("circuit-tracer", command, args.timeout) and ok
                if not ok:
                    return 1
                rounds.append([json.loads((o / "result.json").read_text()) for o in (ours_out, theirs_out)])
            ours_r, theirs_r = (_pooled([r[side] for r in rounds]) for side in (0, 1))
            cmp = compare(torch.load(work / f"ours_{length}_0" / "graph.pt"),
                          torch.load(work / f"ct_{length}_0" / "graph.pt", weights_only=True))  # fmt: skip
            results.append((length, ours_r, theirs_r, cmp))
    versions = results[0][2]["versions"]
    print(f"\ncircuit-tracer {versions['circuit-tracer']} ({results[0][2]['backend']} backend, nnsight "
          f"{versions['nnsight']}, transformers {versions['transformers']}, torch {versions['torch']}); tiny Llama "
          f"{args.layers} layers, d_model {args.d_model}, ReLU skip transcoders width {args.width}; node budget "
          f"{args.max_feature_nodes}, batch {args.batch_size}, {args.threads} threads\n")  # fmt: skip
    print(
        "| tokens | active features (ours / ct) | attributed (ours / ct / both) | same ids, logits | "
        "max abs diff | max abs weight | result |"
    )
    print("|---|---|---|---|---|---|---|")
    failed = 0
    for length, _, _, c in results:
        ok = c["same_ids"] and c["same_logits"] and c["missing"] == 0 and c["max_diff"] <= TOLERANCE
        ok = ok and c["n_features"][0] == c["n_features"][1] == c["n_features"][2]
        failed += not ok
        print(f"| {length} | {c['n_active'][0]} / {c['n_active'][1]} | {' / '.join(map(str, c['n_features']))} | "
              f"{c['same_ids']}, {c['same_logits']} | {c['max_diff']:.1e} | {c['max_abs']:.2f} | "
              f"{'ok' if ok else 'DIFFERS'} |")  # fmt: skip
    print(
        "\n| tokens | ours s | ct s | time ratio | ratio of fastest | ours attribution peak MiB | "
        "ct attribution peak MiB | "
        "attribution peak ratio | ours process peak MiB (before) | ct process peak MiB (before) | process peak ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for length, o, t, _ in results:
        time_ratio, peak_ratio = o["seconds"] / t["seconds"], o["peak_rss_mib"] / t["peak_rss_mib"]
        ours_growth, ct_growth = (r["peak_rss_mib"] - r["rss_before_mib"] for r in (o, t))
        print(f"| {length} | {o['seconds']:.3f} | {t['seconds']:.3f} | **{time_ratio:.2f}** | "
              f"{o['fastest'] / t['fastest']:.2f} | {ours_growth:.0f} | "
              f"{ct_growth:.0f} | **{ours_growth / max(ct_growth, 1e-9):.2f}** | {o['peak_rss_mib']:.0f} "
              f"({o['rss_before_mib']:.0f}) | {t['peak_rss_mib']:.0f} ({t['rss_before_mib']:.0f}) | "
              f"{peak_ratio:.2f} |")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
