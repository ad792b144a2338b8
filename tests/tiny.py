"""Tiny random models of every supported family, built in memory (no file, no network), with a character tokenizer."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from modelrecon import Model

_CHARS = list(string.ascii_letters + string.digits + string.punctuation + " ")
VOCAB = {"<pad>": 0, "<unk>": 1, "<bos>": 2, **{c: i + 3 for i, c in enumerate(_CHARS)}}


def char_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")


_COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=len(VOCAB),
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=2,
)
FAMILY_CONFIGS = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=5),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=8),
    "gemma": dict(_COMMON, head_dim=8),
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(
        _COMMON, head_dim=8, sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"]
    ),
    "phi3": dict(_COMMON),
    "gpt2": dict(
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_inner=48,
        vocab_size=len(VOCAB),
        n_positions=128,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "gpt_neox": dict({k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}, use_parallel_residual=True),
    "gpt_neox_sequential": dict(
        {k: v for k, v in _COMMON.items() if k != "num_key_value_heads"}, use_parallel_residual=False
    ),
}
FAMILIES = list(FAMILY_CONFIGS)


def tiny_hf(family: str, seed: int = 0, **overrides):
    config = AutoConfig.for_model(family.removesuffix("_sequential"), **{**FAMILY_CONFIGS[family], **overrides})
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Default init gives near-constant outputs; these weights give O(1)-O(10) activations that differ per token.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif "norm" in name or "ln" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.1)
    return hf.eval()


def tiny_model(family: str, seed: int = 0, **overrides) -> Model:
    return Model(tiny_hf(family, seed, **overrides), char_tokenizer(), name=f"tiny-{family}")


def save_tiny_model(folder, family: str, seed: int = 0):
    """Write a tiny model and its tokenizer as a Hugging Face folder (what `modelrecon --model FOLDER` loads)."""
    model = tiny_model(family, seed)
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder
