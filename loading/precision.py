"""--device and --dtype. bfloat16 / float16 are the official code's mixed precision (docs/method.md, sec. 4):
matmuls and attention under torch.autocast, frozen weights stored in 16 bits, trained weights kept as float32
masters (so the optimizer, all-reduce and checkpoints stay float32 and resume is bit-exact)."""
import os
from contextlib import nullcontext

import torch

from configurator import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_bf16_support():
    """This CPU's bf16 matmul instructions, from /proc/cpuinfo: "AMX" (~6x float32's speed), "AVX-512 BF16",
    "none" (bf16 emulated, tens of times slower than float32), or "unknown" off Linux."""
    if not os.path.exists("/proc/cpuinfo"):
        return "unknown"
    with open("/proc/cpuinfo") as f:
        flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    return "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "none"


def resolve_device(name):
    """The device --device names ("auto": cuda if any, else cpu); one this machine lacks is a UsageError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    use = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; {use}") from None
    if device.type == "cpu":
        return name
    if device.type not in ("cuda", "mps", "xpu"):
        raise UsageError(f"--device {name} is not supported here; {use}")
    backend = getattr(torch, device.type)
    if not backend.is_available():
        raise UsageError(f"--device {name} is not available on this machine (torch finds no {device.type} device); "
                         "use --device cpu")
    if device.index is not None and device.index >= backend.device_count():
        raise UsageError(f"--device {name}: this machine has {backend.device_count()} {device.type} device(s), "
                         f"numbered from 0; use --device {device.type}:0")
    return name


def resolve_dtype(name, device, log=print):
    """The dtype --dtype names: "auto" is bfloat16 on a GPU that has it (else float16), float32 on a CPU
    (results then match every machine's). Warns through `log` when bf16 on this CPU would be emulated."""
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype {name!r}; use one of {', '.join(DTYPES)}")
    cuda = device.startswith("cuda")
    if name == "auto":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    if name == "bfloat16" and not cuda and cpu_bf16_support() == "none":
        log("warning: this CPU has no bf16 matmul instructions (neither AMX nor AVX-512 BF16): bfloat16 is "
            "emulated and runs tens of times slower than float32 here; --dtype float32 is faster")
    return getattr(torch, name)


def store_weights(model, dtype, frozen_only=False):
    """Store `model`'s weights in `dtype` in place, except the norms' (always float32); with frozen_only
    (training) only those that do not require grad, the others float32 masters. Returns the model."""
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
    return nullcontext() if dtype == torch.float32 else torch.autocast(torch.device(device).type, dtype)
