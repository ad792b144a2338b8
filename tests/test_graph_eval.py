"""Graph quality (graph-eval): scores computed by hand on a small graph, the causal check's tolerance with a planted
miss, the prompt file's errors, and the command end to end on the tiny model."""

import json

import pytest
import torch

from modelrecon.circuits.attribute import attribute
from modelrecon.circuits.check import CausalCheck, causal_check
from modelrecon.circuits.evaluate import graph_quality, read_prompts, subject_positions
from modelrecon.circuits.graph import Graph, Node
from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.dictionaries.formats import save_dictionaries
from modelrecon.errors import BadInputError

from conftest import assert_one_line_error, cli
from test_circuits import PROMPT, _transcoders
from tiny import tiny_model


def _hand_graph() -> Graph:
    """emb 'A' -> logit (1); emb 'B' -> feature (3) -> logit (2); error -> feature (1); emb 'B' -> logit (-1)."""
    nodes = [Node("embedding", 0, feature=10, token="A"), Node("embedding", 1, feature=11, token="B"),
             Node("feature", 1, 0, 5, activation=2.0, token="B"), Node("error", 1, 0, token="B"),
             Node("logit", 1, feature=7, activation=1.0, token="C")]  # fmt: skip
    edges = [(0, 4, 1.0), (1, 2, 3.0), (3, 2, 1.0), (2, 4, 2.0), (1, 4, -1.0)]
    s, t, w = zip(*edges, strict=True)
    return Graph("AB", ["A", "B"], [10, 11], "hand", nodes, torch.tensor(s), torch.tensor(t), torch.tensor(w))


def test_graph_quality_equals_the_scores_worked_out_by_hand():
    # B (|w| normalised per target): logit <- A .25, feature .5, B .25; feature <- B .75, error .25.
    # Influence: A .25, B .25 + .5 x .75 = .625, feature .5, error .5 x .25 = .125.
    q = graph_quality(_hand_graph(), subject=[1])
    assert q.replacement == pytest.approx(0.875 / 1.0)  # inputs .875, errors .125
    # completeness: (I + w) weighted share not from errors: 1 - (.5 x .25) / (1 + .5 + .25 + .625 + .125)
    assert q.completeness == pytest.approx(1 - 0.125 / 2.5)
    assert q.error_share == pytest.approx(0.125 / (0.125 + 0.5))
    assert q.through_features == pytest.approx(1 - 0.5 / 0.875)  # direct: A .25 and B .25 of .875
    assert [t for t, _ in q.top_inputs] == ["B", "A"]
    assert q.top_inputs[0][1] == pytest.approx(0.625 / 0.875)
    assert q.subject_share == pytest.approx(0.625 / 0.875) and q.subject_top
    assert not graph_quality(_hand_graph(), subject=[0]).subject_top


def _check(measured: float, predicted: float) -> CausalCheck:
    return CausalCheck("x", "features", 10, "m", measured, [0.0], predicted, [0.0])


def test_causal_check_agrees_only_within_its_factor_sign_included():
    miss = _check(-3.77, -0.78)  # the case the issue found: a 5x miss used to be called agreement
    assert not miss.agrees and miss.accounted == pytest.approx(0.78 / 3.77)
    assert "accounts for 21% of the change" in miss.summary()
    assert _check(-2.6, -2.0).agrees and _check(-2.0, -2.9).agrees  # within 1.5x either way
    assert not _check(-2.0, -3.1).agrees and "x the change" in _check(-2.0, -3.1).summary()
    assert not _check(2.0, -2.0).agrees and "opposite sign" in _check(2.0, -2.0).summary()
    assert _check(0.01, -0.02).agrees  # both negligible


def test_causal_check_catches_a_planted_miss_in_the_graph():
    """The same graph with its edges into the logit scaled down five-fold (every path ends with one) predicts a fifth
    of what it did: the check measures the model, so it says the graph now accounts for a fifth as much."""
    model = tiny_model("llama")
    rm = ReplacementModel(model, _transcoders(model))
    graph = attribute(model, PROMPT, rm, max_logits=1, max_feature_nodes=10**6, progress=False)
    clean = rm.clean(graph.token_ids)
    honest = causal_check(rm, clean, graph, n_features=5)
    into_logit = graph.targets == graph.logit_nodes()[0]
    graph.weights = torch.where(into_logit, graph.weights * 0.2, graph.weights)
    planted = causal_check(rm, clean, graph, n_features=5)
    assert planted.top_change == pytest.approx(honest.top_change)  # the model is the same
    assert planted.top_predicted == pytest.approx(0.2 * honest.top_predicted, rel=1e-4)
    assert planted.accounted == pytest.approx(0.2 * honest.accounted, rel=1e-4)
    assert not planted.agrees and abs(planted.top_change) > 0.05


def test_subject_positions_cover_the_subject_tokens():
    tokens = ["The", " Eiff", "el", " Tower", " is", " in"]
    assert subject_positions(tokens, "The Eiffel Tower is in", "Eiffel Tower") == [1, 2, 3]
    assert subject_positions(tokens, "The Eiffel Tower is in", "Tower") == [3]


def test_shipped_prompts_are_many_and_of_every_kind():
    prompts = read_prompts()
    assert len(prompts) >= 40
    assert {p.kind for p in prompts} >= {"factual", "multi-hop", "ioi", "induction", "arithmetic", "opposites"}
    assert all(p.subject in p.prompt for p in prompts if p.subject)


@pytest.mark.parametrize(
    "text,message",
    [("not json\n", "is not JSON"), ('{"prompt": "a"}\n', "needs \"prompt\" and \"answer\""),
     ('{"prompt": "a b", "answer": " c", "subject": "z"}\n', "is not in the prompt"), ("\n", "has no prompts")],
)  # fmt: skip
def test_bad_prompt_files_are_one_line_errors(tmp_path, capsys, text, message, tiny_llama_folder):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(BadInputError, match=message):
        read_prompts(path)
    out = tmp_path / "out.json"
    code, _, err = cli(capsys, "graph-eval", "--prompts", path, "--json", out, "--model", tiny_llama_folder,
                       "--transcoders", tmp_path)  # fmt: skip
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_graph_eval_command_reports_every_prompt_and_the_average(tmp_path, capsys, tiny_llama_folder):
    model = tiny_model("llama")
    save_dictionaries(_transcoders(model), tmp_path / "tc")
    answer = model.tokenizer.decode(model.encode(PROMPT)[1:2])  # one token of the tiny tokenizer
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": PROMPT, "answer": answer, "kind": "factual", "subject": "cat"}) + "\n"
                    + json.dumps({"prompt": "The dog ran", "answer": answer}) + "\n")  # fmt: skip
    code, stdout, err = cli(capsys, "graph-eval", "--prompts", path, "--json", tmp_path / "r.json", "--model",
                          tiny_llama_folder, "--transcoders", tmp_path / "tc", "--max-features", "50")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["prompts"]
    assert [r["prompt"] for r in rows] == [PROMPT, "The dog ran"]
    for r in rows:
        assert 0 <= r["replacement"] <= 1 and 0 <= r["completeness"] <= 1 and len(r["top_inputs"]) == 3
        assert r["edge_check_error"] < 1e-3 and "accounted" in r["causal"]
    assert rows[0]["subject_share"] is not None and rows[1]["subject_share"] is None
    assert report["average"]["replacement"] == pytest.approx((rows[0]["replacement"] + rows[1]["replacement"]) / 2)
    assert report["average"]["subject_share"] == pytest.approx(rows[0]["subject_share"])
