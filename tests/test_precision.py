"""precision.py: what bf16 stores and computes. The frozen base in bf16 and the norms in float32, the t = 0
exactness of L2D in bf16 (the bf16 base's logits, bit for bit), bf16 close to float32, and the float32
islands (norms, x_t and its c_in scaling, the flow embeddings) computed in float32."""

import pytest
import torch

from diffusion import L2D, L2DConfig, Velocity
from lora import add_lora, merge_lora
from model import GPT, GPTConfig, Norm
from loading.precision import autocast, cpu_bf16_support, resolve_dtype, store_weights

VOCAB = 53
BF16 = torch.bfloat16
CASES = [(f, v) for f in ("gpt2", "llama") for v in ("lora", "full")]

def path_logits(l2d, idx, x_t, t, labels=None):
    """The path's logits at every position for explicit diffusion tokens x_t (B, T, d_f) at t (B, T)."""
    h_main, cache = l2d.base.trunk(idx)
    return l2d.predict(h_main, cache, x_t, t, l2d.conditioning(t, labels))



def tiny_l2d(family, variant, seed=0):
    torch.manual_seed(seed)
    base = GPT(GPTConfig(family=family, block_size=32, vocab_size=VOCAB, n_layer=2, n_head=4,
                         n_kv_head=2 if family == "llama" else 0, n_embd=32))
    l2d = L2D(base, L2DConfig(variant=variant, flow_dim=16, cond_dim=24, num_classes=2))
    with torch.no_grad():  # a trained path: every parameter non-zero, the zero-initialised heads included
        for p in l2d.trainable_parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return l2d.eval()


def dtypes(module):
    return {name: p.dtype for name, p in module.named_parameters()}


def test_training_storage_keeps_what_trains_in_float32_and_the_norms():
    l2d = tiny_l2d("llama", "lora")
    trainable = {name for name, p in l2d.named_parameters() if p.requires_grad}
    store_weights(l2d, BF16, frozen_only=True)
    for name, dtype in dtypes(l2d).items():
        is_norm = ".ln_" in name or name.startswith("base.ln_f")
        assert dtype == (torch.float32 if name in trainable or is_norm else BF16), name
    assert l2d.base.lm_head.weight is l2d.base.wte.weight  # still tied: one Parameter, cast once


def test_generation_storage_halves_the_bytes_of_every_weight_but_the_norms():
    l2d = tiny_l2d("gpt2", "full")
    norms = sum(p.numel() for m in l2d.modules() if isinstance(m, Norm) for p in m.parameters())
    total = sum(p.numel() for p in l2d.parameters())
    store_weights(l2d, BF16)
    assert sum(p.numel() * p.element_size() for p in l2d.parameters()) == 2 * (total - norms) + 4 * norms


def test_norms_compute_in_float32_and_return_the_input_dtype():
    """A bf16 activation is normalised as its float32 value would be, and only the result is rounded: a norm
    computed in bf16 itself (squares, mean, rsqrt in bf16) would differ in the last bits."""
    torch.manual_seed(0)
    for rms in (True, False):
        norm = Norm(64, 1e-5, rms)
        with torch.no_grad():
            norm.weight.normal_()
        x = (torch.randn(4, 7, 64) * 3).to(BF16)
        delta, shift = torch.randn(4, 7, 64).to(BF16), torch.randn(4, 7, 64).to(BF16)
        with autocast("cpu", BF16):
            assert torch.equal(norm(x), norm(x.float()).to(BF16))
            assert torch.equal(norm.modulated(x, delta, shift), norm.modulated(x.float(), delta.float(), shift.float()).to(BF16))
            assert norm(x).dtype == BF16
        in_bf16 = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)) * norm.weight.to(BF16)
        assert not rms or not torch.equal(norm(x), in_bf16)  # the test can tell the two apart


@pytest.mark.parametrize("family,variant", CASES)
@pytest.mark.parametrize("frozen_only", [False, True])  # generation's storage, and training's
def test_t0_logits_are_the_bf16_base_bit_for_bit(family, variant, frozen_only):
    l2d = store_weights(tiny_l2d(family, variant), BF16, frozen_only)
    idx = torch.randint(0, VOCAB, (3, 11))
    x_t = torch.randn(3, 11, 16) * 64
    with torch.no_grad(), autocast("cpu", BF16):
        base_logits, _ = l2d.base(idx)
        at_0 = path_logits(l2d, idx, x_t, torch.zeros(3, 11), labels=torch.tensor([0, 1, 2]))
        at_half = path_logits(l2d, idx, x_t, torch.full((3, 11), 0.5))
    assert base_logits.dtype == BF16
    assert torch.equal(at_0, base_logits)
    assert not torch.allclose(at_half.float(), base_logits.float(), atol=1e-2)  # the path does act at t > 0


@pytest.mark.parametrize("family,variant", CASES)
def test_steps1_generation_in_bf16_is_the_bf16_base(family, variant):
    l2d = store_weights(tiny_l2d(family, variant), BF16)
    idx = torch.randint(0, VOCAB, (2, 5))
    with autocast("cpu", BF16):
        base_tokens = torch.stack([tok for tok, _ in l2d.base.generate(idx, 8, temperature=0)], 1)
        l2d_tokens = torch.stack([tok for tok, _ in l2d.generate(idx, 8, steps=1)], 1)
    assert torch.equal(l2d_tokens, base_tokens)


@pytest.mark.parametrize("family,variant", CASES)
def test_bf16_logits_and_loss_are_close_to_float32(family, variant):
    """The same function in another number format: bf16 logits within bf16's rounding of the float32 ones,
    the loss within a percent (a cast in the wrong place, e.g. t or x_t rounded to bf16, moves it by more)."""
    l2d = tiny_l2d(family, variant)
    idx, targets = torch.randint(0, VOCAB, (4, 12)), torch.randint(0, VOCAB, (4, 12))
    t = torch.rand(4, 12)
    torch.manual_seed(1)
    want, want_loss = l2d(idx, targets, t=t)
    store_weights(l2d, BF16, frozen_only=True)
    torch.manual_seed(1)  # the same noise x_0: it is drawn in float32 in both
    with autocast("cpu", BF16):
        got, loss = l2d(idx, targets, t=t)
    assert got.dtype == BF16 and loss.dtype == torch.float32
    scale = want.abs().max()
    assert (got.float() - want).abs().max() < 0.05 * scale
    assert abs(loss.item() - want_loss.item()) < 0.01 * want_loss.item()


def test_x_t_and_flow_embeddings_stay_float32_in_bf16():
    l2d = store_weights(tiny_l2d("llama", "lora"), BF16)
    with autocast("cpu", BF16):
        v = l2d.flow_embed(torch.arange(VOCAB))
        x_t = l2d.noisy_targets(torch.randint(0, VOCAB, (2, 5)), torch.rand(2, 5))
    assert v.dtype == torch.float32 and x_t.dtype == torch.float32
    assert torch.allclose(v.norm(dim=-1), torch.full((VOCAB,), 16 ** 0.5))  # sqrt(d_f) * unit, in float32


@pytest.mark.parametrize("x1", ["argmax", "mean"])
def test_bf16_ode_keeps_a_float64_state_and_follows_the_float32_one(x1):
    l2d = tiny_l2d("llama", "lora")
    idx = torch.randint(0, VOCAB, (2, 6))
    x_0 = 64 * torch.randn(2, 1, 16)
    h, cache = l2d.base.trunk(idx)
    states = []
    want, _ = l2d.integrate(Velocity(l2d, h[:, -1:], cache, estimate=x1), x_0, steps=4)
    store_weights(l2d, BF16)
    with autocast("cpu", BF16):
        h, cache = l2d.base.trunk(idx)
        velocity = Velocity(l2d, h[:, -1:], cache, estimate=x1, callback=lambda info: states.append(info["x"]))
        got, _ = l2d.integrate(velocity, x_0, steps=4)
    assert all(x.dtype == torch.float64 for x in states)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_merged_lora_in_bf16_matches_the_unmerged_bf16_model():
    torch.manual_seed(0)
    gpt = add_lora(GPT(GPTConfig(family="llama", block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)), 4, 8.0)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    idx = torch.randint(0, 50, (2, 7))
    want = gpt(idx)[0]
    store_weights(merge_lora(gpt), BF16)
    with autocast("cpu", BF16):
        got = gpt(idx)[0]
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def test_dtype_names_and_the_cpu_check():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float32", "cpu") == torch.float32
    said = []
    assert resolve_dtype("bfloat16", "cpu", said.append) == BF16
    assert bool(said) == (cpu_bf16_support() == "none")  # a warning exactly where bf16 is emulated
    assert cpu_bf16_support() in ("AMX", "AVX-512 BF16", "none", "unknown")
    from configurator import UsageError
    with pytest.raises(UsageError, match="unknown --dtype 'bf16'"):
        resolve_dtype("bf16", "cpu")
