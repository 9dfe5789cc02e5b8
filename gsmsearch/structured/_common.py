"""Helpers shared by the hand-crafted structured families (not part of the public API).

- knob validation that raises ``ValueError`` naming the argument and its value;
- the budget test every ``from_dense`` uses (``flops <= budget * in * out``, no slack);
- balanced block layouts: ``n`` split into ``parts`` blocks whose sizes differ by at most one
  (the first ``n % parts`` blocks are one longer), stored padded to the largest size so the
  blocks can go through one batched matmul, and the gathers between the flat and blocked views;
- ``version_key``: the key of the caches kept while parameters are unchanged (GBLR, the budget
  controller);
- ``triton_runs``: whether a Triton kernel runs on a tensor (GBLR's mask kernels, the bsr export).
"""
from __future__ import annotations

import functools
import math
import operator
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# The Triton kernels' floating-point contraction (a*b+c as one FMA), pinned on: Triton 3.9 warns
# that 3.10 turns its default off, which would change the kernels' rounding under the same code.
TRITON_FP_FUSION = True


def check_int(name: str, value, low: int, high: Optional[int] = None, *, context: str = "") -> int:
    """``value`` as an int in [low, high]; otherwise ValueError naming ``name`` and ``value``."""
    integral = None
    if not isinstance(value, bool):
        try:
            integral = operator.index(value)
        except TypeError:
            if isinstance(value, float) and value.is_integer():
                integral = int(value)
    if integral is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(integral)
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}{context}, got {value}")
    return value


def fits(flops: int, budget: float, in_features: int, out_features: int) -> bool:
    """True when ``flops`` is within ``budget`` (a fraction of the dense in*out multiply-adds)."""
    return flops <= budget * in_features * out_features * (1 + 1e-9)


class BudgetTooSmall(ValueError):
    """``from_dense`` of a family at a budget below its cheapest configuration;
    ``cheapest_fraction`` is that configuration's cost as a fraction of dense."""

    def __init__(self, message: str, cheapest_fraction: float) -> None:
        super().__init__(message)
        self.cheapest_fraction = float(cheapest_fraction)

    def __reduce__(self):
        # pickled as its two arguments (the default would call __init__ with the message alone)
        return type(self), (self.args[0] if self.args else "", self.cheapest_fraction)


def no_fit_error(family: str, budget: float, in_features: int, out_features: int, cheapest: int,
                 what: str) -> BudgetTooSmall:
    """The error ``from_dense`` raises when no configuration of a family fits ``budget``."""
    frac = cheapest / (in_features * out_features)
    return BudgetTooSmall(
        f"budget={budget} is too small for a {family} layer of {in_features} -> {out_features}: "
        f"the cheapest {what} costs {cheapest} multiply-adds per token ({frac:.4f} of dense)",
        frac,
    )


def check_dense(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Validate a dense (out, in) weight and return a detached float copy for fitting
    (float32, or float64 when given float64)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D (out_features, in_features) tensor, got {shape}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
            f"got {tuple(bias.shape)}"
        )
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.detach().to(dtype)


def finish_from_dense(layer, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Copy ``bias`` into ``layer`` and move it to ``weight``'s device and floating dtype."""
    if bias is not None:
        with torch.no_grad():
            layer.bias.copy_(bias.detach())
    dtype = weight.dtype if weight.is_floating_point() else None
    return layer.to(weight.device, dtype)


def init_bias_like_linear(bias: Optional[torch.Tensor], in_features: int) -> None:
    """nn.Linear's default bias init: U(-1/sqrt(in), 1/sqrt(in))."""
    if bias is not None:
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            bias.uniform_(-bound, bound)


def balanced_sizes(n: int, parts: int) -> List[int]:
    """``n`` split into ``parts`` contiguous blocks, sizes differing by at most one (larger first)."""
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


class BlockLayout:
    """``n`` indices split into ``parts`` balanced contiguous blocks, padded to ``max_size``.

    - ``gather``: (parts, max_size) long; block i slot k holds flat index ``offset_i + k``, or ``n``
      (a zero pad slot appended to the flat vector) where block i is shorter than ``max_size``.
    - ``take``: (n,) long; flat index -> position ``i * max_size + k`` in the flattened blocks.
    - ``even``: n divisible by parts (no padding; the gathers are plain reshapes).
    """

    def __init__(self, n: int, parts: int) -> None:
        self.n, self.parts = int(n), int(parts)
        self.sizes = balanced_sizes(self.n, self.parts)
        self.max_size = self.sizes[0]
        self.even = self.n % self.parts == 0
        gather = torch.full((self.parts, self.max_size), self.n, dtype=torch.long)
        take = []
        offset = 0
        for i, size in enumerate(self.sizes):
            gather[i, :size] = torch.arange(offset, offset + size)
            take.append(i * self.max_size + torch.arange(size))
            offset += size
        self.gather = gather
        self.take = torch.cat(take)

    @property
    def padding(self) -> int:
        """Number of padded slots (parts * max_size - n)."""
        return self.parts * self.max_size - self.n


def to_blocks(x: torch.Tensor, gather: torch.Tensor, even: bool) -> torch.Tensor:
    """(..., n) -> (..., parts, max_size), zero in padded slots."""
    parts, size = gather.shape
    if even:
        return x.reshape(*x.shape[:-1], parts, size)
    return F.pad(x, (0, 1))[..., gather]


def from_blocks(y: torch.Tensor, take: torch.Tensor, even: bool) -> torch.Tensor:
    """(..., parts, max_size) -> (..., n), dropping padded slots."""
    flat = y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1])
    return flat if even else flat[..., take]


def block_bmm(xb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., b, c) x (b, c, h) -> (..., b, h): one ``bmm`` with the blocks as its batch, reading
    the input as a strided (b, T, c) view (no copy in) and one transpose copy out (einsum's
    plan for the same contraction copies on both sides)."""
    lead = xb.shape[:-2]
    b, c = xb.shape[-2:]
    y = torch.bmm(xb.reshape(-1, b, c).transpose(0, 1), weight)      # (b, T, h)
    return y.transpose(0, 1).reshape(*lead, b, weight.shape[-1])


def blocks_to_dense(blocks: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    out_features: int, in_features: int) -> torch.Tensor:
    """Scatter padded blocks into a dense (out, in) matrix.

    ``rows`` and ``cols`` are gather indices (values ``n`` mark padding) shaped to broadcast
    against ``blocks`` (e.g. (b, 1, hmax, 1) and (1, b, 1, cmax) for a b x b grid)."""
    dense = blocks.new_zeros(out_features + 1, in_features + 1)
    dense = dense.index_put((rows, cols), blocks)
    return dense[:out_features, :in_features]


def dense_to_blocks(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Gather padded blocks (zero in padded slots) out of a dense (out, in) matrix."""
    return F.pad(weight, (0, 1, 0, 1))[rows, cols]


def sqrt_split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of a truncated SVD: (U_r sqrt(S_r), V_r sqrt(S_r)), batched.

    u: (..., m, k), s: (..., k), vh: (..., k, n) -> (..., m, rank), (..., n, rank); components
    beyond k are zero."""
    k = s.shape[-1]
    take = min(rank, k)
    root = s[..., :take].clamp_min(0).sqrt()
    left = u[..., :, :take] * root[..., None, :]
    right = vh[..., :take, :].transpose(-1, -2) * root[..., None, :]
    if rank > take:
        left = F.pad(left, (0, rank - take))
        right = F.pad(right, (0, rank - take))
    return left, right


def truncated_svd(x: torch.Tensor, rank: int, *, exact_below: int = 512
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``x`` (..., m, n): u (..., m, k), s (..., k),
    vh (..., k, n) with k = min(rank, m, n).

    LAPACK's full SVD when min(m, n) <= ``exact_below`` or the rank is more than half of it;
    otherwise the randomized ``torch.svd_lowrank`` (oversampling 16, 4 power iterations), whose
    cost grows with rank instead of min(m, n) (a full SVD of 768 x 3072 takes seconds on CPU)."""
    m, n = x.shape[-2:]
    small = min(m, n)
    k = min(rank, small)
    if small <= exact_below or 2 * k > small:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    u, s, v = torch.svd_lowrank(x, q=min(k + 16, small), niter=4)
    return u[..., :k], s[..., :k], v[..., :k].transpose(-1, -2)


def top_energy(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Sum of the ``rank`` largest squared singular values of ``x`` (..., m, n), from the
    eigenvalues of the Gram matrix on the smaller side (cheaper than an SVD)."""
    m, n = x.shape[-2:]
    if rank <= 0:
        return x.new_zeros(x.shape[:-2])
    gram = x @ x.transpose(-1, -2) if m <= n else x.transpose(-1, -2) @ x
    eig = torch.linalg.eigvalsh(gram.double())          # ascending
    return eig[..., -rank:].clamp_min(0).sum(-1).to(x.dtype)


def version_key(tensors) -> tuple:
    """What identifies these tensors' current values without reading them: each one's storage,
    version counter (every in-place update bumps it) and device.  The key of every cache that
    must be recomputed when a parameter changes (GBLR's inference factors and training
    structure, the budget controller's identity steps)."""
    return tuple((t.data_ptr(), t._version, t.device) for t in tensors)


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel runs on ``tensor``: a CUDA tensor with Triton installed, or any
    tensor under Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernel's import)."""
    if not (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False  # (without importing triton: a second of every CPU process's first step)
    return _triton_importable()


def untied(tensors: dict) -> dict:
    """``tensors`` with every tensor that shares memory with an earlier one copied: a tied weight
    (a language model's head and token embedding) appears under two keys, and safetensors refuses
    shared memory (loading writes both keys)."""
    storages, out = set(), {}
    for key, value in tensors.items():
        storage = value.untyped_storage().data_ptr()
        out[key] = value.clone() if storage in storages else value
        storages.add(storage)
    return out
