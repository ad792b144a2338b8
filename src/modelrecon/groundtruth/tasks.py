"""White-box tasks: real Hugging Face models with hand-set weights whose mechanism is known by construction.

Each task says which units of which site matter, with signs (the ground truth), which prompts exercise it, and how
to build its weight-randomised twin. `tests/test_groundtruth.py` proves every ground truth by intervention: ablating
the true units breaks the behaviour, ablating all the others leaves it exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modelrecon.groundtruth.build import write_task_model
from modelrecon.models.loading import load
from modelrecon.models.model import Model


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    site: str  # the site whose units the ground truth names
    truth: dict[int, int]  # unit -> sign of its contribution to the metric (+1 / -1); every other unit is inert
    n_units: int
    prompts: list[str]
    answer: str
    wrong: str
    weights: Callable[[], tuple[str, dict, dict[str, torch.Tensor], list[str]]] = field(repr=False)
    notes: str = ""
    units: tuple[int, ...] | None = None  # the units that are scored (default: all n_units)
    baseline: torch.Tensor | None = None  # integrated gradients' baseline at the site (default: zeros)
    answers: list[tuple[str, str]] | None = None  # per prompt (answer, wrong), where they differ by prompt
    directions: torch.Tensor | None = None  # feature directions at `site`, `[features, d_model]` (dictionary tasks)
    corrupt: list[str] | None = None  # per prompt, a counterfactual of the same length (for patching methods)
    # (sender, receiver) -> sign, in `attribution.edges` names: the edges that carry the difference between the
    # prompts and their counterfactuals (every other edge can take its counterfactual value)
    edge_truth: dict[tuple[str, str], int] | None = None

    def pairs(self) -> list:
        """The prompts with their counterfactuals as `counterfactual.Pair`s (tasks that have counterfactuals)."""
        from modelrecon.counterfactual.pairs import Pair

        return [Pair(p, c, a, w) for (p, a, w), c in zip(self.answer_pairs(), self.corrupt or [], strict=True)]

    def answer_pairs(self) -> list[tuple[str, str, str]]:
        """(prompt, answer, wrong) for every prompt."""
        pairs = self.answers or [(self.answer, self.wrong)] * len(self.prompts)
        return [(p, a, w) for p, (a, w) in zip(self.prompts, pairs, strict=True)]

    def scored_units(self) -> list[int]:
        return list(self.units) if self.units is not None else list(range(self.n_units))

    def model(self, twin: bool = False, seed: int = 0) -> Model:
        """The task model, loaded through `modelrecon.load`; `twin=True`: the same architecture, random weights."""
        model_type, config, weights, words = self.weights()
        name = self.name
        if twin:
            weights = randomised(weights, seed)
            name += f"-twin{seed}"
        return load(str(write_task_model(name, model_type, config, weights, words)))


def randomised(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Gaussian weights of each tensor's own scale (its standard deviation, or its mean size where it is constant,
    like a norm's ones): the twin keeps the architecture and loses the mechanism."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in sorted(weights.items()):  # by name: the twin does not depend on how the weights were listed
        scale = value.std() if value.numel() > 1 and value.std() > 0 else value.abs().mean().clamp_min(1e-3)
        out[key] = torch.randn(value.shape, generator=generator) * scale
    return out


# --- MLP: an additive part, an AND gate and a saturated unit --------------------------------------------------------
# Every norm in a standard architecture rescales the residual vector. An anchor dimension holding a large constant
# makes that rescaling the same for every input (to ~1e-6), so hand-set circuits stay exact: the norm weights undo
# the constant factor, and the anchor comes out of each norm as the constant 1 that biases read.
ANCHOR_VALUE = 1000.0


def _anchored_norm_weight(d: int, anchor: int) -> torch.Tensor:
    """RMS-norm weights that turn a residual vector with the anchor into itself, the anchor into 1."""
    scale = ANCHOR_VALUE / d**0.5  # the RMS of a residual vector, the anchor dominating
    weight = torch.full((d,), scale)
    weight[anchor] = scale / ANCHOR_VALUE
    return weight


# Residual dimensions of the MLP task.
F1, NOT_F1, F2, NOT_F2, ANCHOR, OUT = range(6)


def _mlp_gate_weights():
    """Llama, one layer, d_model 8, 8 ReLU neurons (the gated MLP's up projection reads the anchor: 1).

    Tokens "ab" carry two binary features f1 = a, f2 = b (one-hot per feature) and the anchor. Attention writes
    nothing. The neurons:
      0: AND      relu(f1 + f2 - 1.5)      -> out += 4 * n0 (2 when both are on)
      1: additive relu(f1)                 -> out += n1
      2, 3: clamp relu(3 f2) - relu(3 f2 - 1) = min(3 f2, 1) -> out += n2 - n3 (saturated where f2 = 1: no gradient)
      4, 5, 6: active but inert (read f1, f2, the anchor; write nothing); 7: dead.
    The unembedding reads `out` (through the final norm): logit(Y) - logit(N) = 4 * out.
    """
    d, n = 8, 8
    words = ["00", "01", "10", "11", "Y", "N"]
    vocab = {w: i + 2 for i, w in enumerate(words)}
    embed = torch.zeros(len(words) + 2, d)
    for word in ("00", "01", "10", "11"):
        a, b = int(word[0]), int(word[1])
        embed[vocab[word], [F1, NOT_F1, F2, NOT_F2, ANCHOR]] = torch.tensor([a, 1 - a, b, 1 - b, ANCHOR_VALUE])
    gate = torch.zeros(n, d)
    gate[0, [F1, F2, ANCHOR]] = torch.tensor([1.0, 1.0, -1.5])  # a margin: no input sits on the kink
    gate[1, F1] = 1.0
    gate[2, F2] = 3.0
    gate[3, [F2, ANCHOR]] = torch.tensor([3.0, -1.0])
    gate[4, F1], gate[5, F2], gate[6, ANCHOR] = 1.0, 1.0, 1.0
    up = torch.zeros(n, d)
    up[:, ANCHOR] = 1.0
    down = torch.zeros(d, n)
    down[OUT, :4] = torch.tensor([4.0, 1.0, 1.0, -1.0])
    unembed = torch.zeros(len(words) + 2, d)
    unembed[vocab["Y"], OUT], unembed[vocab["N"], OUT] = 2.0, -2.0
    config = dict(hidden_size=d, intermediate_size=n, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=len(words) + 2, hidden_act="relu", tie_word_embeddings=False,
                  rms_norm_eps=1e-6, max_position_embeddings=8, pad_token_id=0)  # fmt: skip
    norm = _anchored_norm_weight(d, ANCHOR)
    weights = {
        "model.embed_tokens.weight": embed,
        "model.layers.0.input_layernorm.weight": norm,
        "model.layers.0.post_attention_layernorm.weight": norm,
        "model.layers.0.mlp.gate_proj.weight": gate,
        "model.layers.0.mlp.up_proj.weight": up,
        "model.layers.0.mlp.down_proj.weight": down,
        "model.norm.weight": norm,
        "lm_head.weight": unembed,
    }
    return "llama", config, weights, words


MLP_GATE = Task(
    name="mlp_gate",
    description="one MLP layer: an AND gate, an additive unit, a saturated clamp, and inert active neurons",
    site="layers.0.mlp.neurons",
    truth={0: +1, 1: +1, 2: +1, 3: -1},
    n_units=8,
    prompts=["00", "01", "10", "11"],
    answer=" Y",
    wrong=" N",
    weights=_mlp_gate_weights,
    notes="All four units act directly and unsaturated on some prompt: every method should find them here; the "
    "saturation shows at the inputs (mlp_gate_inputs).",
)

_ANCHOR_ONLY = torch.zeros(8)
_ANCHOR_ONLY[ANCHOR] = ANCHOR_VALUE

MLP_GATE_INPUTS = Task(
    name="mlp_gate_inputs",
    description="the mlp_gate model read at its input features on '01': f2 matters only through a saturated unit",
    site="embed",
    truth={F2: +1},  # zeroing f2 removes the output; f1 and not-f2 are 0 here, not-f1 is read by nothing
    n_units=8,
    units=(F1, NOT_F1, F2, NOT_F2),
    baseline=_ANCHOR_ONLY,  # no features, the anchor kept (a zero anchor would make every norm blow up)
    prompts=["01"],
    answer=" Y",
    wrong=" N",
    weights=_mlp_gate_weights,
    notes="The saturated region: the gradient of the output with respect to f2 is zero on '01' (the clamp is "
    "saturated and the AND gate is off), so gradient x activation ranks f2 with the inert inputs.",
)

# --- OR: two redundant units behind a saturating gate, and a suppressing unit ----------------------------------------
O_F, O_NOT_F, O_ANCHOR, O_SUM, O_OUT = range(5)


def _mlp_or_weights():
    """Llama, two layers, d_model 8. Layer 0's neurons read one binary feature f:
      0, 1: relu(f), both added into a sum dimension (two redundant paths);
      2: relu(f), writes -0.5 to the output directly (a suppressor); 3-7: active but inert.
    Layer 1 gates the sum: relu(s) - relu(s - 1) = min(s, 1) -> out. With f = 1 the sum is 2: the gate is saturated,
    so either path alone still gives out = 1 (an OR), and only removing both changes anything.
    logit(Y) - logit(N) = 4 * out: 4 * (1 - 0.5) = 2 on "1", 0 on "0".
    """
    d, n = 8, 8
    words = ["0", "1", "Y", "N"]
    vocab = {w: i + 2 for i, w in enumerate(words)}
    embed = torch.zeros(len(words) + 2, d)
    for word in ("0", "1"):
        f = float(word)
        embed[vocab[word], [O_F, O_NOT_F, O_ANCHOR]] = torch.tensor([f, 1 - f, ANCHOR_VALUE])
    gate0, up0, down0 = torch.zeros(n, d), torch.zeros(n, d), torch.zeros(d, n)
    gate0[:, O_F] = 1.0  # every layer-0 neuron reads f
    up0[:, O_ANCHOR] = 1.0
    down0[O_SUM, 0], down0[O_SUM, 1], down0[O_OUT, 2] = 1.0, 1.0, -0.5
    gate1, up1, down1 = torch.zeros(n, d), torch.zeros(n, d), torch.zeros(d, n)
    gate1[0, O_SUM], gate1[1, [O_SUM, O_ANCHOR]] = 1.0, torch.tensor([1.0, -1.0])
    up1[:2, O_ANCHOR] = 1.0
    down1[O_OUT, 0], down1[O_OUT, 1] = 1.0, -1.0
    unembed = torch.zeros(len(words) + 2, d)
    unembed[vocab["Y"], O_OUT], unembed[vocab["N"], O_OUT] = 2.0, -2.0
    config = dict(hidden_size=d, intermediate_size=n, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=len(words) + 2, hidden_act="relu", tie_word_embeddings=False,
                  rms_norm_eps=1e-6, max_position_embeddings=8, pad_token_id=0)  # fmt: skip
    norm = _anchored_norm_weight(d, O_ANCHOR)
    weights = {"model.embed_tokens.weight": embed, "model.norm.weight": norm, "lm_head.weight": unembed}
    for layer, (gate, up, down) in enumerate(((gate0, up0, down0), (gate1, up1, down1))):
        prefix = f"model.layers.{layer}."
        weights[prefix + "input_layernorm.weight"] = norm
        weights[prefix + "post_attention_layernorm.weight"] = norm
        weights[prefix + "mlp.gate_proj.weight"] = gate
        weights[prefix + "mlp.up_proj.weight"] = up
        weights[prefix + "mlp.down_proj.weight"] = down
    return "llama", config, weights, words


MLP_OR = Task(
    name="mlp_or",
    description="two redundant units behind a saturated gate (an OR) and a suppressing unit, at layer 0's neurons",
    site="layers.0.mlp.neurons",
    truth={0: +1, 1: +1, 2: -1},
    n_units=8,
    prompts=["1"],
    answer=" Y",
    wrong=" N",
    weights=_mlp_or_weights,
    notes="Removing either redundant unit alone changes nothing (the other keeps the saturated gate at 1), so "
    "single-unit ablation and the gradient both miss them; only the suppressor shows.",
)


def _attention_layers(norm: torch.Tensor, proj: dict[str, torch.Tensor], o: torch.Tensor) -> dict:
    """The per-layer weights of hand-set attention layers: both norms, q/k/v (`proj[name][layer]`) and o."""
    weights = {}
    for layer in range(len(o)):
        prefix = f"model.layers.{layer}."
        weights[prefix + "input_layernorm.weight"] = norm
        weights[prefix + "post_attention_layernorm.weight"] = norm
        for name in ("q", "k", "v"):
            weights[prefix + f"self_attn.{name}_proj.weight"] = proj[name][layer]
        weights[prefix + "self_attn.o_proj.weight"] = o[layer]
    return weights


def _clamp_mlp(layer: int, d: int, units: int, read: int, write: int, anchor: int) -> dict:
    """A gated ReLU MLP writing min(x_k, 1) = relu(x_k) - relu(x_k - 1) from dimension read + k into write + k."""
    gate, up, down = torch.zeros(2 * units, d), torch.zeros(2 * units, d), torch.zeros(d, 2 * units)
    for k in range(units):
        gate[2 * k, read + k] = 1.0
        gate[2 * k + 1, [read + k, anchor]] = torch.tensor([1.0, -1.0])
        down[write + k, 2 * k], down[write + k, 2 * k + 1] = 1.0, -1.0
    up[:, anchor] = 1.0
    prefix = f"model.layers.{layer}.mlp."
    return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up, prefix + "down_proj.weight": down}


# --- induction: a previous-token head composing with an induction head, plus inert distractor heads -----------------
LETTERS = list("ABCDEFGH")
# Residual dimensions: the anchor, the token (T), the previous token (P, written by layer 0), the output (O, written
# by layer 1, read by the unembedding), and a junk region (J) that the distractor heads write and nothing reads.
I_ANCHOR, I_T, I_P, I_O, I_J = 0, 1, 9, 17, 25
ROPE_THETA = 256.0  # rotary frequencies 2^-i per position for the pairs (i, i + 8) of a 16-dim head
CONTENT_SLOTS = [4, 5, 6, 7, 12, 13, 14, 15]  # the slowest-rotating pairs: content matching barely sees position


def _induction_weights(backup: bool = False):
    """Llama, two layers of 16-dim heads (two per layer; three with `backup`).

    Layer 0 head 0 (previous-token head): a constant query and key on rotary pair 1 (0.5 rad per position), phased
    so the score peaks at one position back; its value is the token, written to P.
    Layer 1 head 0 (induction head): query = the current token, key = P (both on the slow pairs), so it attends to
    the position right after the current token's earlier occurrence; its value is that token, written to O.
    Head 1 of each layer attends uniformly and writes the token into J, which nothing reads (active, inert).
    The unembedding reads O: the logit of the copied token is 10.

    With `backup` (an OR and a suppressor, the shape of the indirect-object circuit): head 1.1 is a second induction
    head; both write to a pre-gate subspace, and layer 1's MLP passes it through min(x, 1) per token into O, so either
    head alone suffices. Head 1.2, a third induction head, writes -0.3 x the token straight into O (a negative head).
    Head 0.2 attends uniformly into J. The copied token's logit is 10 * (1 - 0.3) = 7.
    """
    head_dim, n_heads = 16, 3 if backup else 2
    d = 48 if backup else 40
    n_tokens = len(LETTERS)
    pre_gate = I_J + n_tokens  # 33..40: the induction heads' output before the gate (backup only)
    words = LETTERS
    vocab = {w: i + 2 for i, w in enumerate(words)}
    embed = torch.zeros(len(words) + 2, d)
    for k, w in enumerate(words):
        embed[vocab[w], I_ANCHOR], embed[vocab[w], I_T + k] = ANCHOR_VALUE, 1.0
    proj = {name: torch.zeros(2, n_heads * head_dim, d) for name in ("q", "k", "v")}
    o = torch.zeros(2, d, n_heads * head_dim)
    omega, prev_scale = 0.5, 800.0**0.5  # score 800 * 0.25 * cos((p - j - 1) * omega)
    proj["q"][0, 1, I_ANCHOR] = prev_scale
    proj["k"][0, 1, I_ANCHOR] = prev_scale * torch.cos(torch.tensor(omega))
    proj["k"][0, 1 + 8, I_ANCHOR] = prev_scale * torch.sin(torch.tensor(omega))
    match_scale = 250.0**0.5
    inducting = range(n_heads) if backup else range(1)  # layer-1 heads that match the current token against P
    for head in inducting:
        for k, slot in enumerate(CONTENT_SLOTS):
            proj["q"][1, head * head_dim + slot, I_T + k] = match_scale
            proj["k"][1, head * head_dim + slot, I_P + k] = match_scale
    for layer in (0, 1):
        for head in range(n_heads):
            for k in range(n_tokens):
                proj["v"][layer, head * head_dim + k, I_T + k] = 1.0  # every head's value is the token
        for k in range(n_tokens):
            o[layer, (I_P if layer == 0 else (pre_gate if backup else I_O)) + k, k] = 1.0  # head 0
            if layer == 0 or not backup:
                for head in range(1, n_heads):
                    o[layer, I_J + k, head * head_dim + k] = 1.0  # distractors write junk
            else:
                o[layer, pre_gate + k, head_dim + k] = 1.0  # head 1.1: the backup
                o[layer, I_O + k, 2 * head_dim + k] = -0.3  # head 1.2: the negative head
    unembed = torch.zeros(len(words) + 2, d)
    for k, w in enumerate(words):
        unembed[vocab[w], I_O + k] = 10.0
    n_mlp = 2 * n_tokens if backup else 4
    config = dict(hidden_size=d, intermediate_size=n_mlp, num_hidden_layers=2, num_attention_heads=n_heads,
                  num_key_value_heads=n_heads, head_dim=head_dim, vocab_size=len(words) + 2, hidden_act="relu",
                  tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=32, pad_token_id=0,
                  rope_theta=ROPE_THETA)  # fmt: skip
    norm = _anchored_norm_weight(d, I_ANCHOR)
    weights = {"model.embed_tokens.weight": embed, "model.norm.weight": norm, "lm_head.weight": unembed,
               **_attention_layers(norm, proj, o)}  # fmt: skip
    if backup:  # layer 1's MLP: O_k += min(x_k, 1) for the pre-gate x
        weights |= _clamp_mlp(1, d, n_tokens, pre_gate, I_O, I_ANCHOR)
    return "llama", config, weights, words


INDUCTION = Task(
    name="induction",
    description="a previous-token head (0.0) composing with an induction head (1.0); heads 0.1 and 1.1 are inert",
    site="layers.*.attn.heads",
    truth={0: +1, 2: +1},  # units are layer * 2 + head
    n_units=4,
    prompts=["C A F B E A", "D B G C B", "E H A C F H", "B D F A G D", "H C E G B E"],
    answer="",  # per prompt: the token after the last token's earlier occurrence (see `answers`)
    wrong="",
    weights=_induction_weights,
    notes="The previous-token head writes nothing to the logits directly, so direct logit attribution misses it: "
    "DLA finds direct effects only.",
    answers=[(" F", " B"), (" G", " C"), (" A", " C"), (" F", " A"), (" G", " C")],
    # The earlier occurrence replaced: nothing to induct from.
    corrupt=["C D F B E A", "D H G C B", "E D A C F H", "B C F A G D", "H C F G B E"],
    edge_truth={
        ("embed", "layers.0.attn.v:0"): +1,  # the previous token
        ("layers.0.attn.heads:0", "layers.1.attn.k:0"): +1,  # ... as the induction head's key
        ("layers.1.attn.heads:0", "logits"): +1,
    },
)

INDUCTION_BACKUP = Task(
    name="induction_backup",
    description="induction with a backup induction head behind a saturated gate (an OR) and a negative head",
    site="layers.*.attn.heads",
    truth={0: +1, 3: +1, 4: +1, 5: -1},  # units are layer * 3 + head: 0.0, 1.0, 1.1 carry it, 1.2 suppresses
    n_units=6,
    prompts=INDUCTION.prompts,
    answer="",
    wrong="",
    weights=lambda: _induction_weights(backup=True),
    notes="Removing either induction head alone changes nothing (the other keeps the gate saturated): single-head "
    "ablation and patching call both inert. The negative head shows with the opposite sign.",
    answers=INDUCTION.answers,
    corrupt=INDUCTION.corrupt,
    edge_truth={
        ("embed", "layers.0.attn.v:0"): +1,
        **{("layers.0.attn.heads:0", f"layers.1.attn.k:{h}"): +1 for h in range(2)},
        ("layers.0.attn.heads:0", "layers.1.attn.k:2"): -1,  # it aims the negative head too
        ("layers.1.attn.heads:0", "layers.1.mlp"): +1,
        ("layers.1.attn.heads:1", "layers.1.mlp"): +1,
        ("layers.1.mlp", "logits"): +1,
        ("layers.1.attn.heads:2", "logits"): -1,
    },
)


# --- indirect object: a duplicate-name counter, name movers with a backup behind a gate, and a negative head -------
NAMES = ["Mary", "John", "Tom", "Anna", "Bob", "Lisa"]
FILLERS = ["when", "then", "and", "went", "to", "the", "store", "park", "gave", "a", "drink", "book", "bag"]
# Residual dimensions: the anchor, is-name, the name (T), the names' counts so far (C, written by head 0.0), the name
# movers' output before the gate (G), the output (O, read by the unembedding) and junk (J, read by nothing).
N_ANCHOR, N_IS_NAME, N_T = 0, 1, 2
N_C, N_G, N_O, N_J = (N_T + len(NAMES) * k for k in range(1, 5))
# Rotary pairs 2..7 of a 16-dim head turn by at most 1e30^(-1/4) rad per position: content matching sees no position.
IOI_SLOTS = [2, 3, 4, 5, 6, 7, 10]  # is-name, then one per name


def _ioi_weights():
    """Llama, two layers of three 16-dim heads; the prompt names the indirect object once and the subject twice.

    Head 0.0 (duplicate counter): uniform causal attention, value = the name, written to C: at the last position,
    each name's share of the prompt. Heads 1.0 and 1.1 (name movers) and 1.2 (negative name mover) share one
    query/key: score = 1000 * is-name - 2000 * C[name], so they attend to the name that occurs once (the subject,
    seen twice, scores lower). 1.0 and 1.1 write the name to G; layer 1's MLP passes G through min(x, 1) into O, so
    either mover alone suffices (the backup). 1.2 writes -0.3 x the name into O. Heads 0.1 and 0.2 write junk.
    logit(name) = 10 * O[name]: the indirect object's logit is 7, the subject's 0.
    """
    head_dim, n_heads, n_names = 16, 3, len(NAMES)
    d = N_J + n_names + 4  # a multiple of the head count (the config requires it)
    words = NAMES + FILLERS
    vocab = {w: i + 2 for i, w in enumerate(words)}
    embed = torch.zeros(len(words) + 2, d)
    embed[2:, N_ANCHOR] = ANCHOR_VALUE
    for k, name in enumerate(NAMES):
        embed[vocab[name], [N_IS_NAME, N_T + k]] = 1.0
    proj = {name: torch.zeros(2, n_heads * head_dim, d) for name in ("q", "k", "v")}
    o = torch.zeros(2, d, n_heads * head_dim)
    for layer in (0, 1):
        for head in range(n_heads):
            for k in range(n_names):
                proj["v"][layer, head * head_dim + k, N_T + k] = 1.0  # every head's value is the name
    for k in range(n_names):
        o[0, N_C + k, k] = 1.0  # 0.0: the counts
        for head in (1, 2):
            o[0, N_J + k, head * head_dim + k] = 1.0
        o[1, N_G + k, k] = o[1, N_G + k, head_dim + k] = 1.0  # 1.0 and 1.1: the movers
        o[1, N_O + k, 2 * head_dim + k] = -0.3  # 1.2: the negative mover
    for head in range(n_heads):
        q, k_ = proj["q"][1, head * head_dim :], proj["k"][1, head * head_dim :]
        q[IOI_SLOTS[0], N_ANCHOR], k_[IOI_SLOTS[0], N_IS_NAME] = 1000.0, 1.0
        for k, slot in enumerate(IOI_SLOTS[1:]):
            q[slot, N_C + k], k_[slot, N_T + k] = -2000.0, 1.0
    n_mlp = 2 * n_names
    unembed = torch.zeros(len(words) + 2, d)
    for k, name in enumerate(NAMES):
        unembed[vocab[name], N_O + k] = 10.0
    config = dict(hidden_size=d, intermediate_size=n_mlp, num_hidden_layers=2, num_attention_heads=n_heads,
                  num_key_value_heads=n_heads, head_dim=head_dim, vocab_size=len(words) + 2, hidden_act="relu",
                  tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=32, pad_token_id=0,
                  rope_theta=1e30)  # fmt: skip
    norm = _anchored_norm_weight(d, N_ANCHOR)
    weights = {"model.embed_tokens.weight": embed, "model.norm.weight": norm, "lm_head.weight": unembed,
               **_attention_layers(norm, proj, o), **_clamp_mlp(1, d, n_names, N_G, N_O, N_ANCHOR)}  # fmt: skip
    return "llama", config, weights, words


IOI_PROMPTS = [  # (indirect object, subject, template); the counterfactual names the other one again (S2 flipped)
    ("Mary", "John", "when {io} and {s} went to the store {s} gave a drink to"),
    ("Anna", "Tom", "when {s} and {io} went to the park {s} gave a book to"),
    ("Bob", "Lisa", "then {io} and {s} went to the store {s} gave a bag to"),
    ("Tom", "John", "when {s} and {io} went to the park {s} gave a drink to"),
    ("Anna", "Mary", "then {io} and {s} went to the store {s} gave a book to"),
]


def _ioi_prompt(io: str, s: str, template: str, flipped: bool = False) -> str:
    head, tail = template.rsplit("{s}", 1)
    return head.format(io=io, s=s) + (io if flipped else s) + tail


IOI = Task(
    name="ioi",
    description="indirect object: a duplicate counter (0.0), two name movers behind a gate (1.0, 1.1: an OR) and a "
    "negative name mover (1.2)",
    site="layers.*.attn.heads",
    truth={0: +1, 3: +1, 4: +1, 5: -1},  # units are layer * 3 + head
    n_units=6,
    prompts=[_ioi_prompt(*p) for p in IOI_PROMPTS],
    answer="",
    wrong="",
    weights=_ioi_weights,
    notes="Ablating either name mover alone changes nothing (the other keeps the gate saturated). The counter acts "
    "only through the movers' queries, so DLA misses it. The counterfactual repeats the indirect object instead of "
    "the subject, which flips the answer.",
    answers=[(f" {io}", f" {s}") for io, s, _ in IOI_PROMPTS],
    corrupt=[_ioi_prompt(*p, flipped=True) for p in IOI_PROMPTS],
    edge_truth={
        ("embed", "layers.0.attn.v:0"): +1,  # the names counted
        # the counts into the queries, and which name sits where into the keys; the negative head's with sign -1
        **{("layers.0.attn.heads:0", f"layers.1.attn.q:{h}"): +1 if h < 2 else -1 for h in range(3)},
        **{("embed", f"layers.1.attn.k:{h}"): +1 if h < 2 else -1 for h in range(3)},
        ("layers.1.attn.heads:0", "layers.1.mlp"): +1,
        ("layers.1.attn.heads:1", "layers.1.mlp"): +1,
        ("layers.1.mlp", "logits"): +1,
        ("layers.1.attn.heads:2", "logits"): -1,
    },
)


# --- a RASP-style program: frac_prevs (tracr's numerical mean), every variable in its own subspace -------------------
R_ANCHOR, R_IS_X, R_IS_O, R_FRAC, R_JUNK = 0, 1, 2, 3, 4


def _frac_prevs_weights():
    """Llama, two layers, d_model 8, two heads of 4 dims; MLPs zero. The program (tracr's `frac_prevs`):

        is_x = tokens == "x"                               (the embedding's own dimension)
        frac = numerical(mean(select(all, all, TRUE), is_x))   (head 0.0: uniform causal attention, value is_x)

    and the readout logit(Y) - logit(N) = 8 * (frac - 0.5). Heads 0.1, 1.0 and 1.1 attend uniformly and write into
    a junk dimension nothing reads.
    """
    d, head_dim, n_heads = 8, 4, 2
    words = ["x", "o", "Y", "N"]
    vocab = {w: i + 2 for i, w in enumerate(words)}
    embed = torch.zeros(len(words) + 2, d)
    embed[vocab["x"], [R_ANCHOR, R_IS_X]] = torch.tensor([ANCHOR_VALUE, 1.0])
    embed[vocab["o"], [R_ANCHOR, R_IS_O]] = torch.tensor([ANCHOR_VALUE, 1.0])
    weights: dict[str, torch.Tensor] = {}
    norm = _anchored_norm_weight(d, R_ANCHOR)
    for layer in (0, 1):
        v, o = torch.zeros(n_heads * head_dim, d), torch.zeros(d, n_heads * head_dim)
        v[0, R_IS_X], v[head_dim, R_IS_X] = 1.0, 1.0  # every head averages is_x (queries and keys are zero)
        o[R_FRAC if layer == 0 else R_JUNK, 0] = 1.0  # only head 0.0 writes frac
        o[R_JUNK, head_dim] = 1.0
        prefix = f"model.layers.{layer}."
        weights |= {prefix + "input_layernorm.weight": norm, prefix + "post_attention_layernorm.weight": norm,
                    prefix + "self_attn.v_proj.weight": v, prefix + "self_attn.o_proj.weight": o}  # fmt: skip
    unembed = torch.zeros(len(words) + 2, d)
    unembed[vocab["Y"], [R_FRAC, R_ANCHOR]] = torch.tensor([4.0, -2.0])
    unembed[vocab["N"], [R_FRAC, R_ANCHOR]] = torch.tensor([-4.0, 2.0])
    weights |= {"model.embed_tokens.weight": embed, "model.norm.weight": norm, "lm_head.weight": unembed}
    config = dict(hidden_size=d, intermediate_size=4, num_hidden_layers=2, num_attention_heads=n_heads,
                  num_key_value_heads=n_heads, head_dim=head_dim, vocab_size=len(words) + 2, hidden_act="relu",
                  tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=16, pad_token_id=0)  # fmt: skip
    return "llama", config, weights, words


FRAC_PREVS = Task(
    name="frac_prevs",
    description="a hand-compiled RASP program: the fraction of x so far (head 0.0), read as Y (more than half) or N",
    site="layers.*.attn.heads",
    truth={0: +1},
    n_units=4,
    prompts=["x o x x", "o x x", "x x o x o x", "x x o"],
    answer=" Y",
    wrong=" N",
    corrupt=["o x o o", "x o o", "o o x o x o", "o o x"],  # x and o swapped: the fraction becomes 1 - frac
    edge_truth={("embed", "layers.0.attn.v:0"): +1, ("layers.0.attn.heads:0", "logits"): +1},
    weights=_frac_prevs_weights,
    notes="Linear all the way from the head to the logits: every method should pass; a method that fails here is "
    "broken, not fooled.",
)

# --- toy superposition: more features than dimensions, for scoring dictionaries ------------------------------------
SUPERPOSITION_FEATURES, SUPERPOSITION_DIMS = 12, 6


SUPERPOSITION_TOKENS = 1000


def _superposition_directions() -> torch.Tensor:
    """12 unit directions in 6 dimensions (seeded), spread so that no two are closer than |cosine| 0.7."""
    generator = torch.Generator().manual_seed(0)
    while True:
        directions = torch.randn(SUPERPOSITION_FEATURES, SUPERPOSITION_DIMS, generator=generator)
        directions = directions / directions.norm(dim=1, keepdim=True)
        cosine = directions @ directions.T - torch.eye(SUPERPOSITION_FEATURES)
        if cosine.abs().max() < 0.7:
            return directions


def _superposition_tokens() -> dict[str, dict[int, float]]:
    """1000 tokens, each one to three features active with magnitudes in [0.5, 1.5] (seeded): sparse codes."""
    generator = torch.Generator().manual_seed(1)
    tokens = {}
    for t in range(SUPERPOSITION_TOKENS):
        k = int(torch.randint(1, 4, (1,), generator=generator))
        chosen = torch.randperm(SUPERPOSITION_FEATURES, generator=generator)[:k].tolist()
        values = (0.5 + torch.rand(k, generator=generator)).tolist()
        tokens[f"t{t}"] = dict(zip(chosen, values, strict=True))
    return tokens


def _superposition_weights():
    """Llama, one layer with everything zero: the residual stream is the embedding, the anchor (dimension 0) plus
    each token's sparse combination of 12 feature directions in dimensions 1-6."""
    d = 1 + SUPERPOSITION_DIMS + 1
    directions = _superposition_directions()
    tokens = _superposition_tokens()
    words = list(tokens)
    embed = torch.zeros(len(words) + 2, d)
    for i, word in enumerate(words):
        embed[i + 2, 0] = ANCHOR_VALUE
        for feature, value in tokens[word].items():
            embed[i + 2, 1 : 1 + SUPERPOSITION_DIMS] += value * directions[feature]
    norm = _anchored_norm_weight(d, 0)
    weights = {"model.embed_tokens.weight": embed, "model.norm.weight": norm,
               "model.layers.0.input_layernorm.weight": norm, "model.layers.0.post_attention_layernorm.weight": norm,
               "lm_head.weight": torch.eye(len(words) + 2, d)}  # fmt: skip
    config = dict(hidden_size=d, intermediate_size=4, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=4, vocab_size=len(words) + 2, hidden_act="relu",
                  tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    return "llama", config, weights, words


def _padded_directions() -> torch.Tensor:
    """The true directions in the model's residual coordinates (anchor and spare dimension zero)."""
    directions = torch.zeros(SUPERPOSITION_FEATURES, SUPERPOSITION_DIMS + 2)
    directions[:, 1 : 1 + SUPERPOSITION_DIMS] = _superposition_directions()
    return directions


SUPERPOSITION = Task(
    name="superposition",
    description="12 sparse features in 6 dimensions at layers.0.resid_post: a dictionary should recover the 12",
    site="layers.0.resid_post",
    truth={},
    n_units=0,
    prompts=[" ".join(f"t{20 * i + j}" for j in range(20)) for i in range(SUPERPOSITION_TOKENS // 20)],
    answer="",
    wrong="",
    weights=_superposition_weights,
    notes="Scored by dictionary recovery: mean max cosine, fraction matched above 0.9.",
    directions=_padded_directions(),
)

TASKS: dict[str, Task] = {
    t.name: t for t in (MLP_GATE, MLP_GATE_INPUTS, MLP_OR, INDUCTION, INDUCTION_BACKUP, IOI, FRAC_PREVS, SUPERPOSITION)
}
