"""From a study spec and an Optuna trial to a :class:`TrialConfig` (define-by-run sampling).

Parameter names in the study: ``family``, ``seed`` (when several seeds are listed: the driver
runs each proposed configuration under every seed, see ``_replicates``), and per
family ``<family>.<knob>`` / ``<family>.options.<name>`` for every knob given as choices or a
range.  Fixed values are not parameters; they are part of the config recorded with each trial.
Families are arms of one study: the driver picks the family with the fewest distinct
configurations run so far (balanced allocation) and the sampler chooses that family's knobs.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from ..trainer import TrialConfig
from ..trainer._trial import family_option_names, gblr_fit_options
from ._spec import Choices, Range, StudySpec, WorkloadSpec

__all__ = ["suggest", "trial_config", "space_size", "config_errors", "workload_errors", "family_configurations"]


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
    config = _workload_config(spec, family, seed, device)
    config["family_options"] = options
    config.update(knobs)  # a family may override lr / weight_decay
    return TrialConfig(**config)


def _workload_config(spec: StudySpec, family: str, seed: int, device: str) -> Dict[str, Any]:
    workload = spec.workload
    return dict(
        workload=workload.name,
        workload_options=dict(workload.options),
        family=family,
        family_options={},
        include=workload.include,
        exclude=list(workload.exclude),
        mode=workload.mode,
        epochs=workload.epochs,
        batch_size=workload.batch_size,
        lr=workload.lr,
        weight_decay=workload.weight_decay,
        lr_schedule=workload.lr_schedule,
        warmup_epochs=workload.warmup_epochs,
        seed=seed,
        device=device,
        precision=spec.precision,
    )


def _values(param) -> list:
    if isinstance(param, Choices):
        return list(param.choices)
    if isinstance(param, Range):
        return [int(param.low), int(param.high)] if param.int else [param.low, param.high]
    return [param]


def config_errors(spec: StudySpec) -> List[str]:
    """``families.<family>.<knob>: <what is wrong>`` for every knob value the trainer would
    refuse (an unknown budget_control, distill outside [0, 1] or in scratch mode, ...), so a
    study fails before it starts, not at the trial that samples the value.  Every value of each
    knob is tried alone (the other knobs at their first value; ranges at both ends), then with the
    values of each other knob that passed alone -- all of a categorical knob's, a numeric knob's
    smallest and largest (the trainer's checks involve at most two fields at once, and its
    two-field numeric checks are orderings) -- so a knob with many choices costs a linear, not
    quadratic, number of tries."""
    errors: List[str] = []
    seen = set()
    for family, space in spec.families.items():
        knobs = {knob: _values(getattr(space, knob)) for knob in type(space).model_fields
                 if knob != "options" and getattr(space, knob) is not None}
        known = family_option_names(family, spec.workload.mode,
                                    [m for m in knobs.get("fit_method", ["greedy"]) if isinstance(m, str)])
        for option in sorted(set(space.options) - set(known)):
            errors.append(f"families.{family}.options.{option}: unknown option of {family} in "
                          f"{spec.workload.mode} mode; known: {', '.join(known) or 'none'}")
        base = _workload_config(spec, family, spec.workload.seeds[0], "cpu")
        base.update({knob: values[0] for knob, values in knobs.items()})
        names = list(knobs)

        def attempt(tried, values) -> bool:
            try:
                TrialConfig(**{**base, **values})
                return True
            except (ValueError, TypeError) as error:
                for message in str(error).split("; "):
                    if message not in seen:  # a bad first value fails every knob's tries
                        seen.add(message)
                        errors.append(f"{_blamed(message, knobs, tried, family)}: {message}")
                return False

        passed = {knob: [value for value in _distinct(knobs[knob]) if attempt(knob, {knob: value})]
                  for knob in names}
        paired = {knob: [v for v in _pair_values(passed[knob]) if repr(v) != repr(knobs[knob][0])]
                  for knob in names}
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                for a in paired[first]:
                    for b in paired[second]:
                        attempt(second, {first: a, second: b})
        errors += _workload_refusals(spec, family, knobs)
    return errors


def _pair_values(values: list) -> list:
    """The values of a knob worth pairing with another knob's: every non-numeric one, and the
    smallest and largest number."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    others = [v for v in values if not (isinstance(v, (int, float)) and not isinstance(v, bool))]
    ends = _distinct([min(numbers), max(numbers)]) if numbers else []
    return others + ends


#: Most layers built to check a study's family option values (each a from_dense fit); beyond it,
#: the remaining values are left to the trials.
MAX_OPTION_BUILDS = 5_000


def workload_errors(spec: StudySpec) -> List[str]:
    """What the workload refuses before any trial runs: its options' values (its constructor's
    own checks: ``workload.options: ...``) and include/exclude patterns that select no linear
    layer, which would fail every trial (``workload.include: ...``; the model is built on the
    meta device: no memory, no weights).  Data or weights that are not on this machine
    (:class:`MissingFiles`: a cluster study validated on a laptop) are left to the trials.

    A user's workload (``module:Class``, ``file.py:Class``, an entry point) is always built, and
    an exception its constructor or ``build_model`` raises is an error naming ``workload.name``
    (or ``workload.options`` for a ``ValueError``/``TypeError`` of the constructor) and the
    user's file:line."""
    from ..workloads import MissingFiles, get_workload, resolve_workload
    from ..workloads._plugins import one_line, is_builtin, located

    workload_spec = spec.workload
    plugin = not is_builtin(workload_spec.name)
    cls = resolve_workload(workload_spec.name)
    where = (lambda error: located(error, cls)) if plugin else (lambda error: "")
    try:
        workload = get_workload(workload_spec.name, **workload_spec.options)
    except MissingFiles:
        return []
    except (ValueError, TypeError) as error:
        return [f"workload.options: {error}{where(error)}"]
    except Exception as error:  # noqa: BLE001 - only a user's constructor gets here
        if not plugin:
            raise
        return [f"workload.name: constructing {workload_spec.name!r} raised "
                f"{one_line(error)}{where(error)}"]
    with_options = any(space.options for space in spec.families.values())
    if not plugin and workload_spec.include is None and not workload_spec.exclude and not with_options:
        return []
    try:
        model = _built_on_meta(workload)
    except MissingFiles:
        return []
    except Exception as error:  # noqa: BLE001 - not buildable on the meta device
        if not plugin:
            return []  # the trial checks it
        try:
            model = workload.build_model()  # a user's model may need real tensors to build
        except MissingFiles:
            return []
        except Exception as error:  # noqa: BLE001 - the user's code, shown in one line
            return [f"workload.name: {workload_spec.name!r}: build_model() raised "
                    f"{one_line(error)}{where(error)}"]
    if plugin and not isinstance(model, torch.nn.Module):
        return [f"workload.name: {workload_spec.name!r}: build_model() returned {type(model).__name__}, "
                f"expected a torch.nn.Module"]
    return _layer_errors(spec, workload, model, plugin)


def _built_on_meta(workload):
    import warnings

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pre-trained weights loaded onto meta tensors: a no-op
        return workload.build_model()


def _layer_errors(spec: StudySpec, workload, model, plugin: bool) -> List[str]:
    """The include/exclude patterns leave a linear layer, and the families' options fit it."""
    from ..structured import matching_linears

    workload_spec = spec.workload
    include = workload_spec.include if workload_spec.include is not None else list(workload.candidate_patterns)
    targets = matching_linears(model, include, workload_spec.exclude)
    if targets:
        smallest = min((layer for _, layer in targets), key=lambda layer: layer.in_features * layer.out_features)
        return _family_option_errors(spec, smallest)
    names = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    where = "include" if workload_spec.include is not None else "exclude"
    hint = ""
    if plugin and workload_spec.include is None:
        where = "include"
        hint = (f" (set workload.include in the spec, or candidate_patterns on "
                f"{type(workload).__name__})")
    return [f"workload.{where}: no linear layer of {workload_spec.name!r} is left by include={include} "
            f"exclude={workload_spec.exclude}; its linear layers: {shown or 'none'}{hint}"]


def _family_option_errors(spec: StudySpec, shape) -> List[str]:
    """``families.<family>.options.<name>: ...`` for option values the family refuses, found by
    building the family's layer the way a trial does, on a random layer of the smallest matched
    shape, at each budget the space gives (choices, or a range's ends): a value refused there at
    every budget fails every trial.  Each value is tried with the other options at their first;
    a family that cannot be built there even without options is left alone.  At most
    MAX_OPTION_BUILDS layers are built in all; values beyond that are left to the trials."""
    import torch

    from ..structured import GBLRLinear, get_family

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape.out_features, shape.in_features, generator=generator) / shape.in_features ** 0.5
    bias = torch.zeros(shape.out_features) if shape.bias is not None else None
    errors: List[str] = []
    builds = [0]
    for family, space in spec.families.items():
        if not space.options or family == "dense":
            continue
        if space.budget_allocation is not None and set(_values(space.budget_allocation)) != {"uniform"}:
            continue  # per-layer budgets differ from the family's: the trials say
        # largest first: an option that fits some budget mostly fits the largest, so an accepted
        # value costs one build, and a refused one a build per budget
        budgets = sorted(_distinct([float(b) for b in _values(space.budget)]), reverse=True)
        methods = _distinct(_values(space.fit_method) if space.fit_method is not None else ["greedy"])
        cls = get_family(family)

        def build(options, budget, method):
            builds[0] += 1
            if builds[0] > MAX_OPTION_BUILDS:
                raise _OutOfBuilds
            if family == "gblr" and spec.workload.mode == "scratch":
                return GBLRLinear(shape.in_features, shape.out_features, bias=bias is not None, sigma=1.0, **options)
            if family == "gblr":
                return GBLRLinear.from_dense(weight, bias, budget=budget, method=method, seed=0,
                                             **gblr_fit_options(method, options))
            return cls.from_dense(weight, bias, budget=budget, **options)

        def refusal(options):
            """The error at the largest budget when ``options`` fail at every budget (and fit
            method), else None: a value refused only at some budgets fails those trials alone, as
            the search expects."""
            error = None
            for budget in budgets:
                for method in methods:
                    try:
                        build(options, budget, method)
                        return None
                    except (ValueError, TypeError) as failed:
                        error = error or failed
            return error

        try:
            if refusal({}) is not None:
                continue  # not an options problem: the trials report it
        except Exception:  # noqa: BLE001 - idem
            continue
        values = {name: _distinct(_values(param)) for name, param in space.options.items()}
        first = {name: vs[0] for name, vs in values.items()}
        for name, vs in values.items():
            for value in vs:
                try:
                    error = refusal({**first, name: value})
                except _OutOfBuilds:
                    return errors
                if error is not None:
                    errors.append(f"families.{family}.options.{name}: {value!r} is refused by {family} at "
                                  f"every budget (tried on a {shape.out_features}x{shape.in_features} layer): "
                                  f"{error}")
                    break
    return errors


class _OutOfBuilds(Exception):
    """MAX_OPTION_BUILDS reached: the option values not yet tried are left to the trials."""


def _blamed(message: str, knobs, tried: str, family: str) -> str:
    """Where a trainer message points in the spec: the family knob it starts with (its messages
    name their field first), else the workload setting it starts with, else the knob whose value
    was being tried."""
    first = message.split(" ", 1)[0]
    if first in knobs:
        return f"families.{family}.{first}"
    if first in WorkloadSpec.model_fields:
        return f"workload.{first}"
    return f"families.{family}.{tried}"


def _workload_refusals(spec: StudySpec, family: str, knobs) -> List[str]:
    """Knob values the workload itself refuses (the trainer's checks cannot know them)."""
    from ..workloads import resolve_workload

    workload = resolve_workload(spec.workload.name)
    if not workload.supports_distill and any(float(v) > 0 for v in knobs.get("distill", [])
                                             if isinstance(v, (int, float))):
        return [f"families.{family}.distill: workload {spec.workload.name!r} trains by distillation "
                f"already (its loss); leave distill at 0"]
    return []


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


def family_configurations(spec: StudySpec, family: str, *, device: str = "cpu",
                          limit: int = 20_000):
    """Every distinct configuration of a finite ``family`` space as (Optuna params, config
    digest) pairs -- what the driver enqueues when the sampler keeps proposing configurations
    already run -- or None where a knob is a range or the space has more than ``limit``."""
    import itertools

    import optuna

    size = space_size(spec, family)
    if size is None or size > limit:
        return None
    space = spec.families[family]
    axes = [("family", [family])]
    for knob in type(space).model_fields:
        value = getattr(space, knob) if knob != "options" else None
        if isinstance(value, Choices) and len(value.choices) > 1:
            axes.append((f"{family}.{knob}", _distinct(value.choices)))
    for name, value in space.options.items():
        if isinstance(value, Choices) and len(value.choices) > 1:
            axes.append((f"{family}.options.{name}", _distinct(value.choices)))
    if len(spec.workload.seeds) > 1:
        axes.append(("seed", _distinct(spec.workload.seeds)))
    names = [name for name, _ in axes]
    configurations = []
    for values in itertools.product(*(choices for _, choices in axes)):
        params = dict(zip(names, values))
        config = trial_config(spec, optuna.trial.FixedTrial(params), device=device)
        configurations.append((params, config.digest()))
    return configurations


def _distinct(choices) -> list:
    seen, out = set(), []
    for choice in choices:
        if repr(choice) not in seen:
            seen.add(repr(choice))
            out.append(choice)
    return out

