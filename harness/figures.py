"""
Draw one token's top guesses along the ODE from the text that `sample.py --show_steps` prints: the
probability of each of the likeliest tokens at every solver step's t, then at the t = 1 read-out.

    python sample.py --init_from out-lab-l2d/ckpt.pt --steps 16 --show_steps --temperature 0 \
        --num_samples 1 --max_new_tokens 4 --start "Question: What is 47 * 38?\nAnswer: " > steps.txt
    python -m harness.figures --steps_file steps.txt --token 2 --out assets/show_steps.png

A token outside a step's printed top five is drawn at 0 there. Needs matplotlib (an optional dependency).
"""

import re

from configurator import UsageError, configure, fail
from harness.plot import check_figure, pyplot, save_figure
from loading.files import read_error

OPTIONS = dict(
    steps_file=("", "the text sample.py --show_steps printed"),
    token=(1, "which generated token to draw (1: the first)"),
    top=(3, "how many tokens to draw: those with the highest probability anywhere along the ODE"),
    out=("show_steps.png", "the figure to write: .png, .pdf or .svg"),
    title=("", "the figure's title"),
    overwrite=(False, "replace a file at --out that matplotlib did not draw"),
)
STEP = re.compile(r"evaluated at t=([0-9.]+)\s*:(.*)$")
GUESS = re.compile(r"'((?:[^'\\]|\\.)*)' ([0-9.]+)")


def read_tokens(text):
    """Per generated token, its list of (t, {token: probability}) along the ODE, in order."""
    tokens, current = [], []
    for line in text.splitlines():
        if m := STEP.search(line):
            current.append((float(m.group(1)), {tok: float(p) for tok, p in GUESS.findall(m.group(2))}))
        elif line.strip().startswith("token:") and current:
            tokens.append(current)
            current = []
    return tokens


def main(argv=None):
    cfg = configure(OPTIONS, argv)
    check_figure(cfg["out"], cfg["overwrite"])
    path = cfg["steps_file"]
    try:
        with open(path, encoding="utf-8") as f:
            tokens = read_tokens(f.read())
    except (OSError, UnicodeDecodeError) as e:
        why = "is not text" if isinstance(e, UnicodeDecodeError) else read_error(path)
        raise UsageError(f"--steps_file {path!r} {why}: name the text that sample.py --show_steps printed") from None
    if not 1 <= cfg["token"] <= len(tokens):
        raise UsageError(f"--token {cfg['token']}: {cfg['steps_file']} shows {len(tokens)} token(s) "
                         "(run sample.py with --show_steps and write its output there)")
    steps = tokens[cfg["token"] - 1]
    best = {}  # each token's highest probability anywhere along the ODE
    for _, guesses in steps:
        for tok, p in guesses.items():
            best[tok] = max(best.get(tok, 0.0), p)
    if not (plt := pyplot()):
        raise UsageError("matplotlib is not installed: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for tok in sorted(best, key=best.get, reverse=True)[:cfg["top"]]:
        ax.plot([t for t, _ in steps], [guesses.get(tok, 0.0) for _, guesses in steps], marker="o", markersize=3,
                label=repr(tok))
    ax.set(xlabel="t (where the path is evaluated; the last point is the read-out at t = 1)", ylabel="probability",
           ylim=(0, 1.02))
    ax.set_title(cfg["title"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="token", title_fontsize=8)
    fig.tight_layout()
    save_figure(fig, cfg["out"], dpi=100)
    print(f"wrote {cfg['out']}")


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError) as e:  # (an OutputError of --out)
        fail(e)
