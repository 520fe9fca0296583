"""ar2diff.py on tiny random GPTs: the corruption, the L(1:2) loss, the prefix-LM mask against a
hand-written attention, the decoder with models whose logits are fixed by hand, and the prompt/answer
batches of dataset.py against the examples they come from."""
import contextlib
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

from ar2diff import AR2Diff, AR2DiffConfig, until_end
from data.dataset import TokenDataset
from model import GPT, GPTConfig, KVCache, attend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from data.arithmetic.prepare import prepare  # noqa: E402

V = 40  # the model's vocabulary; the tokenizer's is smaller (VOCAB), as with a padded embedding
VOCAB = 30


@pytest.fixture(params=["llama", "gpt2"])
def model(request):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(family=request.param, block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=16))
    return AR2Diff(gpt, AR2DiffConfig(answer_len=6, vocab_size=VOCAB, end_token=3)).eval()


def recording(model):
    """Wrap model.base.trunk to record (tokens, bidirectional) of every call."""
    calls, trunk = [], model.base.trunk

    def record(idx, cache=None, bidirectional=False):
        calls.append((idx.clone(), bidirectional))
        return trunk(idx, cache, bidirectional)

    model.base.trunk = record
    return calls


def test_corruption_rate_and_uniform_draws(model):
    """Each token is replaced with probability r; the replacement is uniform over the tokenizer's ids,
    so it equals the clean token 1/VOCAB of the time: the changed fraction is r (1 - 1/VOCAB)."""
    torch.manual_seed(1)
    answer = torch.randint(0, VOCAB, (4, 20000))
    rate = torch.tensor([0.0, 0.3, 0.7, 1.0])
    z = model.corrupt(answer, rate)
    changed = (z != answer).float().mean(1)
    expected = rate * (1 - 1 / VOCAB)
    assert changed[0] == 0
    assert torch.allclose(changed, expected, atol=0.015), (changed, expected)  # ~4 std of 20,000 draws
    counts = torch.bincount(z[3], minlength=V)  # rate 1: every token a uniform draw
    assert counts[VOCAB:].sum() == 0  # never an id past the tokenizer's
    assert counts[:VOCAB].min() > 0.8 * 20000 / VOCAB and counts[:VOCAB].max() < 1.2 * 20000 / VOCAB


def test_loss_is_l1_plus_l2_on_the_argmax_and_the_prompt_is_never_touched(model):
    torch.manual_seed(2)
    prompt, answer = torch.randint(0, VOCAB, (3, 7)), torch.randint(0, VOCAB, (3, 6))
    pad = torch.tensor([0, 2, 1])
    rate = torch.tensor([0.0, 0.5, 1.0])
    calls = recording(model)
    torch.manual_seed(3)
    logits, loss = model(prompt, pad, answer, rate=rate)
    assert len(calls) == 3  # the prompt once (both passes share its K/V), then the two answer passes
    (p_in, p_bi), (z1, z1_bi), (z2, z2_bi) = calls
    assert torch.equal(p_in, prompt) and not p_bi  # the prompt, clean and causal
    assert z1_bi and z2_bi
    assert torch.equal(z1[0], answer[0])  # rate 0: the clean answer
    assert torch.equal(z2, logits.argmax(-1))  # pass 2 reads pass 1's argmax
    torch.manual_seed(3)
    assert torch.equal(model.corrupt(answer, rate), z1)  # the corruption is the model's, seeded

    # the reference: L1 and L2 from the same inputs, computed separately, the argmax a constant
    model.zero_grad()
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cache = model.encode_prompt(prompt, pad)
    l1 = F.cross_entropy(model.denoise(cache, z1).flatten(0, 1), answer.flatten())
    l2 = F.cross_entropy(model.denoise(cache, z2).flatten(0, 1), answer.flatten())
    assert loss.item() == pytest.approx((l1 + l2).item(), rel=1e-6)
    (l1 + l2).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # every weight trains


def test_bidirectional_attention_against_a_hand_written_mask():
    """Every query sees every real key (the new ones included), none of a row's left padding."""
    torch.manual_seed(4)
    B, H, T, S, hd = 2, 2, 3, 7, 4
    q, k, v = torch.randn(B, H, T, hd), torch.randn(B, H, S, hd), torch.randn(B, H, S, hd)
    pad = torch.tensor([0, 3])
    got = attend(q, k, v, pad=pad, bidirectional=True)
    for b in range(B):
        keys = slice(int(pad[b]), S)
        weights = torch.softmax(q[b] @ k[b, :, keys].transpose(-1, -2) / math.sqrt(hd), -1)
        assert torch.allclose(got[b], weights @ v[b, :, keys], atol=1e-6)
    no_pad = attend(q, k, v, bidirectional=True)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1)
    assert torch.allclose(no_pad, weights @ v, atol=1e-6)


def test_prefix_lm_answer_positions_see_each_other_and_the_prompt_is_causal(model):
    torch.manual_seed(5)
    prompt, z = torch.randint(0, VOCAB, (1, 7)), torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        before = model.denoise(model.encode_prompt(prompt), z)
        later = z.clone()
        later[0, -1] = (z[0, -1] + 1) % VOCAB  # the last answer token changes...
        after = model.denoise(model.encode_prompt(prompt), later)
    assert (after - before)[0, :-1].abs().amax(-1).min() > 1e-6  # ...and so does every earlier position
    # the prompt: causal, as the base computes it, and blind to the answer
    with torch.no_grad():
        h_alone, _ = model.base.trunk(prompt)
        cache = model.encode_prompt(prompt)
        model.denoise(cache, z)
    assert len(cache) == 7  # the answer's K/V went to a fork
    keys_alone = KVCache()
    with torch.no_grad():
        model.base.trunk(prompt, keys_alone)
    assert all(torch.equal(a, b) for a, b in zip(cache.keys, keys_alone.keys))


class FixedLogits:
    """A stand-in for AR2Diff.denoise: logits set by hand from the answer span it is given."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, cache, z):
        self.calls += 1
        return self.fn(z)


def one_hot_logits(tokens, margin):
    return margin * F.one_hot(tokens, VOCAB).float()


def test_decoding_reaches_the_tokens_of_fixed_logits(model):
    """Logits that point at z + 1 (mod VOCAB) by a wide margin: each step moves every token by one, so
    after N steps from the uniform start the span is start + N; K candidates in parallel, N + 1 passes."""
    denoise = FixedLogits(lambda z: one_hot_logits((z + 1) % VOCAB, 30.0))
    model.denoise = denoise
    seen = []
    prompt = torch.randint(0, VOCAB, (2, 5))
    torch.manual_seed(6)
    span, _ = model.generate(prompt, steps=4, samples=3, callback=lambda info: seen.append(info["tokens"].clone()))
    assert denoise.calls == 4 + 1
    assert len(seen) == 4 and seen[0].shape == (2, 3, 6)
    for before, after in zip(seen, seen[1:]):
        assert torch.equal(after, (before + 1) % VOCAB)
    torch.manual_seed(6)
    start = model.uniform_tokens((2 * 3, 6), "cpu").view(2, 3, 6)  # the same draw as generate's first
    assert torch.equal(seen[0], (start + 1) % VOCAB)
    assert any(torch.equal(span[b], seen[-1][b, k]) for b in range(2) for k in range(3))

    fixed = torch.tensor([[5, 7, 3, 3, 3, 3], [9, 3, 3, 3, 3, 3]])  # whatever the input: these tokens
    model.denoise = FixedLogits(lambda z: one_hot_logits(fixed.repeat_interleave(z.size(0) // 2, 0), 30.0))
    span, _ = model.generate(prompt, steps=1, samples=1)
    assert model.denoise.calls == 1  # one candidate: no scoring pass
    assert torch.equal(span, fixed)
    assert [until_end(s, {3}) for s in span.tolist()] == [[5, 7], [9]]


def test_reranking_keeps_the_lowest_cross_entropy(model):
    """Candidate k of every prompt is pointed at its own tokens with margin m_k: its score (the mean
    cross-entropy of the logits on it against it) is log(1 + (VOCAB - 1) e^(-m_k)); the widest margin wins."""
    B, K, L = 2, 4, 6
    margins = torch.tensor([1.0, 4.0, 2.0, 0.5])
    targets = torch.arange(B * K * L).view(B * K, L) % VOCAB

    def logits(z):  # the rows are (prompt, candidate) pairs, candidates of a prompt together
        return one_hot_logits(targets, 1.0) * margins.repeat(B)[:, None, None]

    model.denoise = FixedLogits(logits)
    span, score = model.generate(torch.randint(0, VOCAB, (B, 3)), steps=1, samples=K, temperature=0)
    best = int(margins.argmax())
    for b in range(B):
        assert torch.equal(span[b], targets[b * K + best])
    m = margins[best].item()
    want = math.log(1 + (VOCAB - 1) * math.exp(-m))
    assert score.tolist() == pytest.approx([want] * B, rel=1e-4)


def test_prompt_answer_batch_against_the_examples(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        folder = prepare("char", out=str(tmp_path / "d"), n_train=40, n_test=8, digits=2)
    ds = TokenDataset([folder], "test")
    lengths = ds.answer_lengths()
    ix = [0, 3, 5]
    prompt, pad, answer = ds.prompt_answer_batch(ix, answer_len=4)
    for row, e in enumerate(ix):
        tokens, mask = ds.tokens[ds.offsets[e]:ds.offsets[e + 1]], ds.loss_mask[ds.offsets[e]:ds.offsets[e + 1]]
        n_answer = int(mask.sum())
        assert n_answer == lengths[e] and not mask[:len(tokens) - n_answer].any()  # prompt, then answer + end
        assert prompt[row, pad[row]:].tolist() == tokens[:len(tokens) - n_answer].tolist()
        assert (prompt[row, :pad[row]] == ds.eot).all()
        kept = min(n_answer, 4)
        assert answer[row, :kept].tolist() == tokens[len(tokens) - n_answer:][:kept].tolist()
        assert (answer[row, kept:] == ds.eot).all()  # padded with the end token
    assert pad.min() == 0


def test_a_vocabulary_larger_than_the_model_is_refused():
    gpt = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="vocab_size 30"):
        AR2Diff(gpt, AR2DiffConfig(answer_len=4, vocab_size=30))
