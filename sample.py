"""
Generate text, spending `--steps` diffusion steps on every new token.
    python sample.py --steps 8                                    # embedded default, fresh path
    python sample.py --init_from out-quick-l2d/ckpt.pt --steps 16 --start "Question: What is 47 + 85?\nAnswer: "
    python sample.py --steps 16 --solver dopri5 --show_steps --max_new_tokens 8
    python sample.py --init_from gpt2 --start FILE:prompt.txt --temperature 0.8 --top_k 50 --num_samples 2
    python sample.py --chat --start "What is the capital of France?"   # instruct chat template

--init_from: an L2D checkpoint (train.py, method=l2d), another checkpoint (lora/full/ar: a plain
GPT, steps=1 only), or a base model (smollm2-135m, gpt2..., a Hugging Face folder). A base model
gets a freshly initialised diffusion path, whose merge gate is exactly zero: it then generates
exactly like the base at any number of steps (the output says so).
--steps 1 is the base model itself; N > 1 integrates the ODE on linspace(0, 1, N) with --solver
(midpoint: 2 evaluations per interval), or adaptively with --solver dopri5 (--atol/--rtol).
Per generated token, the number of path evaluations (NFE) is printed.
The token is drawn from the logits read at t = 1 with --temperature / --top_k (0: argmax, what the
paper's math rows use); the official code samples it at temperature 1.0 by default.
--guidance W (with --label NAME) needs a model trained with --guidance_classes=True.
"""


import torch

from checkpoint import load_base, load_model
from configurator import UsageError, configure, fail
from diffusion import L2D, L2DConfig
from solvers import SOLVERS
from tokenizer import END_OF_TURN, chat_prompt, has_chat_template

DEFAULTS = dict(
    init_from="smollm2-135m", start="\n", max_new_tokens=64, temperature=0.8, top_k=50,
    num_samples=2, seed=1337, chat=False, device="cpu",
    steps=1, solver="midpoint", atol=1e-5, rtol=1e-5, x1="argmax", guidance=1.0, label="", show_steps=False,
)


def check(cfg):
    if cfg["steps"] < 1:
        raise UsageError(f"--steps must be at least 1 (1 = the base model), got {cfg['steps']}")
    if cfg["solver"] not in SOLVERS:
        raise UsageError(f"unknown --solver {cfg['solver']!r}; use one of {', '.join(SOLVERS)}")
    if cfg["atol"] <= 0 or cfg["rtol"] <= 0:
        raise UsageError("--atol and --rtol must be positive")
    if cfg["x1"] not in ("argmax", "sample", "mean"):
        raise UsageError(f"unknown --x1 {cfg['x1']!r}; use argmax, sample or mean")
    if cfg["temperature"] < 0 or cfg["max_new_tokens"] < 1 or cfg["num_samples"] < 1:
        raise UsageError("--temperature must be >= 0, --max_new_tokens and --num_samples >= 1")
    if cfg["guidance"] != 1.0 and not cfg["label"]:
        raise UsageError("--guidance needs --label NAME (the class to guide towards)")


def load(cfg):
    """(model, tokenizer, class names, note): an L2D model where there is one, else a GPT."""
    if cfg["init_from"].endswith(".pt"):
        model, tokenizer, ckpt = load_model(cfg["init_from"])
        return model, tokenizer, ckpt.get("classes", []), ""
    base, tokenizer = load_base(cfg["init_from"])
    model = L2D(base, L2DConfig())
    return model, tokenizer, [], ("note: a freshly initialised diffusion path (merge gate exactly zero): "
                                  "this generates exactly like the base model at any --steps")


def main(argv=None):
    cfg = configure(DEFAULTS, argv)
    check(cfg)
    model, enc, classes, note = load(cfg)
    model.to(cfg["device"])
    is_l2d = isinstance(model, L2D)
    if not is_l2d and (cfg["steps"] > 1 or cfg["guidance"] != 1.0):
        raise UsageError(f"{cfg['init_from']} has no diffusion path; use --steps 1, or an L2D checkpoint")
    labels = None
    if cfg["label"]:
        if not classes:
            raise UsageError(f"{cfg['init_from']} was trained without guidance classes; drop --label/--guidance, "
                             "or train with --guidance_classes=True")
        if cfg["label"] not in classes:
            raise UsageError(f"unknown --label {cfg['label']!r}; this model knows {', '.join(classes)}")
        labels = torch.full((1,), classes.index(cfg["label"]), device=cfg["device"])

    start = cfg["start"]
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError:
            raise UsageError(f"prompt file {start[5:]} not found") from None
    else:
        start = start.replace("\\n", "\n")  # a shell passes --start "Q\nA" as a backslash and an n
    if cfg["chat"]:
        if not has_chat_template(enc):
            raise UsageError(f"{cfg['init_from']}'s tokenizer has no chat template; drop --chat")
        start = chat_prompt(enc, start)
    prompt = enc.encode(start, allowed_special="all")
    context = (model.base if is_l2d else model).config.block_size
    if len(prompt) >= context:
        raise UsageError(f"the prompt has {len(prompt)} tokens but the model's context is {context}; shorten --start")
    max_new_tokens = min(cfg["max_new_tokens"], context - len(prompt))  # stop where the context ends
    stop = enc.encode(END_OF_TURN, allowed_special="all")[0] if has_chat_template(enc) else enc.eot_token
    if note:
        print(note)

    def show(info):  # --show_steps: the prediction being refined, one line per solver step
        probs = torch.softmax(info["logits"][0].float(), -1)
        top = torch.topk(probs, 5)
        cands = "  ".join(f"{enc.decode([i])!r} {p:.2f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"    t={info['t'][0].item():.3f}  {cands}")

    torch.manual_seed(cfg["seed"])
    idx = torch.tensor([prompt], device=cfg["device"])
    for sample in range(cfg["num_samples"]):
        print(f"--- sample {sample + 1} ({cfg['steps']} steps, {cfg['solver'] if cfg['steps'] > 1 else 'base'})")
        print(start, end="\n" if cfg["show_steps"] else "", flush=True)
        if is_l2d:
            tokens = model.generate(idx, max_new_tokens, steps=cfg["steps"], solver=cfg["solver"],
                                    atol=cfg["atol"], rtol=cfg["rtol"], x1=cfg["x1"], guidance=cfg["guidance"],
                                    labels=labels, temperature=cfg["temperature"], top_k=cfg["top_k"],
                                    callback=show if cfg["show_steps"] else None)
        else:
            tokens = ((t, torch.zeros(1, dtype=torch.long)) for t in
                      model.generate(idx, max_new_tokens, cfg["temperature"], cfg["top_k"]))
        out, nfes, printed = [], [], ""
        for token, nfe in tokens:
            out.append(token.item())
            nfes.append(nfe.item())
            if token.item() == stop:
                break
            text = enc.decode(out)  # decode the whole answer: a character may span several tokens
            if cfg["show_steps"]:
                print(f"  -> {enc.decode(out[-1:])!r} (NFE {nfe.item()})")
            else:
                print(text[len(printed):], end="", flush=True)
            printed = text
        print(f"\n[{len(out)} tokens; NFE per token: {nfes}; mean {sum(nfes) / max(1, len(nfes)):.1f}]")


if __name__ == "__main__":
    try:
        main()
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
