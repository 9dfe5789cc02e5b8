"""Export: turn trained structured layers into inference modules that compute no masks.

For a GBLR layer, :class:`ExportedGBLR` keeps only live components (both intervals non-empty),
crops each to its intervals and executes it the cheaper way under the method's cost rule:
factored ``y[I] += (x[J] @ V) @ U^T`` (r (h + c) multiply-adds) or as a dense h x c block
(h c multiply-adds).  Components are grouped into an execution plan:
- components with the same row and column intervals are merged into one rank-(sum r) group;
- factored groups with the same column interval share one gathered input and one GEMM.
Wrapping intervals are executed as (at most two) contiguous slices, so no index gather is needed.

The exported layer's :meth:`ExportedGBLR.flops` counts what the plan executes (from the stored
tensors' shapes) and equals the trained layer's ``flops()``.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Dict, List, Tuple

import torch
from torch import nn

from ._base import StructuredLinear

__all__ = ["ExportedGBLR", "export"]


def _pieces(start: int, length: int, size: int) -> List[Tuple[int, int]]:
    """A cyclic interval as contiguous (begin, end) slices: one, or two when it wraps."""
    end = start + length
    if end <= size:
        return [(start, end)]
    return [(start, size), (0, end - size)]


def _gather(x: torch.Tensor, pieces) -> torch.Tensor:
    if len(pieces) == 1:
        begin, end = pieces[0]
        return x[..., begin:end]
    return torch.cat([x[..., begin:end] for begin, end in pieces], dim=-1)


def _scatter_add(y: torch.Tensor, values: torch.Tensor, pieces) -> None:
    offset = 0
    for begin, end in pieces:
        y[..., begin:end] += values[..., offset : offset + end - begin]
        offset += end - begin


class ExportedGBLR(nn.Module):
    """Mask-free inference form of a GBLR layer (see module docstring)."""

    family = "gblr-exported"

    def __init__(self, in_features: int, out_features: int, bias=None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # plan: list of column groups; each holds its column interval and a list of row parts
        self.column_groups: List[dict] = []
        self._params = nn.ParameterList()

    def _register(self, tensor: torch.Tensor) -> int:
        self._params.append(nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=False))
        return len(self._params) - 1

    @classmethod
    @torch.no_grad()
    def from_gblr(cls, layer) -> "ExportedGBLR":
        m, n = layer.out_features, layer.in_features
        exported = cls(n, m, layer.bias)
        lengths = layer.interval_lengths()
        starts = layer.interval_starts()
        # Per component, the method's rule decides: a dense h x c block when h c <= r (h + c),
        # else factored.  Factored components with identical (row, column) intervals merge into
        # one rank-(sum r) part (their cost adds up exactly); dense blocks stay one per component
        # so the executed count always equals the method's count.
        blocks: Dict[Tuple[int, int, int, int], List[int]] = defaultdict(list)
        dense_members: List[Tuple[Tuple[int, int, int, int], List[int]]] = []
        for k in layer.live_components().tolist():
            key = (int(starts[1, k]), int(lengths[1, k]), int(starts[0, k]), int(lengths[0, k]))
            if key[1] * key[3] <= layer.rank * (key[1] + key[3]):
                dense_members.append((key, [k]))
            else:
                blocks[key].append(k)
        by_columns: Dict[Tuple[int, int], List[dict]] = defaultdict(list)
        for (col_start, col_len, row_start, row_len), members in dense_members + list(blocks.items()):
            rows = torch.arange(row_start, row_start + row_len) % m
            cols = torch.arange(col_start, col_start + col_len) % n
            idx = torch.tensor(members)
            U = layer.row_factors[idx][:, :, rows].reshape(-1, row_len).T  # (h, R)
            V = layer.col_factors[idx][:, :, cols].reshape(-1, col_len).T  # (c, R)
            part = {"rows": _pieces(row_start, row_len, m)}
            if row_len * col_len <= layer.rank * (row_len + col_len):
                part["dense"] = exported._register(U @ V.T)  # (h, c)
            else:
                part["U"] = exported._register(U.T)  # (R, h)
                part["V"] = exported._register(V)  # (c, R)
            by_columns[(col_start, col_len)].append(part)
        for (col_start, col_len), parts in by_columns.items():
            group = {"cols": _pieces(col_start, col_len, n), "dense": [], "factored": None}
            factored = [p for p in parts if "U" in p]
            group["dense"] = [(p["rows"], p["dense"]) for p in parts if "dense" in p]
            if factored:
                V_all = torch.cat([exported._params[p["V"]] for p in factored], dim=1)  # (c, sum R)
                splits = [exported._params[p["U"]].shape[0] for p in factored]
                group["factored"] = {
                    "V": exported._register(V_all),
                    "splits": splits,
                    "parts": [(p["rows"], p["U"]) for p in factored],
                }
            exported.column_groups.append(group)
        # drop the per-part V copies that were merged (keep indices stable by rebuilding)
        exported._compact()
        return exported

    def _compact(self) -> None:
        used = set()
        for group in self.column_groups:
            used.update(index for _, index in group["dense"])
            if group["factored"]:
                used.add(group["factored"]["V"])
                used.update(index for _, index in group["factored"]["parts"])
        remap, kept = {}, nn.ParameterList()
        for old, param in enumerate(self._params):
            if old in used:
                remap[old] = len(kept)
                kept.append(param)
        self._params = kept
        for group in self.column_groups:
            group["dense"] = [(rows, remap[i]) for rows, i in group["dense"]]
            if group["factored"]:
                f = group["factored"]
                f["V"] = remap[f["V"]]
                f["parts"] = [(rows, remap[i]) for rows, i in f["parts"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        params = self._params
        for group in self.column_groups:
            xs = _gather(x, group["cols"])  # (..., c)
            for rows, index in group["dense"]:
                _scatter_add(y, xs @ params[index].T, rows)  # (..., h)
            factored = group["factored"]
            if factored:
                t = xs @ params[factored["V"]]  # (..., sum R)
                offset = 0
                for (rows, index), width in zip(factored["parts"], factored["splits"]):
                    _scatter_add(y, t[..., offset : offset + width] @ params[index], rows)
                    offset += width
        return y if self.bias is None else y + self.bias

    def flops(self) -> int:
        """Multiply-adds per token that the plan executes, counted from the stored tensors."""
        total = 0
        for group in self.column_groups:
            total += sum(self._params[index].numel() for _, index in group["dense"])
            if group["factored"]:
                total += self._params[group["factored"]["V"]].numel()
                total += sum(self._params[index].numel() for _, index in group["factored"]["parts"])
        return int(total)

    def to_dense(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self._params[0].dtype if len(self._params) else None)
        bias, self.bias = self.bias, None
        try:
            return self.forward(eye).T
        finally:
            self.bias = bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"column_groups={len(self.column_groups)}, flops={self.flops()}"
        )


def _export_layer(module: nn.Module) -> nn.Module:
    from ._gblr import GBLRLinear

    if isinstance(module, GBLRLinear):
        return ExportedGBLR.from_gblr(module)
    if isinstance(module, StructuredLinear) and hasattr(module, "export"):
        return module.export()
    return module


def export(module_or_model: nn.Module) -> nn.Module:
    """Inference copy of a structured layer or of a whole model, in eval mode, with every GBLR
    layer replaced by its mask-free execution plan.  The input is left untouched."""
    from ._surgery import set_module

    model = copy.deepcopy(module_or_model).eval()
    if isinstance(model, StructuredLinear):
        return _export_layer(model).eval()
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, StructuredLinear)]
    for name, layer in targets:
        set_module(model, name, _export_layer(layer))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
