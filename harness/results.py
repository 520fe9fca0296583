"""
eval.py's results file: one JSON, rewritten atomically after every batch, with the phase in progress
(a probe time, a row's generation or its teacher-forced pass) under "partial", holding its per-example
lists so far and the row it belongs to. A killed run goes on from its last saved batch when its command
is repeated with --resume True, and its rows come out as one whole run's.

    results = ResultsFile.open(out, dict(config=cfg, rows=[]), resume=True)
    examples = results.resumed("steps=4", fresh=dict(correct=[]))   # what a killed run had saved
    results.save_partial("steps=4", examples, row)                 # after each batch
    results.finish_phase()                                         # the phase is complete
"""

import json
import os

from configurator import UsageError
from loading.files import write_atomic


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
    return out


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
