"""The frozen replacement model's backward pass, written out: the rows of the attribution graph.

With attention patterns, norm scales and feature activations frozen, the replacement model is linear in its sources
(token embeddings, feature activations, error terms), so a target's direct effects are one vector-Jacobian product:
the gradient at each source times the source's value. `Jacobian` applies the transposed model layer by layer from the
clean run's frozen quantities and the model's own weights. Compared with autograd through a batched forward pass it
needs no forward pass at all, keeps nothing of one alive, and a batch of targets that all sit at positions <= p
only touches positions 0..p (attention is causal), which is why `attribute` batches its targets by position.

Written out, the pass knows every layer layout the replacement model accepts: RMS or layer norms (frozen, a layer
norm's centring folded into the maps it feeds), separate or fused q/k/v projections, a norm on attention's output
(Gemma 2/3) and the parallel residual of GPT-NeoX and Pythia (attention and MLP both read the layer's input).
`check_edges` holds it to the unmodified model: it moves every source by its own random factor at once, runs the
hooked replacement model forward, and each target must change by the sum of factor x edge weight over its edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelrecon.circuits.replacement import CleanRun, ReplacementModel
from modelrecon.hooks.attention import FrozenAttention
from modelrecon.models.weights import Norm, linear_weight, norm, output_weight, value_weight


@dataclass(frozen=True)
class Target:
    """A row of the graph: a logit (`token` id) or a feature's pre-activation (`layer`, `position`, `feature`)."""

    kind: str  # "logit" | "feature"
    token: int | None = None
    wrong: int | None = None  # a logit-difference target: logit(token) - logit(wrong)
    layer: int | None = None
    position: int | None = None
    feature: int | None = None


@dataclass
class _Layer:
    """One layer's frozen linear maps, with the norms' gains and scales folded in where they commute."""

    value: torch.Tensor  # [kv_heads * d_head, d]: v_proj times the attention norm's gain (and its centring)
    out: torch.Tensor  # [d, heads * d_head]: o_proj
    pattern: torch.Tensor | None  # [kv_heads, group * q, k]: the frozen pattern times the norm's scale at k (kept)
    attention: FrozenAttention  # what the pattern is recomputed from when it is not kept
    key_scale: torch.Tensor  # [pos]: the attention norm's frozen scale at each key position
    mlp_norm: Norm
    mlp_scale: torch.Tensor  # [pos, 1]: the MLP norm's frozen 1/rms
    attn_out: tuple[Norm, torch.Tensor] | None  # a norm on attention's output and its frozen scale [pos, 1]
    skip: torch.Tensor | None  # [d_out, d_in]: a skip transcoder's linear path, transposed
    writes: list[tuple[int, torch.Tensor]]  # (source layer i, the decoder from i's features [width (+ pos), d])


class Jacobian:
    """The transposed replacement model of one prompt (see the module docstring)."""

    def __init__(self, rm: ReplacementModel, clean: CleanRun, pattern_bytes: int | None = None) -> None:
        model = rm.model
        self.rm, self.clean = rm, clean
        self.parallel = not model.has_resid_mid
        self.heads, self.kv_heads, self.d_head = model.n_heads, model.n_kv_heads, model.d_head
        # Per layer and position, the sources a layer's MLP output feeds: its active features (padded to a common
        # count k) and, last, its error node, which enters as one more decoder row (the error vector, value 1).
        self.device = device = clean.embed.device  # everything below lives on the model's device
        self.slots, self.values = [], []  # [pos, k + 1]: rows of the layer's extended decoder, and their values
        for f in clean.features:
            latents, valid = active_per_position(f)
            pos, width = f.shape
            self.slots.append(torch.cat([latents, width + torch.arange(pos, device=device)[:, None]], 1))
            self.values.append(torch.cat([f.float().gather(-1, latents) * valid, torch.ones(pos, 1, device=device)], 1))
        frozen, scales = rm.norms, [s.float() for s in clean.norm_scales]
        pos = len(clean.ids)
        # Short prompts keep every layer's pattern (the fastest); long ones recompute blocks of rows as needed, so
        # memory grows with the prompt, not with its square times the layers.
        if pattern_bytes is None:  # a quarter of the free memory (1 GiB where it cannot be read)
            from modelrecon.memory import available_bytes

            pattern_bytes = (available_bytes(device) or 4 << 30) // 4
        keep_patterns = rm.n_layers * self.heads * pos * pos * 4 <= pattern_bytes
        self.layers = []
        for layer in range(rm.n_layers):
            attn = norm(frozen.modules[frozen.attn[layer]])
            mlp = norm(frozen.modules[frozen.mlp[layer]])
            key_scale = scales[frozen.attn[layer]][:, 0]  # the attention norm's frozen scale at each key position
            pattern = None
            if keep_patterns:
                pattern = clean.patterns[layer].pattern() * key_scale  # [heads, q, k]
                pattern = pattern.reshape(self.kv_heads, self.heads // self.kv_heads * pos, pos)
            skip = self._skip(layer)
            post = frozen.attn_out[layer]
            self.layers.append(_Layer(
                value=attn.transposed(value_weight(model, layer)),  # W_v diag(gain) C, C symmetric
                out=output_weight(model, layer),
                pattern=pattern,
                attention=clean.patterns[layer],
                key_scale=key_scale,
                mlp_norm=mlp,
                mlp_scale=scales[frozen.mlp[layer]],
                attn_out=None if post is None else (norm(frozen.modules[post]), scales[post]),
                skip=None if skip is None else skip.T,
                writes=self._writes(layer),
            ))  # fmt: skip
        unembed = linear_weight(model.hf.get_output_embeddings())
        self.unembed = unembed  # [vocab, d]
        self.mean_unembed = unembed.mean(0)
        self.final = norm(frozen.modules[frozen.final]), scales[frozen.final][-1]  # the final norm, last position
        self.embed = clean.embed.float()
        self._layouts: dict[int, tuple[dict, torch.Tensor]] = {}  # per batch length n: `_columns`

    def _skip(self, layer: int) -> torch.Tensor | None:
        if self.rm.clt is not None:
            return None
        t = self.rm.transcoders[layer]
        if t.W_skip is None:
            return None
        return (t.W_skip[0] * (t.input_scale[0] / t.output_scale[0])).detach().float()

    def _writes(self, layer: int) -> list[tuple[int, torch.Tensor]]:
        """The decoders that write to `layer`'s MLP output, per source layer (a CLT's from every layer <= `layer`);
        the layer's own has the error vectors appended, one row per position (see `slots`)."""
        rm = self.rm
        if rm.clt is not None:
            decoders = [(i, rm.clt.W_dec[i][:, layer - i]) for i in range(layer + 1)]
        else:
            t = rm.transcoders[layer]
            decoders = [(layer, t.W_dec[0][:, 0] / t.output_scale[0])]
        errors = self.clean.errors[layer].float()
        return [(i, torch.cat([d.detach().float(), errors]) if i == layer else d.detach().float()) for i, d in decoders]

    def effects(self, targets: list[Target], index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The direct inputs of each target as (row, source node, weight) tensors in `index`'s (a NodeIndex)
        numbering; sources at position 0 (a BOS or attention sink, held constant) are left out.

        One pass down the layers carries the targets' gradient at the residual stream `[rows, n, d]`, over the
        positions `n` up to the last target's; each source's effect is its gradient times its value. A feature
        target's row is zero above its layer, so the rows are sorted by layer (highest first) and each layer works
        on the prefix of rows that have started."""
        rm, n_layers = self.rm, self.rm.n_layers
        last = len(self.clean.ids) - 1
        start = [n_layers if t.kind == "logit" else t.layer for t in targets]  # the layer a row starts below
        order = sorted(range(len(targets)), key=lambda r: -start[r])
        targets, start = [targets[r] for r in order], [start[r] for r in order]
        n = 1 + max(last if t.kind == "logit" else t.position for t in targets)
        g = torch.zeros(len(targets), n, self.embed.shape[-1], device=self.device)
        for row, t in enumerate(targets):
            if t.kind == "logit":
                other = self.mean_unembed if t.wrong is None else self.unembed[t.wrong]
                final, scale = self.final
                g[row, last] = final.transposed(self.unembed[t.token] - other) * scale
        columns, nodes = self._columns(n, index)
        effects = g.new_zeros(len(targets), nodes.numel())  # [rows, sources]: rows that have not started stay zero
        for layer in reversed(range(n_layers)):
            p = self.layers[layer]
            above = sum(s > layer for s in start)  # rows whose gradient reaches this layer's MLP output
            here = sum(s >= layer for s in start)  # and those whose target is this layer's MLP input
            out = g[:above]  # the gradient at resid_post, so also at the MLP's output: the sources' decoder rows'
            for i, decoder in p.writes:  # gradient x value, summed over the layers a (CLT) feature writes to
                cut = None if i == layer else -1  # the layer's own write holds its error rows too
                slots, values = self.slots[i][:n, :cut], self.values[i][:n, :cut]
                grad = (out.transpose(0, 1) @ decoder[slots].transpose(1, 2)).transpose(0, 1)  # [rows, n, k (+1)]
                first, width = columns[i], self.slots[i].shape[1]
                effects[:above, first : first + n * width].view(above, n, width)[..., :cut].addcmul_(grad, values)
            if p.skip is None or here > above:
                mlp_in = g.new_zeros(here, n, g.shape[-1])
                if p.skip is not None:
                    torch.matmul(out, p.skip, out=mlp_in[:above])
            else:
                mlp_in = out @ p.skip
            if here > above:  # seeds: a feature target's encoder direction at its position
                rows = torch.arange(above, here, device=self.device)
                positions = torch.tensor([targets[r].position for r in range(above, here)], device=self.device)
                latents = torch.tensor([targets[r].feature for r in range(above, here)], device=self.device)
                encoders = rm.encoder_vector(layer, latents).T.float()
                mlp_in.index_put_((rows, positions), encoders, accumulate=True)
            # Sequential: the MLP reads resid_mid, so its gradient joins the residual before attention's transpose.
            # Parallel: attention and MLP both read the layer's input; attention sees only resid_post's gradient.
            attention = self._attention_transposed(g[:above], p, n) if self.parallel else None
            g[:here].addcmul_(p.mlp_norm.transposed(mlp_in), p.mlp_scale[:n])
            if attention is None:
                g[:here] += self._attention_transposed(g[:here], p, n)
            else:
                g[:above] += attention
        effects[:, :n] = _dot(g, self.embed[:n])
        row, column = ((effects != 0) & (nodes >= 0)).nonzero(as_tuple=True)
        weights, sources = effects[row, column].cpu(), nodes[column].cpu()  # the graph's bookkeeping is on the host
        return torch.tensor(order)[row.cpu()], sources, weights

    def _columns(self, n: int, index) -> tuple[dict, torch.Tensor]:
        """The sources of a batch over positions 0..n-1, side by side: the embeddings `[n]` first, then per layer
        its features and error `[n, k + 1]` (as `slots`); where each layer's block starts, and the node numbers."""
        if n not in self._layouts:
            columns, nodes, width = {}, [index.embeddings[:n]], n
            for i in range(self.rm.n_layers):
                columns[i] = width
                nodes.append(torch.cat([index.grid[i][:n], index.errors[i][:n, None]], 1).reshape(-1))
                width += nodes[-1].numel()
            self._layouts[n] = columns, torch.cat(nodes).to(self.device)
        return self._layouts[n]

    def _attention_transposed(self, g: torch.Tensor, p: _Layer, n: int) -> torch.Tensor:
        """The gradient at the attention norm's input from the gradient at the attention's output, through the
        frozen pattern (and norm scale): o_proj^T, then pattern^T per kv head with the rows side by side, then
        v_proj^T (and the norm's gain)."""
        rows, kv, dh = g.shape[0], self.kv_heads, self.d_head
        group = self.heads // kv
        if p.attn_out is not None:  # Gemma's norm on attention's output, frozen
            post, scale = p.attn_out
            g = post.transposed(g) * scale[:n]
        heads = (g @ p.out).view(rows, n, kv, group, dh).permute(2, 3, 1, 0, 4)  # [kv, group, q, rows, dh]
        if p.pattern is not None:
            pos = p.pattern.shape[-1]
            pattern = p.pattern.view(kv, group, pos, pos)[:, :, :n, :n].reshape(kv, group * n, n)
            values = pattern.transpose(1, 2) @ heads.reshape(kv, group * n, rows * dh)  # [kv, k, rows * dh]
        else:  # blocks of query rows recomputed, ~64 MB of pattern at a time
            values = heads.new_zeros(kv, n, rows * dh)
            block = max(1, (1 << 24) // (self.heads * n))
            for a in range(0, n, block):
                b = min(n, a + block)
                pattern = (p.attention.rows(a, b, n) * p.key_scale[:n]).view(kv, group * (b - a), n)
                values += pattern.transpose(1, 2) @ heads[:, :, a:b].reshape(kv, group * (b - a), rows * dh)
        return values.view(kv, n, rows, dh).permute(2, 1, 0, 3).reshape(rows, n, kv * dh) @ p.value


def _dot(grad: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per row and position, gradient . value: `[rows, n, d]`, `[n, d]` -> `[rows, n]`."""
    return (grad.transpose(0, 1) @ value.unsqueeze(-1)).squeeze(-1).T


def active_per_position(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The active latents of each position of `acts [pos, width]`, ascending and padded to the largest count:
    (`latents [pos, k]`, `valid [pos, k]`); `x[valid]` lists them in `(acts > 0).nonzero()` order."""
    active = acts > 0
    k = max(1, int(active.sum(-1).max()))
    order = torch.sort((~active).to(torch.int8), dim=-1, stable=True).indices[:, :k]  # active latents first
    return order, active.gather(-1, order)


@torch.no_grad()
def check_edges(rm: ReplacementModel, clean: CleanRun, index, edges, targets: list[Target], target_nodes: list[int],
                seed: int = 0) -> float:  # fmt: skip
    """The largest error, relative to the largest change, of the edges into `targets` (whose node numbers are
    `target_nodes`) against an exact intervention: every source moves by its own random factor c (value * (1 + c))
    in one frozen forward pass of the unmodified model with hooks, and each target must move by the sum of
    c x weight over its edges. `edges`: (targets, sources, weights) in `index`'s numbering."""
    generator = torch.Generator().manual_seed(seed)
    factor = torch.rand(len(index.keys), generator=generator, dtype=torch.float64) * 2 - 1
    factor = torch.cat([factor, torch.zeros(1, dtype=torch.float64)])  # node -1 (position 0): not moved
    device = clean.embed.device

    def moved(value: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        return value * (1 + factor[nodes].to(device=device, dtype=value.dtype)).unsqueeze(-1)

    features = []
    for layer, (positions, latents, nodes) in enumerate(index.active):
        f = clean.features[layer].clone()
        f[positions.to(device), latents.to(device)] *= 1 + factor[nodes].to(device=device, dtype=f.dtype)
        features.append(torch.stack([clean.features[layer], f]))
    with rm.linearised(clean, 2, features) as leaves:
        leaves["embed"][1] = moved(clean.embed, index.embeddings)
        for layer, nodes in enumerate(index.errors):
            leaves["errors"][layer][1] = moved(clean.errors[layer], nodes)
        logits = rm.target_logits(rm.model.batch_from_ids([clean.ids] * 2)).double().cpu()
        mlp_in = [x.double().cpu() for x in leaves["mlp_in"]]
    change = torch.zeros(len(targets), dtype=torch.float64)
    logit_rows = [i for i, t in enumerate(targets) if t.kind == "logit"]
    for i in logit_rows:
        t = targets[i]
        other = logits.mean(-1) if t.wrong is None else logits[:, t.wrong]
        value = logits[:, t.token] - other
        change[i] = value[1] - value[0]
    by_layer: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        if t.kind == "feature":
            by_layer.setdefault(t.layer, []).append(i)
    for layer, rows in by_layer.items():  # the pre-activations' change: the MLP input's change . encoder
        positions = torch.tensor([targets[i].position for i in rows])
        latents = torch.tensor([targets[i].feature for i in rows], device=device)
        encoders = rm.encoder_vector(layer, latents).double().cpu()  # [d, m]
        moved_in = mlp_in[layer][1, positions] - mlp_in[layer][0, positions]  # [m, d]
        change[rows] = (moved_in * encoders.T).sum(-1)
    into, sources, weights = edges
    predicted = torch.zeros(len(index.keys), dtype=torch.float64)
    for chunk in range(0, len(weights), 1 << 16):  # in chunks: float64 copies of every edge would be the peak
        part = slice(chunk, chunk + (1 << 16))
        predicted.index_add_(0, into[part], factor[sources[part]] * weights[part].double())
    error = (change - predicted[torch.tensor(target_nodes)]).abs().max()
    return float(error / change.abs().max().clamp_min(1e-12))
