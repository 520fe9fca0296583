"""harness/gpu_check.py --dry_run: every part of the GPU check on the CPU, tiny, so that the script a GPU
runs unattended cannot rot before one is lent. Checks what each part must show, not the timings."""
import io
import json
import os
import subprocess
import sys

import pytest

from configurator import UsageError
from harness import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run([sys.executable, "-m", "harness.gpu_check", "--dry_run", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads((out / "gpu_check.json").read_text())


def test_every_part_ran_and_wrote_its_results(dry_run):
    out, results = dry_run
    assert results["errors"] == {}
    parts = {"machine", "correctness", "generation_speed", "base_mfu", "training_speed", "ddp", "lab"}
    assert set(results) == parts | {"seconds", "errors"} and set(results["seconds"]) == parts
    assert {"torch", "cuda", "device", "gpus"} <= set(results["machine"])
    markdown = (out / "gpu_check.md").read_text()
    for part in parts:
        assert f"## {part}" in markdown
    assert "| model | setting | accuracy" in markdown
    assert {"eval_l2d.json", "eval_lora.json", "gpu_check.log"} <= set(os.listdir(out))


def test_correctness_steps1_is_the_base_exactly(dry_run):
    rows = dry_run[1]["correctness"]
    assert {(r["model"], r["dtype"]) for r in rows} == {(m, d) for m in ("smollm2", "gpt2")
                                                        for d in ("float32", "bfloat16")}
    for row in rows:
        assert row["t0_is_base"] and row["steps1_is_base"] and row["steps1_nfe"] == 0
        assert row["t05_differs"]  # the path is not trivially zero: t = 0 is the base because of the gate
        assert row["argmax_agree"] > 0.9
        if row["dtype"] == "float32":  # the "device" is the CPU itself: identical
            assert row["max_abs_diff"] == 0 and row["argmax_agree"] == 1


def test_speed_rows(dry_run):
    speed = dry_run[1]
    generation = speed["generation_speed"]
    assert {(r["dtype"], r["batch"], r["steps"]) for r in generation} == \
        {(d, b, s) for d in ("float32", "bfloat16") for b in (1, 16) for s in (1, 8)}
    for row in generation:
        assert row["nfe_per_token"] == (0 if row["steps"] == 1 else 15)  # midpoint, 8 steps: 7 x 2 + 1
        assert row["ms_per_token"] > 0 and (row["path_eval_ms"] is None) == (row["steps"] == 1)
    assert {(r["dtype"], r["compiled"], r["fused_adamw"]) for r in speed["training_speed"]} == {
        ("float32", False, True), ("bfloat16", False, True), ("bfloat16", False, False), ("bfloat16", True, True)}
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in speed["training_speed"] + speed["base_mfu"])
    assert speed["base_mfu"][0]["mfu"] is None and speed["base_mfu"][0]["matmul_bf16_tflops"] > 0  # no CPU datasheet


def test_ddp_losses_agree(dry_run):
    ddp = dry_run[1]["ddp"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert len(ddp["losses_one_process"]) == gpu_check.DRY["ddp_iters"] + 2  # every step's, and the validation loss before and after
    assert ddp["agree"] and ddp["max_abs_diff"] <= gpu_check.DDP_TOLERANCE


def test_lab_rows_are_paired_against_lora(dry_run):
    out, results = dry_run
    rows = results["lab"]["rows"]
    assert [(r["model"], r["setting"]) for r in rows] == \
        [("l2d", f"steps={s}") for s in (1, 2, 4, 8, 16)] + [("lora", "steps=1")]
    assert all(r["n"] == gpu_check.DRY["n_test"] for r in rows)
    lora = rows[-1]
    assert (lora["vs_lora_diff"], lora["vs_lora_low"], lora["vs_lora_high"]) == (0, 0, 0)  # itself
    for row in rows:
        assert row["vs_lora_low"] <= row["vs_lora_diff"] <= row["vs_lora_high"]
        assert row["vs_lora_diff"] == pytest.approx(row["accuracy"] - lora["accuracy"])
    assert results["lab"]["base_params_m"] > 0


def test_bad_options_are_one_line(tmp_path):
    (tmp_path / "kept.txt").write_text("a user's file")
    with pytest.raises(UsageError, match="--overwrite"):
        gpu_check.main(["--dry_run", f"--out={tmp_path}"])
    assert os.listdir(tmp_path) == ["kept.txt"]
    with pytest.raises(UsageError, match="--parts"):
        gpu_check.main(["--dry_run", f"--out={tmp_path / 'new'}", "--parts=6"])
    with pytest.raises(UsageError, match="--out"):
        gpu_check.main(["--dry_run"])
    if not gpu_check.torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            gpu_check.main([f"--out={tmp_path / 'new'}"])
    assert os.listdir(tmp_path) == ["kept.txt"]


def test_a_failed_command_is_an_error_after_all_have_ended(tmp_path):
    log = io.StringIO()
    with pytest.raises(RuntimeError, match="failed: no data"):
        gpu_check.run([sys.executable, "-c", "import sys; sys.exit('no data')"],
                      [sys.executable, "-c", f"open({str(tmp_path / 'done')!r}, 'w')"], log=log)
    assert (tmp_path / "done").exists() and "no data" in log.getvalue()
