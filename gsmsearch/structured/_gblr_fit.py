"""Fitting a GBLR matrix to a dense weight under a FLOP budget (the engine of ``GBLR.from_dense``).

A GBLR matrix (out m x in n) with K components of rank r (method.md section 1):

    W = sum_k (mR_k * U_k)(mC_k * V_k)^T,   mR_k = boxcar(row interval k), mC_k = boxcar(col interval k)

with cyclic intervals and cost sum_k min(r (h_k + c_k), h_k c_k) (see ``_cost.py``).

Two fitting methods:

- ``"greedy"`` (default, ours): Lagrangian greedy pursuit with interval-restricted power
  iterations.  With a price ``lam`` per multiply-add, the best interval for a component given its
  column factors V (orthonormal) is the cyclic interval maximising ``sum_{i in I} ||R_i V||^2 -
  lam r |I|`` (a maximum-subarray problem, solved batched with prefix sums), and symmetrically for
  the columns.  Alternating the two is a power iteration restricted to intervals (method.md 4b,
  with the ad-hoc threshold replaced by the price).  The price starts high and is lowered
  geometrically, so components enter roughly in order of error reduction per FLOP; full-width
  candidates (the residual's top singular pairs, i.e. plain low-rank terms) compete at every round.
  After each price level, a Gauss-Seidel pass refits every component on the residual plus itself
  (interval ends and content: coordinate ascent on the Lagrangian, never exceeding the budget).
  The result is compared with truncated SVD at the same budget and the better one is returned.
- ``"reference"``: the reference recipe (method.md section 4): SVD split into K rank-r components,
  all widths 1, random locations, Adam on ||W - M||_F^2 / ||M||_F^2 with boxcar masks and the
  straight-through estimator, mean width projected onto the budget by a uniform shift after each
  step; then a final uniform shift so the FLOP budget holds.  Kept for comparison.

Pure computation: no nn.Module, no I/O.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ._cost import gblr_flops
from ._mask import boxcar_mask, gaudi_mask

__all__ = ["GBLRFactors", "fit_gblr", "lowrank_fit", "FIT_METHODS", "FIT_OPTIONS"]

FIT_METHODS = ("greedy", "reference")
#: each method's knobs and their defaults (``fit_gblr(..., **options)``)
FIT_OPTIONS = {
    "greedy": dict(refit_passes=2, batch=16, power_iters=8, decay=0.6, lowrank_fallback=True,
                   max_levels=60, threads=1),
    "reference": dict(steps=1000, lr=1e-2),
}


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------
@dataclass
class GBLRFactors:
    """A fitted GBLR matrix.

    widths: (2, K) fractions; [0] row side (interval length round(w m)), [1] column side.
    locations: (2, K) fractions in [0, 1) (interval start round(l m) mod m).
    row_factors: (K, r, m), U_k^T, zero outside the row interval.
    col_factors: (K, r, n), V_k^T, zero outside the column interval.
    """

    widths: torch.Tensor
    locations: torch.Tensor
    row_factors: torch.Tensor
    col_factors: torch.Tensor

    @property
    def shape(self) -> Tuple[int, int]:
        return int(self.row_factors.shape[-1]), int(self.col_factors.shape[-1])

    @property
    def rank(self) -> int:
        return int(self.row_factors.shape[1])

    def flops(self) -> int:
        return gblr_flops(self.widths, self.shape, self.rank)

    def to_dense(self) -> torch.Tensor:
        """(m, n) reconstruction with exact 0/1 boxcar masks."""
        m, n = self.shape
        row_mask = boxcar_mask(self.widths[0], self.locations[0], m).to(self.row_factors.dtype)
        col_mask = boxcar_mask(self.widths[1], self.locations[1], n).to(self.col_factors.dtype)
        u = self.row_factors * row_mask[:, None, :]  # (K, r, m)
        v = self.col_factors * col_mask[:, None, :]  # (K, r, n)
        return torch.einsum("krm,krn->mn", u, v)


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------
def _check_args(weight, budget, rank_per_component, num_components, method):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor (out x in), got {shape}")
    if weight.numel() == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite, got NaN or inf entries")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if isinstance(rank_per_component, bool) or not isinstance(rank_per_component, int) or rank_per_component < 1:
        raise ValueError(f"rank_per_component must be a positive int, got {rank_per_component!r}")
    if num_components is not None and (
        isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1
    ):
        raise ValueError(f"num_components must be a positive int or None, got {num_components!r}")
    if method not in FIT_METHODS:
        raise ValueError(f"method must be one of {FIT_METHODS}, got {method!r}")
    return budget


def _check_options(options: dict, allowed: dict, method: str) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method={method!r}; known: {sorted(allowed)}"
        )
    return {**allowed, **options}


def fit_gblr(
    weight: torch.Tensor,
    budget: float,
    *,
    rank_per_component: int = 1,
    num_components: Optional[int] = None,
    method: str = "greedy",
    seed: int = 0,
    **options,
) -> GBLRFactors:
    """Fit a GBLR matrix to ``weight`` (out m x in n) with at most ``budget * m * n`` multiply-adds.

    Args:
        weight: (m, n) dense matrix.
        budget: target FLOPs as a fraction of the dense m n, in (0, 1].
        rank_per_component: r, the rank of each component.
        num_components: K; default min(m, n).  Unused components get width 0 and zero factors.
        method: ``"greedy"`` (default) or ``"reference"``.
        seed: seed for the random parts (start vectors, reference locations).
        options: method knobs, defaults in :data:`FIT_OPTIONS`.  greedy: ``refit_passes``
            (final Gauss-Seidel passes, 2), ``batch`` (candidates per round, 16),
            ``power_iters`` (8), ``decay`` (price factor per level, 0.6), ``lowrank_fallback``
            (True: return truncated SVD if it is better), ``max_levels`` (60), ``threads`` (torch
            intra-op threads during the fit, 1; None leaves the global setting; many small ops
            make 1 thread fastest on a busy machine).  reference: ``steps`` (1000), ``lr`` (1e-2).

    Returns:
        :class:`GBLRFactors` with ``flops() <= budget * m * n``.
    """
    budget = _check_args(weight, budget, rank_per_component, num_components, method)
    m, n = weight.shape
    K = int(num_components) if num_components is not None else min(m, n)
    if method == "greedy":
        opts = _check_options(options, FIT_OPTIONS["greedy"], method)
        threads = opts.pop("threads")
        with _num_threads(threads):
            return _fit_greedy(weight, budget, rank_per_component, K, seed, **opts)
    opts = _check_options(options, FIT_OPTIONS["reference"], method)
    if int(opts["steps"]) < 0:
        raise ValueError(f"steps must be >= 0, got {opts['steps']}")
    return _fit_reference(weight, budget, rank_per_component, K, seed, **opts)


@contextlib.contextmanager
def _num_threads(threads: Optional[int]):
    """Temporarily set torch's intra-op threads.  The greedy fit issues many small ops, which are
    far slower multi-threaded on a busy machine (thread wake-up dominates), so small problems run
    single-threaded; the previous setting is restored on exit."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Interval helpers
# ----------------------------------------------------------------------------------------------
def _best_intervals(gain: torch.Tensor, price: torch.Tensor):
    """Batched best cyclic interval: maximise sum_{i in I} (gain_i - price) over cyclic intervals.

    gain: (p, n) per-index gains; price: (p,) or scalar.  Returns start (p,), length (p,) int64.
    The empty interval (value 0) is allowed.
    """
    p, n = gain.shape
    s = gain - (price if torch.is_tensor(price) and price.dim() else torch.as_tensor(price)).reshape(-1, 1)
    P = torch.cat([torch.zeros(p, 1, dtype=s.dtype, device=s.device), torch.cumsum(s, 1)], 1)  # (p, n+1)
    # Non-wrapping: max_j P_j - min_{i <= j} P_i.
    cmin, imin = torch.cummin(P, 1)
    best = P - cmin
    val1, j1 = best.max(1)
    i1 = imin.gather(1, j1[:, None])[:, 0]
    # Wrapping: total minus the minimum (non-wrapping) subarray [i2, j2).
    cmax, imax = torch.cummax(P, 1)
    worst = P - cmax
    vmin, j2 = worst.min(1)
    i2 = imax.gather(1, j2[:, None])[:, 0]
    total = P[:, -1]
    val2 = total - vmin
    wrap = val2 > val1
    start = torch.where(wrap, j2 % n, i1 % n)
    length = torch.where(wrap, n - (j2 - i2), j1 - i1)
    return start, length


def _best_interval(gain: torch.Tensor, price: float) -> Tuple[int, int]:
    """:func:`_best_intervals` of one row (``gain`` (n,) on the CPU) in numpy: the same
    arithmetic in the same dtype and the same tie rules -- a prefix sum accumulated in float64
    and rounded per element (what torch's CPU cumsum does), running minima / maxima that move
    to the last of equal values (torch's cummin / cummax), the first of equal extremes (its
    max / min) -- without a dozen torch dispatches on a short vector; the greedy fit's
    Gauss-Seidel refits call it thousands of times per layer."""
    g = gain.numpy()
    n = g.shape[0]
    s = g - g.dtype.type(price)
    P = np.empty(n + 1, dtype=g.dtype)
    P[0] = 0
    P[1:] = np.cumsum(s, dtype=np.float64)  # rounded to P's dtype element by element
    index = np.arange(n + 1)
    cmin = np.minimum.accumulate(P)
    imin = np.maximum.accumulate(np.where(P == cmin, index, 0))
    best = P - cmin
    j1 = int(np.argmax(best))
    i1 = int(imin[j1])
    cmax = np.maximum.accumulate(P)
    imax = np.maximum.accumulate(np.where(P == cmax, index, 0))
    worst = P - cmax
    j2 = int(np.argmin(worst))
    i2 = int(imax[j2])
    if P[-1] - worst[j2] > best[j1]:  # wrapping: the total minus the worst non-wrapping run
        return j2 % n, n - (j2 - i2)
    return i1 % n, j1 - i1


def _interval_mask(start: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """(p, n) bool masks of cyclic intervals."""
    idx = torch.arange(n, device=start.device)
    return (idx[None, :] - start[:, None]).remainder(n) < length[:, None]


def _segments(start: int, length: int, n: int) -> List[Tuple[int, int]]:
    """A cyclic interval as at most two contiguous [a, b) ranges."""
    if length <= 0:
        return []
    if length >= n:
        return [(0, n)]
    end = start + length
    if end <= n:
        return [(start, end)]
    return [(start, n), (0, end - n)]


def _orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns for a batch (p, d, r); zero columns stay (near) zero."""
    if x.shape[-1] == 1:
        return x / x.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    q, rr = torch.linalg.qr(x)
    # Keep sign/zero structure: a zero input column gives a zero output column.
    scale = (rr.diagonal(dim1=-2, dim2=-1).abs() > 1e-12 * rr.abs().amax((-2, -1), keepdim=False)[..., None])
    return q * scale[..., None, :].to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Components during the greedy fit
# ----------------------------------------------------------------------------------------------
@dataclass
class _Comp:
    row_start: int
    row_len: int
    col_start: int
    col_len: int
    U: torch.Tensor  # (m, r), zero outside the row interval; W_k = U V^T
    V: torch.Tensor  # (n, r), zero outside the column interval

    def rows(self, m):
        return _segments(self.row_start, self.row_len, m)

    def cols(self, n):
        return _segments(self.col_start, self.col_len, n)


def _cost(h: int, c: int, r: int) -> int:
    return int(min(r * (h + c), h * c)) if (h > 0 and c > 0) else 0


def _apply(R: torch.Tensor, comp: _Comp, sign: float) -> None:
    """R += sign * U V^T on the component's block (in place, contiguous sub-blocks)."""
    m, n = R.shape
    for a, b in comp.rows(m):
        for c, d in comp.cols(n):
            R[a:b, c:d].addmm_(comp.U[a:b], comp.V[c:d].T, alpha=sign)


def _block_project(R: torch.Tensor, U: torch.Tensor, V: torch.Tensor, rows, cols) -> torch.Tensor:
    """U^T R V restricted to the block (U, V zero outside it): (r, r)."""
    out = None
    for a, b in rows:
        for c, d in cols:
            t = U[a:b].T @ (R[a:b, c:d] @ V[c:d])
            out = t if out is None else out + t
    if out is None:
        return torch.zeros(U.shape[1], V.shape[1], dtype=R.dtype, device=R.device)
    return out


def _interval_power(R: torch.Tensor, V: torch.Tensor, price: torch.Tensor, r: int, iters: int):
    """Batched interval-restricted power iteration on the full residual.

    R: (m, n); V: (p, n, r) start column factors; price: (p,) price per multiply-add.
    Returns (rs, rl, cs, cl, U, V, S): intervals, orthonormal masked factors (p, m, r), (p, n, r)
    and cores S = U^T R V (p, r, r).
    """
    m, n = R.shape
    p = V.shape[0]
    V = _orthonormalize(V)
    rs = rl = cs = cl = None
    U = None
    for _ in range(iters):
        RV = (R @ V.permute(1, 0, 2).reshape(n, p * r)).reshape(m, p, r).permute(1, 0, 2)  # (p, m, r)
        rs, rl = _best_intervals((RV * RV).sum(-1), price * r)
        U = _orthonormalize(RV * _interval_mask(rs, rl, m)[..., None])
        RtU = (R.T @ U.permute(1, 0, 2).reshape(m, p * r)).reshape(n, p, r).permute(1, 0, 2)  # (p, n, r)
        cs, cl = _best_intervals((RtU * RtU).sum(-1), price * r)
        V = _orthonormalize(RtU * _interval_mask(cs, cl, n)[..., None])
    # Cores: S = U^T R V = (R^T U)^T V restricted; R^T U already computed for the last U.
    S = torch.einsum("pnr,pns->prs", RtU * _interval_mask(cs, cl, n)[..., None], V)
    return rs, rl, cs, cl, U, V, S


def _single_power(R: torch.Tensor, comp_V: torch.Tensor, comp: _Comp, price: float, r: int, iters: int,
                  fixed: bool):
    """Interval power iteration for one component, warm-started from its V.

    fixed=True keeps the component's intervals (content refit only); otherwise intervals may move.
    Returns (rs, rl, cs, cl, U, V, S) for the single component.
    """
    m, n = R.shape
    V = _orthonormalize(comp_V[None])[0]
    rs, rl, cs, cl = comp.row_start, comp.row_len, comp.col_start, comp.col_len
    U = None
    for _ in range(iters):
        # u = R[:, J] V_J  (all rows, so the row interval can move/grow)
        if fixed:
            RV = torch.zeros(m, r, dtype=R.dtype)
            for a, b in _segments(rs, rl, m):
                for c, d in _segments(cs, cl, n):
                    RV[a:b] += R[a:b, c:d] @ V[c:d]
        else:
            RV = None
            for c, d in _segments(cs, cl, n):
                t = R[:, c:d] @ V[c:d]
                RV = t if RV is None else RV + t
            if RV is None:
                RV = torch.zeros(m, r, dtype=R.dtype)
            rs, rl = _best_interval((RV * RV).sum(-1), price * r)
        mask = torch.zeros(m, 1, dtype=R.dtype)
        for a, b in _segments(rs, rl, m):
            mask[a:b] = 1
        U = _orthonormalize((RV * mask)[None])[0]
        if fixed:
            RtU = torch.zeros(n, r, dtype=R.dtype)
            for a, b in _segments(rs, rl, m):
                for c, d in _segments(cs, cl, n):
                    RtU[c:d] += R[a:b, c:d].T @ U[a:b]
        else:
            RtU = None
            for a, b in _segments(rs, rl, m):
                t = R[a:b].T @ U[a:b]
                RtU = t if RtU is None else RtU + t
            if RtU is None:
                RtU = torch.zeros(n, r, dtype=R.dtype)
            cs, cl = _best_interval((RtU * RtU).sum(-1), price * r)
        cmask = torch.zeros(n, 1, dtype=R.dtype)
        for c, d in _segments(cs, cl, n):
            cmask[c:d] = 1
        RtU = RtU * cmask
        V = _orthonormalize(RtU[None])[0]
    S = RtU.T @ V  # (r, r) = U^T R V on the block
    return rs, rl, cs, cl, U, V, S


def _make_comp(rs, rl, cs, cl, U, V, S) -> _Comp:
    """Diagonalise the core and fold it into U: W_k = (U P Sigma)(V Q)^T."""
    if S.shape[-1] == 1:
        return _Comp(int(rs), int(rl), int(cs), int(cl), U * S[0, 0], V)
    P, sig, Qh = torch.linalg.svd(S)
    return _Comp(int(rs), int(rl), int(cs), int(cl), (U @ P) * sig, V @ Qh.T)


# ----------------------------------------------------------------------------------------------
# Greedy
# ----------------------------------------------------------------------------------------------
def _top_right_vectors(R: torch.Tensor, q: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-q right singular vectors (n, q) and singular values of R (randomised)."""
    m, n = R.shape
    q = min(q, m, n)
    k = min(q + 8, m, n)
    X = torch.randn(n, k, generator=gen, dtype=R.dtype)
    Y = R @ X
    for _ in range(2):
        Y, _ = torch.linalg.qr(Y)
        Y = R @ (R.T @ Y)
    Q, _ = torch.linalg.qr(Y)
    B = Q.T @ R  # (k, n)
    _, s, Vh = torch.linalg.svd(B, full_matrices=False)
    return Vh[:q].T, s[:q]


def _total_cost(comps: List[_Comp], r: int) -> int:
    return sum(_cost(c.row_len, c.col_len, r) for c in comps)


def _fit_greedy(weight, budget, r, K, seed, *, refit_passes, batch, power_iters, decay,
                lowrank_fallback, max_levels) -> GBLRFactors:
    m, n = weight.shape
    dtype = torch.float64 if m * n <= 400_000 else torch.float32
    W = weight.detach().to("cpu", dtype)
    gen = torch.Generator().manual_seed(int(seed))
    B = int(math.floor(budget * m * n))
    full_cost = _cost(m, n, r)
    R = W.clone()
    total = float((W * W).sum())
    comps: List[_Comp] = []
    if total == 0.0:
        return _to_factors([], m, n, r, K, weight)

    # Initial price: the top full-width candidate's gain per multiply-add.
    _, stop = _top_right_vectors(R, r, gen)
    price = float((stop[:r] ** 2).sum()) / full_cost
    tiny = (1e-12 if dtype == torch.float64 else 1e-9) * total
    spent = 0
    levels = passes = 0
    for _level in range(int(max_levels)):
        if len(comps) >= K or B - spent < 2 * r or float((R * R).sum()) <= tiny:
            break
        levels += 1
        accepted = 0
        for _round in range(4):  # rounds at this price
            if len(comps) >= K or B - spent < 2 * r:
                break
            n_acc, spent = _greedy_round(R, comps, price, r, B, K, spent, batch, power_iters, gen)
            accepted += n_acc
            if n_acc == 0:
                break
        # Lagrangian refit at this price: intervals may grow/shrink, worthless components drop.
        if accepted:
            spent = _refit_pass(R, comps, price, r, B, mode="lagrange")
            passes += 1
        if spent >= B:
            break
        price *= decay

    # Budget phase: raise the price a little while over budget, then drop the worst components.
    for _ in range(3):
        if spent <= B:
            break
        price /= decay
        spent = _refit_pass(R, comps, price, r, B, mode="lagrange")
        passes += 1
    spent = _trim_to_budget(R, comps, r, B)
    # Endgame: fill the remaining budget, then budget-constrained refits.
    spent = _fill(R, comps, r, B, K, price, batch, power_iters, gen)
    for _ in range(int(refit_passes)):
        spent = _refit_pass(R, comps, price, r, B, mode="budget")
    spent = _fill(R, comps, r, B, K, price, batch, power_iters, gen)
    # Out of component slots with budget left: lower the price so intervals grow into it.
    for _ in range(6):
        if len(comps) < K or spent >= 0.98 * B:
            break
        price *= decay
        spent = _refit_pass(R, comps, price, r, B, mode="budget")
    spent = _refit_pass(R, comps, price, r, B, mode="fixed")
    result = _to_factors(comps, m, n, r, K, weight)
    assert result.flops() <= B, (result.flops(), B)

    if lowrank_fallback:
        lr = lowrank_fit(weight, budget, rank_per_component=r, num_components=K)
        err_g = float(((result.to_dense().to(dtype) - W) ** 2).sum())
        err_l = float(((lr.to_dense().to(dtype) - W) ** 2).sum())
        if err_l < err_g:
            return lr
    return result


def _greedy_round(R, comps, price, r, B, K, spent, batch, power_iters, gen):
    """One round of candidates from the residual's top singular directions; returns (accepted, spent)."""
    m, n = R.shape
    full_cost = _cost(m, n, r)
    Vs, svals = _top_right_vectors(R, batch * r, gen)
    p = Vs.shape[1] // r
    if p == 0:
        return 0, spent
    V0 = Vs[:, : p * r].T.reshape(p, r, n).permute(0, 2, 1)  # (p, n, r)
    prices = torch.full((p,), price, dtype=R.dtype)
    rs, rl, cs, cl, U, V, S = _interval_power(R, V0, prices, r, power_iters)
    gains = (S * S).sum((-2, -1))
    cands = []
    for j in range(p):
        c = _cost(int(rl[j]), int(cl[j]), r)
        if c > 0:
            cands.append((float(gains[j]) / c, c, "interval", j))
        fg = float((svals[j * r:(j + 1) * r] ** 2).sum())
        cands.append((fg / full_cost, full_cost, "full", j))
    cands.sort(key=lambda t: -t[0])
    n_acc = 0
    for ratio, c, kind, j in cands:
        if ratio < price or len(comps) >= K:
            break
        if c > B - spent:
            continue
        if kind == "interval":
            cU, cV = U[j], V[j]
            seg = (int(rs[j]), int(rl[j]), int(cs[j]), int(cl[j]))
        else:
            cV = Vs[:, j * r:(j + 1) * r]
            cU = _orthonormalize((R @ cV)[None])[0]
            seg = (0, m, 0, n)
        S_now = _block_project(R, cU, cV, _segments(seg[0], seg[1], m), _segments(seg[2], seg[3], n))
        g_now = float((S_now * S_now).sum())
        if g_now < 0.8 * ratio * c or g_now / c < price:
            continue
        comp = _make_comp(*seg, cU, cV, S_now)
        _apply(R, comp, -1.0)
        comps.append(comp)
        spent += c
        n_acc += 1
    return n_acc, spent


def _comp_gain(comp: _Comp) -> float:
    return float((comp.U * comp.U).sum())  # V has orthonormal columns, so ||U V^T||^2 = ||U||^2


def _refit_pass(R, comps: List[_Comp], price: float, r: int, B: int, mode: str) -> int:
    """Gauss-Seidel over components: add back, re-find interval + content, subtract.

    mode "lagrange": intervals maximise gain - price * cost, no budget check; components whose
    net value is not positive are dropped.  mode "budget": intervals may move only if the total
    cost stays <= B (else content refit on the old interval).  mode "fixed": content only.
    """
    m, n = R.shape
    spent = _total_cost(comps, r)
    keep = []
    for comp in comps:
        _apply(R, comp, +1.0)
        old_cost = _cost(comp.row_len, comp.col_len, r)
        new = None
        if mode != "fixed":
            res = _single_power(R, comp.V, comp, price, r, 2, fixed=False)
            c = _cost(res[1], res[3], r)
            if mode == "lagrange" or (c > 0 and spent - old_cost + c <= B):
                new = res
        if new is None:
            new = _single_power(R, comp.V, comp, price, r, 1, fixed=True)
        c = _cost(new[1], new[3], r)
        gain = float((new[6] * new[6]).sum())
        if c == 0 or gain <= 0.0 or (mode == "lagrange" and gain <= price * c):
            spent -= old_cost
            continue
        new_comp = _make_comp(*new)
        _apply(R, new_comp, -1.0)
        spent += c - old_cost
        keep.append(new_comp)
    comps[:] = keep
    return spent


def _trim_to_budget(R, comps: List[_Comp], r: int, B: int) -> int:
    """Drop the components with the lowest gain per cost until the total cost is <= B."""
    spent = _total_cost(comps, r)
    if spent <= B:
        return spent
    order = sorted(range(len(comps)), key=lambda k: _comp_gain(comps[k]) / max(1, _cost(comps[k].row_len, comps[k].col_len, r)))
    drop = set()
    for k in order:
        if spent <= B:
            break
        drop.add(k)
        spent -= _cost(comps[k].row_len, comps[k].col_len, r)
        _apply(R, comps[k], +1.0)
    comps[:] = [c for k, c in enumerate(comps) if k not in drop]
    return spent


def _fill(R, comps, r, B, K, price, batch, power_iters, gen) -> int:
    """Use leftover budget: candidates at increasing prices (smaller intervals) that fit."""
    m, n = R.shape
    spent = _total_cost(comps, r)
    for _ in range(6):
        left = B - spent
        if left < 2 * r or len(comps) >= K:
            break
        p = max(1, batch // 4)
        Vs, _ = _top_right_vectors(R, p * r, gen)
        p = Vs.shape[1] // r
        if p == 0:
            break
        mults = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0], dtype=R.dtype)
        V0 = Vs[:, : p * r].T.reshape(p, r, n).permute(0, 2, 1).repeat(len(mults), 1, 1)
        prices = (price * mults).repeat_interleave(p)
        rs, rl, cs, cl, U, V, S = _interval_power(R, V0, prices, r, power_iters)
        gains = (S * S).sum((-2, -1))
        best = None
        for j in range(V0.shape[0]):
            c = _cost(int(rl[j]), int(cl[j]), r)
            if 0 < c <= left and float(gains[j]) > 0 and (best is None or gains[j] > gains[best]):
                best = j
        if best is None:
            break
        j = best
        comp = _make_comp(int(rs[j]), int(rl[j]), int(cs[j]), int(cl[j]), U[j], V[j], S[j])
        _apply(R, comp, -1.0)
        comps.append(comp)
        spent += _cost(comp.row_len, comp.col_len, r)
    return spent


def _to_factors(comps: List[_Comp], m, n, r, K, like: torch.Tensor) -> GBLRFactors:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    widths = torch.zeros(2, K, dtype=torch.float32)
    locs = torch.zeros(2, K, dtype=torch.float32)
    rowf = torch.zeros(K, r, m, dtype=dtype)
    colf = torch.zeros(K, r, n, dtype=dtype)
    for k, c in enumerate(comps[:K]):
        widths[0, k] = c.row_len / m
        widths[1, k] = c.col_len / n
        locs[0, k] = (c.row_start % m) / m
        locs[1, k] = (c.col_start % n) / n
        for a, b in c.rows(m):
            rowf[k, :, a:b] = c.U[a:b].T.to(dtype)  # exactly zero outside the interval
        for a, b in c.cols(n):
            colf[k, :, a:b] = c.V[a:b].T.to(dtype)
    return GBLRFactors(widths, locs, rowf, colf)


# ----------------------------------------------------------------------------------------------
# Low-rank (truncated SVD) at the same budget, as GBLR full-width components
# ----------------------------------------------------------------------------------------------
def lowrank_fit(weight: torch.Tensor, budget: float, *, rank_per_component: int = 1,
                num_components: Optional[int] = None) -> GBLRFactors:
    """Truncated SVD with as many full-width rank-r components as fit in ``budget * m * n``."""
    budget = _check_args(weight, budget, rank_per_component, num_components, "greedy")
    m, n = weight.shape
    r = rank_per_component
    K = int(num_components) if num_components is not None else min(m, n)
    B = int(math.floor(budget * m * n))
    k_full = min(B // _cost(m, n, r), K)
    dtype = torch.float64 if m * n <= 400_000 else torch.float32
    W = weight.detach().to("cpu", dtype)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    comps = []
    rank = min(k_full * r, s.numel())
    for k in range(k_full):
        sl = slice(k * r, min((k + 1) * r, rank))
        Uk = torch.zeros(m, r, dtype=dtype)
        Vk = torch.zeros(n, r, dtype=dtype)
        w = sl.stop - sl.start
        if w > 0:
            Uk[:, :w] = U[:, sl] * s[sl]
            Vk[:, :w] = Vh[sl].T
        comps.append(_Comp(0, m, 0, n, Uk, Vk))
    return _to_factors(comps, m, n, r, K, weight)


# ----------------------------------------------------------------------------------------------
# Reference recipe (method.md section 4)
# ----------------------------------------------------------------------------------------------
def _shift_to_mean(widths: torch.Tensor, target: float) -> torch.Tensor:
    """Uniform shift delta with mean(clamp(widths + delta, 0, 1)) == target (bisection)."""
    lo, hi = -1.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if float((widths + mid).clamp(0, 1).mean()) > target:
            hi = mid
        else:
            lo = mid
    return (widths + lo).clamp(0, 1)


def _shift_to_flops(widths: torch.Tensor, sizes, r: int, B: int) -> torch.Tensor:
    """Largest uniform shift keeping gblr_flops <= B (bisection on the rounded cost)."""
    if gblr_flops(widths, sizes, r) <= B:
        return widths
    lo, hi = -1.0, 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if gblr_flops((widths + mid).clamp(0, 1), sizes, r) <= B:
            lo = mid
        else:
            hi = mid
    return (widths + lo).clamp(0, 1)


def _fit_reference(weight, budget, r, K, seed, *, steps, lr) -> GBLRFactors:
    m, n = weight.shape
    gen = torch.Generator().manual_seed(int(seed))
    W = weight.detach().to("cpu", torch.float32)
    B = int(math.floor(budget * m * n))
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    rank = s.numel()
    rowf = torch.zeros(K, r, m)
    colf = torch.zeros(K, r, n)
    for k in range(K):
        for j in range(r):
            i = k * r + j
            if i < rank:
                rowf[k, j] = U[:, i] * s[i].sqrt()
                colf[k, j] = Vh[i] * s[i].sqrt()
    widths = torch.ones(2, K)
    locations = torch.rand(2, K, generator=gen)
    # Mean-width target matching the budget: cost ~ sum_k r (w_r m + w_c n).
    target = min(1.0, B / (K * r * (m + n)))
    widths = _shift_to_mean(widths, target)
    rowf.requires_grad_(True)
    colf.requires_grad_(True)
    widths.requires_grad_(True)
    locations.requires_grad_(True)
    scale = float(rowf.detach().abs().mean().clamp_min(1e-8))
    opt = torch.optim.Adam([
        {"params": [rowf, colf], "lr": lr * scale},
        {"params": [widths, locations], "lr": lr, "betas": (0.0, 0.999)},
    ])
    norm2 = max(float((W * W).sum()), 1e-30)
    for _ in range(int(steps)):
        mr = gaudi_mask(widths[0], locations[0], m)  # (K, m)
        mc = gaudi_mask(widths[1], locations[1], n)  # (K, n)
        M = torch.einsum("krm,krn->mn", rowf * mr[:, None, :], colf * mc[:, None, :])
        loss = ((W - M) ** 2).sum() / norm2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            locations.remainder_(1.0)
            widths.copy_(_shift_to_mean(widths.clamp(0, 1), target))
    with torch.no_grad():
        w = _shift_to_flops(widths.detach().clamp(0, 1), (m, n), r, B)
        # Snap to the grid and zero factors outside the intervals (and of dead components).
        lengths = torch.stack([torch.round(w[0] * m), torch.round(w[1] * n)])
        dead = (lengths[0] == 0) | (lengths[1] == 0)
        lengths[:, dead] = 0
        wq = torch.stack([lengths[0] / m, lengths[1] / n])
        lq = torch.stack([torch.round(locations[0].detach() * m).remainder(m) / m,
                          torch.round(locations[1].detach() * n).remainder(n) / n])
        rf = rowf.detach() * boxcar_mask(wq[0], lq[0], m)[:, None, :]
        cf = colf.detach() * boxcar_mask(wq[1], lq[1], n)[:, None, :]
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    out = GBLRFactors(wq, lq, rf.to(dtype), cf.to(dtype))
    assert out.flops() <= B
    return out
