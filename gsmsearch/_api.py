"""The Python API for notebooks and scripts: compress a model, apply a trial's structure, save and
load a structured model.  Studies are launched with :func:`gsmsearch.search.launch` (a path, a
dict or a ``StudySpec``); see docs/python-api.md.

Everything here reuses what a study's trials use: the same surgery (``replace_linears``), the
same budget sharing (``allocate_budgets`` with each family's cheapest budget as the floor), the
same calibration (``input_second_moments``) and the same structure files (``save_structure``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["ALLOCATION_CHOICES", "compress", "layer_shares", "apply_structure", "structure_file", "save", "load"]

ALLOCATION_CHOICES = ("uniform", "global", "activation")

Patterns = Union[str, Sequence[str]]


def _call_model(model: nn.Module, batch: Any):
    """The model on one calibration batch: ``model(**batch)`` for a dict, ``model(*batch)`` for
    a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class _CalibrationWorkload:
    """What ``input_second_moments`` asks of a workload, for a user's model and batches."""

    def __init__(self, forward: Callable[[nn.Module, Any], Any]) -> None:
        self.forward = forward


class _CalibrationSplits:
    """What ``input_second_moments`` asks of a workload's splits: the user's batches as the
    training loader (each batch counts as one sample, so every batch is read)."""

    def __init__(self, batches: Iterable) -> None:
        self.batches = batches

    def loader(self, split: str, batch_size: int, shuffle: bool = False):
        return iter(self.batches)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def layer_shares(
    model: nn.Module,
    family: str,
    budget: float,
    *,
    include: Patterns = "*",
    exclude: Optional[Patterns] = None,
    calibration: Optional[Iterable] = None,
    allocation: str = "uniform",
    tokens: Optional[Mapping[str, float]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    **family_options,
) -> Dict[str, float]:
    """The budget (fraction of its dense FLOPs) :func:`compress` gives each matching layer of
    ``model``; nothing is changed.  See :func:`compress` for the arguments."""
    from .structured import get_family, matching_linears
    from .trainer._calibration import activation_weighted, input_second_moments
    from .trainer._trial import share_budget

    if allocation not in ALLOCATION_CHOICES:
        raise ValueError(f"allocation must be one of {ALLOCATION_CHOICES}, got {allocation!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")
    get_family(family)  # an unknown family is named before any work
    if allocation == "activation" and calibration is None:
        raise ValueError("allocation='activation' needs calibration=: an iterable of input batches "
                         "(the layers' input statistics decide the shares)")
    targets = matching_linears(model, include, exclude or ())
    if not targets:
        raise ValueError(f"no nn.Linear of the model matches include={include!r} exclude={exclude!r}")
    if allocation == "uniform":
        return {name: float(budget) for name, _ in targets}
    weights = {name: linear.weight for name, linear in targets}
    if allocation == "activation":
        moments = input_second_moments(
            model, targets, _CalibrationWorkload(forward or _call_model), _CalibrationSplits(calibration),
            samples=math.inf, batch_size=1, device=_model_device(model))
        weights = {name: activation_weighted(linear.weight, moments[name]) for name, linear in targets}
    return share_budget(family, targets, weights, budget, tokens=dict(tokens or {}), family_options=family_options)


def compress(
    model: nn.Module,
    *,
    family: str,
    budget: float,
    include: Patterns = "*",
    exclude: Optional[Patterns] = None,
    calibration: Optional[Iterable] = None,
    allocation: str = "uniform",
    tokens: Optional[Mapping[str, float]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    **family_options,
) -> nn.Module:
    """Replace ``model``'s matching ``nn.Linear`` layers (in place) by layers of ``family`` fitted
    to their dense weights (``from_dense``), the budget shared as a study's fine-tune trial shares
    it; returns ``model``, ready to fine-tune.

    Args:
        family: a registered family (``gsmsearch.structured.family_names()``).
        budget: the structured layers' FLOPs as a fraction of their dense FLOPs, in (0, 1].
        include, exclude: fnmatch patterns of qualified layer names (``"blocks.*.mlp.*"``).
        allocation: ``uniform`` (every layer at ``budget``), ``global`` (by the dense weights'
            spectra) or ``activation`` (by the spectra of W C^{1/2}, C the second moment of the
            layer's inputs over ``calibration``); a layer given its whole dense cost stays dense
            (a ``DenseLinear``).
        calibration: an iterable of input batches (tensor: ``model(x)``; tuple or list:
            ``model(*x)``; dict: ``model(**x)``, its ``attention_mask`` skipping padding), read
            once; required by ``activation``.  ``forward(model, batch)`` overrides the call.
        tokens: layer name -> rows the layer processes per sample (default 1): weighs each
            layer's cost when the budget is shared.
        family_options: passed to ``from_dense`` (``rank=``, ``num_blocks=``, ...).
    """
    from .structured import replace_linears, set_module

    shares = layer_shares(model, family, budget, include=include, exclude=exclude, calibration=calibration,
                          allocation=allocation, tokens=tokens, forward=forward, **family_options)
    originals = {name: model.get_submodule(name) for name in shares}
    whole = [name for name, share in shares.items() if share >= 1.0 - 1e-9]
    structured = [name for name in shares if name not in whole]
    try:
        if whole:
            replace_linears(model, "dense", include=whole)
        if structured:
            replace_linears(model, family, include=structured, budget=lambda name, linear: shares[name],
                            **family_options)
    except BaseException:
        for name, linear in originals.items():  # a layer that cannot be fitted leaves the model as it was
            set_module(model, name, linear)
        raise
    return model


# -- a trial's structure ------------------------------------------------------------------------

Source = Union[str, Path, Tuple[str, str, int]]


def structure_file(source: Source, *, workdir: Union[str, Path, None] = None) -> Path:
    """The structure file ``source`` names: a path, or (storage URL, study name, trial number) of a
    finished trial, its file under the study's ``structures`` folder (recorded in the study at
    launch; ``workdir``: the study's workdir, where it was moved).  A duplicate (a proposal that
    realised the model of an earlier trial, ``duplicate_of``) names that trial's file."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such structure file")
        return path
    if not (isinstance(source, tuple) and len(source) == 3):
        raise TypeError(f"source must be a path or (storage, study, trial_number), got {source!r}")
    storage, study_name, number = source
    import optuna

    from .search import open_storage

    study = optuna.load_study(study_name=str(study_name), storage=open_storage(str(storage), must_exist=True))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(int(number))
    if trial is None:
        raise ValueError(f"study {study_name!r} has no trial {number}")
    if trial.user_attrs.get("duplicate_of") is not None:  # its model is the one that trial trained
        number = int(trial.user_attrs["duplicate_of"])
        trial = trials[number]
    if trial.state.name != "COMPLETE":
        raise ValueError(f"trial {number} of study {study_name!r} is {trial.state.name}, not COMPLETE: "
                         f"it has no learned structure")
    if workdir is not None:
        folder = Path(workdir) / "structures"
    elif "structures_dir" in study.user_attrs:
        folder = Path(study.user_attrs["structures_dir"])
    else:
        raise ValueError(f"study {study_name!r} does not record its structures folder; "
                         f"give workdir= (the study's workdir)")
    path = folder / f"trial-{int(number)}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no structure file for trial {number} of study {study_name!r}")
    _check_trial_file(path, trial.user_attrs.get("config_digest"), f"trial {number} of study {study_name!r}")
    return path


def _check_trial_file(path: Path, digest: Optional[str], trial_label: str) -> None:
    """``path`` was written by the trial whose configuration has ``digest`` (a file of another
    study under the same workdir, or of an older run of the same name, is refused)."""
    from .structured._serialize import read_metadata
    from .trainer import TrialConfig

    recorded = read_metadata(path)["extra"].get("config")
    written_by = TrialConfig.from_dict(recorded).digest() if recorded else None
    if digest is not None and written_by != digest:
        raise ValueError(f"{path} was not written by {trial_label} (its configuration differs: another "
                         f"study's file under the same workdir?)")


def apply_structure(model: nn.Module, source: Source, *, workdir: Union[str, Path, None] = None) -> nn.Module:
    """Give ``model`` (a fresh instance of the trial's architecture, dense layers and all) the
    learned structure and weights of a trial, in place, and put it in eval mode; returns it.

    ``source``: a structure file (``save_structure``'s format, what trials write), or (storage
    URL, study name, trial number), see :func:`structure_file`.  For inference, export it:
    ``gsmsearch.structured.export(model)``."""
    from .structured import load_structure

    model = load_structure(model, structure_file(source, workdir=workdir))
    return model.eval()


# -- saving a structured model ------------------------------------------------------------------

def save(model: nn.Module, path: Union[str, Path], *, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model``'s structure and weights to ``path`` (one safetensors file: every tensor,
    and each structured layer's qualified name, family and constructor config in its metadata);
    no code is pickled.  Returns the path.  Load it with :func:`load`.

    ``dtype`` (e.g. ``torch.bfloat16``): the weights stored in that dtype (half the file of
    float32), the GBLR widths and locations kept float32 (exact intervals); :func:`load` gives
    back a model in the stored dtypes."""
    from .structured import save_structure
    from .structured._export import ExportedGBLR

    exported = [name for name, module in model.named_modules() if isinstance(module, ExportedGBLR)]
    if exported:
        raise ValueError(f"layer {exported[0]!r} is an exported execution plan: save the model before "
                         f"export() (a plan is rebuilt from it by export() after load())")
    path = Path(path)
    save_structure(model, path, dtype=dtype)
    return path


def load(path: Union[str, Path], model: Union[nn.Module, Callable[[], nn.Module], None] = None, *,
         export: bool = False) -> nn.Module:
    """The model saved at ``path`` by :func:`save` (or a trial's structure file), in eval mode.

    ``model``: the architecture, an instance (dense layers are fine; its layers are replaced in
    place) or a function that builds one; not needed for a single saved layer.  ``export=True``
    returns the inference copy (``gsmsearch.structured.export``)."""
    from .structured import export as export_model
    from .structured import load_structure
    from .structured._serialize import read_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    layers = read_metadata(path)["layers"]
    if model is None and list(layers) != [""]:
        raise ValueError(f"{path} holds a whole model: pass model= (an instance of its architecture "
                         f"or a function that builds one)")
    if model is not None and not isinstance(model, nn.Module):
        model = model()
    loaded = load_structure(model if model is not None else nn.Identity(), path).eval()
    return export_model(loaded) if export else loaded
