"""
The velocity field that L2D's sampling ODE integrates (docs/method.md, sec. 5), for the solvers of
solvers.py, and what it reuses:

    dx/dt = v(x, t) = (x_hat_1 - x) / (1 - t),    x_hat_1 read from the path's logits at (x, t).

- estimate_x1: x_hat_1 from the logits (argmax, a draw at temperature 1 - t, or the expected V);
- VelocityField: v for the B*P diffusion tokens of one L2D.integrate call, one ODE row each;
  guided() wraps two of them into classifier-free guidance;
- FlowMemo: what generation reuses from one token to the next (L2D.generate owns one);
- PackedRows (dopri5 only): the path for the tokens still integrating, packed into a smaller batch.
"""

import torch
import torch.nn.functional as F


def estimate_x1(logits, t, how, flow_embed, vocab_flow=None):
    """x_hat_1, the path's estimate of the clean token's flow embedding, from its logits (n, vocab) at
    times t (n,): "argmax", V[argmax]; "sample", V of a token drawn at temperature tau(t) = 1 - t
    (explore early, commit late); "mean", the expected embedding softmax(logits) @ V, in float32
    (vocab_flow: V for the whole vocabulary)."""
    if how == "argmax":
        return flow_embed(logits.argmax(-1))
    if how == "sample":
        tau = (1 - t).clamp(min=1e-3)[:, None]
        return flow_embed(torch.multinomial(F.softmax(logits.float() / tau, -1), 1)[:, 0])
    with torch.autocast(logits.device.type, enabled=False):
        return F.softmax(logits.float(), -1) @ vocab_flow


class FlowMemo:
    """What integrate() reuses from one token to the next of a sequence (generate owns one): the (t, label)
    conditioning, since fixed-step solvers visit the same t's for every token, and V for the whole
    vocabulary (estimate="mean")."""

    def __init__(self):
        self.by_t, self.vocab_flow = {}, None

    def shared_conditioning(self, l2d, t, labels):
        """l2d.conditioning of one row, broadcast over a batch whose rows all share one t and label."""
        key = (t[0].item(), None if labels is None else labels[0].item())
        if key not in self.by_t:
            self.by_t[key] = l2d.conditioning(t[:1].view(1, 1).float(), None if labels is None else labels[:1])
        return self.by_t[key]

    def flow_table(self, l2d, device):
        if self.vocab_flow is None:
            self.vocab_flow = l2d.flow_embed(torch.arange(l2d.base.config.vocab_size, device=device))
        return self.vocab_flow


class VelocityField:
    """v(x, t) = (x_hat_1 - x) / (1 - t) of the B*P diffusion tokens of integrate(), in the solvers'
    shape: x (n, d_f) float64, t (n,), one ODE row per position; `rows` (n,) names the rows dopri5 still
    integrates (None: all). Keeps every row's latest logits and the t they were evaluated at (for the
    callback). labels None: the null class (guidance's unconditional field)."""

    def __init__(self, l2d, h_main, cache, labels, pos, estimate, memo, packed=None):
        self.l2d, self.h_main, self.cache, self.labels, self.pos = l2d, h_main, cache, labels, pos
        self.estimate, self.memo, self.packed = estimate, memo, packed
        self.logits = self.logits_t = None

    def path_logits(self, x, t, rows=None):
        """Logits (n, vocab) of the path at x (n, d_f), t (n,)."""
        if rows is not None:
            return self.packed(rows, x.float(), t.float(), self.labels)
        B, P = self.h_main.shape[:2]
        labels, t_bp = self.labels, t.view(B, P).float()
        one_t = self.packed is None and bool((t == t[0]).all()) and (labels is None or bool((labels == labels[0]).all()))
        conditioning = self.memo.shared_conditioning(self.l2d, t, labels) if one_t else self.l2d.conditioning(t_bp, labels)
        return self.l2d.predict(self.h_main, self.cache, x.view(B, P, -1).float(), t_bp, conditioning, self.pos).flatten(0, 1)

    def __call__(self, x, t, rows=None):
        rows = None if rows is not None and len(rows) == self.h_main.shape[0] * self.h_main.shape[1] else rows
        logits = self.path_logits(x, t, rows)
        self.logits = logits if rows is None else self.logits.index_copy(0, rows, logits)
        self.logits_t = t if rows is None else self.logits_t.index_copy(0, rows, t)
        vocab_flow = self.memo.flow_table(self.l2d, x.device) if self.estimate == "mean" else None
        x_hat = estimate_x1(logits, t, self.estimate, self.l2d.flow_embed, vocab_flow).double()
        v = (x_hat - x) / (1 - t[:, None]).clamp(min=1e-12)
        return torch.where(t[:, None] >= 1, torch.zeros_like(v), v)  # singular at t=1: defined 0


def guided(field, null_field, w):
    """Classifier-free guidance as a wrapper around the field: v = w v(x, t | class) + (1 - w) v(x, t | null)."""
    return lambda x, t, rows=None: w * field(x, t, rows) + (1 - w) * null_field(x, t, rows)


# --- dopri5 only: the tokens still integrating ---------------------------------------------------
# Fixed-step solvers evaluate every token at every step. dopri5 stops each token when its error test
# passes, so after a while it evaluates only some rows: they are packed into a smaller batch, which
# costs what those rows cost.
def pack_positions(rows, P):
    """Lay out a sorted subset `rows` (n,) of the B*P flattened positions (B, P) as a smaller batch:
    returns the batch rows they occupy `batch` (B',), `packed` (B', P'), each slot's index into `rows`
    (P' = the most positions any one batch row keeps; spare slots repeat that row's last position),
    and where each of the n positions sits in `packed`: (batch slot (n,), position slot (n,))."""
    batch, row_of = torch.unique_consecutive(rows // P, return_inverse=True)
    counts = torch.bincount(row_of)
    first = counts.cumsum(0) - counts  # index in `rows` of each batch row's first position
    slot_of = torch.arange(len(rows), device=rows.device) - first[row_of]
    slots = torch.arange(int(counts.max()), device=rows.device)
    packed = first[:, None] + torch.minimum(slots, counts[:, None] - 1)
    return batch, packed, (row_of, slot_of)


class PackedRows:
    """The path for some of the B*P diffusion tokens of integrate(): `rows` (n,), sorted indices into the
    flattened (B, P), with their x_t (n, d_f) and t (n,) -> logits (n, vocab). Each token reads its own
    batch row's K/V and padding, so the tokens are packed into the batch rows they belong to; the copy
    of those rows' K/V is kept while the set of batch rows stays."""

    def __init__(self, l2d, h_main, cache, pos=None):
        B, P = h_main.shape[:2]
        self.l2d, self.h_main, self.cache = l2d, h_main, cache
        self.pos = torch.arange(len(cache) - P, len(cache), device=h_main.device).expand(B, P) if pos is None else pos
        self.batch, self.batch_cache = None, None

    def __call__(self, rows, x_t, t, labels=None):
        B, P = self.h_main.shape[:2]
        batch, packed, (row_of, slot_of) = pack_positions(rows, P)
        if self.batch != batch.tolist():  # copy the K/V of those batch rows (none while all B remain)
            self.batch = batch.tolist()
            self.batch_cache = self.cache if len(batch) == B else self.cache.select(batch)
        flat = rows[packed]  # (B', P') indices into the flattened (B, P)
        t = t[packed]
        conditioning = self.l2d.conditioning(t, None if labels is None else labels[batch])
        logits = self.l2d.predict(self.h_main.flatten(0, 1)[flat], self.batch_cache, x_t[packed], t, conditioning,
                                  self.pos.flatten()[flat])
        return logits[row_of, slot_of]
