"""bench.py: runs end to end on a tiny random GPT and reports
every row and key; the FLOP counter agrees with the analytic count of a training step; bad flags are
one-line usage errors. Nothing here checks a timing (the machine is shared)."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import forkrun
from harness import bench
from configurator import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--init_from=scratch", "--n_layer=2", "--n_embd=32", "--n_head=2", "--vocab_size=64", "--block_size=64",
        "--flow_dim=16", "--lora_rank=4", "--prompt_len=8", "--new_tokens=2", "--eval_reps=1",
        "--batch=2", "--seq=8", "--train_reps=1", "--mem_steps=1", "--matmul_n=64"]


@pytest.fixture
def one_thread(monkeypatch):
    """One thread here and in the memory workers: fastest for tiny models on a shared machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_end_to_end_on_a_tiny_model(tmp_path, capsys, one_thread, monkeypatch):
    out = tmp_path / "bench.json"
    # its 8 memory workers forked from a torch already imported (test_memory_workers_see_their_own_training_memory
    # runs them as fresh interpreters, as bench.py does)
    monkeypatch.setattr(bench, "subprocess", types.SimpleNamespace(run=forkrun.run))
    returned = bench.main(TINY + ["--steps=1,2,4", "--batch_sizes=1,3", f"--out={out}"])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["training"] == json.loads(json.dumps(returned["training"]))
    for title in ("torch ", "One decoding step", "Generation, midpoint", "Training step", "wrote"):
        assert title in printed
    assert {"torch", "threads", "cpu", "cpu_bf16", "load_avg", "load_avg_end"} <= set(results["machine"])
    dtypes = ["float32", "bfloat16"]  # the default: side by side
    assert list(results["matmul_gflops"]) == dtypes and min(results["matmul_gflops"].values()) > 0
    weights = results["weights_mb"]  # the base stored in each: bf16 halves all but the norms
    assert weights["float32"] / 2 < weights["bfloat16"] < weights["float32"] / 2 * 1.05

    gen = results["generation"]
    assert [(r["batch"], r["dtype"]) for r in gen["decode_step"]] == [(b, d) for b in (1, 3) for d in dtypes]
    for row in gen["decode_step"]:
        assert row["base_step_ms"] > 0 and row["path_eval_ms"] > 0
        assert row["ratio"] == pytest.approx(row["path_eval_ms"] / row["base_step_ms"])
        assert row["merged_ratio"] == pytest.approx(row["merged_path_eval_ms"] / row["base_step_ms"])
        fp32 = next(r for r in gen["decode_step"] if r["batch"] == row["batch"] and r["dtype"] == "float32")
        assert row["path_vs_fp32"] == pytest.approx(row["path_eval_ms"] / fp32["path_eval_ms"])
        assert row["merged_vs_fp32"] == pytest.approx(row["merged_path_eval_ms"] / fp32["path_eval_ms"])
    assert [(r["batch"], r["dtype"], r["steps"]) for r in gen["steps"]] == \
        [(b, d, s) for b in (1, 3) for d in dtypes for s in (1, 2, 4)]
    for row in gen["steps"]:
        assert row["nfe_per_token"] == (0 if row["steps"] == 1 else 2 * (row["steps"] - 1) + 1)  # midpoint + read-out
        assert row["tokens_per_s"] == pytest.approx(1e3 * row["batch"] / row["ms_per_token"])
        assert set(row) == {"batch", "dtype", "steps", "nfe_per_token", "ms_per_token", "tokens_per_s", "vs_fp32",
                            "vs_steps1"}
        if row["steps"] == 1:
            assert row["vs_steps1"] == 1.0
        if row["dtype"] == "float32":
            assert row["vs_fp32"] == 1.0

    rows = {(r["method"], r["dtype"]): r for r in results["training"]}
    assert list(rows) == [(m, d) for d in dtypes for m in ("l2d-lora", "l2d-full", "lora", "full")]
    keys = {"method", "dtype", "trainable_params", "step_s", "tokens_per_s", "vs_full", "vs_fp32", "flops_per_step",
            "gflop_per_step", "gflops", "of_peak", "before_mb", "peak_mb", "increase_mb"}
    for (method, dtype), row in rows.items():
        assert set(row) == keys
        assert row["step_s"] > 0 and row["flops_per_step"] > 0 and row["peak_mb"] >= row["before_mb"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 8 / row["step_s"])
        assert row["vs_fp32"] == pytest.approx(row["step_s"] / rows[method, "float32"]["step_s"])
        assert row["trainable_params"] == rows[method, "float32"]["trainable_params"]  # what trains stays float32
    for dtype in dtypes:
        assert rows["full", dtype]["vs_full"] == 1.0
        assert rows["lora", dtype]["trainable_params"] < rows["full", dtype]["trainable_params"]
        assert rows["l2d-lora", dtype]["trainable_params"] < rows["l2d-full", dtype]["trainable_params"]
        assert rows["lora", dtype]["flops_per_step"] < rows["full", dtype]["flops_per_step"]  # no base weight gradients


def test_ar2diff_against_ar_decoding_on_a_tiny_model(one_thread, capsys):
    """A row per (L, K), AR's time shared by the K rows of its L; the passes AR2Diff makes over the span
    are counted by wrapping its denoise, and its answers have length L."""
    counted, denoise, generate = [], bench.AR2Diff.denoise, bench.AR2Diff.generate

    def counting(self, cache, z):
        counted.append(z.shape)
        return denoise(self, cache, z)

    def checked(self, *args, **kwargs):
        span, score = generate(self, *args, **kwargs)
        assert span.shape == (1, self.config.answer_len)
        return span, score

    bench.AR2Diff.denoise, bench.AR2Diff.generate = counting, checked
    try:
        rows = bench.main(TINY + ["--what=ar2diff", "--answer_lens=2,6", "--ar2diff_candidates=1,3", "--ar2diff_steps=2",
                                  "--out="])["ar2diff"]
    finally:
        bench.AR2Diff.denoise, bench.AR2Diff.generate = denoise, generate
    assert "AR decoding against AR2Diff" in capsys.readouterr().out
    assert [(r["answer_len"], r["candidates"], r["passes"]) for r in rows] == [(2, 1, 2), (2, 3, 3), (6, 1, 2), (6, 3, 3)]
    # K = 1 makes 2 passes over 1 row, K = 3 makes 2 + 1 (the score) over 3 rows: a warm-up at L = 2, then each L
    per_answer = lambda L: [torch.Size([1, L])] * 2 + [torch.Size([3, L])] * 3
    assert counted == per_answer(2) + per_answer(2) + per_answer(6)
    for r in rows:
        assert r["ar_s"] > 0 and r["speedup"] == pytest.approx(r["ar_s"] / r["ar2diff_s"])
        assert r["ar2diff_tokens_per_s"] == pytest.approx(r["answer_len"] / r["ar2diff_s"])
    assert rows[0]["ar_s"] == rows[1]["ar_s"] and rows[2]["ar_s"] == rows[3]["ar_s"]


@pytest.mark.parametrize("method", bench.METHODS)
def test_bf16_trainers_keep_float32_masters_and_store_the_frozen_base_in_bf16(method, one_thread):
    cfg = bench.check(bench.configure(bench.OPTIONS, TINY))
    base = bench.base_model(cfg)
    dtype = torch.bfloat16
    model, *_ = bench.build_trainer(method, base, cfg, dtype)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen_linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(w.dtype == dtype for w in frozen_linears) and (method == "full") == (not frozen_linears)
    assert all(p.dtype == torch.float32 for p in base.parameters())  # the caller's base is left as it was


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_flop_count_of_a_full_training_step(family, one_thread):
    """6 FLOPs per matmul weight per token (forward 2, backward 4) plus dense attention: q k^T and p v
    forward (4 B T^2 d per layer) and, as torch counts it, 10 B T^2 d backward (the scores are
    recomputed). Without bench.py's formula for the CPU attention kernel, 14 B T^2 d L would be missing."""
    cfg = bench.check(bench.configure(bench.OPTIONS, TINY + [f"--family={family}"]))
    base = bench.base_model(cfg)
    model, optimizer, *_ = bench.build_trainer("full", base, cfg)
    B, T = 2, 64
    x, y = torch.randint(0, 64, (2, B, T))
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    d, L = base.config.n_embd, base.config.n_layer
    expected = 6 * matmul_weights * B * T + 14 * B * T * T * d * L
    counted = bench.count_flops(model, optimizer, x, y, torch.float32)
    assert counted == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("flag", ["--what=sample", "--dtypes=bf16", "--steps=0,2", "--ar2diff_steps=0",
                                  "--batch_sizes=one", "--eval_reps=0", "--answer_lens=0", "--ar2diff_candidates=1,0"])
def test_bad_flags_are_usage_errors(flag):
    with pytest.raises(UsageError):
        bench.check(bench.configure(bench.OPTIONS, [flag]))


def test_defaults_and_exit_code():
    cfg = bench.check(bench.configure(bench.OPTIONS, []))
    assert cfg["steps"] == [1, 2, 4, 8, 16, 32] and cfg["batch_sizes"] == [1, 16] and cfg["what"] == ["gen", "train"]
    assert bench.check(bench.configure(bench.OPTIONS, ["--steps", "8", "--what", "gen"]))["steps"] == [8]
    run = forkrun.run([sys.executable, "-m", "harness.bench", "--what=nothing"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: --what")


def test_memory_workers_see_their_own_training_memory(one_thread):
    """Full finetuning keeps gradients and two AdamW moments of every weight, LoRA of almost none: on
    a ~8M-parameter model that is ~100 MB more. (A peak read from ru_maxrss would be the parent's.)"""
    cfg = bench.check(bench.configure(bench.OPTIONS, TINY + ["--n_embd=512", "--threads=1"]))
    lora, full = bench.measure_memory(cfg, "lora"), bench.measure_memory(cfg, "full")
    weights_mb = 4 * bench.base_model(cfg).num_params() / 2**20
    assert full["increase_mb"] - lora["increase_mb"] > 2 * weights_mb
    assert full["peak_mb"] < full["before_mb"] + 10 * weights_mb
    # LoRA's frozen base stored in bf16: half its bytes, before the first step (the rest of the process is alike)
    lora_bf16 = bench.measure_memory(cfg, "lora", "bfloat16")
    assert lora["before_mb"] - lora_bf16["before_mb"] == pytest.approx(weights_mb / 2, rel=0.25)



def test_ctrl_c_is_one_line_and_writes_nothing(tmp_path):
    import signal
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "harness.bench", "--init_from=scratch", "--what=gen", "--steps=1,8",
                             f"--out={out}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's job
    proc.stdout.readline()  # the machine line: torch is loaded, the timing begins
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.splitlines() == ["error: interrupted; nothing was written"]
    assert not out.exists()
