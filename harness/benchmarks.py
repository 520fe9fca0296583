"""
The measurements behind bench.py (its command line and tables): generation, AR2Diff against AR decoding,
training steps with their FLOPs, and the memory worker bench.py runs in a fresh process per method and
dtype. Each takes bench.py's checked config `cfg`, so a test can time one thing without the command line.
"""

import copy
import ctypes
import gc
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

import train
from ar2diff import AR2Diff, AR2DiffConfig
from configurator import defaults
from diffusion import L2D, L2DConfig
from loading.checkpoint import load_base
from loading.precision import autocast, store_weights
from lora import add_lora, merge_lora
from model import GPT, GPTConfig, KVCache

METHODS = ("l2d-lora", "l2d-full", "lora", "full")  # what bench.py trains: the path, and the two baselines

# torch counts attention on CUDA but not its CPU kernel: count that the same way (dense q k^T and p v).
aten = torch.ops.aten
if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)(
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v))


def timed(fn, device):
    """(seconds that fn() takes, waiting for the GPU on CUDA; what it returns)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


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


def base_model(cfg):
    """The base to measure: --init_from by name or path, or (scratch) a random GPT of the given shape."""
    if cfg["init_from"] != "scratch":
        return load_base(cfg["init_from"])[0].to(cfg["device"])
    torch.manual_seed(cfg["seed"])
    return GPT(GPTConfig(family=cfg["family"], block_size=cfg["block_size"], vocab_size=cfg["vocab_size"],
                         n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"])).to(cfg["device"])


def l2d_config(cfg, variant):
    return L2DConfig(variant=variant, flow_dim=cfg["flow_dim"], lora_rank=cfg["lora_rank"])


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
    stored = lambda model, dtype: store_weights(model, getattr(torch, dtype))
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
        with autocast(device, getattr(torch, dtype)):
            inputs[dtype] = (l2d.config.sigma * torch.randn(B, 1, l2d.config.flow_dim, device=device), t,
                             l2d.conditioning(t[:1]))
    times = {dtype: ([], [], []) for dtype in models}
    for rep in range(reps + 2):  # the first two are warm-up
        for dtype, (l2d, merged) in models.items():
            (h, cache), (x_t, t, conditioning) = prefills[dtype], inputs[dtype]
            step_cache = cache.fork()  # the base step appends a position; the path eval adds none
            with autocast(device, getattr(torch, dtype)):
                base_s, _ = timed(lambda: l2d.base.head(l2d.base.trunk(token[:, None], step_cache)[0][:, -1]), device)
                path_s, _ = timed(lambda: l2d.predict(h[:, -1:], cache, x_t, t, conditioning), device)
                merged_s, _ = timed(lambda: merged.predict(h[:, -1:], cache, x_t, t, conditioning), device)
            if rep >= 2:
                for kept, seconds in zip(times[dtype], (base_s, path_s, merged_s)):
                    kept.append(seconds)
    return {dtype: tuple(statistics.median(kept) for kept in kept3) for dtype, kept3 in times.items()}


def decoder(l2d, h, cache, steps, device):
    """Greedy decoding as L2D.generate does it, from a prefilled cache, one token per next(): yields
    (seconds of the token's ODE and base step, its mean NFE)."""
    cache = cache.fork()
    while True:
        ode_s, (token, nfe) = timed(lambda: l2d.next_token(h[:, -1:], cache, steps=steps, solver="midpoint"), device)
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
                with autocast(device, getattr(torch, dtype)):
                    cache = KVCache()
                    prefills[dtype] = l2d.base.trunk(batch, cache)[0], cache
            step_costs = decode_step_costs(models, prefills, batch[:, -1], cfg["eval_reps"], device)
            fp32_path = step_costs.get("float32", (None, None))[1]
            for dtype, (base_s, path_s, merged_s) in step_costs.items():
                costs.append(dict(batch=B, dtype=dtype, base_step_ms=1e3 * base_s, path_eval_ms=1e3 * path_s,
                                  ratio=path_s / base_s, merged_path_eval_ms=1e3 * merged_s, merged_ratio=merged_s / base_s,
                                  path_vs_fp32=fp32_path and path_s / fp32_path,
                                  merged_vs_fp32=fp32_path and merged_s / fp32_path))
            decoders = {(d, s): decoder(models[d][1], *prefills[d], s, device)  # merged, as sample.py
                        for d in dtypes for s in cfg["steps"]}
            times, nfe = {key: [] for key in decoders}, {}
            for _ in range(cfg["new_tokens"]):  # round-robin: one token of each (dtype, step count) in turn
                for (d, s), tokens in decoders.items():
                    with autocast(device, getattr(torch, d)):
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
        return named | {K: lambda K=K: model.generate(prompt, steps=steps, samples=K) for K in cfg["ar2diff_candidates"]}

    rows = []
    with torch.inference_mode():
        for write in writers(min(cfg["answer_lens"])).values():  # warm-up
            write()
        for L in cfg["answer_lens"]:
            seconds = {name: timed(write, device)[0] for name, write in writers(L).items()}  # interleaved
            ar_s = seconds["ar"]
            for K in cfg["ar2diff_candidates"]:
                s = seconds[K]
                rows.append(dict(answer_len=L, candidates=K, steps=steps, passes=steps + (K > 1), ar_s=ar_s, ar2diff_s=s,
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
        model = add_lora(copy.deepcopy(base), cfg["lora_rank"])
    else:
        model = copy.deepcopy(base).requires_grad_(True)
    model = store_weights(model.to(cfg["device"]).train(), dtype, frozen_only=True)
    return model, train.make_optimizer(model, defaults(train.OPTIONS), cfg["device"])


def train_step(model, optimizer, x, y, mixed):
    """One step as train.py takes it (no gradient accumulation), in the autocast context `mixed`."""
    with mixed:
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.OPTIONS["grad_clip"][0])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_batch(cfg, vocab_size):
    """A random batch (x, y) with a target at every position."""
    torch.manual_seed(cfg["seed"])
    return tuple(torch.randint(0, vocab_size, (cfg["batch"], cfg["seq"]), device=cfg["device"]) for _ in range(2))


def count_flops(model, optimizer, x, y, mixed):
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, x, y, mixed)
    return counter.get_total_flops()


def bench_training(base, cfg, peaks):
    device, dtypes = cfg["device"], cfg["dtypes"]
    x, y = training_batch(cfg, base.config.vocab_size)
    bases = {d: frozen_base(base, getattr(torch, d)) for d in dtypes}
    models = {(m, d): build_trainer(m, bases[d] if m.startswith("l2d") else base, cfg, getattr(torch, d))
              for d in dtypes for m in METHODS}
    mixed = {d: autocast(device, getattr(torch, d)) for d in dtypes}
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
                         vs_full=step / statistics.median(times["full", d]),
                         vs_fp32=step / statistics.median(times[m, "float32"]) if "float32" in dtypes else None,
                         flops_per_step=flops[m, d], gflop_per_step=flops[m, d] / 1e9, gflops=flops[m, d] / step / 1e9,
                         of_peak=flops[m, d] / step / 1e9 / peaks[d]))
    return rows


# --- peak memory, measured in a fresh process per method and dtype (bench.measure_memory) -----------
def rss(field):
    """VmRSS (now) or VmHWM (peak) of this process in bytes. Not ru_maxrss: after fork + exec that
    also counts the parent's peak, and a reset of the peak (clear_refs) does not reach it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_worker(cfg):
    """Build one method's model, then its peak memory over a few training steps (bytes, as JSON)."""
    method, dtype = cfg["_memory_worker"].split(":")
    dtype = getattr(torch, dtype)
    base = base_model(cfg)
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
