"""
Speed and memory of L2D next to its base model and the two finetuning baselines (docs/method.md, sec. 4-5).

    python bench.py                                         # SmolLM2-135M, generation and training
    python bench.py --what gen --batch_sizes 1 --steps 1,8 --new_tokens 8
    python bench.py --what train --batch 4 --seq 128 --train_reps 3
    python bench.py --what train --data data/gsm8k/smollm2-135m --batch 8 --seq 512   # a real GSM8K batch
    python bench.py --init_from scratch --new_tokens 2 --eval_reps 2 --train_reps 1     # smoke test, seconds
    python bench.py --threads 1 --new_tokens 4 --eval_reps 20 --batch 4 --seq 128 --train_reps 3  # README, ~6 min
    python bench.py --what ar2diff --threads 1 --answer_lens 16,64,256,1024        # AR2Diff against AR decoding
    python bench.py --dtypes float32                                                # without the bf16 rows

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

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

import train
from ar2diff import AR2Diff, AR2DiffConfig
from checkpoint import load_base
from configurator import UsageError, configure, fail, parse_list, resolve_device
from diffusion import L2D, L2DConfig
from lora import add_lora, merge_lora
from model import GPT, GPTConfig, KVCache
from precision import DTYPES, autocast, cpu_bf16_support, store_weights
from solvers import SOLVERS

DEFAULTS = dict(
    init_from="smollm2-135m",  # the base: a model name, a HF folder, an ar/full ckpt.pt, or scratch (shape below)
    what="gen,train",          # gen, train, ar2diff, or several (gen,train)
    device="cpu",              # cpu, cuda, cuda:1, ...
    dtypes=None,               # number formats to compare side by side (precision.py), one or a list; None: float32,bfloat16
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
                     answer_lens=[16, 64, 256, 1024], ar2diff_samples=[1, 8], dtypes=["float32", "bfloat16"])
METHODS = LIST_DEFAULTS["methods"]

# torch counts attention on CUDA but not its CPU kernel: count that the same way (dense q k^T and p v).
aten = torch.ops.aten
if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)(
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v))


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
    return cfg


def torch_dtype(name):
    """The torch dtype a --dtypes name (precision.DTYPES but auto) stands for: torch_dtype("bfloat16")."""
    return getattr(torch, name)


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
                cpu_bf16=cpu_bf16_support(), load_avg=os.getloadavg()[0],
                device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu")


def matmul_peak(n, device, dtype, reps=5):
    """GFLOP/s of an (m x m) @ (m x m) matmul in dtype, the best of `reps`: this machine's ceiling. m doubles
    from 256 up to n while one product takes under 0.2 s (an emulated bf16 product of 2048 takes a minute)."""
    m = min(256, n)
    while True:
        a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
        seconds = timed(lambda: torch.mm(a, b), device)[0]
        if 2 * m > n or seconds > 0.2:
            break
        m *= 2
    return 2 * m**3 / min(timed(lambda: torch.mm(a, b), device)[0] for _ in range(reps)) / 1e9


def weight_mb(model):
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


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
def generation_models(base, cfg):
    """{dtype: (L2D, L2D with its LoRA merged)}: one random path around the base (its zero-initialised heads
    set to small random values, so that nothing is trivially zero), copied into each dtype with its own base,
    every weight stored in it as sample.py and eval.py store them."""
    torch.manual_seed(cfg["seed"])
    l2d = L2D(base, l2d_config(cfg, "lora")).to(cfg["device"]).eval()
    with torch.no_grad():
        for p in l2d.trainable_parameters():
            if not p.any():  # zero-initialised heads
                p.normal_(0, 0.02)
    stored = lambda model, dtype: store_weights(model, torch_dtype(dtype))
    return {dtype: (stored(copy.deepcopy(l2d), dtype), stored(merge_lora(copy.deepcopy(l2d)), dtype))
            for dtype in cfg["dtypes"]}


def decode_step_costs(models, prefills, token, reps, device):
    """{dtype: median seconds of (one base decoding step on `token`, one path evaluation at the last
    position, the same with the LoRA merged)}, each dtype on its own prefilled cache (h, cache), all
    interleaved: the path's (t, label) conditioning is computed once, as generation does per grid time."""
    inputs = {}
    for dtype, (l2d, _) in models.items():
        B = token.size(0)
        t = torch.full((B, 1), 0.5, device=device)
        with autocast(device, torch_dtype(dtype)):
            inputs[dtype] = (l2d.config.sigma * torch.randn(B, 1, l2d.config.flow_dim, device=device), t,
                             l2d.conditioning(t[:1]))
    times = {dtype: ([], [], []) for dtype in models}
    for rep in range(reps + 2):  # the first two are warm-up
        for dtype, (l2d, merged) in models.items():
            (h, cache), (x_t, t, conditioning) = prefills[dtype], inputs[dtype]
            step_cache = cache.fork()  # the base step appends a position; the path eval adds none
            with autocast(device, torch_dtype(dtype)):
                base_s, _ = timed(lambda: l2d.base.head(l2d.base.trunk(token[:, None], step_cache)[0][:, -1]), device)
                path_s, _ = timed(lambda: l2d.predict(h[:, -1:], cache, x_t, t, conditioning), device)
                merged_s, _ = timed(lambda: merged.predict(h[:, -1:], cache, x_t, t, conditioning), device)
            if rep >= 2:
                for kept, seconds in zip(times[dtype], (base_s, path_s, merged_s)):
                    kept.append(seconds)
    return {dtype: tuple(statistics.median(kept) for kept in kept3) for dtype, kept3 in times.items()}


def decoder(l2d, h, cache, steps, solver, device):
    """Greedy decoding as L2D.generate does it, from a prefilled cache, one token per next(): yields
    (seconds of the token's ODE and base step, its mean NFE)."""
    cache = cache.fork()
    while True:
        ode_s, (token, nfe) = timed(lambda: l2d.next_token(h[:, -1:], cache, steps=steps, solver=solver), device)
        base_s, (h, _) = timed(lambda: l2d.base.trunk(token[:, None], cache), device)
        yield ode_s + base_s, nfe.float().mean().item()


def bench_generation(base, cfg):
    device, dtypes = cfg["device"], cfg["dtypes"]
    models = generation_models(base, cfg)
    prompt = torch.randint(0, base.config.vocab_size, (1, cfg["prompt_len"]), device=device)
    steps_rows, costs = [], []
    with torch.inference_mode():
        for B in cfg["batch_sizes"]:
            batch = prompt.expand(B, -1).contiguous()
            prefills = {}
            for dtype, (l2d, _) in models.items():  # one prefill per dtype, shared by every decoding below
                with autocast(device, torch_dtype(dtype)):
                    cache = KVCache()
                    prefills[dtype] = l2d.base.trunk(batch, cache)[0], cache
            step_costs = decode_step_costs(models, prefills, batch[:, -1], cfg["eval_reps"], device)
            fp32_path = step_costs.get("float32", (None, None))[1]
            for dtype, (base_s, path_s, merged_s) in step_costs.items():
                costs.append(dict(batch=B, dtype=dtype, base_step_ms=1e3 * base_s, path_eval_ms=1e3 * path_s,
                                  ratio=path_s / base_s, merged_path_eval_ms=1e3 * merged_s, merged_ratio=merged_s / base_s,
                                  path_vs_fp32=fp32_path and path_s / fp32_path,
                                  merged_vs_fp32=fp32_path and merged_s / fp32_path))
            decoders = {(d, s): decoder(models[d][1], *prefills[d], s, cfg["solver"], device)  # merged, as sample.py
                        for d in dtypes for s in cfg["steps"]}
            times, nfe = {key: [] for key in decoders}, {}
            for _ in range(cfg["new_tokens"]):  # round-robin: one token of each (dtype, step count) in turn
                for (d, s), tokens in decoders.items():
                    with autocast(device, torch_dtype(d)):
                        seconds, nfe[d, s] = next(tokens)
                    times[d, s].append(seconds)
            for d in dtypes:
                one = statistics.median(times[d, 1]) if 1 in cfg["steps"] else None
                merged_ratio = next(c["merged_ratio"] for c in costs if c["batch"] == B and c["dtype"] == d)
                for s in cfg["steps"]:
                    per_token = statistics.median(times[d, s])
                    fp32 = statistics.median(times["float32", s]) if "float32" in dtypes else None
                    steps_rows.append(dict(batch=B, dtype=d, steps=s, nfe_per_token=nfe[d, s], ms_per_token=1e3 * per_token,
                                           tokens_per_s=B / per_token, vs_fp32=fp32 and per_token / fp32,
                                           vs_steps1=one and per_token / one,
                                           predicted_vs_steps1=1 + nfe[d, s] * merged_ratio))
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
def frozen_base(base, dtype):
    """The base as the l2d variants train around it, frozen and stored in dtype (its own copy unless float32)."""
    return base if dtype == torch.float32 else store_weights(copy.deepcopy(base), dtype)


def build_trainer(method, base, cfg, dtype=torch.float32):
    """(model, optimizer) of a training method, its frozen weights stored in dtype as train.py stores them.
    The l2d variants wrap `base` without changing it (pass frozen_base(base, dtype)); lora and full get their
    own copy of the float32 `base` (LoRA wraps in place; full trains every weight, float32 masters)."""
    if method.startswith("l2d"):
        model = L2D(base, l2d_config(cfg, method.split("-")[1]))
    elif method == "lora":
        model = add_lora(copy.deepcopy(base), cfg["lora_rank"], cfg["lora_alpha"])
    else:
        model = copy.deepcopy(base).requires_grad_(True)
    model = store_weights(model.to(cfg["device"]).train(), dtype, frozen_only=True)
    return model, train.make_optimizer(model, train.DEFAULTS, cfg["device"])


def train_step(model, optimizer, x, y, mixed):
    """One step as train.py takes it (no gradient accumulation), in the autocast context `mixed`."""
    with mixed:
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.DEFAULTS["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_batch(cfg, vocab_size):
    torch.manual_seed(cfg["seed"])
    if cfg["data"]:  # a real batch: the first --batch examples, targets on answer tokens only
        from dataset import TokenDataset
        x, y, _ = TokenDataset(cfg["data"], "train").get_batch(range(cfg["batch"]), cfg["seq"])
        return x.to(cfg["device"]), y.to(cfg["device"])
    # a random batch with a target at every position: the worst case for l2d
    return tuple(torch.randint(0, vocab_size, (cfg["batch"], cfg["seq"]), device=cfg["device"]) for _ in range(2))


def count_flops(model, optimizer, x, y, mixed):
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, x, y, mixed)
    return counter.get_total_flops()


def bench_training(base, cfg, peaks):
    device, methods, dtypes = cfg["device"], cfg["methods"], cfg["dtypes"]
    x, y = training_batch(cfg, base.config.vocab_size)
    bases = {d: frozen_base(base, torch_dtype(d)) for d in dtypes}
    models = {(m, d): build_trainer(m, bases[d] if m.startswith("l2d") else base, cfg, torch_dtype(d))
              for d in dtypes for m in methods}
    mixed = {d: autocast(device, torch_dtype(d)) for d in dtypes}
    flops = {(m, d): count_flops(*models[m, d], x, y, mixed[d]) for m, d in models}  # also the warm-up step
    times = {key: [] for key in models}
    for _ in range(cfg["train_reps"]):  # round-robin over the methods and dtypes
        for m, d in models:
            times[m, d].append(timed(lambda: train_step(*models[m, d], x, y, mixed[d]), device)[0])
    rows = []
    for m, d in models:
        step = statistics.median(times[m, d])
        trainable = sum(p.numel() for p in models[m, d][0].parameters() if p.requires_grad)
        rows.append(dict(method=m, dtype=d, trainable_params=trainable, step_s=step, tokens_per_s=x.numel() / step,
                         vs_full=step / statistics.median(times["full", d]) if "full" in methods else None,
                         vs_fp32=step / statistics.median(times[m, "float32"]) if "float32" in dtypes else None,
                         flops_per_step=flops[m, d], gflop_per_step=flops[m, d] / 1e9, gflops=flops[m, d] / step / 1e9,
                         of_peak=flops[m, d] / step / 1e9 / peaks[d]))
    return rows


def rss(field):
    """VmRSS (now) or VmHWM (peak) of this process in bytes. Not ru_maxrss: after fork + exec that
    also counts the parent's peak, and a reset of the peak (clear_refs) does not reach it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_worker(cfg):
    """Build one method's model, then its peak memory over a few training steps (bytes, as JSON)."""
    method, dtype = cfg["_memory_worker"].split(":")
    dtype = torch_dtype(dtype)
    base = load_model(cfg)
    model, optimizer = build_trainer(method, frozen_base(base, dtype) if method.startswith("l2d") else base, cfg, dtype)
    x, y = training_batch(cfg, base.config.vocab_size)
    mixed = autocast(cfg["device"], dtype)
    del base
    gc.collect()
    try:  # hand freed heap back to the OS (glibc), or RSS would still count the float32 copies cast away
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
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
        train_step(model, optimizer, x, y, mixed)
    peak = torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")
    print(json.dumps(dict(before=before, peak=peak, peak_reset=reset or cuda)))


def measure_memory(cfg, method, dtype="float32"):
    args = [f"--{k}={v!r}" for k, v in cfg.items() if k not in ("_memory_worker", "what")]
    run = subprocess.run([sys.executable, os.path.abspath(__file__), *args, f"--_memory_worker={method}:{dtype}"],
                         capture_output=True, text=True)
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
    cfg = check(configure(DEFAULTS, argv))
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
        with open(cfg["out"], "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {cfg['out']}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
