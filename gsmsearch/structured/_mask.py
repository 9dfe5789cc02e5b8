"""Gaudi masks (Gaussian-Dirichlet): differentiable cyclic interval masks.

A mask of length ``n`` with width ``w`` and location ``l`` (fractions of ``n``) is, with no
Gaussian, the 0/1 cyclic boxcar of ``round(w n)`` ones starting at index ``round(l n)``.  The
frequency-domain definition (method.md section 2), for k = 0 .. n // 2:

    M[k] = w sinc(k w) / sinc(k / n) * exp(-j 2 pi k l) * exp(j pi k (1/n - w)) * exp(-k^2 / (2 sigma^2))
    mask = irfft(M, n, norm="forward")

Widths and locations are rounded to the index grid in the forward pass, with a straight-through
gradient.  Gradients are closed form (``dM/dw = exp(-j 2 pi k w) C_k``, ``dM/dl = -j 2 pi k M``),
evaluated in the frequency domain against ``rfft`` of the incoming gradient, so the width gradient
is bounded and non-zero at ``w = 0`` (a pruned component can grow back).

Two evaluations of the same function live here:
- :func:`gaudi_mask_reference`: the formula above, differentiated by autograd through complex ops
  (slow, obviously correct; used by tests).
- :func:`gaudi_mask`: the production path (custom autograd, closed-form backward; with
  ``sigma=None`` the forward is the exact boxcar built by index comparison, no FFT).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["gaudi_mask", "gaudi_mask_reference", "boxcar_mask", "round_to_grid"]


def round_to_grid(fraction: torch.Tensor, n: int) -> torch.Tensor:
    """round(fraction * n) / n with a straight-through gradient."""
    rounded = torch.round(fraction.detach() * n) / n
    return fraction + (rounded - fraction).detach()


def _sinc(x: torch.Tensor) -> torch.Tensor:
    return torch.sinc(x)  # sin(pi x) / (pi x), 1 at 0


def _frequencies(n: int, dtype, device) -> torch.Tensor:
    return torch.arange(n // 2 + 1, dtype=dtype, device=device)


def _gaussian(k: torch.Tensor, sigma: Optional[float]) -> torch.Tensor:
    if sigma is None or math.isinf(sigma):
        return torch.ones_like(k)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive or None, got {sigma}")
    return torch.exp(-(k * k) / (2.0 * float(sigma) ** 2))


def _spectrum(width: torch.Tensor, location: torch.Tensor, n: int, sigma: Optional[float]):
    """M[k] for each component: (K, n//2+1) complex.  width/location: (K,) already on the grid."""
    k = _frequencies(n, width.dtype, width.device)  # (F,)
    w = width[:, None]
    l = location[:, None]
    amplitude = w * _sinc(k * w) / _sinc(k / n) * _gaussian(k, sigma)  # (K, F) real
    phase = -2.0 * math.pi * k * l + math.pi * k * (1.0 / n - w)
    return torch.polar(amplitude, phase) if amplitude.requires_grad is False else torch.complex(
        amplitude * torch.cos(phase), amplitude * torch.sin(phase)
    )


def gaudi_mask_reference(
    width: torch.Tensor, location: torch.Tensor, n: int, sigma: Optional[float] = None
) -> torch.Tensor:
    """(K, n) masks by the frequency-domain definition; autograd through complex ops."""
    width = round_to_grid(width, n)
    location = round_to_grid(location, n)
    return torch.fft.irfft(_spectrum(width, location, n, sigma), n=n, norm="forward")


def boxcar_mask(width: torch.Tensor, location: torch.Tensor, n: int) -> torch.Tensor:
    """Exact 0/1 cyclic boxcars (K, n) for grid-rounded width/location (no gradient)."""
    length = torch.round(width.detach() * n).clamp(0, n).long()  # (K,)
    start = torch.round(location.detach() * n).long().remainder(n)  # (K,)
    index = torch.arange(n, device=width.device)
    offset = (index[None, :] - start[:, None]).remainder(n)  # position inside the interval
    return (offset < length[:, None]).to(width.dtype)


class _GaudiMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, width, location, n, sigma):
        # width, location: (K,) already rounded to the grid (the STE is applied outside).
        if sigma is None:
            mask = boxcar_mask(width, location, n)
        else:
            mask = torch.fft.irfft(_spectrum(width, location, n, sigma), n=n, norm="forward")
        ctx.save_for_backward(width, location)
        ctx.n, ctx.sigma = n, sigma
        return mask

    @staticmethod
    def backward(ctx, grad_mask):
        width, location = ctx.saved_tensors
        n, sigma = ctx.n, ctx.sigma
        # <g, irfft(D)> = sum_k c_k Re(D[k] conj(G[k])) with G = rfft(g), c_k the one-sided weights.
        G = torch.fft.rfft(grad_mask.to(width.dtype), n=n)  # (K, F)
        k = _frequencies(n, width.dtype, width.device)
        c = torch.full_like(k, 2.0)
        c[0] = 1.0
        if n % 2 == 0:
            c[-1] = 1.0
        w = width[:, None]
        l = location[:, None]
        # C_k = exp(j pi (k/n - 2 k l) - k^2/(2 sigma^2)) / sinc(k/n); dM/dw = exp(-j 2 pi k w) C_k
        gauss = _gaussian(k, sigma) / _sinc(k / n)
        dw_phase = math.pi * (k / n - 2.0 * k * l) - 2.0 * math.pi * k * w
        Gc = torch.conj(G)
        dM_dw = torch.polar(gauss.expand_as(dw_phase), dw_phase)
        grad_width = (c * (dM_dw * Gc).real).sum(-1)
        # dM/dl = -j 2 pi k M
        M = _spectrum(width, location, n, sigma)
        dM_dl = M * (-2j * math.pi * k)
        grad_location = (c * (dM_dl * Gc).real).sum(-1)
        return grad_width, grad_location, None, None


def gaudi_mask(
    width: torch.Tensor, location: torch.Tensor, n: int, sigma: Optional[float] = None
) -> torch.Tensor:
    """Gaudi masks for K components.

    Args:
        width, location: (K,) fractions in [0, 1] (rounded to the index grid in the forward
            pass, straight-through gradient).
        n: mask length (the dimension the interval lives in).
        sigma: Gaussian low-pass parameter; ``None`` = no Gaussian, the exact 0/1 boxcar.

    Returns:
        (K, n) masks; ``mask.sum(-1) == round(w n)`` for every sigma.
    """
    if width.shape != location.shape or width.dim() != 1:
        raise ValueError(
            f"width and location must both have shape (K,), got {tuple(width.shape)} and "
            f"{tuple(location.shape)}"
        )
    if sigma is not None and not (sigma > 0):
        raise ValueError(f"sigma must be positive or None, got {sigma}")
    w = round_to_grid(width, n)
    l = round_to_grid(location, n)
    return _GaudiMask.apply(w, l, int(n), None if sigma is None else float(sigma))
