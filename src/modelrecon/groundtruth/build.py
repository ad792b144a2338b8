"""Writing a white-box task model as an ordinary Hugging Face folder (config, safetensors, tokenizer), so that it is
loaded by `modelrecon.load` like any other model and the whole toolkit runs on it unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from modelrecon.files import atomic_folder
from modelrecon.models.loading import cache_root


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word; `<pad>` and `<unk>` first."""
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")


def write_task_model(
    name: str, model_type: str, config: dict, weights: dict[str, torch.Tensor], words: list[str]
) -> Path:
    """The folder of a hand-set model (built once, cached by content under the modelrecon cache).

    weights: parameter name -> value for every parameter that is set by hand; all others are zero.
    """
    digest = hashlib.sha256(json.dumps([model_type, config, words], sort_keys=True).encode())
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().to(torch.float32).contiguous().numpy().tobytes())
    folder = cache_root() / "groundtruth" / f"{name}-{digest.hexdigest()[:16]}"
    if (folder / "config.json").exists():
        return folder
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    state = hf.state_dict()
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise KeyError(f"{name}: no parameters {unknown} in a {model_type} model")
    with torch.no_grad():
        for key, value in state.items():
            value.copy_(weights[key] if key in weights else torch.zeros_like(value))
    with atomic_folder(folder, shared="config.json") as temp:  # another process may build the same task at once
        hf.save_pretrained(temp)
        word_tokenizer(words).save_pretrained(temp)
    return folder
