r"""
Generate text, spending `--steps` diffusion steps on every new token.
    python sample.py --steps 8                                    # embedded default, fresh path
    python sample.py --init_from out-quick-l2d/ckpt.pt --steps 16 --start "Question: What is 47 + 85?\nAnswer: "
    python sample.py --init_from out-quick-l2d/ckpt.pt --steps 16 --solver dopri5 --show_steps --max_new_tokens 8
    python sample.py --init_from gpt2 --start FILE:prompt.txt --temperature 0.8 --top_k 50 --num_samples 2
    python sample.py --chat --start "What is the capital of France?"   # instruct chat template
    python sample.py --init_from out-lab-ar2diff/ckpt.pt --steps 10 --candidates 8 --start "Question: What is 12 * 34?\nAnswer: "

--init_from: an L2D or AR2Diff checkpoint, another checkpoint (a plain GPT: --steps 1 only), or a base model
(smollm2-135m, gpt2..., a Hugging Face folder), which gets a fresh diffusion path whose zero merge gate
generates as the base does at any --steps. --steps 1 is the base itself; N > 1 integrates the ODE on
linspace(0, 1, N) with --solver. AR2Diff refines its whole answer span --steps times, --candidates in
parallel, and prints the best scored one; --max_new_tokens, --top_k, --solver and --estimate do not apply.
"""

import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ar2diff import TEMPERATURE, AR2Diff, until_end
from configurator import UsageError, configure, fail
from diffusion import ADAPTIVE_T_END, L2D, L2DConfig
from loading import checkpoint
from loading.precision import autocast, resolve_device, resolve_dtype, store_weights
from loading.tokenizer import chat_prompt, has_chat_template, stop_tokens
from lora import merge_lora
from solvers import EVALUATIONS, SOLVERS

OPTIONS = dict(
    init_from=("smollm2-135m", "an L2D ckpt.pt, another ckpt.pt (steps=1 only), or a base model name or HF folder"),
    start=("\n", "the prompt; FILE:path reads it from a file; a typed \\n is a newline"),
    max_new_tokens=(64, "tokens per sample at most (fewer where the context ends or the end token comes)", ">= 1"),
    temperature=(None, "of the draw from the logits read at t = 1 (None: 0.8; AR2Diff's step draws: 0.2); 0: argmax"),
    top_k=(50, "draw among the k likeliest tokens only; None: among all", ">= 1"),
    num_samples=(2, "samples of the same prompt, one after the other", ">= 1"),
    seed=(1337, "of the token draws and the ODE's noise, set once before the first sample"),
    chat=(False, "wrap --start in the tokenizer's chat template (instruct models)"),
    device=("cpu", "cpu, cuda, cuda:1, ..."),
    dtype=("auto", "auto (cuda: bfloat16; cpu: float32), float32, bfloat16 or float16: every weight stored in it "
           "(precision.py)"),
    # the diffusion path (an L2D model) or AR2Diff
    steps=(1, "ODE steps per token (1: the base model alone); AR2Diff: refinements of the answer"),
    candidates=(8, "AR2Diff: candidate answers refined in parallel, the best scored printed (the paper: 8)", ">= 1"),
    solver=("midpoint", "euler, midpoint, rk4 (fixed steps on linspace(0, 1, steps)) or dopri5 (adaptive)",
            tuple(SOLVERS)),
    atol=(1e-5, "dopri5's absolute error tolerance", "> 0"),
    rtol=(1e-5, "dopri5's relative error tolerance", "> 0"),
    estimate=("argmax", "the ODE's estimate x_hat_1 of the clean token: argmax, sample (at temperature 1 - t) or mean",
              ("argmax", "sample", "mean")),
    guidance=(1.0, "classifier-free guidance weight (with --label); 1: none"),
    label=("", "the class to guide towards (a model trained with --guidance_classes=True)"),
    show_steps=(False, "per token, the 5 likeliest tokens at every solver step and at the t = 1 read-out"),
)
MAX_STEPS = 1_000_000  # the grid linspace(0, 1, steps) is allocated whole


def check(cfg):
    """Refuse bad settings before anything is loaded; returns the dtype to store the weights in."""
    if not 1 <= cfg["steps"] <= MAX_STEPS:
        raise UsageError(f"--steps must be between 1 and {MAX_STEPS} (a finer grid than float32 t can resolve), "
                         f"got {cfg['steps']}")
    t = cfg["temperature"]  # None (the default) takes any type: check it is a number here
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf):
        raise UsageError(f"--temperature must be a finite number >= 0 (0: argmax), got {t!r}")
    if cfg["guidance"] != 1.0 and not cfg["label"]:
        raise UsageError("--guidance needs --label NAME (the class to guide towards)")
    return resolve_dtype(cfg["dtype"], resolve_device(cfg["device"]))


def read_prompt(start):
    """The text of --start; FILE:path reads it from a file (before the model is loaded, to fail early)."""
    try:  # a shell passes --start "Q\nA" as a backslash and an n
        text = Path(start[5:]).read_text(encoding="utf-8") if start.startswith("FILE:") else start.replace("\\n", "\n")
    except OSError:
        raise UsageError(f"prompt file {start[5:]} not found") from None
    if not text:
        raise UsageError(f'--start {start!r} is empty; give a prompt, e.g. --start "Once upon a time"')
    return text


def load(cfg):
    """(model, tokenizer, class names): an L2D model where there is one, else a GPT. A base model gets a
    fresh diffusion path, whose W_v (and so V, and dopri5's steps) comes from --seed."""
    model, tokenizer, ckpt = checkpoint.load(cfg["init_from"])
    if ckpt is None:
        torch.manual_seed(cfg["seed"])
        return L2D(model, L2DConfig()), tokenizer, []
    return model, tokenizer, ckpt.get("classes", [])


def guidance_labels(model, cfg, classes):
    """The --label's class (1,), or None; one line where the model cannot take --steps/--guidance/--label."""
    if not isinstance(model, (L2D, AR2Diff)) and (cfg["steps"] > 1 or cfg["guidance"] != 1.0):
        raise UsageError(f"{cfg['init_from']} has no diffusion path; use --steps 1, or an L2D checkpoint")
    if not cfg["label"]:
        return None
    if not classes or isinstance(model, AR2Diff):
        raise UsageError(f"{cfg['init_from']} has no classes to guide towards (L2D trained with --guidance_classes=True "
                         "has); drop --label/--guidance")
    if cfg["label"] not in classes:
        raise UsageError(f"unknown --label {cfg['label']!r}; this model knows {', '.join(classes)}")
    return torch.full((1,), classes.index(cfg["label"]), device=cfg["device"])


def sample_header(cfg, is_l2d):
    """Each sample's header: what --steps means for its solver, and the path evaluations per token."""
    solver, n = cfg["solver"], cfg["steps"]
    if not is_l2d:
        return f"{cfg['init_from']} itself (a GPT: no diffusion path)"
    if solver == "dopri5":
        return (f"dopri5, atol {cfg['atol']:g}, rtol {cfg['rtol']:g}, ignoring --steps: adaptive steps from t = 0 to "
                f"{ADAPTIVE_T_END:g}, then the read-out at t = 1")
    if n == 1:
        return "the base model (--steps 1: no ODE, no path evaluation; the token is drawn from the base's logits)"
    per_step = EVALUATIONS[solver] * (1 if cfg["guidance"] == 1.0 else 2)  # guidance: with and without the label
    return (f"{solver}, --steps {n}: {n - 1} step{'s' * (n > 2)} on linspace(0, 1, {n}), {per_step} path "
            f"evaluation{'s' * (per_step > 1)} each, then the read-out at t = 1: {per_step * (n - 1) + 1} per token")


def top_tokens(enc, logits, k=5):
    """The k likeliest tokens of (vocab,) logits and their probabilities, on one line."""
    top = torch.topk(torch.softmax(logits.float(), -1), min(k, logits.numel()))
    return "  ".join(f"{enc.decode([i])!r} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))


class StepPrinter:
    """--show_steps, as the Velocity's callback: per token, a line per solver step with the prediction it
    integrated towards (its last path evaluation's logits and their t: midpoint's is mid-step), then the
    t = 1 read-out the token is drawn from, then (token()) the token."""

    def __init__(self, enc, cfg):
        self.enc, self.steps, self.t = enc, 0, 0.0
        self.how = "argmax" if cfg["temperature"] == 0 else \
            f"drawn at temperature {cfg['temperature']:g}" + (f" among the top {cfg['top_k']}" if cfg["top_k"] else "")

    def step(self, info):
        if info.get("readout"):
            print(f"    {'read-out':<9} {'t = 1':<18}  {'evaluated at t=1':<21}: {top_tokens(self.enc, info['logits'][0])}")
            return
        self.steps += 1
        t_from, self.t = self.t, info["t"][0].item()
        print(f"    {f'step {self.steps}':<9} t {t_from:.4f} -> {self.t:.4f}  "
              f"evaluated at t={info['logits_t'][0].item():.4f}: {top_tokens(self.enc, info['logits'][0])}")

    def token(self, token, nfe):  # no read-out line where no ODE ran (--steps 1, a GPT): the base's logits
        print(f"  token: {self.enc.decode([token])!r} ({self.how}; NFE {nfe})")
        self.steps, self.t = 0, 0.0


class Progress:
    """For a long run, tokens done of `total` and an ETA on stderr: a line once `after` seconds have passed,
    then one every `every` seconds; nothing for a short run. `done` counts the token being drawn by how far
    its ODE is (t), so that a run of many steps shows progress within its first token. The ETA is an upper
    bound: it counts every sample to max_new_tokens, where a sample may stop early at the end token."""

    def __init__(self, total, after=5.0, every=10.0, stream=None, clock=time.monotonic):
        self.total, self.every, self.clock = total, every, clock
        self.stream = sys.stderr if stream is None else stream
        self.start = clock()
        self.next = self.start + after
        # on the terminal stdout streams the text to, start on a line of our own, not inside the text
        self.shared = self.stream.isatty() and sys.stdout.isatty()

    def update(self, done, midline=False):
        now, left = self.clock(), self.total - done
        if now < self.next or not 0 < done < self.total:
            return
        self.next = now + self.every
        elapsed = now - self.start
        self.stream.write(("\n" if self.shared and midline else "") + f"[{done:.6g} tokens in "
                          f"{tqdm.format_interval(elapsed)}; at most {left:.6g} to go, about "
                          f"{tqdm.format_interval(elapsed / done * left)}]\n")
        self.stream.flush()


def write_samples(model, enc, cfg, start, idx, max_new_tokens, stop, labels):
    """Print --num_samples continuations of the prompt, token by token, with each token's NFE."""
    is_l2d = isinstance(model, L2D)
    printer = StepPrinter(enc, cfg) if cfg["show_steps"] else None
    progress, done = Progress(cfg["num_samples"] * max_new_tokens), 0

    def report(t=0.0):  # t: how far the ODE of the token being drawn is, 0 -> 1
        progress.update(done + t, midline=not printer and not (printed or start).endswith("\n"))

    def on_step(info):  # the Velocity's callback, after each solver step and the read-out
        if printer:
            printer.step(info)
        report(info["t"][0].item())

    ode = dict(steps=cfg["steps"], solver=cfg["solver"], atol=cfg["atol"], rtol=cfg["rtol"], estimate=cfg["estimate"],
               guidance=cfg["guidance"], labels=labels, callback=on_step) if is_l2d else {}
    for sample in range(cfg["num_samples"]):
        print(f"--- sample {sample + 1} of {cfg['num_samples']}: {sample_header(cfg, is_l2d)}")
        print(start, end="\n" if printer else "", flush=True)
        out, nfes, printed = [], [], ""
        for token, nfe in model.generate(idx, max_new_tokens, temperature=cfg["temperature"], top_k=cfg["top_k"], **ode):
            out.append(token.item())
            nfes.append(nfe.item())
            done += 1
            report()
            if printer:
                printer.token(out[-1], nfes[-1])
            if out[-1] in stop:
                break
            text = enc.decode(out)  # decode the whole answer: a character may span several tokens
            if not printer:
                print(text[len(printed):], end="", flush=True)
            printed = text
        print(f"\n[{len(out)} tokens; NFE per token: {nfes}; mean {sum(nfes) / max(1, len(nfes)):.1f}]")


def sample_ar2diff(model, enc, cfg, start, idx, stop):
    """AR2Diff: --num_samples answers, each the best scored of --candidates after --steps refinements."""
    steps, K, L = cfg["steps"], cfg["candidates"], model.config.answer_len
    stops = stop | {model.config.end_token}

    def show(info):  # --show_steps: every candidate after each refinement step
        texts = (repr(enc.decode(until_end(c, stops))) for c in info["tokens"][0].tolist())
        print(f"    step {info['step']:>3}: " + "  ".join(texts))

    for sample in range(cfg["num_samples"]):
        print(f"--- sample {sample + 1} of {cfg['num_samples']}: AR2Diff, {steps} refinement step{'s' if steps > 1 else ''} "
              f"of the {L}-token answer span, {K} candidate{'s' if K > 1 else ''} in parallel, drawn at temperature "
              f"{cfg['temperature']:g}: {steps + (K > 1)} passes over the span" +
              (", the last scoring the candidates (the lowest cross-entropy is kept)" if K > 1 else ""))
        print(start, end="\n" if cfg["show_steps"] else "", flush=True)
        t0 = time.perf_counter()
        span, score = model.generate(idx, steps=steps, samples=K, temperature=cfg["temperature"],
                                     callback=show if cfg["show_steps"] else None)
        seconds = time.perf_counter() - t0
        answer = until_end(span[0].tolist(), stops)
        print(f"  answer: {enc.decode(answer)!r}" if cfg["show_steps"] else enc.decode(answer))
        print(f"[{len(answer)} tokens before the end token; score {score.item():.3f}; {seconds:.2f} s]")


def main(argv=None):
    cfg = configure(OPTIONS, argv)
    dtype = check(cfg)
    start = read_prompt(cfg["start"])
    model, enc, classes = load(cfg)
    merge_lora(model).to(cfg["device"])  # LoRA folded into its weights: a path evaluation costs a plain layer's
    store_weights(model, dtype)  # nothing trains here: every weight in dtype, but the norms
    if cfg["temperature"] is None:
        cfg["temperature"] = TEMPERATURE if isinstance(model, AR2Diff) else 0.8
    labels = guidance_labels(model, cfg, classes)
    if cfg["chat"]:
        if not has_chat_template(enc):
            raise UsageError(f"{cfg['init_from']}'s tokenizer has no chat template; drop --chat")
        start = chat_prompt(enc, start)
    prompt = enc.encode(start, allowed_special="all")
    stop = stop_tokens(enc)  # the end of the answer, and any end of text
    context = (model.base if isinstance(model, (L2D, AR2Diff)) else model).config.block_size
    span = model.config.answer_len if isinstance(model, AR2Diff) else 1  # AR2Diff writes its whole answer at once
    if len(prompt) + span > context:
        raise UsageError(f"the prompt has {len(prompt)} tokens, too many for the model's context of {context} with "
                         f"{span} to write; shorten --start")
    if isinstance(model, L2D) and not model.merge_gate[-1].weight.any():
        # adaLN-Zero, as L2D initialises it: w(c_t) - w(c_0) = 0 at every t, so h = h_main and no logit changes
        print("note: this diffusion path is untrained (fresh, its merge gate exactly zero): it generates as the base "
              "does at any --steps; train one with train.py")
    torch.manual_seed(cfg["seed"])
    idx = torch.tensor([prompt], device=cfg["device"])
    with autocast(cfg["device"], dtype):
        if isinstance(model, AR2Diff):
            return sample_ar2diff(model, enc, cfg, start, idx, stop)
        write_samples(model, enc, cfg, start, idx, min(cfg["max_new_tokens"], context - len(prompt)), stop, labels)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
    except KeyboardInterrupt:  # what was printed stays; the rest is not wanted
        print("error: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
