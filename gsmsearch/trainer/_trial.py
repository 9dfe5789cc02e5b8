"""One trial: build the workload's model with the configured structure, train it, measure it."""
from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..structured import (
    BudgetTooSmall,
    ProjectFlops,
    ProjectMeanWidth,
    ProximalOnly,
    SigmaSchedule,
    StopShrinkingAtTarget,
    StructuredLinear,
    allocate_budgets,
    export,
    get_family,
    matching_linears,
    model_cost,
    replace_linears,
    save_structure,
    set_module,
    set_sigma,
)
from ..workloads import get_workload, move_to_device
from ..workloads._plugins import user_code_error
from ._calibration import activation_weighted, cached_input_moments
from ._config import TrialConfig, resolve_precision
from ._dense_cache import cached_dense_state
from ._fit_cache import cached_gblr_fit
from ._distributed import RankStopped
from ._loop import EpochReport, TrainingLoop, TrialFailed, seed_everything

__all__ = ["TrialResult", "run_trial", "build_trial_model", "layer_budgets", "measure_latency", "TrialStopped",
           "epoch_watch"]


class TrialStopped(Exception):
    """Raised at an epoch boundary by an :func:`epoch_watch` callback when the trial is to stop
    early (a pruner's decision); ``epoch`` is the last epoch trained, ``reason`` why."""

    def __init__(self, reason: str, epoch: int) -> None:
        super().__init__(reason)
        self.reason, self.epoch = reason, int(epoch)

    def __reduce__(self):
        return type(self), (self.reason, self.epoch)


_WATCH = threading.local()


@contextlib.contextmanager
def epoch_watch(callback: Callable[[Dict[str, Any]], None]):
    """Within the block, every :func:`run_trial` of this thread calls ``callback`` with each epoch's
    report (as a dict: ``epoch``, ``val``, ...) once the epoch's checkpoint is written -- first
    for the epochs a resumed trial restored from its checkpoint, then for each epoch it trains.
    The callback may raise :class:`TrialStopped` to end the trial there (a Ray worker uses this
    to report progress to the driver and to honour its stop requests)."""
    outer = getattr(_WATCH, "callback", None)
    _WATCH.callback = callback
    try:
        yield
    finally:
        _WATCH.callback = outer


@dataclass
class TrialResult:
    """What one trial measured (all JSON-able through :meth:`to_dict`)."""

    config: Dict[str, Any]
    # the workload's quality metric (higher is better) on the validation split: the objective a
    # study selects on.  The test split is measured once, at the end, and never chooses anything.
    quality: float
    val_quality: float  # the same value as quality, under a name that says its split
    test_quality: Optional[float]  # the quality metric on the test split (None if not finite)
    test_metrics: Dict[str, Optional[float]]  # every test metric of the workload (None if not finite)
    flops_per_sample: int  # multiply-adds, linear layers + the workload's non-linear costs
    dense_flops_per_sample: int
    relative_flops: float  # flops_per_sample / dense_flops_per_sample
    relative_linear_flops: float  # structured + dense linear layers only
    structured_relative_flops: float  # the structured layers only (what `budget` targets), per sample
    params: int  # of the exported (deployed) model
    dense_params: int
    latency_ms: Optional[float]  # exported model, median per batch of latency_batch samples
    dense_latency_ms: Optional[float]
    train_seconds: float
    epochs_run: int
    layers: Dict[str, Dict[str, Any]]  # per structured layer: family, flops, live components, ...
    curves: List[Dict[str, Any]] = field(default_factory=list)
    # the values the trial actually used where the config says "default" (None): batch size,
    # learning rates, weight decay, budget anneal, sigma schedule -- so a result stays readable
    # if the defaults change
    resolved: Dict[str, Any] = field(default_factory=dict)
    # training throughput: training samples per second of training steps (validation excluded),
    # over the epochs this trial trained (a resumed trial's restored epochs included)
    samples_per_second: Optional[float] = None
    # peak memory: on a GPU the most memory torch allocated on it during the trial
    # (torch.cuda.max_memory_allocated, "cuda_max_allocated"); on a CPU the worker process's
    # peak resident set size since it started (getrusage ru_maxrss, "process_peak_rss")
    peak_memory_bytes: Optional[int] = None
    peak_memory_kind: Optional[str] = None
    precision: str = "fp32"  # the training arithmetic
    world_size: int = 1  # processes training the trial

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        latency = "" if self.latency_ms is None else (
            f", latency {self.latency_ms:.2f} ms vs dense {self.dense_latency_ms:.2f} ms"
        )
        return (
            f"{self.config['workload']} / {self.config['family']} @ budget {self.config['budget']}: "
            f"quality (val) {self.quality:.4f}, test quality {_shown(self.test_quality)}, relative FLOPs "
            f"{self.relative_flops:.3f} (linear {self.relative_linear_flops:.3f}), params "
            f"{self.params}/{self.dense_params}, {self.epochs_run} epochs in {self.train_seconds:.1f}s{latency}"
        )


def _shown(value: Optional[float]) -> str:
    return "not finite" if value is None else f"{value:.4f}"


def _finite_or_none(metrics: Dict[str, float]) -> Dict[str, Optional[float]]:
    return {k: float(v) if math.isfinite(v) else None for k, v in metrics.items()}


# scratch-mode width lr: the method's ViT-B setting (method.md section 5).  Against its small-model
# setting, 5e-3, on 20-30 epoch runs 5e-4 is better on validation on all three tasks tested (Mixer
# +2.5, ViT +2.0 test points on average over 3 seeds; digits within one image), bench/RESULTS.md "What did not help".
SCRATCH_STRUCTURE_LR = 5e-4


def _precision(config: TrialConfig) -> str:
    """The trial's precision on its device (``auto`` resolved); TrialFailed where the device
    cannot run it (fp16 on a CPU)."""
    try:
        return resolve_precision(config.precision, config.device)
    except ValueError as error:
        raise TrialFailed(str(error)) from None


def _resolved(config: TrialConfig, workload) -> Dict[str, Any]:
    epochs = int(config.epochs)
    gblr = config.family == "gblr"
    sigma_init = config.sigma_init if config.mode == "scratch" else None
    return {
        "batch_size": int(config.batch_size or workload.default_batch_size),
        "lr": float(config.lr if config.lr is not None else workload.default_lr),
        "lr_schedule": config.lr_schedule or workload.default_lr_schedule,
        "weight_decay": float(
            config.weight_decay if config.weight_decay is not None else workload.default_weight_decay
        ),
        "sigma": SigmaSchedule(
            sigma_init,
            config.sigma_final,
            start_epoch=config.sigma_start_epoch if config.sigma_start_epoch is not None else epochs / 4,
            end_epoch=config.sigma_end_epoch if config.sigma_end_epoch is not None else epochs,
        ) if gblr else None,
        "anneal": (config.budget_anneal_epochs if config.budget_anneal_epochs is not None
                   else epochs / 2 if config.mode == "scratch" else 0.0),
        "structure_lr": (config.structure_lr if config.structure_lr is not None
                         else SCRATCH_STRUCTURE_LR if config.mode == "scratch" else 0.0),
        "precision": _precision(config),
    }


def _resolved_record(config: TrialConfig, resolved: Dict[str, Any],
                     shares: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    record = {key: resolved[key] for key in ("batch_size", "lr", "weight_decay", "lr_schedule", "precision")}
    if config.warmup_epochs:
        record["warmup_epochs"] = float(config.warmup_epochs)
    record["distill"] = float(config.distill)
    if config.distill > 0:
        record["distill_temperature"] = float(config.distill_temperature)
    if config.family != "dense":
        record["budget_allocation"] = config.budget_allocation
        if shares is not None:
            record["layer_budgets"] = {name: float(share) for name, share in shares.items()}
    if config.family == "gblr":
        sigma = resolved["sigma"]
        record.update({
            "structure_lr": float(resolved["structure_lr"]),
            "budget_anneal_epochs": float(resolved["anneal"]),
            "sigma_schedule": None if sigma is None or sigma.sigma_init is None else
            [sigma.sigma_init, sigma.sigma_final, float(sigma.start_epoch), float(sigma.end_epoch)],
        })
    return record


def _pretrain_recipe(workload) -> Dict[str, Any]:
    return {
        "epochs": workload.default_epochs,
        "batch_size": workload.default_batch_size,
        "lr": workload.default_lr,
        "weight_decay": workload.default_weight_decay,
        "lr_schedule": workload.default_lr_schedule,
    }


def dense_state(workload, *, seed: int, device: str = "cpu", cache_dir=None, precision: str = "fp32") -> dict:
    """The trained dense model of ``workload`` (from the cache, trained once if absent), trained
    at ``precision`` (the trial's: fp32, bf16 or fp16).

    The key includes the device type (a GPU's kernels give other weights than the CPU's), the
    precision where it is not fp32 and, on CPU, torch's thread count: training with 2 threads
    gives different weights than with 1 (reduction order), so a cache filled by a process with
    other settings would silently change the start point."""
    recipe = _pretrain_recipe(workload)
    recipe["device"] = torch.device(device).type
    if recipe["device"] == "cpu":
        recipe["cpu_threads"] = torch.get_num_threads()
    if precision != "fp32":  # fp32 keys are those of a recipe without the entry
        recipe["precision"] = precision

    def train() -> nn.Module:
        seed_everything(seed)
        model = workload.build_model()
        if getattr(workload, "pretrained", False):
            return model  # a pre-trained checkpoint is the dense model
        splits = workload.load_data(seed=seed)
        TrainingLoop(
            workload, model, splits, epochs=recipe["epochs"], batch_size=recipe["batch_size"],
            lr=recipe["lr"], weight_decay=recipe["weight_decay"], seed=seed, device=device,
            lr_schedule=recipe["lr_schedule"], precision=precision,
        ).run()
        return model

    if getattr(workload, "pretrained", False):
        return {k: v for k, v in train().state_dict().items()}
    return cached_dense_state(workload, seed=seed, recipe=recipe, train=train, cache_dir=cache_dir)


def layer_budgets(config: TrialConfig, workload, model: nn.Module, splits=None, *,
                  cache_dir=None) -> Dict[str, float]:
    """The budget of every layer ``config`` structures in ``model`` (the dense model, trained
    weights loaded) under ``config.budget_allocation``: ``uniform``, ``global`` (by the dense
    weights' spectra) or ``activation`` (by the spectra of W C^{1/2}, C the second moment of the
    layer's inputs over calibration batches of the training split, ``_calibration``, cached in
    ``cache_dir``; ``splits`` is loaded when not given and the moments are not cached)."""
    include = config.include if config.include is not None else list(workload.candidate_patterns)
    targets = matching_linears(model, include, config.exclude)
    if config.budget_allocation == "uniform":
        return {name: float(config.budget) for name, _ in targets}
    weights = {name: linear.weight for name, linear in targets}
    if config.budget_allocation == "activation":
        model.to(config.device)
        moments = cached_input_moments(model, targets, workload,
                                       lambda: splits if splits is not None else workload.load_data(seed=config.seed),
                                       seed=config.seed, device=config.device, cache_dir=cache_dir,
                                       samples=workload.calibration_samples,
                                       batch_size=workload.default_batch_size)
        model.to("cpu")
        weights = {name: activation_weighted(linear.weight, moments[name]) for name, linear in targets}
    return share_budget(config.family, targets, weights, config.budget,
                        tokens=workload.layer_tokens_per_sample(model), family_options=config.family_options)


def share_budget(family: str, targets, weights: Dict[str, Any], budget: float, *,
                 tokens: Dict[str, float], family_options: Dict[str, Any]) -> Dict[str, float]:
    """``budget`` shared among ``targets`` ((name, nn.Linear) pairs) by ``weights`` (name -> the
    matrix whose spectrum decides its share), each layer at least ``family``'s smallest budget for
    its shape; ``tokens``: name -> tokens per sample (1 when absent)."""
    least = {}
    for name, linear in targets:
        shape = (linear.out_features, linear.in_features)
        if shape not in least:
            least[shape] = family_min_budget(family, *shape, **family_options)
    return allocate_budgets(weights, float(budget),
                            tokens={name: float(tokens.get(name, 1.0)) for name, _ in targets},
                            min_fractions={name: least[(linear.out_features, linear.in_features)]
                                           for name, linear in targets})


def family_min_budget(family: str, out_features: int, in_features: int, **options) -> float:
    """The cheapest budget ``family.from_dense`` accepts for an (out x in) layer (0 if any):
    asked of the family itself, with a zero weight and a vanishing budget."""
    if family == "gblr":
        return 0.0  # any budget: fewer or shorter components
    if family == "dense":
        return 1.0
    try:
        get_family(family).from_dense(torch.zeros(out_features, in_features), None, budget=1e-9,
                                      **options)
    except BudgetTooSmall as error:
        return error.cheapest_fraction
    return 0.0


def build_trial_model(config: TrialConfig, workload, *, cache_dir=None) -> nn.Module:
    """The workload's model with its candidate layers replaced by ``config.family``.

    - scratch: a randomly initialised dense model; GBLR layers start at the dense cost (the
      method's init) and shrink during training; hand-crafted families start as the projection
      of that random dense init onto their structure at ``budget``.
    - finetune: the cached trained dense model; every family starts from ``from_dense`` of the
      trained weights at ``budget`` (GBLR: ``fit_method``), every layer at ``budget`` or at its
      share of it (``budget_allocation: global``, :func:`layer_budgets`).
    """
    return _build_trial_model(config, workload, cache_dir=cache_dir)[0]


def gblr_fit_options(method: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` less the fit knobs of the other fit methods: a study searching ``fit_method``
    may set each method's knobs (``steps`` for reference, ``refit_passes`` for greedy), and each
    trial's fit takes its own method's."""
    from ..structured._gblr_fit import FIT_OPTIONS

    others = {name for m, knobs in FIT_OPTIONS.items() if m != method for name in knobs}
    return {k: v for k, v in options.items() if k not in others or k in FIT_OPTIONS.get(method, {})}


def family_option_names(family: str, mode: str, fit_methods=("greedy",)) -> List[str]:
    """The ``family_options`` names a trial of ``family`` in ``mode`` accepts -- those of the call
    :func:`build_trial_model` passes them to, less what the trainer sets itself (for a study
    spec's checks: option values are checked when the trial builds its layers)."""
    import inspect

    from ..structured._gblr_fit import FIT_OPTIONS

    if family == "dense":
        return []
    cls = get_family(family)
    scratch_gblr = family == "gblr" and mode == "scratch"
    call = cls.__init__ if scratch_gblr else cls.from_dense
    set_by_trainer = {"self", "cls", "in_features", "out_features", "weight", "bias", "budget",
                      "method", "seed"} | ({"sigma"} if scratch_gblr else set())
    names = {p.name for p in inspect.signature(call).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - set_by_trainer
    if family == "gblr" and not scratch_gblr:
        for method in fit_methods:
            names |= set(FIT_OPTIONS.get(method, {}))
    return sorted(names)


def _build_trial_model(config: TrialConfig, workload, *, cache_dir=None, splits=None):
    """(model, per-layer budgets or None) -- see :func:`build_trial_model`."""
    seed_everything(config.seed)
    model = workload.build_model()
    if config.mode == "finetune":
        model.load_state_dict(dense_state(workload, seed=config.seed, device=config.device,
                                          cache_dir=cache_dir, precision=_precision(config)))
    if config.family == "dense":
        return model, None
    get_family(config.family)  # a clear error for an unknown family before any work
    include = config.include if config.include is not None else list(workload.candidate_patterns)
    options = dict(config.family_options)
    budget = config.budget
    whole: List[str] = []
    shares = None
    if config.budget_allocation != "uniform":
        shares = layer_budgets(config, workload, model, splits, cache_dir=cache_dir)
        budget = lambda name, linear: shares[name]  # noqa: E731
        # a layer given its whole dense cost stays dense (exact; no family fits better there)
        whole = [name for name, share in shares.items() if share >= 1.0 - 1e-9]
        replace_linears(model, "dense", include=whole)
    if config.family == "gblr":
        if config.mode == "scratch":
            replaced = replace_linears(model, "gblr", include=include, exclude=config.exclude,
                                       from_dense=False, sigma=config.sigma_init, **options)
        else:
            # the greedy fit is the slow part of a fine-tune trial's start: cached on disk
            targets = matching_linears(model, include, config.exclude)
            options = gblr_fit_options(config.fit_method, options)
            for name, linear in targets:
                set_module(model, name, cached_gblr_fit(
                    linear.weight, linear.bias, cache_dir=cache_dir,
                    budget=budget(name, linear) if callable(budget) else budget,
                    method=config.fit_method, seed=config.seed, **options))
            replaced = [name for name, _ in targets]
    else:
        replaced = replace_linears(model, config.family, include=include, exclude=config.exclude,
                                   budget=budget, **options)
    if not replaced and not whole:
        raise TrialFailed(
            f"no linear layer matched include={include} exclude={config.exclude} in workload "
            f"{workload.name!r}"
        )
    return model, shares


def _teacher(config: TrialConfig, workload, cache_dir) -> nn.Module:
    """The frozen dense model the fine-tuned model distills from (the cached fine-tune start)."""
    teacher = workload.build_model()
    teacher.load_state_dict(dense_state(workload, seed=config.seed, device=config.device,
                                        cache_dir=cache_dir, precision=_precision(config)))
    teacher.eval().requires_grad_(False)
    batch = workload.example_batch(2, seed=config.seed)
    try:
        with torch.no_grad():
            out = workload.forward(teacher, batch)
            workload.distillation_loss(out, out, batch, config.distill_temperature)
    except NotImplementedError as error:
        raise TrialFailed(f"distill={config.distill} is not available on {workload.name!r}: {error}") from None
    return teacher


def _controller(config: TrialConfig):
    """The GBLR layers' step after each optimizer step: the proximal step (threshold ``lam`` times
    the structure lr, clamp, wrap) always, then the budget projection ``budget_control`` names
    (``none``: the proximal step alone)."""
    if config.family != "gblr":
        return None
    if config.budget_control == "none":
        return ProximalOnly()
    if config.budget_control == "project-flops":
        return ProjectFlops(1.0)  # the target follows the budget schedule
    if config.budget_control == "project-mean-width":
        return ProjectMeanWidth(config.target_mean_width)
    return StopShrinkingAtTarget(config.target_mean_width)


def deployed_params(model: nn.Module) -> int:
    """Parameters of a deployed model: a module with ``num_params()`` (structured layers, exported
    GBLR plans) counts itself that way; every other parameter counts once."""
    total = 0
    counted = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in counted):
            continue
        if hasattr(module, "num_params") and module is not model:
            total += int(module.num_params())
            counted.add(name + ".")
            continue
        total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def _devices(*objects) -> set:
    """The devices of the tensors in ``objects``: modules' parameters and buffers, tensors, and
    lists, tuples and dicts of them (a batch)."""
    devices = set()
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            devices.add(obj.device)
        elif isinstance(obj, nn.Module):
            devices.update(t.device for t in obj.parameters())
            devices.update(t.device for t in obj.buffers())
        elif isinstance(obj, dict):
            devices |= _devices(*obj.values())
        elif isinstance(obj, (list, tuple)):
            devices |= _devices(*obj)
    return devices


def device_synchronizer(devices) -> Callable[[], None]:
    """A function that waits until every kernel queued on the CUDA devices among ``devices`` has
    finished (``torch.cuda.synchronize`` of each); a no-op when none is a CUDA device (CPU work
    is done when the call returns)."""
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    if not cuda:
        return lambda: None

    def synchronize() -> None:
        for device in cuda:
            torch.cuda.synchronize(device)

    return synchronize


def measure_latency(model: nn.Module, batch, forward: Callable, repeats: int = 7, warmup: int = 2, *,
                    synchronize: Optional[Callable[[], None]] = None,
                    clock: Callable[[], float] = time.perf_counter) -> float:
    """Median wall time in ms of ``forward(model, batch)`` under no_grad, over ``repeats`` timed
    runs after ``warmup`` untimed ones.

    Each timed run starts once the device is idle and ends once its work has finished: on a GPU
    ``forward`` returns when its kernels are queued, so the device is synchronised before the
    clock is read at both ends (``synchronize``; default: :func:`device_synchronizer` of the
    model's and the batch's devices, a no-op on a CPU)."""
    if int(repeats) < 1 or int(warmup) < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    sync = synchronize if synchronize is not None else device_synchronizer(_devices(model, batch))
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(int(warmup)):
            forward(model, batch)
        for _ in range(int(repeats)):
            sync()  # nothing of an earlier run still queued
            started = clock()
            forward(model, batch)
            sync()  # this run's kernels done
            times.append((clock() - started) * 1e3)
    return statistics.median(times)


def _latency_batch(workload, splits, size: int, device: str):
    """The first ``size`` validation samples: latency is an objective a study may select on, so
    its inputs (a sequence batch's padded length, say) come from the validation split too."""
    loader = splits.loader("val", size, shuffle=False)
    return move_to_device(next(iter(loader)), device)


def folder_problem(path) -> Optional[str]:
    """Why ``path`` cannot be a folder to write in (None when it can): it exists and is not a
    folder, or the nearest folder on its way is a file or not writable.  Nothing is created.
    Checked for a trial's checkpoint folder and a study's workdir before anything is written."""
    import os

    path = Path(path)
    if path.exists():
        if not path.is_dir():
            return "exists and is not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else "the folder is not writable"
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot create it, {ancestor} is a file, not a folder"
    return None if os.access(ancestor, os.W_OK | os.X_OK) else f"cannot create it, {ancestor} is not writable"


def run_trial(
    config: TrialConfig,
    *,
    on_epoch: Optional[Callable[[EpochReport], Optional[bool]]] = None,
    checkpoint_dir: Optional[Path] = None,
    cache_dir: Optional[Path] = None,
    structure_path: Optional[Path] = None,
    parallel=None,
) -> Optional[TrialResult]:
    """Train and measure one configuration; raises :class:`TrialFailed` with a reason.

    Which data decides what: the model trains on the training split (and the activation
    calibration reads it; the dense start and a distillation teacher are trained on it too); the
    per-epoch reports, ``quality`` (the objective), the latency batch and whether the trial fails
    come from the validation split; the test split is evaluated once, on the deployed model, and
    only recorded (``test_quality``, ``test_metrics``).

    ``structure_path``: also save the trained model (learned structure included) there, in the
    format of :func:`gsmsearch.structured.save_structure`.

    ``parallel``: this process's :class:`~._distributed.DataParallel` rank in a data-parallel
    trial (``_distributed``): every rank builds the model (the dense, calibration and fit caches
    are filled once, under their file locks, and read by the others), joins the trial's process group and
    trains its share; rank 0 alone reports epochs (``on_epoch``, :func:`epoch_watch`), measures
    the trained model and returns the result, with ``world_size`` and ``samples_per_second``
    over all ranks; the other ranks return None.

    An exception raised inside a user's workload code (``module:Class``, ``file.py:Class``, an
    entry point) is raised as a :class:`~gsmsearch.workloads.WorkloadCodeError` whose one-line
    message starts with the user's ``file:line`` (what the driver records as the failure reason)."""
    try:
        return _run_trial(config, on_epoch=on_epoch, checkpoint_dir=checkpoint_dir, cache_dir=cache_dir,
                          structure_path=structure_path, parallel=parallel)
    except (TrialFailed, TrialStopped, RankStopped):
        raise
    except Exception as error:
        located = user_code_error(error, config.workload)
        if located is None:
            raise
        raise located from error


def _run_trial(config: TrialConfig, *, on_epoch, checkpoint_dir, cache_dir, structure_path,
               parallel=None) -> Optional[TrialResult]:
    workload = get_workload(config.workload, **config.workload_options)
    resolved = _resolved(config, workload)
    splits = workload.load_data(seed=config.seed)
    teacher = _teacher(config, workload, cache_dir) if config.distill > 0 else None
    model, shares = _build_trial_model(config, workload, cache_dir=cache_dir, splits=splits)
    tokens = workload.layer_tokens_per_sample(model)
    anneal = resolved["anneal"]
    budget = float(config.budget)

    def budget_schedule(epoch: float) -> float:
        if anneal <= 0:
            return budget
        return budget + (1.0 - budget) * max(0.0, 1.0 - epoch / anneal)

    if parallel is None:
        return _train_and_measure(config, workload, resolved, splits, teacher, model, shares, tokens,
                                  budget_schedule, on_epoch=on_epoch, checkpoint_dir=checkpoint_dir,
                                  structure_path=structure_path, parallel=None)
    parallel.start(config.device)
    try:
        return _train_and_measure(config, workload, resolved, splits, teacher, model, shares, tokens,
                                  budget_schedule, on_epoch=on_epoch if parallel.rank == 0 else None,
                                  checkpoint_dir=checkpoint_dir, structure_path=structure_path, parallel=parallel)
    finally:
        parallel.close()


def _train_and_measure(config, workload, resolved, splits, teacher, model, shares, tokens, budget_schedule, *,
                       on_epoch, checkpoint_dir, structure_path, parallel) -> Optional[TrialResult]:
    loop = TrainingLoop(
        workload, model, splits,
        epochs=int(config.epochs), batch_size=resolved["batch_size"], lr=resolved["lr"],
        weight_decay=resolved["weight_decay"], structure_lr=resolved["structure_lr"], lam=config.lam,
        controller=_controller(config), sigma_schedule=resolved["sigma"],
        budget_schedule=budget_schedule, seed=config.seed, device=config.device,
        checkpoint_path=Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None,
        # the resolved precision too: "auto" means another precision on another device
        checkpoint_tag=config.digest() + ("" if resolved["precision"] == "fp32" else f"-{resolved['precision']}"),
        layer_tokens=tokens,
        lr_schedule=resolved["lr_schedule"], warmup_epochs=float(config.warmup_epochs),
        teacher=teacher, distill=float(config.distill), distill_temperature=float(config.distill_temperature),
        precision=resolved["precision"],
        parallel=parallel,
    )
    # data-parallel: rank 0 reports (and hears the driver's stop requests)
    watch = getattr(_WATCH, "callback", None) if parallel is None or parallel.rank == 0 else None
    cuda = torch.device(config.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(config.device)
    restored_epochs = (lambda: [watch(dict(restored)) for restored in list(loop.curves)]) if watch else None
    if parallel is not None:  # a stop rank 0 hears here holds for every rank
        parallel.agree(restored_epochs)
    elif restored_epochs is not None:
        restored_epochs()

    def epoch_done(report: EpochReport) -> Optional[bool]:
        if watch is not None:
            watch(report.to_dict())  # may raise TrialStopped
        return on_epoch(report) if on_epoch is not None else None

    curves = loop.run(epoch_done)
    if parallel is not None:
        if parallel.rank != 0:
            return None  # rank 0 measures the trained model (the same parameters, bit for bit)
        parallel.close()

    # The deployed model: exact masks, exported to its mask-free execution plan.
    set_sigma(model, None)
    model.eval()
    if structure_path is not None:
        Path(structure_path).parent.mkdir(parents=True, exist_ok=True)
        save_structure(model, structure_path, extra_metadata={"config": config.to_dict()})
    deployed = export(model)
    collate = splits.collate_fn
    with loop.autocast():  # evaluated as trained (an exported GBLR plan runs in its own dtype)
        val = workload.evaluate(deployed, splits.val, device=config.device, collate_fn=collate)
    if not all(math.isfinite(v) for v in val.values()):
        raise TrialFailed(f"non-finite validation metrics of the deployed model: {val}")
    # measured, never acted on: a trial is kept or failed by its validation metrics alone
    with loop.autocast():
        test = _finite_or_none(workload.evaluate(deployed, splits.test, device=config.device, collate_fn=collate))

    extra = getattr(workload, "nonlinear_flops_per_sample", lambda m: 0)
    cost = model_cost(model, tokens=lambda name: tokens.get(name, 1), extra_flops=extra)
    dense_model = workload.build_model()
    latency = dense_latency = None
    if config.measure_latency:
        batch = _latency_batch(workload, splits, config.latency_batch, config.device)
        latency = measure_latency(deployed, batch, workload.forward)
        dense_latency = measure_latency(dense_model.to(config.device), batch, workload.forward)
    layers = {
        name: module.structure_summary()
        for name, module in model.named_modules()
        if isinstance(module, StructuredLinear)
    }
    return TrialResult(
        config=config.to_dict(),
        quality=float(val["quality"]),
        val_quality=float(val["quality"]),
        test_quality=test["quality"],
        test_metrics=test,
        flops_per_sample=int(cost.total),
        dense_flops_per_sample=int(cost.dense_total),
        relative_flops=float(cost.relative),
        relative_linear_flops=float(cost.relative_linear),
        structured_relative_flops=float(loop.relative_flops()),
        # what is deployed: the exported model (dead components dropped, intervals cropped),
        # structured layers counted by their own num_params() (no execution padding)
        params=deployed_params(deployed),
        dense_params=sum(p.numel() for p in dense_model.parameters()),
        latency_ms=latency,
        dense_latency_ms=dense_latency,
        train_seconds=loop.train_seconds,
        epochs_run=len(curves),
        layers=layers,
        curves=curves,
        resolved=_resolved_record(config, resolved, shares),
        samples_per_second=_throughput(curves),
        **_peak_memory(config.device if cuda else None),
        precision=resolved["precision"],
        world_size=parallel.world_size if parallel is not None else 1,
    )


def _throughput(curves: List[Dict[str, Any]]) -> Optional[float]:
    """Training samples per second of training steps over the epoch reports ``curves``."""
    samples = sum(int(c.get("samples") or 0) for c in curves)
    seconds = sum(float(c.get("step_seconds") or 0.0) for c in curves)
    return samples / seconds if samples and seconds > 0 else None


def _peak_memory(cuda_device: Optional[str]) -> Dict[str, Any]:
    """{"peak_memory_bytes", "peak_memory_kind"}: see :class:`TrialResult`."""
    if cuda_device is not None:
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(cuda_device)),
                "peak_memory_kind": "cuda_max_allocated"}
    try:
        import resource
        import sys
    except ImportError:  # pragma: no cover - not a POSIX system
        return {"peak_memory_bytes": None, "peak_memory_kind": None}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_bytes": int(peak if sys.platform == "darwin" else peak * 1024),
            "peak_memory_kind": "process_peak_rss"}
