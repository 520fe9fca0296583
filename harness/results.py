"""
eval.py's rows and the file that keeps them. A row's columns come from its per-example lists (pooled,
with 95% intervals; the lists stay in the row for harness/intervals.py). The JSON is rewritten atomically
after every batch, with the phase in progress (a probe time, a row's generation or its teacher-forced
pass) under "partial": a killed run goes on from its last batch with --resume True, and its rows come
out as one whole run's.

    results = ResultsFile.open(out, dict(config=cfg, rows=[]), resume=True)
    examples = results.resumed("steps=4", fresh=dict(correct=[]))   # what a killed run had saved
    results.save_partial("steps=4", examples, row)                 # after each batch
    results.finish_phase()                                         # the phase is complete
"""

import json
import os

from configurator import UsageError
from harness import diagnostics
from harness.intervals import ratio_interval, wilson_interval
from loading.files import check_output, write_atomic

HEADER = (f"{'setting':<24} {'acc':>6} {'95% CI':>15} {'n':>5} {'nfe/tok':>8} {'tok/s':>8} "
          f"{'tf_acc':>7} {'tf 95% CI':>15} {'tf_nll':>7} {'tf_nfe':>7}")


def tf_summary(ex):
    """A row's teacher-forced columns from its per-example lists (eval.answer_stats's, concatenated)."""
    count = max(sum(ex["count"]), 1)
    low, high = ratio_interval(ex["correct"], ex["count"])
    return dict(tf_accuracy=sum(ex["correct"]) / count, tf_ci_low=low, tf_ci_high=high, tf_nll=sum(ex["nll"]) / count,
                tf_tokens=sum(ex["count"]), tf_nfe_per_token=sum(ex["nfe"]) / count,
                **diagnostics.pooled_changes(ex, count), **{f"tf_example_{key}": values for key, values in ex.items()})


def generation_summary(ex):
    """A row's generation columns from its per-example lists (correct, tokens, nfe), seconds and samples."""
    n, correct, tokens = len(ex["correct"]), sum(ex["correct"]), sum(ex["tokens"])
    low, high = wilson_interval(correct, n)
    return dict(accuracy=correct / max(n, 1), correct=correct, n=n, ci_low=low, ci_high=high,
                nfe_per_token=sum(ex["nfe"]) / max(tokens, 1), tokens=tokens,
                tokens_per_s=tokens / max(ex["seconds"], 1e-9), seconds=ex["seconds"], samples=ex["samples"],
                example_correct=ex["correct"], example_tokens=ex["tokens"], example_nfe=ex["nfe"],
                **diagnostics.first_step_columns(ex))


def format_row(row):
    """A row as eval.py prints it, under HEADER."""
    dash = "-"
    gen = (f"{row['accuracy']:6.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] {row['n']:5d} "
           f"{row['nfe_per_token']:8.1f} {row['tokens_per_s']:8.1f}") if "accuracy" in row else \
        f"{dash:>6} {dash:>15} {dash:>5} {dash:>8} {dash:>8}"
    tf = (f"{row['tf_accuracy']:7.3f} [{row['tf_ci_low']:.3f}, {row['tf_ci_high']:.3f}] {row['tf_nll']:7.3f} "
          f"{row['tf_nfe_per_token']:7.1f}") if "tf_accuracy" in row else f"{dash:>7} {dash:>15} {dash:>7} {dash:>7}"
    gains = "".join(f"  {key} vs steps=1: {row[key][0]:+.3f} [{row[key][1]:+.3f}, {row[key][2]:+.3f}]"
                    for key in ("gain", "tf_gain") if key in row)
    return "\n".join(line for line in [f"{row['setting']:<24} {gen} {tf}", gains, *diagnostics.describe(row)] if line)


def write_json(path, result):
    write_atomic(path, lambda f: f.write(json.dumps(result, indent=1).encode()))


def free_name(path):
    """path, or path-2, path-3, ... (before the extension): the first that does not exist yet."""
    stem, ext = os.path.splitext(path)
    i = 1
    while os.path.exists(path):
        i += 1
        path = f"{stem}-{i}{ext}"
    return path


def output_path(out, ckpt_path, resume, overwrite):
    """--out, checked: by default eval_results.json next to the checkpoint (the current folder for a base
    model), or -2, -3, ... if that exists; an existing file only with --resume or --overwrite."""
    if resume and not out:
        raise UsageError("--resume True needs --out, the JSON of the run to go on from")
    out = out or free_name(os.path.join(os.path.dirname(ckpt_path) if ckpt_path else ".", "eval_results.json"))
    if not out.endswith(".json"):
        raise UsageError(f"--out {out} must end in .json (eval.py writes a JSON there)")
    if os.path.exists(out) and not (resume or overwrite):
        raise UsageError(f"{out} already exists; go on from it with --resume True, replace it with --overwrite True, "
                         "or pass another --out")
    return check_output(out, "--out", overwrite=True)  # a folder that exists and can be written


def resumable(out, result):
    """--resume: the JSON a killed run of the same command left at `out`, to go on from (`result` if none)."""
    if not os.path.isfile(out):
        print(f"note: nothing to resume at {out}; starting from the first example")
        return result
    try:
        with open(out) as f:
            old = json.load(f)
        old_config = {k: v for k, v in old["config"].items() if k != "resume"}
    except (ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"cannot resume from {out}: not an eval.py JSON ({e}); pass another --out") from None
    config = {k: v for k, v in json.loads(json.dumps(result["config"])).items() if k != "resume"}
    differ = sorted(k for k in config.keys() | old_config.keys() if config.get(k) != old_config.get(k))
    if differ:
        raise UsageError(f"cannot resume from {out}: it was run with other options ({', '.join(differ)}); "
                         "repeat its command with --resume True, or pass another --out")
    return old


class ResultsFile:
    def __init__(self, path, result):
        self.path, self.result = path, result

    @classmethod
    def open(cls, path, result, resume):
        return cls(path, resumable(path, result) if resume else result)

    def resumed(self, phase, fresh):
        """The per-example lists of `phase` that a killed run saved, else `fresh`."""
        partial = self.result.get("partial")
        return partial["examples"] if partial and partial["phase"] == phase else fresh

    def partial_row(self, name):
        """The row a killed run was in, if it is the row `name`."""
        kept = (self.result.get("partial") or {}).get("row")
        return kept if kept is not None and kept["setting"] == name else None

    def save_partial(self, phase, examples, row=None):
        self.result["partial"] = dict(phase=phase, examples=examples, row=row)
        self.write()

    def finish_phase(self):
        self.result.pop("partial", None)

    def write(self):
        write_json(self.path, self.result)
