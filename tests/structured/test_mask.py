"""Gaudi masks: exact boxcars, mass conservation, closed-form gradients."""
import math

import pytest
import torch

from gsmsearch.structured import boxcar_mask, gaudi_mask, gaudi_mask_reference
from gsmsearch.structured._mask import _spectrum


def explicit_boxcar(width: float, location: float, n: int) -> torch.Tensor:
    """Independent construction: ones at round(l n), round(l n)+1, ... (mod n), round(w n) of them."""
    mask = torch.zeros(n, dtype=torch.float64)
    start, length = round(location * n) % n, round(width * n)
    for i in range(length):
        mask[(start + i) % n] = 1.0
    return mask


def random_grid_params(K, n, generator):
    width = torch.randint(0, n + 1, (K,), generator=generator).double() / n
    location = torch.randint(0, n, (K,), generator=generator).double() / n
    width[0], width[1] = 0.0, 1.0  # the extremes
    width[2], location[2] = round(0.5 * n) / n, round(0.9 * n) / n  # wraps past the end
    return width, location


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 64])
def test_exact_mask_is_cyclic_boxcar(n):
    g = torch.Generator().manual_seed(n)
    width, location = random_grid_params(12, n, g)
    # off-grid values are rounded to the grid first
    width_off = (width + (torch.rand(12, generator=g, dtype=torch.float64) - 0.5) * 0.9 / n).clamp(0, 1)
    expected = torch.stack([explicit_boxcar(float(w), float(l), n) for w, l in zip(width_off, location)])
    for fn in (gaudi_mask, gaudi_mask_reference):
        got = fn(width_off, location, n, None)
        assert torch.allclose(got, expected, atol=1e-9), fn.__name__
    assert torch.equal(boxcar_mask(width_off, location, n), expected)


def periodic_gaussian_kernel(n: int, sigma: float) -> list:
    """The spatial kernel whose DFT is exp(-k^2 / (2 sigma^2)) over every integer k, by Poisson
    summation: a Gaussian of standard deviation n / (2 pi sigma) samples, sampled and summed over
    its periods, g[t] = sigma sqrt(2 pi) / n * sum_j exp(-2 pi^2 sigma^2 (t / n - j)^2)."""
    return [sigma * math.sqrt(2 * math.pi) / n
            * sum(math.exp(-2 * math.pi ** 2 * sigma ** 2 * (t / n - j) ** 2) for j in range(-12, 13))
            for t in range(n)]


@pytest.mark.parametrize("n", [63, 64])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 3.0])
def test_mask_at_finite_sigma_is_the_boxcar_circularly_convolved_with_a_periodic_gaussian(n, sigma):
    """Independent of the module's spectrum: the 0/1 boxcar convolved (cyclically) with the
    sampled periodic Gaussian.  The mask's Gaussian keeps the frequencies |k| <= n / 2 only; the
    ones it drops weigh exp(-(n/2)^2 / (2 sigma^2)) <= exp(-56) at these sigmas, and the sum over
    periods is cut where its terms are below exp(-98): both far under float64 rounding."""
    g = torch.Generator().manual_seed(n)
    width, location = random_grid_params(10, n, g)
    kernel = periodic_gaussian_kernel(n, sigma)
    expected = torch.zeros(len(width), n, dtype=torch.float64)
    for c, (w, l) in enumerate(zip(width.tolist(), location.tolist())):
        box = explicit_boxcar(w, l, n).tolist()
        for i in range(n):
            expected[c, i] = sum(box[(i - t) % n] * kernel[t] for t in range(n))
    for fn in (gaudi_mask, gaudi_mask_reference):
        assert torch.allclose(fn(width, location, n, sigma), expected, atol=1e-12, rtol=0), fn.__name__


@pytest.mark.parametrize("sigma", [None, 0.3, 1.0, 5.0, 100.0])
def test_mask_mass_is_width_times_n(sigma):
    n = 40
    g = torch.Generator().manual_seed(1)
    width, location = random_grid_params(20, n, g)
    mask = gaudi_mask(width, location, n, sigma)
    assert torch.allclose(mask.sum(-1), width * n, atol=1e-8)


def test_small_sigma_blurs_and_large_sigma_approaches_boxcar():
    n = 64
    width = torch.tensor([0.25], dtype=torch.float64)
    location = torch.tensor([0.5], dtype=torch.float64)
    exact = gaudi_mask(width, location, n, None)
    errors = [float((gaudi_mask(width, location, n, s) - exact).abs().max()) for s in (0.5, 4.0, 1e4)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3
    # sigma -> 0: the constant w (location lost)
    assert torch.allclose(gaudi_mask(width, location, n, 1e-3), torch.full((1, n), 0.25, dtype=torch.float64), atol=1e-6)


def test_production_mask_matches_reference_definition():
    n = 50
    g = torch.Generator().manual_seed(2)
    width, location = random_grid_params(16, n, g)
    for sigma in (None, 0.7, 3.0, 30.0):
        a = gaudi_mask(width, location, n, sigma)
        b = gaudi_mask_reference(width, location, n, sigma)
        assert torch.allclose(a, b, atol=1e-10), sigma


@pytest.mark.parametrize("n", [15, 16])
@pytest.mark.parametrize("sigma", [None, 0.8, 6.0])
def test_closed_form_gradients_match_autograd_and_finite_differences(n, sigma):
    g = torch.Generator().manual_seed(3)
    width, location = random_grid_params(9, n, g)
    weights = torch.randn(9, n, generator=g, dtype=torch.float64)

    w1, l1 = width.clone().requires_grad_(), location.clone().requires_grad_()
    (gaudi_mask(w1, l1, n, sigma) * weights).sum().backward()
    w2, l2 = width.clone().requires_grad_(), location.clone().requires_grad_()
    (gaudi_mask_reference(w2, l2, n, sigma) * weights).sum().backward()
    assert torch.allclose(w1.grad, w2.grad, atol=1e-8)
    assert torch.allclose(l1.grad, l2.grad, atol=1e-8)

    # finite differences of the continuous frequency-domain formula (no grid rounding)
    def objective(w, l):
        return (torch.fft.irfft(_spectrum(w, l, n, sigma), n=n, norm="forward") * weights).sum(-1)

    eps = 1e-6
    fd_w = (objective(width + eps, location) - objective(width - eps, location)) / (2 * eps)
    fd_l = (objective(width, location + eps) - objective(width, location - eps)) / (2 * eps)
    assert torch.allclose(w1.grad, fd_w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(l1.grad, fd_l, rtol=1e-5, atol=1e-6)


def test_width_gradient_nonzero_at_zero_width():
    n = 32
    width = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    location = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=torch.float64)
    mask = gaudi_mask(width, location, n, None)
    assert torch.count_nonzero(mask) == 0
    # a loss that wants the mask to be on near each location
    target = torch.ones(4, n, dtype=torch.float64)
    ((mask - target) ** 2).sum().backward()
    assert torch.all(width.grad.abs() > 1e-3)
    assert torch.all(width.grad < 0)  # gradient descent grows the width


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma must be positive"):
        gaudi_mask(torch.ones(2), torch.zeros(2), 8, sigma=0.0)
    with pytest.raises(ValueError, match="shape"):
        gaudi_mask(torch.ones(2), torch.zeros(3), 8)
