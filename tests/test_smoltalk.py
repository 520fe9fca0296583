"""data/smoltalk/prepare.py offline: a small local file in SmolTalk's schema (written here) becomes the
prepared format, with prompts, answers, loss masks and class labels checked against the conversations."""

import importlib.util
import json
import os

import numpy as np
import pytest

from loading.tokenizer import END_OF_TURN, get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Double 4."},
         {"role": "assistant", "content": "8"}, {"role": "user", "content": "And 5?"}, {"role": "assistant", "content": "10"}]]
CODE = [[{"role": "user", "content": "Write id in Python."}, {"role": "assistant", "content": "def id(x):\n    return x"}]]


def load_prepare():
    spec = importlib.util.spec_from_file_location("prepare_smoltalk", os.path.join(REPO, "data", "smoltalk", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_subset(folder, conversations):
    os.makedirs(folder)
    for split in ("train", "test"):
        with open(os.path.join(folder, f"{split}-00000-of-00001.jsonl"), "w") as f:
            f.writelines(json.dumps({"messages": c, "source": "test"}) + "\n" for c in conversations)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = tmp_path_factory.mktemp("smoltalk")
    write_subset(src / "metamathqa-50k", MATH)
    write_subset(src / "self-oss-instruct", CODE)
    out = load_prepare().prepare("smollm2-135m", subsets=["metamathqa-50k", "self-oss-instruct"], src=str(src),
                                 out=str(src / "out"))
    return out


def test_masks_cover_every_assistant_turn_and_its_end_token_only(prepared):
    enc = get_tokenizer("smollm2-135m")
    end = enc.encode(END_OF_TURN, allowed_special="all")[0]
    with np.load(os.path.join(prepared, "train.npz")) as z:
        tokens, mask, offsets, labels = z["tokens"], z["loss_mask"], z["offsets"], z["labels"]
    assert len(offsets) - 1 == 3
    for e, conversation in enumerate(MATH + CODE):
        ids, m = tokens[offsets[e]:offsets[e + 1]], mask[offsets[e]:offsets[e + 1]]
        text = enc.decode(ids.tolist())
        assert text.startswith("<|im_start|>system\n")  # its own system turn, or the default one
        assert ("Be brief." in text) == (e == 1)
        answers = [t["content"] for t in conversation if t["role"] == "assistant"]
        # the masked tokens are the assistant turns, each closed by <|im_end|>, and nothing else
        assert enc.decode(ids[m].tolist()) == "".join(a + END_OF_TURN for a in answers)
        assert ids[m].tolist().count(end) == len(answers) and ids[-1] != end  # (the template's last "\n" is unmasked)
        for turn in conversation:  # every turn is there, in the template
            assert f"<|im_start|>{turn['role']}\n{turn['content']}<|im_end|>" in text
    with open(os.path.join(prepared, "meta.json")) as f:
        meta = json.load(f)
    assert [meta["classes"][i] for i in labels] == ["math", "math", "coding"]


def test_held_out_rows_end_at_the_last_assistant_turn(prepared):
    with open(os.path.join(prepared, "test.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["answer"] for r in rows] == ["2 + 3 = 5.", "10", "def id(x):\n    return x"]
    assert [r["label"] for r in rows] == ["math", "math", "coding"]
    assert rows[1]["prompt"].endswith("<|im_start|>user\nAnd 5?<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\n8<|im_end|>" in rows[1]["prompt"]  # the earlier turns are context


def test_offline_without_files_names_where_to_put_them(tmp_path, monkeypatch):
    module = load_prepare()

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(module.urllib.request, "urlopen", offline)
    monkeypatch.setattr(module, "HERE", str(tmp_path))  # downloads go to HERE/raw
    with pytest.raises(FileNotFoundError, match=r"put data/self-oss-instruct/\*\.parquet .* into .*self-oss-instruct/"):
        module.prepare("smollm2-135m", subsets=["self-oss-instruct"], out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="unknown --subsets nope"):
        module.prepare("smollm2-135m", subsets=["nope"])


def test_a_bad_conversation_names_its_file_and_row(tmp_path):
    write_subset(tmp_path / "self-oss-instruct", [[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match=r"train-00000-of-00001.jsonl row 1: the conversation has no assistant turn"):
        load_prepare().prepare("smollm2-135m", subsets=["self-oss-instruct"], src=str(tmp_path), out=str(tmp_path / "o"))


def test_parquet_files_in_the_hubs_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    folder = tmp_path / "self-oss-instruct"
    os.makedirs(folder)
    for split in ("train", "test"):
        pq.write_table(pa.table({"messages": CODE, "source": ["t"]}), folder / f"{split}-00000-of-00001.parquet")
    out = load_prepare().prepare("smollm2-135m", subsets=["self-oss-instruct"], src=str(tmp_path), out=str(tmp_path / "o"))
    with open(os.path.join(out, "test.jsonl")) as f:
        assert json.loads(f.readline())["answer"] == CODE[0][1]["content"]
