"""The trainer's AdamW: torch.optim.AdamW's update, without its import of torch._dynamo on CPU.

Every ``torch.optim.Optimizer`` imports ``torch._dynamo`` when it is built and on every step (its
methods are wrapped to keep the compiler out of them), which takes 1.0-1.4 s of a fresh process
here, for every Ray worker's first trial: about half of a short study's per-worker start-up.  On CPU, ``torch.optim.AdamW`` runs its single-tensor update,
``torch.optim.adam._single_tensor_adam``.  :class:`CPUAdamW` keeps the same per-parameter state
and calls that same function with the same arguments, so its update is torch's, bit for bit
(``tests/trainer/test_optimizer.py`` steps both side by side), and its ``state_dict`` has
torch's layout (a checkpoint of either loads into the other).

:func:`adamw` builds a :class:`CPUAdamW` for CPU training where the installed torch has that
function with the expected keywords, and a ``torch.optim.AdamW`` otherwise (on CUDA it runs
foreach kernels, one launch for many parameters).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Dict, Iterable, List, Optional

import torch

__all__ = ["CPUAdamW", "adamw"]

# torch.optim.AdamW's defaults: the keys every group of its state_dict carries
DEFAULTS: Dict[str, Any] = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
    foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True,
)
_KEYWORDS = {"amsgrad", "has_complex", "beta1", "beta2", "lr", "weight_decay", "eps", "maximize",
             "capturable", "differentiable", "decoupled_weight_decay"}


def _single_tensor_update():
    """torch's single-tensor Adam update, or None where this torch lacks it (or its keywords)."""
    try:
        from torch.optim.adam import _single_tensor_adam
    except ImportError:
        return None
    try:
        keywords = set(inspect.signature(_single_tensor_adam).parameters)
    except (TypeError, ValueError):
        return None
    return _single_tensor_adam if _KEYWORDS <= keywords else None


_UPDATE = _single_tensor_update()


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps each parameter's step count in (on CPU)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class CPUAdamW:
    """``torch.optim.AdamW`` for CPU parameters (see the module docstring): ``param_groups``,
    ``state``, ``step()``, ``zero_grad()``, ``state_dict()`` and ``load_state_dict()`` as
    torch's.  Options torch's CPU AdamW would run another way (amsgrad, capturable,
    differentiable, fused, foreach) are refused."""

    def __init__(self, params: Iterable, **defaults: Any) -> None:
        if _UPDATE is None:
            raise RuntimeError("this torch has no torch.optim.adam._single_tensor_adam; use torch.optim.AdamW")
        unknown = set(defaults) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"CPUAdamW got unexpected options {sorted(unknown)}")
        self.defaults = {**DEFAULTS, **defaults}
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: List[Dict[str, Any]] = []
        self.state: Dict[torch.Tensor, Dict[str, torch.Tensor]] = {}
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: Dict[str, Any]) -> None:
        group = dict(group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        for option in ("amsgrad", "capturable", "differentiable", "fused", "foreach"):
            if group[option]:
                raise ValueError(f"CPUAdamW does not run {option}={group[option]!r}; use torch.optim.AdamW")
        if not group["decoupled_weight_decay"]:
            raise ValueError("CPUAdamW is AdamW: decoupled_weight_decay must stay True")
        for p in group["params"]:
            if p.device.type != "cpu":
                raise ValueError(f"CPUAdamW takes CPU parameters, got one on {p.device}")
        self.param_groups.append(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            has_complex = False
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                has_complex |= torch.is_complex(p)
                state = self.state.setdefault(p, {})
                if not state:  # as torch.optim.Adam._init_group: the step count on the CPU
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            _UPDATE(params, grads, exp_avgs, exp_avg_sqs, [], steps, None, None,
                    amsgrad=False, has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    capturable=False, differentiable=False, decoupled_weight_decay=True)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.requires_grad_(False)
                    p.grad.zero_()

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's layout: parameters as their index over all groups in order."""
        index: Dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(packed)
        state = {index[id(p)]: values for p, values in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As torch.optim's: the saved groups' options with this optimizer's parameters, the
        moments cast to each parameter's dtype (the step counts kept as saved)."""
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        by_index: Dict[int, torch.Tensor] = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match "
                                 "the size of optimizer's group")
            by_index.update(zip(saved["params"], group["params"]))
        self.state = {}
        for key, values in state_dict["state"].items():
            if key not in by_index:
                continue
            param = by_index[key]
            self.state[param] = {
                name: value if name == "step" or not torch.is_tensor(value)
                else value.to(dtype=param.dtype if param.is_floating_point() else value.dtype, device=param.device)
                for name, value in values.items()
            }
        self.param_groups = [{**saved, "params": group["params"]}
                             for group, saved in zip(self.param_groups, saved_groups)]


def adamw(params: Iterable, device: Optional[str] = None, **options: Any):
    """The trainer's optimizer: :class:`CPUAdamW` for CPU training where this torch allows it,
    else ``torch.optim.AdamW`` (same update; see the module docstring)."""
    groups = list(params)
    on_cpu = torch.device(device or "cpu").type == "cpu"
    if on_cpu and _UPDATE is not None:
        return CPUAdamW(groups, **options)
    return torch.optim.AdamW(groups, **options)
