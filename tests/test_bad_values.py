"""Settings that make no sense are refused before anything is built: exit 2, one line naming the
option, nothing written. Empty splits are refused when prepared and when trained on (an empty train
split used to hang the sampler). A resumed run says where it goes on from; the log says the time left.

train.py, eval.py and bench.py run as subprocesses from the repo root on one thread, on tiny
char-level arithmetic data and a from-scratch model of one layer."""
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import forkrun
from data.dataset import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from data.arithmetic.prepare import prepare  # noqa: E402
from test_train import assert_one_line_error  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY = ["--init_from=scratch", "--method=ar", "--device=cpu", "--n_layer=1", "--n_embd=16", "--n_head=2",
        "--block_size=64", "--flow_dim=8", "--lora_rank=2", "--batch_size=4", "--micro_batch=2", "--warmup_iters=1",
        "--learning_rate=1e-3", "--eval_examples=4", "--eval_interval=1000", "--log_interval=1"]

# Ctrl-C as in a terminal: a shell that runs the tests in the background starts its children with SIGINT
# ignored, and Python then installs no KeyboardInterrupt handler.
FOREGROUND = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731


def run(script, *args, timeout=120):
    """script's (returncode, stdout, stderr); a run past the timeout (a hang) fails the test."""
    return forkrun.run([sys.executable, *script.split(), *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    with contextlib.redirect_stdout(io.StringIO()):
        return prepare("char", out=str(tmp_path_factory.mktemp("data")), n_train=32, n_test=8)


# --- train.py ---------------------------------------------------------------------------------------

TRAIN_BAD = [("sigma", 0.0), ("sigma", -1.0), ("flow_dim", 0), ("block_size", 0), ("n_layer", 0), ("n_head", 0),
             ("n_head", 3),  # does not divide n_embd=16
             ("n_kv_head", -1), ("n_embd", 0), ("max_iters", 0), ("warmup_iters", -1), ("lr_decay_iters", -1),
             ("learning_rate", 0.0), ("min_lr", -1e-6), ("min_lr", 1.0),  # above learning_rate
             ("batch_size", 0), ("micro_batch", 0), ("batch_size", 5),  # not a multiple of micro_batch=2
             ("eval_interval", 0), ("log_interval", 0), ("eval_examples", 0), ("lora_rank", 0),
             ("label_dropout", -0.1), ("label_dropout", 1.5), ("grad_clip", -1.0),
             ("dtype", "float8"), ("t_schedule", "linear"), ("variant", "nonsense"), ("family", "gpt3")]


@pytest.mark.parametrize("key, value", TRAIN_BAD, ids=[f"{k}={v}" for k, v in TRAIN_BAD])
def test_train_refuses_bad_values(key, value, data, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run("train.py", *TINY, f"--datasets={[data]}", "--max_iters=1", f"--out_dir={out}",
                       f"--{key}={value}"), key)
    assert not out.exists()


def test_ctrl_c_during_training_is_one_line_exit_130_and_keeps_the_checkpoint(data, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "train.py", *TINY, f"--datasets={[data]}", f"--out_dir={out}", "--log_interval=1",
            "--eval_interval=2", "--eval_examples=4"]
    proc = subprocess.Popen(args + ["--max_iters=100000"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=FOREGROUND)
    for line in proc.stdout:  # interrupt once iter 2's checkpoint has been written
        if line.startswith("iter 3:"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == ["error: interrupted; the last checkpoint in out_dir, if any, is intact: "
                                           "--init_from=resume goes on from it"]
    resumed = run("train.py", "--init_from=resume", f"--out_dir={out}", "--max_iters=3", "--device=cpu")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr


@pytest.mark.parametrize("under", ["", "sub"])
def test_train_refuses_an_out_dir_in_a_file(under, data, tmp_path):
    """out_dir a file, or a folder under a file: refused before training, not at the first save."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / under if under else tmp_path / "file"
    assert_one_line_error(run("train.py", *TINY, f"--datasets={[data]}", "--max_iters=1", f"--out_dir={out}"),
                   "is a file", "--out_dir")
    assert (tmp_path / "file").read_text() == ""


@pytest.mark.parametrize("under", ["", "sub"])
def test_train_refuses_a_read_only_out_dir(under, data, tmp_path):
    """out_dir, or the folder it would be made in, read-only: refused before training (issue #29)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.access(read_only, os.W_OK):
        pytest.skip("root ignores folder permissions here")
    out = read_only / under if under else read_only
    assert_one_line_error(run("train.py", *TINY, f"--datasets={[data]}", "--max_iters=1", f"--out_dir={out}"),
                          "not writable", "--out_dir")
    assert os.listdir(read_only) == []


# --- empty and tiny splits ------------------------------------------------------------------------

EXAMPLE = dict(question="What is 1 + 2?", answer="3", final="3", label="math")


@pytest.mark.parametrize("test, max_len, words", [
    ([], None, ["test split", "none"]),
    ([EXAMPLE], 5, ["train split", "all 3", "max_len=5", "raise --max_len"]),  # every train example dropped
])
def test_write_dataset_refuses_an_empty_split(test, max_len, words, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(ValueError) as e:
        write_dataset(str(out), "char", {"train": [EXAMPLE] * 3, "test": test}, ["math"], max_len=max_len)
    for word in words:
        assert word in str(e.value)
    assert "\n" not in str(e.value)
    assert not out.exists()  # nothing written, not even the vocabulary


@pytest.mark.parametrize("split", ["train", "test"])
def test_train_refuses_an_empty_split(split, data, tmp_path):
    """A hand-made split with no examples: refused in one line naming the folder, not a hang."""
    empty = tmp_path / "empty"
    shutil.copytree(data, empty)
    np.savez(empty / f"{split}.npz", tokens=np.zeros(0, np.int32), loss_mask=np.zeros(0, bool),
             offsets=np.zeros(1, np.int64), labels=np.zeros(0, np.int16))
    out = tmp_path / "out"
    assert_one_line_error(run("train.py", *TINY, f"--datasets={[str(empty)]}", "--max_iters=1", f"--out_dir={out}",
                       timeout=60), f"{empty}/{split}.npz", "no examples")
    assert not out.exists()


def test_train_refuses_a_split_smaller_than_a_batch(tmp_path):
    """A tiny split is refused like an empty one: every step would repeat its examples."""
    with contextlib.redirect_stdout(io.StringIO()):
        small = prepare("char", out=str(tmp_path / "small"), n_train=3, n_test=4)
    result = run("train.py", *TINY, f"--datasets={[small]}", "--max_iters=1", f"--out_dir={tmp_path / 'out'}")
    assert_one_line_error(result, "3 train examples", "--batch_size 4")
    assert not (tmp_path / "out").exists()


# --- resume and the time left ---------------------------------------------------------------------

def test_resume_says_where_it_goes_on_and_the_log_says_the_time_left(data, tmp_path):
    args = [*TINY, f"--datasets={[data]}", f"--out_dir={tmp_path}"]
    first = run("train.py", *args, "--max_iters=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"^iter 1: loss [\d.]+, lr \S+, \d+ tok/s, [\d:]+ left$", first.stdout, re.M), first.stdout
    assert re.search(r"^iter 2: loss [\d.]+, lr \S+, \d+ tok/s$", first.stdout, re.M), first.stdout  # none left
    resumed = run("train.py", *args, "--init_from=resume", "--max_iters=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {tmp_path}/ckpt.pt from iter 2 of 4\n" in resumed.stdout
    assert re.findall(r"^iter (\d+): loss", resumed.stdout, re.M) == ["3", "4"]
    done = run("train.py", *args, "--init_from=resume", "--max_iters=4")  # nothing left: said, not silent
    assert done.returncode == 0, done.stderr[-3000:]
    assert "from iter 4 of 4: nothing left to train, raise --max_iters" in done.stdout


# --- eval.py and bench.py -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def l2d_ckpt(data, tmp_path_factory):
    """An L2D checkpoint (1 step on a 1-step base): eval.py reads --steps only for an L2D."""
    base, l2d = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("l2d")
    for out, args in ((base, []), (l2d, ["--method=l2d", f"--init_from={base / 'ckpt.pt'}"])):
        result = run("train.py", *TINY, f"--datasets={[data]}", "--max_iters=1", f"--out_dir={out}", *args)
        assert result.returncode == 0, result.stderr[-3000:]
    return str(l2d / "ckpt.pt")


EVAL_BAD = [("limit", -1), ("max_new_tokens", 0), ("batch_size", 0), ("gen_batch_size", 0), ("steps", 0),
            ("atol", 0.0), ("label", "bogus")]  # label: the model was trained without guidance classes


@pytest.mark.parametrize("key, value", EVAL_BAD, ids=[f"{k}={v}" for k, v in EVAL_BAD])
def test_eval_refuses_bad_values(key, value, data, l2d_ckpt, tmp_path):
    out = tmp_path / "eval.json"
    assert_one_line_error(run("eval.py", f"--ckpt={l2d_ckpt}", f"--data={data}", "--device=cpu", f"--out={out}",
                       "--solver=dopri5" if key == "atol" else "--steps=1", f"--{key}={value}"), key)
    assert not out.exists()


BENCH_BAD = [("steps", 0), ("batch_sizes", 0), ("prompt_len", 0), ("new_tokens", 0), ("batch", 0), ("seq", 0),
             ("eval_reps", 0), ("train_reps", 0), ("mem_steps", 0), ("matmul_n", 0), ("lora_rank", 0),
             ("flow_dim", 0), ("threads", -1)]


@pytest.mark.parametrize("key, value", BENCH_BAD, ids=[f"{k}={v}" for k, v in BENCH_BAD])
def test_bench_refuses_bad_values(key, value, tmp_path):
    out = tmp_path / "bench.json"
    assert_one_line_error(run("-m harness.bench", "--init_from=scratch", f"--out={out}", f"--{key}={value}"), key)
    assert not out.exists()


@pytest.mark.parametrize("device, words", [("nonsense", "unknown --device 'nonsense'"), ("meta", "not supported"),
                                           ("cuda:99", "cuda:99")])
@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_an_unavailable_device_is_one_line(script, device, words, data, l2d_ckpt, tmp_path):
    """cuda:99 exists on no machine this runs on (no GPU: not available; one GPU: no such index)."""
    args = {"train.py": [*TINY, f"--datasets={[data]}", "--max_iters=1", f"--out_dir={tmp_path / 'o'}"],
            "eval.py": [f"--ckpt={l2d_ckpt}", f"--data={data}", f"--out={tmp_path / 'e.json'}"]}[script]
    assert_one_line_error(run(script, *args, f"--device={device}"), words)
    assert os.listdir(tmp_path) == []


# --- one option per line ----------------------------------------------------------------------------

ONE_OPTION = [("eval.py", "limit", -1, ">= 0, got -1"), ("eval.py", "max_new_tokens", 0, ">= 1, got 0"),
              ("eval.py", "batch_size", 0, ">= 1, got 0"), ("eval.py", "gen_batch_size", 0, ">= 1, got 0"),
              ("sample.py", "atol", 0.0, "> 0, got 0.0"), ("sample.py", "rtol", -1.0, "> 0"),
              ("-m harness.seeds", "jobs", 0, ">= 1, got 0"), ("-m harness.seeds", "limit", -1, ">= 0, got -1"),
              ("-m harness.seeds", "steps", 0, "in 1..1000000, got [0]")]


@pytest.mark.parametrize("script, key, value, rule", ONE_OPTION, ids=[f"{s.split('.')[-1]}-{k}" for s, k, _, _ in ONE_OPTION])
def test_a_bad_value_is_named_alone(script, key, value, rule, tmp_path):
    """The line names the one option that was wrong, not a list of every option's rule."""
    for name in ("lab-addsub", "lab-mul"):
        (tmp_path / "lab" / name).mkdir(parents=True)
    args = {"eval.py": ["--ckpt=gone.pt", f"--out={tmp_path / 'e.json'}"],  # refused before the checkpoint is read
            "sample.py": ["--init_from=gone.pt", "--solver=dopri5"],
            "-m harness.seeds": [f"--data={tmp_path / 'lab'}", f"--out={tmp_path / 'grid'}"]}[script]
    result = run(script, *args, f"--{key}={value}")
    assert_one_line_error(result, f"error: --{key} must be {rule}")
    assert result.stderr.count("--") == 1
    assert sorted(os.listdir(tmp_path)) == ["lab"]


@pytest.mark.parametrize("datasets", ["[]", "['a', 3]"])
def test_train_refuses_an_empty_or_mistyped_datasets_list(datasets, tmp_path):
    """[] was 'not enough values to unpack (expected 4, got 0)'."""
    result = run("train.py", *TINY, f"--datasets={datasets}", "--max_iters=1", f"--out_dir={tmp_path / 'out'}")
    assert_one_line_error(result, "--datasets must list prepared folders, e.g. --datasets=", f"got {datasets}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, option", [("-m harness.seeds", "--methods="), ("-m harness.seeds", "--splits=test,"),
                                            ("-m harness.bench", "--what=gen,"), ("-m harness.bench", "--dtypes=,")])
def test_a_list_of_names_with_an_empty_name_is_one_line(script, option, tmp_path):
    """--methods '' was 'no lab config for  (...)', an empty name looked up as a file."""
    result = run(script, option, f"--out={tmp_path / 'out'}")
    assert_one_line_error(result, f"{option.split('=')[0]} '{option.split('=')[1]}' has an empty name")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", ["train.py", "-m harness.bench"])
def test_help_into_a_closed_pipe_is_no_traceback(script):
    """python train.py -h | head -1: the reader leaves after one line; a BrokenPipeError traceback followed."""
    proc = subprocess.Popen([sys.executable, *script.split(), "-h"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout.readline().startswith("usage: python")
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0 and proc.stderr.read() == ""


def test_ctrl_c_in_the_seed_grid_is_an_error_line_and_exit_130(tmp_path):
    """Like every other entry point's: 'error: interrupted; ...' (it lacked the 'error: ')."""
    for name in ("lab-addsub", "lab-mul"):
        (tmp_path / "lab" / name).mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "harness.seeds", f"--data={tmp_path / 'lab'}",
                             f"--out={tmp_path / 'grid'}", "--bases=1", "--paths=1", "--methods=lora"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=FOREGROUND,
                            start_new_session=True)
    assert proc.stdout.readline().startswith("start base-1")  # the grid has begun
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the grid and its jobs
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.splitlines() == [
        "error: interrupted; finished jobs are kept, and the same command goes on from them"], stderr
