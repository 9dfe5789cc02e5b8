"""Seeds as replicates: a configuration is trained once under every seed the spec lists.

With ``workload.seeds: [0, 1, 2]`` the sampler proposes a configuration (its family, its knobs
and one of the seeds); the driver then queues the same knob values under each other seed, so
every configuration the study explores is measured over all its seeds and the dashboard can
show its mean and spread.  Without this, a sampler that treats the seed as one more parameter
would run most configurations under one seed and could favour a lucky seed.

A replicate is queued only when its configuration has not run (completed, failed for good or
running) and is not already waiting in the queue, so queueing is idempotent: a resumed study, a
re-enqueued trial or a finite space's own enumeration never runs a replicate twice.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping

from ..trainer import TrialConfig
from ._space import trial_config
from ._spec import StudySpec

__all__ = ["replicate_params", "waiting_params"]


def _params_key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted((str(k), repr(v)) for k, v in params.items()))


def waiting_params(trials: Iterable) -> set:
    """Keys of the fixed parameters of the study's WAITING (queued) trials."""
    keys = set()
    for t in trials:
        if t.state.name == "WAITING":
            keys.add(_params_key(t.system_attrs.get("fixed_params", {})))
    return keys


def replicate_params(spec: StudySpec, params: Mapping[str, Any], *, known: Mapping[str, Any],
                     waiting: set, device: str = "cpu") -> List[Dict[str, Any]]:
    """The parameters to queue so that the configuration of ``params`` (a trial's sampled
    parameters, ``seed`` among them) runs under every seed of the spec: one dict per listed seed
    other than ``params['seed']`` whose configuration digest is not in ``known`` (run or
    running) and whose parameters are not in ``waiting`` (see :func:`waiting_params`).  Empty
    when the spec lists one seed."""
    import optuna

    seeds = spec.workload.seeds
    if len(seeds) < 2 or "seed" not in params:
        return []
    out = []
    for seed in seeds:
        if seed == params["seed"]:
            continue
        sibling = {**params, "seed": seed}
        if _params_key(sibling) in waiting:
            continue
        config = trial_config(spec, optuna.trial.FixedTrial(sibling), device=device)
        if TrialConfig.from_dict(config.to_dict()).digest() in known:
            continue
        out.append(sibling)
    return out
