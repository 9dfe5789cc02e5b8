"""The :class:`Workload` interface (a named task: data, model, loss, metric) and its registry.

A workload is everything the trainer needs to know about one task:

* :meth:`Workload.load_data` -- train/val/test splits, fixed by a seed;
* :meth:`Workload.build_model` -- the model, a plain ``nn.Module`` whose ``nn.Linear`` layers
  the trainer swaps for structured ones (the spec's include/exclude patterns, else
  :attr:`Workload.candidate_patterns`, choose which); the built-in workloads also take an optional
  *linear factory* ``linear_factory(in_features, out_features, bias=True) -> nn.Module``;
* :meth:`Workload.forward` / :meth:`Workload.loss` -- one training step's maths;
* :meth:`Workload.evaluate` -- metrics on a split, always with ``"quality"`` (higher is better).

Workloads are registered under a name with :func:`register_workload` and built with
:func:`get_workload`, which passes keyword options to the workload's constructor; a name may
also reference a user's class (``module:Class``, ``file.py:Class``, an entry point; see
``_plugins`` and docs/workloads.md).
"""
from __future__ import annotations

import abc
import dataclasses
import fnmatch
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

__all__ = [
    "MissingFiles",
    "LinearFactory",
    "DataSplits",
    "Workload",
    "register_workload",
    "get_workload",
    "workload_names",
    "move_to_device",
    "make_loader",
]

class MissingFiles(ValueError):
    """A workload's data or weights are not where its options say (on this machine).  A study
    spec is validated where it is written, often not where its trials run: this one error is
    left to the trials, every other constructor error is the spec's."""


#: ``linear_factory(in_features, out_features, bias=True) -> nn.Module``; ``nn.Linear`` fits.
LinearFactory = Callable[..., nn.Module]

SPLIT_NAMES = ("train", "val", "test")


def move_to_device(batch: Any, device: Optional[torch.device]) -> Any:
    """``batch`` (a tensor, or a tuple/list/dict of them, nested) with every tensor on ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def share_of(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    """(start, size) of rank ``rank``'s contiguous share of ``total`` samples split among
    ``world_size`` ranks in rank order, sizes differing by at most one."""
    base, extra = divmod(int(total), int(world_size))
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class ShardedBatchSampler:
    """The batches of ``batches`` (a batch sampler), each cut to rank ``rank``'s share
    (:func:`share_of`); where that share is empty (a last batch smaller than the world), the
    batch's first index, which the rank counts with weight 0.  The ranks of a data-parallel
    trial then read and collate only their own samples of each global batch."""

    def __init__(self, batches: BatchSampler, rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, int(rank), int(world_size)

    def __iter__(self):
        for indices in self.batches:
            start, size = share_of(len(indices), self.rank, self.world_size)
            yield indices[start:start + size] if size else indices[:1]

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    drop_last: bool = False,
    num_workers: int = 0,
    collate_fn: Optional[Callable[[list], Any]] = None,
    shard: Optional[Tuple[int, int]] = None,
) -> DataLoader:
    """A DataLoader over ``dataset``.  A :class:`TensorDataset` with the default collation is read
    a whole batch at a time (one gather per tensor, where the default reads every sample with its
    own ``__getitem__`` and stacks them: 8-16% of a digits trial's training time).  Same
    sampler, so the same batches in the same order, with the same values; a batch is a tuple.
    ``shard`` = (rank, world size): each batch is that rank's share of the batch the loader gives
    without it (:class:`ShardedBatchSampler`), only those samples read and collated."""
    whole_batches = collate_fn is None and isinstance(dataset, TensorDataset)
    if whole_batches or shard is not None:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        batches = BatchSampler(sampler, int(batch_size), drop_last)
        if shard is not None:
            batches = ShardedBatchSampler(batches, *shard)
        # the loader keeps the generator too: each pass draws its base seed from it before the
        # sampler's permutation, as the default loader does
        if whole_batches:
            return DataLoader(dataset, batch_size=None, sampler=batches, generator=generator,
                              num_workers=num_workers)
        return DataLoader(dataset, batch_sampler=batches, generator=generator, num_workers=num_workers,
                          collate_fn=collate_fn)
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=shuffle, generator=generator,
                      drop_last=drop_last, num_workers=num_workers, collate_fn=collate_fn)


@dataclasses.dataclass
class DataSplits:
    """The three splits of a workload's data, and how to batch them.

    ``collate_fn`` is ``None`` for the default collation (tuples of stacked tensors).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    collate_fn: Optional[Callable[[list], Any]] = None

    def __getitem__(self, split: str) -> Dataset:
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(SPLIT_NAMES)}")
        return getattr(self, split)

    def sizes(self) -> Dict[str, int]:
        return {name: len(self[name]) for name in SPLIT_NAMES}

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: Optional[int] = None,
        drop_last: bool = False,
        num_workers: int = 0,
        shard: Optional[Tuple[int, int]] = None,
    ) -> DataLoader:
        """A DataLoader over ``split``; with ``shuffle`` the order is fixed by ``seed``; ``shard``
        = (rank, world size): each batch is that rank's share of the one-process batch
        (:func:`make_loader`)."""
        generator = None
        if shuffle and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        return make_loader(self[split], batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                           num_workers=num_workers, collate_fn=self.collate_fn, shard=shard)


class Workload(abc.ABC):
    """A named task: data, model, loss and quality metric (the public contract: docs/workloads.md).

    Subclasses set the class attributes below, implement :meth:`load_data`, :meth:`build_model`
    and :meth:`example_batch`, and keep or override the classification defaults of
    :meth:`forward` (``model(batch[0])``), :meth:`loss` (cross-entropy on ``batch[1]``) and
    :meth:`evaluate` (accuracy).  Constructor options are keyword-only and validated on entry
    (a ``ValueError`` naming the option).
    """

    name: str = ""  # set by @register_workload
    #: fnmatch patterns of the qualified names of the layers built through the linear factory.
    candidate_patterns: Tuple[str, ...] = ()
    default_epochs: int = 10
    default_batch_size: int = 64
    default_lr: float = 1e-3
    default_weight_decay: float = 0.0
    #: whether fine-tune mode's ``distill`` term applies (False: the loss already is distillation)
    supports_distill: bool = True
    # lr schedule of the dense pre-training and of trials that leave lr_schedule unset
    default_lr_schedule: str = "constant"
    #: training samples run through the dense model to measure each layer's inputs for
    #: ``budget_allocation: activation`` (sequence workloads use fewer: every token is a row)
    calibration_samples: int = 2048
    #: True when :meth:`build_model` returns trained weights (a checkpoint): fine-tuning then
    #: starts from it instead of from a dense model the trainer pre-trains and caches.
    pretrained: bool = False

    # -- data -----------------------------------------------------------------------------
    @abc.abstractmethod
    def load_data(self, seed: int = 0) -> DataSplits:
        """Train/val/test splits; the same ``seed`` always gives the same disjoint splits, none
        of them empty (a trial selects on val and only records test)."""

    @abc.abstractmethod
    def example_batch(self, batch_size: int = 2, seed: int = 0) -> Any:
        """A small synthetic batch in the format of the loaders' batches (no data files read)."""

    # -- model ----------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The dense model, freshly initialised (the trainer seeds torch first) or with trained
        weights (:attr:`pretrained`).  Called without arguments; the built-in workloads also take
        ``linear_factory`` and build every candidate linear layer with it."""

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's output on ``batch`` (what :meth:`loss` takes)."""
        return model(batch[0])

    def loss(self, model_output: torch.Tensor, batch: Any) -> torch.Tensor:
        """The scalar training loss."""
        return nn.functional.cross_entropy(model_output, batch[1])

    def distillation_loss(self, model_output: torch.Tensor, teacher_output: torch.Tensor,
                          batch: Any, temperature: float) -> torch.Tensor:
        """How far ``model_output`` is from the dense teacher's output on the same batch (the
        fine-tune mode's ``distill`` term): for logits over the last axis, the KL divergence of
        the student's from the teacher's softened distribution, times temperature^2 (Hinton et
        al. 2015), averaged over every prediction (sample, or token of a sequence)."""
        t = float(temperature)
        classes = model_output.shape[-1]
        student = nn.functional.log_softmax(model_output.reshape(-1, classes) / t, dim=-1)
        teacher = nn.functional.log_softmax(teacher_output.reshape(-1, classes).detach() / t, dim=-1)
        return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t

    # -- metrics --------------------------------------------------------------------------
    def evaluate(
        self,
        model: nn.Module,
        split: Dataset,
        *,
        batch_size: Optional[int] = None,
        device: Optional[torch.device] = None,
        collate_fn: Optional[Callable[[list], Any]] = None,
    ) -> Dict[str, float]:
        """Metrics of ``model`` on ``split``; always has ``"quality"`` (higher is better).  Here:
        classification, ``{"quality": accuracy, "accuracy": ..., "loss": mean cross-entropy}`` of
        :meth:`forward`'s logits against ``batch[1]``."""
        loader = self._loader_for_eval(split, batch_size, collate_fn)
        return classification_metrics(self, model, loader, device)

    # -- cost accounting ------------------------------------------------------------------
    @property
    def tokens_per_sample(self) -> int:
        """How many tokens (rows) each token-wise linear layer processes per sample (1 here).

        Exact for every candidate layer of MLPs, ViTs and transformers.  Models whose layers
        see different counts (MLP-Mixer's token-mixing layers) are described exactly by
        :meth:`layer_tokens_per_sample`, which the cost accounting uses.
        """
        return 1

    def nonlinear_flops_per_sample(self, model: nn.Module) -> int:
        """Multiply-adds per sample that no linear structure changes (attention scores and the
        attention-weighted sum); counted in both a model's cost and its dense cost.  0 here."""
        return 0

    def layer_tokens_per_sample(self, model: nn.Module) -> Dict[str, float]:
        """Qualified name -> rows processed per sample, for every module with ``in_features``.

        Measured with forward hooks on :meth:`example_batch`, so it holds for any layer type
        (``nn.Linear`` or a structured drop-in); the per-sample FLOPs of a layer are its
        per-token FLOPs times this number.
        """
        batch_size = 2
        counts: Dict[str, float] = {}
        handles = []
        for name, module in model.named_modules():
            in_features = getattr(module, "in_features", None)
            if not isinstance(in_features, int) or name == "":
                continue

            def hook(mod, inputs, output, name=name, in_features=in_features):
                rows = inputs[0].numel() // in_features
                counts[name] = counts.get(name, 0.0) + rows / batch_size

            handles.append(module.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                self.forward(model, self.example_batch(batch_size))
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return counts

    def candidate_layer_names(self, model: nn.Module) -> List[str]:
        """Qualified names in ``model`` that match :attr:`candidate_patterns`."""
        return [
            name
            for name, _ in model.named_modules()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.candidate_patterns)
        ]

    def options(self) -> Dict[str, Any]:
        """The resolved constructor options (JSON-able), for trial records."""
        return dict(getattr(self, "_options", {}))

    def __repr__(self) -> str:
        opts = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{type(self).__name__}(name={self.name!r}{', ' if opts else ''}{opts})"

    # -- helpers for subclasses -----------------------------------------------------------
    def _loader_for_eval(
        self, split: Dataset, batch_size: Optional[int], collate_fn: Optional[Callable]
    ) -> DataLoader:
        return make_loader(split, int(batch_size or self.default_batch_size), collate_fn=collate_fn)


def attention_flops(layers: int, tokens: int, width: int) -> int:
    """Multiply-adds per sample of softmax attention: Q K^T and A V, each tokens^2 * width."""
    return 2 * int(layers) * int(tokens) ** 2 * int(width)


def classification_metrics(
    workload: Workload,
    model: nn.Module,
    loader: DataLoader,
    device: Optional[torch.device],
) -> Dict[str, float]:
    """``{"quality": accuracy, "accuracy": ..., "loss": mean cross-entropy}`` over ``loader``."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    try:
        with torch.no_grad():
            for batch in loader:
                batch = move_to_device(batch, device)
                logits = workload.forward(model, batch)  # (B, classes)
                labels = batch[1]
                loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(dim=-1) == labels).sum().item()
                total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("cannot evaluate on an empty split")
    accuracy = correct / total
    return {"quality": accuracy, "accuracy": accuracy, "loss": loss_sum / total}


class ClassificationWorkload(Workload):
    """Base for image/feature classification: batches are ``(inputs, labels)`` (the defaults of
    :class:`Workload`)."""


_WORKLOADS: Dict[str, Type[Workload]] = {}


def register_workload(name: str) -> Callable[[Type[Workload]], Type[Workload]]:
    """Class decorator: register a :class:`Workload` subclass under ``name``."""

    def decorator(cls: Type[Workload]) -> Type[Workload]:
        if name in _WORKLOADS and _WORKLOADS[name] is not cls:
            raise ValueError(f"workload {name!r} is already registered")
        cls.name = name
        _WORKLOADS[name] = cls
        return cls

    return decorator


def get_workload(name: str, **options: Any) -> Workload:
    """The workload ``name`` names (a registered name, or a reference to a user's class:
    ``module.path:ClassName``, ``path/to/file.py:ClassName`` or an entry-point name; see
    ``_plugins``), constructed with ``options``."""
    from ._plugins import is_builtin, plugin_name, resolve_workload

    cls = resolve_workload(name)
    accepted = [
        param.name
        for param in inspect.signature(cls).parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"workload {name!r} has no option {unknown[0]!r}; "
            f"its options are: {', '.join(accepted) or '(none)'}"
        )
    workload = cls(**options)
    if not is_builtin(name):
        workload.name = plugin_name(cls)
    return workload


def workload_names() -> List[str]:
    return sorted(_WORKLOADS)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or a ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_fractions(name: str, value: Sequence[float]) -> Tuple[float, float, float]:
    """Three positive split fractions summing to 1."""
    try:
        fractions = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (train, val, test), got {value!r}") from None
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"{name} must be three positive fractions summing to 1, got {value!r}")
    return fractions  # type: ignore[return-value]


def record_options(workload: Workload, options: Mapping[str, Any]) -> None:
    workload._options = dict(options)  # type: ignore[attr-defined]
