"""
95% confidence intervals for the accuracies eval.py reports: over n independent answers (Wilson),
over the tokens of m examples (the ratio estimator, since one answer's tokens are not independent),
and for the difference of two rows measured on the same examples (paired).
"""

import math

import numpy as np


def wilson_interval(correct, n, z=1.96):
    """95% Wilson score interval for a proportion correct / n ((0, 1) when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def ratio_interval(correct, count, z=1.96):
    """95% interval for a token accuracy sum(correct) / sum(count) pooled over examples (per-example
    lists). The tokens of one example are not independent draws, so the standard error is the ratio
    estimator's, over examples: var = m / (m - 1) * sum_i (c_i - p n_i)^2 / N^2 (m examples, N tokens)."""
    _, low, high = paired_difference(correct, np.zeros(len(count)), count, z)
    return max(0.0, low), min(1.0, high)


def paired_difference(correct_a, correct_b, count, z=1.96):
    """(difference, 95% low, high) of two accuracies measured on the same examples and tokens, a minus b
    (per-example correct counts, and the positions each example has). Pairing removes what the two rows
    share (an example that is easy for both), so the interval is narrower than the two rows' own ones
    suggest: the ratio estimator's variance of the per-example differences, as in ratio_interval."""
    a, b, k = (np.asarray(v, dtype=np.float64) for v in (correct_a, correct_b, count))
    m, total = len(k), k.sum()
    if m < 2 or total == 0:
        return 0.0, -1.0, 1.0
    diff = (a.sum() - b.sum()) / total
    half = z * math.sqrt(m / (m - 1) * (((a - b) - diff * k) ** 2).sum()) / total
    return diff, diff - half, diff + half
