"""
A remedy tried for the lab's flat step curve (issue #31): the ODE's time grid warped toward the t where the
path's loss changes most, as CDCD's time warping (Dieleman et al. 2022), at inference only. The path's
loss L(t) is measured at fixed t on the train split; F(t) = (L(t_1) - L(t)) / (L(t_1) - L(1)), made
monotone, is the share of the loss drop reached by t (t_1 = 1/40, the first t > 0), and the N-point grid
is 0 then t_k = F^-1(k / (N - 2)), k = 0..N-2, instead of linspace(0, 1, N). Everything else is eval.py, whose options follow --ckpt:

    python -m harness.experiments.warped_grid --ckpt out-seeds/l2d-1337-1/ckpt.pt --data data/arithmetic/lab-mul \
        --steps 1,2,4,8,16 --gen_batch_size 50 --max_new_tokens 8 --out out-seeds/l2d-1337-1/eval_test_warped.json
"""

import sys

import numpy as np
import torch

import diffusion
import eval as evaluate
from data.dataset import TokenDataset
from loading import checkpoint

T_POINTS = 41  # t's where L(t) is measured
EXAMPLES = 256  # train examples per t


@torch.no_grad()
def loss_by_t(model, data_dir):
    """The path's mean answer-token loss at each of T_POINTS fixed t's, on the train split's first examples."""
    data = TokenDataset([data_dir], "train")
    x, y, labels = data.get_batch(np.arange(min(EXAMPLES, len(data))), model.base.config.block_size)
    ts = torch.linspace(0, 1, T_POINTS)
    losses = []
    for t in ts:
        torch.manual_seed(0)  # the same noise x_0 at every t
        _, nll = model(x, y, labels, t=torch.full(x.shape, float(t)), reduction="none")
        losses.append(float(nll.sum() / (y != -1).sum()))
    return ts.double(), torch.tensor(losses, dtype=torch.float64)


def warped(ts, losses):
    """grid(steps) with its points at equal shares of the loss drop from the first t > 0 to t = 1. (At t = 0
    the merge gate w(c_t) - w(c_0) is exactly 0: L(0) is the base's loss, and its jump to L(0+) is the gate
    opening, not x_t being read.)"""
    ts, losses = ts[1:], losses[1:]
    share = torch.cummax((losses[0] - losses) / (losses[0] - losses[-1]), 0).values.clamp(0, 1)
    share[0], share[-1] = 0.0, 1.0

    def grid(steps):
        if steps == 1:
            return torch.zeros(1, dtype=torch.float64)
        t = np.interp(np.linspace(0, 1, steps - 1), share.numpy(), ts.numpy())  # F^-1, linearly interpolated
        t[-1] = 1.0
        return torch.from_numpy(np.concatenate([[0.0], np.maximum.accumulate(t)]))
    return grid


def main(argv):
    ckpt, data_dir = argv[argv.index("--ckpt") + 1], argv[argv.index("--data") + 1]
    model, _, _ = checkpoint.load(ckpt)
    ts, losses = loss_by_t(model, data_dir)
    diffusion.grid = warped(ts, losses)  # what L2D.integrate steps through
    print("L(t):", " ".join(f"{t:.3f}:{l:.3f}" for t, l in zip(ts.tolist()[::5], losses.tolist()[::5])))
    print("16-point grid:", " ".join(f"{t:.3f}" for t in diffusion.grid(16).tolist()))
    return evaluate.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
