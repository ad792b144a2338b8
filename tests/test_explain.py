"""Feature explanations: ground truth from planted features (one that fires on one token, one on a token class, one
at a position) on a real cube, the scorers against their controls, causal scoring by steering, the explanations
file (resume, labels in graph and dashboards, Neuronpedia export) and the command's one-line errors."""

import json

import numpy as np
import pytest

from modelrecon.circuits.attribute import attribute
from modelrecon.circuits.graph_file import save_graph
from modelrecon.circuits.prune import prune_graph
from modelrecon.circuits.replacement import ReplacementModel
from modelrecon.cube.capture import capture
from modelrecon.dictionaries.formats import save_dictionaries
from modelrecon.explain.dashboards import feature_dashboards, graph_features, save_dashboards
from modelrecon.explain.examples import examples_from_activations, split_prompts
from modelrecon.explain.explainers import explain_features
from modelrecon.explain.lexical import lexical_explanation, read_explanation
from modelrecon.explain.scoring import causal_score, score_explanation
from modelrecon.explain.store import label_trace, load_explanations, to_neuronpedia

from conftest import assert_one_line_error, cli
from test_viewer import _transcoders

TEXTS = [
    "the quick fox saw 3 quiet ducks at 9 and 41 more",
    "a queen met 7 people on day 12 of the quest",
    "we had 5 cups of tea and 2 cakes at noon",
    "quite a few birds sang at 6 in the morning",
    "my quilt has 8 squares and 30 stitches",
    "the bus left at 4 and came back at 11",
    "an old queue of 20 cars waited near the quay",
    "she read 15 pages of the book before 10",
    "he jumped 3 times and laughed quietly",
    "the sum of 6 and 7 is 13 for sure",
    "quick quiz: what is 9 plus 1",
    "they sold 25 apples and 14 pears today",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_folder):
    from modelrecon import load

    folder = tmp_path_factory.mktemp("explain")
    model = load(str(tiny_llama_folder))
    cube = capture(model, TEXTS, folder / "cube.zarr", sites=["layers.*.mlp.in"], dtype="float32", progress=False)
    transcoders = _transcoders(model)
    save_dictionaries(transcoders, folder / "dict")
    return {"folder": folder, "model": model, "cube": cube, "rm": ReplacementModel(model, transcoders),
            "dict": folder / "dict", "model_folder": tiny_llama_folder}  # fmt: skip


def _planted(cube):
    """Activations known by construction: 0 fires on "q", 1 on digits, 2 at position 0 (varying strengths)."""
    table = cube.token_table()
    texts, positions = list(table["text"]), np.asarray(table["position"])
    strength = 1.0 + np.random.default_rng(0).random(len(texts))
    acts = np.zeros((len(texts), 3), dtype=np.float32)
    acts[:, 0] = [s if t == "q" else 0.0 for t, s in zip(texts, strength, strict=True)]
    acts[:, 1] = [s if t.isdigit() else 0.0 for t, s in zip(texts, strength, strict=True)]
    acts[:, 2] = np.where(positions == 0, strength, 0.0)
    return examples_from_activations(cube, {0: ([0, 1, 2], acts)}, window=4)


def test_examples_are_split_by_prompt_and_negatives_are_silent(setup):
    cube = setup["cube"]
    train, test = split_prompts(cube.n_prompts)
    assert train and test and not train & test and train | test == set(range(cube.n_prompts))
    for ex in _planted(cube).values():
        assert ex.train and ex.test_active
        assert {w.prompt for w in ex.train} <= train
        assert {w.prompt for w in ex.test_active + ex.test_random + ex.test_similar} <= test
        assert all(w.value > 0 for w in ex.test_active)
        assert all(max(w.acts) == 0 for w in ex.test_random + ex.test_similar)
    # a feature on word-initial "a" only: the similar negatives are silent windows around other "a"s
    table = cube.token_table()
    texts = list(table["text"])
    initial = np.array([t == "a" and (i == 0 or texts[i - 1] == " ") for i, t in enumerate(texts)], dtype=np.float32)
    ex = examples_from_activations(cube, {1: ([7], initial[:, None])}, window=2)[(1, 7)]
    assert ex.test_similar and all("a" in w.tokens and max(w.acts) == 0 for w in ex.test_similar)


def test_lexical_explainer_names_the_planted_tokens_class_and_position(setup):
    examples = _planted(setup["cube"])
    token, digits, position = (lexical_explanation(examples[(0, f)]) for f in range(3))
    assert read_explanation(token).names == {"q"}, token
    assert "digits" in digits and read_explanation(digits).digits, digits
    assert read_explanation(digits).names <= set("0123456789"), digits
    assert "position 0" in position and read_explanation(position).positions == {0}, position


@pytest.mark.parametrize("scorer", ["detection", "fuzzing", "simulation"])
def test_lexical_scorers_rank_the_true_explanation_above_the_controls(setup, scorer):
    examples = _planted(setup["cube"])
    explanations = {f: lexical_explanation(examples[(0, f)]) for f in range(3)}
    for f in range(3):
        for other in set(range(3)) - {f}:
            score = score_explanation(scorer, explanations[f], explanations[other], examples[(0, f)])
            assert score.score is not None and score.control is not None
            assert score.score > score.control + 0.2, (scorer, f, other, score)
        if scorer != "simulation":
            assert score_explanation(scorer, explanations[f], explanations[f], examples[(0, f)]).score >= 0.9


def test_an_llm_style_explanation_is_read_from_its_words():
    reading = read_explanation("The letter <<q>> at the start of words like 'queen'")
    assert reading.matches("q", 5) and reading.matches("queen", 1) and not reading.matches("the", 0)
    free = read_explanation("Mentions of numbers and dates")
    assert free.digits and free.matches("7", 3) and free.matches("dates", 1) and not free.matches("cat", 2)


def test_causal_score_prefers_what_the_feature_writes(setup):
    """Steering a last-layer feature raises the tokens its decoder promotes more than the ones it suppresses."""
    rm, cube, model = setup["rm"], setup["cube"], setup["model"]
    layer = rm.n_layers - 1
    ex = examples_from_activations(cube, {layer: ([3], np.ones((cube.n_tokens, 1), dtype=np.float32) * 4.0)})
    ex = ex[(layer, 3)]
    from modelrecon.explain.dashboards import _decoder_direction

    effect = model.hf.get_output_embeddings().weight.detach() @ _decoder_direction(rm, layer, 3)
    up, down = (model.tokenizer.decode([int(i)]) for i in (effect.argmax(), effect.argmin()))
    cleans = [rm.clean(model.encode(text)) for text in TEXTS[:3]]
    score = causal_score(rm, ex, f"promotes {json.dumps(up)}", f"promotes {json.dumps(down)}", cleans)
    assert score.n == 3 and score.score > 0 > score.control, score


def test_explain_features_resumes_and_labels_a_trace(setup, tmp_path):
    rm, cube, model = setup["rm"], setup["cube"], setup["model"]
    graph = prune_graph(attribute(model, TEXTS[0][:20], rm, max_feature_nodes=30, progress=False))
    trace = tmp_path / "trace"
    trace.mkdir()
    save_graph(graph, trace / "graph.json")
    save_dashboards(feature_dashboards(rm, graph_features(graph), cube), trace / "features.json")
    features = graph_features(graph)
    assert len(features) >= 3
    out = trace / "explanations.json"
    first = explain_features(rm, cube, features[:2], out, scorers=["detection", "simulation", "causal"],
                             progress=False)  # fmt: skip
    assert len(first["features"]) == 2
    written = load_explanations(out)
    before = {k: v["explanation"] for k, v in written["features"].items()}
    document = explain_features(rm, cube, features, out, scorers=["detection", "simulation", "causal"], progress=False)
    assert len(document["features"]) == len(features)
    assert all(document["features"][k]["explanation"] == v for k, v in before.items())  # kept, not redone
    for feature in document["features"].values():
        assert set(feature["scores"]) == {"detection", "simulation", "causal"}
    nodes, dashboards = label_trace(document, trace)
    assert nodes >= len(features) and dashboards == len(features)
    saved = json.loads((trace / "graph.json").read_text())
    clerps = {(n["mr_layer"], n["mr_index"]): n["clerp"] for n in saved["nodes"]
              if n["feature_type"] == "cross layer transcoder"}  # fmt: skip
    key = features[0]
    assert clerps[key] == document["features"][f"{key[0]}_{key[1]}"]["explanation"]
    boards = json.loads((trace / "features.json").read_text())["features"]
    assert boards[f"{key[0]}_{key[1]}"]["explanation"] == clerps[key]
    assert "detection" in boards[f"{key[0]}_{key[1]}"]["explanation_scores"]
    records = to_neuronpedia(document)
    assert {r["index"] for r in records} == {str(f) for _, f in features} and records[0]["description"]


def test_explain_command_and_its_one_line_errors(setup, capsys, tmp_path, tiny_gpt2_folder):
    folder, model_folder = setup["folder"], str(setup["model_folder"])
    base = ["explain", "--model", model_folder, "--dict", setup["dict"], "--cube", folder / "cube.zarr"]
    out = tmp_path / "e.json"
    code, stdout, _ = cli(capsys, *base, "--features", "0/1,2/5", "--out", out, "--scorers", "detection,fuzzing")
    assert code == 0 and "2 features explained by lexical" in stdout
    assert set(load_explanations(out)["features"]) == {"0_1", "2_5"}
    assert_one_line_error(*cli(capsys, *base, "--out", out)[::2], "--features")
    assert_one_line_error(*cli(capsys, *base, "--features", "0:1", "--out", out)[::2], "LAYER/FEATURE")
    assert_one_line_error(*cli(capsys, *base, "--features", "0/99", "--out", out)[::2], "not in the dictionary")
    assert_one_line_error(*cli(capsys, *base, "--features", "0/1", "--scorers", "vibes", "--out", out)[::2], "scorer")
    other = capture(__import__("modelrecon").load(str(tiny_gpt2_folder)), TEXTS[:2], tmp_path / "other.zarr",
                    sites=["layers.*.mlp.in"], dtype="float32", progress=False)  # fmt: skip
    mismatch = [a if a != folder / "cube.zarr" else other.path for a in base]
    assert_one_line_error(*cli(capsys, *mismatch, "--features", "0/1", "--out", tmp_path / "m.json")[::2],
                          "captured on")  # fmt: skip
    assert not (tmp_path / "m.json").exists()
    unreachable = ["--explainer", "openai:http://127.0.0.1:9/v1#m", "--timeout", "0.5"]
    code, _, err = cli(capsys, *base, "--features", "0/1", *unreachable, "--out", tmp_path / "u.json")
    assert_one_line_error(code, err, "cannot reach")
    no_chat = ["--explainer", f"local:{model_folder}"]  # the tiny model's tokenizer has no chat template
    assert_one_line_error(*cli(capsys, *base, "--features", "0/1", *no_chat, "--out", tmp_path / "c.json")[::2],
                          "cannot chat")  # fmt: skip
    assert not (tmp_path / "u.json").exists() and not (tmp_path / "c.json").exists()


def test_llm_simulation_scores_a_judge_that_names_the_right_tokens(setup):
    """A white-box judge (answers known by construction: it names the numbered tokens that are the character the
    explanation quotes) through the LLM simulation scorer: the true explanation correlates, the control does not, and
    a judge that answers nonsense scores 0."""
    import re

    from modelrecon.explain.llm import ChatClient, Completion
    from modelrecon.explain.prompts import parse_token_numbers

    class QuotingJudge(ChatClient):
        def _complete(self, messages, max_tokens, temperature, logprobs):
            text = messages[-1]["content"]
            quoted = re.findall(r'"(.)"', text.split("\n\n")[0])
            lines = re.findall(r"^(\d+): '(.*)'$", text, flags=re.M)
            hits = [n for n, token in lines if token.strip() in quoted]
            return Completion(", ".join(hits) or "None", None)

    class Nonsense(ChatClient):
        def _complete(self, messages, max_tokens, temperature, logprobs):
            return Completion("I think the feature is interesting.", None)

    assert parse_token_numbers("3, 7 and 12", 10) == {3, 7}
    ex = _planted(setup["cube"])[(0, 0)]  # fires on "q"
    score = score_explanation("simulation", 'fires on "q"', 'fires on "z"', ex, judge=QuotingJudge("oracle", None))
    assert score.judge == "oracle" and score.score > 0.8 and abs(score.control) < 0.1
    assert score_explanation("simulation", 'fires on "q"', 'fires on "z"', ex, judge=Nonsense("no", None)).score == 0
