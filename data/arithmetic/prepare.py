"""Synthetic arithmetic, the lab's offline task (class "math"): "What is a OP b?".

    python -m data.arithmetic.prepare --tokenizer char            # -> data/arithmetic/char/ (+ vocab.json)
    python -m data.arithmetic.prepare --digits 2 --ops "+-" --n_train 2000 --out /tmp/arith

Short and long operands are equally common, and subtraction puts the larger first, so every answer is a
non-negative integer. Held-out problems are drawn first; train never holds one, a+b and b+a counting as one.
"""
import os
import random

from configurator import configure
from data.prepare_common import at_least, options, run, write_prepared

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def random_number(rng, digits):
    k = rng.randint(1, digits)  # number of digits, then a value with exactly k digits (0 counts as 1 digit)
    return rng.randrange(10 ** (k - 1) if k > 1 else 0, 10 ** k)


def make_problems(n, rng, digits, ops, exclude=frozenset()):
    """n distinct problems, none of whose keys is in exclude. Returns (examples, their keys)."""
    distinct = len(ops) * 10 ** digits * (10 ** digits + 1) // 2  # a OP b and b OP a are one problem
    if n + len(exclude) > distinct:
        raise ValueError(f"only {distinct} distinct problems with --digits {digits} --ops {ops!r}: "
                         "ask for fewer examples")
    examples, keys = [], set()
    while len(examples) < n:
        op = rng.choice(ops)
        a, b = random_number(rng, digits), random_number(rng, digits)
        if op == "-" and a < b:
            a, b = b, a
        key = (op, min(a, b), max(a, b))
        if key in keys or key in exclude:
            continue
        keys.add(key)
        answer = str(OPS[op](a, b))
        examples.append(dict(question=f"What is {a} {op} {b}?", answer=answer, final=answer, label="math"))
    return examples, keys


def prepare(tokenizer="char", out="", n_train=10000, n_test=500, n_confirm=0, digits=3, ops="+-*", seed=0,
            overwrite=False):
    at_least(1, n_train=n_train, n_test=n_test, digits=digits)
    at_least(0, n_confirm=n_confirm)
    if not ops or not set(ops) <= set(OPS):
        raise ValueError(f"--ops {ops!r} must be some of {''.join(OPS)}")
    rng = random.Random(seed)
    held_out, held_out_keys = make_problems(n_test + n_confirm, rng, digits, ops)
    if n_confirm:  # one draw split at random, so test and confirm are alike even where the draw
        rng.shuffle(held_out)  # exhausts the small problems (1-digit x 1-digit has only 55)
    splits = {"test": held_out[:n_test], "confirm": held_out[n_test:]} if n_confirm else {"test": held_out}
    splits["train"], _ = make_problems(n_train, rng, digits, ops, exclude=held_out_keys)
    return write_prepared(HERE, out, tokenizer, splits, classes=["math"], overwrite=overwrite)


OPTIONS = options(prepare, "char, gpt2, smollm2-135m, a HF tokenizer folder or a char vocab .json",
                  n_train="train problems", n_test="test problems",
                  n_confirm="problems of a second held-out split, confirm", digits="max digits per operand",
                  ops="operators to use, a subset of +-*", seed="seeds the draw of problems")

if __name__ == "__main__":
    run(prepare, lambda: configure(OPTIONS))
