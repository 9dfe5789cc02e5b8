"""Structured linear layers: GBLR with Gaudi masks, hand-crafted baselines, surgery and export.

Every family subclasses :class:`StructuredLinear` and is registered by name (``family_names()``);
see docs/concepts.md for the math and the cost rule.
"""
from ._base import (
    StructuredLinear,
    create_linear,
    dense_flops,
    family_names,
    get_family,
    register_family,
)
from ._cost import component_costs, gblr_flops, interval_lengths
from ._mask import boxcar_mask, gaudi_mask, gaudi_mask_reference
from ._gblr import GBLRLinear
from ._dense import DenseLinear
from ._lowrank import LowRankLinear
from ._blockdiag import BlockDiagonalLinear
from ._monarch import MonarchLinear
from ._blocksparse_linear import BlockSparseLinear
from ._blocklowrank import BlockLowRankLinear
from ._blast import BlastLinear
from ._allocation import ALLOCATIONS, allocate_budgets
from ._common import BudgetTooSmall
from ._proximal import (
    BudgetController,
    ProjectFlops,
    ProjectMeanWidth,
    ProximalOnly,
    SigmaSchedule,
    StopShrinkingAtTarget,
    gblr_layers,
    mean_width,
    param_groups,
    proximal_step,
    set_sigma,
)
from ._surgery import ModelCost, linear_layers, matching_linears, model_cost, replace_linears, set_module
from ._export import ExportedGBLR, export
from ._serialize import load_structure, save_structure

__all__ = [
    "StructuredLinear", "create_linear", "dense_flops", "family_names", "get_family",
    "register_family", "component_costs", "gblr_flops", "interval_lengths", "boxcar_mask",
    "gaudi_mask", "gaudi_mask_reference", "GBLRLinear", "DenseLinear", "LowRankLinear",
    "BlockDiagonalLinear", "MonarchLinear", "BlockSparseLinear", "BlockLowRankLinear", "BlastLinear", "BudgetController", "ProjectFlops",
    "ProjectMeanWidth", "ProximalOnly", "SigmaSchedule", "StopShrinkingAtTarget", "gblr_layers", "mean_width",
    "param_groups", "proximal_step", "set_sigma", "ModelCost", "linear_layers", "model_cost",
    "replace_linears", "matching_linears", "set_module", "ALLOCATIONS", "allocate_budgets", "BudgetTooSmall", "ExportedGBLR", "export", "load_structure", "save_structure",
]
