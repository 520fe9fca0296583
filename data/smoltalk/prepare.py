"""SmolTalk (HuggingFaceTB/smoltalk, Apache-2.0): the chat data of the paper's training mix, each subset
with its guidance class (math, coding, general_qa).

    python -m data.smoltalk.prepare --tokenizer path/to/Llama-3.2-1B-Instruct   # -> data/smoltalk/Llama-3.2-1B-Instruct
    python -m data.smoltalk.prepare --subsets self-oss-instruct --limit 1000 --out /tmp/st   # a quick slice

Each example is one conversation in the chat template, the loss on every assistant turn and its end token; a
held-out row's answer is the last assistant turn. Reading .parquet files needs pip install pyarrow.
"""
import json
import os
import urllib.request

from configurator import configure, parse_list
from data.prepare_common import at_least, options, read_jsonl, run, write_prepared
from loading.pretrained import download_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ID = "HuggingFaceTB/smoltalk"
# The paper's mix: math (MetaMathQA, NuminaMath CoT), coding (self-oss-instruct), general QA (OpenHermes,
# smol-magpie-ultra). The paper reports ~892k examples; these five subsets' train splits hold ~0.7M.
SUBSETS = {"metamathqa-50k": "math", "numina-cot-100k": "math", "self-oss-instruct": "coding",
           "openhermes-100k": "general_qa", "smol-magpie-ultra": "general_qa"}


def download(subset, folder):
    """Fetch the subset's .parquet files from the hub into folder."""
    try:
        url = f"https://huggingface.co/api/datasets/{REPO_ID}/tree/main/data/{subset}"
        with urllib.request.urlopen(url, timeout=30) as response:
            files = [f["path"] for f in json.load(response) if f["path"].endswith(".parquet")]
        for path in files:
            target = os.path.join(folder, os.path.basename(path))
            if not os.path.isfile(target):
                download_file(f"https://huggingface.co/datasets/{REPO_ID}/resolve/main/{path}", target, timeout=60)
    except OSError as e:
        raise FileNotFoundError(f"SmolTalk {subset}: no files in {folder} and downloading them from {REPO_ID} failed "
                                f"({e}); offline, put data/{subset}/*.parquet of the hub's {REPO_ID} dataset into "
                                f"{folder}/ (or .jsonl files in the same schema), or pass --src") from None


def read_split(split, folder):
    """The conversations of every {split}*.parquet / .jsonl file in folder, in order; a row without a list of
    {"role", "content"} messages with an assistant turn is an error naming its file and row."""
    conversations = []
    for name in sorted(n for n in os.listdir(folder) if n.startswith(split) and n.endswith((".parquet", ".jsonl"))):
        path = os.path.join(folder, name)
        if name.endswith(".jsonl"):
            rows = list(read_jsonl(path).values())
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise FileNotFoundError(f"reading {path} needs pyarrow: pip install pyarrow") from None
            rows = pq.read_table(path, columns=["messages"]).to_pylist()
        for n, row in enumerate(rows, 1):
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                         and m.get("role") in ("system", "user", "assistant")
                                                         for m in messages):
                raise ValueError(f"{path} row {n}: 'messages' must be a list of {{'role': system|user|assistant, "
                                 "'content': text}, as in SmolTalk")
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{path} row {n}: the conversation has no assistant turn to learn from")
            conversations.append([dict(role=m["role"], content=m["content"]) for m in messages])
    return conversations


def prepare(tokenizer="smollm2-135m", out="", subsets=None, src="", max_len=2048, limit=None, n_test=100,
            overwrite=False):
    at_least(0, max_len=max_len)
    at_least(1, limit=limit, n_test=n_test)
    subsets = parse_list("subsets", subsets, str, SUBSETS)
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise ValueError(f"unknown --subsets {', '.join(unknown)}; known: {', '.join(SUBSETS)}")
    splits = {"train": [], "test": []}
    for subset in subsets:
        folder = os.path.join(src or os.path.join(HERE, "raw"), subset)
        if not src and not (os.path.isdir(folder) and os.listdir(folder)):
            download(subset, folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"SmolTalk {subset}: {folder} not found; put the subset's train/test .parquet "
                                    "(or .jsonl) files there")
        for split, count in (("train", limit), ("test", n_test)):
            splits[split] += [dict(turns=c, label=SUBSETS[subset]) for c in read_split(split, folder)[:count]]
    classes = ["math", "coding", "general_qa"]
    return write_prepared(HERE, out, tokenizer, splits, classes=classes, max_len=max_len, overwrite=overwrite)


OPTIONS = options(prepare, "smollm2-135m, a HF tokenizer folder, ...",
                  subsets=f"comma-separated SmolTalk subsets (None: {', '.join(SUBSETS)})",
                  src="offline: a folder with <subset>/ folders of .parquet or .jsonl files ('': download them once "
                      "into data/smoltalk/raw)",
                  max_len="drop longer train conversations (tokens); 0 keeps all",
                  limit="only the first N train conversations of each subset",
                  n_test="held-out conversations per subset (of its test split)")

if __name__ == "__main__":
    run(prepare, lambda: configure(OPTIONS))
