"""
Train the L2D diffusion path (or a baseline) on prepared data. One process, or data-parallel
(gloo on CPU, nccl on GPU; several machines: torchrun's --nnodes, --node_rank, --master_addr):
    python train.py config/quick.py --max_iters=200
    torchrun --standalone --nproc_per_node=2 train.py config/quick.py

method:    l2d  - train the diffusion path; the base stays frozen (the paper's method)
           lora - LoRA on the base's attention and MLP (the paper's weight-finetuning baseline)
           full - all base weights;  ar - the same, used for next-token training from scratch
           ar2diff - all base weights, as a discrete diffusion model of the whole answer (ar2diff.py)
batch_size is the global batch: each of the world_size processes runs batch_size / (micro_batch *
world_size) micro-steps of gradient accumulation. --init_from=resume continues out_dir's run: its
model and MODEL_SETTINGS are the checkpoint's, the rest (lr, max_iters, ...) the command line's.
"""

import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ar2diff import AR2DiffConfig, check_answer_span
from configurator import UsageError, configure, fail
from data.dataset import BatchSampler, TokenDataset
from diffusion import L2DConfig, answer_positions, at_positions
from loading.checkpoint import (MODEL_KEYS, WHOLE, NonFiniteWeights, build_model, file_fingerprint, fingerprint,
                                load_base, load_model, save_checkpoint, trainable_state_dict)
from loading.precision import autocast, resolve_device, resolve_dtype, store_weights
from model import GPT, GPTConfig

# The settings that define a model and its run: a resumed run takes them from its checkpoint's config.
MODEL_SETTINGS = dict(
    init_from=("smollm2-135m",
               "scratch, smollm2-135m, gpt2..., a HF folder, an ar/full/lora ckpt.pt, or resume (out_dir's run)"),
    method=("l2d", "what trains (see the docstring)", ("l2d", "lora", "full", "ar", "ar2diff")),
    seed=(1337, "initial weights, data order, and every micro-batch's t, noise and label dropout (ar2diff: corruption)"),
    datasets=(["data/gsm8k/smollm2-135m"], "prepared folders (data/*/prepare.py); several mix"),
    # the model: its shape from scratch (init_from=scratch), and its context
    family=("llama", "llama (RMSNorm, RoPE, SwiGLU) or gpt2 (LayerNorm, learned positions, GELU)", ("llama", "gpt2")),
    n_layer=(4, "transformer blocks", "> 0"),
    n_head=(4, "attention heads (must divide n_embd)", "> 0"),
    n_kv_head=(0, "key/value heads of grouped-query attention; 0: n_head", ">= 0"),
    n_embd=(128, "hidden width", "> 0"),
    block_size=(512, "context in tokens: longer examples are cut, a pretrained base's cropped to it", "> 0"),
    # the diffusion path (method=l2d) and LoRA (method=lora, and the l2d "lora" variant)
    variant=("lora", "path layers: lora (the frozen base's weights + LoRA) or full (trainable copies)", ("lora", "full")),
    flow_dim=(256, "width d_f of the diffused token space", "> 0"),
    sigma=(64.0, "std of the noise x_0 the path starts from at t = 0", "> 0"),
    t_schedule=("uniform", "training's t per position: uniform in [0, 1], or cosmap-warped (sec. 3)",
                ("uniform", "cosmap")),
    guidance_classes=(False, "condition the path on the data's classes (for --guidance); off, as officially"),
    label_dropout=(0.2, "chance a token's class is replaced by null in training (guidance_classes)", "in [0, 1]"),
    lora_rank=(32, "rank of the LoRA adapters", "> 0"),
    lora_alpha=(32.0, "LoRA scale: the update B A x is multiplied by lora_alpha / lora_rank"),
    # AR2Diff (method=ar2diff)
    answer_len=(0, "tokens of the answer span refined as a whole (end-token padded); 0: the longest train answer",
                ">= 0"),
)
OPTIONS = dict(
    MODEL_SETTINGS,
    out_dir=("out", "folder of ckpt.pt, saved at every evaluation (not one far worse than the best)"),
    # optimisation (the paper: AdamW, peak lr 1e-4, 100 warmup steps, weight decay 0.01, clip 1.0);
    # the lr warms up from min_lr and decays back to it at lr_decay_iters (default: max_iters)
    batch_size=(32, "examples per optimizer step, over all processes", "> 0"),
    micro_batch=(8, "examples per forward/backward of one process (gradient accumulation)", "> 0"),
    max_iters=(1000, "optimizer steps", "> 0"),
    lr_decay_iters=(0, "the step where the lr is back at min_lr; 0: max_iters", ">= 0"),
    learning_rate=(1e-4, "peak lr, reached at the end of the warmup", "> 0"),
    min_lr=(1e-6, "lr at step 0 and at the end of the decay", ">= 0"),
    warmup_iters=(100, "steps of (logarithmic) warmup from min_lr to learning_rate", ">= 0"),
    weight_decay=(0.01, "AdamW weight decay of matrices (not of biases and norms)"),
    grad_clip=(1.0, "largest gradient norm; 0: no clipping", ">= 0"),
    # bookkeeping and hardware
    eval_interval=(200, "steps between validation losses and checkpoints (and after the last)", "> 0"),
    eval_examples=(64, "test examples of each validation loss", "> 0"),
    log_interval=(10, "steps between training-loss lines", "> 0"),
    device=("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."),
    dtype=("auto", "auto (cuda: bfloat16, else float16; cpu: float32), float32, bfloat16 or float16 (precision.py)"),
    compile=(False, "torch.compile the model: faster steps after a slow start"),
    overwrite=(False, "replace a checkpoint already in out_dir (else refused, unless resuming)"),
)
BETAS = (0.9, 0.95)  # AdamW's, as the official code
DIVERGED = 1.5  # a val loss above DIVERGED x the best (+ 0.1) is no noise of the estimate: the run diverged


def check_config(cfg, world_size):
    """Refuse settings that make no sense together before any data, model or checkpoint is loaded, in one line
    naming the option (a bad value found later would cost a base download or a run's first save)."""
    if cfg["method"] in ("l2d", "lora") and cfg["init_from"] == "scratch":  # their checkpoints omit the base
        raise UsageError(f"method={cfg['method']} finetunes a frozen base, not a random one: train a base with "
                         "method=ar first and pass its ckpt.pt as --init_from")
    if cfg["min_lr"] > cfg["learning_rate"]:
        raise UsageError(f"--min_lr {cfg['min_lr']:g} is above --learning_rate {cfg['learning_rate']:g}: the lr warms "
                         "up from min_lr to learning_rate; lower --min_lr")
    largest = torch.finfo(torch.float32).max * (1 - BETAS[0])  # Adam's first step is lr / (1 - beta1), a float32
    if cfg["learning_rate"] > largest:
        raise UsageError(f"--learning_rate {cfg['learning_rate']:g} overflows AdamW's float32 step (at most "
                         f"{largest:.3g}); the paper's is 1e-4")
    per_step = cfg["micro_batch"] * world_size
    if cfg["batch_size"] % per_step:
        raise UsageError(f"batch_size {cfg['batch_size']} must be a multiple of micro_batch x processes = {per_step}")
    GPTConfig(family=cfg["family"], n_head=cfg["n_head"], n_kv_head=cfg["n_kv_head"], n_embd=cfg["n_embd"])
    existing = cfg["out_dir"]  # out_dir or its closest existing parent: a save there must not fail after training
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise UsageError(f"out_dir {cfg['out_dir']}: {existing} is a file; pass a folder as --out_dir")
    if not os.access(existing or ".", os.W_OK):
        raise UsageError(f"out_dir {cfg['out_dir']}: {existing or '.'} is not writable; pass another --out_dir")


def local_path(p):
    return os.path.abspath(p) if os.path.exists(p) else p  # loadable from any directory; a model name stays a name


def build(cfg, ckpt_path):
    """(model, spec, ckpt, train data, val data). A resumed run's model is its checkpoint's, loaded as
    sample.py and eval.py load it, and its MODEL_SETTINGS replace cfg's; a fresh run's (ckpt None) comes
    from the settings, the base and the data: build_model(spec, base), spec being the MODEL_KEYS (and the
    base's fingerprint) that its checkpoints will hold."""
    ckpt = None
    if cfg["init_from"] == "resume":
        model, _, ckpt = load_model(ckpt_path)
        for key, (default, *_) in MODEL_SETTINGS.items():
            cfg[key] = ckpt["config"].get(key, default)  # (a setting added after the checkpoint: its default)
        spec = {key: ckpt.get(key) for key in MODEL_KEYS + ("base_fingerprint",)}
    elif os.path.exists(ckpt_path) and not cfg["overwrite"]:
        raise UsageError(f"{ckpt_path} already exists; continue it with --init_from=resume, replace it with "
                         "--overwrite=True, or pass another --out_dir")
    train_data, val_data = TokenDataset(cfg["datasets"], "train"), TokenDataset(cfg["datasets"], "test")
    if len(train_data) < cfg["batch_size"]:  # (an empty split TokenDataset refuses itself)
        raise UsageError(f"{len(train_data)} train examples in {', '.join(cfg['datasets'])}, fewer than one batch "
                         f"(--batch_size {cfg['batch_size']}): each step would repeat examples; prepare more, or "
                         "lower --batch_size")
    if ckpt is None:
        torch.manual_seed(cfg["seed"])  # same initial weights on every rank
        base = GPT(GPTConfig(family=cfg["family"], block_size=cfg["block_size"], vocab_size=train_data.vocab_size,
                             n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_kv_head=cfg["n_kv_head"],
                             n_embd=cfg["n_embd"])) if cfg["init_from"] == "scratch" else \
            load_base(cfg["init_from"], cfg["block_size"])[0]
        classes = train_data.classes if cfg["guidance_classes"] else []  # the class embedding's, if any
        l2d = L2DConfig(variant=cfg["variant"], flow_dim=cfg["flow_dim"], sigma=cfg["sigma"],
                        lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], num_classes=len(classes),
                        label_dropout=cfg["label_dropout"], t_schedule=cfg["t_schedule"]) \
            if cfg["method"] == "l2d" else None
        ar2diff = AR2DiffConfig(answer_len=cfg["answer_len"] or int(train_data.answer_lengths().max()),
                                vocab_size=train_data.vocab_size, end_token=train_data.eot) \
            if cfg["method"] == "ar2diff" else None
        spec = dict(method=cfg["method"], init_from=local_path(cfg["init_from"]), model_config=asdict(base.config),
                    l2d_config=l2d and asdict(l2d), ar2diff_config=ar2diff and asdict(ar2diff),
                    lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], classes=classes,
                    base_fingerprint=None if cfg["method"] in WHOLE else fingerprint(base))  # of a frozen base
        model = build_model(spec, base)
    block_size, vocab_size = spec["model_config"]["block_size"], spec["model_config"]["vocab_size"]
    if vocab_size < train_data.vocab_size:
        raise UsageError(f"{cfg['datasets']} uses a vocabulary of {train_data.vocab_size} tokens but the model has "
                         f"{vocab_size}; prepare the data with this model's tokenizer")
    if spec["method"] == "ar2diff":
        check_answer_span(spec["ar2diff_config"]["answer_len"], train_data, block_size)
    return model, spec, ckpt, train_data, val_data


def lr_at(it, cfg):
    """The lr of step `it` (from 0), as DeepSpeed's WarmupDecayLR in the official code: from min_lr to the peak
    over warmup_iters steps spaced logarithmically (52% of the peak at step 10 of 100, 85% at 50), then linear
    decay to min_lr at lr_decay_iters (default max_iters, one past the last step)."""
    peak, low, warmup = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"]
    total = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < warmup:
        return low + (peak - low) * math.log(it + 1) / math.log(max(warmup, 2))  # step 0: low, whatever warmup
    return low + (peak - low) * max(0.0, (total - it) / max(1, total - warmup))


def make_optimizer(model, cfg, device):
    """AdamW on the trainable parameters only, as the official code: eps 1e-8, weight decay on matrices,
    not on biases and norms (the only vectors a model here trains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=BETAS, eps=1e-8, fused=device.startswith("cuda"))


def batch(data, indices, spec, device):
    """The tensors a forward of spec's method takes, on the device: (x, y[, labels]), next-token inputs
    and targets (the path's class labels for l2d), or AR2Diff's (prompt, pad, answer span)."""
    if spec["method"] == "ar2diff":
        return [v.to(device) for v in data.prompt_answer_batch(indices, spec["ar2diff_config"]["answer_len"])]
    x, y, labels = data.get_batch(indices, spec["model_config"]["block_size"])
    return [x.to(device), y.to(device)] + ([labels.to(device)] if spec["method"] == "l2d" else [])


@torch.no_grad()
def evaluate(model, val_batches, method, mixed):
    """Validation loss over val_batches ({seed: inputs}, this process's share of the test examples), and
    for l2d the loss in t-buckets [0, .25), ..., [.75, 1]: it should fall as t rises. For ar2diff the loss
    of the first pass (L1), by corruption rate r in the same buckets: it should rise with r."""
    model.eval()
    edges = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0001])
    sums = torch.zeros(2, len(edges))  # (loss sum, token count): bucket columns + overall last
    for seed, inputs in val_batches.items():
        torch.manual_seed(seed)
        with mixed:  # per answer token: its loss and t (l2d: random per token; ar2diff: rate per example; ar: 0)
            if method == "l2d":
                x, y, labels = inputs
                t = torch.rand(x.shape, device=x.device)
                _, nll = model(x, y, labels, t=t, reduction="none")  # at answer_positions(y), 0 where ignored
                pos = answer_positions(y)
                y, t = at_positions(y, pos), at_positions(t, pos)
            elif method == "ar2diff":
                prompt, pad, y = inputs
                rate = torch.rand(y.size(0), device=y.device)
                logits, _ = model(prompt, pad, y, rate=rate)
                t = rate[:, None].expand_as(y)
            else:
                x, y = inputs
                logits, _ = model(x, y)
                t = torch.zeros(x.shape, device=x.device)
        if method != "l2d":
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="none")
        nll, t, valid = nll.flatten().cpu(), t.flatten().cpu(), y.flatten().cpu() != -1
        bucket = torch.bucketize(t, edges, right=True) - 1
        for b in range(len(edges) - 1):
            sel = valid & (bucket == b)
            sums[:, b] += torch.stack([nll[sel].sum(), sel.sum()])
        sums[:, -1] += torch.stack([nll[valid].sum(), valid.sum()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    losses = (sums[0] / sums[1].clamp(min=1)).tolist()
    return losses[-1], losses[:-1]


def main(argv=None):
    cfg = configure(OPTIONS, argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg["device"])
    if "RANK" in os.environ:  # launched by torchrun: one process per device
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    check_config(cfg, world_size)
    log = print if rank == 0 else (lambda *a, **k: None)
    dtype = resolve_dtype(cfg["dtype"], device, log)

    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    raw_model, spec, ckpt, train_data, val_data = build(cfg, ckpt_path)
    raw_model.to(device)
    store_weights(raw_model, dtype, frozen_only=True)  # (after the fingerprint, which is of the float32 base)
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    base = getattr(raw_model, "base", raw_model)  # the GPT (lora: with its adapters, not counted)
    n_base = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    log(f"{cfg['method']}: {n_train / 1e6:.2f}M trainable parameters ({100 * n_train / n_base:.1f}% of the "
        f"{n_base / 1e6:.1f}M-parameter base), {world_size} process(es) on {device}, {str(dtype)[6:]}")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    model = torch.compile(raw_model) if cfg["compile"] else raw_model  # what training steps through
    if world_size > 1:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    optimizer = make_optimizer(raw_model, cfg, device)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)  # what trains stays float32
    sampler = BatchSampler(len(train_data), cfg["batch_size"], cfg["seed"], rank, world_size)
    mixed = autocast(device, dtype)
    grad_accum = cfg["batch_size"] // (cfg["micro_batch"] * world_size)
    n_val, micro_batch = min(cfg["eval_examples"], len(val_data)), cfg["micro_batch"]
    val_batches = {start: batch(val_data, np.arange(start, min(start + micro_batch, n_val)), spec, device)
                   for start in range(rank * micro_batch, n_val, micro_batch * world_size)}  # this rank's share
    # optimizer steps done; the best (val loss, iter); the iter ckpt.pt holds; the last evaluation far above the best
    it, best, saved, diverged = 0, None, None, False
    if ckpt is not None:  # go on where the checkpoint left off: weights, optimiser, data order, scaler, RNG
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        if ckpt.get("scaler"):  # empty when saved by a disabled (not float16) scaler
            scaler.load_state_dict(ckpt["scaler"])
        it = saved = ckpt["iter_num"]
        best = (ckpt["val_loss"], it) if "val_loss" in ckpt else None
        torch.set_rng_state(ckpt["rng"])
        log(f"resuming {ckpt_path} from iter {it} of {cfg['max_iters']}" +
            ("" if it < cfg["max_iters"] else ": nothing left to train, raise --max_iters to go on"))

    model.train()
    tokens_seen, t0, first_it = 0, time.time(), it  # this process's rate, for tok/s and the time left
    while True:
        # every eval_interval steps, after the last, and before the first of a fresh run (where it starts from)
        if (it % cfg["eval_interval"] == 0 or it == cfg["max_iters"]) and (it > first_it or ckpt is None):
            val, buckets = evaluate(raw_model, val_batches, cfg["method"], mixed)
            by_t = {"l2d": ", by t: ", "ar2diff": " (pass 1), by corruption rate: "}.get(cfg["method"])
            log(f"iter {it}: val loss {val:.4f}" + (by_t + " ".join(f"{b:.3f}" for b in buckets) if by_t else ""))
            if rank == 0 and it > 0:
                diverged = best is not None and val > DIVERGED * best[0] + 0.1  # (nan: save_checkpoint refuses it)
                if diverged:
                    log(f"warning: iter {it}: val loss {val:.4f} is far above the best, {best[0]:.4f} at iter "
                        f"{best[1]}: the run diverged (lower --learning_rate); {ckpt_path} not saved" +
                        (f", it keeps iter {saved}" if saved else ""))
                else:
                    os.makedirs(cfg["out_dir"], exist_ok=True)
                    # the model's spec, its weights (l2d, lora: only what trains), what a resume restores
                    weights = raw_model.state_dict() if spec["method"] in WHOLE else trainable_state_dict(raw_model)
                    try:
                        save_checkpoint(ckpt_path, dict(
                            spec, tokenizer=local_path(train_data.tokenizer_path), state_dict=weights, config=cfg,
                            tokenizer_fingerprint=file_fingerprint(train_data.tokenizer_path), val_loss=val,
                            optimizer=optimizer.state_dict(), sampler=sampler.state_dict(),
                            scaler=scaler.state_dict(), iter_num=it, rng=torch.get_rng_state()))
                    except NonFiniteWeights as e:  # a finite loss, then an update that overflowed
                        raise UsageError(f"{e}: the weights diverged by iter {it} (lr {lr:.2e}); lower "
                                         "--learning_rate") from None
                    saved = it
            best = (val, it) if best is None or val < best[0] else best
        if it >= cfg["max_iters"]:
            break
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro, indices in enumerate(np.split(sampler.next_batch(), grad_accum)):
            inputs = batch(train_data, indices, spec, device)
            if world_size > 1:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == grad_accum - 1
            # t, noise and label dropout seeded by the micro-batch's place in the global batch: runs agree
            # whatever the number of processes, and resume bit for bit
            torch.manual_seed(cfg["seed"] * 1_000_003 + it * 1009 + rank * grad_accum + micro)
            with mixed:
                _, loss = model(*inputs)
            scaler.scale(loss / grad_accum).backward()
            loss_sum += loss.detach()
            tokens_seen += inputs[0].numel() + (inputs[2].numel() if cfg["method"] == "ar2diff" else 0)
        finite = torch.isfinite(loss_sum).float()
        if world_size > 1:  # every rank stops together
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():  # before the update: the weights, and the checkpoint, stay as they were
            raise UsageError(f"the loss became {loss_sum.item()} at iter {it + 1} (lr {lr:.2e}); stopped before the "
                             f"update, so {ckpt_path} is the last good checkpoint, if any: lower --learning_rate")
        if cfg["grad_clip"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        if it % cfg["log_interval"] == 0 or it == cfg["max_iters"]:
            if world_size > 1:  # the mean over the global batch, so logs do not depend on the process count
                dist.all_reduce(loss_sum)
            elapsed = time.time() - t0
            left = elapsed / (it - first_it) * (cfg["max_iters"] - it)  # evaluations included: they recur
            log(f"iter {it}: loss {loss_sum.item() / (grad_accum * world_size):.4f}, lr {lr:.2e}, "
                f"{tokens_seen * world_size / elapsed:.0f} tok/s" + (f", {tqdm.format_interval(left)} left" if left else ""))
    if world_size > 1:
        dist.barrier()  # let the master finish its checkpoint: gloo aborts if a peer leaves first
        dist.destroy_process_group()
    if diverged:  # (rank 0) said in the log at each evaluation; said again where it is seen, after the log
        if saved is None:  # a fresh run that never came near where it started: no checkpoint, not a success
            raise UsageError(f"the run diverged: every val loss after iter {best[1]} was far above its {best[0]:.4f}, "
                             f"so nothing was saved in {cfg['out_dir']}; lower --learning_rate")
        print(f"warning: the run ended diverged (its last val loss far above the best, {best[0]:.4f} at iter {best[1]}); "
              f"{ckpt_path} keeps iter {saved}: lower --learning_rate", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
    except KeyboardInterrupt:  # checkpoints are written atomically: the last one saved is whole
        print("error: interrupted; the last checkpoint in out_dir, if any, is intact: --init_from=resume goes on "
              "from it", file=sys.stderr)
        sys.exit(130)
