"""
eval.py's research columns: why an L2D row differs from its base, and what the path reads from x_t.

    python eval.py --ckpt out-lab-l2d/ckpt.pt --data data/arithmetic/lab-mul --steps 1,4,16 --diagnostics
    python eval.py --ckpt out-lab-l2d/ckpt.pt --data data/arithmetic/lab-mul --probe_t 0,0.5,0.9,1 --generate False

--diagnostics prints under each row: the answer tokens whose t = 1 read-out differs from the base's argmax,
with the corrections (base wrong, now right) and spoils among them (corrected - spoiled is the tf gain);
for fixed-step solvers the accuracy of the path's own guess x_hat_1 at each solver step (at the t it was
evaluated), and what the later steps changed from the first guess; for AR2Diff with one candidate, the
accuracy after its first refinement and the answers the later steps changed.
--probe_t: for each t, the teacher-forced accuracy and NLL when the path is given the *gold* next token
noised to t, as in training: a path that reads x_t goes to NLL ~0 at t = 1; one that does not stays flat
in t. Its noise is seeded per batch, so these rows depend on --batch_size.
"""

import torch

from diffusion import answer_positions, at_positions


def token_changes(stats, row=None):
    """Per example, from L2D.teacher_forced's `stats`: the read-out's tokens that differ from the base's
    (changed, corrected, spoiled), the correct guesses x_hat_1 at each solver step (trajectory_correct),
    and the changes from the first guess (first_*). Records the steps' t's in `row` (its x axis)."""
    if stats.get("base_tokens") is None:
        return {}
    targets = stats["targets"]
    mask, tokens = targets != -1, stats["logits"].argmax(-1)
    found = {}

    def changes(reference, prefix=""):
        changed = (tokens != reference) & mask
        found.update({f"{prefix}changed": changed.sum(1).tolist(),
                      f"{prefix}corrected": (changed & (tokens == targets)).sum(1).tolist(),
                      f"{prefix}spoiled": (changed & (reference == targets)).sum(1).tolist()})
    changes(stats["base_tokens"])
    if stats.get("trajectory"):
        per_step = [((guess == targets) & mask).sum(1).tolist() for _, guess in stats["trajectory"]]
        found["trajectory_correct"] = [list(example) for example in zip(*per_step)]
        changes(stats["trajectory"][0][1], "first_")  # the first guess, after t = 0: what later steps change
        if row is not None:
            row["tf_trajectory_t"] = [t for t, _ in stats["trajectory"]]
    return found


def pooled_changes(ex, count):
    """token_changes' per-example lists as a row's tf_ columns, per answer token."""
    pooled = {f"tf_{key}": sum(ex[key]) / count for key in ("changed", "corrected", "spoiled", "first_changed",
                                                             "first_corrected", "first_spoiled") if key in ex}
    if "trajectory_correct" in ex:
        pooled["tf_trajectory_accuracy"] = [sum(step) / count for step in zip(*ex["trajectory_correct"])]
    return pooled


def record_first_step(ex, first_correct, changed):
    """AR2Diff with one candidate: whether its answer after the first step was right, and later changed."""
    ex.setdefault("first_correct", []).append(first_correct)
    ex.setdefault("first_changed", []).append(int(changed))


def first_step_columns(ex):
    """The accuracy after AR2Diff's first step, and the answers the later steps changed, corrected, spoiled."""
    if not ex.get("first_correct"):
        return {}
    n, pairs = len(ex["correct"]), list(zip(ex["first_correct"], ex["correct"]))
    return dict(first_accuracy=sum(ex["first_correct"]) / n, first_changed=sum(ex["first_changed"]) / n,
                first_corrected=sum(now and not then for then, now in pairs) / n,
                first_spoiled=sum(then and not now for then, now in pairs) / n)


def describe(row):
    """The lines printed under a row for its diagnostic columns (none without them)."""
    lines = []
    if "tf_changed" in row:
        lines.append(f"  tf tokens changed from the base's: {row['tf_changed']:.3f} (corrected {row['tf_corrected']:.3f}, "
                     f"spoiled {row['tf_spoiled']:.3f})")
    if "first_accuracy" in row:
        lines.append(f"  after the first step: acc {row['first_accuracy']:.3f}; answers the later steps changed "
                     f"{row['first_changed']:.3f} (corrected {row['first_corrected']:.3f}, spoiled {row['first_spoiled']:.3f})")
    if "tf_trajectory_accuracy" in row:
        lines.append("  tf x_hat_1 accuracy along the ODE: " + "  ".join(
            f"t={t:.2f} {a:.3f}" for t, a in zip(row["tf_trajectory_t"], row["tf_trajectory_accuracy"])))
        lines.append(f"  tf tokens changed from the first guess (t={row['tf_trajectory_t'][0]:.2f}): "
                     f"{row['tf_first_changed']:.3f} (corrected {row['tf_first_corrected']:.3f}, "
                     f"spoiled {row['tf_first_spoiled']:.3f})")
    return lines


@torch.no_grad()
def gold_x_t(model, x, y, t, labels=None):
    """An L2D's logits (B, P, V) and targets (B, P) at the answer positions when each diffusion token is
    the *gold* next token noised to level t, as in training but at one fixed t (t = 0: the base's)."""
    logits, _ = model(x, y, labels, t=torch.full(x.shape, float(t), device=x.device))
    return dict(logits=logits, targets=at_positions(y, answer_positions(y)))


def probe_rows(evaluation, probe_t, teacher_forced_columns):
    """--probe_t: for each t, eval.py's teacher-forced columns when the path reads the gold token noised to t."""
    result = evaluation.results.result
    result.setdefault("probe", [])
    print(f"{'gold x_t at t':<14} {'acc':>6} {'95% CI':>15} {'nll':>7} {'tokens':>7}")
    for i, t in enumerate(probe_t):
        def probe_batch(ix, labels, x, y):
            torch.manual_seed(evaluation.cfg["seed"] + int(ix[0]))
            return gold_x_t(evaluation.model, x, y, t, labels)
        if i == len(result["probe"]):  # not kept from a resumed run
            result["probe"].append(dict(t=t, **teacher_forced_columns(evaluation, probe_batch, f"gold x_t, t={t:g}")))
            evaluation.results.finish_phase()
        stats = result["probe"][i]
        print(f"t={t:<12g} {stats['tf_accuracy']:6.3f} [{stats['tf_ci_low']:.3f}, {stats['tf_ci_high']:.3f}] "
              f"{stats['tf_nll']:7.3f} {stats['tf_tokens']:7d}")
    evaluation.results.write()
