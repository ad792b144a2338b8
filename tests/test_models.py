"""Loading: local folders, GGUF de-quantization cache, adapters' errors."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import modelrecon as mr
from modelrecon.errors import BadModelFileError, OfflineError, UnknownModelError, UnsupportedArchitectureError
from modelrecon.models import loading

from conftest import PROMPTS
from tiny import char_tokenizer, tiny_hf, tiny_model


def test_local_folder_loads_to_identical_logits(tmp_path):
    m = tiny_model("qwen3")
    m.hf.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    again = mr.load(tmp_path)
    assert again.source["kind"] == "folder"
    assert torch.equal(mr.run(again, PROMPTS[0]).logits[0], mr.run(m, PROMPTS[0]).logits[0])


@pytest.fixture
def fake_gguf_reader(monkeypatch, tmp_path):
    """Stand-in for transformers' GGUF reader (the real one is exercised by the smollm2 tests): counts its calls."""
    monkeypatch.setenv("MODELRECON_CACHE", str(tmp_path / "cache"))
    calls = []

    def read(gguf):
        calls.append(Path(gguf).read_bytes())
        return tiny_hf("llama"), char_tokenizer()

    monkeypatch.setattr(loading, "_check_gguf", lambda gguf: None)
    monkeypatch.setattr(loading, "_read_gguf", read)
    return calls


def test_gguf_is_converted_once_and_cached_by_content(tmp_path, fake_gguf_reader):
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"weights-one")
    first, second = mr.load(gguf), mr.load(gguf)
    assert len(fake_gguf_reader) == 1
    assert torch.equal(mr.run(first, "abc").logits[0], mr.run(second, "abc").logits[0])
    assert first.source["gguf_sha256"] == loading.sha256_of([gguf])
    gguf.write_bytes(b"weights-two")  # same path, new content: a new cache entry
    mr.load(gguf)
    assert len(fake_gguf_reader) == 2
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2


def test_split_gguf_hashes_like_the_whole_file(tmp_path):
    (tmp_path / "whole").write_bytes(b"0123456789" * 1000)
    (tmp_path / "p1").write_bytes(b"0123456789" * 400)
    (tmp_path / "p2").write_bytes(b"0123456789" * 600)
    assert loading.sha256_of([tmp_path / "p1", tmp_path / "p2"]) == loading.sha256_of([tmp_path / "whole"])


def test_interrupted_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELRECON_CACHE", str(tmp_path / "cache"))
    hf = tiny_hf("llama")

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "save_pretrained", interrupted_save)
    monkeypatch.setattr(loading, "_check_gguf", lambda gguf: None)
    monkeypatch.setattr(loading, "_read_gguf", lambda gguf: (hf, char_tokenizer()))
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"weights")
    with pytest.raises(KeyboardInterrupt):
        mr.load(gguf)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no entry, no partial folder


def test_garbage_gguf_is_a_bad_model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELRECON_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(BadModelFileError, match="corrupt or not a supported GGUF"):
        mr.load(bad)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_name_resolution_errors(tmp_path, monkeypatch):
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'.*smollm2-135m"):
        mr.load("no-such-model")
    with pytest.raises(BadModelFileError, match="no config.json"):
        mr.load(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OfflineError, match="hub cannot be reached"):
        mr.load("someone/some-model")


def test_unknown_architecture_names_what_is_missing():
    config = AutoConfig.for_model(
        "opt",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        vocab_size=50,
        word_embed_proj_dim=16,
    )
    with pytest.raises(UnsupportedArchitectureError, match="no adapter for model_type 'opt'.*model.layers.*ADAPTERS"):
        mr.Model(AutoModelForCausalLM.from_config(config), char_tokenizer())


def test_known_architecture_with_missing_module_names_it():
    hf = tiny_hf("llama")
    del hf.model.layers[0].mlp
    with pytest.raises(
        UnsupportedArchitectureError, match="lacks modules .*: model.layers.0.mlp, model.layers.0.mlp.down_proj"
    ):
        mr.Model(hf, char_tokenizer())


def test_tokenize_pads_and_positions():
    m = tiny_model("llama")
    batch = m.tokenize(["abcd", "ab"], padding_side="left")
    assert batch.starts == [0, 2] and batch.lengths == [4, 2]
    assert batch.position_ids[1].tolist() == [0, 0, 0, 1]
    assert batch.attention_mask[1].tolist() == [0, 0, 1, 1]
    assert m.str_tokens(batch.tokens(1)) == ["a", "b"]
