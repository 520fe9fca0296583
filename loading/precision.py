"""
Number formats: which dtype the models compute in, and what is stored in it (train.py, sample.py,
eval.py and bench.py take --dtype).

float32: every weight and every operation in float32 (the CPU default).
bfloat16 (or float16): the official code's mixed precision (docs/method.md, sec. 4). Matmuls and
attention run in bf16 under torch.autocast, and the weights nothing trains are *stored* in bf16, half
the bytes, so that autocast has nothing to re-cast on every call:
  - frozen (the base of l2d and lora): stored in bf16;
  - trained: float32 master weights, which autocast casts to bf16 once per forward. This is PyTorch's
    standard AMP: the optimizer, gradient clipping, DDP's all-reduce and the checkpoints stay exactly
    the float32 ones, so resume stays bit-exact and a checkpoint does not depend on the dtype;
  - for generation (sample.py, eval.py) nothing trains: every weight is stored in bf16.
What stays float32 whatever the dtype, as in the official code: the norms (their weights, and the
normalisation, computed on float32 activations: model.Norm), the c_in scaling of x_t and the flow
embeddings V (diffusion.py), softmax and cross-entropy (on .float() logits), and the ODE state (float64).

    dtype = resolve_dtype("bfloat16", "cpu")
    store_weights(model, dtype)                  # for generation; frozen_only=True for training
    with autocast("cpu", dtype): logits = model(idx)[0]
"""

import os
from contextlib import nullcontext

import torch

from configurator import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_bf16_support():
    """What this CPU offers bf16 matmuls, read from /proc/cpuinfo's flags: "AMX" (Intel Sapphire Rapids
    and later: ~6x float32's speed), "AVX-512 BF16" (AMD Zen 4, Intel Cooper Lake), or "none" (bf16 is
    then emulated, tens of times slower than float32); "unknown" off Linux."""
    if not os.path.exists("/proc/cpuinfo"):
        return "unknown"
    with open("/proc/cpuinfo") as f:
        flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX-512 BF16" if "avx512_bf16" in flags else "none"


def resolve_device(name):
    """The torch device --device names ("auto": cuda where there is one, else cpu), checked before anything
    is loaded onto it: a device this machine lacks is a UsageError, not a traceback from deep inside torch."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return name
    backend = getattr(torch, device.type) if device.type in ("cuda", "mps", "xpu") else None
    if backend is None:
        raise UsageError(f"--device {name} is not supported here; use auto, cpu, cuda, cuda:N or mps")
    if not backend.is_available():
        raise UsageError(f"--device {name} is not available on this machine (torch finds no {device.type} device); "
                         "use --device cpu")
    if device.index is not None and device.index >= backend.device_count():
        raise UsageError(f"--device {name}: this machine has {backend.device_count()} {device.type} device(s), "
                         f"numbered from 0; use --device {device.type}:0")
    return name


def resolve_dtype(name, device, log=print):
    """The torch dtype --dtype names: "auto" is bfloat16 on a GPU that has it (else float16) and float32 on
    a CPU (results then match every machine's; bfloat16 is opt-in, and only fast with AMX or AVX-512 BF16).
    Warns through `log`, in one line, when bf16 on this CPU would be emulated."""
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype {name!r}; use one of {', '.join(DTYPES)}")
    cuda = device.startswith("cuda")
    if name == "auto":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    dtype = getattr(torch, name)
    if dtype == torch.bfloat16 and not cuda and cpu_bf16_support() == "none":
        log("warning: this CPU has no bf16 matmul instructions (neither AMX nor AVX-512 BF16): bfloat16 is "
              "emulated and runs tens of times slower than float32 here; --dtype float32 is faster")
    return dtype


def store_weights(model, dtype, frozen_only=False):
    """Store `model`'s weights in `dtype`, in place, except the norms', which stay float32; with frozen_only
    (training) only those that do not require grad, the others being float32 master weights. Returns the
    model. A weight shared by two modules (the tied embedding and LM head, a frozen layer under LoRA) is
    one Parameter, cast once."""
    from model import Norm
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if frozen_only and param.requires_grad:
                param.data = param.data.float()
            elif param.is_floating_point() and not isinstance(module, Norm):
                param.data = param.data.to(dtype)
    return model


def autocast(device, dtype):
    """The context every forward runs in: torch.autocast in a 16-bit dtype, nothing in float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype)
