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
    dx/dt = v(x, t) = (x_hat_1 - x) / (1 - t)
from t=0 to t=1 (L2D.integrate, with the Velocity below and a solver of solvers.py); one step is
exactly the base model.

    l2d = L2D(base, L2DConfig(variant="lora"))
    logits, loss = l2d(idx, targets, labels)                 # training forward
    for token, nfe in l2d.generate(idx, 64, steps=8): ...    # decoding with the ODE
    stats = l2d.teacher_forced(x, y, steps=8)                # the ODE at every answer position at once

Choices made here (sec. 4-5): GPT-2's path input gets no position embedding (positions reach it
through the base keys it attends to); with guidance the token is read from the class-conditional logits.
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


# Widths the official code fixes, whatever the base (docs/method.md, sec. 4): the sinusoidal features of
# t (128 frequencies, cos and sin halves, as in DiT) and the hidden layer of the input MLP x_t -> h^0.
TIME_FEATURES = 256
INPUT_HIDDEN = 256
# dopri5 stops just short of t=1: a step landing on t=1 meets the velocity defined as 0 there
# (its true limit is x_hat_1 - x_0), fails its error test and the step size collapses. What is
# left, 1e-4 of the noise, is below what the t=1 read-out can notice.
ADAPTIVE_T_END = 1 - 1e-4


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
        logits = self.predict(h_main, cache, self.noisy_targets(targets, t), t, self.conditioning(t, labels), pos)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)
        return logits, loss if reduction == "mean" else loss.view(targets.shape)

    # --- generation (sec. 5) -------------------------------------------------------------------
    @torch.no_grad()
    def integrate(self, velocity, x_0=None, steps=8, solver="midpoint", atol=1e-5, rtol=1e-5):
        """The sampling ODE: dx/dt = velocity(x, t) from noise x_0 (B, P, d_f) at t = 0 (None: drawn from
        N(0, sigma^2)) to t = 1, one row per diffusion token, then the logits read at t = 1 (B, P, vocab) and
        the path evaluations each token took (B, P). One step of a fixed-step solver is no integration:
        the base's logits, bit for bit. dopri5 adapts every token's steps and stops at ADAPTIVE_T_END."""
        h_main = velocity.h_main
        B, P = h_main.shape[:2]
        if steps == 1 and solver != "dopri5":
            return self.base.head(h_main), velocity.evaluations.view(B, P)
        if x_0 is None:
            x_0 = self.config.sigma * torch.randn(B, P, self.config.flow_dim, device=h_main.device)
        x_0 = x_0.flatten(0, 1).double()
        if solver == "dopri5":
            x, _ = dopri5(velocity, x_0, t1=ADAPTIVE_T_END, atol=atol, rtol=rtol, callback=velocity.on_step)
        else:
            x, _ = SOLVERS[solver](velocity, x_0, grid(steps).to(x_0.device), callback=velocity.on_step)
        return velocity.readout(x).view(B, P, -1), velocity.evaluations.view(B, P)

    @torch.no_grad()
    def next_token(self, h_last, cache, steps=8, solver="midpoint", atol=1e-5, rtol=1e-5, temperature=0.0,
                   top_k=None, **field):
        """One new token for each row, from the base's last hidden state h_last (B, 1, d) and its cache;
        `field`: Velocity's settings (estimate, guidance, labels, memo, callback). Returns (token (B,), nfe (B,))."""
        velocity = Velocity(self, h_last, cache, adaptive=solver == "dopri5", **field)
        logits, nfe = self.integrate(velocity, None, steps, solver, atol, rtol)
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
    def teacher_forced(self, x, y, labels=None, seeds=None, steps=8, solver="midpoint", atol=1e-5, rtol=1e-5,
                       **field):
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
        record = None if solver == "dopri5" else (lambda info: info.get("readout") or trajectory.append(
            (info["logits_t"][0].item(), info["logits"].argmax(-1).view(pos.shape))))
        velocity = Velocity(self, h_main, cache, pos, labels, callback=record, adaptive=solver == "dopri5", **field)
        logits, nfe = self.integrate(velocity, x_0, steps, solver, atol, rtol)
        out = dict(logits=logits, targets=at_positions(y, pos), nfe=nfe.cpu())
        if nfe.any():  # where no path ran there is nothing to tell apart from the base
            out.update(base_tokens=self.base.head(h_main).argmax(-1), trajectory=trajectory or None)
        return out


# --- the velocity field of the sampling ODE (sec. 5) ---------------------------------------------
def estimate_x1(logits, t, how, flow_embed, vocab_flow=None):
    """x_hat_1, the path's estimate of the clean token's flow embedding, from its logits (n, vocab) at
    times t (n,): "argmax", V[argmax]; "sample", V of a token drawn at temperature tau(t) = 1 - t
    (explore early, commit late); "mean", the expected embedding softmax(logits) @ V, in float32
    (vocab_flow: V for the whole vocabulary)."""
    if how == "argmax":
        return flow_embed(logits.argmax(-1))
    if how == "sample":
        tau = (1 - t).clamp(min=1e-3)[:, None]
        return flow_embed(torch.multinomial(F.softmax(logits.float() / tau, -1), 1)[:, 0])
    with torch.autocast(logits.device.type, enabled=False):
        return F.softmax(logits.float(), -1) @ vocab_flow


class FlowMemo:
    """What the ODE reuses from one token to the next of a sequence (generate owns one): the (t, label)
    conditioning, since fixed-step solvers visit the same t's for every token, and V for the whole
    vocabulary (estimate="mean")."""

    def __init__(self):
        self.by_t, self.vocab_flow = {}, None

    def shared_conditioning(self, l2d, t, labels):
        """l2d.conditioning of one row, broadcast over a batch whose rows all share one t and label."""
        key = (t[0].item(), None if labels is None else labels[0].item())
        if key not in self.by_t:
            self.by_t[key] = l2d.conditioning(t[:1].view(1, 1).float(), None if labels is None else labels[:1])
        return self.by_t[key]

    def flow_table(self, l2d, device):
        if self.vocab_flow is None:
            self.vocab_flow = l2d.flow_embed(torch.arange(l2d.base.config.vocab_size, device=device))
        return self.vocab_flow


class Velocity:
    """v(x, t) = (x_hat_1 - x) / (1 - t) for the B*P diffusion tokens at positions `pos` (B, P) of the cache
    (default: its last P), whose base hidden states are h_main (B, P, d); in the solvers' shape: x (n, d_f)
    float64, t (n,), n = B*P rows, and `rows` (n',), the rows dopri5 still integrates (None: all).
    Layers around the plain field: guidance w != 1, classifier-free, v = w v(x, t | labels) + (1 - w) v(x, t | null);
    memo, what is reused across tokens (FlowMemo); adaptive (dopri5), the rows still integrating packed into a
    smaller batch (PackedRows), each at its own t; callback(info) after each solver step (its info, with
    "logits", every row's latest logits, and "logits_t", the t they were evaluated at), then once more for the
    t = 1 read-out, with "readout": True. `evaluations` (n,) counts each row's path evaluations, the NFE."""

    def __init__(self, l2d, h_main, cache, pos=None, labels=None, estimate="argmax", guidance=1.0, memo=None,
                 callback=None, adaptive=False):
        self.l2d, self.h_main, self.cache, self.pos, self.labels = l2d, h_main, cache, pos, labels
        self.estimate, self.guidance, self.memo, self.callback = estimate, guidance, memo or FlowMemo(), callback
        self.packed = PackedRows(l2d, h_main, cache, pos) if adaptive else None
        self.evaluations = torch.zeros(h_main.shape[0] * h_main.shape[1], dtype=torch.long, device=h_main.device)
        self.logits = self.logits_t = None
        self.on_step = None if callback is None else \
            (lambda info: callback({**info, "logits": self.logits, "logits_t": self.logits_t}))

    def path_logits(self, x, t, rows, labels):
        """Logits (n, vocab) of the path at x (n, d_f), t (n,)."""
        if rows is not None:
            return self.packed(rows, x.float(), t.float(), labels)
        B, P = self.h_main.shape[:2]
        t_bp = t.view(B, P).float()
        one_t = self.packed is None and bool((t == t[0]).all()) and (labels is None or bool((labels == labels[0]).all()))
        conditioning = self.memo.shared_conditioning(self.l2d, t, labels) if one_t else self.l2d.conditioning(t_bp, labels)
        return self.l2d.predict(self.h_main, self.cache, x.view(B, P, -1).float(), t_bp, conditioning, self.pos).flatten(0, 1)

    def field(self, x, t, rows, labels):
        """(v(x, t | labels), the logits it was read from)."""
        logits = self.path_logits(x, t, rows, labels)
        self.evaluations[slice(None) if rows is None else rows] += 1
        vocab_flow = self.memo.flow_table(self.l2d, x.device) if self.estimate == "mean" else None
        x_hat = estimate_x1(logits, t, self.estimate, self.l2d.flow_embed, vocab_flow).double()
        v = (x_hat - x) / (1 - t[:, None]).clamp(min=1e-12)
        return torch.where(t[:, None] >= 1, torch.zeros_like(v), v), logits  # singular at t=1: defined 0

    def __call__(self, x, t, rows=None):
        rows = None if rows is not None and len(rows) == len(self.evaluations) else rows
        v, logits = self.field(x, t, rows, self.labels)
        self.logits = logits if rows is None else self.logits.index_copy(0, rows, logits)
        self.logits_t = t if rows is None else self.logits_t.index_copy(0, rows, t)
        if self.guidance == 1.0:
            return v
        return self.guidance * v + (1 - self.guidance) * self.field(x, t, rows, None)[0]

    def readout(self, x):
        """The token's logits at t = 1 (class-conditional under guidance): one more path evaluation."""
        t = torch.ones(len(x), device=x.device)
        logits = self.path_logits(x, t, None, self.labels)
        self.evaluations += 1
        if self.callback is not None:  # the read-out is no solver step: its own call, flagged
            self.callback({"t": t, "x": x, "logits": logits, "logits_t": t, "readout": True})
        return logits


# --- dopri5 only: the tokens still integrating ---------------------------------------------------
# Fixed-step solvers evaluate every token at every step. dopri5 stops each token when its error test
# passes, so after a while it evaluates only some rows: they are packed into a smaller batch, which
# costs what those rows cost.
def pack_positions(rows, P):
    """Lay out a sorted subset `rows` (n,) of the B*P flattened positions (B, P) as a smaller batch:
    returns the batch rows they occupy `batch` (B',), `packed` (B', P'), each slot's index into `rows`
    (P' = the most positions any one batch row keeps; spare slots repeat that row's last position),
    and where each of the n positions sits in `packed`: (batch slot (n,), position slot (n,))."""
    batch, row_of = torch.unique_consecutive(rows // P, return_inverse=True)
    counts = torch.bincount(row_of)
    first = counts.cumsum(0) - counts  # index in `rows` of each batch row's first position
    slot_of = torch.arange(len(rows), device=rows.device) - first[row_of]
    slots = torch.arange(int(counts.max()), device=rows.device)
    packed = first[:, None] + torch.minimum(slots, counts[:, None] - 1)
    return batch, packed, (row_of, slot_of)


class PackedRows:
    """The path for some of the B*P diffusion tokens: `rows` (n,), sorted indices into the flattened (B, P),
    with their x_t (n, d_f) and t (n,) -> logits (n, vocab). Each token reads its own batch row's K/V and
    padding, so the tokens are packed into the batch rows they belong to; the copy of those rows' K/V is
    kept while the set of batch rows stays."""

    def __init__(self, l2d, h_main, cache, pos=None):
        B, P = h_main.shape[:2]
        self.l2d, self.h_main, self.cache = l2d, h_main, cache
        self.pos = torch.arange(len(cache) - P, len(cache), device=h_main.device).expand(B, P) if pos is None else pos
        self.batch, self.batch_cache = None, None

    def __call__(self, rows, x_t, t, labels=None):
        B, P = self.h_main.shape[:2]
        batch, packed, (row_of, slot_of) = pack_positions(rows, P)
        if self.batch != batch.tolist():  # copy the K/V of those batch rows (none while all B remain)
            self.batch = batch.tolist()
            self.batch_cache = self.cache if len(batch) == B else self.cache.select(batch)
        flat = rows[packed]  # (B', P') indices into the flattened (B, P)
        t = t[packed]
        conditioning = self.l2d.conditioning(t, None if labels is None else labels[batch])
        logits = self.l2d.predict(self.h_main.flatten(0, 1)[flat], self.batch_cache, x_t[packed], t, conditioning,
                                  self.pos.flatten()[flat])
        return logits[row_of, slot_of]
