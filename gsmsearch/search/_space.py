"""From a study spec and an Optuna trial to a :class:`TrialConfig` (define-by-run sampling).

Parameter names in the study: ``family``, ``seed`` (when several seeds are listed), and per
family ``<family>.<knob>`` / ``<family>.options.<name>`` for every knob given as choices or a
range.  Fixed values are not parameters; they are part of the config recorded with each trial.
Families are arms of one study: the driver picks the family with the fewest trials so far
(balanced allocation) and the sampler chooses that family's knobs.
"""
from __future__ import annotations

from typing import Any, Dict

from ..trainer import TrialConfig
from ._spec import Choices, Range, StudySpec

__all__ = ["suggest", "trial_config", "space_size"]


def suggest(trial, name: str, param) -> Any:
    """Sample ``param`` (fixed value, Choices or Range) on ``trial`` under ``name``."""
    if isinstance(param, Choices):
        if len(param.choices) == 1:
            return param.choices[0]
        return trial.suggest_categorical(name, list(param.choices))
    if isinstance(param, Range):
        if param.int:
            return trial.suggest_int(name, int(param.low), int(param.high), log=param.log,
                                     step=int(param.step or 1))
        return trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)
    return param


def trial_config(spec: StudySpec, trial, *, device: str = "cpu") -> TrialConfig:
    """The configuration of ``trial``: its family (already fixed on the trial by the driver, or
    sampled), that family's sampled knobs, and the workload's fixed settings."""
    families = list(spec.families)
    family = trial.suggest_categorical("family", families)
    space = spec.families[family]
    knobs: Dict[str, Any] = {}
    for knob in type(space).model_fields:
        if knob == "options":
            continue
        value = getattr(space, knob)
        if value is not None:
            knobs[knob] = suggest(trial, f"{family}.{knob}", value)
    options = {name: suggest(trial, f"{family}.options.{name}", p) for name, p in space.options.items()}
    seeds = spec.workload.seeds
    seed = seeds[0] if len(seeds) == 1 else trial.suggest_categorical("seed", list(seeds))
    workload = spec.workload
    config = dict(
        workload=workload.name,
        workload_options=dict(workload.options),
        family=family,
        family_options=options,
        include=workload.include,
        exclude=list(workload.exclude),
        mode=workload.mode,
        epochs=workload.epochs,
        batch_size=workload.batch_size,
        lr=workload.lr,
        weight_decay=workload.weight_decay,
        seed=seed,
        device=device,
    )
    config.update(knobs)  # a family may override lr / weight_decay
    return TrialConfig(**config)


def space_size(spec: StudySpec, family: str):
    """How many distinct configurations ``family`` has in ``spec`` (None if a knob is a range)."""
    space = spec.families[family]
    size = len(spec.workload.seeds)
    params = [getattr(space, knob) for knob in type(space).model_fields if knob != "options"]
    params += list(space.options.values())
    for param in params:
        if isinstance(param, Range):
            return None
        if isinstance(param, Choices):
            size *= len(set(map(repr, param.choices)))
    return size
