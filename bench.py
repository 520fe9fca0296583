"""
Speed and memory of L2D next to its base model and the two finetuning baselines (docs/method.md, sec. 4-5).

    python bench.py                                         # SmolLM2-135M, generation and training
    python bench.py --what gen --batch_sizes 1 --steps 1,8 --new_tokens 8
    python bench.py --what train --batch 4 --seq 128 --train_reps 3
    python bench.py --what train --data data/gsm8k/smollm2-135m --batch 8 --seq 512   # a real GSM8K batch
    python bench.py --init_from scratch --new_tokens 2 --eval_reps 2 --train_reps 1     # smoke test, seconds
    python bench.py --threads 1 --new_tokens 4 --eval_reps 20 --batch 4 --seq 128 --train_reps 3  # README, ~6 min
    python bench.py --what ar2diff --threads 1 --answer_lens 16,64,256,1024        # AR2Diff against AR decoding

Generation (greedy, --solver midpoint): the diffusion path around the frozen base, its zero-initialised
heads (merge gate, modulation, LoRA B) set to small random values so that nothing is trivially zero
(compute does not depend on the values anyway), its LoRA then merged into its weights as sample.py and
eval.py do. A random prompt of --prompt_len tokens, repeated over the batch; per generated token: the
ODE plus one base step (steps=1: the base alone, NFE 0). One decoding per step count, advanced one token
at a time round-robin; the median over the --new_tokens tokens is reported (the prefill is not timed).
  decode step: one base decoding step (trunk on one token + head) and one path evaluation (predict at
               the last position, its (t, label) conditioning cached as generation does) on the same
               cache, interleaved; path/base is the cost of one NFE; "merged" is the path evaluation with
               its LoRA folded into its weights (lora.merge_lora), as sample.py and eval.py generate.
Training: forward + backward + clip + AdamW as train.py does it, on one random batch, for the L2D path
(variants lora and full, sharing one frozen base), LoRA on the base and the full base (own copies),
timed round-robin. FLOPs per step come from FlopCounterMode (matmuls and attention, the latter dense,
not halved for causality); achieved GFLOP/s is compared to a large float32 matmul on this machine.
AR2Diff (--what ar2diff): the seconds to write an answer of L tokens after the random prompt, batch 1, the
same model: AR decoding (greedy, KV cache, L steps of one token) against AR2Diff (--ar2diff_steps passes
over the whole L-token span, for each of --ar2diff_samples K candidates, + 1 scoring pass when K > 1),
interleaved, the median of --ar2diff_reps; speed-up = AR's time / AR2Diff's. (The weights do not matter
for speed: they are the base's, not a trained AR2Diff's.)
Peak memory: each method in a fresh subprocess (peak RSS over the RSS before the first step on CPU,
torch.cuda.max_memory_allocated on CUDA). Timings on a shared machine are noisy: read the ratios; on
an oversubscribed CPU, --threads 1 avoids the stalls of multi-threaded kernels waiting for each other.
"""

import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

import train
from ar2diff import AR2Diff, AR2DiffConfig
from checkpoint import load_base
from configurator import UsageError, configure, fail, resolve_device
from diffusion import L2D, L2DConfig
from lora import add_lora, merge_lora
from model import GPT, GPTConfig, KVCache
from solvers import SOLVERS

DEFAULTS = dict(
    init_from="smollm2-135m",  # the base: a model name, a HF folder, an ar/full ckpt.pt, or scratch (shape below)
    what="gen,train",          # gen, train, ar2diff, or several (gen,train)
    device="cpu",              # cpu, cuda, cuda:1, ...
    dtype="auto",              # training's autocast: auto (cuda: bfloat16, cpu: float32), float32, bfloat16 or float16
    threads=0,                 # torch's CPU threads; 0: torch's default
    out="bench.json",          # the results as JSON; "": none
    seed=1337,                 # of the random weights, prompt and batch
    # generation
    steps=None,                # step counts to decode with, one value or a list (1,8); None: 1,2,4,8,16,32
    batch_sizes=None,          # batch sizes to decode at; None: 1,16
    prompt_len=64,             # tokens of the random prompt (its prefill is not timed)
    new_tokens=32,             # tokens decoded per step count (the median time per token is reported)
    eval_reps=30,              # timed single decoding steps, base and path interleaved (the median is reported)
    solver="midpoint",         # a fixed-step solver: euler, midpoint or rk4
    # AR2Diff against AR decoding (--what ar2diff)
    answer_lens=None,          # answer lengths L to write; None: 16,64,256,1024
    ar2diff_steps=10,          # AR2Diff's refinement steps (the paper: 10)
    ar2diff_samples=None,      # AR2Diff's candidates K; None: 1,8
    ar2diff_reps=1,            # timed answers per length and decoder (the median is reported)
    # training
    methods=None,              # which to time, one or a list; None: l2d-lora,l2d-full,lora,full
    batch=8,                   # examples per training step
    seq=256,                   # tokens per example
    train_reps=5,              # timed steps per method (the median is reported)
    mem_steps=2,               # training steps of each method's memory measurement (in a fresh process)
    matmul_n=2048,             # size of the square float32 matmul that measures this machine's GFLOP/s
    data="",                   # a prepared folder (e.g. data/gsm8k/smollm2-135m): its first batch, not random tokens
    lora_rank=32,              # rank of the LoRA adapters (lora, and the l2d-lora path)
    lora_alpha=32.0,           # LoRA scale: the update is multiplied by lora_alpha / lora_rank
    flow_dim=256,              # width d_f of the diffused token space
    # --init_from scratch: a random GPT of this shape
    family="llama",            # llama (RMSNorm, RoPE, SwiGLU) or gpt2 (LayerNorm, learned positions, GELU)
    n_layer=2,                 # transformer blocks
    n_head=4,                  # attention heads (must divide n_embd)
    n_kv_head=0,               # key/value heads of grouped-query attention; 0: n_head
    n_embd=64,                 # hidden width
    vocab_size=256,            # tokens in the vocabulary
    block_size=1024,           # positions, at least prompt_len + new_tokens and seq
    _memory_worker="",         # internal: measure one method's training memory and print it as JSON
)
LIST_DEFAULTS = dict(steps=[1, 2, 4, 8, 16, 32], batch_sizes=[1, 16], methods=["l2d-lora", "l2d-full", "lora", "full"],
                     answer_lens=[16, 64, 256, 1024], ar2diff_samples=[1, 8])
METHODS = LIST_DEFAULTS["methods"]

# torch counts attention on CUDA but not its CPU kernel: count that the same way (dense q k^T and p v).
aten = torch.ops.aten
if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)(
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v))


def as_list(cfg, key, kind):
    value = cfg[key]
    if value is None:
        return list(LIST_DEFAULTS[key])
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        return [kind(str(item).strip()) for item in items]  # int('1.5') fails where int(1.5) would not
    except ValueError:
        raise UsageError(f"--{key} must be one value or a comma-separated list, got {value!r}") from None


def check(cfg):
    cfg["what"] = as_list(cfg, "what", str) if cfg["what"] else []
    for key, kind in (("steps", int), ("batch_sizes", int), ("methods", str), ("answer_lens", int), ("ar2diff_samples", int)):
        cfg[key] = as_list(cfg, key, kind)
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
    return cfg


def timed(fn, device):
    """(seconds that fn() takes, waiting for the GPU on CUDA; what it returns)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def machine(device):
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    return dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu, cpu_count=os.cpu_count(),
                load_avg=os.getloadavg()[0], device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")


def matmul_peak(n, device, reps=5):
    """GFLOP/s of a float32 (n x n) @ (n x n) matmul: the best of `reps`, this machine's ceiling."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    return 2 * n**3 / min(timed(lambda: torch.mm(a, b), device)[0] for _ in range(reps)) / 1e9


def load_model(cfg):
    if cfg["init_from"] != "scratch":
        return load_base(cfg["init_from"])[0].to(cfg["device"])
    torch.manual_seed(cfg["seed"])
    return GPT(GPTConfig(family=cfg["family"], block_size=cfg["block_size"], vocab_size=cfg["vocab_size"],
                         n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_kv_head=cfg["n_kv_head"],
                         n_embd=cfg["n_embd"])).to(cfg["device"])


def l2d_config(cfg, variant):
    return L2DConfig(variant=variant, flow_dim=cfg["flow_dim"], lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"])


# --- generation --------------------------------------------------------------------------------------
def decode_step_costs(l2d, merged, h, cache, token, reps, device):
    """Median seconds of one base decoding step (on `token`), one path evaluation (at the last position)
    and one of the path with its LoRA merged (lora.merge_lora, as sample.py and eval.py run it), on the
    same prefilled cache whose last hidden states are h, interleaved."""
    base, B = l2d.base, h.size(0)
    x_t = l2d.config.sigma * torch.randn(B, 1, l2d.config.flow_dim, device=device)
    t = torch.full((B, 1), 0.5, device=device)
    conditioning = l2d.conditioning(t[:1])  # as in generation: computed once per grid time, reused by every token
    times = [], [], []
    for rep in range(reps + 2):  # the first two are warm-up
        step_cache = cache.fork()  # the base step appends a position; the path eval adds none
        base_s, _ = timed(lambda: base.head(base.trunk(token[:, None], step_cache)[0][:, -1]), device)
        path_s, _ = timed(lambda: l2d.predict(h[:, -1:], cache, x_t, t, conditioning=conditioning), device)
        merged_s, _ = timed(lambda: merged.predict(h[:, -1:], cache, x_t, t, conditioning=conditioning), device)
        if rep >= 2:
            for kept, seconds in zip(times, (base_s, path_s, merged_s)):
                kept.append(seconds)
    return tuple(statistics.median(kept) for kept in times)


def decoder(l2d, h, cache, steps, solver, device):
    """Greedy decoding as L2D.generate does it, from a prefilled cache, one token per next(): yields
    (seconds of the token's ODE and base step, its mean NFE)."""
    cache = cache.fork()
    while True:
        ode_s, (token, nfe) = timed(lambda: l2d.next_token(h[:, -1:], cache, steps=steps, solver=solver), device)
        base_s, (h, _) = timed(lambda: l2d.base.trunk(token[:, None], cache), device)
        yield ode_s + base_s, nfe.float().mean().item()


def bench_generation(base, cfg):
    device = cfg["device"]
    torch.manual_seed(cfg["seed"])
    l2d = L2D(base, l2d_config(cfg, "lora")).to(device).eval()
    with torch.no_grad():
        for p in l2d.trainable_parameters():
            if not p.any():  # zero-initialised heads
                p.normal_(0, 0.02)
    merged = merge_lora(copy.deepcopy(l2d))  # its own copy of the base too: l2d keeps its LoRA factors
    prompt = torch.randint(0, base.config.vocab_size, (1, cfg["prompt_len"]), device=device)
    steps_rows, costs = [], []
    with torch.inference_mode():
        for B in cfg["batch_sizes"]:
            batch = prompt.expand(B, -1).contiguous()
            cache = KVCache()
            h, _ = base.trunk(batch, cache)  # one prefill, shared by every decoding below
            base_s, path_s, merged_s = decode_step_costs(l2d, merged, h, cache, batch[:, -1], cfg["eval_reps"], device)
            costs.append(dict(batch=B, base_step_ms=1e3 * base_s, path_eval_ms=1e3 * path_s, ratio=path_s / base_s,
                              merged_path_eval_ms=1e3 * merged_s, merged_ratio=merged_s / base_s))
            decoders = {s: decoder(merged, h, cache, s, cfg["solver"], device) for s in cfg["steps"]}  # as sample.py
            times, nfe = {s: [] for s in cfg["steps"]}, {}
            for _ in range(cfg["new_tokens"]):  # round-robin: one token of each step count in turn
                for s in cfg["steps"]:
                    seconds, nfe[s] = next(decoders[s])
                    times[s].append(seconds)
            one = statistics.median(times[1]) if 1 in times else None
            for s in cfg["steps"]:
                per_token = statistics.median(times[s])
                steps_rows.append(dict(batch=B, steps=s, nfe_per_token=nfe[s], ms_per_token=1e3 * per_token,
                                       tokens_per_s=B / per_token, vs_steps1=one and per_token / one,
                                       predicted_vs_steps1=1 + nfe[s] * costs[-1]["merged_ratio"]))
    return dict(decode_step=costs, steps=steps_rows)


# --- AR2Diff against AR decoding ---------------------------------------------------------------------
def bench_ar2diff(base, cfg):
    """Seconds to write an L-token answer, AR decoding against AR2Diff, per L and K (see the docstring)."""
    device, steps = cfg["device"], cfg["ar2diff_steps"]
    torch.manual_seed(cfg["seed"])
    prompt = torch.randint(0, base.config.vocab_size, (1, cfg["prompt_len"]), device=device)

    def writers(L):  # each decoder of an L-token answer, by name: "ar", or AR2Diff's K
        model = AR2Diff(base, AR2DiffConfig(answer_len=L, vocab_size=base.config.vocab_size)).eval()
        named = {"ar": lambda: sum(1 for _ in base.generate(prompt, L, temperature=0))}
        return named | {K: lambda K=K: model.generate(prompt, steps=steps, samples=K) for K in cfg["ar2diff_samples"]}

    rows = []
    with torch.inference_mode():
        for write in writers(min(cfg["answer_lens"])).values():  # warm-up
            write()
        for L in cfg["answer_lens"]:
            times = {name: [] for name in writers(L)}
            for _ in range(cfg["ar2diff_reps"]):
                for name, write in writers(L).items():  # interleaved
                    times[name].append(timed(write, device)[0])
            ar_s = statistics.median(times["ar"])
            for K in cfg["ar2diff_samples"]:
                s = statistics.median(times[K])
                rows.append(dict(answer_len=L, samples=K, steps=steps, passes=steps + (K > 1), ar_s=ar_s, ar2diff_s=s,
                                 ar_tokens_per_s=L / ar_s, ar2diff_tokens_per_s=L / s, speedup=ar_s / s))
    return rows


# --- training ----------------------------------------------------------------------------------------
def build_trainer(method, base, cfg):
    """(model, optimizer) of a training method. The l2d variants wrap `base` without changing it; lora
    and full get their own copy (LoRA wraps in place, full trains every weight)."""
    if method.startswith("l2d"):
        model = L2D(base, l2d_config(cfg, method.split("-")[1]))
    elif method == "lora":
        model = add_lora(copy.deepcopy(base), cfg["lora_rank"], cfg["lora_alpha"])
    else:
        model = copy.deepcopy(base).requires_grad_(True)
    model = model.to(cfg["device"]).train()
    return model, train.make_optimizer(model, train.DEFAULTS, cfg["device"])


def train_step(model, optimizer, x, y, autocast):
    """One step as train.py takes it (no gradient accumulation)."""
    with autocast:
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.DEFAULTS["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_setup(cfg, vocab_size):
    torch.manual_seed(cfg["seed"])
    if cfg["data"]:  # a real batch: the first --batch examples, targets on answer tokens only
        from dataset import TokenDataset
        x, y, _ = TokenDataset(cfg["data"], "train").get_batch(range(cfg["batch"]), cfg["seq"])
        x, y = x.to(cfg["device"]), y.to(cfg["device"])
    else:  # a random batch with a target at every position: the worst case for l2d
        x, y = (torch.randint(0, vocab_size, (cfg["batch"], cfg["seq"]), device=cfg["device"]) for _ in range(2))
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else ("bfloat16" if cfg["device"].startswith("cuda") else "float32")
    autocast = nullcontext() if dtype == "float32" else torch.autocast(cfg["device"].split(":")[0], getattr(torch, dtype))
    return x, y, autocast


def count_flops(model, optimizer, x, y, autocast):
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, x, y, autocast)
    return counter.get_total_flops()


def bench_training(base, cfg, peak_gflops):
    device, methods = cfg["device"], cfg["methods"]
    x, y, autocast = training_setup(cfg, base.config.vocab_size)
    models = {m: build_trainer(m, base, cfg) for m in methods}
    flops = {m: count_flops(*models[m], x, y, autocast) for m in methods}  # also the warm-up step
    times = {m: [] for m in methods}
    for _ in range(cfg["train_reps"]):  # round-robin over the methods
        for m in methods:
            times[m].append(timed(lambda: train_step(*models[m], x, y, autocast), device)[0])
    rows = []
    for m in methods:
        step = statistics.median(times[m])
        trainable = sum(p.numel() for p in models[m][0].parameters() if p.requires_grad)
        rows.append(dict(method=m, trainable_params=trainable, step_s=step, tokens_per_s=x.numel() / step,
                         vs_full=step / statistics.median(times["full"]) if "full" in times else None,
                         flops_per_step=flops[m], gflop_per_step=flops[m] / 1e9, gflops=flops[m] / step / 1e9,
                         of_peak=flops[m] / step / 1e9 / peak_gflops))
    return rows


def rss(field):
    """VmRSS (now) or VmHWM (peak) of this process in bytes. Not ru_maxrss: after fork + exec that
    also counts the parent's peak, and a reset of the peak (clear_refs) does not reach it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_worker(cfg):
    """Build one method's model, then its peak memory over a few training steps (bytes, as JSON)."""
    base = load_model(cfg)
    model, optimizer = build_trainer(cfg["_memory_worker"], base, cfg)
    x, y, autocast = training_setup(cfg, base.config.vocab_size)
    del base
    gc.collect()
    cuda, reset = cfg["device"].startswith("cuda"), False
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # forget the peak of loading the weights (Linux >= 4.0); else it may hide the training peak
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            pass
        before = rss("VmRSS")
    for _ in range(cfg["mem_steps"]):
        train_step(model, optimizer, x, y, autocast)
    peak = torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")
    print(json.dumps(dict(before=before, peak=peak, peak_reset=reset or cuda)))


def measure_memory(cfg, method):
    args = [f"--{k}={v!r}" for k, v in cfg.items() if k not in ("_memory_worker", "what")]
    run = subprocess.run([sys.executable, os.path.abspath(__file__), *args, f"--_memory_worker={method}"],
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"memory worker for {method} failed: {run.stderr.strip()[-500:]}")
    m = json.loads(run.stdout.strip().splitlines()[-1])
    mb = 2**20
    return dict(method=method, before_mb=m["before"] / mb, peak_mb=m["peak"] / mb,
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
    cfg = check(configure(DEFAULTS, argv))
    cfg["device"] = resolve_device(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["_memory_worker"]:
        return memory_worker(cfg)
    info = machine(cfg["device"])
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpu_count']} CPUs ({info['cpu']}), "
          f"load average {info['load_avg']:.2f}, device {info['device']}")
    base = load_model(cfg).eval()
    longest = cfg["prompt_len"] + max([cfg["new_tokens"]] + (cfg["answer_lens"] if "ar2diff" in cfg["what"] else []))
    if longest > base.config.block_size or cfg["seq"] > base.config.block_size:
        raise UsageError(f"--prompt_len + --new_tokens (or --answer_lens) and --seq must fit the model's "
                         f"{base.config.block_size} positions")
    peak = matmul_peak(cfg["matmul_n"], cfg["device"])
    print(f"{cfg['init_from']}: {base.num_params() / 1e6:.1f}M parameters; float32 matmul "
          f"{cfg['matmul_n']}x{cfg['matmul_n']}: {peak:.1f} GFLOP/s")
    results = dict(config=cfg, machine=info, matmul_gflops=peak)
    if "gen" in cfg["what"]:
        results["generation"] = gen = bench_generation(base, cfg)
        table(f"One decoding step (median of {cfg['eval_reps']}, interleaved; prompt {cfg['prompt_len']} tokens)",
              gen["decode_step"], [("batch", "batch", "{}"), ("base step ms", "base_step_ms", "{:.2f}"),
                                   ("path eval ms", "path_eval_ms", "{:.2f}"), ("path/base", "ratio", "{:.2f}"),
                                   ("merged ms", "merged_path_eval_ms", "{:.2f}"), ("merged/base", "merged_ratio", "{:.2f}")])
        table(f"Generation, {cfg['solver']}: time per new token (median of {cfg['new_tokens']}, interleaved)",
              gen["steps"], [("batch", "batch", "{}"), ("steps", "steps", "{}"), ("NFE/tok", "nfe_per_token", "{:.0f}"),
                             ("ms/tok", "ms_per_token", "{:.1f}"), ("tok/s", "tokens_per_s", "{:.2f}"),
                             ("x steps=1", "vs_steps1", "{:.2f}"), ("1+NFE*merged/base", "predicted_vs_steps1", "{:.2f}")])
    if "ar2diff" in cfg["what"]:
        results["ar2diff"] = rows = bench_ar2diff(base, cfg)
        table(f"Writing an answer of L tokens, batch 1 (prompt {cfg['prompt_len']} tokens; median of {cfg['ar2diff_reps']}, "
              f"interleaved): AR decoding against AR2Diff, {cfg['ar2diff_steps']} steps", rows,
              [("L", "answer_len", "{}"), ("K", "samples", "{}"), ("passes", "passes", "{}"), ("AR s", "ar_s", "{:.3f}"),
               ("AR2Diff s", "ar2diff_s", "{:.3f}"), ("AR tok/s", "ar_tokens_per_s", "{:.1f}"),
               ("AR2Diff tok/s", "ar2diff_tokens_per_s", "{:.1f}"), ("speed-up", "speedup", "{:.2f}")])
    if "train" in cfg["what"]:
        rows = bench_training(base, cfg, peak)
        gc.collect()
        memory = {m["method"]: m for m in (measure_memory(cfg, method) for method in cfg["methods"])}
        for row in rows:
            row.update({k: v for k, v in memory[row["method"]].items() if k != "method"})
        results["training"] = rows
        kind = "allocated" if cfg["device"].startswith("cuda") else "RSS"
        table(f"Training step, batch {cfg['batch']} x {cfg['seq']} tokens (median of {cfg['train_reps']}, interleaved)",
              rows, [("method", "method", "{}"), ("trainable", "trainable_params", "{:,}"), ("step s", "step_s", "{:.3f}"),
                     ("tok/s", "tokens_per_s", "{:.0f}"), ("x full", "vs_full", "{:.2f}"),
                     ("GFLOP/step", "gflop_per_step", "{:.1f}"), ("GFLOP/s", "gflops", "{:.1f}"),
                     ("of matmul", "of_peak", "{:.0%}"), (f"peak {kind} MB", "peak_mb", "{:.0f}"),
                     ("+MB over start", "increase_mb", "{:.0f}")])
    results["machine"]["load_avg_end"] = os.getloadavg()[0]
    if cfg["out"]:
        with open(cfg["out"], "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {cfg['out']}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
