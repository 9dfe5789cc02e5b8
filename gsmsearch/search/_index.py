"""What the driver reads from its study's trials, kept up to date without reading the whole study.

The driver checks every proposal against the study (configurations run or running, models
trained, each family's count of distinct configurations, the trials queued, how many are done)
and shows counts and the front on its status line.  Recomputing these over every trial per
proposal costs time in proportion to the study's size; :class:`TrialIndex` reads the study once
and then only the trials that can have changed since: the unfinished ones (running, queued) and
the ones created since its last read.  Optuna never changes a finished trial, and the driver holds
the study's lock, so this view equals a full recomputation (``_launch._known_digests`` and
``_launch._known_realized`` are that recomputation).

Each trial contributes to the aggregates through :meth:`TrialIndex._contribution`; a trial read
again has its old contribution taken out and its new one put in, so every aggregate is a multiset
that matches the trials as last read.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set, Tuple

from ._pareto import dominates, hypervolume_2d, to_minimization
from ._replicates import _params_key
from ._study import default_reference, trial_constraints

__all__ = ["TrialIndex", "SAMPLER_HISTORY", "bounded_sampler", "write_attrs"]

#: In a study with more finished trials than this, the sampler sees the most recent
#: ``SAMPLER_HISTORY`` finished trials, the non-dominated completed trials and the unfinished
#: ones (:meth:`TrialIndex.sampler_trials`), so that asking costs the same at any study size;
#: a smaller study's sampler sees every trial (its proposals are Optuna's own).
SAMPLER_HISTORY = 1000


def _state(trial) -> str:
    return trial.state if isinstance(trial.state, str) else trial.state.name


def _is_duplicate(trial) -> bool:
    return trial.user_attrs.get("duplicate_of") is not None


def _pruned_early(trial) -> bool:
    return _state(trial) == "PRUNED" and trial.user_attrs.get("pruned") is not None


def _finished_for_good(trial) -> bool:
    state = _state(trial)
    return state == "COMPLETE" or (state == "FAIL" and trial.user_attrs.get("final", True)) or _pruned_early(trial)


@dataclass(frozen=True)
class _Contribution:
    digest: Optional[str] = None  # in the known digests (finished for good or running)
    realized: Optional[Tuple[str, bool]] = None  # (realised key, completed) of a trained/training model
    tried: Optional[Tuple[str, Any]] = None  # (family, key) counted against the family's space
    done: bool = False  # finished for good and not a duplicate (the driver's target counts these)
    waiting: Optional[tuple] = None  # the fixed parameters' key of a queued trial
    record_state: str = ""  # as ``study_records`` shows it (a told duplicate reads PRUNED)
    record_done: bool = False  # the status line's "done"
    failed: bool = False  # FAIL, final
    duplicate: bool = False  # a PRUNED record with ``duplicate_of``
    pruned: bool = False  # stopped by the pruner
    candidate: bool = False  # complete, feasible, with values: may be on the front
    values: Optional[Tuple[float, ...]] = None  # its objective values (a told duplicate's too)
    complete: bool = False  # COMPLETE to Optuna (a told duplicate too): what the sampler learns from
    lost: Optional[str] = None  # the digest of a trial whose worker or node died (FAIL, not final, worker_died)
    requeued_from: Optional[int] = None  # the trial this one re-runs (``requeued_from``)
    finished_digest: Optional[str] = None  # the digest of a trial finished for good


class _LatestOf(Mapping):
    """key -> the highest trial number among a key's trials (``_known_digests`` keeps the last)."""

    def __init__(self, sets: Dict[str, Set[int]]) -> None:
        self._sets = sets

    def __getitem__(self, key):
        return max(self._sets[key])

    def __contains__(self, key) -> bool:
        return key in self._sets

    def __iter__(self):
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)


class _OriginalOf(Mapping):
    """realised key -> its first completed trial, else its first trial (``_known_realized``)."""

    def __init__(self, maps: Dict[str, Dict[int, bool]]) -> None:
        self._maps = maps

    def __getitem__(self, key):
        numbers = self._maps[key]
        complete = [n for n, done in numbers.items() if done]
        return min(complete) if complete else min(numbers)

    def __contains__(self, key) -> bool:
        return key in self._maps

    def __iter__(self):
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


class TrialIndex:
    """The driver's view of its study's trials (see the module's text).

    ``key_of(trial)`` gives a trial's realised key (``Driver.realized_key``).  ``history`` is how
    many of the most recent finished trials :meth:`sampler_trials` keeps (with the front)."""

    def __init__(self, study, directions: List[str], key_of: Callable[[Any], Optional[str]], *,
                 history: Optional[int] = None) -> None:
        self.study, self.directions, self.key_of = study, list(directions), key_of
        self.history = history
        self.trials: Dict[int, Any] = {}  # number -> the trial as last read
        self.contributions: Dict[int, _Contribution] = {}
        self.unfinished: Dict[int, int] = {}  # trial id -> number, of the trials read unfinished
        self.max_trial_id = -1
        self.loaded = False
        self.full_reads = 0  # whole-study reads (one at the first refresh, unless the storage cannot say what changed)
        self.digests: Dict[str, Set[int]] = {}
        self.realized_sets: Dict[str, Dict[int, bool]] = {}
        self.tried: Dict[str, Counter] = {}
        self.waiting: Counter = Counter()
        self.counts: Counter = Counter()  # done, record_done, failed, duplicate, pruned, COMPLETE (records), waiting
        self.lost: Dict[int, str] = {}  # number -> digest, of the trials whose worker or node died
        self.requeued_refs: Counter = Counter()  # trial numbers other trials re-run (``requeued_from``)
        self.finished_digests: Counter = Counter()  # digests of the trials finished for good
        self.front: Dict[int, Tuple[float, ...]] = {}  # number -> values, of the feasible complete non-dominated
        self.worst: List[float] = []  # per objective, the worst value of any record with values (minimised form)
        self.sampler_front: Dict[int, Tuple[float, ...]] = {}  # non-dominated complete trials, feasible or not
        self._minimized: Dict[int, List[float]] = {}  # number -> values in minimisation form, of the fronts' members
        self.recent: Deque[int] = deque(maxlen=history)  # numbers of the latest finished trials, last last

    # -- reading -----------------------------------------------------------------------------

    def refresh(self) -> "TrialIndex":
        """Read what may have changed since the last call (everything at the first)."""
        from ._storage import with_retries

        if not self.loaded:
            trials = with_retries(lambda: self.study.get_trials(deepcopy=False))
            self.full_reads += 1
            self.loaded = True
            for trial in trials:
                self._update(trial)
            return self
        backend = getattr(getattr(self.study, "_storage", None), "_rdb", None)
        if backend is None or not hasattr(backend, "_get_trials"):
            self.full_reads += 1  # a storage that cannot be asked for the changed trials alone
            changed = with_retries(lambda: self.study.get_trials(deepcopy=False))
        else:
            # the trials created since (one range read of the trial ids), then each unfinished
            # one by its id (one query of both would make SQLite scan every trial of the study)
            after = self.max_trial_id
            changed = with_retries(lambda: backend._get_trials(self.study._study_id, None, set(), after))
            for trial_id in sorted(self.unfinished):
                if trial_id <= after:
                    changed.append(with_retries(lambda trial_id=trial_id: backend.get_trial(trial_id)))
        for trial in changed:
            self._update(trial)
        return self

    def _update(self, trial) -> None:
        number = trial.number
        self.trials[number] = trial
        self.max_trial_id = max(self.max_trial_id, trial._trial_id)
        if _state(trial) in ("RUNNING", "WAITING"):
            self.unfinished[trial._trial_id] = number
        else:
            self.unfinished.pop(trial._trial_id, None)
        old = self.contributions.get(number)
        new = self._contribution(trial)
        if old == new:
            return
        if old is not None:
            self._apply(number, old, -1)
        self._apply(number, new, +1)
        self.contributions[number] = new
        if old is None or old.record_state in ("RUNNING", "WAITING"):
            if new.record_state not in ("RUNNING", "WAITING", ""):
                self._finished(number, trial)

    def _contribution(self, trial) -> _Contribution:
        state = _state(trial)
        attrs = trial.user_attrs
        duplicate = _is_duplicate(trial)
        good = _finished_for_good(trial)
        qualifies = good or state == "RUNNING"
        digest = attrs.get("config_digest") if qualifies else None
        realized = tried = None
        if qualifies and not duplicate:
            key = self.key_of(trial)
            if key is not None:
                realized = (key, state == "COMPLETE")
            family = trial.params.get("family")
            if family is not None:
                tried = (family, attrs.get("realized_key") or attrs.get("config_digest") or ("trial", trial.number))
        told_duplicate = state == "COMPLETE" and isinstance(attrs.get("duplicate_of"), int)
        record_state = "PRUNED" if told_duplicate else state
        values = tuple(trial.values) if trial.values is not None else None
        feasible = all(v <= 0 for v in trial_constraints(trial.system_attrs).values())
        pruned = record_state == "PRUNED" and attrs.get("pruned") is not None
        return _Contribution(
            digest=digest or None, realized=realized, tried=tried, done=good and not duplicate,
            waiting=_params_key(trial.system_attrs.get("fixed_params", {})) if state == "WAITING" else None,
            record_state=record_state,
            record_done=record_state == "COMPLETE" or (record_state == "FAIL" and attrs.get("final", True)) or pruned,
            failed=record_state == "FAIL" and attrs.get("final", True),
            duplicate=record_state == "PRUNED" and attrs.get("duplicate_of") is not None, pruned=pruned,
            candidate=record_state == "COMPLETE" and values is not None and feasible, values=values,
            complete=state == "COMPLETE",
            lost=(attrs.get("config_digest") if state == "FAIL" and attrs.get("worker_died")
                  and attrs.get("final", True) is False else None),
            requeued_from=attrs.get("requeued_from") if isinstance(attrs.get("requeued_from"), int) else None,
            finished_digest=attrs.get("config_digest") if good else None)

    def _apply(self, number: int, c: _Contribution, sign: int) -> None:
        if c.digest is not None:
            numbers = self.digests.setdefault(c.digest, set())
            numbers.add(number) if sign > 0 else numbers.discard(number)
            if not numbers:
                del self.digests[c.digest]
        if c.realized is not None:
            key, complete = c.realized
            entries = self.realized_sets.setdefault(key, {})
            if sign > 0:
                entries[number] = complete
            else:
                entries.pop(number, None)
            if not entries:
                del self.realized_sets[key]
        if c.tried is not None:
            family, key = c.tried
            counter = self.tried.setdefault(family, Counter())
            counter[key] += sign
            if counter[key] <= 0:
                del counter[key]
        if c.waiting is not None:
            self.waiting[c.waiting] += sign
            if self.waiting[c.waiting] <= 0:
                del self.waiting[c.waiting]
        for name in ("done", "record_done", "failed", "duplicate", "pruned"):
            if getattr(c, name):
                self.counts[name] += sign
        if c.lost is not None:
            if sign > 0:
                self.lost[number] = c.lost
            else:
                self.lost.pop(number, None)
        for counter, key in ((self.requeued_refs, c.requeued_from), (self.finished_digests, c.finished_digest)):
            if key is not None:
                counter[key] += sign
                if counter[key] <= 0:
                    del counter[key]
        self.counts["state:" + c.record_state] += sign
        # finished trials never change: what follows only ever adds (a front only grows by them)
        if sign > 0 and c.values is not None:
            mins = to_minimization(c.values, self.directions)
            if not any(math.isnan(v) for v in mins):
                if not self.worst:
                    self.worst = list(mins)
                self.worst = [max(w, v) for w, v in zip(self.worst, mins)]
                if c.candidate:
                    self._insert(self.front, number, c.values, mins)
        if sign > 0 and c.complete and c.values is not None:
            mins = to_minimization(c.values, self.directions)
            if not any(math.isnan(v) for v in mins):
                self._insert(self.sampler_front, number, c.values, mins)

    def _insert(self, front: Dict[int, Tuple[float, ...]], number: int, values, mins: List[float]) -> None:
        """Add a point to a non-dominated set (``_pareto.pareto_front``'s rule: a point equal to
        a member is kept beside it; one with a NaN never enters)."""
        if any(dominates(self._minimized[other], mins) for other in front):
            return
        for other in [other for other in front if dominates(mins, self._minimized[other])]:
            del front[other]
        front[number] = tuple(values)
        self._minimized[number] = mins

    def _finished(self, number: int, trial) -> None:
        self.recent.append(number)

    # -- what the driver asks ---------------------------------------------------------------

    @property
    def known(self) -> Mapping[str, int]:
        """config digest -> trial number, of the configurations that must not run again (as
        ``_launch._known_digests``)."""
        return _LatestOf(self.digests)

    @property
    def known_realized(self) -> Mapping[str, int]:
        """realised key -> trial number, of the models that must not be trained again (as
        ``_launch._known_realized``)."""
        return _OriginalOf(self.realized_sets)

    @property
    def done(self) -> int:
        """Trials finished for good, duplicates not counted (``Driver.done_count``)."""
        return self.counts["done"]

    def awaiting_resume(self) -> int:
        """How many trials failed only because their worker or node died and wait for a
        ``--resume`` (``_launch._awaiting_resume``: not re-run by a later trial, their
        configuration not finished for good since)."""
        return sum(1 for number, digest in self.lost.items()
                   if number not in self.requeued_refs and digest not in self.finished_digests)

    @property
    def any_waiting(self) -> bool:
        return self.counts["state:WAITING"] > 0

    def waiting_params(self) -> set:
        """Keys of the fixed parameters of the queued trials (``_replicates.waiting_params``)."""
        return set(self.waiting)

    def tried_count(self, family: str) -> int:
        """The family's distinct configurations run or running (``_launch._next_trial``)."""
        return len(self.tried.get(family, ()))

    def trial(self, number: int):
        return self.trials[number]

    def ask(self):
        """``study.ask()``, the queued trial taken from what the index knows (the first queued,
        as Optuna takes it; Optuna's own ask scans every trial of the study for one)."""
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        from ._storage import with_retries

        study = self.study
        queued = sorted((number, trial_id) for trial_id, number in self.unfinished.items()
                        if _state(self.trials[number]) == "WAITING")
        for _, trial_id in queued:
            try:
                taken = with_retries(lambda: study._storage.set_trial_state_values(trial_id, state=TrialState.RUNNING))
            except UpdateFinishedTrialError:
                continue
            if taken:
                study._thread_local.cached_all_trials = None  # as Study.ask: the sampler reads afresh
                return optuna.trial.Trial(study, trial_id)
        return with_retries(study.ask)

    # -- the status line ---------------------------------------------------------------------

    def front_numbers(self) -> List[int]:
        """Numbers of the feasible, complete, non-dominated trials (``_study.front_records``)."""
        return sorted(self.front)

    def hypervolume(self, metric_names: List[str]) -> float:
        """``_study.study_hypervolume`` of the study (NaN unless two objectives)."""
        if len(self.directions) != 2:
            return math.nan

        class _Values:
            def __init__(self, values):
                self.values = values

        # default_reference takes each objective's worst observed value: the worst point stands for all
        worst = [] if not self.worst else [
            v if d == "minimize" else -v for v, d in zip(self.worst, self.directions)]
        reference = default_reference(metric_names, self.directions, [_Values(worst)] if worst else [])
        return hypervolume_2d([self.front[n] for n in sorted(self.front)], self.directions, reference)

    # -- the sampler's view -----------------------------------------------------------------

    def sampler_trials(self) -> Optional[List[Any]]:
        """The trials the sampler sees: None (all of them) while the study has at most
        ``history`` finished trials; else the ``history`` most recent finished trials, the
        non-dominated complete trials and the unfinished ones, in trial-number order."""
        finished = len(self.trials) - len(self.unfinished)
        if self.history is None or finished <= self.history:
            return None
        numbers = set(self.recent) | set(self.sampler_front) | set(self.unfinished.values())
        return [self.trials[n] for n in sorted(numbers)]


def write_attrs(trial, user: Optional[Dict[str, Any]] = None, system: Optional[Dict[str, Any]] = None) -> None:
    """Set several user (and system) attributes of a running trial in one database transaction
    (Optuna's ``set_user_attr`` commits each one: a commit per attribute costs a disk sync on
    SQLite).  Through the study's Optuna RDB storage where there is one, else one call each."""
    from ._storage import with_retries

    user, system = user or {}, system or {}
    storage = trial.storage
    rdb = getattr(storage, "_rdb", None)
    if rdb is None or not hasattr(rdb, "_set_trial_attr_without_commit"):
        for key, value in user.items():
            with_retries(lambda key=key, value=value: trial.set_user_attr(key, value))
        for key, value in system.items():
            with_retries(lambda key=key, value=value: storage.set_trial_system_attr(trial._trial_id, key, value))
            cached = getattr(trial, "_cached_frozen_trial", None)
            if cached is not None:
                cached.system_attrs[key] = value
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    def write():
        with _create_scoped_session(rdb.scoped_session, True) as session:
            for model, attrs in ((models.TrialUserAttributeModel, user), (models.TrialSystemAttributeModel, system)):
                for key, value in attrs.items():
                    rdb._set_trial_attr_without_commit(session, model, trial._trial_id, key, value)

    with_retries(write)
    cached = getattr(trial, "_cached_frozen_trial", None)  # what ``Trial.user_attrs`` answers from
    if cached is not None:
        cached.user_attrs.update(user)
        cached.system_attrs.update(system)


class _StudyView:
    """The study as a sampler sees it: ``trials`` in place of its trials, everything else the study's."""

    def __init__(self, study, trials: List[Any]) -> None:
        self._view_study, self._view_trials = study, trials

    def __getattr__(self, name):
        return getattr(self._view_study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        import copy

        trials = [t for t in self._view_trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states=None):
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self):
        return self.get_trials()


_BOUNDED = None


def bounded_sampler(sampler, index: TrialIndex):
    """``sampler`` (an Optuna sampler) asked with the study seen through
    :meth:`TrialIndex.sampler_trials` (every trial up to :data:`SAMPLER_HISTORY` finished ones)."""
    global _BOUNDED
    if _BOUNDED is None:
        from optuna.samplers import BaseSampler

        class BoundedSampler(BaseSampler):
            def __init__(self, inner, index) -> None:
                self.inner, self.index = inner, index

            def _view(self, study):
                trials = self.index.sampler_trials() if self.index.loaded else None
                return study if trials is None else _StudyView(study, trials)

            def infer_relative_search_space(self, study, trial):
                return self.inner.infer_relative_search_space(self._view(study), trial)

            def sample_relative(self, study, trial, search_space):
                return self.inner.sample_relative(self._view(study), trial, search_space)

            def sample_independent(self, study, trial, param_name, param_distribution):
                return self.inner.sample_independent(self._view(study), trial, param_name, param_distribution)

            def before_trial(self, study, trial):
                self.inner.before_trial(self._view(study), trial)

            def after_trial(self, study, trial, state, values):
                self.inner.after_trial(self._view(study), trial, state, values)

            def reseed_rng(self) -> None:
                self.inner.reseed_rng()

            def __getattr__(self, name):
                return getattr(self.__dict__["inner"], name)

        _BOUNDED = BoundedSampler
    return _BOUNDED(sampler, index)
