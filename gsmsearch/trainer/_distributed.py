"""Data-parallel training of one trial on several processes (torch.distributed).

A trial with ``world_size`` N > 1 runs the same :class:`~._loop.TrainingLoop` in N processes
(ranks), each holding a full copy of the model:

- data: every rank walks the same shuffled global batches as a one-process trial (same seed per
  epoch, same batch size: ``batch_size`` is the global batch) and reads and collates only its own
  contiguous slice of each (``DataSplits.loader(shard=...)``; sizes differ by at most one
  sample).  So the union of the ranks' slices at each step is the one-process batch;
- gradients: after the backward pass one all-reduce sums every gradient weighted by the rank's
  share of the global batch (n_rank / n_batch), so each rank holds the gradient of the mean loss
  over the global batch, the one-process gradient up to the summation order.  The step's loss
  travels in the same all-reduce: every rank sees the global loss, and a non-finite one fails the
  trial on every rank at the same step;
- the optimizer step, then the GBLR proximal step, budget projection and sigma schedule run on
  every rank on the same gradients and the same parameters, in the same deterministic code: the
  parameters (widths and locations included) stay bit-identical on every rank, and no rank
  communicates structure;
- rank 0 evaluates the validation split (the whole of it) and sends its metrics to the others, so
  a failure on them is decided alike everywhere; rank 0 alone writes the epoch checkpoint, reports
  the epoch and takes the stop decisions (a pruner's), which it sends to the others
  (:meth:`DataParallel.agree`); rank 0 alone measures the trained model (test split, latency,
  structure file);
- resume: every rank reads the checkpoint; when the ranks do not find the same one (a node that
  does not see rank 0's folder), rank 0 sends its state to all.

Backends: ``nccl`` where every rank holds a GPU of its own, ``gloo`` otherwise (CPUs, or ranks
sharing one GPU).  Gradients are reduced in one flat buffer after the backward pass (no overlap
of communication with the backward pass, as torch's DistributedDataParallel wrapper would give;
the loop keeps the plain module, so its state dict, hooks and the workloads' forward calls are
those of a one-process trial).
"""
from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

__all__ = ["DataParallel", "RankStopped"]

# how long a collective waits for a rank that neither answers nor has died (a dead rank's closed
# connection fails the others at once)
DEFAULT_TIMEOUT_S = 1800.0


class RankStopped(Exception):
    """Raised on ranks other than 0 when rank 0 stops the trial at an epoch boundary (a
    pruner's stop, or rank 0's callback failing): they end there with it."""


@dataclass
class DataParallel:
    """This process's place in a data-parallel trial (see the module docstring)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    backend: str = "gloo"
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 0 <= int(self.rank) < int(self.world_size):
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {self.backend!r}")
        self._started = False
        self.epoch_digests: List[str] = []  # of the parameters after each epoch trained (see the loop)

    def to_dict(self) -> Dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "master_addr": self.master_addr,
                "master_port": self.master_port, "backend": self.backend, "timeout_s": self.timeout_s}

    # -- the process group ---------------------------------------------------------------------
    def start(self, device: str) -> None:
        """Join the trial's process group (rank 0 serves the rendezvous at master_addr:port)."""
        import torch.distributed as dist

        self.device = torch.device(device)
        dist.init_process_group(
            self.backend, init_method=f"tcp://{self.master_addr}:{self.master_port}", rank=int(self.rank),
            world_size=int(self.world_size), timeout=datetime.timedelta(seconds=float(self.timeout_s)))
        self._started = True

    def close(self) -> None:
        import torch.distributed as dist

        if self._started and dist.is_initialized():
            dist.destroy_process_group()
        self._started = False

    @property
    def _comm_device(self) -> torch.device:
        """Where collective buffers live: the GPU for nccl, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # -- data ----------------------------------------------------------------------------------
    def share(self, total: int) -> int:
        """How many of a global batch's ``total`` samples are this rank's (its slice of the batch,
        ``workloads.share_of``); 0 for a rank that gets the batch's first sample only to take
        part in the step, its gradient then entering the sum with weight 0."""
        from ..workloads._registry import share_of

        return share_of(total, self.rank, self.world_size)[1]

    # -- gradients -----------------------------------------------------------------------------
    def reduce_step(self, params: List[nn.Parameter], loss: torch.Tensor, weight: float) -> float:
        """Replace every gradient of ``params`` by the sum over ranks of weight_rank * gradient
        (``weight`` = this rank's share of the global batch) and return the global loss (the
        same weighted sum of the ranks' losses), in one all-reduce.  A parameter no rank has a
        gradient for keeps None; one that some rank lacks counts as zero there."""
        import torch.distributed as dist

        device = self._comm_device
        parts, present = [], []
        for p in params:
            if p.grad is None:
                present.append(0.0)
                parts.append(torch.zeros(p.numel(), dtype=torch.float32, device=device))
            else:
                present.append(1.0)
                parts.append(p.grad.detach().reshape(-1).to(device=device, dtype=torch.float32) * weight)
        tail = torch.tensor([float(loss.detach()) * weight] + present, dtype=torch.float32, device=device)
        flat = torch.cat(parts + [tail])
        dist.all_reduce(flat)
        total = sum(part.numel() for part in parts)
        flags = flat[total + 1:].tolist()
        offset = 0
        for p, flag in zip(params, flags):
            n = p.numel()
            if flag > 0:
                reduced = flat[offset:offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
                if p.grad is None:
                    p.grad = reduced.clone()
                else:
                    p.grad.copy_(reduced)
            offset += n
        return float(flat[total])

    # -- agreement -----------------------------------------------------------------------------
    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        import torch.distributed as dist

        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device if self.backend == "nccl" else None)
        return box[0]

    def all_equal(self, value: Any) -> bool:
        """Whether every rank holds the same picklable ``value``."""
        import torch.distributed as dist

        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, pickle.dumps(value))
        return all(item == gathered[0] for item in gathered)

    def agree(self, call: Optional[Callable[[], Any]]) -> Any:
        """Rank 0 runs ``call`` (an epoch callback); every rank learns its outcome: the value it
        returned (truthy = stop), or that it raised -- rank 0 re-raises the exception, the other
        ranks raise :class:`RankStopped`."""
        raised, value = None, None
        if self.rank == 0 and call is not None:
            try:
                value = call()
            except BaseException as error:  # noqa: BLE001 - sent on, then raised again
                raised = error
        outcome = self.broadcast_object(("raised", None) if raised is not None else ("value", bool(value)))
        if raised is not None:
            raise raised
        if outcome[0] == "raised":
            raise RankStopped("rank 0 ended the trial at this epoch boundary")
        return value if self.rank == 0 else outcome[1]

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers into ``module`` on every rank."""
        import torch.distributed as dist

        for tensor in list(module.parameters()) + list(module.buffers()):
            if self.backend == "nccl" or tensor.device.type == "cpu":
                dist.broadcast(tensor.data, src=0)
            else:
                staged = tensor.data.to("cpu")
                dist.broadcast(staged, src=0)
                tensor.data.copy_(staged)

    def digest(self, module: nn.Module) -> str:
        """A hash of ``module``'s parameters and buffers, bit for bit (to compare ranks)."""
        import hashlib

        h = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
                     if tensor.numel() else b"")
        return h.hexdigest()

