"""The lab's seed grid (harness/seeds.py): its across-seed interval against the t formula, the jobs it
plans and resumes, and a tiny grid run end to end."""

import math
import os
import subprocess
import sys

import pytest

import forkrun
from harness import seeds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mean_interval_is_the_t_interval_over_seeds():
    mean, low, high = seeds.mean_interval([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n), sd = 0.1
    assert mean == pytest.approx(0.2) and low == pytest.approx(0.2 - half) and high == pytest.approx(0.2 + half)
    assert math.isnan(seeds.mean_interval([0.4])[1])  # one seed: no interval


def grid_config(tmp_path, **changes):
    from configurator import defaults
    cfg = dict(defaults(seeds.OPTIONS), bases=[1, 2], paths=[7], methods=["l2d", "lora"], steps=[1, 2],
               splits=["test"], out=str(tmp_path / "grid"), data=str(tmp_path / "lab"))
    cfg.update(changes)
    return cfg


def test_plan_finetunes_every_base_with_every_method_and_path_seed(tmp_path):
    jobs = seeds.plan(grid_config(tmp_path))
    assert sorted(jobs) == sorted(["base-1", "base-2", "l2d-1-7", "l2d-2-7", "lora-1-7", "lora-2-7", "l2d-1-7-test",
                                   "l2d-2-7-test", "lora-1-7-test", "lora-2-7-test"])
    prerequisite, argv = jobs["lora-2-7"]
    assert prerequisite == "base-2" and f"--init_from={tmp_path}/grid/base-2/ckpt.pt" in argv and "--seed=7" in argv
    assert "--steps=1" in jobs["lora-2-7-test"][1] and "--steps=1,2" in jobs["l2d-2-7-test"][1]


def test_plan_puts_l2d_on_lora_on_the_lora_run_of_the_same_seeds(tmp_path):
    jobs = seeds.plan(grid_config(tmp_path, methods=["lora", "lora_params", "l2d_on_lora"]))
    prerequisite, argv = jobs["l2d_on_lora-2-7"]
    assert prerequisite == "lora-2-7" and argv[1] == "config/lab_l2d.py"
    assert f"--init_from={tmp_path}/grid/lora-2-7/ckpt.pt" in argv and "--steps=1,2" in jobs["l2d_on_lora-2-7-test"][1]
    assert jobs["lora_params-2-7"][1][1] == "harness/experiments/lab_lora_params.py"  # an experiment's config
    assert "--steps=1" in jobs["lora_params-2-7-test"][1]


def test_a_killed_training_resumes_from_its_checkpoint(tmp_path):
    os.makedirs(tmp_path / "grid" / "l2d-1-7")
    (tmp_path / "grid" / "l2d-1-7" / "ckpt.pt").write_bytes(b"")
    jobs = seeds.plan(grid_config(tmp_path))
    assert jobs["l2d-1-7"][1][-1] == "--init_from=resume" and "--init_from=resume" not in jobs["l2d-2-7"][1]


def run(args, cwd=REPO, launch=forkrun.run):
    return launch([sys.executable, "-m", "harness.seeds", *args], cwd=cwd, capture_output=True, text=True,
                  env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_missing_lab_data_is_one_line(tmp_path):
    r = run(["--data", str(tmp_path), "--out", str(tmp_path / "grid")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has no lab-addsub/" in r.stderr
    os.makedirs(tmp_path / "lab-addsub"), os.makedirs(tmp_path / "lab-mul")
    r = run(["--data", str(tmp_path), "--out", str(tmp_path / "grid"), "--steps", "0,4"])  # refused before any job
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--steps must be in 1..1000000, got [0, 4]" in r.stderr
    assert not os.path.exists(tmp_path / "grid")
    r = run(["--data", str(tmp_path), "--methods", "l2d_on_lora"])  # its base run, lora, is not in the grid
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no lab config for l2d_on_lora" in r.stderr
    (tmp_path / "a_file").write_text("mine")
    r = run(["--data", str(tmp_path), "--out", str(tmp_path / "a_file")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot make the grid's folder" in r.stderr
    assert (tmp_path / "a_file").read_text() == "mine"


def prepare_lab(folder):
    vocab = f"{folder}/char/vocab.json"
    for args in (["--tokenizer", "char", "--n_train", "50", "--out", f"{folder}/char"],
                 ["--tokenizer", vocab, "--ops", "+-", "--n_train", "100", "--n_test", "8", "--out", f"{folder}/lab-addsub"],
                 ["--tokenizer", vocab, "--ops", "*", "--n_train", "100", "--n_test", "8", "--out", f"{folder}/lab-mul"]):
        forkrun.run([sys.executable, "-m", "data.arithmetic.prepare", "--digits", "2", *args], cwd=REPO, check=True,
                    capture_output=True)


def test_a_tiny_grid_runs_summarises_and_resumes(tmp_path):
    prepare_lab(tmp_path / "lab")
    args = ["--data", str(tmp_path / "lab"), "--out", str(tmp_path / "grid"), "--bases", "1,2", "--paths", "7",
            "--methods", "l2d", "--steps", "1,2", "--splits", "test", "--limit", "4",
            "--train_args", "--max_iters=2 --batch_size=4 --micro_batch=4 --eval_interval=2 --eval_examples=4 "
                            "--warmup_iters=1 --n_layer=1 --n_embd=32 --n_head=2 --flow_dim=8"]
    first = run(args, launch=subprocess.run)  # the real entry point, in a fresh interpreter
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("start ") == 6 and "| base 2, path 7 |" in first.stdout
    assert "| L2D 2 over 1 step |" in (tmp_path / "grid" / "summary.md").read_text()
    try:
        import matplotlib  # noqa: F401  (optional: without it the grid says so and draws nothing)
        assert (tmp_path / "grid" / "summary.png").read_bytes().startswith(b"\x89PNG")
    except ImportError:
        assert "no figure" in first.stdout
    os.remove(tmp_path / "grid" / "l2d-2-7-test.done")  # as if killed during this evaluation
    again = run(args)
    assert again.returncode == 0 and again.stdout.count("start ") == 1 and "start l2d-2-7-test" in again.stdout
