"""
The frozen base: one decoder-only transformer that covers two families by config.

- "gpt2":  LayerNorm with bias, learned positions, GELU MLP, biases everywhere, tied head
           (gpt2, gpt2-medium, gpt2-large, gpt2-xl).
- "llama": RMSNorm, rotary positions (RoPE), SwiGLU MLP, grouped-query attention, optional
           q/k/v bias (Qwen2), tied or untied head (SmolLM2, Llama-3.x, Qwen2.5, TinyLlama).

Besides logits, the model exposes exactly what the L2D diffusion path reuses (diffusion.py):
`trunk()` returns the last hidden state *before* the final norm (h_main_L in the paper's merge)
and a KVCache holding every layer's keys (after RoPE) and values.

    model, tokenizer = GPT.from_pretrained("smollm2-135m")   # the embedded offline default
    model, tokenizer = GPT.from_pretrained("gpt2")            # downloads model.safetensors once
    model, tokenizer = GPT.from_pretrained("path/to/hf_folder")
    logits, loss = model(idx, targets)                        # targets: -1 = ignored position
"""

import json
import math
import os
import urllib.request
from dataclasses import dataclass, fields

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
    """LayerNorm (gpt2) or RMSNorm (llama). `modulated` is the diffusion path's adaLN variant:
    the same frozen norm with weight (w_norm + delta) and an extra shift (DiT adaLN-Zero)."""

    def __init__(self, dim, eps, rms):
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if rms else nn.Parameter(torch.zeros(dim))

    def normalize(self, x):
        if self.rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def forward(self, x):
        if self.rms:
            return self.normalize(x) * self.weight
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)

    def modulated(self, x, weight_delta, shift):
        x = self.normalize(x) * (self.weight + weight_delta)
        if self.bias is not None:
            x = x + self.bias
        return x + shift


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
    """Rotate (B, H, T, hd) queries or keys by position. Hugging Face's "rotate_half" layout:
    dimension j is paired with j + hd/2 (GGUF's interleaved pairs are undone in load_gguf.py)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_attention(q, k, v, q_pos=None):
    """Query i sees keys at positions <= its own. By default the T queries are the last T of the
    S key positions; `q_pos` (B, T) places them anywhere (the diffusion path's answer positions).
    Used by the base and by the diffusion path (whose queries attend to the base's K/V)."""
    T, S = q.size(-2), k.size(-2)
    gqa = q.size(1) != k.size(1)
    if q_pos is not None:
        mask = torch.arange(S, device=q.device) <= q_pos[:, None, :, None]  # (B, 1, T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if T == 1:  # one new position sees everything cached
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class KVCache:
    """Each layer's keys (after RoPE) and values for all positions seen so far, (B, H_kv, S, hd).
    Filled by one forward over a whole sequence (training) or token by token (decoding)."""

    def __init__(self):
        self.keys, self.values = [], []

    def __len__(self):
        return self.keys[0].size(2) if self.keys else 0

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
        B, T, _ = x.shape
        return x.view(B, T, n_head, self.head_dim).transpose(1, 2)

    def forward(self, x, rope, cache, layer):
        q = self.split_heads(self.q_proj(x), self.n_head)
        k = self.split_heads(self.k_proj(x), self.n_kv_head)
        v = self.split_heads(self.v_proj(x), self.n_kv_head)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.update(layer, k, v)
        y = causal_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """GELU MLP (gpt2): down(gelu(up(x))), or SwiGLU (llama): down(silu(gate(x)) * up(x)).
    Built from its linear layers so the diffusion path can reuse the formula with its own."""

    def __init__(self, up_proj, down_proj, gate_proj=None):
        super().__init__()
        self.up_proj, self.down_proj, self.gate_proj = up_proj, down_proj, gate_proj

    @classmethod
    def from_config(cls, config):
        bias, d, ff = config.family == "gpt2", config.n_embd, config.ffn_hidden
        gate = nn.Linear(d, ff, bias=False) if config.family == "llama" else None
        return cls(nn.Linear(d, ff, bias=bias), nn.Linear(ff, d, bias=bias), gate)

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
        self.mlp = MLP.from_config(config)

    def forward(self, x, rope, cache, layer):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
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
        """(cos, sin) for positions `pos`, broadcastable over (B, H, T, hd); None for gpt2."""
        if self.wpe is not None:
            return None
        return self.rope_cos[pos], self.rope_sin[pos]

    def trunk(self, idx, cache=None):
        """Run the blocks on tokens `idx` (B, T) that follow the cached positions.
        Returns h (B, T, d), the last hidden state before the final norm, and the KVCache."""
        cache = KVCache() if cache is None else cache
        start, T = len(cache), idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        rope = self.rope(pos)
        for layer, block in enumerate(self.h):
            x = block(x, rope, cache, layer)
        return x, cache

    def head(self, h):
        """Final norm and LM head: hidden states -> logits."""
        return self.lm_head(self.ln_f(h))

    def forward(self, idx, targets=None, cache=None):
        """Logits for every position (B, T, vocab); the mean cross-entropy if targets are given
        (positions whose target is IGNORE_INDEX = -1 are left out)."""
        h, _ = self.trunk(idx, cache)
        logits = self.head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Yield the next token (B,) at each step, decoding with the KV cache: the prompt is
        run once, then each step runs the model on one new token only."""
        cache = KVCache()
        h, _ = self.trunk(idx, cache)
        for _ in range(max_new_tokens):
            token = sample_token(self.head(h[:, -1]), temperature, top_k)
            yield token
            h, _ = self.trunk(token[:, None], cache)

    @classmethod
    def from_pretrained(cls, name_or_path, block_size=None):
        """Load pretrained weights and their tokenizer; returns (model, tokenizer).
        `name_or_path`: "smollm2-135m" (embedded GGUF), a GPT-2 name, or a local HF folder."""
        from tokenizer import get_tokenizer  # the tokenizer travels with the weights
        if name_or_path == "smollm2-135m":
            from load_gguf import load_gguf, smollm2_gguf_path
            hf_config, state_dict = load_gguf(smollm2_gguf_path())
        elif name_or_path in GPT2_SIZES:
            hf_config, state_dict = GPT2_SIZES[name_or_path], load_safetensors(gpt2_file(name_or_path))
        elif os.path.isdir(name_or_path):
            hf_config, state_dict = read_hf_folder(name_or_path)
        else:
            raise ValueError(f"unknown model {name_or_path!r}: use smollm2-135m, "
                             f"{', '.join(GPT2_SIZES)}, or a local Hugging Face folder")
        config = config_from_hf(hf_config)
        if block_size:
            config.block_size = min(config.block_size, block_size)
        model = cls(config)
        convert = gpt2_state_dict if config.family == "gpt2" else llama_state_dict
        ours = convert(state_dict, config)
        if config.family == "gpt2" and block_size:
            ours["wpe.weight"] = ours["wpe.weight"][: config.block_size]
        missing, unexpected = model.load_state_dict(ours, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
        if missing or unexpected:
            raise ValueError(f"checkpoint {name_or_path} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model, get_tokenizer(name_or_path)


def sample_token(logits, temperature=1.0, top_k=None):
    """Pick a token id per row of (B, vocab) logits: argmax at temperature 0, else sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)[:, 0]


# ---------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints (safetensors only: weights are never unpickled).

GPT2_SIZES = {  # config.json values of the four OpenAI GPT-2 checkpoints
    "gpt2": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(model_type="gpt2", n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(model_type="gpt2", n_layer=48, n_head=25, n_embd=1600),
}
CACHE_DIR = os.environ.get("L2D_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "l2d"))


def load_safetensors(path):
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing weights file {path}")
    return {k: v.float() for k, v in load_file(path).items()}


def gpt2_file(name):
    """Path of `name`'s model.safetensors in the cache folder, downloaded from the hub once."""
    path = os.path.join(CACHE_DIR, name, "model.safetensors")
    if os.path.isfile(path):
        return path
    url = f"https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        from tqdm import tqdm
        with urllib.request.urlopen(url, timeout=30) as response, open(path + ".part", "wb") as f:
            bar = tqdm(total=int(response.headers.get("Content-Length", 0)), unit="B", unit_scale=True, desc=name)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        os.replace(path + ".part", path)  # a broken download never looks complete
    except OSError as e:
        raise FileNotFoundError(f"could not download {url} ({e}); put that file at {path} "
                                f"(or set L2D_CACHE to a folder holding {name}/model.safetensors)") from None
    return path


def read_hf_folder(folder):
    """config.json plus model.safetensors, or the shards a model.safetensors.index.json lists."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"missing {config_path} (a Hugging Face model folder needs config.json)")
    with open(config_path) as f:
        hf_config = json.load(f)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state_dict = {}
    for shard in shards:
        state_dict.update(load_safetensors(os.path.join(folder, shard)))
    return hf_config, state_dict


def config_from_hf(c):
    """GPTConfig from the keys of a Hugging Face config.json (gpt2, llama, qwen2, mistral)."""
    if c.get("model_type") == "gpt2":
        return GPTConfig(family="gpt2", block_size=c.get("n_positions", 1024), vocab_size=c.get("vocab_size", 50257),
                         n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                         ffn_hidden=c.get("n_inner") or 0, norm_eps=c.get("layer_norm_epsilon", 1e-5))
    if c.get("model_type") not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"unsupported model_type {c.get('model_type')!r}; use gpt2, llama, qwen2 or mistral")
    return GPTConfig(family="llama", block_size=c.get("max_position_embeddings", 2048),
                     vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"],
                     n_head=c["num_attention_heads"], n_kv_head=c.get("num_key_value_heads", 0),
                     n_embd=c["hidden_size"], ffn_hidden=c["intermediate_size"],
                     qkv_bias=c.get("model_type") == "qwen2" or c.get("attention_bias", False),
                     norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=c.get("rope_theta", 10000.0),
                     rope_scaling=c.get("rope_scaling"), tie_embeddings=c.get("tie_word_embeddings", False))


def gpt2_state_dict(sd, config):
    """HF GPT-2 names (with or without the "transformer." prefix) -> ours. GPT-2 stores its
    linear layers as Conv1D with (in, out) weights, and q, k, v fused in one c_attn."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    ours = {"wte.weight": sd.pop("wte.weight"), "wpe.weight": sd.pop("wpe.weight"),
            "ln_f.weight": sd.pop("ln_f.weight"), "ln_f.bias": sd.pop("ln_f.bias")}
    ours["lm_head.weight"] = sd.pop("lm_head.weight", ours["wte.weight"])
    for i in range(config.n_layer):
        p, q = f"h.{i}.", f"h.{i}."
        for name in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                ours[q + f"{name}.{kind}"] = sd.pop(p + f"{name}.{kind}")
        for kind in ("weight", "bias"):
            qkv = sd.pop(p + f"attn.c_attn.{kind}")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), qkv.split(config.n_embd, dim=-1)):
                ours[q + f"attn.{proj}.{kind}"] = part.t() if kind == "weight" else part
            for hf, mine in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
                w = sd.pop(p + f"{hf}.{kind}")
                ours[q + f"{mine}.{kind}"] = w.t() if kind == "weight" else w
    if sd:
        raise ValueError(f"unexpected GPT-2 tensors: {sorted(sd)[:3]}")
    return {k: v.contiguous() for k, v in ours.items()}


LLAMA_NAMES = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn": "attn"}


def llama_state_dict(sd, config):
    """HF Llama/Qwen2 names -> ours: model.layers.N.self_attn.q_proj -> h.N.attn.q_proj, ..."""
    sd = dict(sd)
    ours = {"wte.weight": sd.pop("model.embed_tokens.weight"), "ln_f.weight": sd.pop("model.norm.weight")}
    ours["lm_head.weight"] = sd.pop("lm_head.weight", ours["wte.weight"])
    for key in list(sd):
        if key.startswith("model.layers.") and not key.endswith("rotary_emb.inv_freq"):
            parts = key.split(".")[2:]  # [N, module, (sub,) weight]
            ours[".".join(["h", parts[0]] + [LLAMA_NAMES.get(x, x) for x in parts[1:]])] = sd.pop(key)
        elif key.endswith("rotary_emb.inv_freq"):
            sd.pop(key)
    if sd:
        raise ValueError(f"unexpected Llama tensors: {sorted(sd)[:3]}")
    return ours
