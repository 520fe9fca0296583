"""
The frozen base: one decoder-only transformer, two families by config. "gpt2": LayerNorm, learned
positions, GELU, biases, tied head (gpt2...gpt2-xl). "llama": RMSNorm, RoPE, SwiGLU, grouped-query
attention, optional q/k/v bias (Qwen2), tied or untied head (SmolLM2, Llama-3.x, Qwen2.5, TinyLlama).

Besides logits it exposes what the L2D diffusion path reuses (diffusion.py): `trunk()` returns the last
hidden state *before* the final norm (h_main in the merge) and a KVCache of every layer's keys (after
RoPE) and values. Weights: loading/pretrained.py, or loading/checkpoint.py's load(name_or_path).

    model = GPT(GPTConfig(family="llama", n_layer=4, n_head=4, n_embd=128))  # random weights
    logits, loss = model(idx, targets)                                        # targets: -1 = ignored position
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -1  # targets equal to this are left out of the loss (prompt tokens, padding)


@dataclass
class GPTConfig:
    family: str = "gpt2"          # "gpt2" or "llama" (see the module docstring)
    block_size: int = 1024        # longest sequence (learned positions / RoPE table)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0            # grouped-query attention; 0 means n_head (plain multi-head)
    n_embd: int = 768
    ffn_hidden: int = 0           # MLP width; 0 means 4 * n_embd
    qkv_bias: bool = False        # llama family only (Qwen2 has q/k/v biases); gpt2 has all biases
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.x "llama3" frequency scaling, as in config.json
    tie_embeddings: bool = True

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.ffn_hidden = self.ffn_hidden or 4 * self.n_embd
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"unknown model family {self.family!r}; use 'gpt2' or 'llama'")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide by n_head, and n_head by n_kv_head")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama); `modulated`, the diffusion path's adaLN: the same frozen norm
    with weight (w_norm + delta) and a shift (DiT adaLN-Zero). Computed in float32, as the official code,
    on float32 weights (precision.py keeps them so); returned in the input's dtype."""

    def __init__(self, dim, eps, rms):
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if rms else nn.Parameter(torch.zeros(dim))

    def normalize(self, x):
        x = x.float()
        if self.rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def forward(self, x):
        if self.rms:
            return (self.normalize(x) * self.weight).to(x.dtype)
        return F.layer_norm(x.float(), x.shape[-1:], self.weight, self.bias, self.eps).to(x.dtype)

    def modulated(self, x, weight_delta, shift):
        y = self.normalize(x) * (self.weight + weight_delta)
        if self.bias is not None:
            y = y + self.bias
        return (y + shift).to(x.dtype)


def rope_frequencies(config):
    """Inverse frequencies theta^(-2i/head_dim), with Llama-3's long-context rescaling if set."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    s = config.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        # Low frequencies (long wavelengths) are slowed down by `factor`, high ones kept, and the
        # band between them is interpolated smoothly (Llama-3.1's recipe).
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        smooth = smooth.clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    elif s:
        raise ValueError(f"unsupported rope_scaling {s}; only Llama-3's 'llama3' type is implemented")
    return inv_freq


def apply_rope(x, cos, sin):
    """Rotate (B, H, T, hd) queries or keys by position, in Hugging Face's "rotate_half" layout: dimension j
    is paired with j + hd/2 (loading/gguf_file.py undoes GGUF's interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the float32 tables, in bf16 for bf16 queries (as Hugging Face)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend(q, k, v, q_pos=None, pad=None, bidirectional=False):
    """Queries q over the cached keys k and values v, causal unless `bidirectional`: query i sees the slots
    <= its own. The T queries are the last T of the S slots, or at `q_pos` (B, T) (the path's answer
    positions). `pad` (B,): each row's left padding (KVCache.pad), seen by no real query (a padding query
    sees the padding before it, so that its softmax row is not empty). `bidirectional`: every query sees
    every slot but the padding (AR2Diff's answer span, refined as a whole)."""
    T, S = q.size(-2), k.size(-2)
    gqa = q.size(1) != k.size(1)
    if bidirectional:
        real_key = None if pad is None else (torch.arange(S, device=q.device) >= pad[:, None])[:, None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=real_key, enable_gqa=gqa)
    if q_pos is None and pad is None:  # the common cases, without building a mask
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if T == 1:  # one new position sees everything cached
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    slots = torch.arange(S, device=q.device)
    q_pos = slots[S - T:] if q_pos is None else q_pos  # (T,) or (B, T)
    mask = slots <= q_pos[..., None]  # (T, S) or (B, T, S)
    if pad is not None:
        real_key = slots >= pad[:, None, None]  # (B, 1, S)
        padding_query = q_pos[..., None] < pad[:, None, None]  # (B, T, 1)
        mask = mask & (real_key | padding_query)
    if mask.dim() == 3:
        mask = mask[:, None]  # the same for every head
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class KVCache:
    """Each layer's keys (after RoPE) and values so far, (B, H_kv, S, hd), filled by one forward or token by
    token. `pad` (B,) or None: each row's leading left-padding slots, so that prompts of different lengths
    decode as one batch; positions count from a row's first real token and no real token attends to its
    padding: each row decodes as it would alone."""

    def __init__(self, pad=None):
        self.keys, self.values = [], []
        self.pad = pad if pad is not None and bool(pad.any()) else None  # none: attention needs no mask

    def positions(self, slots):
        """Token positions (for RoPE / learned positions) of cache slots (T,) or (B, T)."""
        return slots if self.pad is None else (slots - self.pad[:, None]).clamp(min=0)

    def __len__(self):
        return self.keys[0].size(2) if self.keys else 0

    def fork(self):
        """A cache that grows on its own from here, sharing the tensors safely (update() never writes in
        place): one prompt's K/V under several continuations."""
        new = KVCache()
        new.pad, new.keys, new.values = self.pad, list(self.keys), list(self.values)
        return new

    def select(self, rows):
        """A cache of only the batch rows `rows` (B',): a copy of their keys, values and padding."""
        sub = KVCache(None if self.pad is None else self.pad[rows])
        sub.keys, sub.values = [k[rows] for k in self.keys], [v[rows] for v in self.values]
        return sub

    def update(self, layer, k, v):
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        bias = config.family == "gpt2"
        kv_dim = config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias or config.qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=bias or config.qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=bias or config.qkv_bias)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)

    def split_heads(self, x, n_head):
        return x.view(*x.shape[:2], n_head, self.head_dim).transpose(1, 2)

    def forward(self, x, rope, cache, layer, bidirectional=False):
        q = self.split_heads(self.q_proj(x), self.n_head)
        k = self.split_heads(self.k_proj(x), self.n_kv_head)
        v = self.split_heads(self.v_proj(x), self.n_kv_head)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.update(layer, k, v)
        y = attend(q, k, v, pad=cache.pad, bidirectional=bidirectional)
        return self.o_proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """down(gelu(up(x))) (gpt2) or SwiGLU down(silu(gate(x)) * up(x)) (llama), built from its linear layers
    so that the diffusion path reuses the formula with its own."""

    def __init__(self, up_proj, down_proj, gate_proj=None):
        super().__init__()
        self.up_proj, self.down_proj, self.gate_proj = up_proj, down_proj, gate_proj

    def forward(self, x):
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        rms = config.family == "llama"
        self.ln_1 = Norm(config.n_embd, config.norm_eps, rms)
        self.attn = Attention(config)
        self.ln_2 = Norm(config.n_embd, config.norm_eps, rms)
        bias, d, ff = not rms, config.n_embd, config.ffn_hidden
        gate = nn.Linear(d, ff, bias=False) if rms else None
        self.mlp = MLP(nn.Linear(d, ff, bias=bias), nn.Linear(ff, d, bias=bias), gate)

    def forward(self, x, rope, cache, layer, bidirectional=False):
        x = x + self.attn(self.ln_1(x), rope, cache, layer, bidirectional)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.family == "gpt2" else None
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = Norm(config.n_embd, config.norm_eps, rms=config.family == "llama")
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.family == "llama":
            inv_freq = rope_frequencies(config)
            angles = torch.outer(torch.arange(config.block_size, dtype=torch.float64), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)  # rotate_half layout: (T, head_dim)
            self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
            self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # GPT-2's initialisation; only used for models trained from scratch.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def rope(self, pos):
        """(cos, sin) for positions `pos` (T,) or (B, T), broadcastable over (B, H, T, hd); None for gpt2."""
        if self.wpe is not None:
            return None
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        return (cos, sin) if pos.dim() == 1 else (cos[:, None], sin[:, None])

    def trunk(self, idx, cache=None, bidirectional=False):
        """The blocks on tokens `idx` (B, T) after the cached ones (causal; `bidirectional`: AR2Diff's span).
        Returns h (B, T, d), the last hidden state before the final norm, and the KVCache."""
        cache = KVCache() if cache is None else cache
        start, T = len(cache), idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = cache.positions(torch.arange(start, start + T, device=idx.device))  # (T,) or (B, T)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        rope = self.rope(pos)
        for layer, block in enumerate(self.h):
            x = block(x, rope, cache, layer, bidirectional)
        return x, cache

    def head(self, h):
        """Final norm and LM head: hidden states -> logits."""
        return self.lm_head(self.ln_f(h))

    def forward(self, idx, targets=None, cache=None):
        """Logits (B, T, vocab), and the mean cross-entropy over targets != IGNORE_INDEX if targets are given."""
        h, _ = self.trunk(idx, cache)
        logits = self.head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, pad=None):
        """Yield (token (B,), nfe (B,)) per step with the KV cache: the prompt runs once, then one token a step.
        nfe (path evaluations) is 0: the stream of L2D.generate. `pad` (B,): left padding (KVCache)."""
        cache = KVCache(pad)
        h, _ = self.trunk(idx, cache)
        no_path = torch.zeros(idx.size(0), dtype=torch.long)
        for _ in range(max_new_tokens):
            token = sample_token(self.head(h[:, -1]), temperature, top_k)
            yield token, no_path
            h, _ = self.trunk(token[:, None], cache)


def sample_token(logits, temperature=1.0, top_k=None):
    """Pick a token id per row of (B, vocab) logits: argmax at temperature 0, else sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)[:, 0]
