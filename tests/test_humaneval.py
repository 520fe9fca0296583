"""HumanEval, offline: data/humaneval/prepare.py on a small file in HumanEval's schema (written here), the
execution harness (a right and a wrong completion, a loop, the network, the working directory) and
eval.py --task humaneval end to end, its pass@1 computed by running the completions."""

import gzip
import importlib.util
import json
import os
from dataclasses import asdict

import pytest
import torch

import eval as ev
from loading.checkpoint import save_checkpoint
from harness.execution import completion_code, humaneval_program, run_program
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBLEMS = [
    dict(task_id="Test/0", entry_point="add", canonical_solution="    return a + b\n",
         prompt='def add(a: int, b: int) -> int:\n    """ Sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n',
         test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"),
    dict(task_id="Test/1", entry_point="evens", canonical_solution="    return [x for x in xs if x % 2 == 0]\n",
         prompt='from typing import List\n\n\ndef evens(xs: List[int]) -> List[int]:\n    """ The even numbers of xs, in order. """\n',
         test="def check(candidate):\n    assert candidate([1, 2, 3, 4]) == [2, 4]\n    assert candidate([]) == []\n"),
]


def load_prepare():
    spec = importlib.util.spec_from_file_location("prepare_humaneval", os.path.join(REPO, "data", "humaneval", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("he") / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in PROBLEMS)
    return str(path)


def rows_of(folder):
    with open(os.path.join(folder, "test.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("tokenizer", ["gpt2", "smollm2-135m"])
def test_prepare_keeps_the_problem_and_its_tests(tokenizer, source, tmp_path):
    out = load_prepare().prepare(tokenizer, out=str(tmp_path / tokenizer), src=source)
    rows = rows_of(out)
    assert [r["task_id"] for r in rows] == ["Test/0", "Test/1"] and all(r["label"] == "coding" for r in rows)
    for row, problem in zip(rows, PROBLEMS):
        assert (row["code_prompt"], row["test"], row["entry_point"]) == (problem["prompt"], problem["test"], problem["entry_point"])
        if tokenizer == "gpt2":  # a base model continues the code itself
            assert row["prompt"] == problem["prompt"] and row["answer"] == problem["canonical_solution"]
        else:  # a chat model is asked for the whole function, fenced
            assert row["prompt"].startswith("<|im_start|>system") and problem["prompt"] in row["prompt"]
            assert row["answer"] == f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
        assert run_program(humaneval_program(row, row["answer"]))  # the reference answer passes, either way


def test_a_right_and_a_wrong_completion():
    problem = dict(PROBLEMS[1], code_prompt=PROBLEMS[1]["prompt"])
    assert run_program(humaneval_program(problem, problem["canonical_solution"]))
    assert not run_program(humaneval_program(problem, "    return xs\n"))  # its check fails
    assert not run_program(humaneval_program(problem, "    return [x for x in xs if\n"))  # a syntax error
    # a continuation runs on past the function: cut where it returns to column 0
    assert run_program(humaneval_program(problem, problem["canonical_solution"] + "\ndef main():\n    raise SystemExit(1)\nmain()\n"))
    # a chat answer: the first fenced block that defines the function (an empty one before it is skipped)
    chat = "```\n```\n\n```python\ndef evens(xs):\n    return [x for x in xs if not x % 2]\n```\nIt filters."
    assert completion_code(problem, chat).endswith("def evens(xs):\n    return [x for x in xs if not x % 2]\n")
    assert run_program(humaneval_program(problem, chat))
    assert run_program(humaneval_program(problem, "```python\n    return [x for x in xs if x % 2 == 0]\n```"))  # a body


def test_the_child_is_time_limited_offline_and_outside_the_checkout():
    assert not run_program("while True:\n    pass\n", timeout=2)
    assert run_program("import socket\ntry:\n    socket.socket()\nexcept OSError:\n    pass\nelse:\n    raise SystemExit(1)\n")
    assert not run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    here = (f"import os, sys\nassert os.getcwd() != {REPO!r} and not os.path.exists('eval.py')\n"
            f"assert {REPO!r} not in sys.path and not {{'PYTHONPATH', 'HOME', 'PATH'}} & set(os.environ)\n")
    assert run_program(here)
    assert run_program("import os\nopen('scratch.txt', 'w').write('x')\nassert os.path.exists('scratch.txt')\n")


def test_eval_task_humaneval_scores_by_running_the_completions(source, tmp_path, monkeypatch):
    """pass@1 of a tiny random GPT with the gpt2 vocabulary (it writes nonsense: 0), then with its generation
    replaced by the reference bodies (1) and by a wrong one (0): the score is what the tests say."""
    data = load_prepare().prepare("gpt2", out=str(tmp_path / "data"), src=source)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(family="llama", block_size=128, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    ckpt = str(tmp_path / "gpt.pt")
    save_checkpoint(ckpt, dict(method="ar", init_from="scratch", model_config=asdict(gpt.config), l2d_config=None,
                               lora_rank=2, lora_alpha=2.0, tokenizer="gpt2", classes=["coding"], optimizer={},
                               sampler={}, iter_num=0, config={}, rng=torch.get_rng_state(), state_dict=gpt.state_dict()))
    args = ["--ckpt", ckpt, "--task", "humaneval", "--data", data, "--max_new_tokens", "4", "--teacher_forced", "False"]

    def accuracy(name):
        result = ev.main(args + ["--out", str(tmp_path / f"{name}.json")])
        return result["rows"][0]["accuracy"], result["rows"][0]["example_correct"]

    assert accuracy("random") == (0.0, [0, 0])
    tok = ev.checkpoint.load(ckpt)[1]
    for name, bodies, want in (("right", [p["canonical_solution"] for p in PROBLEMS], [1, 1]),
                               ("wrong", ["    return a - b\n", PROBLEMS[1]["canonical_solution"]], [0, 1])):
        answers = iter([[(tok.encode(b), 1, 0)] for b in bodies])
        monkeypatch.setattr(ev, "generate_answers", lambda *a, **k: next(answers))
        assert accuracy(name) == (sum(want) / 2, want)
