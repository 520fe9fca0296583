"""
Speed and memory of L2D next to its base model and the two finetuning baselines (docs/method.md, sec. 4-5).

    python -m harness.bench                                         # SmolLM2-135M, generation and training
    python -m harness.bench --what gen --batch_sizes 1 --steps 1,8 --new_tokens 8
    python -m harness.bench --what train --batch 4 --seq 128 --train_reps 3
    python -m harness.bench --what train --data data/gsm8k/smollm2-135m --batch 8 --seq 512   # a real GSM8K batch
    python -m harness.bench --init_from scratch --new_tokens 2 --eval_reps 2 --train_reps 1     # smoke test, seconds
    python -m harness.bench --threads 1 --new_tokens 4 --eval_reps 20 --batch 4 --seq 128 --train_reps 3  # README, ~6 min
    python -m harness.bench --what ar2diff --threads 1 --answer_lens 16,64,256,1024        # AR2Diff against AR decoding
    python -m harness.bench --dtypes float32                                                # without the bf16 rows

Every measurement is taken in each --dtypes number format (default float32 and bfloat16, precision.py), side
by side and interleaved, each with its own copy of the base stored as the scripts store it: for generation
every weight in that dtype, for training the frozen ones (what trains stays float32). The first line names
the CPU and its bf16 matmul instructions (AMX, AVX-512 BF16, or none: bf16 emulated, tens of times slower).

Generation (greedy, --solver midpoint): the diffusion path around the frozen base, its zero-initialised
heads (merge gate, modulation, LoRA B) set to small random values so that nothing is trivially zero
(compute does not depend on the values anyway), its LoRA then merged into its weights as sample.py and
eval.py do. A random prompt of --prompt_len tokens, repeated over the batch; per generated token: the
ODE plus one base step (steps=1: the base alone, NFE 0). One decoding per step count, advanced one token
at a time round-robin; the median over the --new_tokens tokens is reported (the prefill is not timed).
  decode step: one base decoding step (trunk on one token + head) and one path evaluation (predict at
               the last position, its (t, label) conditioning cached as generation does) on the same
               cache, interleaved; path/base is the cost of one NFE; "merged" is the path evaluation with
               its LoRA folded into its weights (lora.merge_lora), as sample.py and eval.py generate;
               "x fp32" divides by the float32 path evaluation at that batch size.
Training: forward + backward + clip + AdamW as train.py does it, on one random batch, for the L2D path
(variants lora and full, sharing one frozen base), LoRA on the base and the full base (own copies),
timed round-robin. FLOPs per step come from FlopCounterMode (matmuls and attention, the latter dense,
not halved for causality); achieved GFLOP/s is compared to a large matmul in the same dtype on this
machine; "x fp32" is the step's time over the same method's float32 step.
AR2Diff (--what ar2diff): the seconds to write an answer of L tokens after the random prompt, batch 1, the
same model: AR decoding (greedy, KV cache, L steps of one token) against AR2Diff (--ar2diff_steps passes
over the whole L-token span, for each of --ar2diff_samples K candidates, + 1 scoring pass when K > 1),
interleaved, the median of --ar2diff_reps; speed-up = AR's time / AR2Diff's. (The weights do not matter
for speed: they are the base's, not a trained AR2Diff's.)
Peak memory: each method and dtype in a fresh subprocess (peak RSS over the RSS before the first step on CPU,
torch.cuda.max_memory_allocated on CUDA). Timings on a shared machine are noisy: read the ratios; on
an oversubscribed CPU, --threads 1 avoids the stalls of multi-threaded kernels waiting for each other.

This file is the command line: the options and their checks, the machine's description, the memory
worker's subprocess and the tables; the measurements themselves are in benchmarks.py.
"""

import gc
import json
import os
import subprocess
import sys

import torch

from harness.benchmarks import (bench_ar2diff, bench_generation, bench_training, frozen_base, load_model, matmul_peak,
                        memory_worker, torch_dtype, weight_mb)
from loading.files import check_output, write_atomic
from configurator import UsageError, configure, fail, parse_list
from loading.precision import DTYPES, cpu_bf16_support, resolve_device
from solvers import SOLVERS

OPTIONS = dict(
    init_from=("smollm2-135m", "the base: a model name, a HF folder, an ar/full ckpt.pt, or scratch (shape below)"),
    what=("gen,train", "gen, train, ar2diff, or several (gen,train)"),
    device=("cpu", "cpu, cuda, cuda:1, ..."),
    dtypes=(None, "number formats to compare side by side (precision.py), one or a list; None: float32,bfloat16"),
    threads=(0, "torch's CPU threads; 0: torch's default"),
    out=("bench.json", 'the results as JSON; "": none. An earlier bench.py JSON there is replaced'),
    overwrite=(False, "replace a file at --out that bench.py did not write"),
    seed=(1337, "of the random weights, prompt and batch"),
    # generation
    steps=(None, "step counts to decode with, one value or a list (1,8); None: 1,2,4,8,16,32"),
    batch_sizes=(None, "batch sizes to decode at; None: 1,16"),
    prompt_len=(64, "tokens of the random prompt (its prefill is not timed)"),
    new_tokens=(32, "tokens decoded per step count (the median time per token is reported)"),
    eval_reps=(30, "timed single decoding steps, base and path interleaved (the median is reported)"),
    solver=("midpoint", "a fixed-step solver: euler, midpoint or rk4"),
    # AR2Diff against AR decoding (--what ar2diff)
    answer_lens=(None, "answer lengths L to write; None: 16,64,256,1024"),
    ar2diff_steps=(10, "AR2Diff's refinement steps (the paper: 10)"),
    ar2diff_samples=(None, "AR2Diff's candidates K; None: 1,8"),
    ar2diff_reps=(1, "timed answers per length and decoder (the median is reported)"),
    # training
    methods=(None, "which to time, one or a list; None: l2d-lora,l2d-full,lora,full"),
    batch=(8, "examples per training step"),
    seq=(256, "tokens per example"),
    train_reps=(5, "timed steps per method (the median is reported)"),
    mem_steps=(2, "training steps of each method's memory measurement (in a fresh process)"),
    matmul_n=(2048, "size of the square float32 matmul that measures this machine's GFLOP/s"),
    data=("", "a prepared folder (e.g. data/gsm8k/smollm2-135m): its first batch, not random tokens"),
    lora_rank=(32, "rank of the LoRA adapters (lora, and the l2d-lora path)"),
    lora_alpha=(32.0, "LoRA scale: the update is multiplied by lora_alpha / lora_rank"),
    flow_dim=(256, "width d_f of the diffused token space"),
    # --init_from scratch: a random GPT of this shape
    family=("llama", "llama (RMSNorm, RoPE, SwiGLU) or gpt2 (LayerNorm, learned positions, GELU)"),
    n_layer=(2, "transformer blocks"),
    n_head=(4, "attention heads (must divide n_embd)"),
    n_kv_head=(0, "key/value heads of grouped-query attention; 0: n_head"),
    n_embd=(64, "hidden width"),
    vocab_size=(256, "tokens in the vocabulary"),
    block_size=(1024, "positions, at least prompt_len + new_tokens and seq"),
    _memory_worker=("", "internal: measure one method's training memory and print it as JSON"),
)
LIST_DEFAULTS = dict(steps=[1, 2, 4, 8, 16, 32], batch_sizes=[1, 16], methods=["l2d-lora", "l2d-full", "lora", "full"],
                     answer_lens=[16, 64, 256, 1024], ar2diff_samples=[1, 8], dtypes=["float32", "bfloat16"])
METHODS = LIST_DEFAULTS["methods"]


def check(cfg):
    cfg["what"] = parse_list("what", cfg["what"], str, []) if cfg["what"] else []
    for key, kind in (("steps", int), ("batch_sizes", int), ("methods", str), ("answer_lens", int), ("ar2diff_samples", int),
                      ("dtypes", str)):
        cfg[key] = parse_list(key, cfg[key], kind, LIST_DEFAULTS[key])
    if unknown := set(cfg["dtypes"]) - set(DTYPES[1:]):
        raise UsageError(f"unknown --dtypes {sorted(unknown)}; use {', '.join(DTYPES[1:])}")
    if not set(cfg["what"]) <= {"gen", "train", "ar2diff"} or not cfg["what"]:
        raise UsageError(f"--what takes gen, train, ar2diff or several (gen,train), got {cfg['what']}")
    if min(cfg["answer_lens"] + cfg["ar2diff_samples"] + [cfg["ar2diff_steps"], cfg["ar2diff_reps"]]) < 1:
        raise UsageError("--answer_lens, --ar2diff_samples, --ar2diff_steps and --ar2diff_reps must be >= 1")
    if unknown := set(cfg["methods"]) - set(METHODS):
        raise UsageError(f"unknown --methods {sorted(unknown)}; use {', '.join(METHODS)}")
    if cfg["solver"] not in SOLVERS or cfg["solver"] == "dopri5":
        raise UsageError(f"--solver must be a fixed-step solver (euler, midpoint, rk4), got {cfg['solver']!r}")
    if min(cfg["steps"] + cfg["batch_sizes"]) < 1 or min(cfg["prompt_len"], cfg["new_tokens"], cfg["batch"], cfg["seq"]) < 1:
        raise UsageError("--steps, --batch_sizes, --prompt_len, --new_tokens, --batch and --seq must be >= 1")
    if min(cfg["eval_reps"], cfg["train_reps"], cfg["mem_steps"]) < 1:
        raise UsageError("--eval_reps, --train_reps and --mem_steps must be >= 1")
    if min(cfg["matmul_n"], cfg["lora_rank"], cfg["flow_dim"]) < 1 or cfg["threads"] < 0:
        raise UsageError("--matmul_n, --lora_rank and --flow_dim must be >= 1, --threads >= 0 (0: torch's default)")
    if cfg["out"] and not cfg["_memory_worker"]:
        check_output(cfg["out"], "--out", cfg["overwrite"], ours=is_bench_json)
    return cfg


def is_bench_json(path):
    """An earlier bench.py result, which --out may replace without --overwrite."""
    try:
        with open(path) as f:
            return {"config", "machine", "matmul_gflops"} <= json.load(f).keys()
    except (OSError, ValueError, AttributeError):
        return False


def machine(device):
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    return dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu, cpu_count=os.cpu_count(),
                cpu_bf16=cpu_bf16_support(), load_avg=os.getloadavg()[0],
                device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")


# --- peak memory, one fresh process per method and dtype ---------------------------------------------
def measure_memory(cfg, method, dtype="float32"):
    """Run this script again as benchmarks.memory_worker for (method, dtype): its memory in MB."""
    args = [f"--{k}={v!r}" for k, v in cfg.items() if k not in ("_memory_worker", "what")]
    run = subprocess.run([sys.executable, "-m", "harness.bench", *args, f"--_memory_worker={method}:{dtype}"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if run.returncode:
        raise RuntimeError(f"memory worker for {method} in {dtype} failed: {run.stderr.strip()[-500:]}")
    m = json.loads(run.stdout.strip().splitlines()[-1])
    mb = 2**20
    return dict(method=method, dtype=dtype, before_mb=m["before"] / mb, peak_mb=m["peak"] / mb,
                increase_mb=(m["peak"] - m["before"]) / mb, peak_reset=m["peak_reset"])


# --- output ------------------------------------------------------------------------------------------
def table(title, rows, columns):
    """Print rows (dicts) as an aligned table; columns: (header, key, format)."""
    cells = [[h for h, _, _ in columns]] + [[("-" if r[k] is None else fmt.format(r[k])) for _, k, fmt in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None):
    cfg = check(configure(OPTIONS, argv))
    cfg["device"] = resolve_device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["_memory_worker"]:
        return memory_worker(cfg)
    info = machine(cfg["device"])
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpu_count']} CPUs ({info['cpu']}; bf16 matmul "
          f"instructions: {info['cpu_bf16']}), load average {info['load_avg']:.2f}, device {info['device']}")
    if "bfloat16" in cfg["dtypes"] and not cfg["device"].startswith("cuda") and info["cpu_bf16"] == "none":
        print("warning: this CPU has no bf16 matmul instructions: the bfloat16 rows are emulated and take tens of "
              "times longer than the float32 ones; --dtypes float32 leaves them out")
    base = load_model(cfg).eval()
    longest = cfg["prompt_len"] + max([cfg["new_tokens"]] + (cfg["answer_lens"] if "ar2diff" in cfg["what"] else []))
    if longest > base.config.block_size or cfg["seq"] > base.config.block_size:
        raise UsageError(f"--prompt_len + --new_tokens (or --answer_lens) and --seq must fit the model's "
                         f"{base.config.block_size} positions")
    peaks = {d: matmul_peak(cfg["matmul_n"], cfg["device"], torch_dtype(d)) for d in cfg["dtypes"]}
    weights = {d: weight_mb(frozen_base(base, torch_dtype(d))) for d in cfg["dtypes"]}
    print(f"{cfg['init_from']}: {base.num_params() / 1e6:.1f}M parameters; " + ", ".join(
        f"{d}: weights {weights[d]:.0f} MB, matmul {peaks[d]:.1f} GFLOP/s" for d in cfg["dtypes"]))
    results = dict(config=cfg, machine=info, matmul_gflops=peaks, weights_mb=weights)
    if "gen" in cfg["what"]:
        results["generation"] = gen = bench_generation(base, cfg)
        table(f"One decoding step (median of {cfg['eval_reps']}, interleaved; prompt {cfg['prompt_len']} tokens)",
              gen["decode_step"], [("batch", "batch", "{}"), ("dtype", "dtype", "{}"), ("base step ms", "base_step_ms", "{:.2f}"),
                                   ("path eval ms", "path_eval_ms", "{:.2f}"), ("path/base", "ratio", "{:.2f}"),
                                   ("merged ms", "merged_path_eval_ms", "{:.2f}"), ("merged/base", "merged_ratio", "{:.2f}"),
                                   ("path x fp32", "path_vs_fp32", "{:.2f}"), ("merged x fp32 path", "merged_vs_fp32", "{:.2f}")])
        table(f"Generation, {cfg['solver']}: time per new token (median of {cfg['new_tokens']}, interleaved)",
              gen["steps"], [("batch", "batch", "{}"), ("dtype", "dtype", "{}"), ("steps", "steps", "{}"),
                             ("NFE/tok", "nfe_per_token", "{:.0f}"), ("ms/tok", "ms_per_token", "{:.1f}"),
                             ("tok/s", "tokens_per_s", "{:.2f}"), ("x fp32", "vs_fp32", "{:.2f}"),
                             ("x steps=1", "vs_steps1", "{:.2f}"), ("1+NFE*merged/base", "predicted_vs_steps1", "{:.2f}")])
    if "ar2diff" in cfg["what"]:
        results["ar2diff"] = rows = bench_ar2diff(base, cfg)
        table(f"Writing an answer of L tokens, batch 1 (prompt {cfg['prompt_len']} tokens; median of {cfg['ar2diff_reps']}, "
              f"interleaved): AR decoding against AR2Diff, {cfg['ar2diff_steps']} steps", rows,
              [("L", "answer_len", "{}"), ("K", "samples", "{}"), ("passes", "passes", "{}"), ("AR s", "ar_s", "{:.3f}"),
               ("AR2Diff s", "ar2diff_s", "{:.3f}"), ("AR tok/s", "ar_tokens_per_s", "{:.1f}"),
               ("AR2Diff tok/s", "ar2diff_tokens_per_s", "{:.1f}"), ("speed-up", "speedup", "{:.2f}")])
    if "train" in cfg["what"]:
        rows = bench_training(base, cfg, peaks)
        gc.collect()
        for row in rows:
            row.update({k: v for k, v in measure_memory(cfg, row["method"], row["dtype"]).items() if k not in row})
        results["training"] = rows
        kind = "allocated" if cfg["device"].startswith("cuda") else "RSS"
        table(f"Training step, batch {cfg['batch']} x {cfg['seq']} tokens (median of {cfg['train_reps']}, interleaved)",
              rows, [("method", "method", "{}"), ("dtype", "dtype", "{}"), ("trainable", "trainable_params", "{:,}"),
                     ("step s", "step_s", "{:.3f}"), ("tok/s", "tokens_per_s", "{:.0f}"), ("x full", "vs_full", "{:.2f}"),
                     ("x fp32", "vs_fp32", "{:.2f}"),
                     ("GFLOP/step", "gflop_per_step", "{:.1f}"), ("GFLOP/s", "gflops", "{:.1f}"),
                     ("of matmul", "of_peak", "{:.0%}"), (f"peak {kind} MB", "peak_mb", "{:.0f}"),
                     ("+MB over start", "increase_mb", "{:.0f}")])
    results["machine"]["load_avg_end"] = os.getloadavg()[0]
    if cfg["out"]:
        write_atomic(cfg["out"], lambda f: f.write(json.dumps(results, indent=1).encode()))
        print(f"\nwrote {cfg['out']}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
