"""Prepared token data: the on-disk format, its writer (for data/*/prepare.py) and the batch loader.

A prepared folder (by default data/<task>/<tag>, tag from the tokenizer: char, gpt2, smollm2-135m, ...) holds
  train.npz, test.npz (and optionally confirm.npz, a second held-out split), np.savez without pickles:
      tokens    int32 (N,)    all examples concatenated: prompt tokens, answer tokens, end token
      loss_mask bool  (N,)    True exactly on the answer tokens and the end token that closes the answer
      offsets   int64 (E+1,)  example e is tokens[offsets[e]:offsets[e+1]]
      labels    int16 (E,)    class of each example, an index into meta["classes"]
  test.jsonl (and confirm.jsonl): per held-out example its prompt, answer (no end token), final (math's gold
      answer, else null) and label
  meta.json {"tokenizer", "classes", "chat", "vocab_size", "eot"}: "tokenizer" is what get_tokenizer takes
      (a char vocabulary is saved beside the data as vocab.json); "eot" ends every answer and pads batches.
"""
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from loading.files import write_error
from loading.tokenizer import (CharTokenizer, chat_prompt, chat_start, chat_template, chat_turn, end_token,
                               get_tokenizer, read_json)


def encode_example(enc, ex, end):
    """(prompt text, tokens, loss mask, answer text) of an example: dict(question, answer) (or with its own
    exact "prompt" text), or dict(turns), a conversation [{"role", "content"}, ...] whose every assistant turn
    is an answer. Chat models get the chat template (the default system turn unless the conversation has
    one), other tokenizers "Question: ...\nAnswer: " per user turn. The prompt is everything before the last
    answer; each piece is encoded on its own, so the prompt encodes to exactly its tokens here."""
    template = chat_template(enc)
    if "turns" not in ex:
        prompt = chat_prompt(enc, ex["question"]) if template else f"Question: {ex['question']}\nAnswer: "
        pieces = [(ex.get("prompt") or prompt, False), (ex["answer"], True)]
    else:
        pieces = []
        if template:  # its own system turn, or the default one
            pieces.append((chat_start(enc) if ex["turns"][0]["role"] != "system" else template["begin"], False))
        for turn in ex["turns"]:
            if turn["role"] == "assistant":
                pieces += [(template["header"].format(role="assistant") if template else "", False),
                           (turn["content"], True), (template["sep"] if template else "", False)]
            elif template:
                pieces.append((chat_turn(enc, turn["role"], turn["content"]), False))
            elif turn["role"] == "user":
                pieces.append((f"Question: {turn['content']}\nAnswer: ", False))
    tokens, mask, texts, last = [], [], [], 0
    for text, is_answer in pieces:
        ids = enc.encode(text, allowed_special="all") + ([end] if is_answer else [])
        if is_answer:
            last = len(texts)
        tokens += ids
        mask += [is_answer] * len(ids)
        texts.append(text + enc.decode([end]) if is_answer else text)  # an earlier answer is closed in the prompt
    return "".join(texts[:last]), tokens, mask, pieces[last][0]


def tokenizer_tag(name):
    """Output folder name for a tokenizer: char for char vocabularies, else the name or folder's basename."""
    if name == "char" or name.endswith(".json"):
        return "char"
    return os.path.basename(os.path.normpath(name)).removesuffix(".gguf")


def write_dataset(out_dir, tokenizer, splits, classes, max_len=None, overwrite=False):
    """Tokenize splits = {"train": [ex, ...], "test": [...]} (ex as encode_example takes it, plus a label and
    optionally "final" and "fields" for the held-out row) into out_dir, written whole or not at all. tokenizer
    "char" builds a character vocabulary from the text. max_len drops longer train examples. An existing
    dataset is kept when the same, replaced only with overwrite (a checkpoint trained on it reads its vocab)."""
    if tokenizer == "char":
        text = (ex["question"] + ex["answer"] for exs in splits.values() for ex in exs)  # (no conversations)
        enc = CharTokenizer("".join(set("Question: \nAnswer: ").union(*text)))
    else:  # a model's tokenizer or another folder's vocab.json (so the two mix), found from any working directory
        enc = get_tokenizer(os.path.abspath(tokenizer) if os.path.exists(tokenizer) else tokenizer)
    encoded, end = {}, end_token(enc)
    for split, examples in splits.items():
        tokens, mask, offsets, labels, rows = [], [], [0], [], []
        for ex in examples:
            prompt, ids, answer_mask, answer = encode_example(enc, ex, end)
            if max_len and split == "train" and len(ids) > max_len:
                continue
            tokens += ids
            mask += answer_mask
            offsets.append(len(tokens))
            labels.append(classes.index(ex["label"]))
            rows.append(dict(prompt=prompt, answer=answer, final=ex.get("final"), label=ex["label"],
                             **ex.get("fields", {})))
        if not rows:  # training would wait forever for a batch, evaluation would have nothing to score
            raise ValueError(f"the {split} split of {out_dir} would have no examples: " + (
                f"all {len(examples)} are longer than max_len={max_len} tokens, raise --max_len" if examples else
                "the source gave none for it, check the source data and the split sizes asked for"))
        encoded[split] = tokens, mask, offsets, labels, rows
    meta = dict(tokenizer=tokenizer, classes=classes, chat=chat_template(enc) is not None, vocab_size=enc.n_vocab,
                eot=end)
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".prepare-", dir=parent) as staging:
            if isinstance(enc, CharTokenizer):  # saved beside the data, which names it relatively
                enc.save(os.path.join(staging, "vocab.json"))
                meta["tokenizer"] = "vocab.json"
            for split, (tokens, mask, offsets, labels, rows) in encoded.items():
                np.savez(os.path.join(staging, f"{split}.npz"), tokens=np.array(tokens, np.int32),
                         loss_mask=np.array(mask, bool), offsets=np.array(offsets, np.int64),
                         labels=np.array(labels, np.int16))
                if split != "train":  # eval.py reads the held-out prompts and answers as text
                    Path(staging, f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            Path(staging, "meta.json").write_text(json.dumps(meta, indent=1))
            installed = install(staging, out_dir, overwrite)
    except OSError as e:  # a full disk, a read-only folder: one line, the previous dataset kept
        raise write_error(out_dir, e) from None
    if not installed:
        print(f"{out_dir}: already prepared with these settings, left as it is")
        return out_dir
    for split, (tokens, _, offsets, _, rows) in encoded.items():
        lens = np.diff(offsets)
        print(f"{out_dir}/{split}.npz: {len(rows)} examples ({len(splits[split]) - len(rows)} dropped over "
              f"max_len={max_len}), {len(tokens)} tokens, length mean {lens.mean():.0f} max {lens.max()}")
    return out_dir


def install(staging, out_dir, overwrite):
    """Move staging's files into out_dir (False: it holds the same dataset already). A different one is
    refused unless overwrite, then removed first (no stale split stays). meta.json, last, marks a whole folder."""
    if os.path.isfile(os.path.join(out_dir, "meta.json")):
        if all(same_file(os.path.join(out_dir, name), os.path.join(staging, name)) for name in os.listdir(staging)):
            return False
        if not overwrite:
            raise ValueError(f"{out_dir} already holds a prepared dataset that these settings would change (a "
                             "checkpoint trained on it reads its vocabulary); pass --overwrite to replace it, or --out "
                             "another folder")
        for name in os.listdir(out_dir):
            if name in ("meta.json", "vocab.json") or name.endswith((".npz", ".jsonl")):
                os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(staging), key=lambda n: n == "meta.json"):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    return True


def same_file(old, new):
    """Whether old holds what new does: an .npz by its arrays (the zip's bytes carry timestamps), else by bytes."""
    try:
        if new.endswith(".npz"):
            a, b = read_npz(old), read_npz(new)
            return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)
        return Path(old).read_bytes() == Path(new).read_bytes()
    except (OSError, ValueError):  # missing or damaged: it differs
        return False


def read_npz(path):
    """The arrays of a prepared .npz file; a truncated or damaged one is a ValueError naming it."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is truncated or damaged ({type(e).__name__}); re-run the prepare script that "
                         "wrote it, with --overwrite") from None


class TokenDataset:
    """One split of one or more prepared folders, concatenated. Labels are remapped to the union of the
    folders' classes (in order of appearance); all folders must share one tokenizer."""

    def __init__(self, data_dirs, split):
        data_dirs = [data_dirs] if isinstance(data_dirs, str) else list(data_dirs)
        if not data_dirs or not all(isinstance(d, str) and d for d in data_dirs):
            raise ValueError("--datasets must list prepared folders, e.g. "
                             f"--datasets=\"['data/gsm8k/smollm2-135m']\"; got {data_dirs!r}")
        self.classes, parts = [], []
        for d in data_dirs:
            path = os.path.join(d, f"{split}.npz")
            if not os.path.isfile(os.path.join(d, "meta.json")):
                why = "holds no meta.json" if os.path.isdir(d) else "does not exist"
                raise FileNotFoundError(f"the dataset folder {d} {why}: write it with python -m data.<task>.prepare "
                                        "(its --out), or name a prepared folder")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: {d} has no {split} split; name a folder prepared with one")
            meta, z = read_json(os.path.join(d, "meta.json")), read_npz(path)
            tok = os.path.join(d, meta["tokenizer"])
            tok = tok if os.path.exists(tok) else meta["tokenizer"]
            key = (Path(tok).read_bytes() if os.path.isfile(tok) else tok, meta["chat"], meta["eot"])
            if not parts:
                self.key, self.tokenizer_path, self.vocab_size, self.eot = key, tok, meta["vocab_size"], meta["eot"]
            elif key != self.key:
                raise ValueError(f"{d} was prepared with tokenizer {tok!r} but {data_dirs[0]} with "
                                 f"{self.tokenizer_path!r}: prepare every folder with the same --tokenizer (for char, "
                                 f"pass the first folder's vocab.json as the --tokenizer of the others)")
            self.classes += [c for c in meta["classes"] if c not in self.classes]
            if not len(z["labels"]):  # written by hand or before write_dataset refused empty splits
                raise ValueError(f"{path} has no examples: prepare {d} again with more (or a larger --max_len)")
            remap = np.array([self.classes.index(c) for c in meta["classes"]], np.int64)
            parts.append((z["tokens"], z["loss_mask"], z["offsets"], remap[z["labels"]]))
        tokens, masks, offsets, labels = zip(*parts)
        self.tokens, self.loss_mask, self.labels = np.concatenate(tokens), np.concatenate(masks), np.concatenate(labels)
        starts = np.cumsum([0] + [len(t) for t in tokens])
        self.offsets = np.concatenate([o[:-1] + s for o, s in zip(offsets, starts)] + [starts[-1:]])
        self.tokenizer = get_tokenizer(self.tokenizer_path)

    def __len__(self):
        return len(self.labels)

    def get_batch(self, indices, block_size):
        """x (B,T) inputs, y (B,T) targets (token i+1 where it is an answer/end token, else -1), labels (B,).
        Right-padded with eot to the longest example (examples over block_size keep their start)."""
        indices = np.asarray(indices, np.int64)
        starts = self.offsets[indices]
        ends = np.minimum(self.offsets[indices + 1], starts + block_size + 1)
        x = np.full((len(indices), int((ends - starts).max()) - 1), self.eot, np.int64)
        y = np.full_like(x, -1)
        for b, (s, e) in enumerate(zip(starts, ends)):
            x[b, :e - s - 1] = self.tokens[s:e - 1]
            y[b, :e - s - 1] = np.where(self.loss_mask[s + 1:e], self.tokens[s + 1:e], -1)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(self.labels[indices])

    def answer_lengths(self):
        """Tokens of each example's answer, its end token included (E,)."""
        return np.add.reduceat(self.loss_mask.astype(np.int64), self.offsets[:-1])

    def prompt_answer_batch(self, indices, answer_len):
        """AR2Diff's batch: prompt (B, P) left-padded with eot to the longest, pad (B,) its padding per row
        (model.KVCache), answer (B, answer_len): the answer and its end token, then eot up to answer_len
        (the padding is a target too: it teaches the length). A longer answer is cut at answer_len."""
        indices = np.asarray(indices, np.int64)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        split = [s + int(np.argmax(self.loss_mask[s:e])) for s, e in zip(starts, ends)]  # first answer token
        P = max(a - s for s, a in zip(starts, split))
        prompt = np.full((len(indices), P), self.eot, np.int64)
        answer = np.full((len(indices), answer_len), self.eot, np.int64)
        for b, (s, a, e) in enumerate(zip(starts, split, ends)):
            prompt[b, P - (a - s):] = self.tokens[s:a]
            answer[b, :min(e - a, answer_len)] = self.tokens[a:min(e, a + answer_len)]
        pad = torch.from_numpy(P - (np.array(split) - starts))
        return torch.from_numpy(prompt), pad, torch.from_numpy(answer)


class BatchSampler:
    """Infinite, deterministic, resumable example order: each optimizer step takes the next batch_size (the
    global batch) indices of a seeded per-epoch permutation, rank r of world_size the r-th slice of it, so
    the global batch does not depend on the number of processes. state_dict() resumes it."""

    def __init__(self, n, batch_size, seed=0, rank=0, world_size=1):
        assert batch_size % world_size == 0, "global batch must split evenly over the ranks"
        assert n > 0, "no examples to sample: next_batch would wait forever"
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.load_state_dict({"epoch": 0, "pos": 0})

    def next_batch(self):
        """This rank's batch_size // world_size indices of the next global batch."""
        parts, need = [], self.batch_size
        while need:
            parts.append(self.order[self.pos:self.pos + need])
            need, self.pos = need - len(parts[-1]), self.pos + len(parts[-1])
            if self.pos == self.n:
                self.load_state_dict({"epoch": self.epoch + 1, "pos": 0})
        per_rank = self.batch_size // self.world_size
        return np.concatenate(parts)[self.rank * per_rank:(self.rank + 1) * per_rank]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
