"""Graph batches: `circuits.trace` (one clean run for the graph and its check), `trace --prompts` (a graph file per
prompt, a summary, resumable), the same batch and graph-eval on a local Ray cluster (every file written, the same
graphs and figures as one process), and bad prompt files as one-line errors."""

import csv
import json
import sys

import pytest
import torch

from modelrecon.circuits.attribute import attribute
from modelrecon.circuits.check import causal_check
from modelrecon.circuits.graph_file import load_graph
from modelrecon.circuits.prune import prune_graph
from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.dictionaries import save_dictionaries

from conftest import assert_one_line_error, cli
from test_circuits import _transcoders

PROMPTS = ["The cat sat on the mat", "A dog ran", "Hello there"]
OPTIONS = ("--max-features", "30", "--check-features", "4")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_folder):
    """The tiny Llama (loaded from its folder, as the CLI loads it), random transcoders saved to a folder, a prompt
    file, and the batch traced in this process (the reference every other run is held to)."""
    from modelrecon import load

    folder = tmp_path_factory.mktemp("batch")
    model = load(str(tiny_llama_folder))
    transcoders = _transcoders(model)
    save_dictionaries(transcoders, folder / "tc")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")  # a blank line
    args = ("--model", tiny_llama_folder, "--transcoders", folder / "tc", *OPTIONS)
    return {"folder": folder, "model": model, "transcoders": transcoders, "args": args}


def _batch(capsys, setup, out, *extra):
    code, stdout, err = cli(capsys, "trace", "--prompts", setup["folder"] / "prompts.txt", "--out", out,
                            *setup["args"], *extra)  # fmt: skip
    assert code == 0, err
    return stdout


@pytest.fixture(scope="module")
def single(setup):
    """The batch traced in this process, once for the module (its own capsys-free run)."""
    from modelrecon.circuits.batch import TraceOptions, TraceSource, read_batch_prompts, trace_batch

    out = setup["folder"] / "single"
    source = TraceSource(setup["model"], setup["transcoders"])
    with pytest.MonkeyPatch.context() as patch:  # without `ray=`, Ray is never imported: here it cannot be
        patch.setitem(sys.modules, "ray", None)
        summary = trace_batch(source, read_batch_prompts(setup["folder"] / "prompts.txt"), out,
                              TraceOptions(max_feature_nodes=30, check_features=4), progress=False)  # fmt: skip
    return out, summary


def test_trace_computes_the_clean_run_once_and_equals_the_steps_it_replaces(setup, monkeypatch):
    from modelrecon.circuits import trace

    model = setup["model"]
    rm = ReplacementModel(model, setup["transcoders"])
    calls = []
    clean = rm.clean
    monkeypatch.setattr(rm, "clean", lambda ids: calls.append(ids) or clean(ids))
    traced = trace(model, PROMPTS[0], rm, max_feature_nodes=30, check_features=4, progress=False)
    assert len(calls) == 1 and traced.level == "features" and traced.rm is rm
    monkeypatch.undo()
    # the steps `modelrecon trace` took before: attribute, a second clean run for the check, prune
    graph = attribute(model, PROMPTS[0], rm, max_feature_nodes=30, progress=False)
    check = causal_check(rm, rm.clean(graph.token_ids), graph, n_features=4)
    assert [n.id for n in traced.graph.nodes] == [n.id for n in graph.nodes]
    assert torch.equal(traced.graph.weights, graph.weights)
    assert traced.check.to_dict() == check.to_dict() and traced.pruned.metadata["causal_check"] == check.to_dict()
    assert [n.id for n in traced.pruned.nodes] == [n.id for n in prune_graph(graph).nodes]
    components = trace(model, PROMPTS[1], None, check_features=2)
    assert components.level == "components" and components.check.what == "components"
    assert components.pruned.metadata["causal_check"]["count"] == 2


def _same_graph(path_a, path_b):
    a, b = load_graph(path_a), load_graph(path_b)
    assert a.prompt == b.prompt and [n.id for n in a.nodes] == [n.id for n in b.nodes]
    assert _close([n.activation for n in a.nodes], [n.activation for n in b.nodes])
    assert torch.equal(a.sources, b.sources) and torch.equal(a.targets, b.targets) and len(a.weights) > 0
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-4, atol=1e-6)
    for key in ("causal_check", "pruning", "targets"):
        assert json.dumps(a.metadata[key], sort_keys=True) == json.dumps(b.metadata[key], sort_keys=True) or (
            _close(a.metadata[key], b.metadata[key])
        ), key


def _close(x, y):
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, float):
        return x == pytest.approx(y, rel=1e-4, abs=1e-6, nan_ok=True)
    return x == y


def test_a_batch_writes_every_graph_and_a_summary_and_resumes(setup, single, capsys):
    from modelrecon.circuits import trace

    out, summary = single
    assert summary.complete and summary.model == setup["model"].name and summary.level == "features"
    data = json.loads((out / "summary.json").read_text())
    assert data["complete"] and data["prompts_total"] == 3 and data["options"]["max_feature_nodes"] == 30
    rows = data["prompts"]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["index"] for r in rows] == [0, 1, 2]
    for i, r in enumerate(rows):
        assert r["path"] == f"{i:04d}/graph.json" and (out / r["path"]).is_file()
        assert r["status"] == "traced" and r["seconds"] > 0 and r["edge_check_error"] < 1e-3
        assert 0 < r["pruned_nodes"] <= r["nodes"] and 0 < r["pruned_edges"] <= r["edges"]
        assert r["causal_top_change"] is not None and isinstance(r["causal_agrees"], bool)
    with open(out / "summary.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [t["prompt"] for t in table] == PROMPTS and table[2]["path"] == "0002/graph.json"
    assert float(table[1]["nodes"]) == rows[1]["nodes"]
    # each file is the graph `trace` gives for its prompt
    traced = trace(setup["model"], PROMPTS[2], setup["transcoders"], max_feature_nodes=30, check_features=4,
                   progress=False)  # fmt: skip
    graph = load_graph(out / "0002" / "graph.json")
    assert [n.id for n in graph.nodes] == [n.id for n in traced.pruned.nodes]
    assert _close(graph.metadata["causal_check"], traced.check.to_dict())

    # resume (through the CLI): only the prompt whose graph is missing is traced again; the rest keep their files
    (out / "0001" / "graph.json").unlink()
    before = {i: (out / f"{i:04d}" / "graph.json").stat().st_mtime_ns for i in (0, 2)}
    stdout = _batch(capsys, setup, out)
    assert "traced 1 prompt(s), 2 already done" in stdout and "summary.csv" in stdout
    assert before == {i: (out / f"{i:04d}" / "graph.json").stat().st_mtime_ns for i in (0, 2)}
    again = json.loads((out / "summary.json").read_text())["prompts"]
    assert [r["status"] for r in again] == ["resumed", "traced", "resumed"]
    assert again[0]["seconds"] == rows[0]["seconds"]  # a resumed row keeps its time from the previous summary
    assert [r["nodes"] for r in again] == [r["nodes"] for r in rows]


def test_a_ray_batch_writes_every_file_and_the_same_graphs(setup, single, capsys, ray_cluster):
    out = setup["folder"] / "ray"
    stdout = _batch(capsys, setup, out, "--ray", "local", "--workers", "2")
    assert "2 Ray worker(s)" in stdout and "traced 3 prompt(s), 0 already done" in stdout
    rows = json.loads((out / "summary.json").read_text())["prompts"]
    reference = json.loads((single[0] / "summary.json").read_text())["prompts"]
    assert [r["path"] for r in rows] == [r["path"] for r in reference]
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/graph.json")) == [r["path"] for r in rows]
    for row, ref in zip(rows, reference, strict=True):
        _same_graph(out / row["path"], single[0] / ref["path"])
        same = [k for k in row if k not in ("seconds", "status")]  # the reference was resumed by the test above
        assert _close({k: row[k] for k in same}, {k: ref[k] for k in same})
    assert not list(out.glob("*/.graph.json*"))  # no temporary file left behind
    # resumed on Ray: nothing left to do, no worker started
    stdout = _batch(capsys, setup, out, "--ray", "local")
    assert "traced 0 prompt(s), 3 already done" in stdout


def test_graph_eval_on_ray_gives_the_same_report(setup, tmp_path, capsys, ray_cluster):
    from modelrecon.circuits.batch import TraceSource
    from modelrecon.circuits.evaluate import EvalPrompt, evaluate_batch, evaluate_graphs

    model, transcoders = setup["model"], setup["transcoders"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": "e", "kind": k, "subject": s}) + "\n"
                            for p, k, s in [(PROMPTS[0], "a", "cat"), (PROMPTS[1], "b", None)]))  # fmt: skip
    args = ("--prompts", path, "--model", setup["args"][1], "--transcoders", setup["args"][3], "--max-features", "30",
            "--check-features", "4")  # fmt: skip
    code, _, err = cli(capsys, "graph-eval", "--json", tmp_path / "one.json", *args)
    assert code == 0, err
    code, _, err = cli(capsys, "graph-eval", "--json", tmp_path / "ray.json", *args, "--ray", "local", "--workers", "2")
    assert code == 0, err
    one, on_ray = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ray"))
    assert [r["prompt"] for r in on_ray["prompts"]] == PROMPTS[:2] and on_ray["model"] == one["model"]
    assert _close(on_ray, one) and one["average"]["prompts"] == 2 and set(one["by_kind"]) == {"a", "b"}
    # the Python API ships an in-memory model (ray.put) to the workers: the same rows as evaluate_graphs
    prompts = [EvalPrompt(PROMPTS[2], "e")]
    rm = ReplacementModel(model, transcoders)
    here = evaluate_graphs(model, rm, prompts, max_feature_nodes=30, check_features=4, progress=False).to_dict()
    there = evaluate_batch(TraceSource(model, rm), prompts, max_feature_nodes=30, check_features=4, progress=False,
                           ray="local", workers=1).to_dict()  # fmt: skip
    assert there["model"] == model.name and _close(there["prompts"], here["prompts"])


@pytest.mark.parametrize(
    "name,text,message",
    [("p.jsonl", '{"prompt": "The cat"}\nnot json\n', "p.jsonl line 2 is not JSON"),
     ("p.jsonl", '{"prompt": "The cat"}\n\n{"text": "x"}\n', 'p.jsonl line 3: each line needs a non-empty "prompt"'),
     ("p.jsonl", '{"prompt": "The cat", "target": "ab"}\n', "p.jsonl line 1: target 'ab' is 2 tokens"),
     ("p.jsonl", '{"prompt": "The cat", "wrong": "a"}\n', 'p.jsonl line 1: a logit-difference target needs "target"'),
     ("p.txt", "\n\n", "holds no prompts"), ("p.csv", "a\n", "unknown format '.csv'")],
)  # fmt: skip
def test_bad_prompt_files_are_one_line_errors(setup, tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    code, _, err = cli(capsys, "trace", "--prompts", tmp_path / name, "--out", tmp_path / "out", *setup["args"])
    assert_one_line_error(code, err, message)
    assert not list(tmp_path.glob("out/*/graph.json"))


def test_batch_arguments_are_checked(setup, single, tmp_path, capsys):
    prompts = setup["folder"] / "prompts.txt"
    for argv, message in [
        (("trace", "The cat", "--prompts", prompts, "--out", tmp_path / "x"), "either a PROMPT or --prompts"),
        (("trace", "--out", tmp_path / "x"), "either a PROMPT or --prompts"),
        (("trace", "--prompts", prompts), "give --out DIR"),
        (("trace", "The cat", "--out", tmp_path / "x", "--ray", "local"), "give --prompts FILE"),
        (("trace", "--prompts", prompts, "--out", tmp_path / "x", "--workers", "2"), "--workers needs --ray"),
        (("trace", "--prompts", prompts, "--out", tmp_path / "x", "--counterfactual", "The dog"), "in the JSONL"),
    ]:
        code, _, err = cli(capsys, *argv, *setup["args"])
        assert_one_line_error(code, err, message)
    # a batch folder whose graph is of another prompt (the file changed) is refused, not silently mixed
    out = tmp_path / "changed"
    (out / "0000").mkdir(parents=True)
    single = setup["folder"] / "single" / "0001" / "graph.json"
    (out / "0000" / "graph.json").write_text(single.read_text())
    code, _, err = cli(capsys, "trace", "--prompts", prompts, "--out", out, *setup["args"])
    assert_one_line_error(code, err, "holds a graph of 'A dog ran'", "prompts.txt line 1")
