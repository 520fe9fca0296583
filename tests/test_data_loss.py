"""Nothing a user has is overwritten or lost: the one writer (loading/files.py) refuses a user's file
at a user-named output path before any work, keeps the old file whole when a write fails (a full
disk, a read-only file system), and a checkpoint with a non-finite weight is never written."""
import errno
import json
import os

import pytest
import torch

from harness import bench
from loading.checkpoint import save_checkpoint
from loading.files import OutputError, check_output, write_atomic

TINY_BENCH = ["--init_from=scratch", "--n_layer=1", "--n_embd=16", "--n_head=2", "--vocab_size=32", "--block_size=32",
              "--flow_dim=8", "--lora_rank=2", "--prompt_len=4", "--new_tokens=1", "--eval_reps=1", "--steps=1",
              "--batch_sizes=1", "--dtypes=float32", "--what=gen", "--matmul_n=16", "--seq=8", "--batch=1"]


def test_bench_refuses_to_write_over_a_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(str(ckpt), dict(state_dict={"w": torch.ones(2)}))
    before = ckpt.read_bytes()
    with pytest.raises(OutputError, match=r"--out .*ckpt.pt already exists and was not written by this tool.*--overwrite"):
        bench.main(TINY_BENCH + [f"--out={ckpt}"])
    assert ckpt.read_bytes() == before


def test_bench_replaces_its_own_earlier_result_and_anything_with_overwrite(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(TINY_BENCH + [f"--out={out}"])
    first = json.loads(out.read_text())
    assert bench.is_bench_json(str(out))
    bench.main(TINY_BENCH + [f"--out={out}", "--seed=1"])  # its own output: no --overwrite needed
    assert json.loads(out.read_text())["config"]["seed"] == 1 != first["config"]["seed"]
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    bench.main(TINY_BENCH + [f"--out={other}", "--overwrite"])
    assert bench.is_bench_json(str(other))


@pytest.mark.parametrize("how", ["folder", "missing_folder", "read_only_folder"])
def test_check_output_refuses_unwritable_paths_before_any_work(how, tmp_path):
    path = {"folder": tmp_path, "missing_folder": tmp_path / "nope" / "x.json",
            "read_only_folder": tmp_path / "ro" / "x.json"}[how]
    if how == "read_only_folder":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("root ignores folder permissions here")
    with pytest.raises(OutputError, match="--out"):
        check_output(str(path), "--out")


@pytest.mark.parametrize("code,why", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only")])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(code, why, tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def full_disk(f):
        f.write(b"half of it")
        raise OSError(code, "simulated")

    with pytest.raises(OutputError, match=f"cannot write {path}: {why}; the previous file is unchanged"):
        write_atomic(str(path), full_disk)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_checkpoint_with_a_non_finite_weight_is_never_written(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), dict(state_dict={"w": torch.ones(3)}, iter_num=1))
    with pytest.raises(ValueError, match=r"not saving .*ckpt.pt: 1 weight tensor\(s\) are not finite \(w, \.\.\.\); "
                                         r".*keeps the last good checkpoint"):
        save_checkpoint(str(path), dict(state_dict={"w": torch.tensor([1.0, float("nan"), 2.0])}, iter_num=2))
    assert torch.load(path, weights_only=True)["iter_num"] == 1
    with pytest.raises(ValueError, match="no checkpoint was written"):
        save_checkpoint(str(tmp_path / "new.pt"), dict(state_dict={"w": torch.tensor([float("inf")])}))
    assert not (tmp_path / "new.pt").exists()


def test_a_full_disk_during_prepare_keeps_the_prepared_folder(tmp_path, monkeypatch):
    """data/dataset.py stages the folder beside it and moves it in whole: a failed write is one line and
    leaves the previous dataset as it was (simulated: np.savez writes half a file, then ENOSPC)."""
    from data import dataset
    from test_data import arithmetic
    out = arithmetic.prepare("char", out=str(tmp_path / "data"), n_train=20, n_test=5, digits=1, ops="+")
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}

    def full_disk(path, **arrays):
        open(path, "wb").write(b"half of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dataset.np, "savez", full_disk)
    with pytest.raises(OutputError, match=f"^cannot write {out}: the disk is full; the previous folder is unchanged$"):
        arithmetic.prepare("char", out=out, n_train=30, n_test=5, digits=1, ops="+", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before
    assert os.listdir(tmp_path) == ["data"]


# --- figures: harness.plot and harness.figures write --out through the one writer --------------------

SHOWN = "    read-out  t = 1   evaluated at t=1     : '8' 0.97  '9' 0.01\n  token: '8' (argmax; NFE 1)\n"


def draw(script, out, *extra, tmp_path):
    """harness.plot (one run of one row) or harness.figures (one token) drawing --out in-process."""
    from harness import figures, plot
    runs, steps = tmp_path / "run.json", tmp_path / "steps.txt"
    runs.write_text(json.dumps(dict(rows=[dict(steps=1, guidance=1.0, tf_accuracy=0.5, tf_ci_low=0.4, tf_ci_high=0.6)])))
    steps.write_text(SHOWN)
    if script == "plot":
        plot.main([f"--runs={runs}", f"--out={out}", *extra])
    else:
        figures.main([f"--steps_file={steps}", f"--out={out}", *extra])


@pytest.mark.parametrize("script", ["plot", "figures"])
def test_a_figure_refuses_to_write_over_a_checkpoint_or_a_users_file(script, tmp_path):
    pytest.importorskip("matplotlib")
    ckpt, notes = tmp_path / "ckpt.pt", tmp_path / "notes.png"
    save_checkpoint(str(ckpt), dict(state_dict={"w": torch.ones(2)}))
    notes.write_bytes(b"\x89PNG\r\n\x1a\n a picture of the user's")
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"--out .*ckpt.pt must end in .png, .pdf or .svg"):
        draw(script, ckpt, tmp_path=tmp_path)
    with pytest.raises(OutputError, match=r"--out .*notes.png already exists and was not written by this tool.*--overwrite"):
        draw(script, notes, tmp_path=tmp_path)
    assert ckpt.read_bytes() == before and notes.read_bytes().endswith(b"user's")
    draw(script, notes, "--overwrite", tmp_path=tmp_path)  # said so: replaced
    draw(script, notes, tmp_path=tmp_path)  # a figure matplotlib drew: replaced again without --overwrite
    assert notes.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"Matplotlib" in notes.read_bytes()[:4096]


@pytest.mark.parametrize("script", ["plot", "figures"])
def test_a_figure_out_in_a_missing_folder_or_a_folder_is_refused_before_drawing(script, tmp_path):
    for out, words in ((tmp_path / "nope" / "f.png", "does not exist"), (tmp_path, "must end in .png")):
        with pytest.raises(ValueError, match=words):
            draw(script, out, tmp_path=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["run.json", "steps.txt"]


def test_a_full_disk_while_drawing_keeps_the_old_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "f.png"
    draw("figures", out, tmp_path=tmp_path)
    before = out.read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "simulated")))
    with pytest.raises(OutputError, match=f"cannot write {out}: the disk is full; the previous file is unchanged"):
        draw("figures", out, "--title=new", tmp_path=tmp_path)
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["f.png", "run.json", "steps.txt"]


# --- a run whose validation loss collapses -----------------------------------------------------------

def test_a_collapsed_run_says_so_on_stderr_and_a_fresh_one_that_saved_nothing_exits_2(tmp_path):
    """--learning_rate 3 on the tiny model: finite losses, but every val loss far above iter 0's (the model
    collapses). A fresh run saves nothing: one line, exit 2 (it used to exit 0 with its warnings in the log).
    Resumed, the earlier checkpoint is kept, and stderr says so in one line."""
    import contextlib
    import io
    import re
    import subprocess
    import sys
    from data.arithmetic.prepare import prepare
    from test_bad_values import ROOT, TINY
    with contextlib.redirect_stdout(io.StringIO()):
        data = prepare("char", out=str(tmp_path / "data"), n_train=32, n_test=8)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def train(out, *args):
        return subprocess.run([sys.executable, "train.py", *TINY, f"--datasets={[data]}", f"--out_dir={out}",
                               "--eval_interval=5", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    fresh = train(tmp_path / "fresh", "--max_iters=10", "--learning_rate=3")
    assert fresh.returncode == 2 and "Traceback" not in fresh.stderr
    start = re.search(r"iter 0: val loss ([\d.]+)", fresh.stdout)[1]
    assert fresh.stderr.strip().splitlines() == [f"error: the run diverged: every val loss after iter 0 was far above "
                                                 f"its {start}, so nothing was saved in {tmp_path / 'fresh'}; "
                                                 "lower --learning_rate"]
    assert not (tmp_path / "fresh").exists()

    good = train(tmp_path / "run", "--max_iters=2")
    assert good.returncode == 0, good.stderr[-2000:]
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    resumed = train(tmp_path / "run", "--init_from=resume", "--max_iters=12", "--learning_rate=3")
    assert resumed.returncode == 0 and len(resumed.stderr.strip().splitlines()) == 1, resumed.stderr[-2000:]
    assert re.fullmatch(r"warning: the run ended diverged \(its last val loss far above the best, [\d.]+ at iter 2\); "
                        rf"{re.escape(str(tmp_path / 'run' / 'ckpt.pt'))} keeps iter 2: lower --learning_rate\n",
                        resumed.stderr)
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_eval_refuses_to_draw_its_plot_over_a_users_file_beside_out(tmp_path):
    """eval.py writes results.png beside --out results.json: a user's results.png there is refused before any
    work (a plot matplotlib drew is replaced; --overwrite replaces anything)."""
    from harness.eval_rows import output_path
    out, png = tmp_path / "results.json", tmp_path / "results.png"
    png.write_bytes(b"a picture of the user's")
    with pytest.raises(OutputError, match=f"--out {png} already exists and was not written by this tool"):
        output_path(str(out), None, resume=False, overwrite=False)
    assert png.read_bytes() == b"a picture of the user's" and not out.exists()
    assert output_path(str(out), None, resume=False, overwrite=True) == str(out)


def test_eval_out_in_a_missing_folder_names_the_json_not_its_plot(tmp_path):
    from harness.eval_rows import output_path
    out = tmp_path / "nope" / "results.json"
    with pytest.raises(OutputError, match=f"^--out {out}: the folder {out.parent} does not exist"):
        output_path(str(out), None, resume=False, overwrite=False)
