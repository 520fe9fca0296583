"""
A model's answers to a task's prompts and whether they are right: batched greedy generation (a GPT, an L2D or
an AR2Diff), the final number a math answer states, and the check against the gold answer (math: the final
numbers; HumanEval: the completed function's unit tests, execution.py).
"""

import re
from decimal import Decimal

import torch

from ar2diff import AR2Diff, until_end
from diffusion import L2D
from harness.execution import humaneval_program, run_program

ODE = ("steps", "solver", "atol", "rtol", "estimate", "guidance")  # a setting's keys for an L2D's ODE

# A number: an optional minus sign (not a hyphen after a word or digit, as in "10-3"), an optional $,
# digits with optional thousands commas, an optional decimal part ("42." ending a sentence is 42).
NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def final_number(text):
    """The final answer a text states: the first number after its last "####" (GSM8K's convention), else the
    last number; canonical ("$1,234.50" -> "1234.5", "007" -> "7", "-0" -> "0"). None if there is none."""
    after = NUMBER.findall(text.rpartition("####")[2]) if text and "####" in text else []
    numbers = after[:1] or NUMBER.findall(text or "")[-1:]
    if not numbers:
        return None
    d = Decimal(numbers[0].replace("$", "").replace(",", ""))  # NUMBER's matches are all valid decimals
    return "0" if d == 0 else format(d.normalize(), "f")


def is_correct(task, row, text, gold):
    """Math: the final number of the output `text` is the gold one. HumanEval: the function completed by
    `text` passes the unit tests of its data `row`, run in a child process."""
    if task == "humaneval":
        return int(run_program(humaneval_program(row, text)))
    pred = final_number(text)
    return int(pred is not None and pred == gold)


@torch.no_grad()
def generate_answers(model, prompts, max_new_tokens, stop, setting, labels=None):
    """Greedy continuations of prompts (lists of ids), left-padded to one length, each until a token in `stop`
    (not returned) or max_new_tokens. Per prompt: (answer ids, tokens generated with the stop token, path
    evaluations), and for an AR2Diff with one candidate, the answer after its first step (else None)."""
    device = next(model.parameters()).device
    length = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (length - len(p)) + p for p in prompts], dtype=torch.long, device=device)  # 0: masked
    pad = torch.tensor([length - len(p) for p in prompts], device=device)
    if isinstance(model, AR2Diff):  # the whole answer at once: no stream of tokens
        first = []
        keep = (lambda info: first.append(info["tokens"][:, 0]) if info["step"] == 1 else None) \
            if setting["candidates"] == 1 else None
        spans, _ = model.generate(idx, pad, steps=setting["steps"], samples=setting["candidates"], callback=keep)
        passes = (setting["steps"] + (setting["candidates"] > 1)) * setting["candidates"]
        answers = [until_end(span, stop) for span in spans.tolist()]
        firsts = [until_end(span, stop) for span in first[0].tolist()] if first else [None] * len(answers)
        return [(a, min(len(a) + 1, spans.size(1)), passes, f) for a, f in zip(answers, firsts)]  # + 1: the end token
    ode = dict({key: setting[key] for key in ODE}, labels=labels) if isinstance(model, L2D) else {}
    stream = model.generate(idx, max_new_tokens, temperature=0, pad=pad, **ode)  # (token, nfe) per step, any model
    outs, generated, spent = [[] for _ in prompts], [0] * len(prompts), [0] * len(prompts)
    running = set(range(len(prompts)))
    for tokens, nfe in stream:
        tokens, nfe = tokens.tolist(), nfe.tolist()
        for row in list(running):
            generated[row], spent[row] = generated[row] + 1, spent[row] + nfe[row]
            if tokens[row] in stop:
                running.discard(row)
            else:
                outs[row].append(tokens[row])
        if not running:
            break
    return list(zip(outs, generated, spent))
