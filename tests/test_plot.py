"""plot.py: several eval.py result files in one figure, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from harness import plot
from configurator import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(steps, acc, low, high, guidance=1.0):
    return dict(steps=steps, guidance=guidance, nfe_per_token=0.0, tf_accuracy=acc, tf_ci_low=low, tf_ci_high=high)


def test_runs_side_by_side(tmp_path):
    l2d = [row(1, 0.1, 0.08, 0.12), row(2, 0.3, 0.27, 0.33), row(4, 0.35, 0.32, 0.38)]
    lora = [row(1, 0.7, 0.66, 0.74)]
    paths = []
    for name, rows in (("l2d", l2d), ("lora", lora)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(dict(rows=rows), f)
    out = tmp_path / "compare.png"
    plot.main(["--runs", ",".join(paths), "--labels", "L2D,LoRA", "--out", str(out)])
    plt = pytest.importorskip("matplotlib.pyplot")  # without matplotlib, main() only says so
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, ax = plt.subplots()
    plot.draw_run(ax, l2d, "L2D", iter(["C0"]))
    plot.draw_run(ax, lora, "LoRA", iter(["C1"]))
    assert set(ax.get_legend_handles_labels()[1]) == {"L2D, teacher-forced", "LoRA, teacher-forced"}
    assert list(ax.get_lines()[-1].get_ydata()) == [0.7, 0.7]  # the single-row run: a level line at its accuracy
    plt.close(fig)


def test_bad_input_is_one_line_exit_2(tmp_path):
    with pytest.raises(UsageError):
        plot.main(["--runs", "a.json,b.json", "--labels", "only one"])
    proc = subprocess.run([sys.executable, "-m", "harness.plot", "--runs", str(tmp_path / "missing.json")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read eval results from")
    assert len(proc.stderr.strip().splitlines()) == 1
