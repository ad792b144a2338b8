"""The default corpus: sources read from a fake install root (no apt, no network), deduplication, atomic writing,
the readers of the user's own text, and the fixed-length token chunks that training consumes."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelrecon.corpus import SAMPLE_CORPUS, build_corpus, default_corpus, read_texts, token_stream
from modelrecon.corpus import build as build_module
from modelrecon.corpus.sources import kjv_chapters
from modelrecon.errors import BadInputError
from modelrecon.groundtruth.build import word_tokenizer

REPEATED = "The same quotation, long enough to count as a paragraph, printed twice."


def fake_root(tmp_path):
    """Fortune cookies and WordNet glosses laid out where apt would put them. REPEATED is a cookie twice, and
    the gloss of "thing" is another cookie but for case and line breaks."""
    root = tmp_path / "root"
    fortunes = root / "usr/share/games/fortunes"
    fortunes.mkdir(parents=True)
    cookies = [REPEATED, "A short one.", "Two lines\nof verse.", REPEATED, "THING:\n" + REPEATED.upper()]
    (fortunes / "sayings").write_text("\n%\n".join(cookies) + "\n%\n")
    (fortunes / "sayings.dat").write_bytes(b"\0binary index")
    wordnet = root / "usr/share/wordnet"
    wordnet.mkdir(parents=True)
    (wordnet / "data.noun").write_text(
        "  1 This header line is the licence and is skipped.\n"
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which exists\n"
        "00002137 03 n 02 abstraction 0 abstract_entity 0 000 | a general concept; " + REPEATED + "\n"
        "00002452 03 n 01 thing 0 000 | " + REPEATED + "\n"
    )
    return root


def vocabulary_tokenizer(texts, special=True):
    """A word-level tokenizer over the words of `texts`, with <bos>/<eos> when `special`."""
    words = sorted({w for text in texts for w in text.split()})
    tokenizer = word_tokenizer(["<bos>", "<eos>", *words])
    if special:
        tokenizer.bos_token, tokenizer.eos_token = "<bos>", "<eos>"
    return tokenizer


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_reads_sources_and_drops_repeated_paragraphs(tmp_path):
    meta = build_corpus(tmp_path / "out", ["fortunes", "wordnet"], root=fake_root(tmp_path), progress=False)
    records = lines(tmp_path / "out/corpus.jsonl")
    paragraphs = [p for r in records for p in r["text"].split("\n\n")]
    assert paragraphs.count(REPEATED) == 1
    assert "thing: " + REPEATED not in paragraphs  # the fortunes were read first: their copy stays
    assert "entity: that which exists" in paragraphs
    assert "abstraction, abstract entity: a general concept; " + REPEATED in paragraphs  # not equal: kept
    assert "Two lines\nof verse." in paragraphs
    assert not any("licence" in p or "binary" in p for p in paragraphs)
    assert {r["source"] for r in records} == {"fortunes", "wordnet"}
    assert meta["sources"]["fortunes"]["duplicate_paragraphs_dropped"] == 1
    assert meta["sources"]["wordnet"]["duplicate_paragraphs_dropped"] == 1
    assert json.loads((tmp_path / "out/corpus.json").read_text()) == meta


def test_metadata_shares_sum_to_one_and_name_licences(tmp_path):
    root = fake_root(tmp_path)
    texts = [
        t for s in ("fortunes", "wordnet") for t in build_module.SOURCES[s].extract(build_module.SOURCES[s].files(root))
    ]
    meta = build_corpus(tmp_path / "out", ["fortunes", "wordnet"], tokenizer=vocabulary_tokenizer(texts), root=root)
    sources = meta["sources"].values()
    assert sum(s["share_characters"] for s in sources) == pytest.approx(1, abs=1e-5)
    assert sum(s["share_tokens"] for s in sources) == pytest.approx(1, abs=1e-5)
    assert meta["tokens"] == sum(s["tokens"] for s in sources) > 0
    assert meta["characters"] == sum(len(r["text"]) for r in lines(tmp_path / "out/corpus.jsonl"))
    assert all(s["licence"] and s["kind"] in ("prose", "technical") for s in sources)
    assert meta["modelrecon_version"] and meta["created"]


def test_failed_build_leaves_the_previous_corpus_untouched(tmp_path, monkeypatch):
    root, out = fake_root(tmp_path), tmp_path / "out"
    build_corpus(out, ["fortunes", "wordnet"], root=root, progress=False)
    before = (out / "corpus.jsonl").read_text()

    class Interrupted(Exception):
        pass

    calls = []

    def tokenizer(texts, add_special_tokens):
        calls.append(texts)
        if len(calls) == 2:  # after the first document was written
            raise Interrupted
        return {"input_ids": [[0] for _ in texts]}

    monkeypatch.setattr(build_module, "TOKENIZE_BATCH", 1)
    with pytest.raises(Interrupted):
        build_corpus(out, ["fortunes", "wordnet"], tokenizer=tokenizer, seed=1, root=root, progress=False)
    assert (out / "corpus.jsonl").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "corpus.jsonl"]  # no temporary left behind

    fresh = tmp_path / "fresh"
    with pytest.raises(Interrupted):
        calls.clear()
        build_corpus(fresh, ["fortunes", "wordnet"], tokenizer=tokenizer, root=root, progress=False)
    assert list(fresh.iterdir()) == []


def test_max_tokens_keeps_a_mixed_prefix(tmp_path):
    root = fake_root(tmp_path)
    full = build_corpus(tmp_path / "full", ["fortunes", "wordnet"], tokenizer=lambda t, **_: _ones(t), root=root)
    capped = build_corpus(tmp_path / "cap", ["fortunes", "wordnet"], 3, tokenizer=lambda t, **_: _ones(t), root=root)
    assert capped["tokens"] == 3 < full["tokens"]
    assert lines(tmp_path / "cap/corpus.jsonl") == lines(tmp_path / "full/corpus.jsonl")[:3]


def test_default_corpus_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELRECON_CACHE", str(tmp_path / "cache"))
    root = fake_root(tmp_path)
    folder = default_corpus(3, lambda t, **_: _ones(t), root=root, progress=False)
    assert folder.parent == tmp_path / "cache/corpus" and len(lines(folder / "corpus.jsonl")) == 3
    written = (folder / "corpus.json").stat().st_mtime_ns
    assert default_corpus(3, None, root=tmp_path / "nothing-installed-here") == folder  # cached: sources not read
    assert (folder / "corpus.json").stat().st_mtime_ns == written
    with pytest.raises(BadInputError, match="no corpus source is installed"):
        default_corpus(4, lambda t, **_: _ones(t), root=tmp_path / "nothing-installed-here", progress=False)


def _ones(texts):
    return {"input_ids": [[7] for _ in texts]}  # one token per document


def test_mix_interleaves_sources_in_proportion_to_their_text():
    mixed = build_module.mix({"a": ["x" * 10] * 50, "b": ["y" * 40] * 10, "c": ["z" * 5] * 100}, seed=0)
    first_third = [name for name, _ in mixed[: len(mixed) // 3]]
    assert {name: first_third.count(name) for name in "abc"} == pytest.approx({"a": 18, "b": 3, "c": 33}, abs=3)
    assert sorted(mixed) == sorted(
        build_module.mix({"c": ["z" * 5] * 100, "a": ["x" * 10] * 50, "b": ["y" * 40] * 10}, 0)
    )


def test_missing_named_source_names_the_install_command(tmp_path):
    with pytest.raises(BadInputError, match="apt-get install bible-kjv"):
        build_corpus(tmp_path / "out", ["kjv"], root=tmp_path, progress=False)
    with pytest.raises(BadInputError, match="unknown corpus source nope"):
        build_corpus(tmp_path / "out", ["nope"], root=tmp_path, progress=False)
    with pytest.raises(BadInputError, match="no corpus source is installed"):
        build_corpus(tmp_path / "out", root=tmp_path, progress=False)


def test_kjv_verses_are_grouped_into_chapters():
    dump = "Ge1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\n1Sa1:1 Now there was.\n"
    assert list(kjv_chapters(dump)) == ["In the beginning.\nAnd the earth.", "Thus the heavens.", "Now there was."]


def test_read_texts_from_txt_jsonl_parquet_folder_and_sample(tmp_path):
    (tmp_path / "own.txt").write_text("First document,\nstill first.\n\n\nSecond document.\n")
    assert list(read_texts(tmp_path / "own.txt")) == ["First document,\nstill first.", "Second document."]
    (tmp_path / "own.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert list(read_texts(tmp_path / "own.jsonl")) == ["one", "two"]
    pq.write_table(pa.table({"text": ["a", None, "b"], "n": [1, 2, 3]}), tmp_path / "own.parquet")
    assert list(read_texts(tmp_path / "own.parquet")) == ["a", "b"]
    build_corpus(tmp_path / "built", ["fortunes"], root=fake_root(tmp_path), progress=False)
    assert list(read_texts(tmp_path / "built")) == [r["text"] for r in lines(tmp_path / "built/corpus.jsonl")]

    sample = list(read_texts("sample"))
    assert len(sample) > 20 and SAMPLE_CORPUS.stat().st_size < 400_000
    meta = json.loads(SAMPLE_CORPUS.with_suffix(".json").read_text())
    assert {s["kind"] for s in meta["sources"].values()} == {"prose", "technical"}
    assert meta["documents"] == len(sample)


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (None, "missing.jsonl", "no text at"),
        ("{}\n", "notext.jsonl", 'line 1 has no string field "text"'),
        ("not json\n", "bad.jsonl", "line 1 is not JSON"),
        ("x", "data.csv", "unknown file type"),
        ("not parquet", "bad.parquet", "as Parquet"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, content, name, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(BadInputError, match=message) as error:
        list(read_texts(tmp_path / name))
    assert "\n" not in str(error.value)


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(BadInputError, match='no column "text" .*body'):
        list(read_texts(tmp_path / "t.parquet"))


@pytest.mark.parametrize("special", [True, False], ids=["bos-eos", "plain"])
def test_token_stream_chunks_are_the_concatenation_cut_to_length(special):
    texts = ["the cat sat on the mat", "a dog", "and then the cat ran off into the night again"]
    tokenizer = vocabulary_tokenizer(texts, special)
    chunks = list(token_stream(iter(texts), tokenizer, context_length=5))
    assert chunks and all(len(c) == 5 for c in chunks)
    separator = [tokenizer.eos_token_id] if special else []
    expected = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"] + separator]
    if special:
        assert all(c[0] == tokenizer.bos_token_id for c in chunks)
        chunks = [c[1:] for c in chunks]
    flat = [i for c in chunks for i in c]
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < len(chunks[0])


def test_token_stream_rejects_a_context_without_room():
    with pytest.raises(BadInputError, match="context_length 1"):
        next(token_stream(["a b"], vocabulary_tokenizer(["a b"]), context_length=1))


def test_cli_info_prints_the_sample_sources():
    from typer.testing import CliRunner

    from modelrecon.cli.corpus import corpus_app

    result = CliRunner().invoke(corpus_app, ["info", "sample"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in ("kjv", "wordnet", "python-doc", "PSF-2.0"))
