"""eval.py: the answer parser, the Wilson interval, teacher-forced metrics against hand computations,
the all-positions ODE against L2D.next_token, and a tiny end-to-end run on prepared arithmetic data."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import eval as ev
import forkrun
from harness import eval_rows
from ar2diff import AR2Diff, AR2DiffConfig, until_end
from loading.checkpoint import save_checkpoint
from configurator import UsageError, configure, defaults
from data.dataset import TokenDataset
from diffusion import L2D, L2DConfig, Velocity
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 37

def path_logits(l2d, idx, x_t, t, labels=None):
    """The path's logits at every position for explicit diffusion tokens x_t (B, T, d_f) at t (B, T)."""
    h_main, cache = l2d.base.trunk(idx)
    return l2d.predict(h_main, cache, x_t, t, l2d.conditioning(t, labels))



@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72", "72"),
    ("Total: 1,000 + 80\n#### 1,080", "1080"),
    ("#### -3", "-3"),
    ("#### 5\nwait, no\n#### 7", "7"),                 # the last ####
    ("#### 18 dollars, or 20 with tax", "18"),          # the first number after it
    ("so it costs 12 in all ####", "12"),               # #### without a number: the last number
    ("The answer is $1,234.50.", "1234.5"),
    ("It is $5", "5"),
    ("From 10 to -5 degrees", "-5"),
    ("10-3", "3"),                                      # a hyphen after a digit is no minus sign
    ("x is 3.0", "3"),
    ("0.50", "0.5"),
    ("-0", "0"),
    ("The answer is 42.", "42"),
    ("1,234,567 people", "1234567"),
    ("579", "579"),                                     # arithmetic: the answer is the number
    ("007", "7"),
    ("12 + 30 = 42", "42"),
    ("no number here", None),
    ("", None),
    (None, None),
])
def test_final_number(text, expected):
    assert ev.final_number(text) == expected


def test_parse_lists_and_settings():
    assert eval_rows.parse_list("steps", "1,2,4", int) == [1, 2, 4]
    assert eval_rows.parse_list("steps", (1, 2, 4), int) == [1, 2, 4]   # what configure makes of --steps 1,2,4
    assert eval_rows.parse_list("steps", 8, int) == [8]
    assert eval_rows.parse_list("guidance", "1,1.5", float) == [1.0, 1.5]
    assert eval_rows.parse_list("steps", None, int) == eval_rows.LIST_DEFAULTS["steps"]
    for bad in ("1.5", "a,b", ""):
        with pytest.raises(UsageError):
            eval_rows.parse_list("steps", bad, int)
    cfg = dict(defaults(ev.OPTIONS), steps=(1, 8), guidance=(1, 2))
    names = [eval_rows.setting_name(s) for s in eval_rows.make_settings(cfg, is_l2d=True)]
    assert names == ["steps=1", "steps=8", "steps=8 w=2"]  # steps=1 is the base: no guidance rows
    cfg = dict(defaults(ev.OPTIONS), solver="dopri5", atol=(1e-3, 1e-4), rtol=1e-3)
    assert [(s["atol"], s["rtol"], s["steps"]) for s in eval_rows.make_settings(cfg, True)] == [(1e-3, 1e-3, None), (1e-4, 1e-3, None)]
    assert len(eval_rows.make_settings(cfg, is_l2d=False)) == 1
    with pytest.raises(UsageError):
        eval_rows.make_settings(dict(defaults(ev.OPTIONS), steps=0), True)
    with pytest.raises(UsageError, match="--solver must be one of euler, midpoint, rk4, dopri5, got 'heun'"):
        configure(ev.OPTIONS, ["--solver", "heun"])
    with pytest.raises(UsageError, match="--estimate must be one of argmax, sample, mean, got 'mode'"):
        configure(ev.OPTIONS, ["--estimate", "mode"])


# --- teacher-forced metrics ------------------------------------------------------------------------
def tiny_base(family="llama", seed=0, vocab=VOCAB, block_size=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(family=family, block_size=block_size, vocab_size=vocab, n_layer=2, n_head=4,
                         n_kv_head=2 if family == "llama" else 0, n_embd=32)).eval()


def tiny_l2d(randomize, family="llama"):
    l2d = L2D(tiny_base(family), L2DConfig(variant="full", flow_dim=16, cond_dim=24, num_classes=2))
    if randomize:  # every path parameter random, the zero-initialised merge gate included
        torch.manual_seed(1)
        with torch.no_grad():
            for p in l2d.trainable_parameters():
                p.copy_(torch.randn_like(p) * 0.1)
    return l2d.eval()


# two examples of different lengths, right-padded with 0; answer targets in columns 2-7 and 1-4
X = torch.tensor([[5, 9, 2, 7, 7, 1, 30, 4], [11, 3, 8, 20, 6, 0, 0, 0]])
Y = torch.tensor([[-1, -1, 7, 7, 1, 30, 4, 0], [-1, 8, 20, 6, 0, -1, -1, -1]])
POS = torch.tensor([[2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 0, 5]])  # answer positions, then ignored ones as padding


def at_answers(logits):
    return torch.stack([logits[b, POS[b]] for b in range(len(POS))])


def by_hand(logits, y):
    """Per row of y: correct argmaxes, NLL (float64) and count over its positions != -1."""
    correct, nll, count = [0] * len(y), [0.0] * len(y), [0] * len(y)
    for b in range(y.size(0)):
        for i in range(y.size(1)):
            if y[b, i] != -1:
                log_p = torch.log_softmax(logits[b, i].double(), -1)
                nll[b] -= log_p[y[b, i]].item()
                correct[b] += int(logits[b, i].argmax() == y[b, i])
                count[b] += 1
    return correct, nll, count


def all_stats(stats, row=None):
    """What eval.py keeps of a teacher-forced batch with --diagnostics."""
    return {**ev.answer_stats(stats["logits"], stats["targets"], stats.get("nfe")), **eval_rows.token_changes(stats, row)}


def unpack(stats):
    return stats["logits"], stats["targets"], stats["nfe"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_teacher_forced_gpt_matches_hand_computation(family):
    model = tiny_base(family)
    with torch.no_grad():
        full, _ = model(X)
    correct, nll, count = by_hand(full, Y)
    logits, targets, nfe = unpack(ev.teacher_forced(model, X, Y, steps=1))
    assert torch.equal(targets, torch.stack([Y[b, POS[b]] for b in range(2)]))
    assert torch.allclose(logits, at_answers(full), atol=1e-6)
    stats = ev.answer_stats(logits, targets, nfe)
    assert (stats["correct"], stats["count"], stats["nfe"]) == (correct, count, [0, 0]) and count == [6, 4]
    assert stats["nll"] == pytest.approx(nll, rel=1e-5)
    summary = eval_rows.tf_summary(stats)
    assert (summary["tf_accuracy"], summary["tf_tokens"]) == (sum(correct) / 10, 10)
    assert summary["tf_nll"] == pytest.approx(F.cross_entropy(full.flatten(0, 1), Y.flatten(), ignore_index=-1).item(), rel=1e-5)
    nfe = torch.tensor([[3, 3, 3, 3, 3, 3], [5, 5, 5, 5, 9, 5]])  # position 4 of row 1 is padding: not counted
    assert ev.answer_stats(logits, targets, nfe)["nfe"] == [18, 20]


@pytest.mark.parametrize("solver,steps", [("midpoint", 4), ("euler", 3), ("dopri5", None)])
def test_teacher_forced_fresh_l2d_is_the_base_at_any_step_count(solver, steps):
    l2d = tiny_l2d(randomize=False)  # merge gate zero: the path cannot change the logits
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        base_logits, _ = l2d.base(X)
    one, targets, nfe1 = unpack(ev.teacher_forced(l2d, X, Y, labels, steps=1))
    many, targets_many, nfe = unpack(ev.teacher_forced(l2d, X, Y, labels, [0, 1], steps=steps, solver=solver, atol=1e-3,
                                                            rtol=1e-3))
    assert torch.equal(many, one) and torch.equal(targets, targets_many)
    assert torch.allclose(one, at_answers(base_logits), atol=1e-5)
    assert (nfe1 == 0).all()
    if solver != "dopri5":
        assert (nfe == (steps - 1) * {"midpoint": 2, "euler": 1}[solver] + 1).all()
    assert ev.answer_stats(many, targets)["correct"] == by_hand(base_logits, Y)[0]


@pytest.mark.parametrize("solver,steps,guidance", [("midpoint", 4, 1.0), ("rk4", 3, 2.0), ("dopri5", None, 1.0)])
def test_integrate_with_one_position_is_next_token(solver, steps, guidance):
    """L2D.integrate (used by teacher-forced eval for many positions) with one position gives next_token's token and nfe."""
    l2d = tiny_l2d(randomize=True)
    idx, labels = X[:, :5], torch.tensor([0, 1])
    with torch.no_grad():
        h, cache = l2d.base.trunk(idx)
        torch.manual_seed(7)
        token, nfe = l2d.next_token(h[:, -1:], cache, steps=steps, solver=solver, atol=1e-3, rtol=1e-3,
                                    guidance=guidance, labels=labels)
        torch.manual_seed(7)
        x_0 = l2d.config.sigma * torch.randn(2, 1, l2d.config.flow_dim)
        velocity = Velocity(l2d, h[:, -1:], cache, labels=labels, guidance=guidance, adaptive=solver == "dopri5")
        logits, nfe2 = l2d.integrate(velocity, x_0, steps, solver, 1e-3, 1e-3)
    assert torch.equal(logits[:, 0].argmax(-1), token) and torch.equal(nfe2[:, 0], nfe)


@pytest.mark.parametrize("solver,steps,x1", [("midpoint", 4, "argmax"), ("dopri5", None, "argmax"), ("midpoint", 3, "mean"),
                                             ("dopri5", None, "mean")])
def test_teacher_forced_all_positions_equal_one_at_a_time(solver, steps, x1):
    """The ODE for every answer position at once gives what each position gives alone, decoding from its
    own prefix as generation does (same logits; for dopri5 the same per-position step count)."""
    l2d = tiny_l2d(randomize=True)
    labels, seeds, tol = torch.tensor([1, 0]), [3, 4], dict(atol=1e-2, rtol=1e-2)
    logits, targets, nfe = unpack(ev.teacher_forced(l2d, X, Y, labels, seeds, steps=steps, solver=solver, **tol, estimate=x1))
    with torch.no_grad():
        base_logits, _ = l2d.base(X)
        for b in range(2):
            noise = l2d.config.sigma * torch.randn(X.size(1), 16, dtype=torch.float64,
                                                   generator=torch.Generator().manual_seed(seeds[b]))
            for p, j in enumerate(POS[b].tolist()):
                if targets[b, p] == -1:
                    continue
                h, cache = l2d.base.trunk(X[b:b + 1, :j + 1])
                velocity = Velocity(l2d, h[:, -1:], cache, labels=labels[b:b + 1], estimate=x1,
                                    adaptive=solver == "dopri5")
                alone, alone_nfe = l2d.integrate(velocity, noise[j:j + 1][None], steps, solver, **tol)
                assert torch.allclose(logits[b, p], alone[0, 0], atol=1e-4)
                assert nfe[b, p] == alone_nfe[0, 0]
    assert not torch.allclose(logits, at_answers(base_logits), atol=1e-3)  # the trained path moves the logits
    if solver == "midpoint":
        assert (nfe == 2 * (steps - 1) + 1).all()
    if solver == "dopri5" and x1 == "mean":  # positions finish at different times: the rest go on alone
        assert len(set(nfe[targets != -1].tolist())) > 2, nfe
    if x1 == "mean":  # the estimate matters: argmax gives other logits
        assert not torch.allclose(logits, ev.teacher_forced(l2d, X, Y, labels, seeds, steps=steps, solver=solver, **tol)["logits"])


def one_hot_logits(tokens, vocab=8):
    return F.one_hot(tokens.clamp(min=0), vocab).float()


def test_diagnostic_counts_changes_corrections_and_spoils_by_hand():
    targets = torch.tensor([[1, 2, 3], [4, 5, -1]])
    base = torch.tensor([[1, 0, 3], [0, 0, 7]])
    final = torch.tensor([[1, 2, 0], [0, 1, 6]])  # row 0: one correction, one spoil; row 1: wrong -> wrong
    guesses = [(0.25, torch.tensor([[1, 0, 0], [0, 0, 6]])), (0.75, torch.tensor([[1, 2, 3], [4, 5, 5]]))]
    stats = all_stats(dict(logits=one_hot_logits(final), targets=targets, base_tokens=base, trajectory=guesses))
    assert stats["correct"] == [2, 0] and stats["count"] == [3, 2]
    assert (stats["changed"], stats["corrected"], stats["spoiled"]) == ([2, 1], [1, 0], [1, 0])
    assert stats["trajectory_correct"] == [[1, 3], [0, 2]]  # per example, per step; padding not counted
    # against step 1's guess: the read-out differs at (0,1) (a correction) and (1,1); padding not counted
    assert (stats["first_changed"], stats["first_corrected"], stats["first_spoiled"]) == ([1, 1], [1, 0], [0, 0])
    summary = eval_rows.tf_summary(stats)
    assert (summary["tf_changed"], summary["tf_corrected"], summary["tf_spoiled"]) == (3 / 5, 1 / 5, 1 / 5)
    assert summary["tf_trajectory_accuracy"] == [1 / 5, 5 / 5] and summary["tf_first_changed"] == 2 / 5


def test_diagnostic_on_a_trained_path_adds_up_to_the_gain_over_the_base():
    """The base tokens are the steps=1 row's; corrected - spoiled is each example's gain in correct tokens
    over it (and over the first guess, with first_corrected - first_spoiled); the trajectory has one entry per midpoint step, at the middle of each interval."""
    l2d = tiny_l2d(randomize=True)
    with torch.no_grad():
        l2d.merge_gate[2].weight.mul_(30)  # a path strong enough to change some of the base's tokens
    labels, seeds = torch.tensor([1, 0]), [3, 4]
    base = ev.answer_stats(**ev.teacher_forced(l2d, X, Y, labels, steps=1))
    stats = ev.teacher_forced(l2d, X, Y, labels, seeds, steps=3)
    assert [t for t, _ in stats["trajectory"]] == [0.25, 0.75]
    assert torch.equal(stats["base_tokens"], ev.teacher_forced(l2d, X, Y, labels, steps=1)["logits"].argmax(-1))
    row = all_stats(stats)
    assert sum(row["changed"]) > 0
    for b in range(2):
        assert row["corrected"][b] - row["spoiled"][b] == row["correct"][b] - base["correct"][b]
        # and against the first guess: its correct tokens plus what the later steps corrected, less spoiled
        first = row["trajectory_correct"][b][0]
        assert first + row["first_corrected"][b] - row["first_spoiled"][b] == row["correct"][b]
    assert ev.teacher_forced(l2d, X, Y, labels, steps=None, solver="dopri5", atol=1e-2, rtol=1e-2)["trajectory"] is None


def test_gold_x_t_reads_the_noised_gold_token():
    """At t=1 the diffusion token is exactly V[gold next token]: the probe equals logits_at with x_t built
    by hand; at t=0 it is the base's logits."""
    l2d = tiny_l2d(randomize=True).eval()
    labels = torch.tensor([0, 1])
    logits, targets = eval_rows.gold_x_t(l2d, X, Y, 1.0, labels).values()
    with torch.no_grad():
        by_hand_all = path_logits(l2d, X, l2d.flow_embed(Y.clamp(min=0)), torch.ones(X.shape), labels)
        base_logits, _ = l2d.base(X)
    assert torch.equal(targets, torch.stack([Y[b, POS[b]] for b in range(2)]))
    mask = targets != -1
    assert torch.allclose(logits[mask], at_answers(by_hand_all)[mask], atol=1e-5)
    at_zero = eval_rows.gold_x_t(l2d, X, Y, 0.0, labels)["logits"]
    assert torch.equal(at_zero[mask], at_answers(base_logits)[mask])


# --- batched generation -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_generation_equals_one_prompt_at_a_time(family):
    """Prompts of different lengths generated together (left-padded) give each prompt's answer, token count
    and path evaluations as generating it alone does, also when rows stop at different tokens."""
    l2d = tiny_l2d(randomize=True, family=family)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 9, 3, 7)]
    greedy = dict(steps=1, solver="midpoint", atol=None, rtol=None, guidance=1.0, estimate="argmax")
    free = [ev.generate_answers(l2d, [p], 8, set(), greedy)[0][0] for p in prompts]
    stop = {free[0][2], free[2][5]}  # row 0 stops at its 3rd token at the latest, row 2 at its 6th
    for model in (l2d, l2d.base):
        alone = [ev.generate_answers(model, [p], 8, stop, greedy)[0] for p in prompts]
        assert ev.generate_answers(model, prompts, 8, stop, greedy) == alone
        assert len(alone[0][0]) <= 2 and alone[0][1] == len(alone[0][0]) + 1  # the stop token is counted, not returned
    euler = dict(greedy, steps=3, solver="euler")
    together = ev.generate_answers(l2d, prompts, 4, set(), euler)
    assert [(generated, nfe) for _, generated, nfe in together] == [(4, 4 * 3)] * 4  # 2 evaluations + read-out


# --- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A prepared char arithmetic split, a tiny ar base checkpoint and an L2D checkpoint around it,
    both in train.py's checkpoint layout."""
    spec = importlib.util.spec_from_file_location("prepare_arithmetic", os.path.join(REPO, "data", "arithmetic", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tmp = tmp_path_factory.mktemp("eval")
    data = module.prepare("char", out=str(tmp / "arith"), n_train=20, n_test=5, digits=1)
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    base = tiny_base("llama", vocab=meta["vocab_size"], block_size=48)
    common = dict(init_from="scratch", model_config=asdict(base.config), lora_rank=2, lora_alpha=2.0,
                  tokenizer=os.path.join(data, "vocab.json"), classes=["math"], optimizer={}, sampler={},
                  iter_num=0, config={}, rng=torch.get_rng_state())
    base_path = str(tmp / "base.pt")
    save_checkpoint(base_path, dict(common, method="ar", l2d_config=None, state_dict=base.state_dict()))
    l2d_config = L2DConfig(variant="lora", flow_dim=8, cond_dim=16, lora_rank=2, lora_alpha=2.0, num_classes=1)
    l2d = L2D(base, l2d_config)
    with torch.no_grad():
        for p in l2d.trainable_parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    state = {k: v for k, v in l2d.named_parameters() if v.requires_grad}
    os.makedirs(tmp / "l2d")
    l2d_path = str(tmp / "l2d" / "ckpt.pt")
    save_checkpoint(l2d_path, dict(common, method="l2d", init_from=base_path, l2d_config=asdict(l2d_config),
                                   state_dict={k: v.detach().clone() for k, v in state.items()}))
    torch.manual_seed(1)
    ar2diff_config = AR2DiffConfig(answer_len=4, vocab_size=meta["vocab_size"], end_token=meta["eot"])
    ar2diff = AR2Diff(tiny_base("llama", seed=1, vocab=meta["vocab_size"], block_size=48), ar2diff_config)
    ar2diff_path = str(tmp / "ar2diff.pt")
    save_checkpoint(ar2diff_path, dict(common, method="ar2diff", l2d_config=None, ar2diff_config=asdict(ar2diff_config),
                                       state_dict=ar2diff.state_dict()))
    return dict(data=data, base=base_path, l2d=l2d_path, ar2diff=ar2diff_path, tmp=tmp)


def run_main(run, *args):
    out = str(run["tmp"] / "results.json")
    result = ev.main(["--data", run["data"], "--limit", "3", "--max_new_tokens", "3", "--batch_size", "2",
                      "--out", out, "--overwrite", "True", *args])
    with open(out) as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(result["rows"]))
    return result["rows"]


def test_end_to_end_l2d(tiny_run):
    rows = run_main(tiny_run, "--ckpt", tiny_run["l2d"], "--steps", "1,2", "--solver=euler")
    assert [r["setting"] for r in rows] == ["steps=1", "steps=2"]
    assert run_main(tiny_run, "--ckpt", tiny_run["l2d"], "--steps", "2", "--estimate", "mean")[0]["setting"] == "steps=2 estimate=mean"
    sampled = [run_main(tiny_run, "--ckpt", tiny_run["l2d"], "--steps", "4", "--estimate", "sample")[0] for _ in range(2)]
    assert sampled[0]["setting"] == "steps=4 estimate=sample"
    keep = ("example_correct", "samples", "tf_example_correct", "tf_example_nll")  # seeded: the same twice
    assert {k: sampled[0][k] for k in keep} == {k: sampled[1][k] for k in keep}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["n"] == 3 and r["ci_low"] <= r["accuracy"] <= r["ci_high"]
        assert 0 <= r["tf_accuracy"] <= 1 and r["tf_nll"] > 0 and r["tokens"] > 0
    assert rows[0]["nfe_per_token"] == 0 and rows[0]["tf_nfe_per_token"] == 0
    assert rows[1]["nfe_per_token"] == 2 and rows[1]["tf_nfe_per_token"] == 2  # euler, 2 points: 1 + read-out
    for key, gen, tf in (("gain", "accuracy", None), ("tf_gain", "tf_accuracy", "tf_example_count")):
        assert key not in rows[0]  # the base row is the reference
        assert rows[1][key][0] == pytest.approx(rows[1][gen] - rows[0][gen])  # paired: same examples, same tokens
        assert rows[1][key][1] <= rows[1][key][0] <= rows[1][key][2]
    assert sum(rows[1]["tf_example_count"]) == rows[1]["tf_tokens"] and len(rows[1]["example_correct"]) == 3
    batched = run_main(tiny_run, "--ckpt", tiny_run["l2d"], "--steps", "1", "--gen_batch_size", "2")
    assert {k: batched[0][k] for k in ("example_correct", "tokens", "samples")} == \
        {k: rows[0][k] for k in ("example_correct", "tokens", "samples")}
    again = run_main(tiny_run, "--ckpt", tiny_run["l2d"], "--steps", "2", "--solver=euler")
    keep = ("accuracy", "tf_accuracy", "tf_nll", "samples")
    assert {k: again[0][k] for k in keep} == {k: rows[1][k] for k in keep}  # seeded: reproducible rows


def test_diagnostics_only_when_asked(tiny_run, capsys):
    """The research columns (harness/diagnostics.py) come with --diagnostics; without it the rows, their
    numbers and per-example lists are the same, less those columns."""
    args = ("--ckpt", tiny_run["l2d"], "--steps", "1,3")
    plain = run_main(tiny_run, *args)
    assert "tf tokens changed" not in capsys.readouterr().out
    diagnosed = run_main(tiny_run, *args, "--diagnostics")
    printed = capsys.readouterr().out
    assert "tf tokens changed from the base's" in printed and "tf x_hat_1 accuracy along the ODE: t=0.25 " in printed
    research = ("tf_changed", "tf_corrected", "tf_spoiled", "tf_trajectory_t", "tf_trajectory_accuracy",
                "tf_first_changed", "tf_first_corrected", "tf_first_spoiled")
    assert all(key in diagnosed[1] for key in research) and not any(key in plain[1] for key in research)
    timeless = lambda row: {k: v for k, v in row.items() if k not in ("seconds", "tokens_per_s") and "changed" not in k
                            and "corrected" not in k and "spoiled" not in k and "trajectory" not in k}
    assert [timeless(r) for r in plain] == [timeless(r) for r in diagnosed]


def test_end_to_end_bf16(tiny_run, capsys):
    """--dtype bfloat16: the L2D's steps=1 row is its bf16 base's row, example for example (t = 0 exactness in
    bf16), the L2D, GPT and AR2Diff rows all run, and the header names the dtype."""
    rows = run_main(tiny_run, "--ckpt", tiny_run["l2d"], "--steps", "1,2", "--dtype", "bfloat16")
    assert "bfloat16" in capsys.readouterr().out
    base = run_main(tiny_run, "--ckpt", tiny_run["base"], "--dtype", "bfloat16")[0]
    keep = ("example_correct", "samples", "tf_example_correct", "tf_example_nll")
    assert {k: rows[0][k] for k in keep} == {k: base[k] for k in keep}
    fp32 = run_main(tiny_run, "--ckpt", tiny_run["base"])[0]
    assert fp32["tf_example_nll"] != base["tf_example_nll"]  # (it did run in another number format)
    assert base["tf_nll"] == pytest.approx(fp32["tf_nll"], rel=0.02)
    assert rows[1]["tf_nfe_per_token"] == 3
    assert run_main(tiny_run, "--ckpt", tiny_run["ar2diff"], "--steps", "2", "--candidates", "2", "--dtype", "bfloat16")


def test_end_to_end_probe_and_tf_interval(tiny_run):
    out = str(tiny_run["tmp"] / "probe.json")
    result = ev.main(["--data", tiny_run["data"], "--limit", "4", "--batch_size", "3", "--out", out, "--ckpt",
                      tiny_run["l2d"], "--probe_t", "0,1", "--generate", "False", "--steps", "2"])
    assert [p["t"] for p in result["probe"]] == [0.0, 1.0]
    for stats in result["probe"] + result["rows"]:
        assert stats["tf_ci_low"] <= stats["tf_accuracy"] <= stats["tf_ci_high"] and stats["tf_tokens"] > 0
    base_row = ev.main(["--data", tiny_run["data"], "--limit", "4", "--out", out, "--overwrite", "True", "--ckpt", tiny_run["l2d"],
                        "--generate", "False", "--steps", "1"])["rows"][0]
    assert result["probe"][0]["tf_nll"] == pytest.approx(base_row["tf_nll"], rel=1e-6)  # t=0: the base
    with pytest.raises(UsageError):
        ev.main(["--data", tiny_run["data"], "--ckpt", tiny_run["base"], "--probe_t", "0.5"])  # a GPT has no x_t


def test_end_to_end_guidance_dopri5_and_gpt(tiny_run):
    rows = run_main(tiny_run, "--ckpt", tiny_run["l2d"], "--limit", "2", "--solver", "dopri5", "--atol", "1e-2", "--rtol", "1e-2",
                    "--guidance", "1,2", "--label", "math")
    assert [r["setting"] for r in rows] == ["atol=0.01 rtol=0.01", "atol=0.01 rtol=0.01 w=2"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows) and rows[1]["nfe_per_token"] >= 2 * 6 + 1
    rows = run_main(tiny_run, "--ckpt", tiny_run["base"], "--steps", "1,2,4")  # a GPT: one row
    assert len(rows) == 1 and rows[0]["steps"] == 1 and 0 <= rows[0]["accuracy"] <= 1
    with pytest.raises(UsageError):
        run_main(tiny_run, "--ckpt", tiny_run["l2d"], "--label", "poetry")


def test_end_to_end_ar2diff(tiny_run):
    """A row per (steps, K), generation only; each answer is the model's own decoding up to its first end
    token (redone here by hand, seeded as eval.py seeds it); passes over the span = (steps + 1) x K, or steps."""
    rows = run_main(tiny_run, "--ckpt", tiny_run["ar2diff"], "--steps", "1,3", "--candidates", "1,2", "--gen_batch_size", "2", "--diagnostics")
    assert [r["setting"] for r in rows] == ["steps=1 K=1", "steps=3 K=1", "steps=1 K=2", "steps=3 K=2"]
    assert all("tf_accuracy" not in r for r in rows)
    assert [sum(r["example_nfe"]) / r["n"] for r in rows] == [1, 3, 2 * 2, 4 * 2]
    assert "gain" not in rows[0] and "gain" not in rows[2]  # each K's steps=1 row is its reference
    assert rows[3]["gain"][0] == pytest.approx(rows[3]["accuracy"] - rows[2]["accuracy"])
    model, enc, _ = ev.checkpoint.load(tiny_run["ar2diff"])
    data = TokenDataset([tiny_run["data"]], "test")
    with open(os.path.join(tiny_run["data"], "test.jsonl")) as f:
        prompts = [enc.encode(json.loads(line)["prompt"]) for line in f][:3]
    for b0 in (0, 2):  # --gen_batch_size 2: the batches eval.py generated, seeded by their first example
        batch = prompts[b0:b0 + 2]
        length = max(map(len, batch))
        idx = torch.tensor([[0] * (length - len(p)) + p for p in batch])
        torch.manual_seed(1337 + b0)
        spans, _ = model.generate(idx, torch.tensor([length - len(p) for p in batch]), steps=3, samples=2)
        for i, span in enumerate(spans.tolist()):  # the row keeps the outputs of its first 3 examples
            assert rows[3]["samples"][b0 + i]["output"] == enc.decode(until_end(span, {data.eot}))
    with pytest.raises(UsageError, match="--candidates"):
        run_main(tiny_run, "--ckpt", tiny_run["l2d"], "--candidates", "4")  # not an AR2Diff
    for row in rows:  # one candidate: what the later steps did to the first step's answers
        assert ("first_accuracy" in row) == (row["candidates"] == 1)
    assert rows[0]["first_accuracy"] == rows[0]["accuracy"] and rows[0]["first_changed"] == 0  # one step: no later ones


def test_answers_changed_after_the_first_step_by_hand():
    """first accuracy + corrected - spoiled = accuracy; a changed answer may stay wrong."""
    ex = dict(correct=[1, 0, 1, 0, 0], first_correct=[0, 1, 1, 0, 0], first_changed=[1, 1, 0, 1, 0],
              tokens=[1] * 5, nfe=[2] * 5, seconds=1.0, samples=[])
    s = eval_rows.generation_summary(ex)
    assert (s["first_accuracy"], s["first_changed"], s["first_corrected"], s["first_spoiled"]) == (0.4, 0.6, 0.2, 0.2)
    assert s["first_accuracy"] + s["first_corrected"] - s["first_spoiled"] == pytest.approx(s["accuracy"])
    assert "first_accuracy" not in eval_rows.generation_summary(dict(ex, first_correct=[]))


class Killed(Exception):
    pass


def test_an_earlier_result_is_never_replaced_unasked(tiny_run, tmp_path):
    args = ["--data", tiny_run["data"], "--ckpt", tiny_run["l2d"], "--limit", "2", "--max_new_tokens", "2",
            "--steps", "1", "--teacher_forced", "False"]
    default = os.path.join(os.path.dirname(tiny_run["l2d"]), "eval_results")
    assert not os.path.exists(default + ".json")
    ev.main(args)
    first = open(default + ".json").read()
    ev.main(args)  # the default out: a new file beside the first
    assert open(default + ".json").read() == first and os.path.isfile(default + "-2.json")
    out = str(tmp_path / "mine.json")
    ev.main(args + ["--out", out])
    mine = open(out).read()
    with pytest.raises(UsageError, match="already exists.*--resume True.*--overwrite True"):
        ev.main(args + ["--out", out, "--steps", "2"])
    assert open(out).read() == mine
    ev.main(args + ["--out", out, "--steps", "2", "--overwrite", "True"])
    assert open(out).read() != mine
    with pytest.raises(UsageError, match="must end in .json"):  # e.g. a checkpoint
        ev.main(args + ["--out", tiny_run["l2d"]])
    with pytest.raises(UsageError, match="--resume True needs --out"):
        ev.main(args + ["--resume", "True"])
    for name in os.listdir(os.path.dirname(tiny_run["l2d"])):  # leave the shared fixture as it was
        if name.startswith("eval_results"):
            os.remove(os.path.join(os.path.dirname(tiny_run["l2d"]), name))


@pytest.mark.parametrize("diagnose", [[], ["--diagnostics"]])
def test_a_run_killed_at_any_write_and_resumed_is_the_whole_run(tiny_run, monkeypatch, diagnose):
    """Kill a run at its k-th JSON write (before writing), resume it with --resume True: for every k the
    probe, rows and per-example lists are those of one uninterrupted run (timings aside), the "partial"
    entry is gone, and at most one batch (the one the kill lost) is computed twice."""
    out = str(tiny_run["tmp"] / f"resume{len(diagnose)}.json")
    args = ["--data", tiny_run["data"], "--ckpt", tiny_run["l2d"], "--limit", "3", "--max_new_tokens", "3",
            "--batch_size", "2", "--gen_batch_size", "2", "--steps", "1,2", "--solver", "euler", "--probe_t", "0.5",
            "--out", out, *diagnose]
    batches, kill_at, real_write = [], [None], eval_rows.write_json  # batches: computed, as the function called

    def counted(name):
        real = getattr(ev, name)

        def call(*args, **kwargs):
            batches.append(name)
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(ev, "answer_stats", counted("answer_stats"))  # one per probe / teacher-forced batch
    monkeypatch.setattr(ev, "generate_answers", counted("generate_answers"))
    writes = []

    def write_or_die(path, result):
        if len(writes) == kill_at[0]:
            raise Killed
        writes.append(path)
        real_write(path, result)
    monkeypatch.setattr(eval_rows, "write_json", write_or_die)

    def timeless(result):
        return json.loads(json.dumps(dict(probe=result["probe"], rows=[
            {k: v for k, v in row.items() if k not in ("seconds", "tokens_per_s")} for row in result["rows"]])))
    whole, whole_batches, whole_writes = timeless(ev.main(args)), len(batches), len(writes)
    assert whole_batches == 2 + 2 * (2 + 2) and whole_writes > whole_batches  # probe; per row: generation, tf
    for k in range(whole_writes):
        os.remove(out)
        batches.clear()
        writes.clear()
        kill_at[0] = k
        with pytest.raises(Killed):
            ev.main(args)
        kill_at[0] = None
        resumed = ev.main(args + ["--resume", "True"])
        with open(out) as f:
            saved = json.load(f)
        assert timeless(resumed) == whole and timeless(saved) == whole and "partial" not in saved, k
        assert len(batches) - whole_batches in (0, 1), k


def test_resume_errors_name_the_file(tiny_run, capsys):
    out = tiny_run["tmp"] / "other.json"
    args = ["--data", tiny_run["data"], "--ckpt", tiny_run["l2d"], "--limit", "2", "--max_new_tokens", "2",
            "--steps", "2", "--out", str(out), "--resume", "True"]
    fresh = ev.main(args)  # nothing to resume: a whole run
    assert "nothing to resume" in capsys.readouterr().out and fresh["rows"][0]["n"] == 2
    with pytest.raises(UsageError, match="other options \\(limit, steps\\)"):
        ev.main(args + ["--steps", "1,2", "--limit", "3"])
    for text in ("{not json", "[1, 2]"):  # (a JSON list once gave a traceback)
        out.write_text(text)
        with pytest.raises(UsageError, match="cannot resume from .*other.json: not an eval.py JSON"):
            ev.main(args)


def test_label_on_a_model_without_classes_is_refused(tiny_run):
    for ckpt in (tiny_run["base"], tiny_run["ar2diff"]):
        with pytest.raises(UsageError, match="--label 'bogus': this model was trained without guidance classes"):
            run_main(tiny_run, "--ckpt", ckpt, "--label", "bogus")


def test_out_in_a_missing_folder_is_refused_before_any_work(tiny_run, monkeypatch):
    monkeypatch.setattr(ev, "generate_answers", lambda *args: pytest.fail("evaluated before --out was checked"))
    with pytest.raises(ValueError, match="--out .*the folder .*nowhere does not exist"):
        ev.main(["--data", tiny_run["data"], "--ckpt", tiny_run["l2d"], "--limit", "2", "--steps", "1",
                 "--out", str(tiny_run["tmp"] / "nowhere" / "r.json")])


def test_out_on_a_read_only_folder_is_refused_before_any_work(tiny_run, monkeypatch):
    """(os.access stands in for a read-only file system, which root's test run cannot make.)"""
    folder = str(tiny_run["tmp"])
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and real_access(path, mode)
                        if os.path.abspath(path) == folder else real_access(path, mode))
    monkeypatch.setattr(ev, "generate_answers", lambda *args: pytest.fail("evaluated before --out was checked"))
    with pytest.raises(ValueError, match="--out .*the folder .* is not writable"):
        ev.main(["--data", tiny_run["data"], "--ckpt", tiny_run["l2d"], "--limit", "2", "--steps", "1",
                 "--out", os.path.join(folder, "r.json")])


def test_cli_errors_are_one_line_exit_2():
    proc = forkrun.run([sys.executable, "eval.py", "--bogus", "1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown option --bogus")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = forkrun.run([sys.executable, "eval.py", "--ckpt", "nowhere", "--dtype", "bf16"], cwd=REPO,
                       capture_output=True, text=True)  # refused before the (missing) model is looked for
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown --dtype 'bf16'")


@pytest.mark.parametrize("ckpt", ["l2d", "ar2diff"])
def test_absurd_step_counts_are_one_line(tiny_run, ckpt):
    """A step count past float32 t's resolution is refused before any work (it used to allocate terabytes)."""
    out = tiny_run["tmp"] / "absurd.json"
    proc = forkrun.run([sys.executable, "eval.py", "--ckpt", tiny_run[ckpt], "--data", tiny_run["data"],
                        "--steps", "1,1000000000000", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: --steps must be between 1 and 1000000 (a finer grid than float32 t can resolve), got 1000000000000"]
    assert not out.exists()


@pytest.mark.parametrize("interrupt_at", [1, 2])
def test_ctrl_c_is_one_line_exit_130_and_says_what_was_kept(tiny_run, monkeypatch, capsys, interrupt_at):
    """Ctrl-C at the first generated batch (nothing written yet) or the second (the JSON holds the first):
    one line, exit 130, no traceback; what was kept resumes into the whole run."""
    import runpy
    from harness import answers
    out = tiny_run["tmp"] / f"interrupted{interrupt_at}.json"
    args = ["--ckpt", tiny_run["l2d"], "--data", tiny_run["data"], "--limit", "3", "--max_new_tokens", "2", "--steps", "2",
            "--teacher_forced", "False", "--out", str(out)]
    real, calls = answers.generate_answers, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(answers, "generate_answers", interrupted)
    monkeypatch.setattr(sys, "argv", ["eval.py", *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(REPO, "eval.py"), run_name="__main__")
    assert exit_.value.code == 130
    stderr = capsys.readouterr().err.strip().splitlines()[-1:]
    if interrupt_at == 1:
        assert stderr == ["error: interrupted; nothing was written"] and not out.exists()
    else:
        assert stderr == [f"error: interrupted; {out} keeps every batch done: the same command with --resume True "
                          "goes on from it"]
        monkeypatch.setattr(answers, "generate_answers", real)
        resumed = ev.main(args + ["--resume", "True"])["rows"][0]
        assert resumed["n"] == 3 and resumed["example_correct"] == ev.main(args + ["--overwrite", "True"])["rows"][0]["example_correct"]


def test_ctrl_c_while_torch_imports_is_one_line(tiny_run):
    """A real SIGINT half a second in, inside `import torch` (seconds): no traceback from deep in torch."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "eval.py", "--ckpt", tiny_run["l2d"], "--data", tiny_run["data"]], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.splitlines() == ["error: interrupted; nothing was written"]
