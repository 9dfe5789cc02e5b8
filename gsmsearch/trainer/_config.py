"""The plain configuration of one trial (one model trained with one structure configuration)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["TrialConfig", "MODES", "BUDGET_CONTROLS", "ALLOCATIONS", "LR_SCHEDULES", "PRECISIONS",
           "resolve_precision", "autocast_dtype"]

MODES = ("scratch", "finetune")
ALLOCATIONS = ("uniform", "global", "activation")
LR_SCHEDULES = ("constant", "cosine")  # see the loop's lr_factor
BUDGET_CONTROLS = ("project-flops", "project-mean-width", "stop-shrinking", "none")
# arithmetic of the training and evaluation forward passes (autocast; float32 master weights):
# "auto" = bf16 on a CUDA device that supports it, fp32 otherwise (CPU: fp32)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: str) -> str:
    """The precision ``precision`` means on ``device``: "fp32", "bf16" or "fp16".

    ``auto`` is bf16 on a CUDA device that supports bfloat16 and fp32 everywhere else (CPU
    training stays float32 unless asked: CPU bfloat16 matmuls are fast only on CPUs with
    bfloat16 units).  fp16 needs a CUDA device (its loss scaling, ``GradScaler``, is a CUDA
    tool, and CPU autocast computes in bfloat16); bf16 on a CUDA device without bfloat16
    support is refused too.  Raises ValueError naming ``precision``."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and kind != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device, got device {device!r}: CPU autocast computes "
                         f"in bfloat16 (use precision bf16 or fp32)")
    if precision == "bf16" and kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: the CUDA device {device!r} does not support bfloat16 "
                         f"(use precision fp16 or fp32)")
    return precision


def autocast_dtype(precision: str):
    """The autocast dtype of a resolved precision (None for fp32: no autocast)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class TrialConfig:
    """Everything that determines a trial's result (``None`` = a default; the values a trial
    actually used are in its result's ``resolved``)."""

    # what to train
    workload: str = "digits-mlp"
    workload_options: Dict[str, Any] = field(default_factory=dict)
    family: str = "gblr"  # a registered structured family, or "dense" for the reference model
    budget: float = 0.25  # target FLOPs of the structured layers, as a fraction of their dense FLOPs
    family_options: Dict[str, Any] = field(default_factory=dict)  # e.g. {"rank_per_component": 1}
    include: Optional[List[str]] = None  # layer-name patterns to structure; None = the workload's
    exclude: List[str] = field(default_factory=list)
    mode: str = "scratch"  # scratch | finetune (start from the cached dense model)
    # how `budget` is shared among the structured layers in finetune mode: "uniform" = every layer
    # at `budget`; "global" = per-layer budgets from the trained weights' singular values, spent
    # where they remove the most relative error per multiply-add (per-sample total = budget;
    # gsmsearch.structured.allocate_budgets).  Scratch mode needs "uniform" (GBLR learns its own
    # allocation there through the global FLOP projection).
    budget_allocation: str = "uniform"

    # GBLR structure learning (ignored by the hand-crafted families)
    lam: float = 0.0  # L1 strength on widths (proximal threshold lam * structure_lr); 0 = the budget alone decides
    # after every step the proximal step (soft-threshold by lam * structure_lr, clamp widths to
    # [0, 1], wrap locations) runs, then: "project-flops" = shift widths onto the FLOPs budget,
    # "project-mean-width" = onto target_mean_width, "stop-shrinking" = no proximal threshold once
    # the mean width is at target_mean_width, "none" = no budget projection
    budget_control: str = "project-flops"
    target_mean_width: Optional[float] = None  # for project-mean-width / stop-shrinking
    # budget goes 1 -> budget over these epochs; None = epochs/2 in scratch mode, 0 in finetune mode
    # (a fine-tuned GBLR layer starts at the budget: from_dense fits it there)
    budget_anneal_epochs: Optional[float] = None
    sigma_init: Optional[float] = 1.0  # None = exact boxcar masks throughout (the finetune default)
    sigma_final: Optional[float] = 100.0
    sigma_start_epoch: Optional[float] = None  # None = epochs / 4
    sigma_end_epoch: Optional[float] = None  # None = epochs
    fit_method: str = "greedy"  # GBLR.from_dense initialisation in finetune mode

    # optimisation
    epochs: int = 10
    batch_size: Optional[int] = None  # None = the workload's default
    lr: Optional[float] = None  # None = the workload's default
    # widths/locations learning rate; None = 5e-4 in scratch mode, 0 in finetune mode (the
    # structure is the from_dense fit, kept while the factors are fine-tuned: moving it with Adam
    # during fine-tuning cost 2-5 points on animal-mnist-vit and did not help on digits-mlp,
    # bench/results/workloads*.md)
    structure_lr: Optional[float] = None
    weight_decay: Optional[float] = None
    # every learning rate (content and structure) times a factor per step: "constant" = 1,
    # "cosine" = (1 + cos(pi * progress)) / 2, 1 -> 0 over the epochs; warmup_epochs ramp it up
    # linearly first.  None = the workload's default (its dense pre-training uses the same)
    lr_schedule: Optional[str] = None
    warmup_epochs: float = 0.0
    # finetune mode: weight of distillation from the cached dense model (the teacher) in the
    # training loss: (1 - distill) * task loss + distill * the workload's distillation loss (KL of
    # softened logits); 0 = the task loss alone
    distill: float = 0.0
    distill_temperature: float = 4.0
    seed: int = 0
    device: str = "cpu"
    # autocast of the forward passes (train and evaluation), float32 master weights; the GBLR
    # widths, locations, masks and the budget step stay float32 (see resolve_precision)
    precision: str = "auto"

    # measurement
    measure_latency: bool = True
    latency_batch: int = 256

    def __post_init__(self) -> None:
        wrong_type = self._type_errors()
        if wrong_type:  # the value checks below compare numbers
            raise ValueError("; ".join(wrong_type))
        errors = []
        if self.mode not in MODES:
            errors.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.budget_allocation not in ALLOCATIONS:
            errors.append(
                f"budget_allocation must be one of {', '.join(ALLOCATIONS)}, got {self.budget_allocation!r}"
            )
        elif self.budget_allocation != "uniform" and self.mode != "finetune":
            errors.append(
                f"budget_allocation {self.budget_allocation!r} needs mode finetune (it reads the "
                f"trained dense weights)"
            )
        if not 0.0 <= float(self.distill) <= 1.0:
            errors.append(f"distill must be in [0, 1], got {self.distill!r}")
        elif float(self.distill) > 0 and self.mode != "finetune":
            errors.append("distill needs mode finetune (the teacher is the cached dense model)")
        if not float(self.distill_temperature) > 0:
            errors.append(f"distill_temperature must be > 0, got {self.distill_temperature!r}")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            errors.append(
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if not 0.0 <= float(self.warmup_epochs) < int(self.epochs):
            errors.append(
                f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs!r}"
            )
        if self.budget_control not in BUDGET_CONTROLS:
            errors.append(
                f"budget_control must be one of {', '.join(BUDGET_CONTROLS)}, got {self.budget_control!r}"
            )
        if not (0 < float(self.budget) <= 1):
            errors.append(f"budget must be in (0, 1], got {self.budget!r}")
        if int(self.epochs) < 1:
            errors.append(f"epochs must be >= 1, got {self.epochs!r}")
        if self.lam < 0:
            errors.append(f"lam must be >= 0, got {self.lam!r}")
        if self.structure_lr is not None and float(self.structure_lr) < 0:
            errors.append(f"structure_lr must be >= 0, got {self.structure_lr!r}")
        if self.budget_anneal_epochs is not None and float(self.budget_anneal_epochs) < 0:
            errors.append(f"budget_anneal_epochs must be >= 0, got {self.budget_anneal_epochs!r}")
        if self.budget_control in ("project-mean-width", "stop-shrinking") and self.target_mean_width is None:
            errors.append(f"budget_control {self.budget_control!r} needs target_mean_width")
        if self.precision not in PRECISIONS:
            errors.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            errors.append(f"batch_size must be >= 1, got {self.batch_size!r}")
        errors += self._optimisation_errors()
        if errors:
            raise ValueError("; ".join(errors))

    def _type_errors(self) -> List[str]:
        """Numbers where numbers go (a YAML ``lr: fast`` or ``budget: true`` named as such)."""
        errors = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {"float": (int, float), "Optional[float]": (int, float), "int": (int,),
                    "Optional[int]": (int,)}.get(str(f.type))
            if kind is None or (value is None and str(f.type).startswith("Optional")):
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                what = "an integer" if kind == (int,) else "a number"
                errors.append(f"{f.name} must be {what}, got {value!r}")
            elif isinstance(value, float) and not math.isfinite(value):
                errors.append(f"{f.name} must be finite, got {value!r}")
        return errors

    def _optimisation_errors(self) -> List[str]:
        """Values a trial would otherwise take and train badly with, or fail on only once it
        runs (the sigma schedule, the fit): checked up front so a study refuses them."""
        from ..structured._gblr_fit import FIT_METHODS

        errors = []
        if self.fit_method not in FIT_METHODS:
            errors.append(f"fit_method must be one of {', '.join(FIT_METHODS)}, got {self.fit_method!r}")
        if self.lr is not None and not float(self.lr) > 0:
            errors.append(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay is not None and not float(self.weight_decay) >= 0:
            errors.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("sigma_init", "sigma_final"):
            value = getattr(self, name)
            if value is not None and not float(value) > 0:
                errors.append(f"{name} must be > 0, got {value!r}")
        if self.target_mean_width is not None and not 0 < float(self.target_mean_width) <= 1:
            errors.append(f"target_mean_width must be in (0, 1] (a fraction of each side), got "
                          f"{self.target_mean_width!r}")
        for name in ("sigma_start_epoch", "sigma_end_epoch"):
            value = getattr(self, name)
            if value is not None and not float(value) >= 0:
                errors.append(f"{name} must be >= 0, got {value!r}")
        if self.family == "gblr" and self.mode == "scratch" and self.sigma_init is not None:
            if self.sigma_final is None:
                errors.append("sigma_final must be set when sigma_init is (None only for exact masks throughout)")
            start = self.sigma_start_epoch if self.sigma_start_epoch is not None else int(self.epochs) / 4
            end = self.sigma_end_epoch if self.sigma_end_epoch is not None else int(self.epochs)
            if float(end) < float(start):
                shown_end = f"{end}" + (" = epochs" if self.sigma_end_epoch is None else "")
                shown_start = f"{start}" + (" = epochs/4" if self.sigma_start_epoch is None else "")
                errors.append(f"sigma_start_epoch ({shown_start}) must be <= sigma_end_epoch ({shown_end})"
                              if self.sigma_start_epoch is not None else
                              f"sigma_end_epoch ({shown_end}) must be >= sigma_start_epoch ({shown_start})")
        if not 0 <= int(self.seed) <= 2**32 - 1:
            errors.append(f"seed must be in [0, 2**32 - 1], got {self.seed!r}")
        if int(self.latency_batch) < 1:
            errors.append(f"latency_batch must be >= 1, got {self.latency_batch!r}")
        return errors

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrialConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown trial config key {unknown[0]!r}; known keys: {', '.join(sorted(names))}")
        return cls(**data)

    def digest(self, *, exclude=("device", "measure_latency", "latency_batch")) -> str:
        """A stable hash of the fields that determine training (checkpoints must match it).
        ``precision`` at its default ("auto") is left out: such a config hashes as a config
        without the field does, so digests stored with a study's trials stay valid."""
        data = {k: v for k, v in self.to_dict().items() if k not in exclude}
        if data.get("precision") == "auto":
            del data["precision"]
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
