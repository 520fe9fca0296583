"""sample.py from the command line, on tiny checkpoints (test_eval's tiny_run: a random char-level GPT and
a random L2D path around it, plus a fresh path with its zero merge gate): bad input is one `error:` line
and exit 2; a dopri5 tolerance it cannot meet stops at once with a message that says what to do;
--show_steps prints every solver step and the t = 1 read-out; long runs show progress and an ETA."""

import ast
import functools
import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import forkrun
import sample
from configurator import defaults
from ar2diff import until_end
from loading.checkpoint import load_model, read_checkpoint, save_checkpoint, trainable_state_dict
from diffusion import L2D, L2DConfig
from solvers import SolverError, dopri5
from test_eval import tiny_run  # noqa: F401  (a fixture: the tiny checkpoints)
from test_train import assert_one_line_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
PROMPT = "What is 3 + 4?"  # in the char vocabulary of tiny_run's data

# Ctrl-C as in a terminal: a shell that runs the tests in the background starts its children with SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler.
FOREGROUND = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731


@pytest.fixture(scope="module")
def ckpts(tiny_run):  # noqa: F811
    """tiny_run's L2D checkpoint (every path weight random: a trained path) and the same run with a fresh,
    untrained path (as L2D initialises it: a merge gate of exactly zero)."""
    ckpt = read_checkpoint(tiny_run["l2d"])
    fresh = L2D(load_model(tiny_run["base"])[0], L2DConfig(**ckpt["l2d_config"]))
    fresh_path = str(tiny_run["tmp"] / "fresh.pt")
    save_checkpoint(fresh_path, dict(ckpt, state_dict=trainable_state_dict(fresh)))
    return dict(tiny_run, trained=tiny_run["l2d"], fresh=fresh_path)


def run(script, *args):
    return forkrun.run([sys.executable, script, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=120)


def run_sample(init_from, *args):
    return run("sample.py", "--init_from", init_from, "--start", PROMPT, "--num_samples", 1, *args)


# --- bad input: one line, exit 2 ------------------------------------------------------------------
BAD = [
    (["--start", ""], "--start"),
    (["--top_k", "0"], "--top_k"),
    (["--top_k", "-3"], "--top_k"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-2"], "--steps"),
    (["--max_new_tokens", "0"], "--max_new_tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "abc"], "--temperature must be a finite number"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "1e400"], "--temperature must be a finite number"),
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:99"], "--device cuda:99"),  # no such CUDA device here, with or without CUDA
    (["--device", "meta"], "--device"),
    (["--dtype", "bf16"], "--dtype"),
    (["--solver", "dopri5", "--atol", "1e-30", "--rtol", "1e-30"], "--atol/--rtol"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "--device cuda"))


@pytest.mark.parametrize("args,option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(args, option, ckpts):
    assert_one_line_error(run_sample(ckpts["trained"], *args), option)


def test_settings_are_checked_before_loading_anything():
    # a checkpoint that does not exist: the mistake in the settings is what gets reported
    assert_one_line_error(run_sample("missing/ckpt.pt", "--device", "gpu"), "--device")
    assert_one_line_error(run_sample("missing/ckpt.pt", "--top_k", "0"), "--top_k")


def test_help_prints_the_examples_whole():
    """-h prints the docstring's examples, each on its one line: a typed \\n in a prompt stays two characters."""
    result = run("sample.py", "-h")
    assert result.returncode == 0 and '--start "Question: What is 47 + 85?\\nAnswer: "' in result.stdout
    examples = [line for line in result.stdout.splitlines() if line.startswith("    python sample.py")]
    assert len(examples) == 6 and all(line.count('"') % 2 == 0 for line in examples)


# --- dopri5 that cannot meet its tolerance ----------------------------------------------------------
def test_impossible_tolerance_stops_at_once_with_what_to_do():
    x0 = 64 * torch.randn(3, 16, dtype=torch.float64)
    began = time.monotonic()
    with pytest.raises(SolverError) as raised:
        dopri5(lambda x, t, rows: -x, x0, atol=1e-30, rtol=1e-30)
    assert time.monotonic() - began < 5
    message = str(raised.value)
    for words in ("atol=1e-30", "rtol=1e-30", "at t=0", "--atol/--rtol", "fixed-step solver"):
        assert words in message, message
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, RuntimeError)  # caught by the scripts
    with pytest.raises(SolverError, match=r"within max_steps=3 steps: still at t=0\.\d+ .*--atol/--rtol"):
        dopri5(lambda x, t, rows: -x, x0, atol=1e-12, rtol=1e-12, max_steps=3)
    with pytest.raises(SolverError, match="non-finite velocity .* at t=0.5"):  # NaN from t = 0.5 on
        dopri5(lambda x, t, rows: torch.where(t[:, None] < 0.5, -x, x * float("nan")), x0)


def test_impossible_tolerance_in_l2d_and_eval(ckpts):
    model = load_model(ckpts["trained"])[0]
    began = time.monotonic()
    with pytest.raises(SolverError, match="atol=1e-30"):
        next(model.generate(torch.tensor([[1, 2, 3]]), 1, solver="dopri5", atol=1e-30, rtol=1e-30))
    assert time.monotonic() - began < 5
    result = run("eval.py", "--ckpt", ckpts["trained"], "--data", ckpts["data"], "--limit", 1, "--solver", "dopri5",
                 "--atol", "1e-30", "--rtol", "1e-30", "--out", ckpts["tmp"] / "impossible.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    # one error line; eval.py's progress bar shares stderr and is not closed first, so the line follows the bar
    errors = re.findall(r"error: .*", result.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: dopri5 cannot meet atol=1e-30"), result.stderr


# --- --show_steps -------------------------------------------------------------------------------------
def blocks(stdout):
    """Per generated token: (its step lines, its read-out lines, its token line), in order."""
    found, steps, readouts = [], [], []
    for line in stdout.splitlines():
        if line.startswith("    step "):
            steps.append(line)
        elif line.startswith("    read-out "):
            readouts.append(line)
        elif line.startswith("  token: "):
            found.append((steps, readouts, line))
            steps, readouts = [], []
    assert not steps and not readouts  # nothing after the last token
    return found


def summary_nfe(stdout):
    return [int(n) for n in re.search(r"NFE per token: \[([\d, ]*)\]", stdout)[1].split(",")]


@pytest.mark.parametrize("path", ["trained", "fresh"])
def test_show_steps_fixed_step_solver(path, ckpts):
    result = run_sample(ckpts[path], "--steps", 4, "--solver", "midpoint", "--max_new_tokens", 3, "--temperature", 0,
                        "--show_steps")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = result.stdout
    assert "midpoint, --steps 4: 3 steps on linspace(0, 1, 4), 2 path evaluations each" in out
    assert "7 per token" in out and summary_nfe(out) == [7] * len(blocks(out))  # 3 x 2 + the read-out
    assert ("untrained" in out) == (path == "fresh")
    if path == "fresh":  # said up front, before the first sample
        assert out.index("note: this diffusion path is untrained") < out.index("--- sample 1")
    tokens = blocks(out)
    assert 1 <= len(tokens) <= 3
    for steps, readouts, token in tokens:
        assert len(steps) == 3 and len(readouts) == 1 and "(argmax; NFE 7)" in token
        # each step: its interval, and the t its prediction was evaluated at (midpoint: the middle)
        for step, (a, b, mid) in zip(steps, [("0.0000", "0.3333", "0.1667"), ("0.3333", "0.6667", "0.5000"),
                                             ("0.6667", "1.0000", "0.8333")]):
            assert f"t {a} -> {b}  evaluated at t={mid}:" in step
        assert "t = 1" in readouts[0]
        top = re.search(r"evaluated at t=1 *: ('.*?') ", readouts[0])[1]  # the read-out picks the token (argmax)
        assert token.startswith(f"  token: {top} ")


def test_show_steps_dopri5_and_the_base(ckpts):
    result = run_sample(ckpts["trained"], "--solver", "dopri5", "--atol", "1e-3", "--rtol", "1e-3", "--max_new_tokens", 2,
                        "--show_steps")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "dopri5, atol 0.001, rtol 0.001, ignoring --steps" in out and "untrained" not in out
    tokens = blocks(out)
    for (steps, readouts, token), nfe in zip(tokens, summary_nfe(out)):
        assert steps and len(readouts) == 1 and f"NFE {nfe})" in token
        assert "-> 0.9999 " in steps[-1]  # dopri5 stops just short of t = 1; the read-out is at t = 1
        assert nfe >= 2 + 6 * len(steps) + 1  # the first step's choice, 6 per step tried, the read-out
    # --steps 1: the base itself, no ODE: no step and no read-out to show, only the tokens
    result = run_sample(ckpts["trained"], "--steps", 1, "--max_new_tokens", 2, "--show_steps")
    assert "the base model (--steps 1: no ODE" in result.stdout
    assert all(not steps and not readouts for steps, readouts, _ in blocks(result.stdout))


def test_a_base_models_fresh_path_is_the_same_every_run(monkeypatch):
    """A pretrained base gets a fresh path, whose random W_v (and so V, x_t and dopri5's steps) comes from
    --seed: torch's own first seed differs from process to process."""
    from model import GPT, GPTConfig
    base = GPT(GPTConfig(family="llama", block_size=16, vocab_size=30, n_layer=1, n_head=2, n_embd=8))
    monkeypatch.setattr(sample.checkpoint, "load", lambda name: (base, None, None))

    def fresh_w_v(seed):
        torch.manual_seed(torch.seed())  # whatever state came before
        model, _, classes = sample.load(dict(defaults(sample.OPTIONS), init_from="some-base", seed=seed))
        assert isinstance(model, L2D) and classes == []
        return model.flow_proj.weight.detach().clone()
    assert torch.equal(fresh_w_v(5), fresh_w_v(5)) and not torch.equal(fresh_w_v(5), fresh_w_v(6))


# --- progress and ETA -----------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_only_for_long_runs():
    clock, stream = Clock(), io.StringIO()
    progress = sample.Progress(total=112, after=5, every=10, stream=stream, clock=clock)
    clock.now += 4
    progress.update(done=8)  # a short run so far: nothing
    assert stream.getvalue() == ""
    clock.now += 2  # 6 s for 12 tokens: 0.5 s a token
    progress.update(done=12)
    assert stream.getvalue() == "[12 tokens in 00:06; at most 100 to go, about 00:50]\n"
    clock.now += 5
    progress.update(done=20)  # within `every` of the last line: nothing new
    clock.now += 109  # 120 s for 80 tokens
    progress.update(done=80)
    assert stream.getvalue().splitlines()[-1] == "[80 tokens in 02:00; at most 32 to go, about 00:48]"
    clock.now += 60
    progress.update(done=112)  # finished: no ETA to give
    assert len(stream.getvalue().splitlines()) == 2


def test_progress_within_the_first_token_of_many_steps(ckpts, monkeypatch, capsys):
    """--steps 100000 on a large model takes minutes a token: progress comes from the ODE's solver steps
    (t of the token being drawn), not only once a token is done."""
    clock = Clock()
    def ticking():  # a second per reading
        clock.now += 1
        return clock.now
    monkeypatch.setattr(sample, "Progress", functools.partial(sample.Progress, clock=ticking))
    sample.main(["--init_from", ckpts["trained"], "--start", PROMPT, "--num_samples", "1", "--max_new_tokens", "1",
                 "--steps", "40"])
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(re.fullmatch(r"\[0\.\d+ tokens in 00:\d\d; at most 0\.\d+ to go, about \d\d:\d\d\]", l) for l in lines), lines


def test_absurd_steps_are_refused_at_once(ckpts):
    began = time.monotonic()
    result = run_sample(ckpts["trained"], "--steps", 1000000000000)
    assert_one_line_error(result, "--steps must be between 1 and 1000000 (a finer grid than float32 t can resolve), "
                                  "got 1000000000000")
    assert time.monotonic() - began < 60


def test_ctrl_c_is_one_line_and_exit_130(ckpts):
    """Ctrl-C while sampling: what was printed stays, then one `error: interrupted` line on stderr, exit 130, no traceback."""
    proc = subprocess.Popen([sys.executable, "sample.py", "--init_from", ckpts["trained"], "--start", PROMPT,
                             "--steps", "100000", "--num_samples", "1"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=FOREGROUND)
    header, prompt = proc.stdout.readline(), proc.stdout.read(len(PROMPT))  # the sample has begun
    proc.send_signal(signal.SIGINT)
    out, err = prompt + proc.stdout.read(), proc.stderr.read()  # (communicate would miss what was buffered)
    proc.wait(timeout=60)
    assert header.startswith("--- sample 1 of 1: midpoint, --steps 100000") and out.startswith(PROMPT)
    assert proc.returncode == 130 and err.splitlines() == ["error: interrupted; nothing was written"], err


# --- AR2Diff ---------------------------------------------------------------------------------------
def test_ar2diff_prints_the_best_candidate_and_its_steps(ckpts):
    """--steps 3 --candidates 2: a line per step with both candidates, then the answer; the printed answer is
    AR2Diff.generate's, seeded as sample.py seeds it, up to its first end token; bad settings exit 2."""
    result = run_sample(ckpts["ar2diff"], "--steps", 3, "--candidates", 2, "--show_steps")
    assert result.returncode == 0, result.stderr
    assert "AR2Diff, 3 refinement steps of the 4-token answer span, 2 candidates in parallel, drawn at " \
           "temperature 0.2: 4 passes over the span" in result.stdout
    steps = [line for line in result.stdout.splitlines() if line.startswith("    step ")]
    assert [line.split(":")[0].split()[-1] for line in steps] == ["1", "2", "3"]
    answer = re.search(r"  answer: (.*)", result.stdout)[1]
    model, enc, _ = load_model(ckpts["ar2diff"])
    torch.manual_seed(1337)
    span, _ = model.generate(torch.tensor([enc.encode(PROMPT)]), steps=3, samples=2)
    assert answer == repr(enc.decode(until_end(span[0].tolist(), {model.config.end_token, enc.eot_token})))
    plain = run_sample(ckpts["ar2diff"], "--steps", 3, "--candidates", 2)
    assert f"{PROMPT}{ast.literal_eval(answer)}\n[" in plain.stdout  # the same answer, after the prompt
    assert_one_line_error(run_sample(ckpts["ar2diff"], "--candidates", 0), "--candidates")
    assert_one_line_error(run_sample(ckpts["ar2diff"], "--guidance", 2, "--label", "math"), "no classes")


def test_bf16_sampling_and_its_steps1_is_the_bf16_base(ckpts):
    """--dtype bfloat16 samples with the path (every weight stored in bf16), and at --steps 1 an L2D writes
    what its bf16 base writes (greedy)."""
    common = ("--max_new_tokens", 6, "--temperature", 0, "--dtype", "bfloat16")
    path = run_sample(ckpts["trained"], "--steps", 4, *common)
    assert path.returncode == 0 and path.stderr == "", path.stderr
    assert "mean 7.0]" in path.stdout  # midpoint, 4 points: 3 x 2 + the read-out
    l2d, base = run_sample(ckpts["trained"], "--steps", 1, *common), run_sample(ckpts["base"], *common)
    assert l2d.returncode == base.returncode == 0
    text = lambda out: out.split("--- sample 1", 1)[1].split("\n", 1)[1]  # the sample itself, after its header line
    assert text(l2d.stdout) == text(base.stdout)
