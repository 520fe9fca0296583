"""
LoRA (Hu et al., 2021): a frozen linear layer plus a trainable low-rank update,
    y = W x + b + (alpha / rank) * B A x,   A: (rank, in) ~ N(0, (1/rank)^2),   B: (out, rank) = 0,
so a freshly wrapped layer computes exactly what the original did. A's init is the official L2D
code's (nn.Linear's kaiming-uniform default has std 1/sqrt(3 in) instead: 1.3x smaller on SmolLM2).

Used twice: by diffusion.py for the "lora" variant of the diffusion path (frozen base q/o/MLP
plus LoRA), and by train.py's `method=lora`, the paper's weight-finetuning baseline. For generation,
merge_lora folds each update into one weight, W + (alpha / rank) B A, so that a LoRA layer costs what
a plain one does (sample.py and eval.py merge after loading; training never does).
"""

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base, rank=32, alpha=32.0):
        super().__init__()
        self.base = base  # shared with the frozen model, never trained here
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / rank)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    @torch.no_grad()
    def merged(self):
        """A plain nn.Linear computing what this layer computes, with its own weight W + scale B A (the
        frozen base layer, which other modules share, is left as it is)."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        linear.weight.copy_(self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype))
        if self.base.bias is not None:
            linear.bias.copy_(self.base.bias)
        return linear.requires_grad_(False)


def add_lora(model, rank=32, alpha=32.0):
    """Freeze `model` and wrap each of its transformer blocks' linear layers (attention q/k/v/o and
    the MLP) in LoRA, in place. Returns the model; only the LoRA factors require grad."""
    model.requires_grad_(False)
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    return model


def merge_lora(model):
    """Replace every LoRALinear inside `model` by its merged nn.Linear, in place, for inference only (the
    LoRA factors are gone afterwards: do not train or save the result). Returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model
