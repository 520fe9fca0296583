"""Training follows the official L2D code (docs/method.md sec. 4, "Initialisation and
optimiser"): one test per fact — the init of every fresh layer, LoRA's init, class conditioning off
unless asked and label dropout per token, AdamW's settings and the warmup/decay schedule. The
references are the formulas themselves (xavier's bound and std, 1/r, log(it + 1) / log(warmup))."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from configurator import defaults
from diffusion import L2D, L2DConfig
from lora import LoRALinear, add_lora
from model import GPT, GPTConfig

VOCAB = 512


def random_base(n_embd=64, seed=0):
    """A small random Llama: its embeddings are N(0, 0.02), like any freshly initialised GPT here."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(family="llama", block_size=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2,
                         n_embd=n_embd)).eval()


def xavier_like(linear):
    """Is the weight xavier-uniform: within +-sqrt(6 / (in + out)), std sqrt(2 / (in + out)) (to 5%),
    filling the range (a normal or kaiming init fails one of the three)?"""
    w = linear.weight.detach()
    bound = math.sqrt(6 / (w.size(0) + w.size(1)))
    return bool(w.abs().max() <= bound and w.abs().max() > 0.98 * bound
                and abs(w.std().item() / math.sqrt(2 / sum(w.shape)) - 1) < 0.05)


def test_fresh_layers_are_initialised_as_the_official_code():
    l2d = L2D(random_base(), L2DConfig(variant="lora", flow_dim=64))
    xavier = [l2d.flow_proj, l2d.input_mlp[0], l2d.input_mlp[2], l2d.merge_gate[0]]
    xavier += [layer.modulation[0] for layer in l2d.layers]
    for linear in xavier:
        assert xavier_like(linear), linear
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    for linear in (l2d.time_mlp[0], l2d.time_mlp[2]):  # N(0, 0.02), zero bias
        assert abs(linear.weight.std().item() / 0.02 - 1) < 0.05 and abs(linear.weight.mean().item()) < 2e-3
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    for linear in [l2d.merge_gate[2]] + [layer.modulation[2] for layer in l2d.layers]:  # adaLN-Zero, w(c)
        assert not linear.weight.any() and (linear.bias is None or not linear.bias.any())


def test_flow_embeddings_of_distinct_tokens_share_no_offset():
    """V = sqrt(d_f) normalize(W_v E): with W_v's bias at zero, distinct tokens of a random base are nearly
    orthogonal (with nn.Linear's default bias their mean cosine was 0.975: all tokens alike in x_t)."""
    l2d = L2D(random_base(), L2DConfig(variant="lora", flow_dim=64))
    with torch.no_grad():
        v = F.normalize(l2d.flow_embed(torch.arange(VOCAB)), dim=-1)
    cosine = v @ v.T
    off_diagonal = cosine[~torch.eye(VOCAB, dtype=torch.bool)]
    assert abs(off_diagonal.mean().item()) < 0.1
    assert v.mean(0).norm() < 0.1  # no direction shared by all tokens (random unit vectors: ~1/sqrt(512))


def test_lora_a_is_normal_with_std_one_over_rank_and_b_is_zero():
    rank = 8
    lora = LoRALinear(nn.Linear(512, 256), rank=rank, alpha=16.0)
    assert abs(lora.lora_A.std().item() * rank - 1) < 0.03 and abs(lora.lora_A.mean().item()) < 0.01
    assert not lora.lora_B.any() and lora.scale == 2.0
    # the same init in both places LoRA is used: the lora path variant and the LoRA baseline
    path = L2D(random_base(), L2DConfig(variant="lora", flow_dim=64, lora_rank=4))
    baseline = add_lora(random_base(), rank=4)
    for model in (path, baseline):
        factors = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert factors
        a = torch.cat([m.lora_A.flatten() for m in factors])
        assert abs(a.std().item() * 4 - 1) < 0.05 and all(not m.lora_B.any() for m in factors)


def test_no_class_embedding_unless_guidance_classes_are_asked():
    assert L2D(random_base(), L2DConfig(flow_dim=64)).class_embed is None
    assert defaults(train.OPTIONS)["guidance_classes"] is False
    l2d = L2D(random_base(), L2DConfig(flow_dim=64, num_classes=3))
    w = l2d.class_embed.weight
    assert w.shape == (4, 256) and abs(w.std().item() / 0.02 - 1) < 0.1  # N(0, 0.02), J classes + null


def test_label_dropout_is_per_token():
    l2d = L2D(random_base(), L2DConfig(flow_dim=64, num_classes=3, label_dropout=0.2)).train()
    labels = torch.arange(300) % 3
    torch.manual_seed(0)
    dropped = l2d.drop_labels(labels, (300, 40))
    null = dropped == 3
    assert abs(null.float().mean().item() - 0.2) < 0.01
    assert torch.equal(dropped[~null], labels[:, None].expand(300, 40)[~null])  # the rest keep their row's label
    mixed = null.any(1) & (~null).any(1)
    assert mixed.float().mean() > 0.9  # two positions of one sequence differ, in almost every row


def test_training_forward_drops_labels():
    """With label_dropout 1 every token is null, so the label given no longer matters; with 0 it does."""
    idx = torch.randint(0, VOCAB, (4, 12))
    targets = torch.randint(0, VOCAB, (4, 12))
    losses = {}
    for p in (0.0, 1.0):
        l2d = L2D(random_base(), L2DConfig(variant="full", flow_dim=64, num_classes=2, label_dropout=p)).train()
        with torch.no_grad():
            for param in l2d.trainable_parameters():
                param.add_(torch.randn_like(param) * 0.05)  # a path that responds to its conditioning
        for label in (0, 1):
            torch.manual_seed(1)
            losses[p, label] = l2d(idx, targets, torch.full((4,), label))[1].item()
    assert losses[0.0, 0] != losses[0.0, 1]
    assert losses[1.0, 0] == losses[1.0, 1]


def test_adamw_settings():
    l2d = L2D(random_base(), L2DConfig(variant="lora", flow_dim=64))
    optimizer = train.make_optimizer(l2d, defaults(train.OPTIONS), "cpu")
    decay, no_decay = optimizer.param_groups
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in optimizer.param_groups)
    assert decay["weight_decay"] == defaults(train.OPTIONS)["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in l2d.named_parameters()}
    assert all(not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(names[id(p)].endswith(".bias") for p in no_decay["params"])  # the path trains no norms
    assert len(decay["params"]) + len(no_decay["params"]) == len(l2d.trainable_parameters())


def test_lr_schedule_is_deepspeed_warmup_decay():
    peak, low, warmup, total = 1e-4, 1e-6, 100, 1000
    cfg = dict(defaults(train.OPTIONS), learning_rate=peak, max_iters=total, lr_decay_iters=0)
    assert cfg["min_lr"] == low and cfg["warmup_iters"] == warmup

    def warm(it):
        return low + (peak - low) * math.log(it + 1) / math.log(warmup)

    for it in (0, 10, 50, 99):
        assert train.lr_at(it, cfg) == pytest.approx(warm(it), rel=1e-12)
    assert train.lr_at(0, cfg) == low
    assert train.lr_at(10, cfg) / peak == pytest.approx(0.52, abs=0.01)   # log spacing: half-way by step 10
    assert train.lr_at(50, cfg) / peak == pytest.approx(0.85, abs=0.01)
    assert train.lr_at(99, cfg) == pytest.approx(peak) == train.lr_at(100, cfg)
    last = total - 1  # then linear, reaching min_lr one past the last step
    assert train.lr_at(last, cfg) == pytest.approx(low + (peak - low) / (total - warmup), rel=1e-12)
    assert train.lr_at(550, cfg) == pytest.approx((peak + low) / 2)
    assert train.lr_at(total, cfg) == pytest.approx(low) == train.lr_at(total + 50, cfg)
    decay = [train.lr_at(it, cfg) for it in range(warmup, total)]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert max(steps) == pytest.approx(min(steps))  # a straight line
    assert train.lr_at(550, {**cfg, "lr_decay_iters": 2000}) > train.lr_at(550, cfg)  # total steps settable
