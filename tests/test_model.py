"""model.py against checkpoints written in the upstream (Hugging Face) layouts.

The reference forwards below are written independently from model.py, straight from the
upstream tensor layouts: GPT-2's fused Conv1D (in, out) weights and Llama's rotate_half RoPE.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model import GPT, GPTConfig, KVCache
from loading.pretrained import config_from_hf, gpt2_state_dict, llama_state_dict, read_hf_folder

torch.manual_seed(0)

GPT2_HF = dict(model_type="gpt2", n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=97)
LLAMA_HF = dict(model_type="llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                hidden_size=32, intermediate_size=48, vocab_size=97, max_position_embeddings=64,
                rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=False)


def random_gpt2_hf(c, prefix=""):
    d, L, V = c["n_embd"], c["n_layer"], c["vocab_size"]
    r = lambda *s: torch.randn(*s) * 0.2
    sd = {"wte.weight": r(V, d), "wpe.weight": r(c["n_positions"], d), "ln_f.weight": 1 + r(d), "ln_f.bias": r(d)}
    for i in range(L):
        p = f"h.{i}."
        sd |= {p + "ln_1.weight": 1 + r(d), p + "ln_1.bias": r(d), p + "ln_2.weight": 1 + r(d), p + "ln_2.bias": r(d),
               p + "attn.c_attn.weight": r(d, 3 * d), p + "attn.c_attn.bias": r(3 * d),
               p + "attn.c_proj.weight": r(d, d), p + "attn.c_proj.bias": r(d),
               p + "mlp.c_fc.weight": r(d, 4 * d), p + "mlp.c_fc.bias": r(4 * d),
               p + "mlp.c_proj.weight": r(4 * d, d), p + "mlp.c_proj.bias": r(d),
               p + "attn.bias": torch.tril(torch.ones(1, 1, c["n_positions"], c["n_positions"]))}
    return {prefix + k: v for k, v in sd.items()}


def reference_gpt2(sd, c, idx):
    """GPT-2 forward written from the HF tensors: Conv1D y = x @ W + b."""
    d, H = c["n_embd"], c["n_head"]
    T = idx.size(1)
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    ln = lambda x, p: F.layer_norm(x, (d,), sd[p + ".weight"], sd[p + ".bias"], 1e-5)
    for i in range(c["n_layer"]):
        p = f"h.{i}."
        qkv = ln(x, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.view(1, T, H, d // H).transpose(1, 2) for t in qkv.split(d, -1))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // H)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -float("inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(1, T, d)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        m = ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"]
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m**3)))  # GELU, tanh form
        x = x + m @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ sd["wte.weight"].t()


def random_llama_hf(c):
    d, L, V, ff = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    r = lambda *s: torch.randn(*s) * 0.2
    sd = {"model.embed_tokens.weight": r(V, d), "model.norm.weight": 1 + r(d), "lm_head.weight": r(V, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": 1 + r(d), p + "post_attention_layernorm.weight": 1 + r(d),
               p + "self_attn.q_proj.weight": r(d, d), p + "self_attn.k_proj.weight": r(kv, d),
               p + "self_attn.v_proj.weight": r(kv, d), p + "self_attn.o_proj.weight": r(d, d),
               p + "mlp.gate_proj.weight": r(ff, d), p + "mlp.up_proj.weight": r(ff, d),
               p + "mlp.down_proj.weight": r(d, ff)}
    return sd


def reference_llama(sd, c, idx):
    """Llama forward from the HF tensors: RMSNorm, rotate_half RoPE, GQA by repeating K/V heads."""
    d, H, Hkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd, T = d // H, idx.size(1)
    rms = lambda x, w: w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c["rms_norm_eps"])
    inv = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda t: t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin
    x = sd["model.embed_tokens.weight"][idx]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        u = rms(x, sd[p + "input_layernorm.weight"])
        q = (u @ sd[p + "self_attn.q_proj.weight"].t()).view(1, T, H, hd).transpose(1, 2)
        k = (u @ sd[p + "self_attn.k_proj.weight"].t()).view(1, T, Hkv, hd).transpose(1, 2)
        v = (u @ sd[p + "self_attn.v_proj.weight"].t()).view(1, T, Hkv, hd).transpose(1, 2)
        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -float("inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(1, T, d) @ sd[p + "self_attn.o_proj.weight"].t()
        u = rms(x, sd[p + "post_attention_layernorm.weight"])
        g = u @ sd[p + "mlp.gate_proj.weight"].t()
        x = x + (g * torch.sigmoid(g) * (u @ sd[p + "mlp.up_proj.weight"].t())) @ sd[p + "mlp.down_proj.weight"].t()
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].t()


def write_folder(tmp_path, hf_config, sd):
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def load_folder(folder):
    # load_pretrained also loads a tokenizer; these tests are about the weights only.
    hf_config, sd = read_hf_folder(folder)
    config = config_from_hf(hf_config)
    model = GPT(config)
    convert = gpt2_state_dict if config.family == "gpt2" else llama_state_dict
    ours = convert(sd, config)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


@pytest.mark.parametrize("prefix", ["", "transformer."])  # hub files vs save_pretrained files
def test_gpt2_upstream_layout(tmp_path, prefix):
    sd = random_gpt2_hf(GPT2_HF, prefix)
    model = load_folder(write_folder(tmp_path, GPT2_HF, sd))
    idx = torch.randint(0, 97, (1, 20))
    plain = {k.removeprefix(prefix): v for k, v in sd.items()}
    torch.testing.assert_close(model(idx)[0], reference_gpt2(plain, GPT2_HF, idx), atol=1e-5, rtol=1e-5)


def test_llama_upstream_layout(tmp_path):
    sd = random_llama_hf(LLAMA_HF)
    model = load_folder(write_folder(tmp_path, LLAMA_HF, sd))
    idx = torch.randint(0, 97, (1, 20))
    torch.testing.assert_close(model(idx)[0], reference_llama(sd, LLAMA_HF, idx), atol=1e-5, rtol=1e-5)


def test_sharded_folder(tmp_path):
    sd = random_llama_hf(LLAMA_HF)
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_HF))
    model = load_folder(str(tmp_path))
    idx = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(model(idx)[0], reference_llama(sd, LLAMA_HF, idx), atol=1e-5, rtol=1e-5)


def test_transformers_agrees(tmp_path):
    """Optional: the same tiny checkpoints through Hugging Face transformers."""
    transformers = pytest.importorskip("transformers")
    for hf_config, sd in ((GPT2_HF, random_gpt2_hf(GPT2_HF)), (LLAMA_HF, random_llama_hf(LLAMA_HF))):
        folder = tmp_path / hf_config["model_type"]
        folder.mkdir()
        write_folder(folder, hf_config, sd)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        idx = torch.randint(0, 97, (1, 12))
        with torch.no_grad():
            torch.testing.assert_close(load_folder(str(folder))(idx)[0], theirs(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_matches_full_sequence(family):
    config = GPTConfig(family=family, block_size=32, vocab_size=61, n_layer=2, n_head=4,
                       n_kv_head=2 if family == "llama" else 0, n_embd=32)
    model = GPT(config).eval()
    idx = torch.randint(0, 61, (3, 17))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache()
        pieces = [model(idx[:, :5], cache=cache)[0]]  # a prompt, then one token at a time
        pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 17)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    assert len(cache) == 17


def left_pad(prompts, filler):
    """Rows of different lengths -> (B, T) left-padded with `filler` tokens, and the pad counts (B,)."""
    T = max(len(p) for p in prompts)
    idx = torch.stack([torch.cat([filler[:T - len(p)], p]) for p in prompts])
    return idx, torch.tensor([T - len(p) for p in prompts])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_decodes_each_row_as_alone(family):
    """Prompts of different lengths decoded together give what each gives alone (the reference: an
    unpadded batch of one, no mask), whatever tokens the padding holds."""
    config = GPTConfig(family=family, block_size=32, vocab_size=61, n_layer=2, n_head=4,
                       n_kv_head=2 if family == "llama" else 0, n_embd=32)
    model = GPT(config).eval()
    prompts = [torch.randint(0, 61, (n,)) for n in (3, 7, 5)]
    idx, pad = left_pad(prompts, torch.randint(0, 61, (7,)))
    with torch.no_grad():
        h, _ = model.trunk(idx, KVCache(pad))
        unmasked, _ = model.trunk(idx)  # the same batch read as if the filler were text
        for row, prompt in enumerate(prompts):
            alone, _ = model.trunk(prompt[None])
            torch.testing.assert_close(h[row, pad[row]:], alone[0], atol=1e-5, rtol=1e-5)
            if pad[row] > 0:
                assert not torch.allclose(unmasked[row, pad[row]:], alone[0], atol=1e-3)
    together = torch.stack([tok for tok, _ in model.generate(idx, 6, temperature=0, pad=pad)], 1)
    for row, prompt in enumerate(prompts):
        alone = torch.stack([tok for tok, _ in model.generate(prompt[None], 6, temperature=0)], 1)
        assert torch.equal(together[row], alone[0])


def test_loss_ignores_minus_one():
    model = GPT(GPTConfig(block_size=16, vocab_size=31, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 31, (2, 8))
    targets = torch.randint(0, 31, (2, 8))
    targets[:, :3] = -1
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 3:].reshape(-1, 31), targets[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_greedy_generate_matches_argmax_of_full_forward():
    model = GPT(GPTConfig(family="llama", block_size=32, vocab_size=41, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 41, (2, 4))
    tokens = torch.stack([tok for tok, _ in model.generate(idx, 6, temperature=0)], 1)
    seq = idx
    for _ in range(6):  # no cache: rerun the whole sequence each step
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, seq[:, 4:])


def test_too_long_sequence_is_a_clear_error():
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_download_file_is_whole_or_absent(tmp_path):
    """pretrained.download_file (weights, and the prepare scripts' data) writes the bytes it fetched under
    the target's name only once they are all there; a failed fetch leaves neither the file nor a .part."""
    from loading.pretrained import download_file
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 5000)
    target = tmp_path / "cache" / "copy.bin"
    download_file(source.as_uri(), str(target))
    assert target.read_bytes() == source.read_bytes() and not (tmp_path / "cache" / "copy.bin.part").exists()
    with pytest.raises(OSError):
        download_file((tmp_path / "missing.bin").as_uri(), str(tmp_path / "cache" / "other.bin"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["copy.bin"]


def test_gpt2_offline_download_names_the_file(tmp_path, monkeypatch):
    """No network: a one-line error that says which file to put where, and no half-written file."""
    import urllib.request
    from loading import pretrained as pretrained_module

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(pretrained_module, "CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        pretrained_module.load_pretrained("gpt2")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "gpt2" / "model.safetensors") in message
    assert "huggingface.co" in message
    assert not (tmp_path / "gpt2" / "model.safetensors").exists()
