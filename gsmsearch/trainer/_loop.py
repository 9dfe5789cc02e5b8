"""The training loop shared by trials and dense pre-training.

One epoch = one pass over the shuffled training split.  After every optimizer step the GBLR
layers get the method's proximal step (soft-threshold by ``lam`` times the structure lr, clamp,
wrap) through a budget controller -- :class:`~gsmsearch.structured.ProximalOnly` when none is
given, so a loop without a budget still keeps widths in [0, 1]; the Gaudi masks' sigma follows
a schedule per (fractional) epoch.  The loop checkpoints after every epoch (atomically) and can
resume from such a checkpoint, so a preempted trial loses at most one epoch.

Precision (``precision``: fp32, bf16, fp16 or auto, :func:`~gsmsearch.trainer._config.resolve_precision`):
the forward passes and the loss (training, the teacher's, validation) run under
``torch.autocast`` at that dtype; the parameters, their gradients and the optimizer state stay
float32 (master weights), and so do the GBLR widths, locations and masks (the GBLR layer builds
its masks with autocast off, in its parameters' dtype) and the proximal step and budget
projection (after the optimizer step, outside autocast).  fp16 scales the loss with a
``GradScaler`` (a step whose gradients overflowed is skipped and the scale lowered).

Data-parallel (``parallel``, a :class:`~._distributed.DataParallel`): the loop runs on every rank
of the trial; each rank trains on its slice of every global batch, the gradients and the step's
loss are reduced across ranks before the optimizer step, rank 0 alone validates (its metrics go
to every rank), writes the checkpoint and calls ``on_epoch`` (its verdict goes to every rank);
see ``_distributed``.
"""
from __future__ import annotations

import contextlib

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..structured import (
    BudgetController,
    ProjectFlops,
    ProximalOnly,
    SigmaSchedule,
    gblr_layers,
    mean_width,
    param_groups,
    set_sigma,
)
from ..workloads import move_to_device

from ._config import LR_SCHEDULES, autocast_dtype, resolve_precision
from ._optimizer import adamw

__all__ = ["TrialFailed", "EpochReport", "TrainingLoop", "seed_everything", "lr_factor"]


def lr_factor(schedule: str, progress: float, epochs: float, warmup_epochs: float = 0.0) -> float:
    """The multiplier of every learning rate at ``progress`` (fractional epochs done).

    ``warmup_epochs`` ramp linearly from 0 (first step: 1 / steps of warmup, never 0); then
    "constant" stays at 1 and "cosine" falls as (1 + cos(pi p)) / 2 to 0 at ``epochs``.
    A pure function of progress, so a resumed trial continues the same curve."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if warmup_epochs > 0 and progress < warmup_epochs:
        return max(progress, 1e-3 * warmup_epochs) / warmup_epochs
    if schedule == "constant":
        return 1.0
    span = max(float(epochs) - warmup_epochs, 1e-12)
    done = min(max((progress - warmup_epochs) / span, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * done))


class TrialFailed(RuntimeError):
    """A trial that cannot produce a result; ``reason`` is shown to the user and recorded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class EpochReport:
    epoch: int  # 1-based count of finished epochs
    train_loss: float
    val: Dict[str, float]  # the workload's metrics on the validation split (never the test split)
    relative_flops: float  # of the structured layers, at this epoch
    mean_width: Optional[float]
    sigma: Optional[float]
    seconds: float  # wall time of this epoch's training + validation
    samples: int = 0  # training samples this epoch
    step_seconds: float = 0.0  # wall time of this epoch's training steps alone (no validation)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


@dataclass
class TrainingLoop:
    """Trains ``model`` on ``workload``; see the module docstring."""

    workload: Any
    model: nn.Module
    splits: Any
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    structure_lr: float = 5e-3
    lam: float = 0.0
    # the proximal step and budget projection after every step; None = ProximalOnly (no budget)
    controller: Optional[BudgetController] = None
    sigma_schedule: Optional[SigmaSchedule] = None
    budget_schedule: Optional[Callable[[float], float]] = None  # epoch -> ProjectFlops target
    seed: int = 0
    device: str = "cpu"
    checkpoint_path: Optional[Path] = None
    checkpoint_tag: str = ""  # must match to resume (e.g. the trial config digest)
    # rows each layer processes per sample (qualified name -> count; missing = 1): FLOPs budgets
    # and relative_flops() count per sample, not per token, where layers see different counts
    layer_tokens: Optional[Dict[str, float]] = None
    # every group's lr (and the proximal step's structure lr) times lr_factor(lr_schedule, ...)
    lr_schedule: str = "constant"
    warmup_epochs: float = 0.0
    # distillation: loss = (1 - distill) * task loss + distill * workload.distillation_loss
    # against ``teacher``'s output on the same batch (a frozen model, not checkpointed)
    teacher: Optional[nn.Module] = None
    distill: float = 0.0
    distill_temperature: float = 4.0
    # autocast of the forward passes: fp32 | bf16 | fp16 | auto (see the module docstring)
    precision: str = "fp32"
    # data-parallel training: this process's rank in the trial (None: the trial is this process)
    parallel: Optional[Any] = None
    curves: List[Dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.precision = resolve_precision(self.precision, self.device)
        self._amp_dtype = autocast_dtype(self.precision)
        # fp16 only (GPU): bf16 has float32's exponent range, so its gradients need no scaling
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.model.to(self.device)
        self.layers = gblr_layers(self.model)
        if self.layers and self.controller is None:
            self.controller = ProximalOnly()
        if self.teacher is not None:
            self.teacher.to(self.device).eval().requires_grad_(False)
        if isinstance(self.controller, ProjectFlops) and self.controller.weights is None and self.layer_tokens:
            rows = {id(module): self._rows(name) for name, module in self.model.named_modules()}
            self.controller.weights = [rows[id(layer)] for layer in self.layers]
        if self.structure_lr == 0:
            # a fixed structure (fine-tuning a fit): the widths' and locations' gradients would
            # only be multiplied by a zero learning rate, so they are not computed (the same
            # training, 4-5% less time in a fine-tune trial; the controller still projects)
            for layer in self.layers:
                for p in layer.structural_parameters():
                    p.requires_grad_(False)
        groups = param_groups(
            self.model, lr=self.lr, structure_lr=self.structure_lr, weight_decay=self.weight_decay
        )
        # torch.optim.AdamW's update; on CPU without torch.optim's import of torch._dynamo
        # (1.0-1.4 s of every fresh worker process, ``_optimizer``)
        self.optimizer = adamw(groups, device=self.device)
        # the unscheduled lrs (a resumed optimizer's groups hold the last scheduled ones)
        self._base_lrs = [float(group["lr"]) for group in self.optimizer.param_groups]
        lr_factor(self.lr_schedule, 0.0, self.epochs, self.warmup_epochs)  # validates the name
        self.start_epoch = 0
        self.train_seconds = 0.0
        if self.checkpoint_path is not None:
            self._maybe_resume()
        if self.parallel is not None:
            self._agree_on_start()

    # -- checkpoints -----------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        path = Path(self.checkpoint_path)
        if not path.exists():
            return
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("tag") != self.checkpoint_tag:
            return  # a checkpoint of another configuration: start afresh (it is overwritten)
        self._load_state(state)

    def _load_state(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.curves = list(state["curves"])
        self.train_seconds = float(state.get("train_seconds", 0.0))

    def _state(self, epoch: int) -> Dict[str, Any]:
        return {
            "tag": self.checkpoint_tag,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "curves": self.curves,
            "train_seconds": self.train_seconds,
        }

    def _save_checkpoint(self, epoch: int) -> None:
        if self.checkpoint_path is None or (self.parallel is not None and self.parallel.rank != 0):
            return  # data-parallel: rank 0 writes, every rank resumes from it
        path = Path(self.checkpoint_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(self._state(epoch), tmp)
        tmp.replace(path)

    def _agree_on_start(self) -> None:
        """Data-parallel: every rank starts where rank 0 does.  Each rank has read the
        checkpoint itself; where the ranks did not find the same epoch (a rank that does not
        see rank 0's checkpoint folder), rank 0 sends its whole state.  Rank 0's parameters and
        buffers then go to every rank, and ranks other than 0 draw their random numbers
        (dropout, say) from a stream of their own."""
        import io

        parallel = self.parallel
        if not parallel.all_equal(self.start_epoch):
            data = None
            if parallel.rank == 0:
                buffer = io.BytesIO()
                torch.save(self._state(self.start_epoch), buffer)
                data = buffer.getvalue()
            data = parallel.broadcast_object(data)
            if parallel.rank != 0:
                state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=False)
                self._load_state(state)
        parallel.broadcast_module(self.model)
        if parallel.rank != 0:
            torch.manual_seed((int(self.seed) * 1_000_003 + int(parallel.rank)) % 2**63)

    # -- training --------------------------------------------------------------------------
    def autocast(self):
        """The context of every forward pass: autocast at the loop's precision (off for fp32)."""
        if self._amp_dtype is None:  # fp32: no autocast state to enter at every step
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self._amp_dtype)

    def _backward_step(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` and the optimizer step (fp16: through the loss scaler)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # unscales; skipped when a gradient is not finite
        self.scaler.update()

    def _parallel_step(self, loss: torch.Tensor, weight: float, epoch: int, step: int) -> float:
        """Data-parallel :meth:`_backward_step`: this rank's gradients, reduced across ranks
        (weighted by ``weight``, this rank's share of the global batch) with the step's loss,
        then the optimizer step on every rank.  Returns the global batch's loss; a non-finite
        one fails the trial on every rank, before the step."""
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        loss_value = self.parallel.reduce_step(params, loss, weight)
        if not math.isfinite(loss_value):
            raise TrialFailed(
                f"non-finite training loss ({loss_value}) at epoch {epoch + 1}, step {step + 1}; "
                f"lower the learning rate (lr={self.lr}, structure_lr={self.structure_lr})"
            )
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss_value

    def _sigma(self, epoch: float) -> Optional[float]:
        return self.sigma_schedule(epoch) if self.sigma_schedule is not None else None

    def _rows(self, name: str) -> float:
        return float((self.layer_tokens or {}).get(name, 1.0))

    def relative_flops(self) -> float:
        """FLOPs of the structured layers as a fraction of their dense FLOPs (per sample, with
        ``layer_tokens``; per token without)."""
        from ..structured import StructuredLinear

        flops, dense = 0.0, 0.0
        for name, module in self.model.named_modules():
            if isinstance(module, StructuredLinear):
                flops += self._rows(name) * module.flops()
                dense += self._rows(name) * module.dense_flops()
        return flops / dense if dense else 1.0

    def run(self, on_epoch: Optional[Callable[[EpochReport], Optional[bool]]] = None) -> List[Dict]:
        """Train the remaining epochs.  ``on_epoch`` gets each report, once the epoch's checkpoint
        is written; returning True stops, and an exception it raises (a stop request of the
        driver, ``_trial.TrialStopped``) leaves the loop at that epoch boundary."""
        loader_batches = None
        samples = len(self.splits["train"])  # data-parallel: the global batch sizes follow from it
        for epoch in range(self.start_epoch, self.epochs):
            started = time.perf_counter()
            # the order of each epoch depends only on (seed, epoch): resuming replays it exactly
            # data-parallel: this rank's slice of each global batch, read and collated alone
            shard = None if self.parallel is None else (self.parallel.rank, self.parallel.world_size)
            loader = self.splits.loader(
                "train", self.batch_size, shuffle=True, seed=self.seed * 100_003 + epoch, shard=shard
            )
            loader_batches = loader_batches or max(1, len(loader))
            self.model.train()
            total_loss, count = 0.0, 0
            for step, batch in enumerate(loader):
                progress = epoch + step / loader_batches
                factor = lr_factor(self.lr_schedule, progress, self.epochs, self.warmup_epochs)
                for group, base in zip(self.optimizer.param_groups, self._base_lrs):
                    group["lr"] = base * factor
                if self.layers:
                    set_sigma(self.model, self._sigma(progress))
                    if self.budget_schedule is not None and isinstance(self.controller, ProjectFlops):
                        self.controller.target_relative_flops = self.budget_schedule(progress)
                size = weight = None
                if self.parallel is not None:  # this rank's share of the global batch
                    size = min(self.batch_size, samples - step * self.batch_size)
                    weight = self.parallel.share(size) / size
                batch = move_to_device(batch, self.device)
                with self.autocast():
                    output = self.workload.forward(self.model, batch)
                    loss = self.workload.loss(output, batch)
                    if self.teacher is not None and self.distill > 0:
                        with torch.no_grad():
                            target = self.workload.forward(self.teacher, batch)
                        soft = self.workload.distillation_loss(output, target, batch, self.distill_temperature)
                        loss = (1.0 - self.distill) * loss + self.distill * soft
                if self.parallel is not None:
                    loss_value = self._parallel_step(loss, weight, epoch, step)
                    if self.layers and self.controller is not None:
                        self.controller.step(self.layers, self.lam, self.structure_lr * factor)
                    total_loss += loss_value * size
                    count += size
                    continue
                loss_value = float(loss.detach())  # the step's one read of the loss from a GPU
                if not math.isfinite(loss_value):
                    raise TrialFailed(
                        f"non-finite training loss ({loss_value}) at epoch {epoch + 1}, step {step + 1}; "
                        f"lower the learning rate (lr={self.lr}, structure_lr={self.structure_lr})"
                    )
                self._backward_step(loss)
                if self.layers and self.controller is not None:
                    self.controller.step(self.layers, self.lam, self.structure_lr * factor)
                total_loss += loss_value * _batch_len(batch)
                count += _batch_len(batch)
            step_seconds = time.perf_counter() - started  # the steps only: throughput = samples / this
            if self.parallel is not None:  # what shows the ranks' parameters stay bit-identical
                self.parallel.epoch_digests.append(self.parallel.digest(self.model))
            sigma = self._sigma(epoch + 1) if self.layers else None
            if self.layers:
                set_sigma(self.model, sigma)
            val = None
            if self.parallel is None or self.parallel.rank == 0:
                with self.autocast():
                    val = self.workload.evaluate(self.model, self.splits.val, device=self.device,
                                                 collate_fn=self.splits.collate_fn)
            if self.parallel is not None:  # rank 0's metrics, over the whole split, on every rank
                val = self.parallel.broadcast_object(val)
            if not all(math.isfinite(v) for v in val.values()):
                raise TrialFailed(f"non-finite validation metrics at epoch {epoch + 1}: {val}")
            seconds = time.perf_counter() - started
            self.train_seconds += seconds
            report = EpochReport(
                epoch=epoch + 1,
                train_loss=total_loss / max(count, 1),
                val=val,
                relative_flops=self.relative_flops(),
                mean_width=mean_width(self.layers) if self.layers else None,
                sigma=sigma,
                seconds=seconds,
                samples=count,
                step_seconds=step_seconds,
            )
            self.curves.append(report.to_dict())
            self._save_checkpoint(epoch + 1)
            if self.parallel is not None:  # rank 0 reports; its verdict holds on every rank
                if self.parallel.agree((lambda: on_epoch(report)) if on_epoch is not None else None):
                    break
            elif on_epoch is not None and on_epoch(report):
                break
        return self.curves


def _batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return next(iter(batch.values())).shape[0]
    return batch[0].shape[0]
