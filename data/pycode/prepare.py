"""Python functions of the running interpreter's standard library, offline (class "code"): "Write the body
of this Python function." and its signature and docstring; the answer is the rest of the function.

    python -m data.pycode.prepare --tokenizer smollm2-135m    # -> data/pycode/smollm2-135m/

Kept: documented top-level functions and methods of top-level classes, ASCII-only, with a statement after the
docstring, outside test folders, each distinct function once (Python 3.11: 5,918).
"""
import ast
import os
import random
import sysconfig
import tokenize

from configurator import configure
from data.prepare_common import at_least, options, run, write_prepared

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def functions(path, max_lines):
    """(signature + docstring dedented, body indented as in the file) of one source file's functions."""
    try:
        with tokenize.open(path) as f:  # honours the file's coding declaration
            lines = f.read().splitlines()
        tree = ast.parse("\n".join(lines))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):  # unreadable (e.g. a dangling link) or not Python 3
        return
    nodes = []
    for node in tree.body:
        nodes += [node] + (node.body if isinstance(node, ast.ClassDef) else [])
    for node in nodes:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc_end = node.body[0].end_lineno  # the docstring is the first statement of the body
        if len(node.body) < 2 or node.body[1].lineno <= doc_end or node.end_lineno - node.lineno >= max_lines:
            continue
        start = (node.decorator_list[0] if node.decorator_list else node).lineno - 1
        text = lines[start:node.end_lineno]
        if any(line[:node.col_offset].strip() for line in text):  # a line left of the def (e.g. inside a string)
            continue
        text = [line[node.col_offset:] for line in text]
        head, body = "\n".join(text[:doc_end - start]), "\n".join(text[doc_end - start:]).rstrip()
        if (head + body).isascii():
            yield head, body


def prepare(tokenizer="char", out="", n_test=200, max_lines=40, seed=0, overwrite=False):
    at_least(1, n_test=n_test, max_lines=max_lines)
    pairs = set()
    for folder, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.endswith(".py"):
                pairs.update(functions(os.path.join(folder, name), max_lines))
    if len(pairs) <= n_test:
        raise ValueError(f"only {len(pairs)} functions of at most --max_lines {max_lines} lines, none left for "
                         f"train after --n_test {n_test}: raise --max_lines or lower --n_test")
    pairs = sorted(pairs)
    random.Random(seed).shuffle(pairs)
    examples = [dict(question=f"Write the body of this Python function.\n\n{head}", answer=body, label="code")
                for head, body in pairs]
    splits = {"train": examples[n_test:], "test": examples[:n_test]}
    return write_prepared(HERE, out, tokenizer, splits, classes=["code"], overwrite=overwrite)


OPTIONS = options(prepare, "char, gpt2, smollm2-135m, a HF tokenizer folder or a char vocab .json",
                  n_test="test functions", max_lines="skip longer functions (signature + docstring + body)",
                  seed="seeds the shuffle before the split")

if __name__ == "__main__":
    run(prepare, lambda: configure(OPTIONS))
