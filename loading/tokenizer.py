"""Tokenizers as tiktoken Encodings (or a look-alike for character vocabularies): get_tokenizer("gpt2"),
("smollm2-135m"), ("x.gguf"), ("hf_folder"), ("vocab.json"); and the chat templates of instruct models."""
import json
import os
import re
from pathlib import Path

import tiktoken

GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
EOT = "<|endoftext|>"
TEXT_ENDS = (EOT, "<|end_of_text|>")  # what ends a text outside a chat template: GPT-2's and SmolLM2's, Llama 3's

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 cuts around every digit, then applies GPT-2's regex. As one regex: a digit is a piece of its own
# (" 12" -> " ", "1", "2") and ends the whitespace lookahead ("a  1" -> "a", "  ", "1"; GPT-2: "a", " ", " 1").
SMOLLM_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN}  # keys: GGUF's tokenizer.ggml.pre


def read_json(path: str) -> dict:
    """A JSON object from a file, or a one-line ValueError naming the file and where the JSON breaks."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise ValueError(f"{path} is not valid JSON ({where}); repair it or download it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; repair it or download it again")
    return data


def byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68
    are written, in order, as chr(256), chr(257), ... (space -> 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def bpe_encoding(name: str, vocab: dict[str, int], merges: list, special_tokens: dict[str, int],
                 pat_str: str) -> tiktoken.Encoding:
    """tiktoken Encoding from a byte-level BPE vocabulary and merge list. tiktoken merges the pair of lowest
    rank first, so rank = id applies the merges in order if each merge makes a larger id: checked here."""
    last_id = -1
    for i, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge  # "Ġ t" or ["Ġ", "t"]
        token_id = vocab.get("".join(pair)) if len(pair) == 2 else None
        if token_id is None:
            raise ValueError(f"{name}: merge #{i} {merge!r} is not two tokens whose join is in the vocabulary; "
                             "the tokenizer file is damaged")
        if token_id <= last_id:
            raise ValueError(f"{name}: merge #{i} {merge!r} makes id {token_id}, not after id {last_id}: "
                             "token ids must follow merge order for tiktoken's rank = id BPE")
        last_id = token_id
    to_byte = byte_decoder()
    ranks = {bytes(to_byte[c] for c in tok): i for tok, i in vocab.items() if tok not in special_tokens}
    # SmolLM2 lacks 21 bytes (b"\x04", lead bytes of U+40000..U+BFFFF), on which tiktoken panics. tiktoken
    # skips text its regex does not match, so leaving the characters they start out of it drops them, as
    # Hugging Face does (they are controls and unassigned code points, not letters, digits or spaces).
    ranges = ""
    for b in (b for b in range(256) if bytes([b]) not in ranks):
        if 0x80 <= b < 0xC0:
            raise ValueError(f"{name}: the vocabulary lacks the UTF-8 continuation byte {b:#x}, so some text "
                             "could not be encoded; the tokenizer file is damaged or not byte-level BPE")
        n = (b >= 0xC0) + (b >= 0xE0) + (b >= 0xF0)  # b leads n continuation bytes; p: its code point bits
        p = b & (0x7F >> n)
        lo, hi = max(p << 6 * n, (0, 0x80, 0x800, 0x10000)[n]), min(((p + 1) << 6 * n) - 1, 0x10FFFF)
        if lo <= hi:  # 0xC0, 0xC1 (overlong) and 0xF5.. (past U+10FFFF) lead no character
            ranges += f"\\x{{{lo:X}}}-\\x{{{hi:X}}}"
    pat_str = pat_str.replace(r"[^\s\p{L}\p{N}]", r"[^\s\p{L}\p{N}" + ranges + "]")
    if not set(TEXT_ENDS) & special_tokens.keys() and not any(m in special_tokens for m in CHAT_TEMPLATES):
        raise ValueError(f"{name}: the vocabulary has no {' or '.join(TEXT_ENDS)} special token and no chat template's "
                         "(ChatML, Llama 3), so texts could not end; only GPT-2-style, ChatML and Llama-3 vocabularies "
                         "are supported")
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)


def gpt2_dir() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("L2D_GPT2_TOKENIZER_DIR", os.path.join(repo, "..", "shared", "tokenizers", "gpt2"))


def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE from encoder.json and vocab.bpe in gpt2_dir(), else tiktoken's copy (downloaded once)."""
    paths = [os.path.join(gpt2_dir(), f) for f in ("encoder.json", "vocab.bpe")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        try:
            return tiktoken.get_encoding("gpt2")
        except (OSError, ValueError, ImportError) as e:  # offline, requests' ConnectionError is an OSError
            raise FileNotFoundError(f"GPT-2 tokenizer file {missing[0]} not found, and tiktoken could not download its "
                                    f"copy ({type(e).__name__}); put encoder.json and vocab.bpe in "
                                    f"{os.path.abspath(gpt2_dir())} or set L2D_GPT2_TOKENIZER_DIR") from None
    vocab = read_json(paths[0])
    try:
        merges = [line for line in Path(paths[1]).read_text("utf-8").split("\n")[1:] if line]  # first: "#version: 0.2"
    except UnicodeDecodeError:
        raise ValueError(f"{paths[1]} is not UTF-8 text; download it again") from None
    return bpe_encoding("gpt2", vocab, merges, {EOT: vocab[EOT]}, GPT2_PATTERN)


def gguf_encoding(path: str, name: str | None = None) -> tiktoken.Encoding:
    from gguf import TokenType
    from loading.gguf_file import gguf_field
    model, pre = gguf_field(path, "tokenizer.ggml.model"), gguf_field(path, "tokenizer.ggml.pre")
    if model != "gpt2" or pre not in PATTERNS:
        raise ValueError(f"{path}: tokenizer {model}/{pre} is not supported (byte-level BPE gpt2/{'|'.join(PATTERNS)})")
    tokens, types = gguf_field(path, "tokenizer.ggml.tokens"), gguf_field(path, "tokenizer.ggml.token_type")
    # control tokens (<|endoftext|>, <|im_start|>, ...) and user-defined ones are stored as plain text
    special = {tok: i for i, (tok, t) in enumerate(zip(tokens, types)) if t in (TokenType.CONTROL, TokenType.USER_DEFINED)}
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return bpe_encoding(name or str(path), vocab, gguf_field(path, "tokenizer.ggml.merges"), special, PATTERNS[pre])


def hf_encoding(folder: str) -> tiktoken.Encoding:
    """tiktoken Encoding from a Hugging Face folder's tokenizer.json (byte-level BPE only)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a Hugging Face model folder needs its tokenizer.json "
                                "(copy it from the model's repository)")
    tok = read_json(path)
    model, added = tok.get("model"), tok.get("added_tokens", [])
    if not (isinstance(model, dict) and isinstance(model.get("vocab"), dict) and isinstance(model.get("merges"), list)
            and isinstance(added, list) and all(isinstance(t, dict) and {"content", "id"} <= t.keys() for t in added)):
        raise ValueError(f"{path} has no \"model\" entry with a vocab object and a merges list, or added_tokens "
                         "not a list of {content, id}: a damaged Hugging Face tokenizer file; copy it again")
    pre = json.dumps(tok.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre:
        raise ValueError(f"{folder}: only byte-level BPE tokenizers are supported")
    split = re.search(r'"type": "Split", "pattern": \{"Regex": ("(?:[^"\\]|\\.)*")', pre)  # Llama 3's own regex
    pattern = json.loads(split[1]) if split else SMOLLM_PATTERN if '"individual_digits": true' in pre else GPT2_PATTERN
    return bpe_encoding(folder, model["vocab"], model["merges"], {t["content"]: t["id"] for t in added}, pattern)


class CharTokenizer:
    """Character vocabulary with the part of tiktoken's interface the code uses; the last id is <|endoftext|>."""

    def __init__(self, chars, name: str = "char"):
        self.chars = sorted(set(chars) - {EOT})
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_token = len(self.chars)
        self.n_vocab = len(self.chars) + 1
        self.name = name  # the JSON path once saved/loaded, so get_tokenizer(tok.name) works
        self.special_tokens_set = {EOT}

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary of {self.name}") from None

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        if EOT in text and not (allowed_special == "all" or EOT in allowed_special):
            raise ValueError(f"text contains {EOT}: pass allowed_special='all' to encode it as a special token")
        first, *rest = [self.encode_ordinary(part) for part in text.split(EOT)]
        return first + [i for part in rest for i in [self.eot_token] + part]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else EOT for i in ids)

    def save(self, path: str):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "char", "chars": self.chars}, f, ensure_ascii=False)
        self.name = path

    @classmethod
    def load(cls, path: str) -> "CharTokenizer":
        d = read_json(path)
        if d.get("type") != "char" or not isinstance(d.get("chars"), list):
            raise ValueError(f"{path} is not a CharTokenizer JSON file (type \"char\" and a \"chars\" list); "
                             "prepare the data again to rewrite it")
        return cls(d["chars"], name=path)


def get_tokenizer(name_or_path: str):
    name = str(name_or_path)
    if name in GPT2_MODELS:
        return gpt2_encoding()
    if name == "smollm2-135m":
        from loading.gguf_file import smollm2_gguf_path
        return gguf_encoding(smollm2_gguf_path(), name="smollm2-135m")
    if name.endswith(".gguf") and os.path.isfile(name):
        return gguf_encoding(name)
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json")):
        model_type = read_json(os.path.join(name, "config.json")).get("model_type")
        return gpt2_encoding() if model_type == "gpt2" else hf_encoding(name)
    if name.endswith(".json") and os.path.isfile(name):
        return CharTokenizer.load(name)
    raise ValueError(f"unknown tokenizer {name!r}: expected one of {', '.join(GPT2_MODELS)}, smollm2-135m, "
                     "a .gguf file, a Hugging Face model folder, or a CharTokenizer .json file")


# Chat templates, ChatML (SmolLM2-Instruct, Qwen2) and Llama 3, each told by a special token only it has: a
# turn's header, its end, what follows the end, what begins a conversation, and the default system turn
# (SmolLM2's; Llama 3's own template adds only dates, left out here).
END_OF_TURN = "<|im_end|>"
CHAT_TEMPLATES = {
    "<|im_start|>": dict(header="<|im_start|>{role}\n", end=END_OF_TURN, sep="\n", begin="",
                         system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "<|start_header_id|>": dict(header="<|start_header_id|>{role}<|end_header_id|>\n\n", end="<|eot_id|>", sep="",
                                begin="<|begin_of_text|>", system=None),
}


def chat_template(enc):
    """The tokenizer's entry of CHAT_TEMPLATES, or None for a base model's."""
    return next((t for marker, t in CHAT_TEMPLATES.items() if marker in enc.special_tokens_set), None)


def has_chat_template(enc) -> bool:
    return chat_template(enc) is not None


def end_token(enc) -> int:
    """The id that ends an answer: the chat template's end of turn, else the vocabulary's end of text."""
    t = chat_template(enc)
    end = t["end"] if t else next(e for e in TEXT_ENDS if e in enc.special_tokens_set)
    return enc.encode(end, allowed_special="all")[0]


def stop_tokens(enc) -> set[int]:
    """The ids that end a generation: end_token(enc) and, under a chat template, any end of text too."""
    ends = [e for e in TEXT_ENDS if e in enc.special_tokens_set]
    return {end_token(enc)} | {enc.encode(e, allowed_special="all")[0] for e in ends}


def chat_turn(enc, role: str, content: str) -> str:
    """One whole turn (header, content, end) in the tokenizer's template."""
    t = chat_template(enc)
    return t["header"].format(role=role) + content + t["end"] + t["sep"]


def chat_start(enc) -> str:
    """What a conversation without its own system turn begins with (the template's default system turn)."""
    t = chat_template(enc)
    return t["begin"] + (chat_turn(enc, "system", t["system"]) if t["system"] else "")


def chat_prompt(enc, user_text: str) -> str:
    """The default system turn, one user turn and the assistant's header (encode with allowed_special="all")."""
    if not has_chat_template(enc):
        raise ValueError(f"tokenizer {enc.name} has no chat template (no <|im_start|> or <|start_header_id|> token)")
    return chat_start(enc) + chat_turn(enc, "user", user_text) + chat_template(enc)["header"].format(role="assistant")
