"""
Plot eval.py's results: accuracy against steps (against path evaluations per token for dopri5), with
95% intervals, several runs in one figure (eval.py draws each run's own).

    python -m harness.plot --runs out-l2d-smollm2-arith/eval_tf.json,out-lora-smollm2-arith/eval_tf.json \
                   --labels "L2D,LoRA" --out assets/compare.png --title "SmolLM2-135M, arithmetic"

A run with a single row (a GPT, LoRA or full finetune) is drawn as a level with its interval as a band.
Needs matplotlib (an optional dependency).
"""

import itertools
import os

import numpy as np

from configurator import UsageError, configure, fail
from harness.intervals import read_results
from loading.files import OutputError, check_output, write_atomic

OPTIONS = dict(
    runs=("", "eval.py result files, comma-separated"),
    labels=("", 'one legend label per run, comma-separated ("": lines named by kind only)'),
    out=("compare.png", "the figure to write: .png, .pdf or .svg"),
    title=("", "the figure's title"),
    overwrite=(False, "replace a file at --out that matplotlib did not draw"),
)


def pyplot():
    """matplotlib.pyplot drawing to files, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def drawn_by_matplotlib(path):
    """A figure --out may replace without --overwrite: matplotlib names itself in its first bytes."""
    try:
        with open(path, "rb") as f:
            return b"Matplotlib" in f.read(4096)
    except OSError:
        return False


def check_figure(path, overwrite):
    """Refuse a figure's --out before any work: another format, or (check_output) a file that is not a figure."""
    if os.path.splitext(path)[1][1:].lower() not in ("png", "pdf", "svg"):
        raise OutputError(f"--out {path} must end in .png, .pdf or .svg (the figure's format)")
    return check_output(path, "--out", overwrite, ours=drawn_by_matplotlib)


def save_figure(fig, path, dpi):
    """fig written whole or not at all (a full disk or read-only folder: one line)."""
    write_atomic(path, lambda f: fig.savefig(f, format=os.path.splitext(path)[1][1:].lower(), dpi=dpi))


def draw_run(ax, rows, label, colors):
    """One run's lines on ax: generation and teacher-forced accuracy, one line per guidance weight (L2D)
    or per number of candidates K (AR2Diff). L2D's steps=1 row (the base) starts every guidance weight's line."""
    adaptive = any(r["steps"] is None for r in rows)
    groups = sorted({(r["guidance"], r.get("candidates") or 0) for r in rows})  # candidates: AR2Diff rows only
    weights = {w for w, _ in groups}
    for w, k in groups:
        sel = [r for r in rows if (r["guidance"], r.get("candidates") or 0) == (w, k) or (r["steps"] == 1 and not k)]
        xs = [r["nfe_per_token"] if adaptive else r["steps"] for r in sel]
        tag = label + (f" w={w:g}" if len(weights) > 1 else "") + (f" K={k}" if k else "")
        for key, ci, kind in (("accuracy", "ci", "generation"), ("tf_accuracy", "tf_ci", "teacher-forced")):
            if sel[0].get(key) is None:
                continue
            acc = np.array([r[key] for r in sel])
            err = np.array([[r[key] - r[ci + "_low"], r[ci + "_high"] - r[key]] for r in sel]).T
            name, color = f"{tag}, {kind}".lstrip(", "), next(colors)
            if len(sel) == 1:  # a single model: a level to compare against
                ax.axhline(acc[0], linestyle=":", color=color, label=name)
                ax.axhspan(acc[0] - err[0, 0], acc[0] + err[1, 0], color=color, alpha=0.12)
            else:
                ax.errorbar(xs, acc, yerr=err, marker="o" if kind == "generation" else "s",
                            linestyle="-" if kind == "generation" else "--", color=color, capsize=3, label=name)
    return adaptive


def plot(path, runs, title):
    """Draw runs [(label, rows)] to path; a note instead when matplotlib is missing."""
    if not (plt := pyplot()):
        return print("matplotlib is not installed: no plot")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    adaptive = any([draw_run(ax, rows, label, colors) for label, rows in runs])  # (a list: every run drawn)
    if not adaptive:
        ax.set_xscale("log", base=2)
    ax.set(xlabel="mean path evaluations per token" if adaptive else "steps", ylabel="accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    cfg = configure(OPTIONS, argv)
    check_figure(cfg["out"], cfg["overwrite"])
    paths = [p for p in cfg["runs"].split(",") if p]
    labels = cfg["labels"].split(",") if cfg["labels"] else [""] * len(paths)
    if not paths or len(labels) != len(paths):
        raise UsageError("--runs takes eval.py JSON files (comma-separated) and --labels, if given, one label per file")
    plot(cfg["out"], [(label, read_results(path)["rows"]) for path, label in zip(paths, labels)], cfg["title"])


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError) as e:  # (read_results': a file that is not eval.py's)
        fail(e)
