r"""
Generate text, spending `--steps` diffusion steps on every new token.
    python sample.py --steps 8                                    # embedded default, fresh path
    python sample.py --init_from out-quick-l2d/ckpt.pt --steps 16 --start "Question: What is 47 + 85?\nAnswer: "
    python sample.py --init_from out-quick-l2d/ckpt.pt --steps 16 --solver dopri5 --show_steps --max_new_tokens 8
    python sample.py --init_from gpt2 --start FILE:prompt.txt --temperature 0.8 --top_k 50 --num_samples 2
    python sample.py --chat --start "What is the capital of France?"   # instruct chat template
    python sample.py --init_from out-lab-ar2diff/ckpt.pt --steps 10 --candidates 8 --start "Question: What is 12 * 34?\nAnswer: "

--init_from: an L2D checkpoint (train.py, method=l2d), an AR2Diff checkpoint (method=ar2diff), another
checkpoint (a plain GPT: steps=1 only), or a base model (smollm2-135m, gpt2..., a Hugging Face folder),
which gets a fresh diffusion path: its merge gate is exactly zero, so it generates as the base does at
any number of steps (the output says so). --steps 1 is the base itself; N > 1 integrates the ODE on
linspace(0, 1, N) with --solver, or adaptively with --solver dopri5 (--atol/--rtol). Each token's path
evaluations (NFE) are printed; --show_steps prints the prediction at every solver step and at the t = 1
read-out the token is drawn from (--temperature / --top_k; 0: argmax). Long runs report progress on stderr.
AR2Diff (ar2diff.py) refines its whole answer span --steps times, --candidates in parallel, each step
redrawing every token at --temperature (default 0.2, the paper's), and prints the best scored one;
--max_new_tokens, --top_k, --solver and --estimate do not apply to it.
"""

import math
import sys
import time

import torch
from tqdm import tqdm

from ar2diff import TEMPERATURE, AR2Diff, until_end
from loading import checkpoint
from configurator import UsageError, configure, fail
from diffusion import ADAPTIVE_T_END, L2D, L2DConfig
from lora import merge_lora
from loading.precision import autocast, resolve_device, resolve_dtype, store_weights
from solvers import EVALUATIONS, SOLVERS
from loading.tokenizer import chat_prompt, has_chat_template, stop_tokens

OPTIONS = dict(
    init_from=("smollm2-135m", "an L2D ckpt.pt, another ckpt.pt (steps=1 only), or a base model name or HF folder"),
    start=("\n", "the prompt; FILE:path reads it from a file; a typed \\n is a newline"),
    max_new_tokens=(64, "tokens per sample at most (fewer where the context ends or the end token comes)"),
    temperature=(None, "of the draw from the logits read at t = 1 (None: 0.8; AR2Diff's step draws: 0.2); 0: argmax"),
    top_k=(50, "draw among the k likeliest tokens only; None: among all"),
    num_samples=(2, "samples of the same prompt, one after the other"),
    seed=(1337, "of the token draws and the ODE's noise, set once before the first sample"),
    chat=(False, "wrap --start in the tokenizer's chat template (instruct models)"),
    device=("cpu", "cpu, cuda, cuda:1, ..."),
    dtype=("auto", "auto (cuda: bfloat16; cpu: float32), float32, bfloat16 or float16: every weight stored in it "
           "(precision.py)"),
    # the diffusion path (an L2D model) or AR2Diff
    steps=(1, "ODE steps per token (1: the base model alone); AR2Diff: refinements of the answer"),
    candidates=(8, "AR2Diff: candidate answers refined in parallel, the best scored printed (the paper: 8)"),
    solver=("midpoint", "euler, midpoint, rk4 (fixed steps on linspace(0, 1, steps)) or dopri5 (adaptive)"),
    atol=(1e-5, "dopri5's absolute error tolerance"),
    rtol=(1e-5, "dopri5's relative error tolerance"),
    estimate=("argmax", "the ODE's estimate x_hat_1 of the clean token: argmax, sample (at temperature 1 - t) or mean"),
    guidance=(1.0, "classifier-free guidance weight (with --label); 1: none"),
    label=("", "the class to guide towards (a model trained with --guidance_classes=True)"),
    show_steps=(False, "per token, the 5 likeliest tokens at every solver step and at the t = 1 read-out"),
)


def check(cfg):
    if cfg["steps"] < 1:
        raise UsageError(f"--steps must be at least 1 (1 = the base model), got {cfg['steps']}")
    if cfg["solver"] not in SOLVERS:
        raise UsageError(f"unknown --solver {cfg['solver']!r}; use one of {', '.join(SOLVERS)}")
    if cfg["atol"] <= 0 or cfg["rtol"] <= 0:
        raise UsageError("--atol and --rtol must be positive")
    if cfg["estimate"] not in ("argmax", "sample", "mean"):
        raise UsageError(f"unknown --estimate {cfg['estimate']!r}; use argmax, sample or mean")
    t = cfg["temperature"]  # None (the default) takes any type: check it is a number here
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf):
        raise UsageError(f"--temperature must be a finite number >= 0 (0: argmax), got {t!r}")
    if cfg["top_k"] is not None and cfg["top_k"] < 1:
        raise UsageError(f"--top_k must be at least 1 (or None: no cut), got {cfg['top_k']}")
    for key in ("max_new_tokens", "num_samples", "candidates"):
        if cfg[key] < 1:
            raise UsageError(f"--{key} must be at least 1, got {cfg[key]}")
    if cfg["guidance"] != 1.0 and not cfg["label"]:
        raise UsageError("--guidance needs --label NAME (the class to guide towards)")
    if not cfg["start"]:
        raise UsageError('--start is empty; give a prompt, e.g. --start "Once upon a time" (the default is a newline)')
    return resolve_dtype(cfg["dtype"], resolve_device(cfg["device"]))


def load(cfg):
    """(model, tokenizer, class names): an L2D model where there is one, else a GPT. A base model gets a
    freshly initialised diffusion path."""
    model, tokenizer, ckpt = checkpoint.load(cfg["init_from"])
    if ckpt is None:
        torch.manual_seed(cfg["seed"])  # the fresh path's W_v sets V, and so dopri5's steps: the same every run
        return L2D(model, L2DConfig()), tokenizer, []
    return model, tokenizer, ckpt.get("classes", [])


def read_prompt(cfg):
    """The text of --start; FILE:path reads it from a file (before the model is loaded, to fail early)."""
    start = cfg["start"]
    if not start.startswith("FILE:"):
        return start.replace("\\n", "\n")  # a shell passes --start "Q\nA" as a backslash and an n
    try:
        with open(start[5:], encoding="utf-8") as f:
            text = f.read()
    except OSError:
        raise UsageError(f"prompt file {start[5:]} not found") from None
    if not text:
        raise UsageError(f"prompt file {start[5:]} is empty; write the prompt in it")
    return text


def untrained(model):
    """True when the path cannot change a logit: the merge gate's last layer is exactly zero (adaLN-Zero,
    as L2D initialises it), so w(c_t) - w(c_0) = 0 at every t and h = h_main."""
    return not model.merge_gate[-1].weight.any()


def sample_header(cfg, is_l2d):
    """Each sample's header: the solver, what --steps means for it, and the path evaluations per token."""
    if not is_l2d:
        return f"{cfg['init_from']} itself (a GPT: no diffusion path)"
    solver, n = cfg["solver"], cfg["steps"]
    per_velocity = 1 if cfg["guidance"] == 1.0 else 2  # guidance: with the label and without
    twice = "" if per_velocity == 1 else " (x2: --guidance runs each with and without the label)"
    if solver == "dopri5":
        return (f"dopri5, atol {cfg['atol']:g}, rtol {cfg['rtol']:g}, ignoring --steps: adaptive steps from t = 0 to "
                f"{ADAPTIVE_T_END:g}, 2 path evaluations to pick the first and 6 per step tried, rejected ones included "
                f"and not shown{twice}; then the read-out at t = 1")
    if n == 1:
        return "the base model (--steps 1: no ODE, no path evaluation; the token is drawn from the base's logits)"
    per_step = EVALUATIONS[solver]
    return (f"{solver}, --steps {n}: {n - 1} step{'s' if n > 2 else ''} on linspace(0, 1, {n}), {per_step} path "
            f"evaluation{'s' if per_step > 1 else ''} each{twice}, "
            f"then the read-out at t = 1: {per_step * (n - 1) * per_velocity + 1} per token")


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
        self.how = f"drawn at temperature {cfg['temperature']:g}" + (f" among the top {cfg['top_k']}" if cfg["top_k"] else "")
        if cfg["temperature"] == 0:
            self.how = "argmax"

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
    """For a long run, tokens done and an ETA on stderr: a line once `after` seconds have passed, then
    one every `every` seconds; nothing for a short run. The ETA counts every sample to max_new_tokens, so
    it is an upper bound where a sample stops early at the end token."""

    def __init__(self, after=5.0, every=10.0, stream=None, clock=time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.every, self.clock = every, clock
        self.start = clock()
        self.next = self.start + after
        # on the terminal stdout streams the text to, start on a line of our own, not inside the text
        self.shared = self.stream.isatty() and sys.stdout.isatty()

    def update(self, done, left, midline=False):
        now = self.clock()
        if now < self.next or left == 0:
            return
        self.next = now + self.every
        elapsed = now - self.start
        self.stream.write(("\n" if self.shared and midline else "") + f"[{done} tokens in {tqdm.format_interval(elapsed)}; "
                          f"at most {left} to go, about {tqdm.format_interval(elapsed / done * left)}]\n")
        self.stream.flush()


def sample_ar2diff(model, enc, cfg, start, prompt, stop):
    """AR2Diff: --num_samples answers, each the best scored of --candidates after --steps refinements."""
    steps, K, L = cfg["steps"], cfg["candidates"], model.config.answer_len
    if len(prompt) + L > model.base.config.block_size:
        raise UsageError(f"the prompt has {len(prompt)} tokens and the answer span {L}, more than the model's context "
                         f"{model.base.config.block_size}; shorten --start")
    stops = stop | {model.config.end_token}

    def show(info):  # --show_steps: every candidate after each refinement step
        texts = (repr(enc.decode(until_end(c, stops))) for c in info["tokens"][0].tolist())
        print(f"    step {info['step']:>3}: " + "  ".join(texts))

    torch.manual_seed(cfg["seed"])
    idx = torch.tensor([prompt], device=cfg["device"])
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


def write_samples(model, enc, cfg, start, prompt, max_new_tokens, stop, labels):
    """Print --num_samples continuations of the prompt, token by token, with each token's NFE."""
    is_l2d = isinstance(model, L2D)
    printer = StepPrinter(enc, cfg) if cfg["show_steps"] else None
    torch.manual_seed(cfg["seed"])
    idx = torch.tensor([prompt], device=cfg["device"])
    progress, done = Progress(), 0
    for sample in range(cfg["num_samples"]):
        print(f"--- sample {sample + 1} of {cfg['num_samples']}: {sample_header(cfg, is_l2d)}")
        print(start, end="\n" if printer else "", flush=True)
        ode = dict(steps=cfg["steps"], solver=cfg["solver"], atol=cfg["atol"], rtol=cfg["rtol"], estimate=cfg["estimate"],
                   guidance=cfg["guidance"], labels=labels, callback=printer.step if printer else None) if is_l2d else {}
        tokens = model.generate(idx, max_new_tokens, temperature=cfg["temperature"], top_k=cfg["top_k"], **ode)
        out, nfes, printed = [], [], ""
        for token, nfe in tokens:
            out.append(token.item())
            nfes.append(nfe.item())
            done += 1
            left = max_new_tokens - len(out) + (cfg["num_samples"] - 1 - sample) * max_new_tokens
            progress.update(done, left, midline=not printer and not (printed or start).endswith("\n"))
            if printer:
                printer.token(out[-1], nfes[-1])
            if token.item() in stop:
                break
            text = enc.decode(out)  # decode the whole answer: a character may span several tokens
            if not printer:
                print(text[len(printed):], end="", flush=True)
            printed = text
        print(f"\n[{len(out)} tokens; NFE per token: {nfes}; mean {sum(nfes) / max(1, len(nfes)):.1f}]")


def guidance_labels(model, cfg, classes):
    """The --label's class (1,), or None; one line where the model cannot take --steps/--guidance/--label."""
    if isinstance(model, AR2Diff) and (cfg["guidance"] != 1.0 or cfg["label"]):
        raise UsageError(f"{cfg['init_from']} is an AR2Diff model, which has no classes; drop --guidance/--label")
    if not isinstance(model, (L2D, AR2Diff)) and (cfg["steps"] > 1 or cfg["guidance"] != 1.0):
        raise UsageError(f"{cfg['init_from']} has no diffusion path; use --steps 1, or an L2D checkpoint")
    if not cfg["label"]:
        return None
    if not classes:
        raise UsageError(f"{cfg['init_from']} was trained without guidance classes; drop --label/--guidance, "
                         "or train with --guidance_classes=True")
    if cfg["label"] not in classes:
        raise UsageError(f"unknown --label {cfg['label']!r}; this model knows {', '.join(classes)}")
    return torch.full((1,), classes.index(cfg["label"]), device=cfg["device"])


def main(argv=None):
    cfg = configure(OPTIONS, argv)
    dtype = check(cfg)
    start = read_prompt(cfg)
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
    if isinstance(model, AR2Diff):
        with autocast(cfg["device"], dtype):
            return sample_ar2diff(model, enc, cfg, start, prompt, stop)
    context = (model.base if isinstance(model, L2D) else model).config.block_size
    if len(prompt) >= context:
        raise UsageError(f"the prompt has {len(prompt)} tokens but the model's context is {context}; shorten --start")
    if isinstance(model, L2D) and untrained(model):
        print("note: this diffusion path is untrained (fresh, its merge gate exactly zero): it generates as the base "
              "does at any --steps; train one with train.py")
    with autocast(cfg["device"], dtype):  # stop where the context ends
        write_samples(model, enc, cfg, start, prompt, min(cfg["max_new_tokens"], context - len(prompt)), stop, labels)


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
