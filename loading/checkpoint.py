"""Checkpoints: one torch.save'd dict of plain data, loaded with weights_only=True: the MODEL_KEYS that say
what the model is, its weights (l2d, lora: only what trains, the base coming from `init_from`; ar, full,
ar2diff: the whole model), fingerprints of the base's weights and of the vocabulary file (a changed one is
refused: an L2D path on another base, or ids read through another vocabulary, would generate garbage without
a word), the run's `config` and what a resume restores.

    model, tokenizer, ckpt = load("out-quick-l2d/ckpt.pt")   # or load("smollm2-135m"): ckpt is None
    base, tokenizer = load_base("out-quick/ckpt.pt")          # a GPT to finetune (ar2diff's GPT, lora's merged)
"""
import hashlib
import os

import torch

from ar2diff import AR2Diff, AR2DiffConfig
from diffusion import L2D, L2DConfig
from lora import add_lora, merge_lora
from model import GPT, GPTConfig
from loading.pretrained import load_pretrained
from loading.tokenizer import get_tokenizer
from loading.files import write_atomic

WHOLE = ("ar", "full", "ar2diff")  # methods whose checkpoint holds the whole model (l2d, lora: what trained)
MODEL_KEYS = ("method", "init_from", "model_config", "l2d_config", "ar2diff_config", "lora_rank", "lora_alpha",
              "classes")  # what a checkpoint's model is
NEEDS = dict(ar=(), full=(), ar2diff=("ar2diff_config",), l2d=("l2d_config", "init_from"),
             lora=("init_from",))  # what load_model reads to build each method's model, besides model_config, tokenizer


class NonFiniteWeights(ValueError):
    pass


def save_checkpoint(path, ckpt):
    """Write ckpt to path atomically, unless a weight is not finite: a diverged run keeps its last good one."""
    bad = [name for name, w in ckpt["state_dict"].items() if w.is_floating_point() and not torch.isfinite(w).all()]
    if bad:
        kept = f"{path} keeps the last good checkpoint" if os.path.exists(path) else "no checkpoint was written"
        raise NonFiniteWeights(f"not saving {path}: {len(bad)} weight tensor(s) are not finite ({bad[0]}, ...); "
                               f"{kept}")
    write_atomic(path, lambda f: torch.save(ckpt, f))


def read_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found (train one with train.py, or check the path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch.load trips on (zip, pickle, EOF, ...), the file is unusable
        reason = str(e).strip().splitlines()[0].split(". ")[0][:100] if str(e).strip() else ""  # first sentence
        raise ValueError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}: {reason}); "
                         "use an earlier checkpoint or retrain") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") not in NEEDS or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an l2d checkpoint (no known method, or no state_dict); was it written by "
                         "train.py?")
    return ckpt


def fingerprint(model):
    """A short hash of a model's weights (names and bytes): which base an l2d or lora run trained on."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def file_fingerprint(path):
    """A short hash of a file's bytes (a char vocabulary); None for a tokenizer by name (it comes with the base)."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def checkpoint_path(name_or_path):
    """The ckpt.pt that `name_or_path` names (itself, or the one in that folder), or None: pretrained weights."""
    inside = os.path.join(name_or_path, "ckpt.pt")
    if os.path.isfile(inside):
        return inside
    gguf = name_or_path.endswith(".gguf")  # pretrained weights: load_pretrained reads them
    return name_or_path if name_or_path.endswith(".pt") or os.path.isfile(name_or_path) and not gguf else None


def load(name_or_path, block_size=None):
    """(model in eval mode, tokenizer, ckpt) for a train.py ckpt.pt or its folder; ckpt None for pretrained
    weights (cropped to block_size if given)."""
    path = checkpoint_path(name_or_path)
    if path is None:
        model, tokenizer = load_pretrained(name_or_path, block_size)
        return model.eval(), tokenizer, None
    return load_model(path)


def load_base(init_from, block_size=None):
    """A base GPT to finetune and its tokenizer: pretrained weights, or the ckpt.pt of an ar/full run, of an
    ar2diff run (its GPT) or of a lora run (its GPT with the LoRA merged in: the paper's L2D on LoRA)."""
    model, tokenizer, ckpt = load(init_from, block_size)
    if ckpt is None:
        return model, tokenizer
    if ckpt["method"] == "lora":
        return merge_lora(model).requires_grad_(True), tokenizer
    if ckpt["method"] not in WHOLE:
        raise ValueError(f"{init_from} holds a {ckpt['method']} model; a base must come from method=ar, full, "
                         "lora or ar2diff")
    return (model.base if ckpt["method"] == "ar2diff" else model), tokenizer


def build_model(spec, base):
    """The model `spec` (a checkpoint's MODEL_KEYS) describes around `base` (itself for full and ar)."""
    if spec["method"] == "l2d":
        # some checkpoints' l2d_config holds self_guess, a setting of their training, not of the model
        return L2D(base, L2DConfig(**{k: v for k, v in spec["l2d_config"].items() if k != "self_guess"}))
    if spec["method"] == "ar2diff":
        return AR2Diff(base, AR2DiffConfig(**spec["ar2diff_config"]))
    if spec["method"] == "lora":
        return add_lora(base, spec.get("lora_rank", 32), spec.get("lora_alpha", 32.0))
    return base


def trainable_state_dict(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_model(path):
    """(model in eval mode, tokenizer, ckpt) of the checkpoint at `path`. Refused in one line: a checkpoint lacking
    what its model is built from, weights that do not fit it, a base or vocabulary changed since training."""
    ckpt = read_checkpoint(path)
    lacks = [key for key in ("model_config", "tokenizer", *NEEDS[ckpt["method"]]) if ckpt.get(key) is None]
    if lacks:
        raise ValueError(f"checkpoint {path} lacks {', '.join(lacks)}, which its {ckpt['method']} model is built "
                         "from: it is damaged or not from train.py; use another checkpoint or retrain")
    if ckpt["method"] in WHOLE:  # a GPT of model_config: the weights are in the checkpoint
        base, tokenizer = GPT(GPTConfig(**ckpt["model_config"])), get_tokenizer(ckpt["tokenizer"])
    else:  # the frozen base, from init_from
        base, tokenizer = load_base(ckpt["init_from"], ckpt["model_config"]["block_size"])
        if ckpt.get("base_fingerprint") not in (None, fingerprint(base)):
            raise ValueError(f"{path} was trained on another version of its base {ckpt['init_from']} (changed "
                             "since: retrained or resumed?); restore that base, or retrain this model on the new one")
    if ckpt.get("tokenizer_fingerprint") not in (None, file_fingerprint(ckpt["tokenizer"])):
        raise ValueError(f"{path} was trained with the vocabulary {ckpt['tokenizer']}, which has changed since (a "
                         "prepare.py re-run with other options?); restore it, or retrain on the new data")
    model, state = build_model(ckpt, base), ckpt["state_dict"]
    own, trainable = model.state_dict(), {name for name, p in model.named_parameters() if p.requires_grad}
    problems = dict(missing=sorted(trainable - state.keys()), unexpected=sorted(state.keys() - own.keys()),
                    shape=[f"{k} {tuple(v.shape)}, the model's {tuple(own[k].shape)}" for k, v in state.items()
                           if k in own and v.shape != own[k].shape])
    if any(problems.values()):
        raise ValueError(f"checkpoint {path} does not match its model (" + "; ".join(
            f"{what}: {', '.join(names[:3])}" for what, names in problems.items() if names) + "): it is damaged or "
            "from another version; use another checkpoint or retrain")
    model.load_state_dict(state, strict=False)
    return model.eval(), tokenizer, ckpt
