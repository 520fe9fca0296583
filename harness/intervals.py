"""
95% intervals for eval.py's accuracies: over n independent answers (Wilson), over the tokens of m
examples (the ratio estimator: one answer's tokens are not independent), and for the difference of two
rows on the same examples (paired). Run on eval.py JSONs: one, each row against the row before it; two,
every row of the second against every row of the first, on the examples both have (the first min(n):
eval.py always starts at example 0).

    python -m harness.intervals out-lab-l2d/eval_results.json
    python -m harness.intervals out-lab-l2d/eval_results.json out-lab-lora/eval_results.json
"""

import json
import math
import os
import sys

import numpy as np

from configurator import fail
from loading.files import read_error


def wilson_interval(correct, n, z=1.96):
    """95% Wilson score interval for a proportion correct / n ((0, 1) when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def ratio_interval(correct, count, z=1.96):
    """95% interval for a token accuracy sum(correct) / sum(count) pooled over examples (per-example lists):
    one example's tokens are not independent draws, so the variance is the ratio estimator's over examples."""
    _, low, high = paired_difference(correct, np.zeros(len(count)), count, z)
    return max(0.0, low), min(1.0, high)


def paired_difference(correct_a, correct_b, count, z=1.96):
    """(difference, 95% low, high) of accuracies a - b on the same examples (per-example correct counts and
    positions): pairing removes what the rows share (an example easy for both), so it is narrower than
    the rows' own intervals suggest. var = m / (m - 1) * sum_i (d_i - diff n_i)^2 / N^2 (m examples, N tokens)."""
    a, b, k = (np.asarray(v, dtype=np.float64) for v in (correct_a, correct_b, count))
    m, total = len(k), k.sum()
    if m < 2 or total == 0:
        return 0.0, -1.0, 1.0
    diff = (a.sum() - b.sum()) / total
    half = z * math.sqrt(m / (m - 1) * (((a - b) - diff * k) ** 2).sum()) / total
    return diff, diff - half, diff + half


def row_gains(row, reference):
    """Paired gains of one eval.py row over another from their per-example results: {"gain": exact match,
    "tf_gain": teacher-forced}, each (difference, low, high), where both rows have them."""
    gains = {}
    if "example_correct" in row and "example_correct" in reference:
        gains["gain"] = paired_difference(row["example_correct"], reference["example_correct"],
                                          [1] * len(row["example_correct"]))
    if "tf_example_correct" in row and "tf_example_correct" in reference:
        gains["tf_gain"] = paired_difference(row["tf_example_correct"], reference["tf_example_correct"],
                                             row["tf_example_count"])
    return gains


def comparison(row, reference):
    """One line: row minus reference, paired, in points."""
    gains = ", ".join(f"{name} {100 * d:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] points"
                      for name, (d, low, high) in row_gains(row, reference).items())
    return f"{row['setting']} vs {reference['setting']}: {gains or 'no per-example results (re-run eval.py)'}"


def step_to_step(rows):
    return [comparison(row, before) for before, row in zip(rows, rows[1:])]


def across_runs(run_a, run_b):
    """Every row of run_b against every row of run_a on their shared first examples. ValueError if the runs
    are on different data or their token counts differ."""
    def dataset(run):  # the task and the data folder's name: the same in another clone
        return run["task"], os.path.basename(os.path.normpath(run["data"]))

    if dataset(run_a) != dataset(run_b):
        raise ValueError(f"the runs are on different data: {run_a['data']} and {run_b['data']}")
    m = min(run_a["n"], run_b["n"])
    named = run_a.get("ckpt") != run_b.get("ckpt")  # then each row is named by its model too
    rows_a, rows_b = ([dict({k: v[:m] if k.startswith(("example_", "tf_example_")) else v for k, v in row.items()},
                            setting=f"{run['ckpt']} {row['setting']}" if named else row["setting"])
                       for row in run["rows"]] for run in (run_a, run_b))
    if len({tuple(row["tf_example_count"]) for row in rows_a + rows_b if "tf_example_count" in row}) > 1:
        raise ValueError("the runs' answer lengths differ on the shared examples: not the same examples")
    return [f"on the first {m} examples:"] + [comparison(row, reference) for row in rows_b for reference in rows_a]


def read_results(path):
    """An eval.py results file (a JSON object with its rows), or a one-line ValueError saying what it is."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        why = "" if isinstance(run, dict) and isinstance(run.get("rows"), list) else "it is JSON without eval.py's rows"
    except OSError:
        why = f"it {read_error(path)}"
    except ValueError:  # (JSON and UTF-8 errors)
        why = "it is not JSON"
    if why:
        raise ValueError(f"cannot read eval results from {path}: {why}; name a JSON that eval.py wrote (its --out)")
    return run


def main(paths):
    if "-h" in paths or "--help" in paths:
        return print(__doc__.strip())
    if len(paths) not in (1, 2):
        fail("usage: python -m harness.intervals EVAL_JSON [EVAL_JSON_2] (eval.py results files; -h: help)")
    try:
        runs = [read_results(path) for path in paths]
    except ValueError as e:
        fail(e)
    try:
        print("\n".join(step_to_step(runs[0]["rows"]) if len(runs) == 1 else across_runs(*runs)))
    except (KeyError, ValueError) as e:
        fail(f"cannot compare {' and '.join(paths)}: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
