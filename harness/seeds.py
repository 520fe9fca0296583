"""
The CPU lab over training seeds: pretrain a base per base seed (config/lab_base.py), finetune it with each
method per path seed (config/lab_<method>.py, else harness/experiments/lab_<method>.py; "<a>_on_<b>": a
on b's run of the same seeds), evaluate every run on each split and summarise across seeds, `jobs` at once,
one thread each. A killed grid resumes: a finished job leaves OUT/<job>.done, a training its checkpoint.

    python -m harness.seeds --bases 1,2,3 --paths 1                # 3 bases, L2D and LoRA on each
    python -m harness.seeds --methods l2d,lora,lora_params,l2d_on_lora   # + LoRA at the path's size, L2D on LoRA

A mean over seeds comes with a 95% t-interval (n - 1 degrees of freedom); "seeds, own interval > 0"
counts the seeds whose paired interval over the examples is above 0.
"""

import math
import os
import subprocess
import sys
import time

import numpy as np

from configurator import UsageError, configure, fail, parse_list
from harness.intervals import read_results, row_gains
from harness.plot import pyplot, save_figure

OPTIONS = dict(
    bases=("1337", "seeds of the base's pretraining (initial weights and data order)"),
    paths=("1337", "seeds of each finetuning run (initial weights, data order, t and noise)"),
    methods=("l2d,lora", "finetuning configs lab_<method>.py: l2d, lora, lora_params; a_on_b: a on b's run"),
    steps=("1,2,4,8,16", "L2D's ODE steps per token at evaluation"),
    splits=("test,confirm", "held-out splits each run is evaluated on"),
    data=("data/arithmetic", "the folder holding the lab's prepared lab-addsub (base) and lab-mul (finetuning)"),
    limit=(0, "evaluate on the first N examples only; 0: all", ">= 0"),
    train_args=("", "extra options for every train.py run, e.g. '--max_iters=500' (a smaller lab)"),
    jobs=(2, "trainings or evaluations at once, one thread each", ">= 1"),
    out=("out-seeds", "the grid's folder: one run folder per job, logs, summary.md and summary.png"),
)
LABELS = dict(l2d="L2D", lora="LoRA", lora_params="LoRA at the path's size", l2d_on_lora="L2D on LoRA")
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student t, df = 1..10


def plan(cfg):
    """The jobs {name: (prerequisite job or None, argv)}, in the order they may start."""
    out, data, jobs = cfg["out"], cfg["data"], {}
    for b in cfg["bases"]:
        jobs[f"base-{b}"] = None, ["train.py", "config/lab_base.py", f"--seed={b}", f"--out_dir={out}/base-{b}",
                                   f"--datasets={[data + '/lab-addsub']}"]
        for method in cfg["methods"]:
            method_config, _, on = method.partition("_on_")
            for p in cfg["paths"]:
                run, base = f"{method}-{b}-{p}", f"{on}-{b}-{p}" if on else f"base-{b}"
                jobs[run] = base, ["train.py", config_of(method_config), f"--init_from={out}/{base}/ckpt.pt",
                                   f"--seed={p}", f"--out_dir={out}/{run}", f"--datasets={[data + '/lab-mul']}"]
                steps = ",".join(map(str, steps_of(method, cfg)))
                for split in cfg["splits"]:
                    jobs[f"{run}-{split}"] = run, ["eval.py", f"--ckpt={out}/{run}/ckpt.pt", f"--data={data}/lab-mul",
                                                   f"--split={split}", f"--steps={steps}", f"--limit={cfg['limit']}",
                                                   "--gen_batch_size=50", "--max_new_tokens=8",
                                                   f"--out={out}/{run}/eval_{split}.json", "--overwrite=True"]
    for name, (_, argv) in jobs.items():
        if argv[0] == "train.py":
            argv += cfg["train_args"].split()
            if os.path.exists(f"{out}/{name}/ckpt.pt") and not os.path.exists(f"{out}/{name}.done"):
                argv.append("--init_from=resume")  # a killed training goes on from its last checkpoint
    return jobs


def config_of(method):
    readme = f"config/lab_{method}.py"
    return readme if os.path.exists(readme) else f"harness/experiments/lab_{method}.py"


def run_all(jobs, out, parallel):
    """Run every job whose prerequisite is done, `parallel` at a time; True when all succeeded."""
    done = {name for name in jobs if os.path.exists(f"{out}/{name}.done")}
    pending = [name for name in jobs if name not in done]
    running, failed = {}, set()
    while pending or running:
        for name in [n for n in pending if jobs[n][0] in done | {None}][:parallel - len(running)]:
            pending.remove(name)
            log = open(f"{out}/{name}.log", "w")
            print(f"start {name}: python {' '.join(jobs[name][1])}", flush=True)
            running[name] = subprocess.Popen([sys.executable, *jobs[name][1]], stdout=log, stderr=subprocess.STDOUT,
                                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode == 0:
                    open(f"{out}/{name}.done", "w").close()
                    done.add(name)
                    print(f"done  {name}", flush=True)
                else:
                    failed.add(name)
                    print(f"FAILED {name} (exit {proc.returncode}): see {out}/{name}.log", flush=True)
        blocked = [n for n in pending if jobs[n][0] in failed]
        for name in blocked:  # its prerequisite failed: it cannot start
            pending.remove(name)
            failed.add(name)
        if running and not blocked:
            time.sleep(2)
    return not failed


def mean_interval(values):
    """(mean, 95% low, high) over seeds: a t-interval (a single seed has no interval: nan)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan, math.nan
    half = (T_975[len(v) - 2] if len(v) <= 11 else 1.96) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def fmt(m, lo, hi, sign="+"):
    """In points: 'mean [low, high]' (a gain signed), or the mean alone for a single seed."""
    return f"{m * 100:{sign}.1f}" + (f" [{lo * 100:{sign}.1f}, {hi * 100:{sign}.1f}]" if not math.isnan(lo) else "")


def summarize(cfg):
    """summary.md: per split, each run's exact match and tf by steps with their means over seeds, then the
    gains over 1 step, of 16 over 4 and over each baseline, paired on each (base, path) seed."""
    seeds = [(b, p) for b in cfg["bases"] for p in cfg["paths"]]
    columns = [(m, s) for m in cfg["methods"] for s in steps_of(m, cfg)]
    rows_of, lines = {}, []
    for split in cfg["splits"]:
        rows = rows_of[split] = {}  # {(method, base, path): {steps: eval.py's row}}
        for b, m, p in ((b, m, p) for b in cfg["bases"] for m in cfg["methods"] for p in cfg["paths"]):
            rows[m, b, p] = {r["steps"]: r for r in read_results(f"{cfg['out']}/{m}-{b}-{p}/eval_{split}.json")["rows"]}
        n = next(iter(next(iter(rows.values())).values()))["n"]  # the first row's, as every row's
        lines += [f"## {split} split: {len(seeds)} seed pairs (base, path), n = {n} examples each", ""]
        for key, name in (("accuracy", "exact match"), ("tf_accuracy", "teacher-forced")):
            lines += [f"| {name}, % | " + " | ".join(f"{m} @{s}" for m, s in columns) + " |",
                      "|---" * (1 + len(columns)) + "|"]
            lines += [f"| base {b}, path {p} | " + " | ".join(f"{rows[m, b, p][s][key] * 100:.1f}" for m, s in columns)
                      + " |" for b, p in seeds]
            lines += ["| mean [95% over seeds] | " + " | ".join(
                fmt(*mean_interval([rows[m, b, p][s][key] for b, p in seeds]), sign="") for m, s in columns) + " |", ""]
        lines += gains(rows, seeds, cfg) + [""]
    text = "\n".join(lines)
    with open(f"{cfg['out']}/summary.md", "w") as f:
        f.write(text + "\n")
    print(text)
    figure(rows_of[cfg["splits"][0]], seeds, cfg, f"{cfg['out']}/summary.png")


def figure(rows, seeds, cfg, path):
    """Exact match and tf against steps, as the mean over seeds with its 95% band: a line per L2D, a level
    per baseline (one forward of a GPT). A note instead of the PNG when matplotlib is missing."""
    if not (plt := pyplot()):
        return print("matplotlib is not installed: no figure")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, name) in zip(axes, (("accuracy", "exact match, %"), ("tf_accuracy", "teacher-forced, %"))):
        for method, color in zip(cfg["methods"], plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            steps = steps_of(method, cfg)
            m, lo, hi = (100 * np.array(v) for v in zip(*(
                mean_interval([rows[method, b, p][s][key] for b, p in seeds]) for s in steps)))
            label = LABELS.get(method, method)
            if len(steps) > 1:
                ax.plot(steps, m, "o-", color=color, label=label)
                ax.fill_between(steps, lo, hi, color=color, alpha=0.2)
            else:
                ax.axhline(m[0], color=color, linestyle="--", label=label)
                ax.axhspan(lo[0], hi[0], color=color, alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set(xticks=cfg["steps"], xticklabels=cfg["steps"], xlabel="ODE steps per token", ylabel=name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg['splits'][0]} split, mean and 95% interval over {len(seeds)} seed pairs (base, path)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def steps_of(method, cfg):
    return cfg["steps"] if method.startswith("l2d") else [1]  # a GPT's one forward


def gains(rows, seeds, cfg):
    """Table lines: each gain's mean [95% over seeds] and the seeds whose own paired interval is above 0."""
    comparisons, steps, label = [], cfg["steps"], lambda m: LABELS.get(m, m)
    for a in [m for m in cfg["methods"] if m.startswith("l2d")]:
        comparisons += [(f"{label(a)} {s} over 1 step", (a, s), (a, 1)) for s in steps if s != 1]
        if 4 in steps and 16 in steps:
            comparisons.append((f"{label(a)} 16 over 4 steps", (a, 16), (a, 4)))
        for b in [m for m in cfg["methods"] if not m.startswith("l2d")]:
            comparisons += [(f"{label(a)} @{s} - {label(b)}", (a, s), (b, 1)) for s in steps]
    beyond = "seeds, own interval > 0"
    lines = [f"| gain, points | exact match | {beyond} | teacher-forced | {beyond} |", "|---|---|---|---|---|"]
    for name, (m, s), (m0, s0) in comparisons:
        cells = []
        for key in ("gain", "tf_gain"):
            each = [row_gains(rows[m, b, p][s], rows[m0, b, p][s0])[key] for b, p in seeds]
            cells += [fmt(*mean_interval([d for d, _, _ in each])), f"{sum(lo > 0 for _, lo, _ in each)}/{len(each)}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    cfg = configure(OPTIONS, argv)
    for key, kind in (("bases", int), ("paths", int), ("steps", int), ("methods", str), ("splits", str)):
        cfg[key] = parse_list(key, cfg[key], kind, OPTIONS[key][0])
    for method in cfg["methods"]:
        method_config, _, on = method.partition("_on_")
        if not os.path.exists(config_of(method_config)) or on and on not in cfg["methods"]:
            raise UsageError(f"--methods: no lab config for {method} (l2d, lora, lora_params; a_on_b needs b in "
                             "--methods too)")
    for name in ("lab-addsub", "lab-mul"):
        if not os.path.isdir(f"{cfg['data']}/{name}"):
            raise UsageError(f"--data {cfg['data']} has no {name}/: run the prepare commands of config/lab_base.py "
                             "(the README's quick start), or name the folder that holds them")
    # before a job starts: a bad --steps would fail only at the first evaluation
    if not 1 <= min(cfg["steps"]) <= max(cfg["steps"]) <= 1_000_000:
        raise UsageError(f"--steps must be in 1..1000000, got {cfg['steps']}")
    try:
        os.makedirs(cfg["out"], exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {cfg['out']}: cannot make the grid's folder ({e.strerror}); name another") from None
    try:
        ok = run_all(plan(cfg), cfg["out"], cfg["jobs"])
    except KeyboardInterrupt:
        print("error: interrupted; finished jobs are kept, and the same command goes on from them", file=sys.stderr)
        sys.exit(130)
    if not ok:
        sys.exit(f"error: some jobs failed (their logs are in {cfg['out']}); the same command retries them")
    summarize(cfg)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError) as e:  # (read_results': a run's eval JSON damaged)
        fail(str(e))
