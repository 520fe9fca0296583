"""
Speed and memory of L2D next to its base model and the two finetuning baselines (docs/method.md, sec. 4-5).

    python -m harness.bench --threads 1                                                    # SmolLM2-135M: gen and train
    python -m harness.bench --init_from scratch --new_tokens 2 --eval_reps 2 --train_reps 1    # smoke test, seconds
    python -m harness.bench --what ar2diff --threads 1 --answer_lens 16,64,256,1024        # AR2Diff against AR decoding

Every measurement is taken in each --dtypes format side by side, interleaved, each with its own copy of
the base stored as the scripts store it; the first line names the CPU and its bf16 matmul instructions
(none: bf16 is emulated, tens of times slower). The tables:
  decode step   one base decoding step against one path evaluation (the cost of one NFE), the latter also
                with its LoRA merged into its weights, as sample.py and eval.py generate.
  generation    time per new token at each --steps (greedy, midpoint): the ODE plus one base step.
  ar2diff       seconds to write an L-token answer: AR decoding against AR2Diff's passes over the span.
  training      one train.py step per method on a random batch (a target at every position: l2d's worst
                case): its time, FLOPs (FlopCounterMode) against a large matmul's GFLOP/s, and its peak
                memory, each method and dtype in a fresh process.
Timings on a shared machine are noisy: read the ratios; --threads 1 avoids multi-threaded stalls.
"""

import gc
import json
import os
import subprocess
import sys

import torch

from configurator import UsageError, configure, fail, parse_list
from harness.benchmarks import (base_model, bench_ar2diff, bench_generation, bench_training, frozen_base, matmul_peak,
                                memory_worker)
from loading.files import check_output, write_atomic
from loading.precision import DTYPES, cpu_bf16_support, resolve_device

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
    steps=(None, "step counts to decode with (midpoint), one value or a list (1,8); None: 1,2,4,8,16,32"),
    batch_sizes=(None, "batch sizes to decode at; None: 1,16"),
    prompt_len=(64, "tokens of the random prompt (its prefill is not timed)"),
    new_tokens=(32, "tokens decoded per step count (the median time per token is reported)"),
    eval_reps=(30, "timed single decoding steps, base and path interleaved (the median is reported)"),
    # AR2Diff against AR decoding (--what ar2diff)
    answer_lens=(None, "answer lengths L to write; None: 16,64,256,1024"),
    ar2diff_steps=(10, "AR2Diff's refinement steps (the paper: 10)"),
    ar2diff_candidates=(None, "AR2Diff's candidates K; None: 1,8"),
    # training
    batch=(8, "examples per training step"),
    seq=(256, "tokens per example"),
    train_reps=(5, "timed steps per method (the median is reported)"),
    mem_steps=(2, "training steps of each method's memory measurement (in a fresh process)"),
    matmul_n=(2048, "size of the square float32 matmul that measures this machine's GFLOP/s"),
    lora_rank=(32, "rank of the LoRA adapters (lora, and the l2d-lora path)"),
    flow_dim=(256, "width d_f of the diffused token space"),
    # --init_from scratch: a random GPT of this shape
    family=("llama", "llama (RMSNorm, RoPE, SwiGLU) or gpt2 (LayerNorm, learned positions, GELU)"),
    n_layer=(2, "transformer blocks"),
    n_head=(4, "attention heads (must divide n_embd)"),
    n_embd=(64, "hidden width"),
    vocab_size=(256, "tokens in the vocabulary"),
    block_size=(1024, "positions, at least prompt_len + new_tokens and seq"),
    _memory_worker=("", "internal: measure one method's training memory and print it as JSON"),
)
LIST_DEFAULTS = dict(steps=[1, 2, 4, 8, 16, 32], batch_sizes=[1, 16], answer_lens=[16, 64, 256, 1024],
                     ar2diff_candidates=[1, 8], dtypes=["float32", "bfloat16"])
POSITIVE = ("steps", "batch_sizes", "prompt_len", "new_tokens", "eval_reps", "answer_lens", "ar2diff_steps",
            "ar2diff_candidates", "batch", "seq", "train_reps", "mem_steps", "matmul_n", "lora_rank", "flow_dim")


def check(cfg):
    cfg["what"] = parse_list("what", cfg["what"], str, []) if cfg["what"] else []
    for key, default in LIST_DEFAULTS.items():
        cfg[key] = parse_list(key, cfg[key], str if key == "dtypes" else int, default)
    if unknown := set(cfg["dtypes"]) - set(DTYPES[1:]):
        raise UsageError(f"unknown --dtypes {sorted(unknown)}; use {', '.join(DTYPES[1:])}")
    if not set(cfg["what"]) <= {"gen", "train", "ar2diff"} or not cfg["what"]:
        raise UsageError(f"--what takes gen, train, ar2diff or several (gen,train), got {cfg['what']}")
    for key in POSITIVE:
        if min(cfg[key] if isinstance(cfg[key], list) else [cfg[key]]) < 1:
            raise UsageError(f"--{key} must be >= 1, got {cfg[key]}")
    if cfg["threads"] < 0:
        raise UsageError(f"--threads must be >= 0 (0: torch's default), got {cfg['threads']}")
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
    """Print rows (dicts) as an aligned table; columns: "header key format" triples (one string each)."""
    columns = [c.rsplit(" ", 2) for c in columns]
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
    base = base_model(cfg).eval()
    longest = cfg["prompt_len"] + max([cfg["new_tokens"]] + (cfg["answer_lens"] if "ar2diff" in cfg["what"] else []))
    if longest > base.config.block_size or cfg["seq"] > base.config.block_size:
        raise UsageError(f"--prompt_len + --new_tokens (or --answer_lens) and --seq must fit the model's "
                         f"{base.config.block_size} positions")
    peaks = {d: matmul_peak(cfg["matmul_n"], cfg["device"], getattr(torch, d)) for d in cfg["dtypes"]}
    weights = {d: sum(p.numel() * p.element_size() for p in frozen_base(base, getattr(torch, d)).parameters()) / 2**20
               for d in cfg["dtypes"]}
    print(f"{cfg['init_from']}: {base.num_params() / 1e6:.1f}M parameters; " + ", ".join(
        f"{d}: weights {weights[d]:.0f} MB, matmul {peaks[d]:.1f} GFLOP/s" for d in cfg["dtypes"]))
    results = dict(config=cfg, machine=info, matmul_gflops=peaks, weights_mb=weights)
    if "gen" in cfg["what"]:
        results["generation"] = gen = bench_generation(base, cfg)
        table(f"One decoding step (median of {cfg['eval_reps']}, interleaved; prompt {cfg['prompt_len']} tokens)",
              gen["decode_step"], ["batch batch {}", "dtype dtype {}", "base step ms base_step_ms {:.2f}",
                                   "path eval ms path_eval_ms {:.2f}", "path/base ratio {:.2f}",
                                   "merged ms merged_path_eval_ms {:.2f}", "merged/base merged_ratio {:.2f}",
                                   "path x fp32 path_vs_fp32 {:.2f}", "merged x fp32 path merged_vs_fp32 {:.2f}"])
        table(f"Generation, midpoint: time per new token (median of {cfg['new_tokens']}, interleaved)",
              gen["steps"], ["batch batch {}", "dtype dtype {}", "steps steps {}", "NFE/tok nfe_per_token {:.0f}",
                             "ms/tok ms_per_token {:.1f}", "tok/s tokens_per_s {:.2f}", "x fp32 vs_fp32 {:.2f}",
                             "x steps=1 vs_steps1 {:.2f}", "1+NFE*merged/base predicted_vs_steps1 {:.2f}"])
    if "ar2diff" in cfg["what"]:
        results["ar2diff"] = rows = bench_ar2diff(base, cfg)
        table(f"Writing an answer of L tokens, batch 1 (prompt {cfg['prompt_len']} tokens, "
              f"interleaved): AR decoding against AR2Diff, {cfg['ar2diff_steps']} steps", rows,
              ["L answer_len {}", "K candidates {}", "passes passes {}", "AR s ar_s {:.3f}", "AR2Diff s ar2diff_s {:.3f}",
               "AR tok/s ar_tokens_per_s {:.1f}", "AR2Diff tok/s ar2diff_tokens_per_s {:.1f}", "speed-up speedup {:.2f}"])
    if "train" in cfg["what"]:
        rows = bench_training(base, cfg, peaks)
        gc.collect()
        for row in rows:
            row.update({k: v for k, v in measure_memory(cfg, row["method"], row["dtype"]).items() if k not in row})
        results["training"] = rows
        kind = "allocated" if cfg["device"].startswith("cuda") else "RSS"
        table(f"Training step, batch {cfg['batch']} x {cfg['seq']} tokens (median of {cfg['train_reps']}, interleaved)",
              rows, ["method method {}", "dtype dtype {}", "trainable trainable_params {:,}", "step s step_s {:.3f}",
                     "tok/s tokens_per_s {:.0f}", "x full vs_full {:.2f}", "x fp32 vs_fp32 {:.2f}",
                     "GFLOP/step gflop_per_step {:.1f}", "GFLOP/s gflops {:.1f}", "of matmul of_peak {:.0%}",
                     f"peak {kind} MB peak_mb {{:.0f}}", "+MB over start increase_mb {:.0f}"])
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
    except KeyboardInterrupt:  # --out is written once, at the end, atomically
        print("error: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
