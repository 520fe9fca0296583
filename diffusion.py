"""
L2D: a trainable diffusion path around a frozen GPT (Cetin, Zhao & Tang, ICML 2025).
The method, with every default, is in docs/method.md; section numbers below refer to it.

The base model predicts token i+1 from the context <= i. The path adds, at every position i, a
"diffusion token" x_t: a noisy version of the *next* token's flow embedding x_1 = V[y_{i+1}],
    x_t = (1 - t) x_0 + t x_1,    x_0 ~ N(0, sigma^2 I),    t in [0, 1].
The path's hidden state starts from x_t, attends to the base's own keys/values of each layer
(never to other diffusion tokens), is modulated by t (adaLN-Zero), and is merged into the base's
last hidden state with a gate that is exactly zero at t = 0:
    h = h_main + (w(c_t) - w(c_0)) * h_path,    logits = lm_head(final_norm(h)).
Training is plain cross-entropy at random t (per position). Generating a token integrates
dx/dt = (x_hat_1 - x_t) / (1 - t) from t=0 to t=1 (L2D.integrate: the field is velocity.py's, the
solver solvers.py's); one step is exactly the base model.

    l2d = L2D(base, L2DConfig(variant="lora"))
    logits, loss = l2d(idx, targets, labels)                 # training forward
    for token, nfe in l2d.generate(idx, 64, steps=8): ...    # decoding with the ODE
    stats = l2d.teacher_forced(x, y, steps=8)                # the ODE at every answer position at once

Choices made here (docs/method.md, sec. 4-5): the sinusoidal time embedding is 256 wide (128 frequencies, cos
and sin halves, as in DiT); GPT-2's path input gets no position embedding (positions reach it
through the base keys it attends to); with guidance the final token is read from the
class-conditional logits.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear
from model import IGNORE_INDEX, KVCache, MLP, apply_rope, attend, sample_token
from solvers import SOLVERS, dopri5, grid
from velocity import FlowMemo, PackedRows, VelocityField, guided


# Widths the official code fixes, whatever the base (docs/method.md, sec. 4): the sinusoidal features of
# t (128 frequencies, cos and sin halves, as in DiT) and the hidden layer of the input MLP x_t -> h^0.
TIME_FEATURES = 256
INPUT_HIDDEN = 256
# dopri5 stops just short of t=1: a step landing on t=1 meets the velocity defined as 0 there
# (its true limit is x_hat_1 - x_0), fails its error test and the step size collapses. What is
# left, 1e-4 of the noise, is below what the t=1 read-out can notice.
ADAPTIVE_T_END = 1 - 1e-4
# L2DConfig.self_guess: the t of the path's "first guess", x_t still nearly pure noise (the first
# midpoint of a 16-step solve is at 1/30).
GUESS_T = 1 / 30


@dataclass
class L2DConfig:
    variant: str = "lora"       # "lora": frozen base q/o/MLP + LoRA; "full": trainable copies
    flow_dim: int = 256         # d_f, the width of the diffused token space
    cond_dim: int = 256         # width of the time/class conditioning c
    sigma: float = 64.0         # std of the noise x_0
    lora_rank: int = 32
    lora_alpha: float = 32.0
    num_classes: int = 0        # J guidance classes (0, the official default: no class conditioning); J is null
    label_dropout: float = 0.2  # training: probability of replacing a token's label by null
    t_schedule: str = "uniform"  # "uniform" or "cosmap" (sec. 3)
    # A deviation from the paper, off by default: the share of training positions whose x_t is built
    # from the path's own first guess (its argmax at t = GUESS_T) instead of the gold token, the target
    # staying gold. Along a sampling ODE the path reads its own guess back as if it were gold; this
    # shows it, in training, x_t's that point at a wrong guess (RESULTS.md, "The CPU lab").
    self_guess: float = 0.0

    def __post_init__(self):
        if self.variant not in ("lora", "full"):
            raise ValueError(f"unknown L2D variant {self.variant!r}; use 'lora' or 'full'")
        if self.t_schedule not in ("uniform", "cosmap"):
            raise ValueError(f"unknown t_schedule {self.t_schedule!r}; use 'uniform' or 'cosmap'")


def mlp2(d_in, d_hidden, d_out, init=nn.init.xavier_uniform_, zero_last=False, last_bias=True):
    """Linear - SiLU - Linear with the official code's init: weights by `init` (xavier-uniform, or the
    time MLP's N(0, 0.02)), zero biases; adaLN-Zero heads (zero_last) start at exactly zero output."""
    net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out, bias=last_bias))
    init(net[0].weight)
    if zero_last:
        nn.init.zeros_(net[2].weight)
    else:
        init(net[2].weight)
    for layer in (net[0], net[2]):
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return net


def normal_002(weight):
    return nn.init.normal_(weight, std=0.02)


def time_embedding(t, dim=TIME_FEATURES, max_period=1e4):
    """Sinusoidal features of t in [0, 1]: cos(t f_k) and sin(t f_k), f_k = max_period^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sample_t(shape, schedule, device=None):
    """t ~ U(0, 1) per position, optionally warped by cosmap: t = 1 - 1 / (tan(pi u / 2) + 1)."""
    u = torch.rand(shape, device=device)
    if schedule == "cosmap":
        return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    return u


class PathLayer(nn.Module):
    """The diffusion-path twin of one base block (sec. 4). It reuses the block's frozen norms and
    attends to the block's keys/values; its q, o and MLP are its own (copies, or base + LoRA)."""

    def __init__(self, block, config):
        super().__init__()
        adapt = (lambda lin: copy.deepcopy(lin).requires_grad_(True)) if config.variant == "full" \
            else (lambda lin: LoRALinear(lin, config.lora_rank, config.lora_alpha))
        attn, mlp = block.attn, block.mlp
        self.n_head, self.head_dim = attn.n_head, attn.head_dim
        self.q_proj, self.o_proj = adapt(attn.q_proj), adapt(attn.o_proj)
        gate = adapt(mlp.gate_proj) if mlp.gate_proj is not None else None  # SwiGLU only
        self.mlp = MLP(adapt(mlp.up_proj), adapt(mlp.down_proj), gate)
        d = attn.q_proj.in_features
        # (norm-weight delta, shift, gate) for the attention branch, then for the MLP branch.
        self.modulation = mlp2(config.cond_dim, config.cond_dim, 6 * d, zero_last=True)

    def forward(self, h, modulation, block, k, v, rope, pos, pad):
        B, T, _ = h.shape
        dw_attn, shift_attn, gate_attn, dw_mlp, shift_mlp, gate_mlp = modulation.chunk(6, dim=-1)
        u = block.ln_1.modulated(h, dw_attn, shift_attn)
        q = self.q_proj(u).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q = apply_rope(q, *rope)
        y = attend(q, k, v, pos, pad)  # base K/V of positions <= i; no diffusion token is a key
        h = h + gate_attn * self.o_proj(y.transpose(1, 2).flatten(2))
        return h + gate_mlp * self.mlp(block.ln_2.modulated(h, dw_mlp, shift_mlp))


def answer_positions(targets):
    """(B, P) positions whose target is not ignored, in order, padded (with ignored positions) to the
    longest row. The path only runs there: diffusion tokens never attend to each other, so leaving
    out prompt positions changes nothing but the cost."""
    valid = targets != IGNORE_INDEX
    count = max(int(valid.sum(1).max()), 1)
    return torch.argsort((~valid).int(), dim=1, stable=True)[:, :count]


def at_positions(x, pos):
    """x (B, T) or (B, T, d) at positions pos (B, P): (B, P) or (B, P, d)."""
    return x.gather(1, pos if x.dim() == 2 else pos[..., None].expand(-1, -1, x.size(-1)))


class L2D(nn.Module):
    def __init__(self, base, config):
        super().__init__()
        self.config = config
        self.base = base.requires_grad_(False).eval()  # frozen: never trained, never changed
        d, d_f, c = base.config.n_embd, config.flow_dim, config.cond_dim
        # W_v (sec. 2): xavier-uniform, zero bias, as the official code. nn.Linear's default bias would
        # add one shared offset to every token's V and make the tokens nearly alike in x_t.
        self.flow_proj = nn.Linear(d, d_f)
        nn.init.xavier_uniform_(self.flow_proj.weight)
        nn.init.zeros_(self.flow_proj.bias)
        self.input_mlp = mlp2(d_f, INPUT_HIDDEN, d)                 # x_t -> h^0
        self.time_mlp = mlp2(TIME_FEATURES, c, c, init=normal_002)  # sinusoidal(t) -> c
        self.class_embed = None  # guidance classes only when asked for (the official default: none)
        if config.num_classes:
            self.class_embed = nn.Embedding(config.num_classes + 1, c)
            normal_002(self.class_embed.weight)
        self.layers = nn.ModuleList(PathLayer(block, config) for block in base.h)
        # w(c) in the merge (sec. 4); no last bias: it would cancel in w(c_t) - w(c_0).
        self.merge_gate = mlp2(c, c, d, zero_last=True, last_bias=False)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode=True):
        super().train(mode)
        self.base.eval()  # the frozen base always runs in inference mode
        return self

    # --- the flow token space (sec. 2) ---------------------------------------------------------
    def flow_embed(self, ids):
        """V[ids] = sqrt(d_f) * normalize(W_v E[ids]): unit norm, then ~unit variance per coordinate.
        Normalised and returned in float32 whatever the compute dtype: x_1, and so x_t, stay float32."""
        e = self.flow_proj(self.base.wte.weight[ids])
        return math.sqrt(self.config.flow_dim) * F.normalize(e.float(), dim=-1)

    def condition_embedding(self, t, labels):
        """c = time_mlp(sinusoidal(t)) + class_embed(label). labels: one per row (B,), one per position
        (the shape of t), or None for the null class."""
        c = self.time_mlp(time_embedding(t))
        if self.class_embed is not None:
            if labels is None:
                labels = torch.full(t.shape[:1], self.config.num_classes, device=t.device)
            if labels.dim() < t.dim():  # one label per row: the same for each of its positions
                labels = labels.view(-1, *[1] * (t.dim() - 1))
            c = c + self.class_embed(labels)
        return c

    def drop_labels(self, labels, shape):
        """Training's labels for classifier-free guidance: each row's label for each of its positions
        (B, P), replaced by null with probability label_dropout independently for every token, as the
        official code does (it expands the label to [B, T] before dropping)."""
        labels = labels[:, None].expand(shape)
        drop = torch.rand(shape, device=labels.device) < self.config.label_dropout
        return labels.masked_fill(drop, self.config.num_classes)

    # --- one evaluation of the path ------------------------------------------------------------
    def conditioning(self, t, labels=None):
        """Everything that depends only on (t, label): each path layer's adaLN modulation and the
        merge gate w(c_t) - w(c_0). Same shapes for c_t and c_0, so the gate is exactly 0 wherever
        t == 0 and the logits there are the base's bit for bit, whatever the path has learned."""
        c = self.condition_embedding(t, labels)
        gate = self.merge_gate(c) - self.merge_gate(self.condition_embedding(torch.zeros_like(t), labels))
        return [layer.modulation(c) for layer in self.layers], gate

    def predict(self, h_main, cache, x_t, t, conditioning, pos=None):
        """Logits (B, P, vocab) for diffusion tokens x_t (B, P, d_f) at times t (B, P), conditioned by
        self.conditioning(t, labels), at positions `pos` (B, P) of the cached sequence (default: its last
        P positions), where the base's hidden states before the final norm are h_main (B, P, d)."""
        sigma = self.config.sigma
        c_in = 1 / torch.sqrt((1 - t) ** 2 * sigma**2 + t**2)  # analytic std of x_t, per coordinate
        h = self.input_mlp(x_t.float() * c_in.float()[..., None])  # scaled in float32, as the official code
        modulations, gate = conditioning
        slots = torch.arange(len(cache) - x_t.size(1), len(cache), device=x_t.device) if pos is None else pos
        rope = self.base.rope(cache.positions(slots))
        for layer, (path_layer, block) in enumerate(zip(self.layers, self.base.h)):
            h = path_layer(h, modulations[layer], block, cache.keys[layer], cache.values[layer], rope, pos, cache.pad)
        return self.base.head(h_main + gate * h)

    # --- training (sec. 3) ---------------------------------------------------------------------
    def noisy_targets(self, targets, t):
        """x_t for the next tokens `targets` (B, P); ignored targets get an arbitrary x_1."""
        x_1 = self.flow_embed(targets.clamp(min=0))
        x_0 = self.config.sigma * torch.randn_like(x_1)
        return (1 - t[..., None]) * x_0 + t[..., None] * x_1

    @torch.no_grad()
    def own_guesses(self, h_main, cache, targets, labels, pos):
        """targets (B, P) with a self_guess share of the answer positions replaced by the path's own
        first guess, its argmax at t = GUESS_T: the token a sampling trajectory then builds x_t from."""
        t = torch.full(targets.shape, GUESS_T, device=targets.device)
        guess = self.predict(h_main, cache, self.noisy_targets(targets, t), t, self.conditioning(t, labels), pos).argmax(-1)
        swap = (torch.rand(targets.shape, device=targets.device) < self.config.self_guess) & (targets != IGNORE_INDEX)
        return torch.where(swap, guess, targets)

    def forward(self, idx, targets, labels=None, t=None, reduction="mean"):
        """Training forward: random t per answer position (unless t (B, T) is given), x_t of the
        next token, and the cross-entropy of the merged logits on targets != -1.
        Returns (logits, loss) with logits (B, P, vocab) at answer_positions(targets); with
        reduction="none" the loss is per position (B, P), 0 where the target is ignored."""
        with torch.no_grad():  # the base is frozen: no graph, no activations kept for it
            h_main, cache = self.base.trunk(idx)
        pos = answer_positions(targets)
        targets, h_main = at_positions(targets, pos), at_positions(h_main, pos)
        t = sample_t(pos.shape, self.config.t_schedule, idx.device) if t is None else at_positions(t, pos)
        if self.class_embed is None:
            labels = None  # an unconditional path: the data's classes are not used
        elif labels is not None and self.training:
            labels = self.drop_labels(labels, pos.shape)
        tokens = targets if not (self.training and self.config.self_guess > 0) else \
            self.own_guesses(h_main, cache, targets, labels, pos)
        logits = self.predict(h_main, cache, self.noisy_targets(tokens, t), t, self.conditioning(t, labels), pos)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)
        return logits, loss if reduction == "mean" else loss.view(targets.shape)

    # --- generation (sec. 5) -------------------------------------------------------------------
    @torch.no_grad()
    def integrate(self, h_main, cache, x_0=None, steps=8, solver="midpoint", atol=1e-5, rtol=1e-5,
                  estimate="argmax", guidance=1.0, labels=None, pos=None, callback=None, memo=None):
        """Integrate dx/dt = (x_hat_1 - x_t) / (1 - t) from noise x_0 (B, P, d_f) at t=0 to t=1 for the
        diffusion tokens at positions `pos` (B, P) of the cache (default: its last P positions), whose
        base hidden states are h_main (B, P, d), and read the logits at t=1. Returns those logits
        (B, P, vocab) and the path evaluations each position took (B, P).
        One step (fixed-step solvers) is no integration: the t=0 logits, the base's own, bit for bit.
        x_0 None: drawn from N(0, sigma^2). Every position is its own ODE row (dopri5 adapts per token).
        estimate: how x_hat_1 is read from the logits (estimate_x1). guidance w != 1: classifier-free,
        v = w v(class) + (1 - w) v(null). callback(info) after each solver step: the solver's info (t, x
        after the step, of the B*P rows) plus "logits", every row's latest logits, and "logits_t", the t
        they were evaluated at (midpoint: the middle of the interval); then once more for the t=1
        read-out, with "readout": True. memo: a FlowMemo kept across the tokens of one sequence."""
        B, P = h_main.shape[:2]
        if steps == 1 and solver != "dopri5":  # one step is the base (sec. 5): no path evaluation
            return self.base.head(h_main), torch.zeros(B, P, dtype=torch.long, device=h_main.device)
        if x_0 is None:
            x_0 = self.config.sigma * torch.randn(B, P, self.config.flow_dim, device=h_main.device)
        memo = FlowMemo() if memo is None else memo
        packed = PackedRows(self, h_main, cache, pos) if solver == "dopri5" else None
        field = VelocityField(self, h_main, cache, labels, pos, estimate, memo, packed)
        velocity = field if guidance == 1.0 else \
            guided(field, VelocityField(self, h_main, cache, None, pos, estimate, memo, packed), guidance)
        x_0 = x_0.flatten(0, 1).double()  # one ODE row per position
        on_step = callback and (lambda info: callback({**info, "logits": field.logits, "logits_t": field.logits_t}))
        if solver == "dopri5":
            x, nfe = dopri5(velocity, x_0, t1=ADAPTIVE_T_END, atol=atol, rtol=rtol, callback=on_step)
        else:
            x, nfe = SOLVERS[solver](velocity, x_0, grid(steps).to(x_0.device), callback=on_step)
        t_end = torch.ones(B * P, device=x_0.device)
        logits = field.path_logits(x, t_end)  # the token is read at t = 1, class-conditional
        if callback is not None:  # the read-out is no solver step: its own call, flagged
            callback({"t": t_end, "x": x, "logits": logits, "logits_t": t_end, "readout": True})
        evaluations_per_velocity = 1 if guidance == 1.0 else 2
        return logits.view(B, P, -1), (nfe * evaluations_per_velocity + 1).view(B, P)

    @torch.no_grad()
    def next_token(self, h_last, cache, steps=8, temperature=0.0, top_k=None, **ode):
        """One new token for each row, from the base's last hidden state h_last (B, 1, d) and its
        cache; `ode` are integrate()'s settings. Returns (token (B,), nfe (B,))."""
        logits, nfe = self.integrate(h_last, cache, steps=steps, **ode)
        return sample_token(logits[:, 0], temperature, top_k), nfe[:, 0].cpu()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, pad=None, **ode):
        """Yield (token (B,), nfe (B,)) per step, as GPT.generate. The base runs once per new token with
        its KV cache; the ODE of `next_token` reuses that token's hidden state and K/V. `pad` (B,):
        rows of idx left-padded to one length (model.KVCache)."""
        cache, memo = KVCache(pad), FlowMemo()
        h, _ = self.base.trunk(idx, cache)
        for _ in range(max_new_tokens):
            token, nfe = self.next_token(h[:, -1:], cache, memo=memo, **ode)
            yield token, nfe
            h, _ = self.base.trunk(token[:, None], cache)

    @torch.no_grad()
    def teacher_forced(self, x, y, labels=None, seeds=None, **ode):
        """The ODE at every answer position at once, with the gold prefix, as training sees them: x, y
        (B, T) from TokenDataset.get_batch (y = -1 off the answer). The base runs once; the diffusion
        tokens never attend to each other, so all positions integrate in parallel. seeds: one per row,
        for the noise of that row's positions (None: the global generator). Returns logits (B, P, V) and
        targets (B, P) at answer_positions(y), nfe (B, P), and where the path ran, base_tokens (B, P),
        the base's argmax, and (fixed-step solvers) trajectory: per solver step (t of its logits, their
        argmax (B, P)), the path's own guesses x_hat_1 along its ODE."""
        pos = answer_positions(y)
        h_main, cache = self.base.trunk(x)
        h_main = at_positions(h_main, pos)
        shape = (x.size(1), self.config.flow_dim)
        if seeds is None:
            noise = torch.randn(x.size(0), *shape, dtype=torch.float64)
        else:  # per-example noise for every position of the row: independent of batching
            noise = torch.stack([torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                                 for s in seeds])
        x_0 = at_positions(self.config.sigma * noise, pos.cpu()).to(x.device)
        trajectory = []  # fixed-step solvers only: dopri5's rows are at different t's
        record = None if ode.get("solver") == "dopri5" else (lambda info: info.get("readout") or trajectory.append(
            (info["logits_t"][0].item(), info["logits"].argmax(-1).view(pos.shape))))
        logits, nfe = self.integrate(h_main, cache, x_0, labels=labels, pos=pos, callback=record, **ode)
        out = dict(logits=logits, targets=at_positions(y, pos), nfe=nfe.cpu())
        if nfe.any():  # where no path ran there is nothing to tell apart from the base
            out.update(base_tokens=self.base.head(h_main).argmax(-1), trajectory=trajectory or None)
        return out
