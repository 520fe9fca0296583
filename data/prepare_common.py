"""What every data/<task>/prepare.py shares: the command line (--tokenizer and --out first, --overwrite last,
every default in -h; a bad option or file is one line and exit 2, Ctrl-C one line and exit 130), the checks
of counts, the reading of .jsonl sources and where the prepared folder goes."""
import argparse
import gzip
import json
import os
import sys

from configurator import fail
from data.dataset import tokenizer_tag, write_dataset


def write_prepared(here, out, tokenizer, splits, **options):
    """write_dataset into out, by default <here>/<tokenizer tag> (here: data/<task>). Returns the folder."""
    return write_dataset(out or os.path.join(here, tokenizer_tag(tokenizer)), tokenizer, splits, **options)


def at_least(minimum, **options):
    """A ValueError naming the first of these options (None: not given) below minimum."""
    for name, value in options.items():
        if value is not None and value < minimum:
            raise ValueError(f"--{name} must be >= {minimum}, not {value}")


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # every option's default, where it has one
        shown = action.default not in (None, argparse.SUPPRESS) and action.default is not False
        return f"{action.help} (default: {action.default})" if shown else action.help


def command_line(doc, here, tokenizer, tokenizer_help):
    """The script's parser (its docstring the description) with --tokenizer (default `tokenizer`) and --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.error = lambda message: fail(f"{message} (-h lists the options)")  # one line, not argparse's usage block
    p.add_argument("--tokenizer", default=tokenizer, help=tokenizer_help)
    p.add_argument("--out", default=None, help=f"output folder (default data/{os.path.basename(here)}/<tokenizer tag>)")
    return p


def run(p, prepare):
    """Add --overwrite, parse the command line and call prepare(**its options)."""
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already prepared there")
    args = vars(p.parse_args())
    try:
        if args["out"] and os.path.exists(args["out"]) and not os.path.isdir(args["out"]):  # before any work
            raise ValueError(f"--out {args['out']} is a file; name a folder for the prepared dataset")
        prepare(**args)
    except (ValueError, FileNotFoundError) as e:  # bad options or files
        fail(e)
    except KeyboardInterrupt:  # the folder is staged whole before it is moved in
        print("error: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
