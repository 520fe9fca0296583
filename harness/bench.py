"""
Speed and memory of L2D next to its base model and the two finetuning baselines (docs/method.md, sec. 4-5).

    python -m harness.bench --threads 1                                                    # SmolLM2-135M: gen and train
    python -m harness.bench --init_from scratch --new_tokens 2 --eval_reps 2 --train_reps 1    # smoke test, seconds
    python -m harness.bench --what ar2diff --threads 1 --answer_lens 16,64,256,1024        # AR2Diff against AR decoding

Each --dtypes format is timed interleaved with the others, the base stored in it as the scripts store it (without
bf16 matmul instructions, named on the first line, a CPU emulates bf16, tens of times slower). The tables: a base
decoding step against a path evaluation (one NFE), also with the LoRA merged as sample.py generates; time per new
token at each --steps; AR decoding against AR2Diff; a train.py step per method on random tokens (a target at every
position: l2d's worst case), its FLOPs against a matmul's GFLOP/s, its peak memory in a fresh process.
"""

import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

import train
from ar2diff import AR2Diff, AR2DiffConfig
from configurator import UsageError, configure, defaults, fail, parse_list
from diffusion import L2D, L2DConfig
from loading.checkpoint import load_base
from loading.files import check_output, write_atomic
from loading.precision import DTYPES, autocast, cpu_bf16_support, store_weights
from lora import add_lora, merge_lora
from model import GPT, GPTConfig, KVCache

OPTIONS = dict(
    init_from=("smollm2-135m", "the base: a model name, a HF folder, an ar/full ckpt.pt, or scratch (shape below)"),
    what=("gen,train", "gen, train, ar2diff, or several (gen,train)"),
    dtypes=("float32,bfloat16", "number formats to compare side by side (precision.py), one or a list"),
    threads=(0, "torch's CPU threads; 0: torch's default"),
    out=("bench.json", 'the results as JSON; "": none. An earlier bench.py JSON there is replaced'),
    overwrite=(False, "replace a file at --out that bench.py did not write"),
    seed=(1337, "of the random weights, prompt and batch"),
    steps=("1,2,4,8,16,32", "step counts to decode with (midpoint), one value or a list"),
    batch_sizes=("1,16", "batch sizes to decode at"),
    prompt_len=(64, "tokens of the random prompt (its prefill is not timed)"),
    new_tokens=(32, "tokens decoded per step count (the median time per token is reported)"),
    eval_reps=(30, "timed single decoding steps, base and path interleaved (the median is reported)"),
    answer_lens=("16,64,256,1024", "answer lengths L that --what ar2diff writes"),
    ar2diff_steps=(10, "AR2Diff's refinement steps (the paper: 10)"),
    ar2diff_candidates=("1,8", "AR2Diff's candidates K"),
    batch=(8, "examples per training step"),
    seq=(256, "tokens per example"),
    train_reps=(5, "timed steps per method (the median is reported)"),
    mem_steps=(2, "training steps of each method's memory measurement (in a fresh process)"),
    matmul_n=(2048, "size of the square matmul that measures this machine's GFLOP/s"),
    lora_rank=(32, "rank of the LoRA adapters (lora, and the l2d-lora path)"),
    flow_dim=(256, "width d_f of the diffused token space"),
    family=("llama", "of a scratch base: llama (RMSNorm, RoPE, SwiGLU) or gpt2 (LayerNorm, learned positions, GELU)"),
    n_layer=(2, "transformer blocks"),
    n_head=(4, "attention heads (must divide n_embd)"),
    n_embd=(64, "hidden width"),
    vocab_size=(256, "tokens in the vocabulary"),
    block_size=(1024, "positions, at least prompt_len + new_tokens and seq"),
    _memory_worker=("", "internal: measure one method's training memory and print it as JSON"),
)
METHODS = ("l2d-lora", "l2d-full", "lora", "full")  # what is trained: the path, and the two baselines

# torch counts attention on CUDA but not its CPU kernel: count that the same way (dense q k^T and p v).
aten = torch.ops.aten
if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)(
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v))


def check(cfg):
    for key in ("what", "dtypes", "steps", "batch_sizes", "answer_lens", "ar2diff_candidates"):
        cfg[key] = parse_list(key, cfg[key], str if key in ("what", "dtypes") else int, None)
    if unknown := set(cfg["dtypes"]) - set(DTYPES[1:]):
        raise UsageError(f"unknown --dtypes {sorted(unknown)}; use {', '.join(DTYPES[1:])}")
    if not set(cfg["what"]) <= {"gen", "train", "ar2diff"}:
        raise UsageError(f"--what takes gen, train, ar2diff or several (gen,train), got {cfg['what']}")
    for key, value in cfg.items():  # every count and size
        values = value if isinstance(value, list) else [value]
        if key not in ("seed", "threads") and any(type(v) is int and v < 1 for v in values):
            raise UsageError(f"--{key} must be >= 1, got {value}")
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


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns, reps, warmup=0):
    """{key: median seconds of fn()} for fns {key: (dtype, fn)}, each fn in its dtype's autocast: `reps` rounds
    after `warmup`, the keys taking turns in each, so that a slow spell of a shared machine falls on all alike."""
    times = {key: [] for key in fns}
    for rep in range(warmup + reps):
        for key, (dtype, fn) in fns.items():
            with autocast("cpu", getattr(torch, dtype)):
                seconds = timed(fn)
            if rep >= warmup:
                times[key].append(seconds)
    return {key: statistics.median(kept) for key, kept in times.items()}


def matmul_peak(n, dtype, reps=5):
    """GFLOP/s of an (m x m) @ (m x m) matmul in dtype, the best of `reps`: this machine's ceiling. m doubles
    from 256 up to n while one product takes under 0.2 s (an emulated bf16 product of 2048 takes a minute)."""
    m = min(256, n)
    while True:
        a, b = torch.randn(m, m, dtype=dtype), torch.randn(m, m, dtype=dtype)
        if 2 * m > n or timed(lambda: a @ b) > 0.2:
            break
        m *= 2
    return 2 * m**3 / min(timed(lambda: a @ b) for _ in range(reps)) / 1e9


def base_model(cfg):
    """The base to measure: --init_from by name or path, or (scratch) a random GPT of the given shape."""
    if cfg["init_from"] != "scratch":
        return load_base(cfg["init_from"])[0]
    torch.manual_seed(cfg["seed"])
    return GPT(GPTConfig(family=cfg["family"], block_size=cfg["block_size"], vocab_size=cfg["vocab_size"],
                         n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"]))


def bench_generation(base, cfg):
    """Per batch size and dtype: the median cost of a base decoding step, a path evaluation and a merged one
    (the cost of one NFE), and the median time per new token at each step count."""
    torch.manual_seed(cfg["seed"])
    l2d = L2D(base, L2DConfig(variant="lora", flow_dim=cfg["flow_dim"], lora_rank=cfg["lora_rank"])).eval()
    models = {d: (store_weights(copy.deepcopy(l2d), getattr(torch, d)),
                  store_weights(merge_lora(copy.deepcopy(l2d)), getattr(torch, d))) for d in cfg["dtypes"]}
    prompt = torch.randint(0, base.config.vocab_size, (1, cfg["prompt_len"]))
    nfe = {}

    def base_step(base, token, cache):
        return base.head(base.trunk(token, cache.fork())[0][:, -1])  # fork: the step appends a position

    def decoder(l2d, h, cache, key):  # greedy as L2D.generate, a token per next(), its NFE kept in nfe[key]
        cache = cache.fork()
        while True:
            token, nfe[key] = l2d.next_token(h[:, -1:], cache, steps=key[1], solver="midpoint")
            h, _ = l2d.base.trunk(token[:, None], cache)
            yield

    costs, steps_rows = [], []
    with torch.inference_mode():
        for B in cfg["batch_sizes"]:
            batch, t, fns, decoders = prompt.expand(B, -1).contiguous(), torch.full((B, 1), 0.5), {}, {}
            for d, (l2d, merged) in models.items():  # one prefill per dtype, shared by every decoding below
                with autocast("cpu", getattr(torch, d)):
                    cache = KVCache()
                    h = l2d.base.trunk(batch, cache)[0]
                    # the path's conditioning on t is computed once, as generation does per grid time
                    x_t = l2d.config.sigma * torch.randn(B, 1, l2d.config.flow_dim)
                    x = h[:, -1:], cache, x_t, t, l2d.conditioning(t[:1])
                fns |= {(d, "base"): (d, partial(base_step, l2d.base, batch[:, -1:], cache)),
                        (d, "path"): (d, partial(l2d.predict, *x)), (d, "merged"): (d, partial(merged.predict, *x))}
                decoders |= {(d, s): (d, partial(next, decoder(merged, h, cache, (d, s)))) for s in cfg["steps"]}
            step = interleaved(fns, cfg["eval_reps"], warmup=2)
            per_token = interleaved(decoders, cfg["new_tokens"])  # merged, as sample.py generates
            fp32 = step.get(("float32", "path"))
            for d in models:
                base_s, path_s, merged_s = step[d, "base"], step[d, "path"], step[d, "merged"]
                costs.append(dict(batch=B, dtype=d, base_step_ms=1e3 * base_s, path_eval_ms=1e3 * path_s,
                                  ratio=path_s / base_s, merged_path_eval_ms=1e3 * merged_s,
                                  merged_ratio=merged_s / base_s, path_vs_fp32=fp32 and path_s / fp32,
                                  merged_vs_fp32=fp32 and merged_s / fp32))
            for (d, s), sec in per_token.items():
                fp32, one = per_token.get(("float32", s)), per_token.get((d, 1))
                steps_rows.append(dict(batch=B, dtype=d, steps=s, nfe_per_token=nfe[d, s].float().mean().item(),
                                       ms_per_token=1e3 * sec, tokens_per_s=B / sec, vs_fp32=fp32 and sec / fp32,
                                       vs_steps1=one and sec / one))
    return dict(decode_step=costs, steps=steps_rows)


def bench_ar2diff(base, cfg):
    """Seconds to write an L-token answer at batch 1, AR decoding against AR2Diff's K candidates, interleaved."""
    steps = cfg["ar2diff_steps"]
    torch.manual_seed(cfg["seed"])
    prompt = torch.randint(0, base.config.vocab_size, (1, cfg["prompt_len"]))

    def writers(L):  # each decoder of an L-token answer, by name: "ar", or AR2Diff's K
        model = AR2Diff(base, AR2DiffConfig(answer_len=L, vocab_size=base.config.vocab_size)).eval()
        named = {"ar": lambda: sum(1 for _ in base.generate(prompt, L, temperature=0))}
        named |= {K: partial(model.generate, prompt, steps=steps, samples=K) for K in cfg["ar2diff_candidates"]}
        return {name: ("float32", write) for name, write in named.items()}

    rows = []
    with torch.inference_mode():
        for _, write in writers(min(cfg["answer_lens"])).values():  # warm-up
            write()
        for L in cfg["answer_lens"]:
            seconds = interleaved(writers(L), 1)
            for K in cfg["ar2diff_candidates"]:
                ar_s, s = seconds["ar"], seconds[K]
                rows.append(dict(answer_len=L, candidates=K, steps=steps, passes=steps + (K > 1), ar_s=ar_s,
                                 ar2diff_s=s, ar_tokens_per_s=L / ar_s, ar2diff_tokens_per_s=L / s, speedup=ar_s / s))
    return rows


def frozen_base(base, dtype):
    """The base as the l2d variants train around it, frozen and stored in dtype (its own copy unless float32)."""
    return base if dtype == torch.float32 else store_weights(copy.deepcopy(base), dtype)


def build_trainer(method, base, cfg, dtype=torch.float32):
    """(model, optimizer, x, y): a training method, its frozen weights stored in dtype as train.py stores them
    (the caller's float32 `base` is left as it was), and a random batch with a target at every position."""
    if method.startswith("l2d"):
        config = L2DConfig(variant=method.split("-")[1], flow_dim=cfg["flow_dim"], lora_rank=cfg["lora_rank"])
        model = L2D(frozen_base(base, dtype), config)
    elif method == "lora":
        model = add_lora(copy.deepcopy(base), cfg["lora_rank"])
    else:  # every weight trained, in float32
        model = copy.deepcopy(base).requires_grad_(True)
    model = store_weights(model.train(), dtype, frozen_only=True)
    torch.manual_seed(cfg["seed"])
    x, y = torch.randint(0, base.config.vocab_size, (2, cfg["batch"], cfg["seq"]))
    return model, train.make_optimizer(model, defaults(train.OPTIONS), "cpu"), x, y


def train_step(model, optimizer, x, y, dtype):
    """One step as train.py takes it (no gradient accumulation)."""
    with autocast("cpu", dtype):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.OPTIONS["grad_clip"][0])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_flops(model, optimizer, x, y, dtype):
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, x, y, dtype)
    return counter.get_total_flops()


def bench_training(base, cfg, peaks):
    """Per method and dtype: the median time of a training step, its FLOPs and its trainable weights."""
    models = {(m, d): build_trainer(m, base, cfg, getattr(torch, d)) for d in cfg["dtypes"] for m in METHODS}
    flops = {key: count_flops(*setup, getattr(torch, key[1])) for key, setup in models.items()}  # also the warm-up
    step = interleaved({(m, d): ("float32", partial(train_step, *setup, getattr(torch, d)))  # its own autocast
                        for (m, d), setup in models.items()}, cfg["train_reps"])
    rows = []
    for (m, d), (model, _, x, _) in models.items():
        s, gflops = step[m, d], flops[m, d] / step[m, d] / 1e9
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        fp32 = step.get((m, "float32"))
        rows.append(dict(method=m, dtype=d, trainable_params=trainable, step_s=s, tokens_per_s=x.numel() / s,
                         vs_full=s / step["full", d], vs_fp32=fp32 and s / fp32, flops_per_step=flops[m, d],
                         gflop_per_step=flops[m, d] / 1e9, gflops=gflops, of_peak=gflops / peaks[d]))
    return rows


def measure_memory(cfg, method, dtype="float32"):
    """Run this script again as memory_worker for (method, dtype): its memory in MB."""
    args = [f"--{k}={v!r}" for k, v in cfg.items() if k != "_memory_worker" and not isinstance(v, list)]
    run = subprocess.run([sys.executable, "-m", "harness.bench", *args, f"--_memory_worker={method}:{dtype}"],
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                         text=True)
    if run.returncode:
        raise RuntimeError(f"memory worker for {method} in {dtype} failed: {run.stderr.strip()[-500:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def rss(field):
    """VmRSS (now) or VmHWM (peak) of this process in MB. Not ru_maxrss: after fork + exec that also counts
    the parent's peak, and a reset of the peak (clear_refs) does not reach it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def memory_worker(cfg):
    """Build one method's trainer, then print as JSON its memory (MB) before and at the peak of a few steps."""
    method, dtype = cfg["_memory_worker"].split(":")
    setup = build_trainer(method, base_model(cfg), cfg, getattr(torch, dtype))
    gc.collect()  # the float32 base, when cast away
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS, or RSS would still count it
    with open("/proc/self/clear_refs", "w") as f:  # forget the peak of loading the weights, not of training
        f.write("5")
    before = rss("VmRSS")
    for _ in range(cfg["mem_steps"]):
        train_step(*setup, getattr(torch, dtype))
    peak = rss("VmHWM")
    print(json.dumps(dict(before_mb=before, peak_mb=peak, increase_mb=peak - before)))


def table(title, rows, keys):
    """Print the rows' (dicts') space-separated `keys` as an aligned table, each number to about 3 digits."""
    def cell(v):
        return "-" if v is None else v if isinstance(v, str) else f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    cells = [keys.split()] + [[cell(row[k]) for k in keys.split()] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    print(f"\n{title}")
    for line in cells[:1] + [["-" * w for w in widths]] + cells[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))


def main(argv=None):
    cfg = check(configure(OPTIONS, argv))
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["_memory_worker"]:
        return memory_worker(cfg)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?") if os.path.exists("/proc/cpuinfo") else "?"
    info = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu, cpu_count=os.cpu_count(),
                cpu_bf16=cpu_bf16_support(), load_avg=os.getloadavg()[0])
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpu_count']} CPUs ({cpu}; bf16 matmul "
          f"instructions: {info['cpu_bf16']}), load average {info['load_avg']:.2f}")
    if "bfloat16" in cfg["dtypes"] and info["cpu_bf16"] == "none":
        print("warning: this CPU has no bf16 matmul instructions: the bfloat16 rows are emulated and take tens of "
              "times longer than the float32 ones; --dtypes float32 leaves them out")
    base = base_model(cfg).eval()
    longest = cfg["prompt_len"] + max([cfg["new_tokens"]] + (cfg["answer_lens"] if "ar2diff" in cfg["what"] else []))
    if longest > base.config.block_size or cfg["seq"] > base.config.block_size:
        raise UsageError(f"--prompt_len + --new_tokens (or --answer_lens) and --seq must fit the model's "
                         f"{base.config.block_size} positions")
    peaks = {d: matmul_peak(cfg["matmul_n"], getattr(torch, d)) for d in cfg["dtypes"]}
    weights = {d: sum(p.numel() * p.element_size() for p in frozen_base(base, getattr(torch, d)).parameters()) / 2**20
               for d in cfg["dtypes"]}
    print(f"{cfg['init_from']}: {base.num_params() / 1e6:.1f}M parameters; " + ", ".join(
        f"{d}: weights {weights[d]:.0f} MB, matmul {peaks[d]:.1f} GFLOP/s" for d in cfg["dtypes"]))
    results = dict(config=cfg, machine=info, matmul_gflops=peaks, weights_mb=weights)
    if "gen" in cfg["what"]:
        results["generation"] = gen = bench_generation(base, cfg)
        table(f"One decoding step (median of {cfg['eval_reps']}; prompt {cfg['prompt_len']} tokens); ratio: path "
              "over base", gen["decode_step"], "batch dtype base_step_ms path_eval_ms ratio merged_path_eval_ms "
              "merged_ratio path_vs_fp32 merged_vs_fp32")
        table(f"Generation, midpoint: time per new token (median of {cfg['new_tokens']})", gen["steps"],
              "batch dtype steps nfe_per_token ms_per_token tokens_per_s vs_fp32 vs_steps1")
    if "ar2diff" in cfg["what"]:
        results["ar2diff"] = rows = bench_ar2diff(base, cfg)
        table(f"Writing an answer of L tokens, batch 1 (prompt {cfg['prompt_len']} tokens): AR decoding against "
              f"AR2Diff, {cfg['ar2diff_steps']} steps", rows,
              "answer_len candidates passes ar_s ar2diff_s ar_tokens_per_s ar2diff_tokens_per_s speedup")
    if "train" in cfg["what"]:
        results["training"] = rows = bench_training(base, cfg, peaks)
        gc.collect()
        for row in rows:
            row.update(measure_memory(cfg, row["method"], row["dtype"]))
        table(f"Training step, batch {cfg['batch']} x {cfg['seq']} tokens (median of {cfg['train_reps']}); of_peak: "
              "of the matmul's GFLOP/s; peak_mb: the peak RSS", rows, "method dtype trainable_params step_s "
              "tokens_per_s vs_full vs_fp32 gflop_per_step gflops of_peak peak_mb increase_mb")
    info["load_avg_end"] = os.getloadavg()[0]
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
