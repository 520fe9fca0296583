"""GSM8K grade-school math word problems (7,473 train / 1,319 test), class "math".

    python -m data.gsm8k.prepare                         # smollm2-135m chat format -> data/gsm8k/smollm2-135m/
    python -m data.gsm8k.prepare --tokenizer gpt2 --limit 50 --out /tmp/gsm8k   # "Question: ...\\nAnswer: ", a slice

The answer is the worked solution without the calculator notes "<<3*4=12>>", ending in "#### N", N without
thousands commas: test.jsonl's "final", compared with the last number the model writes.
"""
import os
import re

from configurator import configure
from data.prepare_common import at_least, options, read_jsonl, run, write_prepared
from loading.pretrained import download_file

HERE = os.path.dirname(os.path.abspath(__file__))
URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
SHARED = os.path.join(HERE, "..", "..", "..", "shared", "data", "gsm8k")


def read_split(split, src=""):
    """The examples of {split}.jsonl from src, else ../shared/data/gsm8k, else data/gsm8k/raw/ (downloaded once)."""
    default = SHARED if os.path.isfile(os.path.join(SHARED, f"{split}.jsonl")) else os.path.join(HERE, "raw")
    path = os.path.join(src or default, f"{split}.jsonl")
    if not src and not os.path.isfile(path):
        try:
            download_file(URL.format(split), path)
        except OSError as e:
            raise FileNotFoundError(f"GSM8K {split}.jsonl is not in {os.path.abspath(SHARED)} and downloading "
                                    f"{URL.format(split)} failed ({e}); pass --src DIR") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GSM8K: {path} not found")
    examples = []
    for n, row in read_jsonl(path).items():
        if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)
                and row["answer"].count("####") == 1):
            raise ValueError(f'{path} line {n} is not GSM8K\'s {{"question": text, "answer": "... #### N"}}: '
                             "fix or remove that line")
        solution, final = row["answer"].split("####")
        final = final.strip().replace(",", "")
        solution = re.sub(r"<<[^>]*>>", "", solution).rstrip()
        examples.append(dict(question=row["question"], answer=f"{solution}\n#### {final}", final=final, label="math"))
    return examples


def prepare(tokenizer="smollm2-135m", out="", src="", max_len=1024, limit=None, overwrite=False):
    at_least(0, max_len=max_len)
    at_least(1, limit=limit)
    splits = {s: read_split(s, src)[:limit] for s in ("train", "test")}
    return write_prepared(HERE, out, tokenizer, splits, classes=["math"], max_len=max_len, overwrite=overwrite)


OPTIONS = options(prepare, "smollm2-135m, gpt2, a HF tokenizer folder, char, ...",
                  src="folder with train.jsonl and test.jsonl ('': ../shared/data/gsm8k, else downloaded once "
                      "into data/gsm8k/raw)",
                  max_len="drop longer train examples (tokens); 0 keeps all",
                  limit="use only the first N examples of each split")

if __name__ == "__main__":
    run(prepare, lambda: configure(OPTIONS))
