"""
What an eval.py run evaluates, checked against the model before any work: its rows (the settings: step
counts or tolerances, guidance weights, AR2Diff's candidates) and its examples (a prepared split, with
the prompt ids, gold answers, class labels and stop tokens that generation and scoring need).

    settings, probe_t, teacher_forcing = plan(cfg, model)
    task = load_task(cfg, model, tokenizer, tokenizer_name, model_classes, settings)
"""

import json
import os
from dataclasses import dataclass

import numpy as np

import configurator
from ar2diff import AR2Diff
from configurator import UsageError
from data.dataset import TokenDataset, tokenizer_tag
from diffusion import L2D
from harness.answers import final_number
from loading.tokenizer import stop_tokens
from solvers import SOLVERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST_DEFAULTS = dict(steps=[1, 2, 4, 8, 16, 32], atol=[1e-5], rtol=[1e-5], guidance=[1.0], probe_t=[], candidates=[8])
AR2DIFF_STEPS = [1, 2, 5, 10, 20]  # --steps None for an AR2Diff: a grid around the paper's 10


def parse_list(key, value, kind):
    return configurator.parse_list(key, value, kind, LIST_DEFAULTS[key])


def make_settings(cfg, is_l2d, is_ar2diff=False):
    """The rows to evaluate: dicts of steps, solver, atol, rtol, guidance, estimate (AR2Diff: candidates)."""
    if is_ar2diff:
        steps = AR2DIFF_STEPS if cfg["steps"] is None else parse_list("steps", cfg["steps"], int)
        candidates = parse_list("candidates", cfg["candidates"], int)
        if min(steps) < 1 or min(candidates) < 1:
            raise UsageError("--steps and --candidates must be >= 1")
        return [dict(steps=n, candidates=k, solver=None, atol=None, rtol=None, guidance=1.0, estimate=None)
                for k in candidates for n in steps]
    if not is_l2d:
        return [dict(steps=1, solver=None, atol=None, rtol=None, guidance=1.0, estimate=None)]
    steps, guidance = parse_list("steps", cfg["steps"], int), parse_list("guidance", cfg["guidance"], float)
    atol, rtol = parse_list("atol", cfg["atol"], float), parse_list("rtol", cfg["rtol"], float)
    if cfg["solver"] not in SOLVERS:
        raise UsageError(f"unknown solver {cfg['solver']!r}; use one of {', '.join(SOLVERS)}")
    if cfg["estimate"] not in ("argmax", "sample", "mean"):
        raise UsageError(f"unknown --estimate {cfg['estimate']!r}; use argmax, sample or mean")
    if min(steps) < 1 or min(atol + rtol) <= 0:
        raise UsageError("--steps must be >= 1 and --atol/--rtol > 0")
    if len(atol) != len(rtol) and 1 not in (len(atol), len(rtol)):
        raise UsageError(f"--atol has {len(atol)} values and --rtol {len(rtol)}: give as many, or one of either")
    tolerances = list(zip(atol * (len(rtol) if len(atol) == 1 else 1), rtol * (len(atol) if len(rtol) == 1 else 1)))
    grid = [dict(steps=None, atol=a, rtol=r) for a, r in tolerances] if cfg["solver"] == "dopri5" else \
        [dict(steps=s, atol=atol[0], rtol=rtol[0]) for s in steps]
    return [dict(g, solver=cfg["solver"], guidance=w, estimate=cfg["estimate"])
            for g in grid for w in ([1.0] if g["steps"] == 1 else guidance)]  # steps=1 is the base: no guidance


def setting_name(s):
    name = f"steps={s['steps']}" if s["steps"] is not None else f"atol={s['atol']:g} rtol={s['rtol']:g}"
    name += f" w={s['guidance']:g}" if s["guidance"] != 1.0 else ""
    name += f" K={s['candidates']}" if s.get("candidates") else ""
    return name + (f" estimate={s['estimate']}" if s["estimate"] not in (None, "argmax") else "")


def plan(cfg, model):
    """(settings, probe times, whether to run the teacher-forced pass) for this model, checked."""
    is_l2d, is_ar2diff = isinstance(model, L2D), isinstance(model, AR2Diff)
    teacher_forcing = cfg["teacher_forced"] and not is_ar2diff
    if is_ar2diff and cfg["teacher_forced"]:
        print("note: an AR2Diff model has no next-token logits, so no teacher-forced pass: generation rows only")
    if is_ar2diff and not cfg["generate"]:
        raise UsageError("an AR2Diff model is evaluated by generation only: drop --generate False")
    settings = make_settings(cfg, is_l2d, is_ar2diff) if cfg["generate"] or teacher_forcing else []
    probe_t = parse_list("probe_t", cfg["probe_t"], float)
    if probe_t and (not is_l2d or min(probe_t) < 0 or max(probe_t) > 1):
        raise UsageError("--probe_t takes times in [0, 1] and needs an L2D model")
    if not is_ar2diff and cfg["candidates"] is not None:
        raise UsageError("--candidates is for an AR2Diff model (candidates refined in parallel)")
    if not is_l2d and not is_ar2diff and (cfg["steps"] is not None or cfg["guidance"] is not None):
        print(f"note: {cfg['ckpt']} is not an L2D model: one row, steps=1 (the model itself)")
    return settings, probe_t, teacher_forcing


def example_labels(model, model_classes, ds, label):
    """Class index per example for the model's class embedding, or None (no classes: unconditional)."""
    if not isinstance(model, L2D) or model.class_embed is None:
        if label:
            raise UsageError(f"--label {label!r}: this model was trained without guidance classes; drop --label")
        return None
    null = model.config.num_classes
    if label and label != "null" and label not in model_classes:
        raise UsageError(f"--label {label!r} is not a class of this model (its classes: {', '.join(model_classes)}; or null)")
    if label:
        return np.full(len(ds), null if label == "null" else model_classes.index(label))
    own = np.array([model_classes.index(c) if c in model_classes else null for c in ds.classes])
    return own[ds.labels]


@dataclass
class Task:
    """The examples evaluated: the prepared split (tokens, for teacher forcing), its rows (text), the prompt
    ids, gold final numbers, class labels (None: unconditional) and stop tokens that generation needs."""
    name: str
    data_dir: str
    split: str
    ds: TokenDataset
    rows: list
    n: int
    prompts: list
    golds: list
    labels: object
    stop: set


def load_task(cfg, model, tokenizer, tokenizer_name, model_classes, settings):
    """The prepared split --data/--split names, checked against the model (tokenizer, classes, context)."""
    data_dir, split = cfg["data"] or os.path.join(REPO, "data", cfg["task"], tokenizer_tag(tokenizer_name)), cfg["split"]
    if split not in ("test", "confirm"):
        raise UsageError(f"--split {split!r}: use test, or confirm (a second held-out split, prepare.py --n_confirm)")
    if not os.path.isfile(os.path.join(data_dir, f"{split}.jsonl")):
        raise UsageError(f"no prepared {split} split in {data_dir}: run python -m data.{cfg['task']}.prepare "
                         f"--tokenizer {tokenizer_name}" + (" --n_confirm N" if split == "confirm" else "") + " (or pass --data)")
    ds = TokenDataset([data_dir], split)
    with open(os.path.join(data_dir, f"{split}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    n, probe = min(cfg["limit"] or len(rows), len(rows)), rows[0]["prompt"] + rows[0]["answer"]
    try:
        same = tokenizer.encode(probe, allowed_special="all") == ds.tokenizer.encode(probe, allowed_special="all")
    except ValueError:  # e.g. a character outside a char vocabulary
        same = False
    if not same:
        raise UsageError(f"{data_dir} was prepared with a different tokenizer than the model's; "
                         "prepare the data with --tokenizer matching the model")
    labels = example_labels(model, model_classes, ds, cfg["label"])
    if labels is None and any(s["guidance"] != 1.0 for s in settings):
        raise UsageError("--guidance other than 1 needs an L2D model trained with --guidance_classes=True")
    if cfg["task"] == "humaneval" and "test" not in rows[0]:
        raise UsageError(f"{data_dir} has no HumanEval tests in its rows: prepare it with python -m data.humaneval.prepare")
    prompts = [ds.tokenizer.encode(r["prompt"], allowed_special="all") for r in rows[:n]]
    if isinstance(model, AR2Diff) and max(map(len, prompts)) + model.config.answer_len > model.base.config.block_size:
        raise UsageError(f"the longest prompt of {data_dir} ({max(map(len, prompts))} tokens) and the model's answer "
                         f"span ({model.config.answer_len}) do not fit its context of {model.base.config.block_size}")
    golds = [final_number(r["final"] if r.get("final") is not None else r["answer"]) for r in rows[:n]]
    return Task(cfg["task"], data_dir, split, ds, rows, n, prompts, golds, labels, stop_tokens(tokenizer))
