"""data/*/prepare.py and dataset.py: the loss mask, the splits, batch alignment and the sampler.

Offline: character vocabularies, plus GPT-2 and GSM8K from ../shared (skipped where missing).
"""
import ast
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import forkrun
from data.dataset import BatchSampler, TokenDataset, write_dataset
from loading.tokenizer import EOT, get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
HAVE_GPT2 = os.path.isfile(os.path.join(SHARED, "tokenizers", "gpt2", "vocab.bpe"))
HAVE_GSM8K = os.path.isfile(os.path.join(SHARED, "data", "gsm8k", "test.jsonl"))


def load_prepare(task):
    spec = importlib.util.spec_from_file_location(f"prepare_{task}", os.path.join(REPO, "data", task, "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


arithmetic, gsm8k, pycode = load_prepare("arithmetic"), load_prepare("gsm8k"), load_prepare("pycode")


def read_split(out, split):
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    z = np.load(os.path.join(out, f"{split}.npz"))
    examples = [(z["tokens"][a:b], z["loss_mask"][a:b]) for a, b in zip(z["offsets"][:-1], z["offsets"][1:])]
    return meta, examples, z["labels"]


def check_mask(enc, meta, examples, prompts, answers):
    """Unmasked tokens decode to the prompt, masked ones to the answer + its end token, in that order."""
    assert len(examples) == len(prompts) == len(answers)
    end = enc.decode([meta["eot"]])
    for (tokens, mask), prompt, answer in zip(examples, prompts, answers):
        n = int((~mask).sum())
        assert not mask[:n].any() and mask[n:].all(), "prompt tokens first, then answer tokens"
        assert tokens[-1] == meta["eot"]
        assert enc.decode(tokens[:n].tolist()) == prompt
        assert enc.decode(tokens[n:].tolist()) == answer + end


def arithmetic_examples(n_train, n_test, digits, ops, seed):
    rng = random.Random(seed)  # the same draws as arithmetic.prepare
    test, keys = arithmetic.make_problems(n_test, rng, digits, ops)
    return arithmetic.make_problems(n_train, rng, digits, ops, exclude=keys)[0], test


@pytest.mark.parametrize("tokenizer", ["char", pytest.param("gpt2", marks=pytest.mark.skipif(not HAVE_GPT2, reason="no GPT-2 files"))])
def test_arithmetic_loss_mask_is_exactly_the_answer(tmp_path, tokenizer):
    out = arithmetic.prepare(tokenizer, out=str(tmp_path), n_train=200, n_test=50, digits=3, seed=1)
    with open(tmp_path / "meta.json") as f:
        meta = json.load(f)
    enc = get_tokenizer(os.path.join(out, meta["tokenizer"]) if tokenizer == "char" else tokenizer)
    assert meta["classes"] == ["math"] and not meta["chat"] and meta["eot"] == enc.eot_token
    assert meta["vocab_size"] == enc.n_vocab and (tokenizer != "char" or meta["tokenizer"] == "vocab.json")
    train, test = arithmetic_examples(200, 50, 3, "+-*", seed=1)
    for split, exs in (("train", train), ("test", test)):
        meta, examples, labels = read_split(out, split)
        check_mask(enc, meta, examples, [f"Question: {e['question']}\nAnswer: " for e in exs], [e["answer"] for e in exs])
        assert labels.dtype == np.int16 and (labels == 0).all()
    with open(tmp_path / "test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    for row, ex in zip(rows, test):
        a, op, b = ex["question"].removeprefix("What is ").removesuffix("?").split()
        assert row["answer"] == row["final"] == str(arithmetic.OPS[op](int(a), int(b))) and int(row["final"]) >= 0
        assert row["prompt"] == f"Question: {ex['question']}\nAnswer: " and row["label"] == "math"


def test_arithmetic_split_is_disjoint_and_seeded(tmp_path):
    train, test = arithmetic_examples(3000, 300, 2, "+-*", seed=0)
    assert len({e["question"] for e in train}) == 3000 and len({e["question"] for e in test}) == 300

    def key(e):  # a + b and b + a are the same problem
        a, op, b = e["question"].removeprefix("What is ").removesuffix("?").split()
        return op, min(int(a), int(b)), max(int(a), int(b))
    assert not {key(e) for e in train} & {key(e) for e in test}
    assert {e["question"][8] for e in train} >= set("123456789")  # both 1- and 2-digit first operands
    with pytest.raises(ValueError):
        arithmetic_examples(200, 0, 1, "+", seed=0)  # only 55 distinct 1-digit sums
    a = arithmetic.prepare("char", out=str(tmp_path / "a"), n_train=500, n_test=50, seed=3)
    b = arithmetic.prepare("char", out=str(tmp_path / "b"), n_train=500, n_test=50, seed=3)
    c = arithmetic.prepare("char", out=str(tmp_path / "c"), n_train=500, n_test=50, seed=4)
    for split in ("train", "test"):
        za, zb, zc = (np.load(os.path.join(d, f"{split}.npz")) for d in (a, b, c))
        assert all(np.array_equal(za[k], zb[k]) for k in za.files)
        assert not np.array_equal(za["tokens"], zc["tokens"])


def test_prepare_never_changes_a_prepared_folder_unasked(tmp_path):
    """The same command again leaves the folder as it is; other settings are refused, files untouched
    (a checkpoint trained on it reads its vocab.json), unless --overwrite, which leaves no stale split."""
    out = str(tmp_path / "data")
    run = [sys.executable, "-m", "data.arithmetic.prepare", "--out", out, "--n_train", "50",
           "--n_test", "10", "--digits", "2", "--ops", "+"]
    assert forkrun.run(run + ["--n_confirm", "5"], cwd=REPO, capture_output=True).returncode == 0
    before = {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}
    again = forkrun.run(run + ["--n_confirm", "5"], capture_output=True, text=True)
    assert again.returncode == 0 and "left as it is" in again.stdout
    changed = forkrun.run(run + ["--ops", "+*"], capture_output=True, text=True)  # a bigger vocabulary
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1 and "--overwrite" in changed.stderr
    assert {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))} == before
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no staging folder left behind
    replaced = forkrun.run(run + ["--ops", "+*", "--overwrite"], capture_output=True, text=True)
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(os.listdir(out)) == ["meta.json", "test.jsonl", "test.npz", "train.npz", "vocab.json"]
    assert open(os.path.join(out, "vocab.json"), "rb").read() != before["vocab.json"]


def test_arithmetic_confirm_split_is_a_second_alike_held_out_set(tmp_path):
    """--n_confirm: test and confirm are disjoint from each other and from train, and alike in kind
    even where the draw exhausts the small problems (1-digit x 1-digit: 55 of them)."""
    out = arithmetic.prepare("char", out=str(tmp_path), n_train=2000, n_test=400, n_confirm=400, digits=2, ops="*")

    def prompts(split):
        with open(os.path.join(out, f"{split}.jsonl")) as f:
            return [json.loads(line)["prompt"] for line in f]
    test, confirm = set(prompts("test")), set(prompts("confirm"))
    enc = get_tokenizer(os.path.join(out, "vocab.json"))
    train = {enc.decode(tokens[~mask].tolist()) for tokens, mask in read_split(out, "train")[1]}
    assert len(test) == len(confirm) == 400 and len(train) == 2000
    assert not test & confirm and not (test | confirm) & train

    def one_digit_pairs(split):
        return sum(bool(re.search(r"What is \d \* \d\?", p)) for p in split)
    # all 55 are drawn among the first 800 problems; split at random, each set gets about half
    assert one_digit_pairs(test) + one_digit_pairs(confirm) == 55 and 15 <= one_digit_pairs(confirm) <= 40
    # without --n_confirm, the test split is the one draw of n_test problems, as before
    plain = arithmetic.prepare("char", out=str(tmp_path / "plain"), n_train=100, n_test=400, digits=2, ops="*")
    assert not os.path.exists(os.path.join(plain, "confirm.jsonl"))
    with open(os.path.join(plain, "test.jsonl")) as f:
        assert [json.loads(line)["prompt"] for line in f] == \
            [f"Question: {e['question']}\nAnswer: " for e in arithmetic_examples(100, 400, 2, "*", seed=0)[1]]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """An arithmetic folder and a small "code" folder on the same char vocabulary."""
    root = tmp_path_factory.mktemp("mixed")
    math_dir = arithmetic.prepare("char", out=str(root / "math"), n_train=300, n_test=20, digits=3)
    code = [dict(question=f"What is {i}?", answer="1 + " * (i % 30) + "1", label="code") for i in range(40)]
    write_dataset(str(root / "code"), os.path.join(math_dir, "vocab.json"), {"train": code, "test": code[:5]}, ["code"])
    return math_dir, str(root / "code")


def test_get_batch_alignment(mixed):
    ds = TokenDataset(list(mixed), "train")
    assert ds.classes == ["math", "code"] and len(ds) == 340 and ds.vocab_size == ds.tokenizer.n_vocab
    assert (ds.labels[:300] == 0).all() and (ds.labels[300:] == 1).all()
    ix = np.array([0, 305, 7, 339, 120])
    x, y, labels = ds.get_batch(ix, block_size=1000)
    assert labels.tolist() == [0, 1, 0, 1, 0] and x.shape == y.shape
    for b, i in enumerate(ix):
        tokens, mask = ds.tokens[ds.offsets[i]:ds.offsets[i + 1]], ds.loss_mask[ds.offsets[i]:ds.offsets[i + 1]]
        n = len(tokens) - 1
        assert x[b, :n].tolist() == tokens[:-1].tolist()
        assert ((y[b, :n] != -1).numpy() == mask[1:]).all(), "targets exactly on answer tokens"
        assert (x[b, n:] == ds.eot).all() and (y[b, n:] == -1).all(), "padding is eot and ignored"
        assert ds.tokenizer.decode(y[b][y[b] != -1].tolist()).endswith(EOT)
    has_target = y[:, :-1] != -1
    assert (y[:, :-1][has_target] == x[:, 1:][has_target]).all()
    x2, y2, _ = ds.get_batch(ix, block_size=16)  # truncation keeps the start
    assert x2.shape == (5, 16) and (x2 == x[:, :16]).all() and (y2 == y[:, :16]).all()


def test_mixing_different_tokenizers_fails(mixed, tmp_path):
    other = arithmetic.prepare("char", out=str(tmp_path), n_train=20, n_test=5, digits=1, ops="+")
    with pytest.raises(ValueError, match="same --tokenizer"):
        TokenDataset([mixed[0], other], "train")


def test_sampler_ranks_cover_global_batch_and_resume():
    n, batch = 103, 8
    single = BatchSampler(n, batch, seed=5)
    ranks = [BatchSampler(n, batch, seed=5, rank=r, world_size=2) for r in range(2)]
    stream = []
    for _ in range(60):  # 480 examples: over 4 epochs, with batches straddling epoch ends
        g = single.next_batch()
        assert np.array_equal(np.concatenate([s.next_batch() for s in ranks]), g)
        stream += g.tolist()
    for e in range(4):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n)), "each epoch is a permutation"
    assert stream[:n] != stream[n:2 * n]
    state = json.loads(json.dumps(single.state_dict()))  # what a checkpoint stores
    expected = [single.next_batch() for _ in range(20)]
    resumed = BatchSampler(n, batch, seed=5)
    resumed.load_state_dict(state)
    assert all(np.array_equal(resumed.next_batch(), e) for e in expected)


def test_pycode_function_split_rebuilds_the_function():
    path = os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
    pairs = list(pycode.functions(path, max_lines=40))
    assert len(pairs) > 5
    for head, body in pairs:
        assert ast.get_docstring(ast.parse(head + "\n    pass").body[0])  # head = signature + docstring
        assert body.strip() and body.startswith(" ")
        ast.parse(head + "\n" + body)


@pytest.mark.skipif(not (HAVE_GSM8K and HAVE_GPT2), reason="no ../shared GSM8K or GPT-2 files")
def test_gsm8k_slice(tmp_path):
    out = gsm8k.prepare("gpt2", out=str(tmp_path), limit=50)
    with open(os.path.join(SHARED, "data", "gsm8k", "test.jsonl")) as f:
        raw = [json.loads(line) for line in f][:50]
    with open(tmp_path / "test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 50
    for r, row in zip(raw, rows):
        final = r["answer"].split("####")[-1].strip().replace(",", "")
        assert row["final"] == final and row["answer"].endswith(f"\n#### {final}") and "<<" not in row["answer"]
        assert row["prompt"] == f"Question: {r['question']}\nAnswer: " and row["label"] == "math"
    meta, examples, _ = read_split(out, "test")
    check_mask(get_tokenizer("gpt2"), meta, examples, [r["prompt"] for r in rows], [r["answer"] for r in rows])
    gsm8k.prepare("gpt2", out=str(tmp_path), limit=50, max_len=150, overwrite=True)  # other settings: asked
    kept = read_split(out, "train")[1]
    assert 0 < len(kept) < 50 and max(len(t) for t, _ in kept) <= 150
    assert len(read_split(out, "test")[1]) == 50  # test is never dropped


@pytest.mark.parametrize("task, args, words", [
    ("arithmetic", ["--ops", "/"], ["--ops '/'", "+-*"]),
    ("arithmetic", ["--digits", "1", "--n_train", "100000"], ["distinct problems", "fewer"]),
    ("arithmetic", ["--n_test", "0"], ["--n_test must be >= 1"]),
    ("pycode", ["--tokenizer", "nonsense"], ["unknown tokenizer 'nonsense'"]),
    ("gsm8k", ["--src", "/nonexistent"], ["/nonexistent/train.jsonl not found"]),
    ("gsm8k", ["--limit", "-3"], ["--limit must be >= 1, not -3"]),
    ("arithmetic", ["--digits", "-1"], ["--digits must be >= 1, not -1"]),
    ("pycode", ["--max_lines", "0"], ["--max_lines must be >= 1, not 0"]),
    ("pycode", ["--max_lines", "2"], ["--max_lines 2", "raise --max_lines"]),
    ("arithmetic", ["--n_train", "abc"], ["--n_train must be of type int, got 'abc'"]),
    ("gsm8k", ["--limit", "abc"], ["--limit must be >= 1, not 'abc'"]),
    ("gsm8k", ["--bogus"], ["unknown option --bogus", "-h lists the options"]),
])
def test_prepare_bad_options_exit_2_with_one_line(task, args, words, tmp_path):
    result = forkrun.run([sys.executable, "-m", f"data.{task}.prepare", *args,
                          "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words)
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("task, default", [("arithmetic", "--digits 3 max digits per operand"),
                                           ("gsm8k", "--max_len 1024"), ("humaneval", "--tokenizer 'smollm2-135m'"),
                                           ("pycode", "--max_lines 40"), ("smoltalk", "--n_test 100")])
def test_prepare_help_shows_the_defaults(task, default):
    result = subprocess.run([sys.executable, "-m", f"data.{task}.prepare", "-h"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and default in " ".join(result.stdout.split()), result.stdout


def test_prepare_out_naming_a_file_is_one_line(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    result = forkrun.run([sys.executable, "-m", "data.arithmetic.prepare", "--out", str(mine)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == f"error: --out {mine} is a file; name a folder for the prepared dataset\n"
    assert mine.read_text() == "mine"


@pytest.fixture
def prepared(tmp_path):
    return arithmetic.prepare("char", out=str(tmp_path / "data"), n_train=20, n_test=5, digits=1, ops="+")


@pytest.mark.parametrize("damage, words", [
    ("missing_folder", ["the dataset folder", "does not exist", "python -m data.<task>.prepare"]),
    ("no_meta", ["holds no meta.json"]),
    ("truncated_npz", ["train.npz is truncated or damaged (BadZipFile); re-run the prepare script"]),
    ("vocab_not_utf8", ["vocab.json is not valid JSON (not UTF-8 text)"]),
    ("meta_not_json", ["meta.json is not valid JSON"]),
])
def test_a_missing_or_damaged_prepared_folder_is_named(prepared, damage, words):
    """train.py's --datasets and eval.py's --data read folders through TokenDataset: one line, naming the file."""
    folder = prepared + "-gone" if damage == "missing_folder" else prepared
    if damage == "no_meta":
        os.remove(os.path.join(prepared, "meta.json"))
    if damage == "truncated_npz":
        path = os.path.join(prepared, "train.npz")
        open(path, "r+b").truncate(os.path.getsize(path) // 2)
    if damage == "vocab_not_utf8":
        open(os.path.join(prepared, "vocab.json"), "wb").write(b"\xff\xfe{")
    if damage == "meta_not_json":
        open(os.path.join(prepared, "meta.json"), "w").write('{"tokenizer":')
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        TokenDataset([folder], "train")
    assert all(word in str(e.value) for word in words), str(e.value)


def test_train_names_a_dataset_folder_that_does_not_exist(tmp_path):
    result = forkrun.run([sys.executable, "train.py", "--init_from=scratch", "--method=ar", "--n_layer=1",
                          "--n_embd=16", "--n_head=2", f"--out_dir={tmp_path / 'out'}",
                          f"--datasets=['{tmp_path / 'nope'}']"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: the dataset folder {tmp_path / 'nope'} does not exist") \
        and result.stderr.count("\n") == 1


def test_prepare_again_replaces_a_truncated_split_only_with_overwrite(prepared):
    path = os.path.join(prepared, "train.npz")
    open(path, "r+b").truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="pass --overwrite"):
        arithmetic.prepare("char", out=prepared, n_train=20, n_test=5, digits=1, ops="+")
    arithmetic.prepare("char", out=prepared, n_train=20, n_test=5, digits=1, ops="+", overwrite=True)
    assert len(TokenDataset([prepared], "train")) == 20


def test_ctrl_c_in_prepare_is_one_line_exit_130_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from configurator import configure
    from data import dataset, prepare_common

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset.np, "savez", interrupt)  # mid-write
    out = tmp_path / "data"
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        prepare_common.run(lambda **options: arithmetic.prepare(**options | dict(n_train=20, n_test=5)),
                           lambda: configure(arithmetic.OPTIONS))
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted; nothing was written\n"
    assert os.listdir(tmp_path) == []  # no staging folder either
