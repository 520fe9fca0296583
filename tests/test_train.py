"""train.py and checkpoint.py end to end, on tiny models and tiny char-level arithmetic data (CPU):
data-parallel training equals one process, resume is bit-exact, checkpoints hold what they should
and load back, bad checkpoints and bad command lines give one-line errors, saves are atomic.

Most runs call train.main in this process (one thread); the data-parallel runs and the exit-code
checks run train.py as a subprocess (torch.distributed.run, gloo on CPU)."""
import contextlib
import errno
import io
import math
import os
import re
import shutil
import sys

import pytest
import torch

import forkrun
import train
from loading.checkpoint import load, load_model, read_checkpoint, save_checkpoint
from data.dataset import TokenDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from data.arithmetic.prepare import prepare  # noqa: E402

TINY = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=64", "--flow_dim=16", "--lora_rank=4",
        "--batch_size=8", "--micro_batch=4", "--warmup_iters=2", "--learning_rate=1e-3",
        "--eval_examples=8", "--eval_interval=1000", "--log_interval=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")

def path_logits(l2d, idx, x_t, t, labels=None):
    """The path's logits at every position for explicit diffusion tokens x_t (B, T, d_f) at t (B, T)."""
    h_main, cache = l2d.base.trunk(idx)
    return l2d.predict(h_main, cache, x_t, t, l2d.conditioning(t, labels))



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    with contextlib.redirect_stdout(io.StringIO()):
        return prepare("char", out=str(tmp_path_factory.mktemp("data")), n_train=256, n_test=32)


@pytest.fixture(scope="module")
def base_ckpt(data, tmp_path_factory):
    """The ckpt.pt of a tiny GPT trained from scratch for 3 steps (method=ar): the base of the l2d,
    lora and full runs."""
    out = tmp_path_factory.mktemp("ar")
    run_train(*TINY, f"--datasets={[data]}", "--init_from=scratch", "--method=ar", "--max_iters=3", f"--out_dir={out}")
    return str(out / "ckpt.pt")


def run_train(*args):
    """train.main(args) in this process, on one thread (fastest for tiny models, and the machine is
    shared). Returns (the model it trained, its log)."""
    built, make_optimizer, threads = [], train.make_optimizer, torch.get_num_threads()

    def capture(model, *a, **k):  # the model trained: built afresh or loaded to resume
        built.append(model)
        return make_optimizer(model, *a, **k)

    train.make_optimizer, log = capture, io.StringIO()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(), contextlib.redirect_stdout(log):
            train.main([str(a) for a in args])
    finally:
        train.make_optimizer = make_optimizer
        torch.set_num_threads(threads)
    return built[0], log.getvalue()


def run_script(*args, ddp=False):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if ddp else []
    return forkrun.run([sys.executable, *launcher, "train.py", *map(str, args)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)


def logged(log):
    """{iter: (loss, lr)} from the training log, and the validation lines."""
    steps = {int(m[1]): (float(m[2]), m[3]) for m in re.finditer(r"iter (\d+): loss ([\d.]+), lr (\S+),", log)}
    return steps, re.findall(r"val loss .*", log)


def method_args(method, data, base_ckpt):
    init = "scratch" if method == "ar" else base_ckpt
    return TINY + [f"--datasets={[data]}", f"--method={method}", f"--init_from={init}"]


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- data parallel = one process ------------------------------------------------------------------

@pytest.mark.parametrize("method,dtype", [("l2d", "float32"), ("ar", "float32"), ("ar2diff", "float32"), ("l2d", "bfloat16")])
def test_ddp_matches_one_process(method, dtype, data, base_ckpt, tmp_path):
    """2 processes x 2 micro-steps each = 1 process x 4 micro-steps on the same global batch: the same
    examples, the same t/noise/label dropout per example (seeded by its place), gradients averaged alike.
    Only the order of summing micro-batch gradients differs. Adam turns that rounding into update
    differences of up to ~1% of lr where a gradient is near its eps (e.g. the zero-initialised merge
    gate), hence a small lr: the runs then agree to ~1e-8, while a wrong t/noise, batch or gradient
    average moves parameters by ~lr = 1e-5 a step."""
    args = method_args(method, data, base_ckpt) + ["--variant=full", "--micro_batch=2", "--max_iters=3",
                                                   "--learning_rate=1e-5", f"--dtype={dtype}"]
    ddp = run_script(*args, f"--out_dir={tmp_path / 'ddp'}", ddp=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    _, one_log = run_train(*args, f"--out_dir={tmp_path / 'one'}")
    assert "1 process(es)" in one_log

    a = read_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))["state_dict"]
    b = read_checkpoint(str(tmp_path / "one" / "ckpt.pt"))["state_dict"]
    diff = max_abs_diff(a, b)
    print(f"{method}: max |ddp - one process| = {diff:.2e}")
    assert diff <= 1e-6
    if method == "l2d":
        assert a["merge_gate.2.weight"].abs().max() > 1e-5  # zero-initialised: it did train
    (ddp_steps, ddp_val), (one_steps, one_val) = logged(ddp.stdout), logged(one_log)
    assert ddp_steps.keys() == one_steps.keys() == {1, 2, 3}
    for i in ddp_steps:  # logged loss is the global batch's mean, whatever the process count
        assert ddp_steps[i][0] == pytest.approx(one_steps[i][0], abs=2e-4) and ddp_steps[i][1] == one_steps[i][1]
    assert len(ddp_val) == len(one_val) == 2  # where it starts (iter 0) and after the last step
    for ddp_line, one_line in zip(ddp_val, one_val):
        assert [float(v) for v in re.findall(r"\d+\.\d+", ddp_line)] == \
            pytest.approx([float(v) for v in re.findall(r"\d+\.\d+", one_line)], abs=2e-4)


# --- resume -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["l2d", "ar", "ar2diff"])
def test_resume_is_bit_exact(method, data, base_ckpt, tmp_path):
    """4 steps straight = 2 steps, stop, --init_from=resume for 2 more: same losses, lr and weights."""
    args = method_args(method, data, base_ckpt) + ["--variant=full", "--lr_decay_iters=4", "--min_lr=1e-4"]
    _, straight = run_train(*args, "--max_iters=4", f"--out_dir={tmp_path / 'straight'}")
    _, first = run_train(*args, "--max_iters=2", f"--out_dir={tmp_path / 'split'}")
    assert read_checkpoint(str(tmp_path / "split" / "ckpt.pt"))["iter_num"] == 2
    resume = [a for a in args if not a.startswith(("--init_from", "--method", "--datasets"))]
    _, second = run_train(*resume, "--init_from=resume", "--max_iters=4", f"--out_dir={tmp_path / 'split'}")

    straight_steps, straight_val = logged(straight)
    split_steps = {**logged(first)[0], **logged(second)[0]}
    assert logged(second)[0].keys() == {3, 4}
    assert split_steps == straight_steps  # losses and lr, as printed
    assert float(straight_steps[4][1]) < float(straight_steps[3][1])  # linear decay, to lr_decay_iters=4
    assert logged(first)[1][0] == straight_val[0]  # iter 0's: where a fresh run starts
    assert logged(second)[1] == straight_val[1:]
    a = read_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = read_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert a["iter_num"] == b["iter_num"] == 4 and a["sampler"] == b["sampler"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_a_diverged_run_never_saves_non_finite_weights(data, base_ckpt, tmp_path):
    """Weights that turn non-finite in an update whose loss was still finite (Adam's inf/inf after an
    overflow; simulated here by poisoning one weight in the 3rd optimizer step) are never saved: the run stops
    with one line, and the checkpoint of the last good step stays."""
    args = method_args("l2d", data, base_ckpt) + [f"--out_dir={tmp_path}", "--eval_interval=1"]
    make_optimizer = train.make_optimizer

    def overflowing_optimizer(model, cfg, device):
        optimizer = make_optimizer(model, cfg, device)
        step, steps = optimizer.step, []

        def overflowing_step(*a, **k):
            out = step(*a, **k)
            steps.append(1)
            if len(steps) == 3:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("nan"))
            return out

        optimizer.step = overflowing_step
        return optimizer

    train.make_optimizer = overflowing_optimizer
    try:
        with pytest.raises(train.UsageError, match=r"not saving .*ckpt.pt: .* not finite .*keeps the last good "
                                                   r"checkpoint.*lower --learning_rate"):
            run_train(*args, "--max_iters=5")
    finally:
        train.make_optimizer = make_optimizer
    left = read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert left["iter_num"] == 2 and all(torch.isfinite(w).all() for w in left["state_dict"].values())


def test_resume_takes_the_model_from_the_checkpoint(data, base_ckpt, tmp_path):
    """What a resumed model is comes from its checkpoint's model keys, not the command line, and the saved
    config keeps the run's model settings, so config and l2d_config never disagree."""
    args = method_args("l2d", data, base_ckpt)
    run_train(*args, "--variant=full", "--sigma=8", "--max_iters=1", f"--out_dir={tmp_path}")
    resume = [a for a in args if not a.startswith(("--init_from", "--method", "--datasets"))]
    model, _ = run_train(*resume, "--init_from=resume", "--variant=lora", "--sigma=99", "--lora_rank=2",
                         "--max_iters=2", f"--out_dir={tmp_path}")
    assert (model.config.variant, model.config.sigma, model.config.lora_rank) == ("full", 8.0, 4)
    ckpt = read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["l2d_config"]["sigma"] == ckpt["config"]["sigma"] == 8.0 and ckpt["config"]["variant"] == "full"
    loaded, _, ckpt = load(str(tmp_path))  # a folder holding a ckpt.pt
    assert ckpt["iter_num"] == 2 and loaded.config.sigma == 8.0


@pytest.mark.parametrize("method", ["l2d", "lora"])
def test_bf16_training_stores_the_frozen_base_in_bf16_and_resumes_bit_exact(method, data, base_ckpt, tmp_path):
    """--dtype=bfloat16: the frozen base in bf16, what trains in float32 (master weights, saved as such), a loss
    near the float32 run's, resume bit for bit, and a checkpoint that loads as the float32 one does."""
    args = method_args(method, data, base_ckpt) + ["--lr_decay_iters=4", "--min_lr=1e-4"]
    fp32_model, fp32_log = run_train(*args, "--max_iters=4", f"--out_dir={tmp_path / 'fp32'}")
    model, straight = run_train(*args, "--dtype=bfloat16", "--max_iters=4", f"--out_dir={tmp_path / 'straight'}")
    assert next(line for line in straight.splitlines() if "process(es)" in line).endswith(", bfloat16")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        norm = ".ln_" in name or "ln_f" in name
        assert p.dtype == (torch.float32 if name in trained or norm else torch.bfloat16), name
    fp32_steps, bf16_steps = logged(fp32_log)[0], logged(straight)[0]
    for i in fp32_steps:  # the same recipe in another number format
        assert bf16_steps[i][0] == pytest.approx(fp32_steps[i][0], rel=0.02)
    assert bf16_steps != fp32_steps  # (and it did run in bf16)

    _, first = run_train(*args, "--dtype=bfloat16", "--max_iters=2", f"--out_dir={tmp_path / 'split'}")
    resume = [a for a in args if not a.startswith(("--init_from", "--method", "--datasets"))]
    _, second = run_train(*resume, "--dtype=bfloat16", "--init_from=resume", "--max_iters=4", f"--out_dir={tmp_path / 'split'}")
    assert {**logged(first)[0], **logged(second)[0]} == bf16_steps
    a = read_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))["state_dict"]
    b = read_checkpoint(str(tmp_path / "split" / "ckpt.pt"))["state_dict"]
    assert a.keys() == b.keys() == trained
    for k in a:
        assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    loaded, _, _ = load_model(str(tmp_path / "straight" / "ckpt.pt"))  # the base's fingerprint is the float32 one
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


# --- what a checkpoint holds ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["l2d", "lora", "ar", "full", "ar2diff"])
def test_checkpoint_contents_and_load_model(method, data, base_ckpt, tmp_path):
    model, _ = run_train(*method_args(method, data, base_ckpt), "--max_iters=2", f"--out_dir={tmp_path}")
    ckpt = read_checkpoint(str(tmp_path / "ckpt.pt"))
    saved = ckpt["state_dict"]
    if method in ("l2d", "lora"):  # only what trained; the base is rebuilt from init_from
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert saved.keys() == trainable
        assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = model.base if method == "l2d" else model
        after = {k.replace(".base.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
        source = read_checkpoint(base_ckpt)["state_dict"]
        assert after.keys() == source.keys()
        for k in source:  # the frozen base is bit for bit what it was
            assert torch.equal(after[k], source[k]), k
    else:  # the whole model
        assert saved.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        if k in saved:
            assert torch.equal(saved[k], v), k

    loaded, tokenizer, _ = load_model(str(tmp_path / "ckpt.pt"))
    assert type(loaded) is type(model) and not loaded.training
    x, y, labels = TokenDataset([data], "test").get_batch(range(4), 64)
    model.eval()
    with torch.no_grad():
        if method == "l2d":
            g = torch.Generator().manual_seed(0)
            t = torch.rand(x.shape, generator=g)
            x_t = torch.randn(*x.shape, model.config.flow_dim, generator=g)
            want, got = path_logits(model, x, x_t, t, labels), path_logits(loaded, x, x_t, t, labels)
        elif method == "ar2diff":  # the same corrupted spans for both: the same seed
            assert loaded.config == model.config
            prompt, pad, answer = TokenDataset([data], "test").prompt_answer_batch(range(4), model.config.answer_len)
            outputs = []
            for m in (model, loaded):
                torch.manual_seed(0)
                outputs.append(m(prompt, pad, answer)[0])
            want, got = outputs
        else:
            want, got = model(x)[0], loaded(x)[0]
    assert torch.equal(want, got)
    assert tokenizer.encode("What is 1 + 2?") == TokenDataset([data], "test").tokenizer.encode("What is 1 + 2?")


@pytest.mark.parametrize("guidance_classes", [False, True])
def test_class_embedding_only_with_guidance_classes(guidance_classes, data, base_ckpt, tmp_path):
    """A single-class dataset (every prepare.py writes a class) trains no class embedding unless asked."""
    model, _ = run_train(*method_args("l2d", data, base_ckpt), "--max_iters=1", f"--out_dir={tmp_path}",
                         f"--guidance_classes={guidance_classes}")
    ckpt = read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert (model.class_embed is not None) == guidance_classes
    assert ckpt["l2d_config"]["num_classes"] == len(ckpt["classes"]) == int(guidance_classes)
    assert any(k.startswith("class_embed") for k in ckpt["state_dict"]) == guidance_classes
    assert (load_model(str(tmp_path / "ckpt.pt"))[0].class_embed is not None) == guidance_classes


def test_checkpoint_from_before_the_official_defaults(data, base_ckpt, tmp_path):
    """Checkpoints written before training followed the official code (their config has no
    guidance_classes; a class embedding for the data's one class) still load for sampling and eval,
    with their class embedding."""
    run_train(*method_args("l2d", data, base_ckpt), "--max_iters=1", f"--out_dir={tmp_path}", "--guidance_classes=True")
    path = str(tmp_path / "ckpt.pt")
    ckpt = read_checkpoint(path)
    del ckpt["config"]["guidance_classes"]
    for key in ("beta1", "beta2"):
        ckpt["config"][key] = 0.9 if key == "beta1" else 0.999
    save_checkpoint(path, ckpt)
    model, _, _ = load_model(path)
    assert model.class_embed is not None
    assert torch.equal(model.class_embed.weight, ckpt["state_dict"]["class_embed.weight"])


# --- bad checkpoints, bad command lines -------------------------------------------------------------

def corrupt(src, dst, how):
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[:len(data) // 2] if how == "truncated" else bytes(range(256)) * 8)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_read_checkpoint_rejects_bad_files(how, base_ckpt, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    corrupt(base_ckpt, path, how)
    with pytest.raises(ValueError) as e:
        read_checkpoint(path)
    assert path in str(e.value) and "corrupted" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"something": 1}, path)
    with pytest.raises(ValueError, match="not an l2d checkpoint"):
        read_checkpoint(path)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_resume_from_bad_checkpoint_exits_2(how, base_ckpt, tmp_path):
    if how == "truncated":
        corrupt(base_ckpt, tmp_path / "ckpt.pt", how)
    result = run_script("--init_from=resume", f"--out_dir={tmp_path}", "--device=cpu")
    assert_one_line_error(result, str(tmp_path / "ckpt.pt"), "corrupted" if how == "truncated" else "not found")


@pytest.mark.parametrize("arg, words", [("--nonsense=1", ["unknown option --nonsense"]),
                                        ("--method=nonsense", ["--method must be one of l2d, lora", "'nonsense'"])])
def test_cli_errors_exit_2(arg, words):
    assert_one_line_error(run_script(arg), *words)


def test_usage_errors(data):
    with pytest.raises(train.UsageError, match="frozen base"):  # its checkpoint could not be loaded
        train.main(TINY + [f"--datasets={[data]}", "--method=l2d", "--init_from=scratch"])
    with pytest.raises(train.UsageError, match="multiple of micro_batch"):
        train.main(TINY + [f"--datasets={[data]}", "--method=ar", "--init_from=scratch", "--micro_batch=3"])
    with pytest.raises(ValueError, match="answer span .--answer_len 60. do not fit block_size 64"):  # ar2diff.py's
        train.main(TINY + [f"--datasets={[data]}", "--method=ar2diff", "--init_from=scratch", "--answer_len=60"])
    with pytest.raises(train.UsageError, match="--answer_len must be >= 0"):
        train.main(TINY + [f"--datasets={[data]}", "--method=ar2diff", "--init_from=scratch", "--answer_len=-1"])
    with pytest.raises(ValueError, match="--answer_len 1 is shorter than every train answer"):  # trains no end
        train.main(TINY + [f"--datasets={[data]}", "--method=ar2diff", "--init_from=scratch", "--answer_len=1"])


def test_ar2diff_answer_span_defaults_to_the_longest_train_answer(data, tmp_path):
    model, log = run_train(*TINY, f"--datasets={[data]}", "--method=ar2diff", "--init_from=scratch", "--max_iters=1",
                           f"--out_dir={tmp_path}")
    train_data = TokenDataset([data], "train")
    assert model.config.answer_len == train_data.answer_lengths().max()
    assert (model.config.vocab_size, model.config.end_token) == (train_data.vocab_size, train_data.eot)
    assert "val loss" in log and "(pass 1), by corruption rate: " in log
    assert read_checkpoint(str(tmp_path / "ckpt.pt"))["ar2diff_config"]["answer_len"] == model.config.answer_len


# --- atomic save ------------------------------------------------------------------------------------

def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    old = dict(method="ar", state_dict={"w": torch.arange(1000.0)})
    save_checkpoint(path, old)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], old["state_dict"]["w"])
    before = open(path, "rb").read()

    def dies_midway(obj, f, *args, **kwargs):  # torch.save may be handed a path or an open file
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(ValueError, match="cannot write .*ckpt.pt: the disk is full; the previous file is unchanged"):
        save_checkpoint(path, dict(method="ar", state_dict={"w": torch.zeros(1000)}))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    assert open(path, "rb").read() == before
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], old["state_dict"]["w"])


# --- a user's files -------------------------------------------------------------------------------

def test_existing_checkpoint_is_not_overwritten(data, base_ckpt, tmp_path):
    args = method_args("l2d", data, base_ckpt) + [f"--out_dir={tmp_path}"]
    run_train(*args, "--max_iters=2")
    before = open(tmp_path / "ckpt.pt", "rb").read()
    with pytest.raises(train.UsageError, match="already exists.*--init_from=resume.*--overwrite=True"):
        run_train(*args, "--max_iters=1")
    assert open(tmp_path / "ckpt.pt", "rb").read() == before
    run_train(*args, "--max_iters=1", "--overwrite=True")
    assert read_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 1
    (tmp_path / "file").write_text("")
    with pytest.raises(train.UsageError, match="is a file"):  # refused before any training
        run_train(*args, f"--out_dir={tmp_path / 'file'}", "--max_iters=1")


def test_non_finite_loss_stops_before_the_update(data, base_ckpt, tmp_path):
    """An absurd lr blows the weights up; training stops at the first non-finite loss, before that
    step's update and before any save, so the checkpoint from the last good evaluation stays."""
    args = method_args("ar", data, base_ckpt) + [f"--out_dir={tmp_path}", "--eval_interval=1", "--warmup_iters=0"]
    run_train(*args, "--max_iters=1")
    good = read_checkpoint(str(tmp_path / "ckpt.pt"))
    with pytest.raises(train.UsageError, match=r"loss became (nan|inf) at iter \d+ .*last good checkpoint"):
        run_train(*args, "--init_from=resume", "--max_iters=50", "--learning_rate=1e12")
    after = read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in after["state_dict"].values())
    assert after["iter_num"] >= good["iter_num"]


def test_a_changed_base_or_vocabulary_is_refused(data, base_ckpt, tmp_path):
    """An l2d checkpoint records its base's weights, a checkpoint its vocabulary file: after either
    changes (the base resumed or retrained, prepare.py re-run), loading and resuming refuse in one line."""
    base = str(tmp_path / "base.pt")
    save_checkpoint(base, read_checkpoint(base_ckpt))
    args = method_args("l2d", data, base) + [f"--out_dir={tmp_path / 'l2d'}"]
    run_train(*args, "--max_iters=1")
    l2d = str(tmp_path / "l2d" / "ckpt.pt")
    load_model(l2d)  # unchanged: loads
    changed = read_checkpoint(base)
    name = next(k for k in changed["state_dict"] if "mlp" in k)  # not the tied embedding
    changed["state_dict"][name] = changed["state_dict"][name] + 1e-3
    save_checkpoint(base, changed)
    with pytest.raises(ValueError, match="another version of its base"):
        load_model(l2d)
    assert_one_line_error(run_script("--init_from=resume", f"--out_dir={tmp_path / 'l2d'}", "--device=cpu"),
                          "another version of its base")

    vocab_data = tmp_path / "data"
    shutil.copytree(data, vocab_data)
    run_train(*method_args("ar", str(vocab_data), base_ckpt), "--max_iters=1", f"--out_dir={tmp_path / 'ar'}")
    load_model(str(tmp_path / "ar" / "ckpt.pt"))
    vocab = vocab_data / "vocab.json"
    vocab.write_text(vocab.read_text().replace("1", "!", 1))  # e.g. prepare.py re-run on other text
    with pytest.raises(ValueError, match="vocabulary .* has changed"):
        load_model(str(tmp_path / "ar" / "ckpt.pt"))


# --- a diverged run, an lr beyond float32, a damaged --init_from (issue #29) ----------------------------

def test_a_collapsed_run_warns_and_never_saves_over_a_better_checkpoint(data, tmp_path):
    """--learning_rate 1e6 collapses the model to uniform (val loss ln V, far above where it started): one
    warning line, and the better checkpoint is kept, resumed or not."""
    args = TINY + [f"--datasets={[data]}", f"--out_dir={tmp_path / 'ar'}"]
    run_train(*args, "--method=ar", "--init_from=scratch", "--max_iters=30", "--learning_rate=1e-2")
    good_path = tmp_path / "ar" / "ckpt.pt"
    good = good_path.read_bytes()
    _, log = run_train(*args, "--init_from=resume", "--max_iters=32", "--learning_rate=1e6")
    val = float(re.findall(r"iter 32: val loss ([\d.]+)", log)[0])
    assert val == pytest.approx(math.log(TokenDataset([data], "test").vocab_size), abs=1e-3)  # uniform
    warnings = [line for line in log.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "far above the best" in warnings[0] and "lower --learning_rate" in warnings[0]
    assert warnings[0].endswith(f"{good_path} not saved, it keeps iter 30")
    assert good_path.read_bytes() == good

    with pytest.raises(train.UsageError, match=r"^the run diverged: every val loss after iter 0 was far above its "
                                               r"[\d.]+, so nothing was saved in .*full; lower --learning_rate$"):
        run_train(*TINY, f"--datasets={[data]}", f"--init_from={good_path}", "--method=full", "--max_iters=2",
                  "--learning_rate=1e6", f"--out_dir={tmp_path / 'full'}")  # a fresh run: its iter 0 is the best
    assert not (tmp_path / "full" / "ckpt.pt").exists()


def test_a_learning_rate_beyond_float32_is_one_line(data, tmp_path):
    result = run_script(*TINY, f"--datasets={[data]}", "--method=ar", "--init_from=scratch", "--max_iters=1",
                        "--learning_rate=1e39", f"--out_dir={tmp_path}")  # Adam's step would overflow float32
    assert_one_line_error(result, "--learning_rate", "float32", "1e-4")
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("damage, words", [("no_tokenizer", ["lacks tokenizer"]),
                                           ("wrong_shape", ["does not match its model", "shape: wte.weight"])])
def test_a_damaged_init_from_is_one_line(damage, words, data, base_ckpt, tmp_path):
    """A checkpoint without a key its model needs, or with a weight of another shape: one line naming the
    file, from the loader, so train.py, sample.py and eval.py all say it."""
    ckpt, path = read_checkpoint(base_ckpt), str(tmp_path / "damaged.pt")
    if damage == "no_tokenizer":
        del ckpt["tokenizer"]
    else:
        ckpt["state_dict"]["wte.weight"] = ckpt["state_dict"]["wte.weight"][:3]
    save_checkpoint(path, ckpt)
    with pytest.raises(ValueError, match="|".join(words)):
        load_model(path)
    result = run_script(*TINY, f"--datasets={[data]}", "--method=l2d", f"--init_from={path}", "--max_iters=1",
                        f"--out_dir={tmp_path / 'out'}", "--device=cpu")
    assert_one_line_error(result, path, *words)


def test_l2d_on_lora_freezes_the_lora_finetune_merged_as_its_base(data, base_ckpt, tmp_path):
    """The paper's "L2D on LoRA": a lora run's ckpt.pt as --init_from is its GPT with W + scale B A merged in.
    Its base must compute what the LoRA model computes (the unmerged forward, an independent path), and
    steps = 1 must be exactly that base."""
    lora_dir, l2d_dir = tmp_path / "lora", tmp_path / "l2d"
    run_train(*method_args("lora", data, base_ckpt), "--max_iters=3", f"--out_dir={lora_dir}")
    lora_model, _, _ = load(str(lora_dir / "ckpt.pt"))
    assert any(p.abs().sum() > 0 for n, p in lora_model.named_parameters() if "lora_B" in n)  # it did train
    run_train(*TINY, f"--datasets={[data]}", "--method=l2d", f"--init_from={lora_dir / 'ckpt.pt'}", "--max_iters=2",
              f"--out_dir={l2d_dir}")
    l2d, _, ckpt = load(str(l2d_dir / "ckpt.pt"))
    assert ckpt["init_from"] == str(lora_dir / "ckpt.pt") and not any(
        "lora_" in name for name, _ in l2d.base.named_parameters())  # merged: a plain GPT
    idx = torch.randint(0, 16, (2, 12))
    with torch.no_grad():
        reference, _ = lora_model(idx, idx)  # logits at every position of the unmerged LoRA model
        h_main, _ = l2d.base.trunk(idx)
        torch.testing.assert_close(l2d.base.head(h_main), reference, atol=1e-5, rtol=1e-5)
        token, nfe = next(l2d.generate(idx, 1, steps=1))
        assert torch.equal(token, reference[:, -1].argmax(-1)) and not nfe.any()
