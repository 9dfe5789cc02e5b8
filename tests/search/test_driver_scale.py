"""The driver's work per proposal does not grow with the study: its index of the trials
(``_index.TrialIndex``) equals a full recomputation over the study, the whole study is read once
per launch, and the sampler sees a bounded view of a large study (every trial of a small one).
Real SQLite Optuna studies, no Ray (the driver's phases as in test_driver_units)."""
import random

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from gsmsearch.search._index import TrialIndex, bounded_sampler
from gsmsearch.search._launch import _known_digests, _known_realized
from gsmsearch.search._replicates import waiting_params
from gsmsearch.search._space import trial_config
from gsmsearch.search._storage import open_storage
from gsmsearch.search._study import front_records, study_hypervolume, study_records

from .test_driver_units import FINITE, fix_budget, make_driver

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PartialFixedSampler

FAMILIES = {**FINITE, "gblr": {"budget": {"low": 0.1, "high": 0.5}}}
FAMILY = CategoricalDistribution(["lowrank", "gblr"])


def prefill(driver, count, *, real_budget=0.1, seed=0):
    """``count`` finished gblr trials through Optuna's API: COMPLETE (feasible or not), FAIL
    (final, marked or not), PRUNED by the pruner, and duplicates (PRUNED, and a told duplicate COMPLETE),
    each with its own made-up digest and realised key; but trial 17, COMPLETE with the real
    configuration of lowrank ``real_budget``.  Returns that trial's number."""
    rng = random.Random(seed)
    spec, study = driver.spec, driver.study
    real = trial_config(spec, optuna.trial.FixedTrial({"family": "lowrank", "lowrank.budget": real_budget}))
    trials = []
    for i in range(count):
        kind = i % 7
        attrs = {"config_digest": f"made-{i}", "realized_key": f"made-{i}", "family": "gblr"}
        params = {"family": "gblr", "gblr.budget": rng.uniform(0.1, 0.5)}
        distributions = {"family": FAMILY, "gblr.budget": FloatDistribution(0.1, 0.5)}
        quality, flops = rng.uniform(0.3, 0.95), rng.uniform(0.05, 0.6)
        system = {"constraints:relative_flops": flops - 0.35}
        state, values = TrialState.COMPLETE, [quality, flops]
        if i == 17:
            attrs = {"config": real.to_dict(), "config_digest": real.digest(), "family": "lowrank",
                     "realized_key": driver.realizer.key(real.to_dict())}
            params = {"family": "lowrank", "lowrank.budget": real_budget}
            distributions = {"family": FAMILY, "lowrank.budget": CategoricalDistribution([0.1, 0.3])}
        elif kind == 3:
            state, values = TrialState.FAIL, None
            if i % 2:  # final (a FAIL without the mark is final too: nothing here is re-enqueued)
                attrs["final"] = True
        elif kind == 4:
            state, values = TrialState.PRUNED, None
            attrs["pruned"] = {"rule": "median", "epoch": 1}
        elif kind == 5:
            state, values = TrialState.PRUNED, None
            attrs["duplicate_of"] = i - 1
        elif kind == 6:
            attrs["duplicate_of"] = i - 2  # a told duplicate: COMPLETE with the original's values
        trials.append(create_trial(state=state, values=values, params=params, distributions=distributions,
                                   user_attrs=attrs, system_attrs=system if values else {}))
    study.add_trials(trials)
    return 17


def status_line(driver, *, index):
    """The driver's status line, from its index or (index=False) from a full read of the study."""
    kept = driver.display.index
    driver.display.index = kept if index else None
    before = len(driver.out.getvalue())
    driver.display.status(driver.study, driver.spec, len(driver.running), force=True)
    driver.display.index = kept
    return driver.out.getvalue()[before:].strip()


def assert_index_matches_the_study(driver):
    """Everything the index answers equals its recomputation over every trial of the study."""
    trials = driver.study.get_trials(deepcopy=False)
    index = driver.trial_index().refresh()
    assert dict(index.known) == _known_digests(trials)
    assert dict(index.known_realized) == _known_realized(trials, driver.realized_key)
    assert index.done == driver.done_count(trials)
    assert index.waiting_params() == waiting_params(trials)
    assert index.any_waiting == any(t.state == TrialState.WAITING for t in trials)
    for family in driver.spec.families:
        tried = {t.user_attrs.get("realized_key") or t.user_attrs.get("config_digest") or ("trial", t.number)
                 for t in trials if t.params.get("family") == family and t.user_attrs.get("duplicate_of") is None
                 and (t.state == TrialState.RUNNING or t.state == TrialState.COMPLETE or t.user_attrs.get("pruned")
                      or (t.state == TrialState.FAIL and t.user_attrs.get("final", True)))}
        assert index.tried_count(family) == len(tried)
    records = study_records(driver.study)
    assert index.front_numbers() == [r.number for r in front_records(records, driver.spec.directions)]
    # the same sums of the same floats (the same front, in the same order)
    assert index.hypervolume(driver.spec.metric_names) == study_hypervolume(
        records, driver.spec.metric_names, driver.spec.directions)
    assert status_line(driver, index=True) == status_line(driver, index=False)


def test_the_index_equals_a_full_recomputation_through_a_resumed_200_trial_study(tmp_path):
    first, _ = make_driver(tmp_path, {"families": FAMILIES, "concurrency": 2, "trials": 210})
    first.shutdown()
    real = prefill(first, 200)
    driver, workers = make_driver(tmp_path, {"families": FAMILIES, "concurrency": 2, "trials": 210}, resume=True)
    driver.recover()
    assert_index_matches_the_study(driver)
    counts = driver.trial_index().counts
    line = status_line(driver, index=True)
    assert line.startswith(f"[tiny] {counts['record_done']}/210 done, 0 running, {counts['failed']} failed, "
                           f"{counts['pruned']} pruned, {counts['duplicate']} duplicates; front ")

    # lowrank, the least tried family, first: the real configuration of trial 17 (budget 0.1) is
    # refused, the other one (0.3) runs; then gblr (lowrank's two configurations are taken)
    fix_budget(driver, 0.1)
    driver.fill()
    duplicates = [t for t in driver.study.get_trials() if t.number >= 200 and t.user_attrs.get("duplicate_of") == real]
    assert len(duplicates) == 1 and duplicates[0].state == TrialState.PRUNED
    assert [(c["family"], c["budget"]) for c, _, _ in workers.submitted][:1] == [("lowrank", 0.3)]
    assert [c["family"] for c, _, _ in workers.submitted] == ["lowrank", "gblr"]
    assert_index_matches_the_study(driver)  # running trials, a duplicate, a queued one taken
    finish_all(driver, quality=0.99, relative_flops=0.05)  # both on the front
    assert_index_matches_the_study(driver)
    newest = sorted(t.number for t in driver.study.get_trials() if t.state == TrialState.COMPLETE)[-2:]
    assert driver.trial_index().front_numbers()[-2:] == newest
    driver.fill()
    assert [c["family"] for c, _, _ in workers.submitted][2:] == ["gblr", "gblr"]
    assert_index_matches_the_study(driver)
    assert driver.trial_index().full_reads == 1


def test_the_index_follows_failures_retries_and_interruptions(tmp_path):
    driver, workers = make_driver(tmp_path, {"concurrency": 2, "trials": 8})
    driver.fill()
    assert_index_matches_the_study(driver)
    (ref, entry), *_ = driver.running.items()
    driver.running.pop(ref)
    driver.record_failure(entry.trial, entry.config["family"], "interrupted", final=False)  # runs again
    assert_index_matches_the_study(driver)
    (ref, entry), = driver.running.items()
    driver.running.pop(ref)
    driver.record_failure(entry.trial, entry.config["family"], "loss diverged", final=True)
    assert_index_matches_the_study(driver)
    driver.fill()
    finish_all(driver)
    driver.fill()
    assert_index_matches_the_study(driver)
    assert driver.trial_index().full_reads == 1


def finish_all(driver, quality=None, relative_flops=0.3):
    """Tell the driver every running trial returned (quality by default rising with its number)."""
    for ref, entry in list(driver.running.items()):
        driver.running.pop(ref)
        result = {"quality": quality if quality is not None else 0.5 + entry.trial.number / 1000,
                  "relative_flops": relative_flops}
        driver.tell(entry, {"ok": True, "started": 1.0, "finished": 2.0, "actor_id": "a", "result": result},
                    received=3.0)


class CountingStorage:
    """The study's real storage, with its whole-study reads counted (``get_all_trials``)."""

    def __init__(self, inner):
        self._inner, self.full_reads = inner, 0

    def get_all_trials(self, *args, **kwargs):
        self.full_reads += 1
        return self._inner.get_all_trials(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def reads_per_proposal(tmp_path, prefilled, history):
    tmp_path.mkdir()
    first, _ = make_driver(tmp_path, {"families": FAMILIES, "concurrency": 1, "trials": prefilled + 6})
    first.shutdown()
    prefill(first, prefilled)
    driver, _ = make_driver(tmp_path, {"families": FAMILIES, "concurrency": 1, "trials": prefilled + 6}, resume=True)
    driver.trial_index().history = history
    driver.trial_index().recent = type(driver.trial_index().recent)(maxlen=history)
    driver.fill()
    finish_all(driver)
    counting = CountingStorage(driver.study._storage)
    driver.study._storage = counting
    for _ in range(4):
        driver.fill()
        assert len(driver.running) == 1  # a proposal each time
        driver.display.status(driver.study, driver.spec, len(driver.running), force=True)
        finish_all(driver)
    assert driver.trial_index().full_reads == 1  # when it was made, before the counting began
    return counting.full_reads


def test_no_whole_study_read_per_proposal_or_status_line_once_the_sampler_view_is_bounded(tmp_path):
    # the driver's checks, its taking of the queued trial, the sampler (a bounded view: more
    # finished trials than its history) and the status line read only what changed
    assert reads_per_proposal(tmp_path / "small", 30, history=10) == 0
    assert reads_per_proposal(tmp_path / "large", 150, history=10) == 0


def ask_and_tell(study, count, seed):
    """``count`` trials of a two-objective study asked from its sampler and told."""
    rng = random.Random(seed)
    for _ in range(count):
        trial = study.ask()
        family = trial.suggest_categorical("family", ["lowrank", "gblr"])
        budget = trial.suggest_float(f"{family}.budget", 0.1, 0.9)
        study.tell(trial, [budget * rng.uniform(0.8, 1.0), budget * rng.uniform(0.9, 1.1)])
    return [t.params for t in study.get_trials()]


class SeenSizes(optuna.samplers.TPESampler):
    """TPE, recording how many finished trials each call sees, beside the size of the index's
    latest finished and non-dominated trials then."""

    seen, index = [], None

    def sample_independent(self, study, trial, param_name, param_distribution):
        seen = len(study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        self.seen.append((seen, len(set(self.index.recent) | set(self.index.sampler_front)),
                          len(self.index.sampler_front)))
        return super().sample_independent(study, trial, param_name, param_distribution)


def test_the_sampler_sees_every_trial_of_a_small_study_and_a_bounded_view_of_a_large_one(tmp_path):
    directions = ["maximize", "minimize"]
    plain = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'a.db'}"), directions=directions,
                                sampler=optuna.samplers.TPESampler(seed=3, n_startup_trials=5))
    bounded = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'b.db'}"), directions=directions)
    index = TrialIndex(bounded, directions, lambda t: None, history=40)
    bounded.sampler = bounded_sampler(optuna.samplers.TPESampler(seed=3, n_startup_trials=5), index)
    index.refresh()
    original = bounded.ask
    bounded.ask = lambda *a, **k: (index.refresh(), original(*a, **k))[1]
    # up to 40 finished trials the sampler sees them all: the same seed proposes the same values
    assert ask_and_tell(plain, 40, seed=1) == ask_and_tell(bounded, 40, seed=1)

    # beyond, it sees the 10 latest finished trials and the non-dominated ones
    index.history = 10
    index.recent = type(index.recent)(list(index.recent)[-10:], maxlen=10)
    SeenSizes.seen, SeenSizes.index = [], index
    bounded.sampler = bounded_sampler(SeenSizes(seed=3, n_startup_trials=5), index)
    ask_and_tell(bounded, 20, seed=2)
    assert len(SeenSizes.seen) == 20 * 2  # family and budget, each asked of the sampler
    assert all(seen == view <= 10 + front for seen, view, front in SeenSizes.seen)
    assert max(seen for seen, _, _ in SeenSizes.seen) < 40
    front = front_records(study_records(bounded), directions)
    assert sorted(index.sampler_front) == [r.number for r in front]  # no constraint here: the same front
