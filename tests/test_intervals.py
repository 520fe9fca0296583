"""The intervals eval.py reports, against closed forms and known values."""
import os
import subprocess
import sys

import numpy as np
import pytest

from harness import intervals

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("correct,n,low,high", [
    (50, 100, 0.4038, 0.5962),
    (0, 10, 0.0, 0.2775),   # upper = z^2 / (n + z^2)
    (10, 10, 0.7225, 1.0),
    (0, 0, 0.0, 1.0),
])
def test_wilson_interval(correct, n, low, high):
    lo, hi = intervals.wilson_interval(correct, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_ratio_interval_known_cases():
    # one token per example: the ratio estimator's interval is Wald's with m - 1, p +- z sqrt(p(1-p)/(m-1))
    correct, count = [1] * 30 + [0] * 70, [1] * 100
    half = 1.96 * (0.3 * 0.7 / 99) ** 0.5
    assert intervals.ratio_interval(correct, count) == pytest.approx((0.3 - half, 0.3 + half), abs=1e-12)
    # 5 tokens per example, each example all right or all wrong: exactly as wide as counting examples,
    # wider than pretending the 500 tokens were independent
    assert intervals.ratio_interval([5] * 30 + [0] * 70, [5] * 100) == pytest.approx((0.3 - half, 0.3 + half), abs=1e-12)
    assert intervals.ratio_interval([5] * 30 + [0] * 70, [5] * 100)[0] < intervals.wilson_interval(150, 500)[0]
    # every example at the same rate: no spread between examples, zero width
    assert intervals.ratio_interval([1, 2, 3], [2, 4, 6]) == pytest.approx((0.5, 0.5))
    assert intervals.ratio_interval([1], [3]) == (0.0, 1.0)  # one example: no estimate of the spread



def test_paired_difference_known_cases():
    # one token per example: the paired t-interval's ingredients, mean and sample std (ddof=1) of a_i - b_i
    a, b = np.array([1, 1, 0, 0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 0, 1, 1, 1])
    d = a - b
    half = 1.96 * d.std(ddof=1) / len(d) ** 0.5
    assert intervals.paired_difference(a, b, [1] * 8) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    # two rows that agree on every example except a few: the paired interval is much narrower than the
    # unpaired one built from the two rows' own intervals (which ignores that they share the hard examples)
    a = [1] * 40 + [0] * 60
    b = [1] * 35 + [0] * 65
    diff, low, high = intervals.paired_difference(a, b, [1] * 100)
    se_a, se_b = (intervals.ratio_interval(r, [1] * 100)[1] - p for r, p in ((a, 0.4), (b, 0.35)))
    assert diff == pytest.approx(0.05) and high - low < 0.6 * 2 * (se_a ** 2 + se_b ** 2) ** 0.5
    # against nothing, it is ratio_interval; identical rows: zero difference, zero width
    assert intervals.paired_difference([2, 0, 3], [0, 0, 0], [3, 2, 4])[1:] == pytest.approx(intervals.ratio_interval([2, 0, 3], [3, 2, 4]))
    assert intervals.paired_difference([2, 0, 3], [2, 0, 3], [3, 2, 4]) == pytest.approx((0.0, 0.0, 0.0))


def test_step_to_step_compares_each_row_with_the_one_before():
    rows = [dict(setting=f"steps={s}", n=4, example_correct=c, tf_example_correct=tc, tf_example_count=[2, 2, 3, 1])
            for s, c, tc in ((1, [0, 0, 1, 0], [0, 1, 1, 0]), (2, [1, 0, 1, 0], [2, 1, 2, 0]), (4, [1, 1, 1, 0], [2, 2, 3, 1]))]
    lines = intervals.step_to_step(rows)
    assert [line.split(":")[0] for line in lines] == ["steps=2 vs steps=1", "steps=4 vs steps=2"]
    # steps=4 vs 2 on tf: (8 - 5) / 8 correct tokens more; the numbers printed are paired_difference's
    d, low, high = intervals.paired_difference([2, 2, 3, 1], [2, 1, 2, 0], [2, 2, 3, 1])
    assert d == pytest.approx(3 / 8) and f"tf_gain {100 * d:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]" in lines[1]
    assert "gain +25.00" in lines[0]
    assert "no per-example results" in intervals.step_to_step([dict(setting="a"), dict(setting="b")])[0]


def test_across_runs_pairs_the_shared_first_examples():
    count = [2, 2, 3, 1, 4]
    run_a = dict(task="gsm8k", data="d", n=5, rows=[dict(setting="steps=8", tf_example_correct=[2, 1, 2, 0, 4], tf_example_count=count)])
    run_b = dict(task="gsm8k", data="d", n=3, rows=[dict(setting="atol=0.01", tf_example_correct=[2, 2, 3], tf_example_count=count[:3])])
    lines = intervals.across_runs(run_a, run_b)
    # b has the first 3 examples: (7 - 5) / 7 more correct tokens there, with paired_difference's interval
    d, low, high = intervals.paired_difference([2, 2, 3], [2, 1, 2], [2, 2, 3])
    assert d == pytest.approx(2 / 7)
    assert lines == ["on the first 3 examples:", f"atol=0.01 vs steps=8: tf_gain {100 * d:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] points"]
    assert intervals.across_runs(run_a, dict(run_b, data="/another/clone/d")) == lines  # same folder, other clone
    with pytest.raises(ValueError, match="answer lengths"):  # different examples behind the same indices
        intervals.across_runs(run_a, dict(run_b, rows=[dict(run_b["rows"][0], tf_example_count=[2, 2, 4])]))
    with pytest.raises(ValueError, match="different data"):
        intervals.across_runs(run_a, dict(run_b, task="arithmetic"))
    # exact match: one answer per example, so the first 3 answers of a 5-example run against a 3-example one
    em_a = dict(run_a, rows=[dict(setting="steps=8", n=5, example_correct=[1, 0, 0, 1, 1])])
    em_b = dict(run_b, rows=[dict(setting="steps=16", n=3, example_correct=[1, 1, 0])])
    d, low, high = intervals.paired_difference([1, 1, 0], [1, 0, 0], [1, 1, 1])
    assert d == pytest.approx(1 / 3)
    assert intervals.across_runs(em_a, em_b)[1] == f"steps=16 vs steps=8: gain {100 * d:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] points"
    named = intervals.across_runs(dict(em_a, ckpt="out-a/ckpt.pt"), dict(em_b, ckpt="out-b/ckpt.pt"))[1]
    assert named.startswith("out-b/ckpt.pt steps=16 vs out-a/ckpt.pt steps=8: gain")  # rows named by their runs


def test_cli_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.intervals", str(tmp_path / "missing.json")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing.json" in proc.stderr


def test_help_is_printed_not_read_as_a_results_file():
    for flag in ("-h", "--help"):
        proc = subprocess.run([sys.executable, "-m", "harness.intervals", flag], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.startswith("95% intervals") and not proc.stderr
    proc = subprocess.run([sys.executable, "-m", "harness.intervals"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: usage: python -m harness.intervals")
