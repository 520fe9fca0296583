"""
Evaluate a model on the test split of a prepared task: a base model, a LoRA/full finetune, an L2D and an
AR2Diff checkpoint all go through this one command, so their rows are comparable.

    python eval.py --ckpt out-lab-l2d/ckpt.pt --data data/arithmetic/lab-mul --steps 1,4,16 --gen_batch_size 50
    python eval.py --ckpt out/ckpt.pt --task humaneval --steps 1,2,4 --estimate sample --max_new_tokens 384
    python eval.py --ckpt out-lab-ar2diff/ckpt.pt --data data/arithmetic/lab-mul --steps 1,2,5,10,20 --candidates 1,4,8

A row per step count (dopri5: per (atol, rtol)) times guidance weight; AR2Diff: per refinement step count times
candidates K; any other model: one row, steps=1. Columns: acc [95% CI], greedy generation's final number equal
to the gold one (HumanEval: pass@1; Wilson interval); nfe/tok, path evaluations per generated token (0: the
base); tok/s, prefill included; tf_acc [95% CI], tf_nll and tf_nfe, teacher-forced next-token accuracy and NLL
over the answer and end tokens, the gold prefix given; under a row, its paired gain over steps=1. The JSON keeps
per-example lists (harness/intervals.py), rewritten after every batch (--resume True goes on); seeded per
example, a row depends on neither --limit nor the other rows.
"""

import os
import signal
import sys
import time
from types import SimpleNamespace

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds): one line, no traceback; main() restores the default
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("error: interrupted; nothing was written\n"),
                                             sys.exit(130)))
import numpy as np  # noqa: E402 (and below)
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ar2diff import AR2Diff
from configurator import UsageError, configure, fail
from diffusion import L2D, Velocity, answer_positions, at_positions
from harness.answers import ODE, final_number, generate_answers, is_correct
from harness.eval_rows import (HEADER, ResultsFile, format_row, generation_summary, gold_x_t, load_task,
                               output_path, plan, setting_name, tf_summary, token_changes)
from harness.intervals import row_gains
from harness.plot import plot
from loading import checkpoint
from loading.precision import autocast, resolve_device, resolve_dtype, store_weights
from lora import merge_lora
from solvers import SOLVERS

TASKS = ("gsm8k", "arithmetic", "humaneval")
OPTIONS = dict(
    ckpt=("", "required: a ckpt.pt of train.py (or its folder), or a base model name or HF folder"),
    task=("arithmetic", "gsm8k, arithmetic or humaneval (pass@1: each completion run against its tests)", TASKS),
    data=("", 'the prepared folder; "": data/<task>/<tokenizer tag>'),
    split=("test", "test, or confirm (a second held-out split, to check a gain chosen on test once)"),
    limit=(0, "the first N examples only; 0: all", ">= 0"),
    max_new_tokens=(256, "generation stops there if the end token has not come", ">= 1"),
    steps=(None, "ODE steps per token, e.g. 1,2,4 (fixed-step solvers); None: 1,2,4,8,16,32 (AR2Diff: 1,2,5,10,20)"),
    solver=("midpoint", "euler, midpoint, rk4 (fixed steps), or dopri5 (adaptive)", tuple(SOLVERS)),
    atol=(None, "dopri5's absolute error tolerances; None: 1e-5"),
    rtol=(None, "dopri5's relative error tolerances (as many as atol, or one); None: 1e-5"),
    guidance=(None, "classifier-free guidance weights (a model trained with guidance_classes); None: 1"),
    label=("", '"" each example\'s own class, null, or a class name (e.g. math) to condition on'),
    estimate=("argmax", "the ODE's x_hat_1: argmax (V of the argmax), sample (drawn at temperature 1 - t) or mean",
              ("argmax", "sample", "mean")),
    candidates=(None, "AR2Diff: candidates refined in parallel, the best scored kept; None: 8"),
    generate=(True, "greedy generation: accuracy, NFE and tokens/s"),
    teacher_forced=(True, "teacher-forced next-token accuracy and NLL of the answer tokens"),
    batch_size=(8, "examples per teacher-forced batch", ">= 1"),
    gen_batch_size=(1, "prompts generated together, left-padded to the longest (faster, same answers)", ">= 1"),
    diagnostics=(False, "also why each row differs from the base (harness/eval_rows.py)"),
    probe_t=(None, "t's at which to probe the path with the gold token noised to t (L2D; harness/eval_rows.py)"),
    out=("", 'the JSON; "": eval_results.json next to the checkpoint, or -2, -3, ... if it exists'),
    resume=(False, "go on from the batches a killed run of the same command left in --out"),
    overwrite=(False, "replace --out if it exists (else refused)"),
    seed=(1337, "of the draws and the noise, reseeded per example or batch"),
    device=("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."),
    dtype=("auto", "auto (cuda: bfloat16; cpu: float32), float32, bfloat16 or float16 (precision.py)"),
)


@torch.no_grad()
def teacher_forced(model, x, y, labels=None, seeds=None, steps=8, solver="midpoint", atol=1e-5, rtol=1e-5, **field):
    """Logits (B, P, V), targets and nfe (B, P) at the answer positions of x, y (B, T) (y = -1 off the answer),
    the gold prefix given: an L2D's ODE at every position at once, its noise seeded per row by `seeds` (None:
    0, 1, ...), else the model's own logits. Where a path ran, also the base's argmax base_tokens (B, P) and
    (fixed-step solvers) trajectory: per solver step, (t of its logits, their argmax (B, P))."""
    pos = answer_positions(y)
    base = model.base if isinstance(model, L2D) else model
    h, cache = base.trunk(x)
    h_main, targets = at_positions(h, pos), at_positions(y, pos)
    if not isinstance(model, L2D):
        return dict(logits=base.head(h_main), targets=targets, nfe=torch.zeros(pos.shape, dtype=torch.long))
    noise = torch.stack([torch.randn(x.size(1), model.config.flow_dim, dtype=torch.float64,  # per row: batching-free
                                     generator=torch.Generator().manual_seed(s)) for s in seeds or range(len(x))])
    x_0 = at_positions(model.config.sigma * noise, pos.cpu()).to(x.device)
    trajectory = []  # fixed-step solvers only: dopri5's rows are at different t's
    record = None if solver == "dopri5" else (lambda info: info.get("readout") or trajectory.append(
        (info["logits_t"][0].item(), info["logits"].argmax(-1).view(pos.shape))))
    velocity = Velocity(model, h_main, cache, pos, labels, callback=record, adaptive=solver == "dopri5", **field)
    logits, nfe = model.integrate(velocity, x_0, steps, solver, atol, rtol)
    out = dict(logits=logits, targets=targets, nfe=nfe.cpu())
    if nfe.any():  # where no path ran there is nothing to tell apart from the base
        out.update(base_tokens=base.head(h_main).argmax(-1), trajectory=trajectory or None)
    return out


def answer_stats(logits, targets, nfe=None):
    """Per example (lists: rows pool, pair and resume by example): correct argmaxes, answer positions, NLL, NFE."""
    mask = targets != -1
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=-1, reduction="none")  # 0: not answer
    nfe = (nfe.to(mask.device) * mask).sum(1) if nfe is not None else torch.zeros(len(mask), dtype=torch.long)
    return dict(correct=((logits.argmax(-1) == targets) & mask).sum(1).tolist(), count=mask.sum(1).tolist(),
                nll=nll.sum(1).tolist(), nfe=nfe.tolist())


def teacher_forced_columns(ev, batch_logits, phase, row=None):
    """Teacher-forced columns over the examples, batch_logits(x, y, labels, seeds) giving teacher_forced's dict
    for a batch; saved after each batch as `phase` (of `row`), and taken up where a killed run of it stopped."""
    task, batch_size, seed = ev.task, ev.cfg["batch_size"], ev.cfg["seed"]
    ex = ev.results.resumed(phase, dict(correct=[], count=[], nll=[], nfe=[]))
    start = len(ex["correct"])  # a multiple of batch_size: the batches (and their seeds) are those of a whole run
    with tqdm(range(start, task.n, batch_size), desc=phase, leave=False, file=sys.stderr) as batches:  # Ctrl-C: cleared
        for b0 in batches:
            ix = np.arange(b0, min(b0 + batch_size, task.n))
            x, y, _ = task.ds.get_batch(ix, ev.block_size)
            torch.manual_seed(seed + b0)  # --estimate sample's draws, --probe_t's noise
            with ev.mixed:
                stats = batch_logits(x.to(ev.device), y.to(ev.device), ev.labels_of(ix), [seed + int(i) for i in ix])
            found = answer_stats(stats["logits"], stats["targets"], stats.get("nfe"))
            found.update(token_changes(stats, row) if ev.cfg["diagnostics"] else {})
            for key, values in found.items():
                ex.setdefault(key, []).extend(values)
            ev.results.save_partial(phase, ex, row)
    return tf_summary(ex)


def generation_columns(ev, setting, row):
    """Generation columns of `setting` over the prompts, gen_batch_size at a time, saved after each batch
    as the phase row["setting"], and taken up where a killed run of it stopped."""
    cfg, task, phase, decode = ev.cfg, ev.task, row["setting"], ev.task.ds.tokenizer.decode
    ex = ev.results.resumed(phase, dict(correct=[], tokens=[], nfe=[], seconds=0.0, samples=[]))
    with tqdm(total=task.n, initial=len(ex["correct"]), desc=phase, leave=False, file=sys.stderr) as progress:
        for b0 in range(len(ex["correct"]), task.n, cfg["gen_batch_size"]):
            ix = range(b0, min(b0 + cfg["gen_batch_size"], task.n))
            torch.manual_seed(cfg["seed"] + b0)
            budget = min(cfg["max_new_tokens"], ev.block_size - max(len(task.prompts[i]) for i in ix))
            t0 = time.perf_counter()
            with ev.mixed:
                answers = generate_answers(ev.model, [task.prompts[i] for i in ix], budget, task.stop, setting,
                                           ev.labels_of(ix)) if budget > 0 else [([], 0, 0)] * len(ix)
            ex["seconds"] += time.perf_counter() - t0
            for i, (answer, generated, spent, *first) in zip(ix, answers):
                text = decode(answer)
                ex["correct"].append(is_correct(task.name, task.rows[i], text, task.golds[i]))
                if cfg["diagnostics"] and first and first[0] is not None:  # AR2Diff, one candidate: its first step
                    ex.setdefault("first_correct", []).append(
                        is_correct(task.name, task.rows[i], decode(first[0]), task.golds[i]))
                    ex.setdefault("first_changed", []).append(int(first[0] != answer))
                ex["tokens"].append(generated)
                ex["nfe"].append(spent)
                if i < 3:
                    ex["samples"].append(dict(prompt=task.rows[i]["prompt"], output=text, pred=final_number(text),
                                              gold=task.golds[i]))
            ev.results.save_partial(phase, ex, row)
            progress.update(len(ix))
    return generation_summary(ex)


def evaluate_setting(ev, setting, teacher_forcing):
    """One row: the generation columns, the teacher-forced ones, and its paired gains over the steps=1 row."""
    rows, name = ev.results.result["rows"], setting_name(setting)
    row = ev.results.partial_row(name) or dict(setting=name, **setting)  # a killed run's row goes on
    if ev.cfg["generate"] and "accuracy" not in row:
        row.update(generation_columns(ev, setting, row))
    if teacher_forcing:
        ode = {key: setting[key] for key in ODE}
        tf_batch = lambda *batch: teacher_forced(ev.model, *batch, **ode)  # noqa: E731 (x, y, labels, seeds)
        row.update(teacher_forced_columns(ev, tf_batch, name + " (tf)", row))
    if not ev.cfg["generate"]:  # the plot's x axis for dopri5
        row["nfe_per_token"] = row.get("tf_nfe_per_token", 0.0)
    base_row = next((r for r in rows if r["steps"] == 1 and r.get("candidates") == row.get("candidates")), None)
    row.update(row_gains(row, base_row) if base_row else {})  # paired: gain and tf_gain over the base
    ev.results.finish_phase()
    rows.append(row)
    ev.results.write()
    return row


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = configure(OPTIONS, argv)
    device = resolve_device(cfg["device"])  # both checked before anything is loaded
    dtype = resolve_dtype(cfg["dtype"], device)
    if not cfg["ckpt"]:
        raise UsageError("--ckpt is required: a ckpt.pt from train.py, or a base model (e.g. smollm2-135m)")
    model, tokenizer, ckpt = checkpoint.load(cfg["ckpt"])
    ckpt, ckpt_path = ckpt or {}, checkpoint.checkpoint_path(cfg["ckpt"]) if ckpt else None  # {}: a base model
    settings, probe_t, teacher_forcing = plan(cfg, model)
    merge_lora(model).to(device)  # LoRA folded into its weights (equal logits, a plain layer's cost)
    store_weights(model, dtype)  # nothing trains here: every weight in dtype, but the norms
    task = load_task(cfg, model, tokenizer, ckpt.get("tokenizer") or ckpt.get("init_from") or cfg["ckpt"],
                     ckpt.get("classes") or [], settings)
    out = output_path(cfg["out"], ckpt_path, cfg["resume"], cfg["overwrite"])
    kind = f"L2D ({model.config.variant})" if isinstance(model, L2D) else \
        f"AR2Diff (L={model.config.answer_len})" if isinstance(model, AR2Diff) else "GPT"
    print(f"{kind} from {cfg['ckpt']} on {task.data_dir} ({task.split}): {task.n} examples, {len(settings)} row(s), "
          f"device {device}, {str(dtype)[6:]}")
    result = dict(ckpt=cfg["ckpt"], model=kind, task=cfg["task"], data=task.data_dir, split=task.split, n=task.n,
                  config=cfg, rows=[])
    labels = None if task.labels is None else torch.as_tensor(task.labels, device=device)
    ev = SimpleNamespace(cfg=cfg, model=model, task=task, device=device, mixed=autocast(device, dtype),
                         results=ResultsFile(out, result, cfg["resume"]),
                         labels_of=lambda ix: None if labels is None else labels[list(ix)],
                         block_size=(model.base if isinstance(model, (L2D, AR2Diff)) else model).config.block_size)
    try:
        probes = ev.results.result.setdefault("probe", []) if probe_t else []
        if probe_t:
            print(f"{'gold x_t at t':<14} {'acc':>6} {'95% CI':>15} {'nll':>7} {'tokens':>7}")
        for i, t in enumerate(probe_t):  # the teacher-forced columns when the path reads the gold token noised to t
            if i == len(probes):  # not kept from a resumed run
                probes.append(dict(t=t, **teacher_forced_columns(
                    ev, lambda x, y, labels, _, t=t: gold_x_t(model, x, y, t, labels), f"gold x_t, t={t:g}")))
                ev.results.finish_phase()
                ev.results.write()
            p = probes[i]
            print(f"t={t:<12g} {p['tf_accuracy']:6.3f} [{p['tf_ci_low']:.3f}, {p['tf_ci_high']:.3f}] "
                  f"{p['tf_nll']:7.3f} {p['tf_tokens']:7d}")
        if settings:
            print(HEADER)
        rows = ev.results.result["rows"]
        for row in rows:  # kept from a resumed run
            print(format_row(row))
        for setting in settings[len(rows):]:
            print(format_row(evaluate_setting(ev, setting, teacher_forcing)))
    except KeyboardInterrupt:  # the JSON is written atomically: what it holds is whole
        raise KeyboardInterrupt(f"{out} keeps every batch done: the same command with --resume True goes on from it"
                                if ev.results.written else "nothing was written") from None
    print(f"wrote {out}")
    if rows:
        plot(os.path.splitext(out)[0] + ".png", [("", rows)], f"{kind}: {cfg['ckpt']} on {cfg['task']} (n={task.n})")
    return ev.results.result


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
    except KeyboardInterrupt as e:
        print(f"error: interrupted; {e.args[0] if e.args else 'nothing was written'}", file=sys.stderr)
        sys.exit(130)
