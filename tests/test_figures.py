"""harness/figures.py: reads sample.py --show_steps text back into each token's guesses along t."""

import subprocess
import sys

from harness import figures

SHOWN = """Question: What is 47 * 38?
Answer: 
    step 1    t 0.0000 -> 0.5000  evaluated at t=0.2500: '1' 1.00  '2' 0.00
    read-out  t = 1               evaluated at t=1     : '1' 1.00  '2' 0.00
  token: '1' (argmax; NFE 3)
    step 1    t 0.0000 -> 0.5000  evaluated at t=0.2500: '8' 0.40  '7' 0.30  '\\'' 0.05
    read-out  t = 1               evaluated at t=1     : '8' 0.97  '9' 0.01
  token: '8' (argmax; NFE 3)
"""


def test_read_tokens():
    tokens = figures.read_tokens(SHOWN)
    assert len(tokens) == 2
    assert tokens[1] == [(0.25, {"8": 0.40, "7": 0.30, "\\'": 0.05}), (1.0, {"8": 0.97, "9": 0.01})]


def test_bad_token_is_one_line_exit_2(tmp_path):
    shown = tmp_path / "steps.txt"
    shown.write_text(SHOWN)
    result = subprocess.run([sys.executable, "-m", "harness.figures", "--steps_file", str(shown), "--token", "3",
                             "--out", str(tmp_path / "f.png")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--token 3" in result.stderr
