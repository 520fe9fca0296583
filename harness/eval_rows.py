"""
eval.py's rows: a run's settings and examples, checked against the model before any work; each row's columns,
pooled from per-example lists (kept for harness/intervals.py); the JSON, rewritten atomically after every
batch with the phase in progress under "partial", so that a killed run goes on from it with --resume True.

--diagnostics adds research columns: the answer tokens whose t = 1 read-out differs from the base's argmax, with
the corrections and spoils among them (corrected - spoiled is the tf gain); for fixed-step solvers the accuracy
of the path's guess x_hat_1 at each solver step, and what the later steps changed from the first guess; for
AR2Diff with one candidate, the same for its first step's answers. --probe_t: the teacher-forced columns when
the path is given the *gold* next token noised to t, as in training (its noise is seeded per batch).
"""

import json
import os
from types import SimpleNamespace

import numpy as np
import torch

import configurator
from ar2diff import AR2Diff
from configurator import UsageError
from data.dataset import TokenDataset, tokenizer_tag
from diffusion import L2D, answer_positions, at_positions
from harness.answers import final_number
from harness.intervals import ratio_interval, wilson_interval
from harness.plot import check_figure
from loading.files import check_output, write_atomic
from loading.tokenizer import stop_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST_DEFAULTS = dict(steps=[1, 2, 4, 8, 16, 32], atol=[1e-5], rtol=[1e-5], guidance=[1.0], probe_t=[], candidates=[8])
AR2DIFF_STEPS = [1, 2, 5, 10, 20]  # --steps None for an AR2Diff: a grid around the paper's 10
MAX_STEPS = 1_000_000  # t = k / steps: past this the grid is finer than float32 t near 1 resolves
HEADER = (f"{'setting':<24} {'acc':>6} {'95% CI':>15} {'n':>5} {'nfe/tok':>8} {'tok/s':>8} "
          f"{'tf_acc':>7} {'tf 95% CI':>15} {'tf_nll':>7} {'tf_nfe':>7}")


# --- what a run evaluates ----------------------------------------------------------------------------
def parse_list(key, value, kind):
    return configurator.parse_list(key, value, kind, LIST_DEFAULTS[key])


def make_settings(cfg, is_l2d, is_ar2diff=False):
    """The rows to evaluate: dicts of steps, solver, atol, rtol, guidance, estimate (AR2Diff: candidates)."""
    plain = dict(solver=None, atol=None, rtol=None, guidance=1.0, estimate=None)
    if not is_l2d and not is_ar2diff:
        return [dict(plain, steps=1)]
    steps = AR2DIFF_STEPS if is_ar2diff and cfg["steps"] is None else parse_list("steps", cfg["steps"], int)
    if bad := [n for n in steps if not 1 <= n <= MAX_STEPS]:
        raise UsageError(f"--steps must be between 1 and {MAX_STEPS} (a finer grid than float32 t can resolve), "
                         f"got {bad[0]}")
    if is_ar2diff:
        candidates = parse_list("candidates", cfg["candidates"], int)
        if min(candidates) < 1:
            raise UsageError("--candidates must be >= 1")
        return [dict(plain, steps=n, candidates=k) for k in candidates for n in steps]
    guidance = parse_list("guidance", cfg["guidance"], float)
    atol, rtol = parse_list("atol", cfg["atol"], float), parse_list("rtol", cfg["rtol"], float)
    if min(atol + rtol) <= 0:
        raise UsageError("--atol and --rtol must be > 0")
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
    if is_ar2diff and cfg["teacher_forced"]:
        print("note: an AR2Diff model has no next-token logits, so no teacher-forced pass: generation rows only")
    if is_ar2diff and not cfg["generate"]:
        raise UsageError("an AR2Diff model is evaluated by generation only: drop --generate False")
    teacher_forcing = cfg["teacher_forced"] and not is_ar2diff
    settings = make_settings(cfg, is_l2d, is_ar2diff) if cfg["generate"] or teacher_forcing else []
    probe_t = parse_list("probe_t", cfg["probe_t"], float)
    if probe_t and (not is_l2d or min(probe_t) < 0 or max(probe_t) > 1):
        raise UsageError("--probe_t takes times in [0, 1] and needs an L2D model")
    if not is_ar2diff and cfg["candidates"] is not None:
        raise UsageError("--candidates is for an AR2Diff model (candidates refined in parallel)")
    if not is_l2d and not is_ar2diff and (cfg["steps"] is not None or cfg["guidance"] is not None):
        print(f"note: {cfg['ckpt']} is not an L2D model: one row, steps=1 (the model itself)")
    return settings, probe_t, teacher_forcing


def load_task(cfg, model, tokenizer, tokenizer_name, model_classes, settings):
    """The prepared split --data/--split names, checked against the model (tokenizer, classes, context): the
    split's tokens ds (for teacher forcing), its rows (text), the first n rows' prompt ids, gold final numbers
    and class labels (None: unconditional), and the stop tokens."""
    data_dir = cfg["data"] or os.path.join(REPO, "data", cfg["task"], tokenizer_tag(tokenizer_name))
    split = cfg["split"]
    if split not in ("test", "confirm"):
        raise UsageError(f"--split {split!r}: use test, or confirm (a second held-out split, prepare.py --n_confirm)")
    if not os.path.isfile(os.path.join(data_dir, f"{split}.jsonl")):
        confirm = " --n_confirm N" if split == "confirm" else ""
        raise UsageError(f"no prepared {split} split in {data_dir}: run python -m data.{cfg['task']}.prepare "
                         f"--tokenizer {tokenizer_name}{confirm} (or pass --data)")
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
    label, labels = cfg["label"], None  # a class index per example for the model's class embedding, or None
    if not isinstance(model, L2D) or model.class_embed is None:
        if label:
            raise UsageError(f"--label {label!r}: this model was trained without guidance classes; drop --label")
    elif label and label != "null" and label not in model_classes:
        raise UsageError(f"--label {label!r} is not a class of this model; use one of {', '.join(model_classes)}, null")
    else:
        null = model.config.num_classes
        labels = np.full(len(ds), null if label == "null" else model_classes.index(label)) if label else \
            np.array([model_classes.index(c) if c in model_classes else null for c in ds.classes])[ds.labels]
    if labels is None and any(s["guidance"] != 1.0 for s in settings):
        raise UsageError("--guidance other than 1 needs an L2D model trained with --guidance_classes=True")
    if cfg["task"] == "humaneval" and "test" not in rows[0]:
        raise UsageError(f"{data_dir} has no HumanEval tests: prepare it with python -m data.humaneval.prepare")
    prompts = [ds.tokenizer.encode(r["prompt"], allowed_special="all") for r in rows[:n]]
    if isinstance(model, AR2Diff) and max(map(len, prompts)) + model.config.answer_len > model.base.config.block_size:
        raise UsageError(f"the longest prompt of {data_dir} ({max(map(len, prompts))} tokens) and the model's answer "
                         f"span ({model.config.answer_len}) do not fit its context of {model.base.config.block_size}")
    golds = [final_number(r["final"] if r.get("final") is not None else r["answer"]) for r in rows[:n]]
    return SimpleNamespace(name=cfg["task"], data_dir=data_dir, split=split, ds=ds, rows=rows, n=n, prompts=prompts,
                           golds=golds, labels=labels, stop=stop_tokens(tokenizer))


# --- a row's columns from its per-example lists ------------------------------------------------------
def token_changes(stats, row=None):
    """--diagnostics, per example, from teacher_forced's `stats`: the read-out's tokens that differ from the
    base's (changed, corrected, spoiled), the correct guesses x_hat_1 at each solver step (trajectory_correct),
    and the changes from the first guess (first_*). Records the steps' t's in `row`."""
    if stats.get("base_tokens") is None:
        return {}
    targets = stats["targets"]
    mask, tokens = targets != -1, stats["logits"].argmax(-1)
    found = {}

    def changes(reference, prefix=""):
        changed = (tokens != reference) & mask
        found.update({f"{prefix}changed": changed.sum(1).tolist(),
                      f"{prefix}corrected": (changed & (tokens == targets)).sum(1).tolist(),
                      f"{prefix}spoiled": (changed & (reference == targets)).sum(1).tolist()})
    changes(stats["base_tokens"])
    if stats.get("trajectory"):
        per_step = [((guess == targets) & mask).sum(1).tolist() for _, guess in stats["trajectory"]]
        found["trajectory_correct"] = [list(example) for example in zip(*per_step)]
        changes(stats["trajectory"][0][1], "first_")  # the first guess, after t = 0: what later steps change
        if row is not None:
            row["tf_trajectory_t"] = [t for t, _ in stats["trajectory"]]
    return found


def tf_summary(ex):
    """A row's teacher-forced columns from its per-example lists (eval.answer_stats's, concatenated)."""
    count = max(sum(ex["count"]), 1)
    low, high = ratio_interval(ex["correct"], ex["count"])
    changes = {f"tf_{k}": sum(v) / count for k, v in ex.items() if k.endswith(("changed", "corrected", "spoiled"))}
    if "trajectory_correct" in ex:
        changes["tf_trajectory_accuracy"] = [sum(step) / count for step in zip(*ex["trajectory_correct"])]
    return dict(tf_accuracy=sum(ex["correct"]) / count, tf_ci_low=low, tf_ci_high=high, tf_nll=sum(ex["nll"]) / count,
                tf_tokens=sum(ex["count"]), tf_nfe_per_token=sum(ex["nfe"]) / count,
                **changes, **{f"tf_example_{key}": values for key, values in ex.items()})


def generation_summary(ex):
    """A row's generation columns from its per-example lists (correct, tokens, nfe; AR2Diff with one
    candidate and --diagnostics: first_correct, first_changed), seconds and samples."""
    n, correct, tokens = len(ex["correct"]), sum(ex["correct"]), sum(ex["tokens"])
    low, high = wilson_interval(correct, n)
    first = {}
    if ex.get("first_correct"):  # after AR2Diff's first step, and what the later steps changed
        pairs = list(zip(ex["first_correct"], ex["correct"]))
        first = dict(first_accuracy=sum(ex["first_correct"]) / n, first_changed=sum(ex["first_changed"]) / n,
                     first_corrected=sum(now and not then for then, now in pairs) / n,
                     first_spoiled=sum(then and not now for then, now in pairs) / n)
    return dict(accuracy=correct / max(n, 1), correct=correct, n=n, ci_low=low, ci_high=high,
                nfe_per_token=sum(ex["nfe"]) / max(tokens, 1), tokens=tokens,
                tokens_per_s=tokens / max(ex["seconds"], 1e-9), seconds=ex["seconds"], samples=ex["samples"],
                example_correct=ex["correct"], example_tokens=ex["tokens"], example_nfe=ex["nfe"], **first)


def format_row(row):
    """A row as eval.py prints it, under HEADER, with its gains and diagnostic lines."""
    gen = (f"{row['accuracy']:6.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] {row['n']:5d} "
           f"{row['nfe_per_token']:8.1f} {row['tokens_per_s']:8.1f}") if "accuracy" in row else \
        f"{'-':>6} {'-':>15} {'-':>5} {'-':>8} {'-':>8}"
    tf = (f"{row['tf_accuracy']:7.3f} [{row['tf_ci_low']:.3f}, {row['tf_ci_high']:.3f}] {row['tf_nll']:7.3f} "
          f"{row['tf_nfe_per_token']:7.1f}") if "tf_accuracy" in row else f"{'-':>7} {'-':>15} {'-':>7} {'-':>7}"
    gains = "".join(f"  {key} vs steps=1: {row[key][0]:+.3f} [{row[key][1]:+.3f}, {row[key][2]:+.3f}]"
                    for key in ("gain", "tf_gain") if key in row)
    lines = [f"{row['setting']:<24} {gen} {tf}", gains]

    def changes(prefix):
        return f"{row[prefix + 'changed']:.3f} (corrected {row[prefix + 'corrected']:.3f}, " \
               f"spoiled {row[prefix + 'spoiled']:.3f})"
    if "tf_changed" in row:
        lines.append(f"  tf tokens changed from the base's: {changes('tf_')}")
    if "first_accuracy" in row:
        lines.append(f"  after the first step: acc {row['first_accuracy']:.3f}; answers the later steps changed "
                     + changes("first_"))
    if "tf_trajectory_accuracy" in row:
        lines.append("  tf x_hat_1 accuracy along the ODE: " + "  ".join(
            f"t={t:.2f} {a:.3f}" for t, a in zip(row["tf_trajectory_t"], row["tf_trajectory_accuracy"])))
        lines.append(f"  tf tokens changed from the first guess (t={row['tf_trajectory_t'][0]:.2f}): "
                     + changes("tf_first_"))
    return "\n".join(line for line in lines if line)


@torch.no_grad()
def gold_x_t(model, x, y, t, labels=None):
    """--probe_t: an L2D's logits (B, P, V) and targets (B, P) at the answer positions when each diffusion
    token is the *gold* next token noised to level t, as in training but at one fixed t (t = 0: the base's)."""
    logits, _ = model(x, y, labels, t=torch.full(x.shape, float(t), device=x.device))
    return dict(logits=logits, targets=at_positions(y, answer_positions(y)))


# --- the JSON that keeps the rows --------------------------------------------------------------------
def write_json(path, result):
    write_atomic(path, lambda f: f.write(json.dumps(result, indent=1).encode()))


def output_path(out, ckpt_path, resume, overwrite):
    """--out, checked: by default eval_results.json next to the checkpoint (the current folder for a base
    model), or -2, -3, ... if that exists; an existing file only with --resume or --overwrite."""
    if resume and not out:
        raise UsageError("--resume True needs --out, the JSON of the run to go on from")
    if not out:
        stem, i = os.path.join(os.path.dirname(ckpt_path) if ckpt_path else ".", "eval_results"), 1
        out = stem + ".json"
        while os.path.exists(out):
            i += 1
            out = f"{stem}-{i}.json"
    if not out.endswith(".json"):
        raise UsageError(f"--out {out} must end in .json (eval.py writes a JSON there)")
    if os.path.exists(out) and not (resume or overwrite):
        raise UsageError(f"{out} already exists; go on from it with --resume True, replace it with --overwrite True, "
                         "or pass another --out")
    check_output(out, "--out", overwrite=True)  # a folder that exists and can be written
    check_figure(out[:-len(".json")] + ".png", overwrite)  # the plot written beside it: not over a user's file
    return out


class ResultsFile:
    """The run's result dict and its JSON at `path`; with resume, what a killed run of the same command
    left there (checked to have the same options), to go on from."""
    def __init__(self, path, result, resume):
        self.path, self.result, self.written = path, result, False
        if resume and not os.path.isfile(path):
            print(f"note: nothing to resume at {path}; starting from the first example")
        elif resume:
            try:
                with open(path) as f:
                    old = json.load(f)
                old_config = {k: v for k, v in old["config"].items() if k != "resume"}
            except (ValueError, KeyError, AttributeError, TypeError) as e:  # TypeError: a JSON list
                raise UsageError(f"cannot resume from {path}: not an eval.py JSON ({e}); pass another --out") from None
            config = {k: v for k, v in json.loads(json.dumps(result["config"])).items() if k != "resume"}
            if differ := sorted(k for k in config.keys() | old_config.keys() if config.get(k) != old_config.get(k)):
                raise UsageError(f"cannot resume from {path}: it was run with other options ({', '.join(differ)}); "
                                 "repeat its command with --resume True, or pass another --out")
            self.result, self.written = old, True

    def resumed(self, phase, fresh):  # the per-example lists of `phase` that a killed run saved, else `fresh`
        partial = self.result.get("partial") or {}
        return partial["examples"] if partial.get("phase") == phase else fresh

    def partial_row(self, name):  # the row a killed run was in, if it is the row `name`
        row = (self.result.get("partial") or {}).get("row")
        return row if row and row["setting"] == name else None

    def save_partial(self, phase, examples, row=None):
        self.result["partial"] = dict(phase=phase, examples=examples, row=row)
        self.write()

    def finish_phase(self):
        self.result.pop("partial", None)

    def write(self):
        write_json(self.path, self.result)
        self.written = True
