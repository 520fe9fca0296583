"""Hand-rolled ODE solvers for the L2D sampling ODE  dx/dt = v(x, t),  t: 0 (noise) -> 1 (data).

As k-diffusion's samplers: one function per method, the same call, an optional callback(info) after every
accepted step. Every row of x (B, D) is its own token's ODE, kept in float64; `nfe` (B,) counts each row's
velocity evaluations. Fixed-step solvers evaluate all rows at once (rows=None); dopri5 only the rows still
integrating, `rows` (n,) their indices in the batch.

    velocity(x, t, rows=None) -> (n, D)   x (n, D), t (n,): one time per row
    euler / midpoint / rk4(velocity, x, ts, callback=None) -> (x, nfe)      ts: the grid, e.g. grid(steps)
    dopri5(velocity, x, t0=0., t1=1., atol=1e-5, rtol=1e-5, callback=None, max_steps=1000) -> (x, nfe)

The L2D field is singular at t = 1 and *defined* as 0 there: euler and midpoint never evaluate at t = 1 and
are exact on straight paths; rk4's last stage sees v = 0 (it ends h/6 * v short); dopri5 would creep up to it
through rejected steps, so L2D stops it just short (diffusion.ADAPTIVE_T_END).
"""
from functools import partial

import torch


def grid(steps):
    """`steps` = N points linspace(0, 1, N) in float64 (N - 1 intervals). N=1 -> no integration."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)


def _bc(v, x):  # a per-row (B,) tensor shaped to broadcast against x (B, ...)
    return v.view(-1, *([1] * (x.dim() - 1)))


def _rms(z):  # the root-mean-square of each row (B,)
    return z.flatten(1).pow(2).mean(1).sqrt()


# --- fixed step: each step advances every row from t to t_next (both (B,)); the last stage uses t_next
# itself rather than t + h, which could round past the end of the grid.

def _euler_step(v, x, t, t_next):
    # Butcher tableau:  0 | ;  b = [1].   x' = x + h v(x, t)
    return x + _bc(t_next - t, x) * v(x, t)


def _midpoint_step(v, x, t, t_next):
    # Butcher tableau:  0 | ;  1/2 | 1/2 ;  b = [0, 1].   Explicit midpoint (RK2).
    h = _bc(t_next - t, x)
    k1 = v(x, t)
    k2 = v(x + h / 2 * k1, (t + t_next) / 2)
    return x + h * k2


def _rk4_step(v, x, t, t_next):
    # Classic RK4:  c = [0, 1/2, 1/2, 1];  a21 = a32 = 1/2, a43 = 1;  b = [1, 2, 2, 1] / 6.
    h = _bc(t_next - t, x)
    t_mid = (t + t_next) / 2
    k1 = v(x, t)
    k2 = v(x + h / 2 * k1, t_mid)
    k3 = v(x + h / 2 * k2, t_mid)
    k4 = v(x + h * k3, t_next)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _fixed(step, evaluations, velocity, x, ts, callback=None):
    """A fixed-step solver: `step` over the grid `ts` (1-D), the same for every row."""
    x = x.to(torch.float64)
    ts = torch.as_tensor(ts, dtype=torch.float64, device=x.device)
    B = x.shape[0]
    for i in range(len(ts) - 1):
        t, t_next = ts[i].repeat(B), ts[i + 1].repeat(B)
        x = step(velocity, x, t, t_next)
        if callback is not None:
            callback({"step": i, "t": t_next, "x": x})
    return x, torch.full((B,), evaluations * max(len(ts) - 1, 0), dtype=torch.long, device=x.device)


EVALUATIONS = {"euler": 1, "midpoint": 2, "rk4": 4}  # velocity evaluations per interval
euler = partial(_fixed, _euler_step, EVALUATIONS["euler"])  # order 1
midpoint = partial(_fixed, _midpoint_step, EVALUATIONS["midpoint"])  # order 2, the L2D reference default
rk4 = partial(_fixed, _rk4_step, EVALUATIONS["rk4"])  # classic Runge-Kutta, order 4


# --- adaptive: the Dormand-Prince 5(4) tableau (Dormand & Prince 1980; Hairer I, Table II.5.2).
_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
_E = [b5 - b4 for b5, b4 in zip(_A[6] + [0.0], _B4)]  # B5 = A's last row (FSAL); err = h sum E_i k_i = x5 - x4
# dopri5 gives up on a tolerance finer than ROUNDING * |x|, 100 float64 epsilons (scipy's floor for rtol):
# the error estimate is then mostly rounding, and only steps so short that it cancels to nothing pass
# (~1e-13 in t each), a crawl to max_steps. And below H_MIN_SPACINGS float64 spacings of t, where t + h
# can no longer be told from t (a NaN velocity shrinks h to there).
ROUNDING = 100 * torch.finfo(torch.float64).eps
H_MIN_SPACINGS = 16


class SolverError(RuntimeError, ValueError):
    """dopri5 cannot finish. Also a ValueError, since what was asked for (atol/rtol) is what usually
    cannot be met: the scripts print ValueErrors as one `error:` line and exit 2."""


def _give_up(what, rows, t, nfe, advice="loosen the tolerance (--atol/--rtol, e.g. 1e-3) or use a fixed-step "
                                         "solver (--solver midpoint --steps N)"):
    """The SolverError for the rows `rows` (B,) bool: what failed, at which t (the first such row's), what to do."""
    first = int(rows.nonzero()[0, 0])
    return SolverError(f"dopri5 {what} at t={t[first].item():.6g} ({int(rows.sum())} of {len(rows)} rows, "
                       f"{int(nfe[first])} evaluations); {advice}")


def _initial_step(f, x, t, T1, span, atol, rtol):
    """Hairer's initial step and k1 = v(x, t): h0 from the size of x and v, refined by one probe Euler step
    so that h^5 * (size of the 2nd derivative) ~ 0.01; clamped to the span, so the probe stays <= t1."""
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    k1 = f(x, t, active)
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(k1 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1).clamp(max=span)
    k_probe = f(x + _bc(h0, x) * k1, torch.minimum(t + h0, T1), active)
    d2 = _rms((k_probe - k1) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, (h0 * 1e-3).clamp(min=1e-6), (0.01 / dmax) ** (1 / 5))
    return torch.minimum(100 * h0, h1).clamp(max=span), k1


def _dopri5_step(f, x, k1, t, h, t_new, T1, active):
    """One step of size h (B,) from (t, x): the 5th-order x5, k7 = v(x5, t_new) (the next step's k1: FSAL)
    and the error estimate x5 - x4 = h sum E_i k_i."""
    hb = _bc(h, x)
    ks = [k1]
    for i in range(1, 7):
        y = x + hb * sum(a * k for a, k in zip(_A[i], ks))
        ti = t_new if _C[i] == 1.0 else torch.minimum(t + _C[i] * h, T1)
        ks.append(f(y, ti, active))
    return y, ks[6], hb * sum(e * k for e, k in zip(_E, ks))  # the input of stage 7 is x5


def dopri5(velocity, x, t0=0.0, t1=1.0, atol=1e-5, rtol=1e-5, callback=None, max_steps=1000):
    """Adaptive Dormand-Prince 5(4) with FSAL, each row stepping on its own (own t and h).

    Step: 7 stages k_i = v(x + h sum_j A_ij k_j, t + C_i h); x5 = x + h sum B5_i k_i, and h sum E_i k_i
    = x5 - x4 estimates the local error. B5 is A's 7th row, so k7 = v(x5, t + h) is the next k1 (FSAL):
    6 new evaluations a step, accepted or not. Accept where the RMS of err / (atol + rtol * max(|x|, |x5|))
    is <= 1; h *= clamp(0.9 err^(-1/5), 0.2, 10), never growing after a rejection. Initial h: Hairer,
    Norsett & Wanner, Solving ODEs I, sec. II.4. The last step lands exactly on t1. Finished rows are frozen
    and no longer evaluated, so a batch costs what its rows cost together, not B times its slowest row's
    (an L2D token may need 300 evaluations where the median needs 15). Raises SolverError, saying at which
    t and what to do, where a tolerance is finer than float64 resolves, a velocity is not finite (h below
    H_MIN_SPACINGS spacings of t), or after max_steps attempted steps.
    """
    x = x.to(torch.float64)
    B, dev = x.shape[0], x.device
    nfe = torch.zeros(B, dtype=torch.long, device=dev)
    if t1 < t0:
        raise ValueError(f"dopri5 integrates forward only: t1={t1} < t0={t0}")
    if t1 == t0:
        return x, nfe
    T1 = torch.full((B,), float(t1), dtype=torch.float64, device=dev)
    t = torch.full((B,), float(t0), dtype=torch.float64, device=dev)
    span = float(t1) - float(t0)
    # The shortest step worth trying: a few float64 spacings of the largest |t| on the way, so that
    # t + h > t always holds (only the last step, clipped onto t1, may be shorter).
    h_min = H_MIN_SPACINGS * torch.finfo(torch.float64).eps * max(abs(float(t0)), abs(float(t1)), span)

    def f(y, tt, active):  # v at the rows still integrating; finished rows get 0, never used
        rows = active.nonzero()[:, 0]
        nfe[rows] += 1
        v = torch.zeros_like(y)
        v[rows] = velocity(y[rows], tt[rows], rows)
        return v

    h, k1 = _initial_step(f, x, t, T1, span, atol, rtol)

    done = torch.zeros(B, dtype=torch.bool, device=dev)
    ratio = torch.zeros(B, dtype=torch.float64, device=dev)  # each row's last error test (inf: not finite)
    for n in range(max_steps):
        active = ~done
        unreachable = active & (_rms(ROUNDING * x.abs() / (atol + rtol * x.abs())) > 1)  # rounding alone fails
        if unreachable.any():
            raise _give_up(f"cannot meet atol={atol:g}, rtol={rtol:g}: finer than float64 can resolve "
                           f"(about {ROUNDING:.0e} of |x|)", unreachable, t, nfe)
        h = torch.where(active, torch.minimum(h, T1 - t), 0.0)  # finished rows: h = 0
        last = active & (h >= T1 - t)
        stuck = active & ~last & ~(h >= h_min)  # written ~(h >= h_min) so that a NaN h is stuck too
        if stuck.any() and not (torch.isfinite(h[stuck]).all() and torch.isfinite(ratio[stuck]).all()):
            raise _give_up("got a non-finite velocity (NaN or inf), which no step size passes,", stuck, t, nfe,
                           "check the model's weights and inputs")
        if stuck.any():  # the tolerance is out of reach
            raise _give_up(f"cannot meet atol={atol:g}, rtol={rtol:g}: the step size fell below {h_min:.1e}",
                           stuck, t, nfe)
        t_new = torch.where(last, T1, t + h)  # snap onto t1 instead of trusting t + h
        x5, k7, err = _dopri5_step(f, x, k1, t, h, t_new, T1, active)
        ratio = _rms(err / (atol + rtol * torch.maximum(x.abs(), x5.abs())))
        ratio = torch.nan_to_num(ratio, nan=float("inf"))  # NaN error -> reject, shrink
        accept = active & (ratio <= 1)
        factor = (0.9 * ratio ** -0.2).clamp(0.2, 10.0)  # err^(-1/(q+1)), q = 4
        factor = torch.where(accept, factor, factor.clamp(max=1.0))
        x = torch.where(_bc(accept, x), x5, x)
        k1 = torch.where(_bc(accept, x), k7, k1)
        t = torch.where(accept, t_new, t)
        h = h * factor
        done = done | (accept & last)
        if callback is not None and accept.any():
            callback({"step": n, "t": t.clone(), "x": x, "accepted": accept, "nfe": nfe.clone()})
        if done.all():
            return x, nfe
    raise _give_up(f"cannot meet atol={atol:g}, rtol={rtol:g} within max_steps={max_steps} steps: still", ~done, t, nfe)


SOLVERS = {"euler": euler, "midpoint": midpoint, "rk4": rk4, "dopri5": dopri5}
