"""
Evaluate a model on the test split of a prepared math task. The base model, a LoRA/full finetune and
an L2D checkpoint all go through the same command, so their rows are comparable.

    python eval.py --ckpt out-quick-l2d/ckpt.pt --task arithmetic --steps 1,2,4,8,16 --limit 200
    python eval.py --ckpt out-quick/ckpt.pt --task arithmetic            # a GPT (ar/full/lora): one row
    python eval.py --ckpt smollm2-135m --task gsm8k --limit 100          # a base model by name or HF folder
    python eval.py --ckpt out/ckpt.pt --task humaneval --steps 1,2,4 --x1 sample --max_new_tokens 384   # pass@1
    python eval.py --ckpt out/ckpt.pt --task gsm8k --teacher_forced False --steps 1,8 --gen_batch_size 16
    python eval.py --ckpt out/ckpt.pt --task gsm8k --solver dopri5 --atol 1e-3,1e-4 --rtol 1e-3,1e-4
    python eval.py --ckpt out/ckpt.pt --task gsm8k --steps 8 --guidance 1,1.5,2 --label math
    python eval.py --ckpt out/ckpt.pt --task arithmetic --probe_t 0,0.5,0.9,0.99,1 --generate False --teacher_forced False
    python eval.py --ckpt out-lab-ar2diff/ckpt.pt --data data/arithmetic/lab-mul --steps 1,2,5,10,20 --samples 1,4,8

One row per setting: each step count (fixed-step solvers) or each (atol, rtol) pair (dopri5), times
each guidance weight. A model that is not an L2D gets a single row, steps=1 (the model itself), but
an AR2Diff (ar2diff.py), which gets a row per refinement step count (--steps, default 1,2,5,10,20) times
candidates K (--samples, default 8): its whole answer span refined --steps times, every token redrawn at
temperature 0.2 (the paper's), K candidates in parallel, the one it scores best kept. Its nfe/tok counts
passes over the span (steps, + 1 to score when K > 1) times K, per answer token; it has no teacher-forced
pass (no next-token logits), and its "vs steps=1" is the row with one refinement and the same K.
  acc [95% CI]  greedy generation (temperature 0, stopping at the data's end token or max_new_tokens);
                correct when final_number(output) equals the gold final answer; for --task humaneval,
                pass@1: the completed function passes its unit tests, run in a child process with a
                time limit, no network, in a temporary directory (execution.py). Wilson score interval.
  nfe/tok       diffusion-path evaluations per generated token, as L2D.next_token counts them: 0 for
                the base alone (steps=1, or a GPT), 15 for midpoint with 8 steps (7 x 2 + 1), 29 with
                guidance (each velocity costs two, the read-out one). The base's own forward (once per
                token) is not counted.
  tok/s         generated tokens per second (prefill included), --gen_batch_size prompts at a time.
  tf_acc tf_nll teacher-forced next-token accuracy and mean NLL (nats) over the answer tokens and the
                end token (the positions train.py's loss uses), with the gold prefix: the base runs
                once on prompt + answer, then the ODE is integrated for all answer positions at once
                (diffusion tokens never attend to each other) and the logits are read at t = 1.
                The read-out has seen the path's own x_hat_1, so a wrong token is read confidently:
                tf_nll can rise with steps even where tf_acc rises too.
  tf 95% CI     over examples, not tokens (the tokens of one answer are not independent): ratio_interval.
  tf_nfe        path evaluations per answer token in the teacher-forced pass.
  vs steps=1    (printed under a row, stored as gain / tf_gain) its accuracy minus the steps=1 row's, the
                base's, on the same examples: [difference, 95% low, high], paired over examples.
  tf changed    (under a row: why it differs from the base) the fraction of answer tokens whose t = 1
                read-out differs from the base's argmax, and the corrections (base wrong, now right) and
                spoils (base right, now wrong) among them: corrected - spoiled is the tf gain.
  tf x_hat_1    (fixed-step solvers) the accuracy of the path's own guess argmax at each solver step,
                at the t it was evaluated (midpoint: the middle of each interval): how the ODE gets there;
                and, as against the base, the tokens the read-out changed from the first of those guesses,
                corrected and spoiled: what the later steps did.
The JSON keeps each row's per-example lists too (example_correct / _tokens / _nfe, tf_example_correct /
_count / _nll / _nfe), which intervals.py pairs across runs.
--x1 argmax (default), sample or mean: the ODE's estimate x_hat_1 of the clean token: V[argmax], V of a
token drawn at temperature tau(t) = 1 - t (explore early, commit late), or the expected embedding
softmax(logits) @ V (less committed while the prediction is unsure). The read-out at t = 1 stays greedy.

--probe_t 0,0.5,0.9,1 (L2D only) first prints, for each t, the teacher-forced accuracy and NLL when the
path is given the *gold* next token noised to level t, as in training: how much of x_t the path has
learned to read. A path that reads it goes to NLL ~0 at t=1; one that does not stays flat in t.
(Its noise is seeded per batch, so these rows depend on --batch_size, unlike the others.)

--steps, --atol, --rtol and --guidance take one value or a comma-separated list ("1,2,4" or 1,2,4).
--label: "" (default) conditions each example on its own class from the data (null if the model
does not know it), "null" on the null class, a class name (e.g. math) on that class.
--data defaults to data/<task>/<tokenizer tag> (e.g. data/gsm8k/smollm2-135m, data/arithmetic/char).
--split test (default), or confirm: a second held-out split (data/arithmetic/prepare.py --n_confirm),
kept aside to check, once, a gain chosen on test.
--out defaults to eval_results.json next to the checkpoint (the current folder for a base model), or
eval_results-2.json, -3, ... if that exists: an earlier result is never replaced unless --overwrite True;
with matplotlib installed, a PNG of accuracy against steps is written beside it. The JSON is rewritten
(atomically) after every batch, with the row in progress under "partial"; a killed run goes on from
its last batch when its command is repeated with --resume True (the rows come out as one whole run's):

    python eval.py --ckpt out/ckpt.pt --task gsm8k --steps 32 --out out/eval_s32.json --resume True

--gen_batch_size B generates B prompts together, left-padded to the longest (model.KVCache), until all of
them stop: each row decodes as it would alone, at several times the tokens/s (3.4x at B=8 on one core).

Reproducible: generation reseeds with seed + i before the batch starting at example i, the teacher-forced
noise of example i comes from a generator seeded with seed + i, so a row does not depend on --limit, on
--batch_size or on the other rows; with --gen_batch_size > 1 the ODE's noise for an example depends on
its batch (the base rows do not: they use no noise); so do the draws of --x1 sample.
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.answers import final_number, generate_answers, is_correct
from ar2diff import AR2Diff
from loading import checkpoint
import configurator
from configurator import UsageError, configure, fail
from data.dataset import TokenDataset, tokenizer_tag
from diffusion import L2D, answer_positions, at_positions
from harness.intervals import ratio_interval, row_gains, wilson_interval
from lora import merge_lora
from loading.precision import autocast, resolve_device, resolve_dtype, store_weights
from harness.plot import plot
from harness.results import ResultsFile, output_path
from solvers import SOLVERS
from loading.tokenizer import stop_tokens

REPO = os.path.dirname(os.path.abspath(__file__))
TASKS = ("gsm8k", "arithmetic", "humaneval")
OPTIONS = dict(
    ckpt=("", "required: a ckpt.pt of train.py (or its folder), or a base model name or HF folder"),
    task=("arithmetic", "gsm8k, arithmetic or humaneval (pass@1: each completion run against its tests)"),
    data=("", 'the prepared folder; "": data/<task>/<tokenizer tag>'),
    split=("test", "test, or confirm (a second held-out split, to check a gain chosen on test once)"),
    limit=(0, "the first N examples only; 0: all"),
    max_new_tokens=(256, "generation stops there if the end token has not come"),
    # the rows: each step count (or dopri5's (atol, rtol) pair) times each guidance weight;
    # one value or a list (1,2,4); None: the list in LIST_DEFAULTS (given after each)
    steps=(None, "ODE steps per token (fixed-step solvers); None: 1,2,4,8,16,32"),
    solver=("midpoint", "euler, midpoint, rk4 (fixed steps), or dopri5 (adaptive)"),
    atol=(None, "dopri5's absolute error tolerances; None: 1e-5"),
    rtol=(None, "dopri5's relative error tolerances (as many as atol, or one); None: 1e-5"),
    guidance=(None, "classifier-free guidance weights (a model trained with guidance_classes); None: 1"),
    label=("", "the class to condition on: \"\" each example's own, null, or a class name (e.g. math)"),
    samples=(None, "AR2Diff: candidates refined in parallel, the best scored kept; None: 8"),
    # what to measure
    generate=(True, "greedy generation: accuracy, NFE and tokens/s"),
    teacher_forced=(True, "teacher-forced next-token accuracy and NLL of the answer tokens"),
    batch_size=(8, "examples per teacher-forced batch"),
    gen_batch_size=(1, "prompts generated together, left-padded (faster; see the docstring)"),
    x1=("argmax", "the ODE's estimate of the clean token: argmax, sample or mean (see the docstring)"),
    probe_t=(None, "t's at which to probe the path with the gold token noised to t (L2D only; see the docstring)"),
    # output and bookkeeping
    out=("", 'the JSON; "": eval_results.json next to the checkpoint, or -2, -3, ... if it exists'),
    resume=(False, "go on from the batches a killed run of the same command left in --out"),
    overwrite=(False, "replace --out if it exists (else refused)"),
    seed=(1337, "of the draws and the noise, reseeded per example or batch (see the docstring)"),
    device=("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."),
    dtype=("auto", "auto (cuda: bfloat16; cpu: float32), float32, bfloat16 or float16: every weight stored in it "
           "(precision.py)"),
)
LIST_DEFAULTS = dict(steps=[1, 2, 4, 8, 16, 32], atol=[1e-5], rtol=[1e-5], guidance=[1.0], probe_t=[], samples=[8])
AR2DIFF_STEPS = [1, 2, 5, 10, 20]  # --steps None for an AR2Diff: the grid around the paper's 10


# --- the ODE for many positions at once --------------------------------------------------------------
@torch.no_grad()
def teacher_forced(model, x, y, steps=1, solver="midpoint", atol=1e-5, rtol=1e-5, guidance=1.0, labels=None,
                   seeds=None, x1="argmax"):
    """Next-token logits with the gold prefix at the answer positions: an L2D's ODE at all of them at once
    (L2D.teacher_forced, which says what it returns), or any other model's own logits there."""
    if isinstance(model, L2D):
        return model.teacher_forced(x, y, labels, seeds, steps=steps, solver=solver, atol=atol, rtol=rtol,
                                    estimate=x1, guidance=guidance)
    pos = answer_positions(y)
    h, _ = model.trunk(x)
    return dict(logits=model.head(at_positions(h, pos)), targets=at_positions(y, pos),
                nfe=torch.zeros(pos.shape, dtype=torch.long))


@torch.no_grad()
def gold_x_t(model, x, y, t, labels=None):
    """What the path reads from x_t: an L2D's logits at the answer positions when each diffusion token
    is the *gold* next token noised to level t, as in training but at one fixed t. A path that has
    learned to read x_t drives the loss toward 0 as t -> 1; at t=0 it is the base's.
    Returns answer_stats' arguments: logits (B, P, V), targets (B, P)."""
    logits, _ = model(x, y, labels, t=torch.full(x.shape, float(t), device=x.device))
    return dict(logits=logits, targets=at_positions(y, answer_positions(y)))


def answer_stats(logits, targets, nfe=None, base_tokens=None, trajectory=None):
    """Per example (batch row), over its answer positions (targets != -1): correct argmaxes, positions, summed
    NLL and path evaluations. Lists, so that rows can be pooled, paired and resumed example by example.
    With base_tokens (the base's argmax), why the ODE's read-out differs from the base: positions whose
    token it changed, and of those the corrections (base wrong, now right) and spoils (base right, now
    wrong), so that corrected - spoiled is the gain in correct tokens. With a trajectory, the correct
    guesses at each solver step (a list per example)."""
    mask = targets != -1
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=-1, reduction="none")  # 0 off the answer
    nfe = (nfe.to(mask.device) * mask).sum(1) if nfe is not None else torch.zeros(len(mask), dtype=torch.long)
    tokens = logits.argmax(-1)
    stats = dict(correct=((tokens == targets) & mask).sum(1).tolist(), count=mask.sum(1).tolist(),
                 nll=nll.sum(1).tolist(), nfe=nfe.tolist())

    def changes(reference, prefix=""):  # tokens that differ from `reference`, and how they turned out
        changed = (tokens != reference) & mask
        stats.update({f"{prefix}changed": changed.sum(1).tolist(),
                      f"{prefix}corrected": (changed & (tokens == targets)).sum(1).tolist(),
                      f"{prefix}spoiled": (changed & (reference == targets)).sum(1).tolist()})
    if base_tokens is not None:
        changes(base_tokens)
    if trajectory is not None:
        per_step = [((guess == targets) & mask).sum(1).tolist() for _, guess in trajectory]
        stats["trajectory_correct"] = [list(example) for example in zip(*per_step)]
        # against the path's first guess (its first evaluation after t = 0): what the later steps change
        changes(trajectory[0][1], "first_")
    return stats


def tf_summary(ex):
    """A row's teacher-forced columns from its per-example lists (answer_stats, concatenated)."""
    count = max(sum(ex["count"]), 1)
    low, high = ratio_interval(ex["correct"], ex["count"])
    pooled = {f"tf_{prefix}{key}": sum(ex[prefix + key]) / count for prefix in ("", "first_")
              for key in ("changed", "corrected", "spoiled") if prefix + key in ex}
    if "trajectory_correct" in ex:  # accuracy of x_hat_1 at each solver step
        pooled["tf_trajectory_accuracy"] = [sum(step) / count for step in zip(*ex["trajectory_correct"])]
    return dict(tf_accuracy=sum(ex["correct"]) / count, tf_ci_low=low, tf_ci_high=high, tf_nll=sum(ex["nll"]) / count,
                tf_tokens=sum(ex["count"]), tf_nfe_per_token=sum(ex["nfe"]) / count, **pooled,
                **{f"tf_example_{key}": values for key, values in ex.items()})


def generation_summary(ex):
    """A row's generation columns from its per-example lists (correct, tokens, nfe) and seconds, samples;
    for AR2Diff with one candidate also the answers after its first step (first_correct, first_changed):
    their accuracy, and the answers the later steps changed, corrected (now right) and spoiled (now wrong)."""
    n, correct, tokens = len(ex["correct"]), sum(ex["correct"]), sum(ex["tokens"])
    low, high = wilson_interval(correct, n)
    summary = dict(accuracy=correct / max(n, 1), correct=correct, n=n, ci_low=low, ci_high=high,
                   nfe_per_token=sum(ex["nfe"]) / max(tokens, 1), tokens=tokens,
                   tokens_per_s=tokens / max(ex["seconds"], 1e-9), seconds=ex["seconds"], samples=ex["samples"],
                   example_correct=ex["correct"], example_tokens=ex["tokens"], example_nfe=ex["nfe"])
    if ex.get("first_correct"):
        pairs = list(zip(ex["first_correct"], ex["correct"]))
        summary.update(first_accuracy=sum(ex["first_correct"]) / n, first_changed=sum(ex["first_changed"]) / n,
                       first_corrected=sum(now and not then for then, now in pairs) / n,
                       first_spoiled=sum(then and not now for then, now in pairs) / n)
    return summary


# --- command line -----------------------------------------------------------------------------------
def parse_list(key, value, kind):
    """configurator.parse_list with this script's LIST_DEFAULTS for None."""
    return configurator.parse_list(key, value, kind, LIST_DEFAULTS[key])


def make_settings(cfg, is_l2d, is_ar2diff=False):
    """The rows to evaluate: dicts of steps, solver, atol, rtol, guidance, x1 (and AR2Diff's candidates, --samples)."""
    if is_ar2diff:
        steps = AR2DIFF_STEPS if cfg["steps"] is None else parse_list("steps", cfg["steps"], int)
        samples = parse_list("samples", cfg["samples"], int)
        if min(steps) < 1 or min(samples) < 1:
            raise UsageError("--steps and --samples must be >= 1")
        return [dict(steps=n, candidates=k, solver=None, atol=None, rtol=None, guidance=1.0, x1=None)
                for k in samples for n in steps]
    if not is_l2d:
        return [dict(steps=1, solver=None, atol=None, rtol=None, guidance=1.0, x1=None)]
    steps, guidance = parse_list("steps", cfg["steps"], int), parse_list("guidance", cfg["guidance"], float)
    atol, rtol = parse_list("atol", cfg["atol"], float), parse_list("rtol", cfg["rtol"], float)
    if cfg["solver"] not in SOLVERS:
        raise UsageError(f"unknown solver {cfg['solver']!r}; use one of {', '.join(SOLVERS)}")
    if cfg["x1"] not in ("argmax", "sample", "mean"):
        raise UsageError(f"unknown --x1 {cfg['x1']!r}; use argmax, sample or mean")
    if min(steps) < 1 or min(atol + rtol) <= 0:
        raise UsageError("--steps must be >= 1 and --atol/--rtol > 0")
    if len(atol) != len(rtol) and 1 not in (len(atol), len(rtol)):
        raise UsageError(f"--atol has {len(atol)} values and --rtol {len(rtol)}: give as many, or one of either")
    tolerances = list(zip(atol * (len(rtol) if len(atol) == 1 else 1), rtol * (len(atol) if len(rtol) == 1 else 1)))
    if cfg["solver"] == "dopri5":
        grid_ = [dict(steps=None, atol=a, rtol=r) for a, r in tolerances]
    else:
        grid_ = [dict(steps=s, atol=atol[0], rtol=rtol[0]) for s in steps]
    settings = []
    for g in grid_:
        for w in ([1.0] if g["steps"] == 1 else guidance):  # steps=1 is the base: guidance changes nothing
            settings.append(dict(g, solver=cfg["solver"], guidance=w, x1=cfg["x1"]))
    return settings


def setting_name(s):
    name = f"steps={s['steps']}" if s["steps"] is not None else f"atol={s['atol']:g} rtol={s['rtol']:g}"
    name += f" w={s['guidance']:g}" if s["guidance"] != 1.0 else ""
    name += f" K={s['candidates']}" if s.get("candidates") else ""
    return name + (f" x1={s['x1']}" if s["x1"] not in (None, "argmax") else "")


def load(ckpt_arg):
    """(model, tokenizer, tokenizer name, class names, checkpoint path or None) from a ckpt.pt (or a
    folder holding one), or a base model name / Hugging Face folder."""
    if not ckpt_arg:
        raise UsageError("--ckpt is required: a ckpt.pt from train.py, or a base model (e.g. smollm2-135m)")
    model, tokenizer, ckpt = checkpoint.load(ckpt_arg)
    if ckpt is None:
        return model, tokenizer, ckpt_arg, [], None
    path = checkpoint.checkpoint_path(ckpt_arg)
    return model, tokenizer, ckpt.get("tokenizer") or ckpt["init_from"], ckpt.get("classes") or [], path


def example_labels(model, model_classes, ds, label):
    """Class index per test example for the model's class embedding, or None (no classes: unconditional)."""
    if not isinstance(model, L2D) or model.class_embed is None:
        return None
    null = model.config.num_classes
    if label == "null":
        return np.full(len(ds), null)
    if label:
        if label not in model_classes:
            raise UsageError(f"--label {label!r} is not a class of this model (its classes: {', '.join(model_classes)}; or null)")
        return np.full(len(ds), model_classes.index(label))
    own = np.array([model_classes.index(c) if c in model_classes else null for c in ds.classes])
    return own[ds.labels]


def check_tokenizer(model_tok, data_tok, probe, data_dir):
    try:
        same = model_tok.encode(probe, allowed_special="all") == data_tok.encode(probe, allowed_special="all")
    except ValueError:  # e.g. a character outside a char vocabulary
        same = False
    if not same:
        raise UsageError(f"{data_dir} was prepared with a different tokenizer than the model's; "
                         "prepare the data with --tokenizer matching the model")


@dataclass
class Task:
    """The examples a run evaluates: the prepared split (tokens, for teacher forcing), its rows (text), and
    what generation needs: prompt ids, gold final numbers, class labels and the stop tokens."""
    name: str
    data_dir: str
    split: str
    ds: TokenDataset
    rows: list
    n: int
    prompts: list
    golds: list
    labels: object  # np.ndarray of class indices, or None (unconditional)
    stop: set


def load_task(cfg, model, tokenizer, tokenizer_name, model_classes, settings):
    """The prepared split --data/--split names, checked against the model (tokenizer, classes, context)."""
    data_dir = cfg["data"] or os.path.join(REPO, "data", cfg["task"], tokenizer_tag(tokenizer_name))
    split = cfg["split"]
    if split not in ("test", "confirm"):
        raise UsageError(f"--split {split!r}: use test, or confirm (a second held-out split, prepare.py --n_confirm)")
    if not os.path.isfile(os.path.join(data_dir, f"{split}.jsonl")):
        raise UsageError(f"no prepared {split} split in {data_dir}: run data/{cfg['task']}/prepare.py "
                         f"--tokenizer {tokenizer_name}" + (" --n_confirm N" if split == "confirm" else "") +
                         " (or pass --data)")
    ds = TokenDataset([data_dir], split)
    with open(os.path.join(data_dir, f"{split}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    n = min(cfg["limit"] or len(rows), len(rows))
    check_tokenizer(tokenizer, ds.tokenizer, rows[0]["prompt"] + rows[0]["answer"], data_dir)
    labels = example_labels(model, model_classes, ds, cfg["label"])
    if labels is None and any(s["guidance"] != 1.0 for s in settings):
        raise UsageError("--guidance other than 1 needs an L2D model trained with --guidance_classes=True")
    golds = [final_number(r["final"] if r.get("final") is not None else r["answer"]) for r in rows[:n]]
    if cfg["task"] == "humaneval" and "test" not in rows[0]:
        raise UsageError(f"{data_dir} has no HumanEval tests in its rows: prepare it with data/humaneval/prepare.py")
    prompts = [ds.tokenizer.encode(r["prompt"], allowed_special="all") for r in rows[:n]]
    if isinstance(model, AR2Diff) and max(map(len, prompts)) + model.config.answer_len > model.base.config.block_size:
        raise UsageError(f"the longest prompt of {data_dir} ({max(map(len, prompts))} tokens) and the model's answer "
                         f"span ({model.config.answer_len}) do not fit its context of {model.base.config.block_size}")
    return Task(cfg["task"], data_dir, split, ds, rows, n, prompts, golds, labels, stop_tokens(tokenizer))


@dataclass
class Run:
    """One eval.py run: its settings, the model, the task, the results file, and how to compute."""
    cfg: dict
    model: torch.nn.Module
    task: Task
    results: ResultsFile
    device: str
    mixed: object  # the autocast context of the dtype

    @property
    def block_size(self):
        model = self.model
        return (model.base if isinstance(model, (L2D, AR2Diff)) else model).config.block_size

    def labels_of(self, ix):
        return None if self.task.labels is None else torch.as_tensor(self.task.labels[list(ix)], device=self.device)


def teacher_forced_columns(run, batch_logits, phase, row=None):
    """Teacher-forced stats of batch_logits(ix, labels, x, y) -> answer_stats' arguments over the n examples,
    saved after each batch as `phase` (of `row`), and taken up where a killed run of it stopped."""
    task, batch_size = run.task, run.cfg["batch_size"]
    ex = run.results.resumed(phase, dict(correct=[], count=[], nll=[], nfe=[]))
    start = len(ex["correct"])  # a multiple of batch_size: the batches (and their seeds) are those of a whole run
    for b0 in tqdm(range(start, task.n, batch_size), desc=phase, leave=False, file=sys.stderr):
        ix = np.arange(b0, min(b0 + batch_size, task.n))
        x, y, _ = task.ds.get_batch(ix, run.block_size)
        with run.mixed:
            stats = batch_logits(ix, run.labels_of(ix), x.to(run.device), y.to(run.device))
        for key, values in answer_stats(**stats).items():
            ex.setdefault(key, []).extend(values)
        run.results.save_partial(phase, ex, row)
    return tf_summary(ex)


def generation_columns(run, setting, row):
    """Generation columns of `setting` over the n prompts, gen_batch_size at a time, saved after each batch
    as the phase row["setting"], and taken up where a killed run of it stopped."""
    cfg, task, phase = run.cfg, run.task, row["setting"]
    ex = run.results.resumed(phase, dict(correct=[], tokens=[], nfe=[], seconds=0.0, samples=[]))
    progress = tqdm(total=task.n, initial=len(ex["correct"]), desc=phase, leave=False, file=sys.stderr)
    for b0 in range(len(ex["correct"]), task.n, cfg["gen_batch_size"]):
        ix = range(b0, min(b0 + cfg["gen_batch_size"], task.n))
        torch.manual_seed(cfg["seed"] + b0)
        budget = min(cfg["max_new_tokens"], run.block_size - max(len(task.prompts[i]) for i in ix))  # AR2Diff ignores it: its span fits (checked)
        t0 = time.perf_counter()
        with run.mixed:
            answers = generate_answers(run.model, [task.prompts[i] for i in ix], budget, task.stop, setting,
                                       run.labels_of(ix)) if budget > 0 else [([], 0, 0)] * len(ix)
        ex["seconds"] += time.perf_counter() - t0
        for i, (answer, generated, spent, *first) in zip(ix, answers):
            text = task.ds.tokenizer.decode(answer)
            ex["correct"].append(is_correct(task.name, task.rows[i], text, task.golds[i]))
            if first and first[0] is not None:  # AR2Diff, one candidate: its answer after the first step
                first_text = task.ds.tokenizer.decode(first[0])
                ex.setdefault("first_correct", []).append(is_correct(task.name, task.rows[i], first_text, task.golds[i]))
                ex.setdefault("first_changed", []).append(int(first[0] != answer))
            ex["tokens"].append(generated)
            ex["nfe"].append(spent)
            if i < 3:
                ex["samples"].append(dict(prompt=task.rows[i]["prompt"], output=text, pred=final_number(text),
                                          gold=task.golds[i]))
        run.results.save_partial(phase, ex, row)
        progress.update(len(ix))
    progress.close()
    return generation_summary(ex)


def probe_rows(run, probe_t):
    """--probe_t: for each t, the teacher-forced columns when the path reads the gold token noised to t."""
    result = run.results.result
    result.setdefault("probe", [])
    print(f"{'gold x_t at t':<14} {'acc':>6} {'95% CI':>15} {'nll':>7} {'tokens':>7}")
    for i, t in enumerate(probe_t):
        def probe_batch(ix, labels, x, y):
            torch.manual_seed(run.cfg["seed"] + int(ix[0]))
            return gold_x_t(run.model, x, y, t, labels)
        if i == len(result["probe"]):  # not kept from a resumed run
            result["probe"].append(dict(t=t, **teacher_forced_columns(run, probe_batch, f"gold x_t, t={t:g}")))
            run.results.finish_phase()
        stats = result["probe"][i]
        print(f"t={t:<12g} {stats['tf_accuracy']:6.3f} [{stats['tf_ci_low']:.3f}, {stats['tf_ci_high']:.3f}] "
              f"{stats['tf_nll']:7.3f} {stats['tf_tokens']:7d}")
    run.results.write()


def evaluate_setting(run, setting, teacher_forcing):
    """One row: the generation columns, the teacher-forced ones, and its paired gains over the steps=1 row."""
    cfg, rows = run.cfg, run.results.result["rows"]
    name = setting_name(setting)
    row = run.results.partial_row(name) or dict(setting=name, **setting)  # a killed run's row goes on
    if cfg["generate"] and "accuracy" not in row:
        row.update(generation_columns(run, setting, row))
    if teacher_forcing:
        def tf_batch(ix, labels, x, y):
            torch.manual_seed(cfg["seed"] + int(ix[0]))  # x1=sample's draws
            stats = teacher_forced(run.model, x, y, setting["steps"], setting["solver"], setting["atol"], setting["rtol"],
                                   setting["guidance"], labels, [cfg["seed"] + int(i) for i in ix], setting["x1"])
            if stats.get("trajectory"):  # the same t's for every batch: the row's x axis
                row["tf_trajectory_t"] = [t for t, _ in stats["trajectory"]]
            return stats
        row.update(teacher_forced_columns(run, tf_batch, name + " (tf)", row))
    if not cfg["generate"]:  # the plot's x axis for dopri5
        row["nfe_per_token"] = row.get("tf_nfe_per_token", 0.0)
    base_row = next((r for r in rows if r["steps"] == 1 and r.get("candidates") == row.get("candidates")), None)
    if base_row is not None:
        row.update(row_gains(row, base_row))  # paired: gain and tf_gain over the base
    run.results.finish_phase()
    rows.append(row)
    run.results.write()
    return row


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
    if not is_ar2diff and cfg["samples"] is not None:
        raise UsageError("--samples is for an AR2Diff model (candidates refined in parallel)")
    if not is_l2d and not is_ar2diff and (cfg["steps"] is not None or cfg["guidance"] is not None):
        print(f"note: {cfg['ckpt']} is not an L2D model: one row, steps=1 (the model itself)")
    return settings, probe_t, teacher_forcing


def main(argv=None):
    cfg = configure(OPTIONS, argv)
    if cfg["task"] not in TASKS:
        raise UsageError(f"unknown task {cfg['task']!r}; use one of {', '.join(TASKS)}")
    device = resolve_device(cfg["device"])  # both checked before anything is loaded
    dtype = resolve_dtype(cfg["dtype"], device)
    if cfg["limit"] < 0 or min(cfg["max_new_tokens"], cfg["batch_size"], cfg["gen_batch_size"]) < 1:
        raise UsageError("--limit must be >= 0 (0: all), --max_new_tokens, --batch_size and --gen_batch_size >= 1")
    model, tokenizer, tokenizer_name, model_classes, ckpt_path = load(cfg["ckpt"])
    settings, probe_t, teacher_forcing = plan(cfg, model)
    merge_lora(model).to(device)  # LoRA folded into its weights (equal logits, a plain layer's cost)
    store_weights(model, dtype)  # nothing trains here: every weight in dtype, but the norms
    task = load_task(cfg, model, tokenizer, tokenizer_name, model_classes, settings)
    out = output_path(cfg["out"], ckpt_path, cfg["resume"], cfg["overwrite"])
    kind = f"L2D ({model.config.variant})" if isinstance(model, L2D) else \
        f"AR2Diff (L={model.config.answer_len})" if isinstance(model, AR2Diff) else "GPT"
    print(f"{kind} from {cfg['ckpt']} on {task.data_dir} ({task.split}): {task.n} examples, {len(settings)} row(s), "
          f"device {device}, {str(dtype)[6:]}")
    result = dict(ckpt=cfg["ckpt"], model=kind, task=cfg["task"], data=task.data_dir, split=task.split, n=task.n,
                  config=cfg, rows=[])
    run = Run(cfg, model, task, ResultsFile.open(out, result, cfg["resume"]), device, autocast(device, dtype))
    if probe_t:
        probe_rows(run, probe_t)
    if settings:
        print(f"{'setting':<24} {'acc':>6} {'95% CI':>15} {'n':>5} {'nfe/tok':>8} {'tok/s':>8} "
              f"{'tf_acc':>7} {'tf 95% CI':>15} {'tf_nll':>7} {'tf_nfe':>7}")
    rows = run.results.result["rows"]
    for row in rows:  # kept from a resumed run
        print(format_row(row))
    for setting in settings[len(rows):]:
        print(format_row(evaluate_setting(run, setting, teacher_forcing)))
    print(f"wrote {out}")
    if rows:
        plot(os.path.splitext(out)[0] + ".png", [("", rows)], f"{kind}: {cfg['ckpt']} on {cfg['task']} (n={task.n})")
    return run.results.result


def format_row(row):
    dash = "-"
    gen = (f"{row['accuracy']:6.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] {row['n']:5d} "
           f"{row['nfe_per_token']:8.1f} {row['tokens_per_s']:8.1f}") if "accuracy" in row else \
        f"{dash:>6} {dash:>15} {dash:>5} {dash:>8} {dash:>8}"
    tf = (f"{row['tf_accuracy']:7.3f} [{row['tf_ci_low']:.3f}, {row['tf_ci_high']:.3f}] {row['tf_nll']:7.3f} "
          f"{row['tf_nfe_per_token']:7.1f}") if "tf_accuracy" in row else f"{dash:>7} {dash:>15} {dash:>7} {dash:>7}"
    gains = "".join(f"  {key} vs steps=1: {row[key][0]:+.3f} [{row[key][1]:+.3f}, {row[key][2]:+.3f}]"
                    for key in ("gain", "tf_gain") if key in row)
    lines = [f"{row['setting']:<24} {gen} {tf}", gains]
    if "tf_changed" in row:  # why the row differs from the base (answer_stats)
        lines.append(f"  tf tokens changed from the base's: {row['tf_changed']:.3f} (corrected {row['tf_corrected']:.3f}, "
                     f"spoiled {row['tf_spoiled']:.3f})")
    if "first_accuracy" in row:
        lines.append(f"  after the first step: acc {row['first_accuracy']:.3f}; answers the later steps changed "
                     f"{row['first_changed']:.3f} (corrected {row['first_corrected']:.3f}, spoiled {row['first_spoiled']:.3f})")
    if "tf_trajectory_accuracy" in row:
        lines.append("  tf x_hat_1 accuracy along the ODE: " + "  ".join(
            f"t={t:.2f} {a:.3f}" for t, a in zip(row["tf_trajectory_t"], row["tf_trajectory_accuracy"])))
        lines.append(f"  tf tokens changed from the first guess (t={row['tf_trajectory_t'][0]:.2f}): {row['tf_first_changed']:.3f} "
                     f"(corrected {row['tf_first_corrected']:.3f}, spoiled {row['tf_first_spoiled']:.3f})")
    return "\n".join(line for line in lines if line)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
