"""diffusion.py: exact preservation of the base, gradient flow, and agreement between the
training, explicit-x_t and cached (generation) ways of evaluating the diffusion path."""

import math

import pytest
import torch
import torch.nn.functional as F

import diffusion
from diffusion import L2D, L2DConfig, Velocity, pack_positions
from model import GPT, GPTConfig, KVCache

VOCAB = 53

def path_logits(l2d, idx, x_t, t, labels=None):
    """The path's logits at every position for explicit diffusion tokens x_t (B, T, d_f) at t (B, T)."""
    h_main, cache = l2d.base.trunk(idx)
    return l2d.predict(h_main, cache, x_t, t, l2d.conditioning(t, labels))



def tiny_base(family, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(family=family, block_size=32, vocab_size=VOCAB, n_layer=2, n_head=4,
                       n_kv_head=2 if family == "llama" else 0, n_embd=32)
    return GPT(config).eval()


def tiny_l2d(family, variant, num_classes=2, randomize=True):
    l2d = L2D(tiny_base(family), L2DConfig(variant=variant, flow_dim=16, cond_dim=24, num_classes=num_classes))
    if randomize:  # every path parameter random and non-zero, zero-initialised heads included
        with torch.no_grad():
            for p in l2d.trainable_parameters():
                p.copy_(torch.randn_like(p) * 0.1)
    return l2d.eval()


CASES = [(f, v) for f in ("gpt2", "llama") for v in ("lora", "full")]


@pytest.mark.parametrize("family,variant", CASES)
def test_t0_logits_equal_base_bit_for_bit(family, variant):
    l2d = tiny_l2d(family, variant)
    idx = torch.randint(0, VOCAB, (3, 11))
    x_t = torch.randn(3, 11, 16) * 64
    with torch.no_grad():
        base_logits, _ = l2d.base(idx)
        at_zero = path_logits(l2d, idx, x_t, torch.zeros(3, 11), labels=torch.tensor([0, 1, 2]))
        moved = path_logits(l2d, idx, x_t, torch.full((3, 11), 0.5))
    assert torch.equal(at_zero, base_logits)
    assert not torch.allclose(moved, base_logits, atol=1e-3)  # the path does change t > 0


@pytest.mark.parametrize("family,variant", CASES)
def test_steps1_generation_is_base_greedy_decoding(family, variant):
    l2d = tiny_l2d(family, variant)
    idx = torch.randint(0, VOCAB, (2, 5))
    base_tokens = torch.stack([tok for tok, _ in l2d.base.generate(idx, 8, temperature=0)], 1)
    l2d_tokens = torch.stack([tok for tok, _ in l2d.generate(idx, 8, steps=1)], 1)
    assert torch.equal(l2d_tokens, base_tokens)


@pytest.mark.parametrize("family,variant", CASES)
def test_integrate_with_one_step_is_the_base(family, variant):
    """integrate(steps=1), for every caller (generation, teacher-forced eval), is no integration: the
    base's own logits bit for bit and no path evaluation, for any noise; dopri5 always integrates."""
    l2d = tiny_l2d(family, variant)
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        base_logits, _ = l2d.base(idx)
        h_main, cache = l2d.base.trunk(idx)
        for solver in ("euler", "midpoint", "rk4"):
            velocity = Velocity(l2d, h_main, cache, labels=torch.tensor([0, 1]), guidance=2.0)
            logits, nfe = l2d.integrate(velocity, 64 * torch.randn(2, 9, 16), steps=1, solver=solver)
            assert torch.equal(logits, base_logits) and not nfe.any()
        velocity = Velocity(l2d, h_main[:, -1:], cache, adaptive=True)
        logits, nfe = l2d.integrate(velocity, steps=1, solver="dopri5", atol=1e-2, rtol=1e-2)
        assert (nfe > 1).all() and not torch.equal(logits, base_logits[:, -1:])


@pytest.mark.parametrize("family,variant", CASES)
def test_gradients_reach_path_only_and_base_is_unchanged(family, variant):
    l2d = tiny_l2d(family, variant).train()
    base_before = {k: v.clone() for k, v in l2d.base.state_dict().items()}
    idx, targets = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9))
    _, loss = l2d(idx, targets, labels=torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is None for p in l2d.base.parameters())
    named = [(n, p) for n, p in l2d.named_parameters() if p.requires_grad]
    assert named and all(not n.startswith("base.") for n, _ in named)
    missing = [n for n, p in named if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    torch.optim.AdamW(l2d.trainable_parameters(), lr=1e-2).step()
    for k, v in l2d.base.state_dict().items():
        assert torch.equal(v, base_before[k]), k


def test_lora_variant_trains_only_lora_factors_of_the_path_linears():
    l2d = tiny_l2d("llama", "lora", randomize=False)
    linear_names = [n for n, p in l2d.named_parameters() if p.requires_grad and n.startswith("layers.")
                    and "modulation" not in n]
    assert linear_names and all(n.endswith(("lora_A", "lora_B")) for n in linear_names)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_forward_equals_explicit_x_t_forward(family):
    """x_t built by hand from the method's formulas, x_t = (1-t) sigma eps + t sqrt(d_f) normalize(W_v E[y]),
    at every position; the training forward runs the path at answer positions only (rows of different
    answer lengths, so one row is padded) and must agree there."""
    l2d = tiny_l2d(family, "full")
    idx, targets = torch.randint(0, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10))
    targets[0, :3] = -1  # row 0 answers at positions 3..9, row 1 at 5..9
    targets[1, :5] = -1
    t = torch.rand(2, 10)
    labels = torch.tensor([1, 0])
    torch.manual_seed(123)
    logits, loss = l2d(idx, targets, labels, t=t)
    torch.manual_seed(123)
    eps = torch.randn(2, 7, 16)  # the forward draws noise for the 7 answer slots of each row
    noise = torch.zeros(2, 10, 16)
    noise[0, 3:], noise[1, 5:] = eps[0], eps[1, :5]
    with torch.no_grad():
        x_1 = math.sqrt(16) * F.normalize(l2d.base.wte.weight[targets.clamp(min=0)] @ l2d.flow_proj.weight.t()
                                          + l2d.flow_proj.bias, dim=-1)
        x_t = (1 - t[..., None]) * 64.0 * noise + t[..., None] * x_1
        explicit = path_logits(l2d, idx, x_t, t, labels)
    torch.testing.assert_close(logits[0], explicit[0, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, :5], explicit[1, 5:], atol=1e-5, rtol=1e-5)
    valid = targets != -1
    expected_loss = F.cross_entropy(explicit[valid], targets[valid])
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_single_position_equals_full_sequence(family):
    l2d = tiny_l2d(family, "lora")
    idx = torch.randint(0, VOCAB, (2, 12))
    x_t, t = torch.randn(2, 12, 16) * 20, torch.rand(2, 12)
    with torch.no_grad():
        full = path_logits(l2d, idx, x_t, t, labels=torch.tensor([0, 1]))
        cache = KVCache()
        for i in range(12):  # decoding: the base sees one token at a time
            h, _ = l2d.base.trunk(idx[:, i:i + 1], cache)
            t_i = t[:, i:i + 1]
            one = l2d.predict(h, cache, x_t[:, i:i + 1], t_i, l2d.conditioning(t_i, torch.tensor([0, 1])))
            torch.testing.assert_close(one[:, 0], full[:, i], atol=1e-5, rtol=1e-5)


def test_nfe_per_token_matches_the_solver():
    l2d = tiny_l2d("llama", "lora")
    idx = torch.randint(0, VOCAB, (2, 4))
    counts = {("midpoint", 8): 15, ("euler", 4): 4, ("rk4", 3): 9}  # evaluations + 1 read-out at t=1
    for (solver, steps), expected in counts.items():
        for _, nfe in l2d.generate(idx, 2, steps=steps, solver=solver):
            assert nfe.tolist() == [expected, expected]
    for _, nfe in l2d.generate(idx, 2, steps=8, solver="midpoint", guidance=2.0, labels=torch.tensor([0, 0])):
        assert nfe.tolist() == [29, 29]  # guidance: two path evaluations per velocity, one read-out
    for _, nfe in l2d.generate(idx, 2, solver="dopri5"):
        assert (nfe > 1).all()


def test_x1_estimates_and_sampling_run():
    l2d = tiny_l2d("gpt2", "lora")
    idx = torch.randint(0, VOCAB, (1, 4))
    for x1 in ("argmax", "sample", "mean"):
        tokens = [tok for tok, _ in l2d.generate(idx, 3, steps=4, estimate=x1, temperature=0.8, top_k=5)]
        assert all(0 <= tok.item() < VOCAB for tok in tokens)


def test_show_steps_callback_sees_logits_each_step():
    l2d = tiny_l2d("llama", "lora")
    h, cache = l2d.base.trunk(torch.randint(0, VOCAB, (1, 4)))
    seen = []
    l2d.next_token(h[:, -1:], cache, steps=5, solver="euler", callback=lambda info: seen.append(info))
    *steps, readout = seen  # the solver steps, then the t = 1 read-out the token is read from
    assert len(steps) == 4 and all(info["logits"].shape == (1, VOCAB) for info in seen)
    assert [info["logits_t"].item() for info in steps] == [0, 0.25, 0.5, 0.75]  # euler evaluates at the start
    assert readout["readout"] and readout["logits_t"].item() == 1 and not any("readout" in info for info in steps)
    seen.clear()
    l2d.next_token(h[:, -1:], cache, steps=3, callback=lambda info: seen.append(info))  # midpoint: in the middle
    *steps, readout = seen
    assert [info["logits_t"].item() for info in steps] == [0.25, 0.75] and [info["t"].item() for info in steps] == [0.5, 1]
    assert readout["readout"]


def test_shared_conditioning_equals_per_row_conditioning():
    """The ODE computes the (t, label) conditioning once for all rows and reuses it across tokens;
    that must give what computing it for every row gives."""
    l2d = tiny_l2d("llama", "lora")
    idx, labels = torch.randint(0, VOCAB, (3, 9)), torch.tensor([1, 1, 1])
    h, cache = l2d.base.trunk(idx)
    x_t, t = torch.randn(3, 1, 16) * 30, torch.full((3, 1), 0.37)
    with torch.no_grad():
        per_row = l2d.predict(h[:, -1:], cache, x_t, t, l2d.conditioning(t, labels))
        shared = l2d.predict(h[:, -1:], cache, x_t, t, Velocity(l2d, h[:, -1:], cache).shared_conditioning(t.flatten(), labels))
    torch.testing.assert_close(shared, per_row, atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    remembered = [tok for tok, _ in l2d.generate(idx, 4, steps=5, labels=labels)]
    torch.manual_seed(5)
    cache, fresh = KVCache(), []
    h, _ = l2d.base.trunk(idx, cache)
    for _ in range(4):  # a new memo for every token: nothing carried over
        tok, _ = l2d.next_token(h[:, -1:], cache, steps=5, labels=labels, memo={})
        fresh.append(tok)
        h, _ = l2d.base.trunk(tok[:, None], cache)
    assert all(torch.equal(a, b) for a, b in zip(remembered, fresh))


def test_the_memo_stays_bounded_and_gives_the_same_tokens(monkeypatch):
    """Past MEMO_LIMIT distinct t's (e.g. sample.py --steps 100000) the conditioning is recomputed, not kept:
    the memo stays at the limit and the tokens are those of an unbounded memo."""
    l2d = tiny_l2d("llama", "lora")
    idx = torch.randint(0, VOCAB, (2, 5))
    torch.manual_seed(3)
    unbounded = [tok for tok, _ in l2d.generate(idx, 3, steps=6)]  # midpoint: 12 t's per token
    monkeypatch.setattr(diffusion, "MEMO_LIMIT", 4)
    memo, cache = {}, KVCache()
    h, _ = l2d.base.trunk(idx, cache)
    torch.manual_seed(3)
    bounded = []
    for _ in range(3):
        tok, _ = l2d.next_token(h[:, -1:], cache, steps=6, memo=memo)
        bounded.append(tok)
        h, _ = l2d.base.trunk(tok[:, None], cache)
    assert len(memo) == 4 and all(torch.equal(a, b) for a, b in zip(unbounded, bounded))


@pytest.mark.parametrize("family,ode,field", [("gpt2", {}, {}), ("llama", {}, {}),
                                              ("llama", dict(solver="dopri5", atol=1e-4, rtol=1e-4),
                                               dict(estimate="mean", adaptive=True))])
def test_left_padded_batch_integrates_each_row_as_alone(family, ode, field):
    """The ODE for the next token of prompts of different lengths, left-padded into one batch (model.KVCache),
    gives each row's logits as an unpadded batch of one does, from the same noise x_0. With dopri5 (and the
    smooth "mean" estimate) rows take different step counts, so the batch goes on without the rows
    that are done: what is left must still read its own row's keys and padding."""
    l2d = tiny_l2d(family, "lora")
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (6, 2, 4)]
    T = max(len(p) for p in prompts)
    idx = torch.stack([torch.cat([torch.randint(0, VOCAB, (T - len(p),)), p]) for p in prompts])
    pad, labels = torch.tensor([T - len(p) for p in prompts]), torch.tensor([0, 1, 2])
    x_0 = torch.randn(3, 1, 16) * 64
    with torch.no_grad():
        h, cache = l2d.base.trunk(idx, KVCache(pad))
        shapes = []  # the callback sees every row's latest logits, also once some rows are done
        velocity = Velocity(l2d, h[:, -1:], cache, labels=labels, **field,
                            callback=lambda info: shapes.append(info["logits"].shape))
        together, nfe = l2d.integrate(velocity, x_0, steps=4, **ode)
        assert shapes and set(shapes) == {(3, VOCAB)}
        for row, prompt in enumerate(prompts):
            h, cache = l2d.base.trunk(prompt[None])
            velocity = Velocity(l2d, h[:, -1:], cache, labels=labels[row:row + 1], **field)
            alone, alone_nfe = l2d.integrate(velocity, x_0[row:row + 1], steps=4, **ode)
            torch.testing.assert_close(together[row], alone[0], atol=1e-4, rtol=1e-4)
            assert nfe[row] == alone_nfe[0]
    if ode:
        assert len(set(nfe.flatten().tolist())) > 1, nfe  # some rows go on without the others
    else:
        assert nfe.tolist() == [[7], [7], [7]]


def test_pack_positions_by_hand():
    # B=3 rows of P=4 positions; left: row 0's positions 1, 3 and row 2's 0, 1, 2 (row 1 is done)
    rows = torch.tensor([1, 3, 8, 9, 10])
    batch, packed, (row_of, slot_of) = pack_positions(rows, 4)
    assert batch.tolist() == [0, 2]
    assert packed.tolist() == [[0, 1, 1], [2, 3, 4]]  # row 0 has two positions: its last one fills the spare slot
    assert row_of.tolist() == [0, 0, 1, 1, 1] and slot_of.tolist() == [0, 1, 0, 1, 2]
    assert torch.equal(rows[packed][row_of, slot_of], rows)


@pytest.mark.parametrize("family,explicit_pos", [("gpt2", False), ("llama", False), ("llama", True)])
def test_packed_rows_equal_predict_at_those_positions(family, explicit_pos):
    """The path for a subset of the diffusion tokens (what dopri5 evaluates once some have finished) gives
    the logits predict() gives them among all tokens: each reads its own batch row's K/V and padding."""
    l2d = tiny_l2d(family, "lora")
    B, T, P = 3, 7, 3
    idx, pad, labels = torch.randint(0, VOCAB, (B, T)), torch.tensor([0, 4, 2]), torch.tensor([1, 0, 2])
    pos = torch.tensor([[1, 4, 6], [4, 5, 6], [6, 3, 2]]) if explicit_pos else None
    x_t, t = 64 * torch.randn(B, P, 16), torch.rand(B, P)
    with torch.no_grad():
        h, cache = l2d.base.trunk(idx, KVCache(pad))
        h_main = h[:, -P:] if pos is None else h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))
        every = l2d.predict(h_main, cache, x_t, t, l2d.conditioning(t, labels), pos).flatten(0, 1)
        velocity = Velocity(l2d, h_main, cache, pos, adaptive=True)
        for rows in ([1, 2, 6, 8], [3, 4, 5], [5], [0, 4, 8], list(range(B * P))):
            rows = torch.tensor(rows)
            some = velocity.packed_logits(rows, x_t.flatten(0, 1)[rows], t.flatten()[rows], labels)
            torch.testing.assert_close(some, every[rows], atol=1e-5, rtol=1e-5)


# --- LoRA merged for generation -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_lora_gives_the_same_logits_and_leaves_the_base(family):
    """merge_lora folds W + scale B A into copies: the path's logits and a LoRA-finetuned GPT's are those
    of the unmerged layers (fp32 rounding), and the frozen base's own weights are untouched."""
    from lora import LoRALinear, add_lora, merge_lora
    torch.manual_seed(0)
    base = GPT(GPTConfig(family=family, block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    l2d = L2D(base, L2DConfig(variant="lora", flow_dim=8, lora_rank=4, lora_alpha=8.0))
    with torch.no_grad():
        for p in l2d.trainable_parameters():
            p.normal_(0, 0.1)  # a trained path: B and the merge gate are not zero
    idx, t = torch.randint(0, 50, (2, 7)), torch.rand(2, 7)
    x_t = torch.randn(2, 7, 8)
    want = path_logits(l2d, idx, x_t, t)
    merge_lora(l2d)
    assert not any(isinstance(m, LoRALinear) for m in l2d.modules())
    assert torch.allclose(path_logits(l2d, idx, x_t, t), want, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

    gpt = add_lora(GPT(GPTConfig(family=family, block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)), 4, 8.0)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    want = gpt(idx)[0]
    assert torch.allclose(merge_lora(gpt)(idx)[0], want, atol=1e-5)
