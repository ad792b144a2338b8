"""Sparse dictionaries: SAEs, transcoders, skip transcoders and cross-layer transcoders, as one module.

A dictionary reads activations `x` at one or more input sites and predicts activations `y` at output sites through
sparse latents `f`:

    f_l = act(x_l @ W_enc[l] + b_enc[l])                              (per input layer l)
    y_m = sum over l <= m of f_l @ W_dec[l][m - l] + b_dec[m]  (+ x_m @ W_skip[m] for skip transcoders)

- `sae`: input site = output site, one layer; the encoder reads `x - b_dec` (SAELens' `apply_b_dec_to_input`).
- `transcoder`: e.g. `layers.L.mlp.in` -> `layers.L.mlp.out`; `skip-transcoder` adds a linear skip path.
- `clt` (cross-layer transcoder): an encoder per layer, decoders from each layer to itself and every later layer.

A *stack* (`Dictionary.stack`, `stacked=True`) is several per-layer dictionaries of one shape held as one: every
parameter gets a leading layer axis and each layer's latents decode to their own layer only, so training all layers is
a few batched products instead of a loop over layers (`unstack` gives the per-layer dictionaries back).

Activation functions (`act`): `relu` (trained with an L1 penalty), `topk`, `batchtopk` (top k x batch over the batch
while training; at inference a threshold estimated during training, as for JumpReLU), `jumprelu` (a learned
threshold per latent, trained through a straight-through estimator). Input and output normalisation constants
are folded into the weights when saving (`fold_normalisation`), so a saved dictionary reads raw activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from modelrecon.errors import BadInputError

KINDS = ("sae", "transcoder", "skip-transcoder", "clt")
ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")


@dataclass(frozen=True)
class DictionaryConfig:
    kind: str
    d_in: int
    d_out: int
    width: int  # latents per layer
    activation: str = "topk"
    k: int | None = 32  # topk / batchtopk: active latents per token
    input_sites: tuple[str, ...] = ()  # one per layer, e.g. ("layers.3.mlp.in",)
    output_sites: tuple[str, ...] = ()  # one per layer (a clt writes to each of them from every earlier layer)
    jumprelu_bandwidth: float = 0.05  # the straight-through estimator's window (in normalised units)
    provenance: dict = field(default_factory=dict)  # model, its weights' sha256, tokens, corpus, seed, recipe ...
    stacked: bool = False  # per-layer dictionaries held as one for training (never saved so: `unstack` first)

    @property
    def n_layers(self) -> int:
        return len(self.input_sites)

    def check(self) -> DictionaryConfig:
        if self.kind not in KINDS:
            raise BadInputError(f"unknown dictionary kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise BadInputError(f"unknown activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.activation in ("topk", "batchtopk") and not (self.k and 0 < self.k <= self.width):
            raise BadInputError(f"{self.activation} needs 0 < k <= width, got k={self.k} for width {self.width}")
        if len(self.input_sites) != len(self.output_sites) or not self.input_sites:
            raise BadInputError("a dictionary needs one input and one output site per layer")
        if self.kind != "clt" and self.n_layers != 1 and not self.stacked:
            raise BadInputError(f"a {self.kind} reads one layer; use --kind clt for several")
        if self.kind == "sae" and (self.input_sites != self.output_sites or self.d_in != self.d_out):
            raise BadInputError("an SAE reconstructs its own site: the input and output sites must be the same")
        return self

    def to_dict(self) -> dict:
        if self.stacked:
            raise BadInputError("a stacked dictionary is a training form; unstack it before saving")
        out = {**asdict(self), "input_sites": list(self.input_sites), "output_sites": list(self.output_sites)}
        del out["stacked"]
        return out

    def layer(self, i: int) -> DictionaryConfig:
        """A stack's config of its layer `i` alone."""
        return replace(self, input_sites=self.input_sites[i : i + 1], output_sites=self.output_sites[i : i + 1],
                       stacked=False)  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> DictionaryConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(f"unknown dictionary config fields {unknown}; is this a modelrecon dictionary?")
        data = {**data, "input_sites": tuple(data.get("input_sites", ())),
                "output_sites": tuple(data.get("output_sites", ()))}  # fmt: skip
        return cls(**data).check()


class Dictionary(nn.Module):
    """A sparse dictionary (see the module docstring). Tensors are `[..., layer, d]` for several layers, or `[..., d]`
    for one."""

    def __init__(self, config: DictionaryConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config.check()
        n, c = config.n_layers, config
        self.W_enc = nn.Parameter(torch.zeros(n, c.d_in, c.width, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, c.width, dtype=dtype))
        # W_dec[l] holds the decoders from layer l to layers l..n-1 (one for per-layer dictionaries); a stack holds
        # one `[layer, width, d_out]`, each layer's decoders to itself.
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(n, c.width, c.d_out, dtype=dtype))] if c.stacked else
            [nn.Parameter(torch.zeros(c.width, n - i, c.d_out, dtype=dtype)) for i in range(n)]
        )  # fmt: skip
        self.b_dec = nn.Parameter(torch.zeros(n, c.d_out, dtype=dtype))
        self.W_skip = (
            nn.Parameter(torch.zeros(n, c.d_in, c.d_out, dtype=dtype)) if c.kind == "skip-transcoder" else None
        )
        # jumprelu: log of the learned threshold; batchtopk: the inference threshold (a buffer, estimated in training)
        self.log_threshold = (
            nn.Parameter(torch.full((n, c.width), -3.0, dtype=dtype)) if c.activation == "jumprelu" else None
        )
        self.register_buffer("threshold", torch.zeros(n, c.width, dtype=dtype))
        self.register_buffer("input_scale", torch.ones(n, dtype=dtype))  # normalisation, 1 once folded
        self.register_buffer("output_scale", torch.ones(n, dtype=dtype))

    # --- the forward computation ---------------------------------------------------------------------------------
    def _layered(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """`[..., d]` -> `[..., 1, d]` for a one-layer dictionary; returns whether it was squeezed."""
        if self.config.n_layers == 1 and (x.dim() == 1 or x.shape[-2] != 1):
            return x.unsqueeze(-2), True
        return x, False

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._layered(x)
        x = x * self.input_scale[:, None]
        if self.config.kind == "sae":
            x = x - self.b_dec  # both in normalised units (an SAE's input and output scales are the same)
        return torch.einsum("...ld,ldw->...lw", x, self.W_enc) + self.b_enc

    def encode(self, x: torch.Tensor, training: bool = False) -> torch.Tensor:
        """Latent activations `[..., layer, width]` (or `[..., width]` for one layer given `[..., d]`)."""
        x, squeezed = self._layered(x)
        f = self.activate(self.pre_activations(x), training)
        return f.squeeze(-2) if squeezed else f

    def activate(self, pre: torch.Tensor, training: bool = False) -> torch.Tensor:
        act, k = self.config.activation, self.config.k
        if act == "relu":
            return torch.relu(pre)
        if act == "jumprelu":
            return jump_relu(pre, self.log_threshold.exp(), self.config.jumprelu_bandwidth)
        if act == "topk":
            top = self.top_latents(pre)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        if act == "batchtopk" and training:
            relu = torch.relu(pre)
            flat = relu.movedim(-2, 0).reshape(relu.shape[-2], -1)  # per layer: every token's latents
            keep = min(flat.shape[1], k * (flat.shape[1] // relu.shape[-1]))
            top = flat.topk(keep, dim=-1)
            out = torch.zeros_like(flat).scatter(-1, top.indices, top.values)
            return out.reshape(relu.movedim(-2, 0).shape).movedim(0, -2)
        return pre * (pre > self.threshold)  # batchtopk at inference

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs `[..., layer, d_out]` from latents (and, for skip transcoders, the input `x`)."""
        f, squeezed = self._layered(f) if f.shape[-1] == self.config.width else (f, False)
        return self._decoded(self.latent_product(f), x, squeezed)

    def latent_product(self, f: torch.Tensor) -> torch.Tensor:
        """`[..., layer, d_out]`: latents `f [..., layer, width]` times the decoders (no bias, no skip path, in
        normalised units); output layer m gets the decoders of input layers 0..m."""
        n = self.config.n_layers
        if self.config.stacked:
            return torch.einsum("...lw,lwd->...ld", f, self.W_dec[0])
        return torch.stack([sum(f[..., i, :] @ self.W_dec[i][:, m - i] for i in range(m + 1)) for m in range(n)], -2)

    def top_latents(self, pre: torch.Tensor) -> torch.return_types.topk:
        """TopK's active latents per token and layer: `indices` and `values`, `[..., layer, k]` (values >= 0)."""
        return torch.relu(pre).topk(self.config.k, dim=-1)

    def decode_top(self, indices: torch.Tensor, values: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """`decode` of latents given as each token's active ones (`[..., layer, k]`, from `top_latents`): the
        decoder rows are gathered instead of multiplied by a mostly-zero `f`, k/width of the work (training)."""
        return self._decoded(self.latent_sum(indices, values), x, squeezed=False)

    def latent_sum(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`latent_product` of latents given by index: sum of value x decoder row. Input layer i writes to output
        layers i..n-1: one gather of its rows, flattened. Faster than the product only for few latents (16 of 512:
        about 4x, forward and backward, fp32 on two cores; half of them: slower)."""
        lead, (n, k), d = indices.shape[:-2], indices.shape[-2:], self.config.d_out
        if self.config.stacked:  # one gather over every layer's rows: layer l's latents are rows l x width + i
            w = self.W_dec[0]
            rows = indices + torch.arange(n, device=indices.device)[:, None] * self.config.width
            part = nn.functional.embedding_bag(rows.reshape(-1, k), w.flatten(0, 1), mode="sum",
                                               per_sample_weights=values.reshape(-1, k).to(w.dtype))  # fmt: skip
            return part.view(*lead, n, d)
        out = 0
        for i, w in enumerate(self.W_dec):
            rows, weights = indices[..., i, :].reshape(-1, k), values[..., i, :].reshape(-1, k).to(w.dtype)
            part = nn.functional.embedding_bag(rows, w.flatten(1), mode="sum", per_sample_weights=weights)
            out = out + nn.functional.pad(part.view(*lead, n - i, d), (0, 0, i, 0))
        return out

    def _decoded(self, y: torch.Tensor, x: torch.Tensor | None, squeezed: bool) -> torch.Tensor:
        """The latents' part `y` (`[..., layer, d_out]`, normalised units) plus the bias and skip path, in raw units."""
        y = y + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise BadInputError("a skip transcoder's decode needs the input x for its skip path")
            xl, _ = self._layered(x)
            y = y + torch.einsum("...ld,lde->...le", xl * self.input_scale[:, None], self.W_skip)
        y = y / self.output_scale[:, None]
        return y.squeeze(-2) if squeezed else y

    def forward(self, x: torch.Tensor, training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction or prediction, latents), shaped like `x` and `encode(x)`."""
        f = self.encode(x, training)
        return self.decode(f, x), f

    # --- set-up and saving ----------------------------------------------------------------------------------------
    def decoder_norms(self) -> torch.Tensor:
        """`[layer, width]`: each latent's decoder norm (over every layer it writes to)."""
        if self.config.stacked:
            return self.W_dec[0].norm(dim=-1)
        return torch.stack([w.flatten(1).norm(dim=1) for w in self.W_dec])

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Unit-norm decoder rows (over every output layer of a latent); the encoder is unaffected."""
        if self.config.stacked:
            self.W_dec[0].div_(self.W_dec[0].norm(dim=-1, keepdim=True).clamp_min(1e-8))
            return
        for w in self.W_dec:
            w.div_(w.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None])

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> None:
        """Unit-norm random decoder rows, the encoder their transpose (tied init), the decoder bias at the mean output,
        and normalisation scales that give inputs and outputs a mean squared distance of d from their mean (`x`, `y`:
        `[tokens, layer, d]` samples). A stack initialises each layer as that layer's own dictionary would."""
        if self.config.stacked:
            layers = [Dictionary(self.config.layer(i), self.b_enc.dtype) for i in range(self.config.n_layers)]
            for i, d in enumerate(layers):
                d.initialise(x[:, i : i + 1], y[:, i : i + 1], seed)
            self._copy_layers(layers)
            return
        generator = torch.Generator().manual_seed(seed)
        c = self.config
        # Scales from the spread around the mean, not the raw norm: a constant offset (an attention sink's massive
        # activation) would otherwise shrink everything else to nothing.
        self.input_scale.copy_((c.d_in / (x - x.mean(0)).pow(2).sum(-1).mean(0).clamp_min(1e-12)).sqrt())
        self.output_scale.copy_((c.d_out / (y - y.mean(0)).pow(2).sum(-1).mean(0).clamp_min(1e-12)).sqrt())
        for w in self.W_dec:
            w.copy_(torch.randn(w.shape, generator=generator, dtype=w.dtype))
        self.normalise_decoder()
        for layer in range(c.n_layers):
            diagonal = self.W_dec[layer][:, 0]  # the decoder to its own layer
            untied = torch.randn(c.d_in, c.width, generator=generator) / c.d_in**0.5
            self.W_enc[layer].copy_(diagonal.T if c.d_in == c.d_out else untied)
        self.b_dec.copy_((y * self.output_scale[:, None]).mean(0))
        if self.W_skip is not None:
            self.W_skip.zero_()

    @torch.no_grad()
    def fold_normalisation(self) -> Dictionary:
        """A copy that reads and writes raw activations with scales 1 (what is saved). An SAE's encoder reads
        `x - b_dec`, which folds exactly only when its input and output scales agree (they do when trained)."""
        if self.config.kind == "sae" and not torch.equal(self.input_scale, self.output_scale):
            raise BadInputError("this SAE has different input and output scales, so they cannot be folded; retrain it")
        out = Dictionary(self.config, self.b_enc.dtype)
        out.load_state_dict(self.state_dict())
        s_in, s_out = self.input_scale, self.output_scale
        out.W_enc.copy_(self.W_enc * s_in[:, None, None])  # an SAE's (s x - b) W = (x - b / s)(s W): b_dec below
        for layer, w in enumerate(out.W_dec):
            w.copy_(self.W_dec[layer] / s_out[layer:, None][None])
        out.b_dec.copy_(self.b_dec / s_out[:, None])
        if out.W_skip is not None:
            out.W_skip.copy_(self.W_skip * (s_in / s_out)[:, None, None])
        out.input_scale.fill_(1.0)
        out.output_scale.fill_(1.0)
        return out

    @classmethod
    def stack(cls, dictionaries: list[Dictionary]) -> Dictionary:
        """Per-layer dictionaries of one shape as one stacked dictionary (the module docstring)."""
        c = dictionaries[0].config
        sites = {"input_sites": sum((d.config.input_sites for d in dictionaries), ()),
                 "output_sites": sum((d.config.output_sites for d in dictionaries), ())}  # fmt: skip
        if c.kind == "clt" or any(replace(d.config, **sites) != replace(c, **sites) for d in dictionaries):
            raise BadInputError("only per-layer dictionaries of one kind, shape and activation can be stacked")
        out = cls(replace(c, **sites, stacked=True), dictionaries[0].b_enc.dtype)
        out._copy_layers(dictionaries)
        return out

    @torch.no_grad()
    def _copy_layers(self, layers: list[Dictionary]) -> None:
        for name, value in self.state_dict().items():
            if name == "W_dec.0":
                value.copy_(torch.stack([d.W_dec[0][:, 0] for d in layers]))
            else:
                value.copy_(torch.cat([d.state_dict()[name] for d in layers]))

    @torch.no_grad()
    def unstack(self) -> list[Dictionary]:
        """A stack's per-layer dictionaries (copies)."""
        out = []
        for i in range(self.config.n_layers):
            d = Dictionary(self.config.layer(i), self.b_enc.dtype)
            for name, value in d.state_dict().items():
                mine = self.state_dict()[name]
                value.copy_(mine[i][:, None] if name == "W_dec.0" else mine[i : i + 1])
            out.append(d)
        return out

    def with_config(self, **changes) -> Dictionary:
        out = Dictionary(replace(self.config, **changes), self.b_enc.dtype)
        out.load_state_dict(self.state_dict())
        return out


class _JumpReLU(torch.autograd.Function):
    """f = pre * H(pre - threshold). The threshold's gradient uses a rectangle kernel of width `bandwidth` around it
    (straight-through, Rajamanoharan et al. 2024); `pre` gets the ordinary gradient where the latent is on."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre)
        grad_threshold = -(threshold / ctx.bandwidth) * near * grad
        while grad_threshold.dim() > threshold.dim():
            grad_threshold = grad_threshold.sum(0)
        return grad * (pre > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre - threshold), with the same straight-through gradient for the threshold (the L0 penalty's)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(pre)
        grad_threshold = -(1.0 / ctx.bandwidth) * near * grad
        while grad_threshold.dim() > threshold.dim():
            grad_threshold = grad_threshold.sum(0)
        return torch.zeros_like(pre), grad_threshold, None


def jump_relu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _Step.apply(pre, threshold, bandwidth)
