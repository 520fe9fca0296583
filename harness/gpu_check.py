"""
The GPU check: what only a CUDA machine can show, in one unattended command of at most 8 minutes.

    python -m harness.gpu_check --out gpu-check                   # on one CUDA machine
    python -m harness.gpu_check --out /tmp/gpu-check --dry_run    # every part on the CPU, tiny, < 1 minute
    python -m harness.gpu_check --out gpu-check-2 --parts 4,5     # some parts only (a rerun after a stop)

gpu_check.json and .md are rewritten after each part; a part that fails goes under "errors", the next runs.
  1 machine      GPU name and memory, torch and CUDA versions.
  2 correctness  random weights in SmolLM2-135M's and GPT-2's shapes: float32 logits against the CPU's, argmax
                 agreement in bf16, and in both that steps=1 is the base bit for bit (logits at t = 0, greedy).
  3 speed        at SmolLM2's shape: generation ms/token and one path evaluation's cost; the L2D train step in
                 float32/bf16, (un)fused AdamW, torch.compile; a base train step's MFU against the bf16
                 datasheet peak and a measured matmul (FLOPs 6 N + 12 L d T per token).
  4 ddp          a short L2D run of train.py under torchrun on every GPU (nccl) against one process: the
                 logged losses agree within DDP_TOLERANCE (on one GPU, only torchrun's and nccl's start).
  5 lab          the CPU lab with a 34M-parameter base, L2D and LoRA on x, 500 test problems, paired to LoRA.
"""

import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from configurator import UsageError, configure, fail, parse_list
from diffusion import L2D, L2DConfig
from harness.intervals import read_results, row_gains
from loading.files import write_atomic
from loading.precision import autocast, store_weights
from lora import merge_lora
from model import GPT, GPTConfig

OPTIONS = dict(
    out=("", "required: the folder for gpu_check.json, gpu_check.md, the lab's eval JSONs and the log"),
    dry_run=(False, "every part on the CPU with a tiny random model and data (what the test suite runs)"),
    parts=("1,2,3,4,5", "which parts to run (1 machine, 2 correctness, 3 speed, 4 ddp, 5 lab), one or a list"),
    overwrite=(False, "replace the results of an earlier check in --out"),
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = dict(smollm2=dict(family="llama", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                           ffn_hidden=1536, rope_theta=1e5, block_size=2048),
              gpt2=dict(family="gpt2", vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024))
TINY = dict(smollm2=dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=64, block_size=128),
            gpt2=dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32, block_size=128))  # --dry_run's shapes
# Sizes on a GPU, and for --dry_run. lab: (layers, width, heads, batch, steps) of the lab's trainings.
GPU = dict(prompt=64, new_tokens=16, batch=8, seq=256, mfu_seq=1024, reps=10, matmul=8192, ddp_iters=10,
           lab=(8, 512, 8, 128, 1500), n_test=500, compile_backend="inductor")
DRY = dict(prompt=8, new_tokens=3, batch=2, seq=16, mfu_seq=16, reps=1, matmul=64, ddp_iters=3,
           lab=(1, 32, 4, 16, 3), n_test=20, compile_backend="eager")  # dynamo alone: inductor takes minutes on a CPU
BF16_PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}  # dense, the SXM datasheets
# Losses are logged with 4 decimals; DDP sums the global batch's gradients in another order (an all-reduce
# across ranks, not accumulation in one process), so float32 rounding differs by ~1e-7 per step and AdamW
# carries it on for 10 steps. A rank that saw the wrong examples moves a step's loss by ~1e-1.
DDP_TOLERANCE = 1e-3


def random_gpt(name, S):
    torch.manual_seed(0)  # the same weights on every call
    return GPT(GPTConfig(**{**SHAPES[name], **(TINY[name] if S is DRY else {})}))


def timed(fn, device, reps, warmup=1):
    """(median seconds of fn() over reps calls after warmup calls, synchronised; the last call's result)."""
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def random_l2d(base, **config):
    """L2D around `base` with its zero-initialised heads (gates, modulation, LoRA B) made random, so that
    the path changes the logits at t > 0 and t = 0 is the base only because of the gate's difference."""
    l2d = L2D(base, L2DConfig(**config))
    for p in l2d.trainable_parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.02)
    return l2d


def correctness(S, device):
    rows = []
    for name in SHAPES:
        cpu = random_gpt(name, S).eval()
        idx = torch.randint(cpu.config.vocab_size, (2, S["prompt"]))
        with torch.no_grad():
            reference = cpu(idx)[0]
        x, y = idx.to(device), idx.roll(-1, 1).to(device)  # every position an answer: the path runs at each
        for dtype in (torch.float32, torch.bfloat16):
            l2d = store_weights(random_l2d(copy.deepcopy(cpu)).to(device).eval(), dtype)
            with torch.no_grad(), autocast(device, dtype):
                logits = l2d.base(x)[0]
                at = {t: l2d(x, y, t=torch.full(x.shape, t, device=device))[0] for t in (0.0, 0.5)}
                greedy = [tok for tok, _ in l2d.base.generate(x, S["new_tokens"], temperature=0)]
                one_step = [(tok, nfe) for tok, nfe in l2d.generate(x, S["new_tokens"], steps=1)]
            diff = (logits.float().cpu() - reference).abs()
            rows.append(dict(model=name, dtype=str(dtype)[6:], max_abs_diff=diff.max().item(),
                             rel_diff=(diff.norm() / reference.norm()).item(),
                             argmax_agree=(logits.argmax(-1).cpu() == reference.argmax(-1)).float().mean().item(),
                             t0_is_base=torch.equal(at[0.0], logits), t05_differs=not torch.equal(at[0.5], logits),
                             steps1_is_base=all(torch.equal(a, b) for a, (b, _) in zip(greedy, one_step)),
                             steps1_nfe=sum(int(nfe.sum()) for _, nfe in one_step)))
    return rows


def generation_speed(S, device):
    """ms per generated token (the prefill included) and the cost of one path evaluation."""
    base, rows = random_gpt("smollm2", S), []
    for dtype in (torch.float32, torch.bfloat16):  # every weight stored in it, LoRA merged, as eval.py generates
        l2d = store_weights(merge_lora(random_l2d(copy.deepcopy(base))).to(device).eval(), dtype)
        for batch in (1, 16):
            idx = torch.randint(base.config.vocab_size, (batch, S["prompt"]), device=device)
            ms = {}
            for steps in (1, 8):
                with torch.no_grad(), autocast(device, dtype):
                    seconds, nfe = timed(lambda: [n.float().mean().item() for _, n in l2d.generate(
                        idx, S["new_tokens"], steps=steps)], device, max(1, S["reps"] // 4))
                ms[steps] = 1000 * seconds / S["new_tokens"]
                rows.append(dict(dtype=str(dtype)[6:], batch=batch, steps=steps, ms_per_token=ms[steps],
                                 nfe_per_token=statistics.mean(nfe), path_eval_ms=None))
            rows[-1]["path_eval_ms"] = (ms[8] - ms[1]) / rows[-1]["nfe_per_token"]  # the prefill cancels
    return rows


def train_step(model, optimizer, x, mixed):
    """Forward, backward, clip and AdamW, as train.py's step."""
    with mixed:
        loss = model(x, x.roll(-1, 1))[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_speed(S, device):
    """L2D train steps as train.py takes them: the frozen base stored in the dtype, float32 masters."""
    base, rows = random_gpt("smollm2", S), []
    x = torch.randint(base.config.vocab_size, (S["batch"], S["seq"]), device=device)
    for dtype, fused, compiled in [(torch.float32, True, False), (torch.bfloat16, True, False),
                                   (torch.bfloat16, False, False), (torch.bfloat16, True, True)]:
        l2d = store_weights(random_l2d(copy.deepcopy(base)).to(device), dtype, frozen_only=True)
        optimizer = torch.optim.AdamW(l2d.trainable_parameters(), lr=1e-4, fused=fused)
        model = torch.compile(l2d, backend=S["compile_backend"]) if compiled else l2d
        start = time.perf_counter()
        seconds, _ = timed(lambda: train_step(model, optimizer, x, autocast(device, dtype)), device, S["reps"],
                           warmup=3)
        rows.append(dict(model="l2d-lora", dtype=str(dtype)[6:], fused_adamw=fused, compiled=compiled, step_s=seconds,
                         tokens_per_s=x.numel() / seconds, warmup_s=time.perf_counter() - start - S["reps"] * seconds))
    return rows


def base_mfu(S, device, info):
    """A base train step (every weight trained, bf16 autocast): its FLOP/s against the bf16 datasheet peak
    and a large bf16 matmul."""
    n = S["matmul"]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_tflops = 2 * n**3 / timed(lambda: a @ b, device, S["reps"])[0] / 1e12
    model = random_gpt("smollm2", S).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(model.config.vocab_size, (S["batch"], S["mfu_seq"]), device=device)
    seconds, _ = timed(lambda: train_step(model, optimizer, x, autocast(device, torch.bfloat16)), device, S["reps"],
                       warmup=2)
    c = model.config
    tflops = (6 * model.num_params() + 12 * c.n_layer * c.n_embd * S["mfu_seq"]) * x.numel() / seconds / 1e12
    peak = next((p for chip, p in BF16_PEAK_TFLOPS.items() if chip in info.get("name", "")), None)
    return dict(batch=S["batch"], seq=S["mfu_seq"], step_s=seconds, tokens_per_s=x.numel() / seconds, tflops=tflops,
                datasheet_bf16_tflops=peak, mfu=tflops / peak if peak else None, matmul_bf16_tflops=matmul_tflops,
                of_matmul=tflops / matmul_tflops)


def run(*commands, log):
    """Run commands from the repository's root side by side (small runs leave most of a GPU idle), each output
    appended to the log; their stdouts, or a RuntimeError once all have ended if one failed."""
    started = [(args, subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
               for args in commands]
    ended = [(args, *proc.communicate(), proc.returncode) for args, proc in started]
    log.writelines(f"$ {' '.join(args)}\n{out}{err}\n" for args, out, err, _ in ended)
    log.flush()
    for args, out, err, code in ended:
        if code:
            raise RuntimeError(f"{' '.join(args[1:4])} ... failed: {(err or out).strip()[-600:]}")
    return [out for _, out, _, _ in ended]


def prepare_data(work, S, log):
    """The lab's data in `work`: a character vocabulary, + and - (the base's) and x (the finetuning task)."""
    prepare = [sys.executable, "-m", "data.arithmetic.prepare", "--digits", "2"]
    vocab = os.path.join(work, "char", "vocab.json")
    if not os.path.exists(vocab):
        run(prepare + ["--tokenizer", "char", "--n_train", "1000", "--out", os.path.join(work, "char")], log=log)
        run(prepare + ["--tokenizer", vocab, "--ops", "+-", "--n_train", "9000" if S is GPU else "400",
                       "--out", os.path.join(work, "addsub")],
            prepare + ["--tokenizer", vocab, "--ops", "*", "--n_train", "4000" if S is GPU else "400",
                       "--n_test", str(S["n_test"]), "--out", os.path.join(work, "mul")], log=log)
    return os.path.join(work, "addsub"), os.path.join(work, "mul")


def train(config, out_dir, *options, device, launch=(sys.executable,)):
    return [*launch, "train.py", config, f"--out_dir={out_dir}", f"--device={device}", *options]


def ddp(S, device, work, log):
    """A base (quick.py, a few steps on + and -), then one short L2D run on x in one process and under torchrun."""
    addsub, mul = prepare_data(work, S, log)
    n = torch.cuda.device_count() if device == "cuda" else 2  # gloo, 2 processes, on the CPU
    iters, base = S["ddp_iters"], os.path.join(work, "ddp-base")
    run(train("config/quick.py", base, f"--datasets=['{addsub}']", f"--max_iters={iters}", f"--eval_interval={iters}",
              "--batch_size=16", "--micro_batch=16", device=device), log=log)
    l2d = [f"--init_from={base}/ckpt.pt", "--method=l2d", f"--datasets=['{mul}']", "--flow_dim=64", "--dtype=float32",
           f"--max_iters={iters}", f"--eval_interval={iters}", "--log_interval=1", "--batch_size=16", "--micro_batch=2"]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}")
    losses = lambda output: [float(v) for v in re.findall(r"iter \d+: (?:val )?loss ([\d.]+)", output)]
    one, many = map(losses, run(train("config/quick.py", f"{work}/ddp-one", *l2d, device=device), train(
        "config/quick.py", f"{work}/ddp-torchrun", *l2d, device=device, launch=torchrun), log=log))
    if len(one) != iters + 2 or len(many) != len(one):
        raise RuntimeError(f"expected {iters} training losses and a validation loss before and after: {one}, {many}")
    diff = max(abs(a - b) for a, b in zip(one, many))
    return dict(world_size=n, backend="nccl" if device == "cuda" else "gloo", losses_one_process=one,
                losses_torchrun=many, max_abs_diff=diff, tolerance=DDP_TOLERANCE, agree=diff <= DDP_TOLERANCE,
                note="one GPU: world size 1, no DDP wrapper; torchrun and nccl's start only" if n == 1 else "")


def lab(S, device, work, out, log):
    """The lab's trainings and evaluations: each row's accuracy, interval and paired difference from LoRA."""
    addsub, mul = prepare_data(work, S, log)
    layers, width, heads, batch, steps = S["lab"]
    size = [f"--n_layer={layers}", f"--n_embd={width}", f"--n_head={heads}", "--learning_rate=1e-3",
            f"--batch_size={batch}", f"--micro_batch={batch}", f"--max_iters={steps}", f"--eval_interval={steps}",
            f"--log_interval={max(1, steps // 10)}"]
    base, start = f"{work}/lab-base", time.perf_counter()
    base_log, = run(train("config/lab_base.py", base, f"--datasets=['{addsub}']", *size, device=device), log=log)
    seconds = {"base": time.perf_counter() - start}
    finetune = [f"--datasets=['{mul}']", f"--init_from={base}/ckpt.pt", *size]
    run(*[train(f"config/lab_{name}.py", f"{work}/lab-{name}", *finetune, device=device) for name in ("l2d", "lora")],
        log=log)
    seconds["l2d and lora, side by side"] = time.perf_counter() - start - seconds["base"]
    evaluate = [sys.executable, "eval.py", f"--data={mul}", "--task=arithmetic", "--gen_batch_size=100",
                "--max_new_tokens=8", f"--device={device}", "--overwrite"]
    run(evaluate + [f"--ckpt={work}/lab-l2d/ckpt.pt", f"--out={out}/eval_l2d.json", "--steps=1,2,4,8,16"],
        evaluate + [f"--ckpt={work}/lab-lora/ckpt.pt", f"--out={out}/eval_lora.json"], log=log)
    results = {name: read_results(f"{out}/eval_{name}.json")["rows"] for name in ("l2d", "lora")}
    lora = results["lora"][0]
    rows = [dict(model=name, setting=row["setting"], accuracy=row["accuracy"], ci_low=row["ci_low"],
                 ci_high=row["ci_high"], n=row["n"], nfe_per_token=row["nfe_per_token"],
                 tf_accuracy=row.get("tf_accuracy"),
                 **dict(zip(("vs_lora_diff", "vs_lora_low", "vs_lora_high"), row_gains(row, lora)["gain"])))
            for name in ("l2d", "lora") for row in results[name]]
    params = float(re.search(r"([\d.]+)M trainable", base_log).group(1))
    return dict(base_params_m=params, batch=batch, steps=steps, train_seconds=seconds, rows=rows)


def cell(value):
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(cell, value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(results):
    """Each part's rows as tables, its other values as a list."""
    lines = []
    for part, value in results.items():
        lines += [f"## {part}", ""]
        for key, v in value.items() if isinstance(value, dict) else [("", value)]:
            if isinstance(v, list) and v and isinstance(v[0], dict):
                lines += ([f"{key}:", ""] if key else []) + ["| " + " | ".join(v[0]) + " |", "|" + " --- |" * len(v[0])]
                lines += ["| " + " | ".join(cell(row[k]) for k in v[0]) + " |" for row in v] + [""]
            else:
                lines.append(f"- {key}: {cell(v)}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    cfg = configure(OPTIONS, argv)
    parts = parse_list("parts", cfg["parts"], int, [])
    if not cfg["out"] or not set(parts) <= {1, 2, 3, 4, 5}:
        raise UsageError("--out FOLDER is required, and --parts takes some of 1,2,3,4,5")
    out = os.path.abspath(cfg["out"])  # the subprocesses run from the repository's root
    if os.path.isfile(out):
        raise UsageError(f"--out {out} is a file; pass a folder")
    if os.path.isdir(out) and os.listdir(out) and not cfg["overwrite"]:
        raise UsageError(f"--out {out} has files in it; pass an empty or new folder, or add --overwrite")
    if not cfg["dry_run"] and not torch.cuda.is_available():
        raise UsageError("torch finds no CUDA device here; --dry_run runs every part on the CPU")
    os.makedirs(out, exist_ok=True)
    S, device = (DRY, "cpu") if cfg["dry_run"] else (GPU, "cuda")
    results, errors, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as work, open(os.path.join(out, "gpu_check.log"), "w") as log:
        info = dict(torch=torch.__version__, cuda=torch.version.cuda, device=device, gpus=torch.cuda.device_count())
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            info.update(name=props.name, memory_gib=props.total_memory / 2**30,
                        multiprocessors=props.multi_processor_count)
        steps = [(1, "machine", lambda: info), (2, "correctness", lambda: correctness(S, device)),
                 (3, "generation_speed", lambda: generation_speed(S, device)),
                 (3, "base_mfu", lambda: [base_mfu(S, device, info)]),
                 (3, "training_speed", lambda: training_speed(S, device)),
                 (4, "ddp", lambda: ddp(S, device, work, log)), (5, "lab", lambda: lab(S, device, work, out, log))]
        for part, name, step in steps:
            if part not in parts:
                continue
            print(f"part {part}: {name} ...", flush=True)
            start = time.perf_counter()
            try:
                results[name] = step()
                print(markdown({name: results[name]}), flush=True)
            except Exception as e:  # the next part still runs: the lease is too short to stop at the first failure
                errors[name] = f"{type(e).__name__}: {e}"
                print(f"error: part {part} ({name}) failed: {errors[name]}", file=sys.stderr, flush=True)
            seconds[name] = time.perf_counter() - start
            saved = dict(results, seconds=seconds, errors=errors)
            write_atomic(f"{out}/gpu_check.json", lambda f: f.write(json.dumps(saved, indent=1).encode()))
            write_atomic(f"{out}/gpu_check.md", lambda f: f.write(f"# GPU check\n\n{markdown(saved)}\n".encode()))
    print(markdown(dict(seconds=seconds, errors=errors)))
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        fail(e)
