"""Model surgery (swap nn.Linear for structured layers by qualified-name patterns) and model-level
cost accounting (FLOPs per sample of every linear layer, plus a hook for non-linear costs)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn

from ._base import StructuredLinear, get_family

__all__ = ["replace_linears", "matching_linears", "linear_layers", "model_cost", "ModelCost", "set_module"]

Patterns = Union[str, Sequence[str]]


def _as_patterns(patterns: Optional[Patterns]) -> Tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    return tuple(patterns)


def _matches(name: str, patterns: Tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def set_module(model: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Replace the submodule at ``qualified_name`` (e.g. ``"blocks.0.mlp.fc1"``)."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def matching_linears(model: nn.Module, include: Patterns = "*", exclude: Patterns = ()) -> List[Tuple[str, nn.Linear]]:
    """(name, layer) for every ``nn.Linear`` whose qualified name matches ``include`` and none of
    ``exclude`` (fnmatch patterns), in module order: what :func:`replace_linears` replaces."""
    include_patterns, exclude_patterns = _as_patterns(include), _as_patterns(exclude)
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and _matches(name, include_patterns)
        and not _matches(name, exclude_patterns)
    ]


def replace_linears(
    model: nn.Module,
    family: str,
    *,
    budget: Union[float, Callable[[str, nn.Linear], float]] = 1.0,
    include: Patterns = "*",
    exclude: Patterns = (),
    from_dense: bool = True,
    **family_kwargs,
) -> List[str]:
    """Replace every ``nn.Linear`` whose qualified name matches ``include`` and none of
    ``exclude`` (fnmatch patterns) by a layer of ``family``, in place.

    ``from_dense=True`` initialises each new layer from the dense weights with
    ``Family.from_dense(weight, bias, budget=...)`` (``budget`` a fraction of the layer's dense
    FLOPs, or a function of (name, layer)); ``from_dense=False`` constructs it randomly with
    ``family_kwargs``.  Returns the replaced names in module order.
    """
    cls = get_family(family)
    targets = matching_linears(model, include, exclude)
    for name, linear in targets:
        layer_budget = budget(name, linear) if callable(budget) else budget
        if from_dense:
            new = cls.from_dense(linear.weight, linear.bias, budget=layer_budget, **family_kwargs)
        else:
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      **family_kwargs)
            new.to(linear.weight.device, linear.weight.dtype)
        set_module(model, name, new)
    return [name for name, _ in targets]


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, StructuredLinear)) or (
        hasattr(module, "flops") and hasattr(module, "in_features") and hasattr(module, "out_features")
    )


def linear_layers(model: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """(name, module) for every linear-like layer (nn.Linear, structured, exported), outermost
    only (a structured layer's internals are not counted twice)."""
    skip_prefixes: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip_prefixes):
            continue
        if _is_linear_like(module):
            skip_prefixes.append(name + "." if name else "")
            yield name, module


@dataclass
class ModelCost:
    """FLOPs (multiply-adds) per sample."""

    linear_flops: int
    dense_linear_flops: int
    extra_flops: int = 0
    per_layer: Dict[str, dict] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.linear_flops + self.extra_flops

    @property
    def dense_total(self) -> int:
        return self.dense_linear_flops + self.extra_flops

    @property
    def relative(self) -> float:
        return self.total / self.dense_total if self.dense_total else float("nan")

    @property
    def relative_linear(self) -> float:
        return self.linear_flops / self.dense_linear_flops if self.dense_linear_flops else float("nan")


def model_cost(
    model: nn.Module,
    *,
    tokens: Union[int, Callable[[str], int]] = 1,
    extra_flops: Union[int, Callable[[nn.Module], int]] = 0,
) -> ModelCost:
    """FLOPs per sample of ``model``'s linear layers, structured or dense.

    Args:
        tokens: how many tokens each linear layer processes per sample (an int for all, or a
            function of the layer's qualified name; e.g. a ViT's head sees 1 token, its blocks 65).
        extra_flops: non-linear costs per sample that no structure changes (attention scores,
            convolutions), an int or a function of the model.  Counted in both the total and the
            dense total, so ``relative`` is the whole model's cost relative to its dense version.
    """
    linear, dense, per_layer = 0, 0, {}
    for name, module in linear_layers(model):
        n_tokens = tokens(name) if callable(tokens) else int(tokens)
        layer_dense = module.in_features * module.out_features
        layer_flops = int(module.flops()) if hasattr(module, "flops") else layer_dense
        linear += n_tokens * layer_flops
        dense += n_tokens * layer_dense
        per_layer[name] = {
            "family": getattr(module, "family", "dense") or "dense",
            "flops": layer_flops,
            "dense_flops": layer_dense,
            "tokens": n_tokens,
        }
    extra = int(extra_flops(model)) if callable(extra_flops) else int(extra_flops)
    return ModelCost(linear, dense, extra, per_layer)
