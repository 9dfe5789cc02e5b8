"""The driver's phases one at a time, on a real SQLite Optuna study and without Ray: a stand-in
for ``make_worker`` records what would have been submitted, and results are handed to the
driver as the dicts a worker returns."""
import io
import sqlite3
import time

import optuna
import pytest
from optuna.trial import TrialState

from gsmsearch.search._launch import (DUPLICATES_IN_A_ROW, RESULT_SCALARS, UNSTARTED_RESUBMITS, Driver,
                                      _requeue_unfinished, resume_command,
                                      study_paths)
from gsmsearch.search._space import family_configurations
from gsmsearch.search._spec import SpecError, spec_from_dict

from .conftest import TINY_SPEC

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PartialFixedSampler

FINITE = {"lowrank": {"budget": [0.1, 0.3]}}  # two configurations: budget 0.1 (A) and 0.3 (B)


class FakeWorkers:
    """Stands in for ``_runner.make_worker``: every worker appends what it is asked to run to
    ``submitted`` and returns a fresh token as its Ray object ref."""

    def __init__(self):
        self.submitted = []  # (config, checkpoint dir, structure path)

    def __call__(self, cpus, gpus):
        submitted = self.submitted

        class Run:
            @staticmethod
            def remote(config, checkpoint_dir, cache_dir, structure_path, token=None):
                submitted.append((config, checkpoint_dir, structure_path))
                return object()

        class Info:
            @staticmethod
            def remote():
                return object()

        class Worker:
            run = Run
            info = Info

        return Worker()


def make_driver(tmp_path, overrides=None, *, resume=False, force=False):
    spec = spec_from_dict({**TINY_SPEC, **(overrides or {})})
    workers = FakeWorkers()
    driver = Driver(spec, tmp_path / "study.yaml", out=io.StringIO(), status_interval=1e9, make_worker=workers)
    driver.open(f"sqlite:///{tmp_path / 'tiny.db'}", resume=resume, force=force)
    return driver, workers


def fix_budget(driver, budget):
    """A real Optuna sampler that proposes ``budget`` for every lowrank trial."""
    driver.study.sampler = optuna.samplers.PartialFixedSampler(
        {"lowrank.budget": budget}, optuna.samplers.RandomSampler(seed=0))


def outcome(result=None, *, ok=True, reason=None, started=100.0, finished=107.5):
    out = {"ok": ok, "started": started, "finished": finished, "actor_id": "actor-1"}
    out.update({"result": result} if ok else {"reason": reason, "final": True})
    return out


def finish(driver, *, ok=True, quality=0.8, relative_flops=0.2, test_quality=None):
    """Tell the driver the only running trial returned."""
    (ref, entry), = driver.running.items()
    driver.running.pop(ref)
    result = {"quality": quality, "relative_flops": relative_flops, "test_quality": test_quality}
    driver.tell(entry, outcome(result, ok=ok, reason="loss diverged"), received=110.0)
    return entry.trial.number


# -- open and recover ------------------------------------------------------------------------


def test_recover_marks_a_dead_drivers_running_trials_stale_and_reruns_their_configurations(tmp_path):
    first, workers = make_driver(tmp_path, {"concurrency": 2})
    first.heartbeat()
    first.fill()
    assert len(first.running) == 2
    first.ask(first.study.get_trials(deepcopy=False))  # asked, never submitted
    left = {t.number: t for t in first.study.get_trials() if t.state == TrialState.RUNNING}
    assert len(left) == 3

    # the first driver is gone without a word; its heartbeat is fresh and its pid (ours) alive
    with pytest.raises(SpecError, match=r"another driver is running study 'tiny' .*wait for it or pass --force"):
        make_driver(tmp_path, {"concurrency": 2}, resume=True)
    with sqlite3.connect(tmp_path / "tiny.db") as db:  # its lock's heartbeat goes stale
        db.execute("UPDATE gsmsearch_driver_lock SET heartbeat_at = heartbeat_at - 3600")

    second, second_workers = make_driver(tmp_path, {"concurrency": 2}, resume=True)
    assert second.recover() == (3, 3)
    assert "marked 3 stale RUNNING trial(s) FAIL; re-enqueued 3 unfinished configuration(s)" in second.out.getvalue()
    trials = second.study.get_trials()
    for number in left:
        assert trials[number].state == TrialState.FAIL
        assert trials[number].user_attrs["failure_reason"].startswith("stale")
        assert trials[number].user_attrs["final"] is False
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["requeued_from"] for t in waiting) == sorted(left)
    assert all(t.system_attrs["fixed_params"] == left[t.user_attrs["requeued_from"]].params for t in waiting)

    # the re-enqueued configurations run first, in their own checkpoint folders (resumed there)
    second.fill()
    assert [c for c, _, _ in second_workers.submitted] == [c for c, _, _ in workers.submitted]
    assert [d for _, d, _ in second_workers.submitted] == [d for _, d, _ in workers.submitted]


def test_recover_reenqueues_nothing_whose_configuration_has_finished_for_good(tmp_path):
    """An interrupted trial whose configuration has since failed for good is not run a third time."""
    driver, workers = make_driver(tmp_path, {"families": FINITE, "concurrency": 1, "trials": 3})
    fix_budget(driver, 0.1)
    driver.fill()
    (ref, entry), = driver.running.items()
    driver.running.pop(ref)
    driver.record_failure(entry.trial, "lowrank", "interrupted (Ctrl-C)", final=False)
    driver.fill()  # the interrupted configuration (not final) may run again ...
    assert [c["budget"] for c, _, _ in workers.submitted] == [0.1, 0.1]
    finish(driver, ok=False)  # ... and fails for good
    assert _requeue_unfinished(driver.study) == 0
    assert not [t for t in driver.study.get_trials() if t.state == TrialState.WAITING]


def test_open_refuses_an_existing_study_without_resume(tmp_path):
    driver, _ = make_driver(tmp_path)
    driver.fill()
    driver.shutdown()
    with pytest.raises(SpecError, match=r"study 'tiny' already has 2 trials; pass --resume to continue it"):
        make_driver(tmp_path)


def older_study(tmp_path, *, complete=True, objective_split=None):
    """Study 'tiny' as an older gsmsearch recorded it: the spec of TINY_SPEC, no
    ``objective_split`` (its quality was the test metric), one COMPLETE trial (or a FAIL one)."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    spec = spec_from_dict(TINY_SPEC)
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}",
                                directions=spec.directions)
    study.set_metric_names(spec.metric_names)
    study.set_user_attr("spec", spec.canonical())
    study.set_user_attr("spec_hash", spec.digest())
    if objective_split is not None:
        study.set_user_attr("objective_split", objective_split)
    study.add_trial(create_trial(
        state=TrialState.COMPLETE if complete else TrialState.FAIL, values=[0.9, 0.3] if complete else None,
        params={"family": "lowrank"}, distributions={"family": CategoricalDistribution(["gblr", "lowrank"])},
        user_attrs={"result": {"quality": 0.9, "val_quality": 0.92, "relative_flops": 0.3}}))
    return study


def test_a_new_study_records_that_quality_is_on_the_validation_split(tmp_path):
    driver, _ = make_driver(tmp_path)
    assert driver.study.user_attrs["objective_split"] == "val"


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("recorded, where", [(None, "on the test split by an older gsmsearch"),
                                             ("test", "on the 'test' split")])
def test_a_study_with_quality_on_another_split_is_refused_whatever_the_flags(tmp_path, force, recorded, where):
    older_study(tmp_path, objective_split=recorded)
    with pytest.raises(SpecError) as refused:
        make_driver(tmp_path, resume=True, force=force)
    assert str(refused.value) == (
        f"study 'tiny' was recorded with quality {where}; its fronts cannot be mixed with "
        f"validation-selected trials: launch the spec under a new name, or delete the study first "
        f"(optuna delete-study --study-name tiny --storage URL)")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    assert study.user_attrs.get("objective_split") == recorded  # nothing written
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_an_older_study_without_a_completed_trial_continues_on_the_validation_split(tmp_path):
    older_study(tmp_path, complete=False)
    driver, _ = make_driver(tmp_path, resume=True)
    assert driver.study.user_attrs["objective_split"] == "val"
    driver.fill()
    for ref, entry in list(driver.running.items()):
        driver.running.pop(ref)
        driver.tell(entry, outcome({"quality": 0.8, "relative_flops": 0.2}), received=110.0)
    assert sum(t.state == TrialState.COMPLETE for t in driver.study.get_trials()) == 2
    driver.shutdown()
    driver2, _ = make_driver(tmp_path, resume=True)  # its own completed trials now: it continues
    assert driver2.study.user_attrs["objective_split"] == "val"


# -- ask -------------------------------------------------------------------------------------


def test_a_repeat_of_a_failed_configuration_is_pruned_and_another_runs(tmp_path):
    driver, workers = make_driver(tmp_path, {"families": FINITE, "concurrency": 1, "trials": 3})
    fix_budget(driver, 0.1)  # the sampler proposes A again and again
    driver.fill()
    failed = finish(driver, ok=False)
    assert driver.study.get_trials()[failed].user_attrs["final"] is True
    driver.fill()
    assert [c["budget"] for c, _, _ in workers.submitted] == [0.1, 0.3]
    pruned = [t for t in driver.study.get_trials() if t.state == TrialState.PRUNED]
    assert [t.user_attrs["duplicate_of"] for t in pruned] == [failed]
    finish(driver)
    # both configurations finished: the study stops at two of its three trials, saying why
    driver.fill()
    assert len(workers.submitted) == 2 and not driver.running
    assert driver.target == 2
    assert driver.out.getvalue().count("every family's search space is exhausted") == 1


def test_an_unbounded_family_whose_sampler_repeats_only_finished_configurations_is_exhausted(tmp_path):
    """A range with a step has no configuration list: a family is exhausted after a run of
    proposals that all repeat configurations finished for good, a failed one included."""
    ranged = {"lowrank": {"budget": {"low": 0.1, "high": 0.3, "step": 0.2}}}
    driver, workers = make_driver(tmp_path, {"families": ranged, "concurrency": 1, "trials": 5})
    assert family_configurations(driver.spec, "lowrank") is None
    fix_budget(driver, 0.3)
    driver.fill()
    finish(driver)
    fix_budget(driver, 0.1)
    driver.fill()
    failed = finish(driver, ok=False)
    driver.fill()  # the sampler only proposes the failed configuration now
    assert [c["budget"] for c, _, _ in workers.submitted] == [0.3, 0.1]
    pruned = [t for t in driver.study.get_trials() if t.state == TrialState.PRUNED]
    assert len(pruned) == DUPLICATES_IN_A_ROW
    assert {t.user_attrs["duplicate_of"] for t in pruned} == {failed}
    assert "search space is exhausted" in driver.out.getvalue()


def test_a_finite_family_counts_distinct_configurations_not_trials(tmp_path):
    """A study holding one configuration run twice (each failed for good) has run one of two:
    the other is still proposed, the family is not taken as exhausted."""
    driver, workers = make_driver(tmp_path, {"families": FINITE, "concurrency": 1, "trials": 3})
    (params_a, digest_a), _ = family_configurations(driver.spec, "lowrank")
    assert params_a["lowrank.budget"] == 0.1
    distributions = {"family": optuna.distributions.CategoricalDistribution(["lowrank"]),
                     "lowrank.budget": optuna.distributions.CategoricalDistribution([0.1, 0.3])}
    for _ in range(2):
        driver.study.add_trial(optuna.trial.create_trial(
            state=TrialState.FAIL, params=params_a, distributions=distributions,
            user_attrs={"config_digest": digest_a, "final": True, "family": "lowrank"}))
    fix_budget(driver, 0.1)
    driver.fill()
    assert [c["budget"] for c, _, _ in workers.submitted] == [0.3]
    assert "exhausted" not in driver.out.getvalue()


def test_a_repeat_of_a_running_configuration_hands_its_turn_to_one_not_run(tmp_path):
    driver, workers = make_driver(tmp_path, {"families": FINITE, "concurrency": 2, "trials": 2})
    fix_budget(driver, 0.3)
    driver.fill()
    assert sorted(c["budget"] for c, _, _ in workers.submitted) == [0.1, 0.3]
    trials = driver.study.get_trials()
    assert [t.state for t in trials].count(TrialState.PRUNED) == 1
    assert [t.state for t in trials].count(TrialState.RUNNING) == 2
    running = [t for t in trials if t.state == TrialState.RUNNING]
    for t in running:
        assert t.user_attrs["config"]["budget"] == t.params["lowrank.budget"]
        assert t.user_attrs["family"] == "lowrank" and len(t.user_attrs["config_digest"]) == 16


def test_fill_stops_at_the_target_counting_results_not_yet_recorded(tmp_path):
    driver, workers = make_driver(tmp_path, {"concurrency": 4, "trials": 3})
    driver.fill(unrecorded=1)
    assert len(workers.submitted) == 2


# -- tell ------------------------------------------------------------------------------------


def test_tell_records_values_constraint_attributes_and_timing(tmp_path):
    driver, _ = make_driver(tmp_path, {"concurrency": 1})
    driver.fill()
    (ref, entry), = driver.running.items()
    driver.running.pop(ref)
    entry.submitted = 98.0
    result = {"quality": 0.75, "val_quality": 0.75, "test_quality": 0.7, "relative_flops": 0.5, "params": 1234,
              "epochs_run": 2, "not_a_scalar_we_keep": 1, "layers": {"fc1": {"params": 10}},
              "curves": [{"epoch": 1}], "test_metrics": {"acc": 0.7}, "resolved": {"lr": 0.003}}
    driver.tell(entry, outcome(result, started=100.0, finished=107.5), received=110.0)
    trial = driver.study.get_trials()[entry.trial.number]
    assert trial.state == TrialState.COMPLETE and trial.values == [0.75, 0.5]
    assert trial.system_attrs["constraints:relative_flops"] == pytest.approx(0.5 - 0.35, abs=1e-12)
    assert trial.user_attrs["result"] == {"quality": 0.75, "val_quality": 0.75, "test_quality": 0.7,
                                          "relative_flops": 0.5, "params": 1234, "epochs_run": 2,
                                          "test_metrics": {"acc": 0.7}, "resolved": {"lr": 0.003}}
    assert set(trial.user_attrs["result"]) - {"test_metrics", "resolved"} <= set(RESULT_SCALARS)
    assert trial.user_attrs["layers"] == {"fc1": {"params": 10}} and trial.user_attrs["curves"] == [{"epoch": 1}]
    assert trial.user_attrs["timing"] == {"submit_to_start_s": 2.0, "run_s": 7.5, "return_s": 2.5}
    assert trial.user_attrs["ray_actor_id"] == "actor-1" and trial.user_attrs["attempts"] == 1
    (timing,) = driver.summary.timings
    assert {k: timing[k] for k in ("submit_to_start_s", "run_s", "return_s", "started", "finished", "worker")} == {
        "submit_to_start_s": 2.0, "run_s": 7.5, "return_s": 2.5, "started": 100.0, "finished": 107.5,
        "worker": "actor-1"}
    assert timing["record_s"] > 0  # from the arrival (an epoch time here) to now
    assert f"trial {trial.number} ({trial.params['family']}) done: quality (val) 0.75, relative_flops 0.5" in driver.out.getvalue()


@pytest.mark.parametrize("quality", [None, float("nan")])
def test_tell_fails_for_good_a_result_without_an_objective(tmp_path, quality):
    driver, _ = make_driver(tmp_path, {"concurrency": 1})
    driver.fill()
    number = finish(driver, quality=quality)
    trial = driver.study.get_trials()[number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["final"] is True
    assert trial.user_attrs["failure_reason"] == "metric 'quality' missing from the trial's result"
    assert trial.user_attrs["attempts"] == 1  # the orchestration record is kept


def test_tell_records_a_failure_the_worker_reported_as_final(tmp_path):
    driver, _ = make_driver(tmp_path, {"concurrency": 1})
    driver.fill()
    number = finish(driver, ok=False)
    trial = driver.study.get_trials()[number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["final"] is True
    assert trial.user_attrs["failure_reason"] == "loss diverged"
    assert f"trial {number} ({trial.params['family']}) FAILED: loss diverged" in driver.out.getvalue()
    assert driver.done_count() == 1


# -- retries ---------------------------------------------------------------------------------


def test_a_trial_past_its_time_limit_is_retried_in_its_checkpoint_folder_then_failed_for_good(tmp_path):
    driver, workers = make_driver(tmp_path, {"concurrency": 1, "retries": 1, "trial_timeout": 60})
    driver.fill()
    (entry,) = driver.running.values()
    # a new worker not placed yet: the trial waits for resources, which its time limit ignores
    assert entry.started is None and entry.placed is not None
    entry.submitted -= 3600
    driver.enforce_time_limit()
    assert len(workers.submitted) == 1 and list(driver.running.values()) == [entry]
    entry.placed, entry.started = None, time.monotonic()  # placed: its time limit starts
    driver.enforce_time_limit()
    assert len(workers.submitted) == 1  # within its limit
    entry.started -= 61
    driver.enforce_time_limit()
    (retry,) = driver.running.values()
    assert (retry.trial.number, retry.attempt) == (entry.trial.number, 1)
    assert workers.submitted[1] == workers.submitted[0]  # same config, checkpoint folder, structure file
    assert "attempt 1 failed (exceeded trial_timeout of 60s); retrying from its last checkpoint" in driver.out.getvalue()
    retry.placed, retry.started = None, time.monotonic() - 61
    driver.enforce_time_limit()
    assert not driver.running and len(workers.submitted) == 2
    trial = driver.study.get_trials()[entry.trial.number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["final"] is True
    assert trial.user_attrs["failure_reason"] == "exceeded trial_timeout of 60s (after 2 attempt(s))"


def _fail_running(driver, reason, *, placed=True):
    """The only running trial fails with ``reason``: after its worker was placed (it ran), or
    before (``placed=False``: its worker never started)."""
    (ref, entry), = driver.running.items()
    driver.running.pop(ref)
    if placed:
        entry.placed, entry.started = None, time.monotonic()
    driver.retry_or_fail(entry, reason)
    return entry


def test_a_worker_that_dies_before_it_is_placed_costs_no_attempt_a_bounded_number_of_times(tmp_path):
    """A node dying but not yet known dead takes new workers and loses them: the trial did not
    run, so it is submitted again on the same attempt, UNSTARTED_RESUBMITS times at most; after
    that such a death counts as an attempt (a worker environment that never starts ends)."""
    driver, workers = make_driver(tmp_path, {"concurrency": 1, "retries": 1, "trials": 1})
    driver.fill()
    number = next(iter(driver.running.values())).trial.number
    for resubmitted in range(1, UNSTARTED_RESUBMITS + 1):
        _fail_running(driver, "worker died: ActorDiedError", placed=False)
        (entry,) = driver.running.values()
        assert (entry.trial.number, entry.attempt) == (number, 0)
        assert len(workers.submitted) == 1 + resubmitted and workers.submitted[-1] == workers.submitted[0]
    assert driver.out.getvalue().count("its worker died before it started") == UNSTARTED_RESUBMITS
    _fail_running(driver, "worker died: ActorDiedError", placed=False)  # now it costs attempt 1
    (entry,) = driver.running.values()
    assert entry.attempt == 1
    assert "attempt 1 failed (worker died: ActorDiedError); retrying" in driver.out.getvalue()
    # a worker that raised before it was placed is no death: that costs the attempt at once
    (tmp_path / "b").mkdir()
    driver2, _ = make_driver(tmp_path / "b", {"concurrency": 1, "retries": 1, "trials": 1})
    driver2.fill()
    _fail_running(driver2, "ValueError: bad option (at w.py:3)", placed=False)
    (entry,) = driver2.running.values()
    assert entry.attempt == 1


def test_a_trial_whose_every_attempt_lost_its_worker_counts_toward_the_target_and_resume_reruns_it(tmp_path):
    driver, workers = make_driver(tmp_path, {"concurrency": 1, "retries": 1, "trials": 2})
    driver.fill()
    first = _fail_running(driver, "worker died: ActorDiedError")
    (retry,) = driver.running.values()
    assert (retry.trial.number, retry.attempt) == (first.trial.number, 1)
    _fail_running(driver, "worker died: NodeDiedError")
    trial = driver.study.get_trials()[first.trial.number]
    assert trial.state == TrialState.FAIL and trial.user_attrs["final"] is False and trial.user_attrs["worker_died"]
    assert trial.user_attrs["failure_reason"] == (
        "worker died: NodeDiedError (after 2 attempt(s)): its worker or node died, nothing its configuration "
        "did; `launch --resume` runs it again from its checkpoint")
    # it counts toward the target: one more trial, then the launch is done
    driver.fill()
    assert len(workers.submitted) == 3
    finish(driver)
    driver.fill()
    assert not driver.running and len(workers.submitted) == 3
    assert driver.summarize().to_resume == 1
    driver.shutdown()

    # --resume re-enqueues it; from then on its re-run is what counts: it runs, and nothing else
    second, second_workers = make_driver(tmp_path, {"concurrency": 1, "retries": 1, "trials": 2}, resume=True)
    assert second.recover() == (0, 1)
    second.fill()
    assert [c for c, _, _ in second_workers.submitted] == [workers.submitted[0][0]]
    assert [d for _, d, _ in second_workers.submitted] == [workers.submitted[0][1]]  # its checkpoint folder
    finish(second)
    second.fill()
    assert not second.running and second.summarize().to_resume == 0


def test_a_trial_that_also_failed_otherwise_fails_for_good(tmp_path):
    """Only a trial whose every attempt lost its worker is resumable: one attempt that raised,
    timed out or ran out of memory makes its failure final."""
    for reasons in (["worker died: ActorDiedError", "ValueError: bad"],
                    ["exceeded trial_timeout of 60s", "worker died: ActorDiedError"],
                    ["worker died: OutOfMemoryError", "worker died: OutOfMemoryError"]):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        driver, _ = make_driver(folder, {"concurrency": 1, "retries": 1, "trials": 1})
        driver.fill()
        for reason in reasons:
            entry = _fail_running(driver, reason)
        trial = driver.study.get_trials()[entry.trial.number]
        assert trial.state == TrialState.FAIL and trial.user_attrs["final"] is True, reasons
        assert "worker_died" not in trial.user_attrs
        assert trial.user_attrs["failure_reason"] == f"{reasons[-1]} (after 2 attempt(s))"
        driver.shutdown()


# -- interrupt and shutdown ------------------------------------------------------------------


def test_a_pending_interrupt_stops_asking_and_raises_at_the_next_step(tmp_path):
    driver, workers = make_driver(tmp_path)
    driver.interrupt.pending = True
    driver.fill()
    assert workers.submitted == [] and driver.study.get_trials() == []
    with pytest.raises(KeyboardInterrupt):
        driver.step()


def test_interrupted_records_running_and_asked_but_unsubmitted_trials_as_not_final(tmp_path):
    driver, _ = make_driver(tmp_path, {"concurrency": 1, "trials": 3})
    driver.fill()
    asked = driver.ask(driver.study.get_trials(deepcopy=False))  # no slot: never submitted
    driver.interrupted()
    trials = driver.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert asked.trial.number == 1
    for t in trials:
        assert t.user_attrs["failure_reason"].startswith("interrupted (Ctrl-C)") and t.user_attrs["final"] is False
    assert driver.summary.interrupted
    assert f"stopped; continue with: gsmsearch launch {tmp_path / 'study.yaml'} --resume" in driver.out.getvalue()
    assert _requeue_unfinished(driver.study) == 2


@pytest.mark.parametrize("label", ["<dict spec>", "<StudySpec>"])
def test_a_study_launched_from_python_is_continued_from_python(tmp_path, label):
    """No spec file to name: the hint is the Python call (resolve_spec's labels)."""
    driver = Driver(spec_from_dict(TINY_SPEC), label, paths=study_paths(spec_from_dict(TINY_SPEC), tmp_path / "s.yaml"),
                    out=io.StringIO(), status_interval=1e9, make_worker=FakeWorkers())
    driver.open(f"sqlite:///{tmp_path / 'tiny.db'}")
    driver.fill()
    driver.interrupted()
    assert driver.out.getvalue().rstrip().endswith(
        "stopped; continue with: gsmsearch.launch(spec, resume=True) with the same spec")
    assert resume_command(label) == "gsmsearch.launch(spec, resume=True) with the same spec"


def test_heartbeat_marks_the_study_and_shutdown_clears_it(tmp_path):
    driver, _ = make_driver(tmp_path)
    before = time.time()
    driver.heartbeat()
    recorded = driver.study.user_attrs["driver"]
    assert recorded["pid"] == driver.driver_id["pid"] and before <= recorded["heartbeat"] <= time.time()
    driver.shutdown()
    assert optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}").user_attrs["driver"] is None


def test_summarize_counts_complete_and_final_failures_and_the_front(tmp_path):
    driver, _ = make_driver(tmp_path, {"concurrency": 1, "trials": 3, "constraints": []})
    for ok, quality, flops in ((True, 0.8, 0.3), (True, 0.7, 0.4), (False, 0, 0)):
        driver.fill()
        finish(driver, ok=ok, quality=quality, relative_flops=flops, test_quality=quality - 0.05)
    summary = driver.summarize()
    assert (summary.completed, summary.failed, summary.interrupted) == (2, 1, False)
    assert summary.front == [{"number": 0, "family": summary.front[0]["family"], "quality": 0.8,
                              "relative_flops": 0.3, "test_quality": pytest.approx(0.75, abs=1e-12)}]
    assert "[tiny] 3/3 done, 0 running, 1 failed; front 1" in driver.out.getvalue()



# -- realised duplicates (the same model from other knob values) ----------------------------

# low-rank on digits-mlp 64 -> 32 -> 32: budgets 0.1 and 0.12 both give ranks (2, 1), 0.3 (6, 4)
SAME_RANKS = {"lowrank": {"budget": [0.1, 0.12, 0.3]}}


def fix(driver, params):
    """A real Optuna sampler that proposes ``params`` (lowrank knobs, the seed) for every trial."""
    driver.study.sampler = optuna.samplers.PartialFixedSampler(params, optuna.samplers.RandomSampler(seed=0))


def test_a_proposal_realising_a_trained_model_is_its_duplicate_told_with_its_values(tmp_path):
    """Budget 0.12 after 0.1 has completed: not trained; recorded COMPLETE with trial 0's values
    and constraint (what the sampler learns at budget 0.12), ``duplicate_of`` 0 and why; the
    turn goes to the configuration that realises a model not trained yet (0.3).  gsmsearch's
    records, front, done count and progress line count the model once."""
    from gsmsearch.search import front_records, study_records

    driver, workers = make_driver(tmp_path, {"families": SAME_RANKS, "concurrency": 1, "trials": 3})
    fix_budget(driver, 0.1)
    driver.fill()
    first = finish(driver, quality=0.8, relative_flops=0.2)
    fix_budget(driver, 0.12)
    driver.fill()
    assert [c["budget"] for c, _, _ in workers.submitted] == [0.1, 0.3]
    trials = driver.study.get_trials()
    (duplicate,) = [t for t in trials if t.params.get("lowrank.budget") == 0.12]
    assert duplicate.state == TrialState.COMPLETE and duplicate.values == trials[first].values == [0.8, 0.2]
    assert duplicate.system_attrs["constraints:relative_flops"] == trials[first].system_attrs[
        "constraints:relative_flops"]
    assert duplicate.user_attrs["duplicate_of"] == first
    assert duplicate.user_attrs["duplicate_reason"] == f"realises the same structure as trial {first}"
    assert duplicate.user_attrs["realized_key"] == trials[first].user_attrs["realized_key"] is not None
    assert "config_digest" not in duplicate.user_attrs  # not a configuration that ran
    # the sampler sees the values at the duplicate's own knob values
    told = {t.params["lowrank.budget"]: t.values for t in driver.study.get_trials(states=(TrialState.COMPLETE,))}
    assert told == {0.1: [0.8, 0.2], 0.12: [0.8, 0.2]}
    records = {r.number: r for r in study_records(driver.study)}
    assert records[duplicate.number].state == "PRUNED"
    assert [r.number for r in front_records(list(records.values()), ["maximize", "minimize"])] == [first]
    assert driver.done_count() == 1
    assert f"trial {duplicate.number} (lowrank) not trained: realises the same structure as trial {first}" in (
        driver.out.getvalue())
    finish(driver, quality=0.9, relative_flops=0.3)
    driver.display.status(driver.study, driver.spec, 0, force=True)
    assert "[tiny] 2/3 done, 0 running, 0 failed, 1 duplicate; front 2" in driver.out.getvalue()
    # every configuration has run or realises a model that has: the space is exhausted at 2 trainings
    driver.fill()
    assert len(workers.submitted) == 2 and driver.target == 2
    assert "search space is exhausted" in driver.out.getvalue()
    # the dashboard draws each model once and says what the duplicate stands for
    from gsmsearch.dashboard._data import family_points, trial_rows
    from gsmsearch.dashboard._source import StudySource, load_view

    view = load_view(StudySource(name="tiny", url=f"sqlite:///{tmp_path / 'tiny.db'}", label="tiny"), "0")
    points = family_points(view.records, "relative_flops", "quality", view.metric_names)
    assert sorted(p.number for p in points["lowrank"]) == [first, first + 2]
    reasons = {row["number"]: row["failure reason"] for row in trial_rows(view, "relative_flops", "quality")}
    assert reasons[duplicate.number] == f"duplicate of trial {first}"


def test_a_duplicate_of_a_running_trial_waits_for_its_values(tmp_path):
    """Proposed while the trial that trains its model runs (as every proposal of a one-slot
    study is: the next trial starts before the last result is recorded): not trained, RUNNING in
    Optuna until that trial's result is recorded, then told its values."""
    driver, workers = make_driver(tmp_path, {"families": SAME_RANKS, "concurrency": 1, "trials": 3})
    fix_budget(driver, 0.1)
    driver.fill()
    (running,) = [entry.trial.number for entry in driver.running.values()]
    fix_budget(driver, 0.12)
    proposal = driver.ask(driver.study.get_trials(deepcopy=False))
    assert proposal.duplicate_of == running
    trial = driver.study.get_trials()[proposal.trial.number]
    assert trial.state == TrialState.RUNNING and trial.values is None  # no values to tell yet
    assert trial.user_attrs["duplicate_reason"] == f"realises the same structure as trial {running}"
    driver.fill()  # the original still runs: nothing to tell, no slot free
    assert driver.study.get_trials()[proposal.trial.number].state == TrialState.RUNNING
    finish(driver, quality=0.7, relative_flops=0.2)
    driver.fill()
    trial = driver.study.get_trials()[proposal.trial.number]
    assert trial.state == TrialState.COMPLETE and trial.values == [0.7, 0.2]
    assert [c["budget"] for c, _, _ in workers.submitted] == [0.1, 0.3]
    # a duplicate of a trial that then fails for good is PRUNED
    fix_budget(driver, 0.3)
    failing = driver.ask(driver.study.get_trials(deepcopy=False))
    assert failing.duplicate_of is not None  # the exact configuration running: PRUNED at once
    assert driver.study.get_trials()[failing.trial.number].state == TrialState.PRUNED


def test_a_different_seed_or_learning_rate_is_not_a_duplicate(tmp_path):
    """The same ranks under another seed (a replicate) or with another learning rate are other
    models: trained.  The same ranks, seed and learning rate are not."""
    families = {"lowrank": {"budget": [0.1, 0.12], "lr": [0.003, 0.01]}}
    workload = {**TINY_SPEC["workload"], "seeds": [0, 1]}
    driver, workers = make_driver(tmp_path, {"families": families, "workload": workload, "concurrency": 1,
                                             "trials": 8})
    fix(driver, {"lowrank.budget": 0.1, "lowrank.lr": 0.003, "seed": 0})
    driver.fill()
    finish(driver)
    driver.fill()  # the replicate under seed 1, queued with the first proposal
    finish(driver)
    fix(driver, {"lowrank.budget": 0.12, "lowrank.lr": 0.01, "seed": 0})
    driver.fill()
    finish(driver)
    assert [(c["budget"], c["lr"], c["seed"]) for c, _, _ in workers.submitted] == [
        (0.1, 0.003, 0), (0.1, 0.003, 1), (0.12, 0.01, 0)]
    assert not any("duplicate_of" in t.user_attrs for t in driver.study.get_trials())
    # its replicate under seed 1 is queued and trained; then budget 0.12, lr 0.003, seed 1 is a duplicate
    driver.fill()
    finish(driver)
    assert [(c["budget"], c["lr"], c["seed"]) for c, _, _ in workers.submitted][-1] == (0.12, 0.01, 1)
    fix(driver, {"lowrank.budget": 0.12, "lowrank.lr": 0.003, "seed": 1})
    proposal = driver.ask(driver.study.get_trials(deepcopy=False))
    assert proposal.duplicate_of == 1  # budget 0.1, lr 0.003, seed 1
    assert len(workers.submitted) == 4


def test_a_resumed_study_keeps_its_duplicates_and_recognises_models_of_older_trials(tmp_path):
    """After a driver stops, the next one re-runs nothing a duplicate stands for, and a completed
    trial recorded without a realised key (an older gsmsearch) is keyed from its config."""
    driver, workers = make_driver(tmp_path, {"families": SAME_RANKS, "concurrency": 1, "trials": 3})
    fix_budget(driver, 0.1)
    driver.fill()
    first = finish(driver, quality=0.8, relative_flops=0.2)
    fix_budget(driver, 0.12)
    driver.fill()  # budget 0.12 set aside, 0.3 submitted
    driver.shutdown()  # stops with 0.3 running: stale for the next driver

    resumed, resumed_workers = make_driver(tmp_path, {"families": SAME_RANKS, "concurrency": 1, "trials": 3},
                                           resume=True)
    assert resumed.recover() == (1, 1)  # only the running trial is run again
    fix_budget(resumed, 0.12)
    resumed.fill()
    assert [c["budget"] for c, _, _ in resumed_workers.submitted] == [0.3]
    duplicates = [t for t in resumed.study.get_trials() if "duplicate_of" in t.user_attrs]
    assert [t.user_attrs["duplicate_of"] for t in duplicates] == [first]

    # a study whose completed trial records its config but no realised key
    older = tmp_path / "older"
    older.mkdir()
    other, other_workers = make_driver(older, {"families": SAME_RANKS, "concurrency": 1, "trials": 3})
    (params, digest), = [(p, d) for p, d in family_configurations(other.spec, "lowrank")
                         if p["lowrank.budget"] == 0.1]
    config = driver.study.get_trials()[first].user_attrs["config"]
    distributions = {"family": optuna.distributions.CategoricalDistribution(["lowrank"]),
                     "lowrank.budget": optuna.distributions.CategoricalDistribution([0.1, 0.12, 0.3])}
    other.study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, values=[0.8, 0.2], params=params, distributions=distributions,
        user_attrs={"config_digest": digest, "config": config, "family": "lowrank"}))
    fix_budget(other, 0.12)
    other.fill()
    assert [c["budget"] for c, _, _ in other_workers.submitted] == [0.3]
    (duplicate,) = [t for t in other.study.get_trials() if "duplicate_of" in t.user_attrs]
    assert duplicate.user_attrs["duplicate_of"] == 0 and duplicate.values == [0.8, 0.2]


def test_an_unbounded_family_proposing_only_trained_models_is_exhausted(tmp_path):
    """Budgets in [0.1, 0.124] all give ranks (2, 1): after the first training, every proposal
    is a duplicate told with its values; DUPLICATES_IN_A_ROW of them exhaust the family."""
    ranged = {"lowrank": {"budget": {"low": 0.1, "high": 0.124}}}
    driver, workers = make_driver(tmp_path, {"families": ranged, "concurrency": 1, "trials": 20})
    driver.study.sampler = optuna.samplers.RandomSampler(seed=0)
    driver.fill()
    first = finish(driver, quality=0.8, relative_flops=0.2)
    driver.fill()
    assert len(workers.submitted) == 1 and driver.target == 1
    duplicates = [t for t in driver.study.get_trials() if t.number != first]
    assert len(duplicates) == DUPLICATES_IN_A_ROW
    assert len({t.params["lowrank.budget"] for t in duplicates}) == DUPLICATES_IN_A_ROW  # all different budgets
    assert all(t.state == TrialState.COMPLETE and t.values == [0.8, 0.2] and t.user_attrs["duplicate_of"] == first
               for t in duplicates)
    assert "search space is exhausted" in driver.out.getvalue()
