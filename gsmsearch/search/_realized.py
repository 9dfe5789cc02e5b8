"""The model a configuration realises, known before any training: what the driver deduplicates on.

Different knob values can build the same model: a low-rank layer takes the largest rank whose
cost fits its budget, so every budget between two rank steps gives the same rank, the same
initial factors (the same SVD of the same weights) and the same training.  The *realised key* of a
configuration is its config digest with the budget, and the family options that only choose the
structure, replaced by the structure of every layer the configuration replaces; everything else
that changes the trained model (workload and its options, include/exclude, mode, seed, epochs,
batch size, learning rates, schedules, distillation, the family's fitting options) stays in it.
Two configurations with the same realised key train the same model.

Per family, for the uniform allocation (every layer at ``budget``), the structure is computed from
the layer shapes alone, exactly as the family's ``from_dense`` chooses it:

- ``lowrank``: the rank of each layer (``rank`` option, or the largest that fits);
- ``blockdiag``, ``monarch``: the number of blocks;
- ``blast``: the number of blocks and the rank;
- ``blocklowrank`` and ``blocksparse``: ``from_dense`` picks among candidate structures ((blocks,
  rank) pairs; (block size, butterfly size, low-rank rank) triples) by their approximation error
  on the weights.  The candidates, in order, depend on the shape and budget alone, and the
  weights on the workload, mode and seed (in the key): the same candidates give the same choice.
  The key holds the candidate list (a single candidate is the structure itself);
- ``dense``: no structure; budget, allocation and family options are not read.

Not deduplicated beyond the config digest (``realized_key`` returns None):

- ``gblr``: its structure is not a function of the budget before training.  From scratch the
  widths and locations are learned: the proximal step and the FLOP projection move them every
  step towards targets that are continuous in the budget (the annealed schedule included).  In
  fine-tuning the initial structure is fitted to the trained dense weights (the greedy fit spends
  the budget along their spectrum; the reference fit projects the mean width onto it), so which
  budgets give the same fit is known only after fitting;
- ``budget_allocation: global`` / ``activation``: each layer's budget is a share computed from the
  trained dense weights (and activations), known only once the dense model is trained;
- a family a plugin registered, a family option no family function knows, a workload whose model
  cannot be built on the meta device, and a configuration its family refuses (the trial reports
  why).

The layer shapes come from the workload's model built on the meta device (no memory, no
weights), once per workload, options and include/exclude.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ..trainer import TrialConfig

__all__ = ["Realizer", "realized_structure", "STRUCTURAL_OPTIONS", "KEYED_FAMILIES"]

#: Per family: the options that only choose the structure (replaced by it in the key), and the
#: options that change the fit of a chosen structure (kept in the key as they are).
STRUCTURAL_OPTIONS: Dict[str, Tuple[frozenset, frozenset]] = {
    "lowrank": (frozenset({"rank"}), frozenset()),
    "blockdiag": (frozenset({"num_blocks"}), frozenset()),
    "monarch": (frozenset({"num_blocks"}), frozenset()),
    "blocklowrank": (frozenset({"num_blocks", "rank"}), frozenset()),
    "blocksparse": (frozenset({"block_size", "butterfly_size", "lowrank_rank"}), frozenset({"num_iters"})),
    "blast": (frozenset({"num_blocks", "rank"}), frozenset({"num_iters", "seed"})),
}
#: The families whose structure is known before training (and "dense", which has none).
KEYED_FAMILIES = tuple(STRUCTURAL_OPTIONS) + ("dense",)

Structure = Dict[str, Any]


class NotRealizable(Exception):
    """The structure of a configuration is not known before training (see the module docstring)."""


def _lowrank(in_features: int, out_features: int, budget: float, *, rank=None) -> Structure:
    from ..structured._common import check_int, fits, no_fit_error
    from ..structured._lowrank import LowRankLinear

    if rank is None:
        rank = LowRankLinear.max_rank(budget, in_features, out_features)
        if rank < 1:
            raise no_fit_error("lowrank", budget, in_features, out_features, in_features + out_features,
                               "layer (rank 1)")
    else:
        rank = check_int("rank", rank, 1, min(in_features, out_features))
        if not fits(rank * (in_features + out_features), budget, in_features, out_features):
            raise ValueError(f"rank={rank} does not fit budget={budget}")
    return {"rank": int(rank)}


def _blockdiag(in_features: int, out_features: int, budget: float, *, num_blocks=None) -> Structure:
    from ..structured._blockdiag import block_diagonal_flops
    from ..structured._common import check_int, fits, no_fit_error

    most = min(in_features, out_features)
    if num_blocks is None:
        num_blocks = next((b for b in range(1, most + 1)
                           if fits(block_diagonal_flops(in_features, out_features, b), budget, in_features,
                                   out_features)), None)
        if num_blocks is None:
            raise no_fit_error("blockdiag", budget, in_features, out_features,
                               block_diagonal_flops(in_features, out_features, most), "layer")
    else:
        num_blocks = check_int("num_blocks", num_blocks, 1, most)
        if not fits(block_diagonal_flops(in_features, out_features, num_blocks), budget, in_features,
                    out_features):
            raise ValueError(f"num_blocks={num_blocks} does not fit budget={budget}")
    return {"num_blocks": int(num_blocks)}


def _monarch(in_features: int, out_features: int, budget: float, *, num_blocks=None) -> Structure:
    from ..structured._monarch import monarch_num_blocks

    return {"num_blocks": int(monarch_num_blocks(in_features, out_features, budget, num_blocks))}


def _blocklowrank(in_features: int, out_features: int, budget: float, *, num_blocks=None,
                  rank=None) -> Structure:
    """The (num_blocks, rank) candidates ``BlockLowRankLinear.from_dense`` scores, in its order."""
    from ..structured._blocklowrank import blocklowrank_candidates

    candidates = blocklowrank_candidates(in_features, out_features, budget, num_blocks, rank)
    if len(candidates) == 1:
        return {"num_blocks": candidates[0][0], "rank": candidates[0][1]}
    return {"candidates": [list(c) for c in candidates]}


def _blocksparse(in_features: int, out_features: int, budget: float, *, block_size=None,
                 butterfly_size=None, lowrank_rank=None) -> Structure:
    """The (block_size, butterfly_size, lowrank_rank) candidates ``BlockSparseLinear.from_dense``
    scores (its own enumeration)."""
    from ..structured._blocksparse_linear import BlockSparseLinear
    from ..structured._common import no_fit_error

    candidates = BlockSparseLinear._candidates(in_features, out_features, budget, block_size,
                                               butterfly_size, lowrank_rank)
    if not candidates:
        raise no_fit_error("blocksparse", budget, in_features, out_features, 0, "layer")
    if len(candidates) == 1:
        (bs, bf, rank), = candidates
        return {"block_size": int(bs), "butterfly_size": int(bf), "lowrank_rank": int(rank)}
    return {"candidates": [[int(bs), int(bf), int(rank)] for bs, bf, rank in candidates]}


def _blast(in_features: int, out_features: int, budget: float, *, num_blocks=None, rank=None) -> Structure:
    from ..structured._blast import blast_flops
    from ..structured._common import check_int, fits, no_fit_error

    most = min(in_features, out_features)

    def largest_rank(b: int) -> int:
        r = min(most, int(budget * in_features * out_features // (in_features + out_features + b * b)) + 1)
        while r > 0 and not fits(blast_flops(in_features, out_features, b, r), budget, in_features, out_features):
            r -= 1
        return r

    if num_blocks is not None:
        num_blocks = check_int("num_blocks", num_blocks, 1, most)
    else:
        num_blocks = next((b for b in (4, 2, 1) if b <= most and (rank is not None or largest_rank(b) >= 1)), 1)
    if rank is None:
        rank = largest_rank(num_blocks)
        if rank < 1:
            raise no_fit_error("blast", budget, in_features, out_features,
                               blast_flops(in_features, out_features, num_blocks, 1), "layer")
    else:
        rank = check_int("rank", rank, 1, most)
        if not fits(blast_flops(in_features, out_features, num_blocks, rank), budget, in_features, out_features):
            raise ValueError(f"rank={rank} with num_blocks={num_blocks} does not fit budget={budget}")
    return {"num_blocks": int(num_blocks), "rank": int(rank)}


_FAMILY_STRUCTURES: Dict[str, Callable[..., Structure]] = {
    "lowrank": _lowrank, "blockdiag": _blockdiag, "monarch": _monarch, "blocklowrank": _blocklowrank,
    "blocksparse": _blocksparse, "blast": _blast,
}


def realized_structure(family: str, in_features: int, out_features: int, budget: float,
                       options: Optional[Mapping[str, Any]] = None) -> Structure:
    """The structure ``family.from_dense`` builds for an (out x in) layer at ``budget`` with
    ``options`` (the structural ones; see :data:`STRUCTURAL_OPTIONS`), from the shape alone.
    Raises :class:`NotRealizable` for a family whose structure is not known before training, and
    ValueError where the family refuses the layer (as ``from_dense`` would)."""
    compute = _FAMILY_STRUCTURES.get(family)
    if compute is None:
        raise NotRealizable(f"the structure of {family!r} is not known before training")
    budget = float(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return compute(int(in_features), int(out_features), budget, **dict(options or {}))


Shapes = List[Tuple[str, int, int]]


class Realizer:
    """Realised keys of configurations (see the module docstring): the layer shapes of each
    workload are found once (its model built on the meta device), and each layer structure is
    computed once per (family, shape, budget, options)."""

    def __init__(self) -> None:
        self._shapes: Dict[str, Optional[Shapes]] = {}
        self._structures: Dict[str, Structure] = {}

    def shapes(self, config: Mapping[str, Any]) -> Optional[Shapes]:
        """(name, in_features, out_features) of every layer ``config`` structures, in module
        order; None when the model cannot be built on the meta device."""
        cache = json.dumps([config["workload"], config.get("workload_options", {}), config.get("include"),
                            config.get("exclude", [])], sort_keys=True, default=str)
        if cache not in self._shapes:
            self._shapes[cache] = _layer_shapes(config)
        return self._shapes[cache]

    def structure(self, family: str, in_features: int, out_features: int, budget: float,
                  options: Mapping[str, Any]) -> Structure:
        cache = json.dumps([family, in_features, out_features, float(budget), dict(options)], sort_keys=True,
                           default=str)
        if cache not in self._structures:
            self._structures[cache] = realized_structure(family, in_features, out_features, budget, options)
        return self._structures[cache]

    def key(self, config: Union[TrialConfig, Mapping[str, Any]]) -> Optional[str]:
        """The realised key of ``config`` (a :class:`TrialConfig` or its dict), or None where the
        model it trains is known only after training (then only its config digest identifies it)."""
        try:
            return self._key(config.to_dict() if isinstance(config, TrialConfig) else dict(config))
        except (NotRealizable, ValueError, TypeError, KeyError):
            return None

    def _key(self, config: Dict[str, Any]) -> str:
        family = config["family"]
        if family not in KEYED_FAMILIES:
            raise NotRealizable(family)
        exclude = TrialConfig.digest.__kwdefaults__["exclude"]  # what the config digest leaves out
        data = {k: v for k, v in config.items() if k not in exclude}
        del data["budget"]
        if family == "dense":
            for name in ("budget_allocation", "family_options"):
                data.pop(name, None)
            data["realized"] = "dense"
            return _digest(data)
        if config.get("budget_allocation", "uniform") != "uniform":
            raise NotRealizable("per-layer budgets come from the trained dense weights")
        structural, fitting = STRUCTURAL_OPTIONS[family]
        options = dict(config.get("family_options") or {})
        unknown = set(options) - structural - fitting
        if unknown:
            raise NotRealizable(f"unknown option {sorted(unknown)[0]!r}")
        shapes = self.shapes(config)
        if not shapes:
            raise NotRealizable("no layer shapes")
        chosen = {k: v for k, v in options.items() if k in structural}
        data["family_options"] = {k: v for k, v in options.items() if k in fitting}
        data["realized"] = [[name, n_in, n_out, self.structure(family, n_in, n_out, config["budget"], chosen)]
                            for name, n_in, n_out in shapes]
        return _digest(data)


def _digest(data: Dict[str, Any]) -> str:
    """Hashed as :meth:`TrialConfig.digest` hashes a config, with a mark so that a realised key
    never equals a config digest."""
    text = json.dumps({"realized_key": data}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _layer_shapes(config: Mapping[str, Any]) -> Optional[Shapes]:
    import warnings

    import torch

    from ..structured import matching_linears
    from ..workloads import get_workload

    try:
        workload = get_workload(config["workload"], **dict(config.get("workload_options") or {}))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pre-trained weights loaded onto meta tensors: a no-op
            model = workload.build_model()
    except Exception:  # noqa: BLE001 - missing files, a model that needs real tensors: not keyed
        return None
    include = config.get("include")
    include = list(include) if include is not None else list(workload.candidate_patterns)
    return [(name, int(linear.in_features), int(linear.out_features))
            for name, linear in matching_linears(model, include, list(config.get("exclude") or []))]
