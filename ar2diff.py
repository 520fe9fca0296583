"""
AR2Diff (Han et al., 2024, "Transfer Learning for Text Diffusion Models"; docs/method.md sec. 7): the
pretrained decoder-only GPT of model.py, every weight trained, turned into a *discrete* text-diffusion
model (a simplified SUNDAE). Where L2D refines each next token in a continuous space around a frozen
base, AR2Diff refines the whole answer at once, in token space:

  answer span  L = config.answer_len tokens: the answer, its end token, then end tokens up to L (there is
               no length predictor: the padding is a target, and teaches the length)
  attention    prefix-LM. The prompt stays causal, as in pretraining, and never sees the answer, so its
               K/V are computed once and shared by both passes of the loss and by every refinement step
               and candidate; each answer position sees the whole prompt and the whole answer span
               (GPT.trunk(..., bidirectional=True)).
  corruption   per example a rate r ~ U(0, 1); each answer token (padding included) is replaced with
               probability r by a token drawn uniformly from the vocabulary. The prompt is never corrupted.
  loss L(1:2)  L1 = cross-entropy of f(z) against the clean answer at every answer position; then
               z2 = argmax f(z) (temperature 0; an index, so no gradient flows through it) is fed back as
               the answer span and L2 is the same cross-entropy of f(z2). Loss = L1 + L2: the model learns
               to mend its own first guesses, which is what decoding feeds it.
  decoding     z ~ uniform tokens; N steps, each replacing every token of z by a draw from f(z) at
               temperature 0.2; K candidates in parallel, and the one whose final z the model scores best
               (the lowest cross-entropy of f(z) against z) is returned, read up to its first end token.

    model = AR2Diff(gpt, AR2DiffConfig(answer_len=8, vocab_size=tokenizer.n_vocab, end_token=eot))
    prompt, pad, answer = dataset.prompt_answer_batch(indices, model.config.answer_len)
    logits, loss = model(prompt, pad, answer)                 # loss = L1 + L2; logits: pass 1's
    answers, scores = model.generate(prompt, pad, steps=10, samples=8)
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import KVCache, sample_token

TEMPERATURE = 0.2  # the paper's draw at every refinement step


@dataclass
class AR2DiffConfig:
    answer_len: int = 16  # L: the answer span refined as a whole (answer, end token, end-token padding)
    vocab_size: int = 0   # ids of the uniform draws (corruption, decoding's start) and of the logits: the tokenizer's
    end_token: int = 0    # ends each answer and pads the span: the data's end token


class AR2Diff(nn.Module):
    def __init__(self, base, config):
        super().__init__()
        self.base, self.config = base, config  # every weight of the base trains
        if not 0 < config.vocab_size <= base.config.vocab_size:
            raise ValueError(f"AR2Diff's vocab_size {config.vocab_size} must be in 1..{base.config.vocab_size}, "
                             "the model's vocabulary")

    def encode_prompt(self, prompt, pad=None):
        """The prompt's K/V (B, P), causal as the base computes them; pad (B,): left padding (KVCache)."""
        _, cache = self.base.trunk(prompt, KVCache(pad))
        return cache

    def denoise(self, cache, z):
        """f(z): logits (B, L, vocab_size) of the clean answer, from the answer span z (B, L) that follows
        the prompt in `cache` (left as it is: z's K/V go to a fork of it)."""
        h, _ = self.base.trunk(z, cache.fork(), bidirectional=True)
        return self.base.head(h)[..., :self.config.vocab_size]  # ids past the tokenizer's are never drawn

    def uniform_tokens(self, shape, device):
        return torch.randint(0, self.config.vocab_size, shape, device=device)

    def corrupt(self, answer, rate):
        """answer (B, L) with each token replaced, with probability rate (B,) of its row, by a uniform draw
        (which may happen to be the same token)."""
        replace = torch.rand(answer.shape, device=answer.device) < rate[:, None]
        return torch.where(replace, self.uniform_tokens(answer.shape, answer.device), answer)

    def forward(self, prompt, pad, answer, rate=None):
        """(pass 1's logits (B, L, vocab_size), loss L1 + L2), the mean cross-entropy over every answer
        position of each pass. rate (B,): each example's corruption rate; None: drawn from U(0, 1)."""
        if rate is None:
            rate = torch.rand(answer.size(0), device=answer.device)
        cache = self.encode_prompt(prompt, pad)
        logits = self.denoise(cache, self.corrupt(answer, rate))
        loss1 = F.cross_entropy(logits.flatten(0, 1).float(), answer.flatten())
        guess = logits.argmax(-1)
        loss2 = F.cross_entropy(self.denoise(cache, guess).flatten(0, 1).float(), answer.flatten())
        return logits, loss1 + loss2

    @staticmethod
    def score(logits, z):
        """The model's score of each answer span z (n, L) it was given: the mean cross-entropy of its own
        logits (n, L, V) on z against z. Low: the model would keep z as it is."""
        return F.cross_entropy(logits.float().transpose(1, 2), z, reduction="none").mean(1)

    @torch.no_grad()
    def generate(self, prompt, pad=None, steps=10, samples=8, temperature=TEMPERATURE, callback=None):
        """Answer spans (B, L) for prompts (B, P), left-padded by pad (B,), and their scores (B,).
        `steps` refinements of `samples` candidates per prompt, in parallel; with samples > 1 one more
        pass scores the final candidates and each prompt keeps its lowest (with samples = 1 the score is
        that of the last step's logits on their own draw, which costs nothing). Model passes over the span:
        steps + (samples > 1). callback(dict(step, tokens (B, K, L))) after each refinement step."""
        B, K, L = prompt.size(0), samples, self.config.answer_len
        rows = torch.arange(B, device=prompt.device).repeat_interleave(K)
        cache = self.encode_prompt(prompt, pad).select(rows)  # each prompt's K/V once, shared by its candidates
        z = self.uniform_tokens((B * K, L), prompt.device)
        for step in range(steps):
            logits = self.denoise(cache, z)
            z = sample_token(logits.flatten(0, 1), temperature).view(B * K, L)
            if callback is not None:
                callback(dict(step=step + 1, tokens=z.view(B, K, L)))
        if K > 1:
            logits = self.denoise(cache, z)
        scores = self.score(logits, z).view(B, K)
        best = scores.argmin(1)
        pick = torch.arange(B, device=prompt.device)
        return z.view(B, K, L)[pick, best], scores[pick, best]


def check_answer_span(answer_len, data, block_size):
    """Refuse an answer span that no training example can use: shorter than every answer with its end token
    (the model would never learn where to stop), or too long for the context after the longest prompt."""
    answers = data.answer_lengths()
    if answer_len < answers.min():
        raise ValueError(f"--answer_len {answer_len} is shorter than every train answer with its end token "
                         f"({answers.min()} to {answers.max()} tokens): raise it, or 0 for the longest")
    longest_prompt = int((data.offsets[1:] - data.offsets[:-1] - answers).max())
    if longest_prompt + answer_len > block_size:
        raise ValueError(f"the longest train prompt ({longest_prompt} tokens) and the answer span (--answer_len "
                         f"{answer_len}) do not fit block_size {block_size}: lower --answer_len, or raise --block_size")


def until_end(span, end_tokens):
    """The answer in a span (a list of ids): the tokens before the first end token."""
    for i, token in enumerate(span):
        if token in end_tokens:
            return span[:i]
    return span
