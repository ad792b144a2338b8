"""`Model`: a Hugging Face causal LM, its tokenizer and its adapter, with sites and batching.

The wrapped `hf` model is never modified: modelrecon reads and writes its internals only through hooks
(`modelrecon.hooks`), so a forward pass through `Model` is the model's own forward pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from modelrecon.errors import BadInputError
from modelrecon.models.adapters import Adapter, adapter_for
from modelrecon.models.sites import SITE_DOCS, all_site_names, parse_site, resolve_sites


@dataclass
class Batch:
    """Prompts tokenized and padded to one tensor.

    Prompt `i`'s real tokens sit at `starts[i] : starts[i] + lengths[i]` of its row; the rest is padding.
    `position_ids` count real tokens only, so left padding gives the same positions as running alone.
    """

    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos], 1 for real tokens
    position_ids: torch.Tensor  # [batch, pos]
    starts: list[int]
    lengths: list[int]
    padding_side: str = "right"

    @property
    def size(self) -> int:
        return len(self.lengths)

    def real(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i] + self.lengths[i])

    def tokens(self, i: int) -> torch.Tensor:
        return self.input_ids[i, self.real(i)]


@dataclass(frozen=True)
class SiteInfo:
    name: str
    shape: tuple  # dims are ints or names: "batch", "pos", "q", "k"
    doc: str


@dataclass(eq=False)
class Model:
    """A loaded language model. Build it with `modelrecon.load(...)` or `Model(hf_model, tokenizer)`."""

    hf: nn.Module
    tokenizer: object
    name: str = "model"
    source: dict = field(default_factory=dict)  # provenance: where the weights came from, their hash, ...
    # A prompt longer than the context is an error unless this is set: then it keeps its first `context_length`
    # tokens (the CLI's --truncate). Never silent: positions past the context were never trained.
    truncate_prompts: bool = False
    adapter: Adapter = field(init=False)

    def __post_init__(self) -> None:
        self.hf.eval()
        self.hf.requires_grad_(False)  # gradients flow to activations only, never to weights
        self.adapter = adapter_for(self.hf)
        config = self.hf.config
        self.n_layers = len(self.layers)
        self.d_model = int(config.hidden_size)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.d_head = _in_features(self.layer_module(0, self.adapter.o_proj)) // self.n_heads
        self.d_mlp = _in_features(self.layer_module(0, self.adapter.down_proj))
        self.vocab_size = int(self.hf.get_output_embeddings().weight.shape[0])
        self.has_resid_mid = not self.adapter.parallel_residual(config)
        self._site_names = all_site_names(self.n_layers, self.has_resid_mid)

    # --- modules -------------------------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.get_submodule(self.adapter.layers)

    def module(self, path: str) -> nn.Module:
        return self.hf.get_submodule(path)

    def layer_module(self, layer: int, path: str) -> nn.Module:
        return self.layers[layer].get_submodule(path)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    # --- sites ---------------------------------------------------------------------------------------------------
    def site_names(self) -> list[str]:
        return list(self._site_names)

    def resolve_sites(self, patterns: str | list[str] | tuple[str, ...]) -> list[str]:
        return resolve_sites(patterns, self._site_names)

    def site_shape(self, name: str) -> tuple:
        """Shape of a site's tensor inside the forward pass (what an edit function receives)."""
        kind = parse_site(name).kind
        if kind == "attn.pattern":
            return ("batch", self.n_heads, "q", "k")
        if kind in ("attn.heads", "attn.q"):
            return ("batch", "pos", self.n_heads, self.d_head)
        if kind in ("attn.k", "attn.v"):
            return ("batch", "pos", self.n_kv_heads, self.d_head)
        if kind == "mlp.neurons":
            return ("batch", "pos", self.d_mlp)
        if kind == "logits":
            return ("batch", "pos", self.vocab_size)
        return ("batch", "pos", self.d_model)

    def sites(self) -> list[SiteInfo]:
        return [SiteInfo(n, self.site_shape(n), SITE_DOCS[parse_site(n).kind]) for n in self._site_names]

    # --- tokens --------------------------------------------------------------------------------------------------
    def encode(self, prompt: str, truncate_to: int | None = None) -> list[int]:
        """Token ids of a prompt, cut to `truncate_to` tokens when given (or to the context with truncate_prompts);
        a prompt still longer than the model's context is a BadInputError."""
        check_prompt(prompt)
        ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise BadInputError(f"prompt {prompt!r} gives no tokens; give some text")
        if truncate_to is None and self.truncate_prompts:
            truncate_to = self.context_length
        ids = ids[:truncate_to]
        preview = prompt[:40] + "..." if len(prompt) > 40 else prompt
        self.check_length(len(ids), f"prompt {preview!r}")
        return ids

    def tokenize(self, prompts: str | list[str], padding_side: str = "right") -> Batch:
        """Tokenize one prompt or a list of prompts into a padded batch."""
        if padding_side not in ("left", "right"):
            raise BadInputError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise BadInputError("no prompts given: pass a prompt or a non-empty list of prompts")
        return self.batch_from_ids([self.encode(p) for p in prompts], padding_side)

    def batch_from_ids(self, token_ids: list[list[int]], padding_side: str = "right") -> Batch:
        lengths = [len(ids) for ids in token_ids]
        width = max(lengths)
        self.check_length(width, "a token sequence", "shorten it (or lower --context-length)")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        position_ids = torch.zeros((len(token_ids), width), dtype=torch.long)
        starts = []
        for i, ids in enumerate(token_ids):
            start = width - len(ids) if padding_side == "left" else 0
            starts.append(start)
            input_ids[i, start : start + len(ids)] = torch.tensor(ids)
            attention_mask[i, start : start + len(ids)] = 1
            position_ids[i, start : start + len(ids)] = torch.arange(len(ids))
        device = self.device
        return Batch(
            input_ids.to(device), attention_mask.to(device), position_ids.to(device), starts, lengths, padding_side
        )

    @property
    def context_length(self) -> int | None:
        """The most tokens one sequence may have: the positions the model was trained on (None when unknown)."""
        value = getattr(self.hf.config, "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else None

    def check_length(self, n_tokens: int, what: str = "a prompt", fix: str = "") -> None:
        """A one-line BadInputError when `n_tokens` is more than the model's context, before any forward pass."""
        limit = self.context_length
        if limit is not None and n_tokens > limit:
            raise BadInputError(
                f"{what} has {n_tokens:,} tokens and {self.name} was trained on at most {limit:,} positions; "
                f"{fix or f'shorten it, or cut it explicitly: --truncate (capture: --context-length {limit})'}"
            )

    def str_tokens(self, ids: list[int] | torch.Tensor) -> list[str]:
        return [self.tokenizer.decode([int(t)]) for t in ids]

    # --- the plain forward pass ----------------------------------------------------------------------------------
    def forward(self, batch: Batch, logits: bool = True, last_only: bool = False) -> torch.Tensor:
        """The model's own forward pass on a batch: logits `[batch, pos, vocab]`.

        With logits=False only the base model runs (no unembedding): it returns the `final` residual stream
        `[batch, pos, d_model]`, which is all a capture that records no `logits` needs.
        With last_only the model unembeds only the last column (`[batch, 1, vocab]`, transformers'
        `logits_to_keep=1`): every prompt's last token when the batch is left-padded or unpadded.
        """
        inputs = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        if logits:
            if last_only:
                if batch.padding_side != "left" and len(set(batch.lengths)) > 1:
                    raise BadInputError("last_only needs a left-padded batch when prompts differ in length")
                return self.hf(**inputs, logits_to_keep=1).logits
            return self.hf(**inputs).logits
        return self.hf.base_model(**inputs).last_hidden_state

    def unembed(self, resid: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """Logits from residual-stream vectors `[..., d_model]` the way the model makes them: its final norm (unless
        `normed`), its unembedding and any final soft-capping (Gemma 2)."""
        x = resid if normed else self.module(self.adapter.final_norm)(resid)
        logits = self.hf.get_output_embeddings()(x)
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    # --- provenance ----------------------------------------------------------------------------------------------
    def weights_sha256(self) -> str:
        """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): the identity of these weights."""
        if "weights_sha256" not in self.source:
            digest = hashlib.sha256()
            for name, tensor in self.hf.state_dict().items():
                tensor = tensor.detach().cpu().contiguous()
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
                digest.update(memoryview(tensor.view(torch.uint8).reshape(-1).numpy()))
            self.source["weights_sha256"] = digest.hexdigest()
        return self.source["weights_sha256"]

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, family={self.adapter.family}, layers={self.n_layers}, d_model={self.d_model}, "
            f"heads={self.n_heads}x{self.d_head}, d_mlp={self.d_mlp}, vocab={self.vocab_size})"
        )


def check_prompt(prompt: object) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInputError("empty prompt: give at least one non-blank character of text")


def answer_tokens(model: Model, answer: str) -> list[int]:
    """Token ids of an answer as it continues a prompt (include its leading space, e.g. " Paris")."""
    ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BadInputError(f"answer {answer!r} gives no tokens; give some text")
    return list(ids)


def single_token(model: Model, text: str, what: str = "answer") -> int:
    """The one token id of `text` (an answer or target); `what` names it in the error for a multi-token text."""
    ids = answer_tokens(model, text)
    if len(ids) != 1:
        raise BadInputError(
            f"{what} {text!r} is {len(ids)} tokens {model.str_tokens(ids)}; give a single-token {what} with its "
            "leading space (or score a multi-token answer with answer_logprob on the prompt + answer)"
        )
    return ids[0]


def _in_features(linear_like: nn.Module) -> int:
    # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
    if hasattr(linear_like, "in_features"):
        return int(linear_like.in_features)
    return int(linear_like.weight.shape[0])
