"""What every data/<task>/prepare.py shares, so that each script keeps only its own job (reading or
making its examples): where the prepared folder goes and how it is written, and the command line's
frame (--tokenizer and --out first, --overwrite last, a bad option or file one line and exit 2).

    from data.prepare_common import command_line, run, write_prepared   # after putting the repo root on sys.path
"""
import argparse
import os

from configurator import fail
from data.dataset import tokenizer_tag, write_dataset

OVERWRITE_HELP = "replace a different dataset already prepared in the output folder"


def write_prepared(here, out, tokenizer, splits, **options):
    """dataset.write_dataset of splits into out, by default <here>/<tokenizer tag> (here: the task's folder,
    data/<task>); options go to write_dataset (classes, max_len, overwrite). Returns the output folder."""
    out = out or os.path.join(here, tokenizer_tag(tokenizer))
    write_dataset(out, tokenizer, splits, **options)
    return out


def command_line(doc, here, tokenizer, tokenizer_help, out=True):
    """The script's parser, its docstring `doc` as the description, with --tokenizer (default `tokenizer`)
    and, unless out=False (the script adds it itself, after options of its own), --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=tokenizer, help=tokenizer_help)
    if out:
        add_out(p, here)
    return p


def add_out(p, here):
    p.add_argument("--out", default=None, help=f"output folder (default data/{os.path.basename(here)}/<tokenizer tag>)")


def run(p, prepare, overwrite_help=OVERWRITE_HELP):
    """Add --overwrite, parse the command line and call prepare(**its options); a bad option or file
    (ValueError, FileNotFoundError) is one line, exit 2."""
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    args = vars(p.parse_args())
    try:
        prepare(**args)
    except (ValueError, FileNotFoundError) as e:  # bad options or files: one line, exit 2
        fail(e)
