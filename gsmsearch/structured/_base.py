"""The interface every structured linear family implements, and the registry of families.

A family is a subclass of :class:`StructuredLinear` registered under a short name with
:func:`register_family`.  Everything else in gsmsearch (surgery, the trainer, the search space,
the tests) reaches families through the registry, so a new family is usable and tested the moment
it is registered.
"""
from __future__ import annotations

import abc
import inspect
import math
from typing import Callable, Dict, Optional, Type

import torch
from torch import nn

__all__ = [
    "StructuredLinear",
    "register_family",
    "get_family",
    "family_names",
    "create_linear",
    "dense_flops",
]


def dense_flops(in_features: int, out_features: int) -> int:
    """Multiply-adds per token of y = W x for a dense out x in matrix."""
    return int(in_features) * int(out_features)


class StructuredLinear(nn.Module, abc.ABC):
    """An ``nn.Linear`` drop-in whose weight has a structure.

    Constructor shape shared by all families: ``(in_features, out_features, *, bias=True, ...)``
    with family knobs keyword-only.  ``forward`` accepts any leading batch dims (``(..., in)`` to
    ``(..., out)``), like ``nn.Linear``.

    Subclasses implement :meth:`to_dense`, :meth:`flops`, :meth:`from_dense` and ``forward``.
    """

    family: str = ""  # set by @register_family

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True) -> None:
        super().__init__()
        if int(in_features) <= 0 or int(out_features) <= 0:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features} and {out_features}"
            )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features))
        else:
            self.register_parameter("bias", None)

    # -- the interface ---------------------------------------------------------------------
    @abc.abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The effective (out_features, in_features) weight, so forward(x) == x @ W.T + bias."""

    @abc.abstractmethod
    def flops(self) -> int:
        """Multiply-adds per token of y = W x (bias excluded), under the family's cost rule."""

    @classmethod
    @abc.abstractmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, budget: float, **kwargs
    ) -> "StructuredLinear":
        """A layer approximating ``weight`` (out x in) with ``flops() <= budget * in * out``
        (within 2%).  ``budget`` is the target FLOPs as a fraction of the dense layer's."""

    # -- shared behaviour -------------------------------------------------------------------
    def num_params(self) -> int:
        """Number of trainable scalars, bias included (structural parameters included)."""
        return sum(p.numel() for p in self.parameters())

    def dense_flops(self) -> int:
        return dense_flops(self.in_features, self.out_features)

    def relative_flops(self) -> float:
        return self.flops() / self.dense_flops()

    def structural_parameters(self):
        """Parameters that describe the structure (own optimizer group); none by default."""
        return iter(())

    def content_parameters(self):
        """Every parameter that is not structural."""
        structural = {id(p) for p in self.structural_parameters()}
        return (p for p in self.parameters() if id(p) not in structural)

    def structure_summary(self) -> dict:
        """A small JSON-able description of the layer's structure (for trial records)."""
        return {
            "family": self.family,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "flops": int(self.flops()),
            "dense_flops": int(self.dense_flops()),
        }

    def config(self) -> dict:
        """Constructor keyword arguments that rebuild this layer's shapes (for serialisation):
        ``type(layer)(**layer.config())`` accepts ``layer.state_dict()``.  The default reads each
        constructor argument from the attribute of the same name; families whose attributes are
        named differently override this."""
        config = {}
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if name == "bias":
                config["bias"] = self.bias is not None
            elif hasattr(self, name):
                config[name] = getattr(self, name)
            elif param.default is inspect.Parameter.empty:
                raise NotImplementedError(
                    f"{type(self).__name__}.config(): no attribute for constructor argument {name!r}"
                )
        return config

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    @staticmethod
    def _check_budget(budget: float) -> float:
        budget = float(budget)
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise ValueError(f"budget must be a fraction of the dense FLOPs in (0, 1], got {budget}")
        return budget

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, flops={self.flops()} "
            f"({self.relative_flops():.3f} of dense)"
        )


_FAMILIES: Dict[str, Type[StructuredLinear]] = {}


def register_family(name: str) -> Callable[[Type[StructuredLinear]], Type[StructuredLinear]]:
    """Class decorator: register a :class:`StructuredLinear` subclass under ``name``."""

    def decorator(cls: Type[StructuredLinear]) -> Type[StructuredLinear]:
        if name in _FAMILIES and _FAMILIES[name] is not cls:
            raise ValueError(f"structured family {name!r} is already registered")
        cls.family = name
        _FAMILIES[name] = cls
        return cls

    return decorator


def get_family(name: str) -> Type[StructuredLinear]:
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES))
        raise ValueError(f"unknown structured family {name!r}; expected one of: {known}") from None


def family_names() -> list:
    return sorted(_FAMILIES)


def create_linear(family: str, in_features: int, out_features: int, **kwargs) -> StructuredLinear:
    """Construct a layer of a registered family (randomly initialised)."""
    return get_family(family)(in_features, out_features, **kwargs)
