"""What every data/<task>/prepare.py shares: its command line (configurator's, as every script's), the checks
of counts, the reading of .jsonl sources and where the prepared folder goes."""
import gzip
import inspect
import json
import os
import sys

from configurator import UsageError, fail
from data.dataset import tokenizer_tag, write_dataset


def write_prepared(here, out, tokenizer, splits, **options):
    """write_dataset into out, by default <here>/<tokenizer tag> (here: data/<task>). Returns the folder."""
    return write_dataset(out or os.path.join(here, tokenizer_tag(tokenizer)), tokenizer, splits, **options)


def at_least(minimum, **options):
    """A ValueError naming the first of these options (None: not given) that is not a whole number >= minimum."""
    for name, value in options.items():
        if value is not None and (type(value) is not int or value < minimum):
            raise ValueError(f"--{name} must be >= {minimum}, not {value!r}")


def read_jsonl(path):
    """{line number: row} of a .jsonl (or .jsonl.gz) file; a line that is not JSON is an error naming it."""
    rows = {}
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                if line.strip():
                    rows[n] = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not JSON ({e.msg}): fix or remove that line") from None
    return rows


def options(prepare, tokenizer, **meanings):
    """configurator's OPTIONS of a prepare script: --tokenizer, --out, `meanings`, --overwrite, each with the
    default of prepare's argument of that name."""
    meanings = dict(tokenizer=tokenizer, out="output folder ('': data/<task>/<tokenizer tag>)", **meanings,
                    overwrite="replace a different dataset already prepared there")
    defaults = inspect.signature(prepare).parameters
    return {key: (defaults[key].default, meaning) for key, meaning in meanings.items()}


def run(prepare, configure):
    """prepare(**configure()), configure being the script's command line: a bad option or file is one line and
    exit 2, Ctrl-C one line and exit 130."""
    try:
        args = configure()
        if args["out"] and os.path.exists(args["out"]) and not os.path.isdir(args["out"]):  # before any work
            raise UsageError(f"--out {args['out']} is a file; name a folder for the prepared dataset")
        prepare(**args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        fail(e)
    except KeyboardInterrupt:  # the folder is staged whole before it is moved in
        print("error: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
