"""Early stopping that respects the cost axis: the rules on hand-made curves (no Ray), the spec's
``pruner`` section, and studies on a real local Ray (loopback) with SQLite that prune."""
import optuna
import pytest

from gsmsearch.search import launch
from gsmsearch.search._pruning import (Pruner, TrialCurve, asha_rungs, comparable, curve_from_attrs,
                                       hyperband_brackets, trial_cost)
from gsmsearch.search._spec import SpecError, spec_from_dict

from .conftest import TINY_SPEC


def curve(number, qualities, *, family="lowrank", cost=0.3, workload="w", digest=""):
    return TrialCurve(number, family, cost, workload, digest or f"d{number}",
                      {e + 1: q for e, q in enumerate(qualities)})


# -- the cost rule -----------------------------------------------------------------------------

def test_comparable_needs_same_family_workload_and_cost_within_the_factor():
    a = curve(0, [0.5], cost=0.2)
    assert comparable(a, curve(1, [0.5], cost=0.3), 1.5)  # 0.3 / 0.2 = 1.5: on the boundary, included
    assert not comparable(a, curve(1, [0.5], cost=0.31), 1.5)  # 1.55 > 1.5
    assert comparable(a, curve(1, [0.5], cost=0.31), 2.0)
    assert comparable(a, curve(1, [0.5], cost=0.14), 1.5)  # symmetric: 0.2 / 0.14 = 1.43
    assert not comparable(a, curve(1, [0.5], cost=0.2, family="gblr"), 1.5)
    assert not comparable(a, curve(1, [0.5], cost=0.2, workload="other"), 1.5)
    assert not comparable(a, curve(0, [0.5], cost=0.2), 1.5)  # not with itself
    assert trial_cost({"family": "dense", "budget": 0.25}) == 1.0
    assert trial_cost({"family": "lowrank", "budget": 0.25}) == 0.25


def test_a_cheap_trial_worse_than_expensive_ones_is_not_pruned():
    """A trial at a tenth of the others' budget, far below them at every epoch, continues under
    every rule (it has no comparable trials); the same curves at its budget prune it."""
    expensive = [curve(n, [0.9, 0.92, 0.95, 0.96], cost=0.5) for n in range(6)]
    for name in ("median", "asha", "successive-halving"):
        pruner = Pruner(name, epochs=9, min_epochs=1, reduction_factor=2, min_trials=2)
        cheap = curve(10, [0.3, 0.35, 0.4, 0.42], cost=0.05)
        assert all(pruner.decide(cheap, e, expensive) is None for e in range(1, 5)), name
        same_cost = curve(10, [0.3, 0.35, 0.4, 0.42], cost=0.5)
        assert pruner.decide(same_cost, 1, expensive) is not None, name
    pruner = Pruner("hyperband", epochs=9, min_epochs=1, reduction_factor=2, min_trials=1)
    cheap = curve(10, [0.3, 0.35, 0.4, 0.42], cost=0.05)
    assert all(pruner.decide(cheap, e, expensive) is None for e in range(1, 5))


def test_too_few_comparable_trials_at_the_epoch_never_prune():
    pruner = Pruner("asha", epochs=10, min_epochs=2, reduction_factor=2, min_trials=3)
    others = [curve(1, [0.9, 0.9]), curve(2, [0.9, 0.9]), curve(3, [0.9])]  # trial 3 has not reached epoch 2
    bad = curve(9, [0.1, 0.1])
    assert pruner.decide(bad, 2, others) is None  # 2 comparable trials at epoch 2, 3 needed
    decision = pruner.decide(bad, 2, others + [curve(4, [0.8, 0.8])])
    assert decision is not None and decision.comparable == [1, 2, 4] and decision.epoch == 2


# -- the rules on hand-made curves ---------------------------------------------------------------

def test_median_compares_the_best_so_far_with_the_median_at_the_epoch():
    pruner = Pruner("median", epochs=5, min_epochs=2, min_trials=3)
    others = [curve(1, [0.2, 0.5, 0.6]), curve(2, [0.2, 0.6, 0.7]), curve(3, [0.2, 0.7, 0.8])]  # medians: 0.2, 0.6, 0.7
    low = curve(9, [0.1, 0.55, 0.65])
    assert pruner.decide(low, 1, others) is None  # before min_epochs
    decision = pruner.decide(low, 2, others)
    assert decision.rule == "median" and decision.threshold == pytest.approx(0.6) and decision.value == 0.55
    # the best so far counts: 0.65 at epoch 1 keeps it above the median 0.6 of epoch 2
    assert pruner.decide(curve(9, [0.65, 0.5]), 2, others) is None
    assert pruner.decide(curve(9, [0.1, 0.6]), 2, others) is None  # equal to the median: continues
    assert "trials 1, 2, 3" in decision.reason and "median" in decision.reason
    # never at the last epoch: nothing is saved by stopping there
    assert pruner.decide(curve(9, [0.1] * 5), 5, [curve(n, [0.9] * 5) for n in (1, 2, 3)]) is None


def test_asha_keeps_the_best_fraction_at_each_rung_only():
    assert asha_rungs(1, 3, 30) == [1, 3, 9, 27]
    assert asha_rungs(2, 2, 9) == [2, 4, 8]
    pruner = Pruner("asha", epochs=30, min_epochs=1, reduction_factor=3, min_trials=2)
    others = [curve(n, [q] * 3) for n, q in ((1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6), (5, 0.5))]
    # 6 competing at a rung with reduction factor 3: the best 2 continue (0.9, 0.8)
    assert pruner.decide(curve(9, [0.85] * 3), 1, others) is None
    decision = pruner.decide(curve(9, [0.75] * 3), 1, others)
    assert decision is not None and decision.threshold == 0.8 and decision.comparable == [1, 2, 3, 4, 5]
    assert pruner.decide(curve(9, [0.75] * 3), 2, others) is None  # epoch 2 is not a rung
    # the best always continues, even with 2 competing (2 // 3 = 0 -> 1 kept)
    assert pruner.decide(curve(9, [0.95]), 1, others[:2]) is None
    assert pruner.decide(curve(9, [0.85]), 1, others[:2]) is not None


def test_successive_halving_is_asha():
    others = [curve(n, [q]) for n, q in ((1, 0.9), (2, 0.4), (3, 0.3))]
    for value in (0.2, 0.5, 0.95):
        a = Pruner("asha", epochs=4, min_epochs=1, reduction_factor=2, min_trials=1).decide(curve(9, [value]), 1, others)
        b = Pruner("successive-halving", epochs=4, min_epochs=1, reduction_factor=2, min_trials=1).decide(
            curve(9, [value]), 1, others)
        assert (a is None) == (b is None) == (value == 0.95 or value == 0.5)


def test_hyperband_compares_within_a_bracket_and_its_rungs():
    assert hyperband_brackets(1, 3, 27) == [1, 3, 9, 27]
    pruner = Pruner("hyperband", epochs=27, min_epochs=1, reduction_factor=3, min_trials=1)
    curves = [curve(n, [0.5] * 27, digest=f"config-{n}") for n in range(400)]
    brackets = [pruner.bracket(c) for c in curves]
    counts = [brackets.count(b) for b in range(4)]
    # Hyperband's shares: ceil(4 * 3^(3-s) / (4 - s)) = 27, 12, 6, 4 of 49: the aggressive bracket most
    assert counts[0] > counts[1] > counts[2] > 0 and counts[3] > 0 and sum(counts) == 400
    assert pruner.bracket(curves[7]) == pruner.bracket(TrialCurve(99, "lowrank", 0.3, "w", "config-7"))
    by_bracket = {}
    for c, b in zip(curves, brackets):
        by_bracket.setdefault(b, []).append(c)
    first, last = by_bracket[0], by_bracket[3]
    bad = TrialCurve(999, "lowrank", 0.3, "w", first[0].digest, {e: 0.1 for e in range(1, 28)})
    assert pruner.bracket(bad) == 0
    decision = pruner.decide(bad, 1, last + first[1:3])
    assert decision is not None and set(decision.comparable) == {first[1].number, first[2].number}
    assert pruner.decide(bad, 2, first[1:]) is None  # bracket 0's rungs: 1, 3, 9
    last_bad = TrialCurve(998, "lowrank", 0.3, "w", last[0].digest, {e: 0.1 for e in range(1, 28)})
    assert all(pruner.decide(last_bad, e, last[1:]) is None for e in range(1, 28))  # the full bracket


def test_curve_from_attrs_reads_reported_and_finished_curves():
    config = {"family": "lowrank", "budget": 0.3, "workload": "digits-mlp", "epochs": 3}
    running = curve_from_attrs(4, {"config": config, "config_digest": "x", "epoch_quality": [[1, 0.5], [2, 0.6]]})
    assert running.qualities == {1: 0.5, 2: 0.6} and running.cost == 0.3 and running.digest == "x"
    finished = curve_from_attrs(5, {"config": config, "curves": [{"epoch": 1, "val": {"quality": 0.4}},
                                                                 {"epoch": 2, "val": {"quality": 0.7}}]})
    assert finished.qualities == {1: 0.4, 2: 0.7}
    assert curve_from_attrs(6, {"config": config}) is None and curve_from_attrs(7, {}) is None


# -- the spec --------------------------------------------------------------------------------------

@pytest.mark.parametrize("pruner, message", [
    ({"name": "median", "reduction_factor": 2}, "pruner: reduction_factor applies to asha"),
    ({"name": "none", "min_trials": 2}, "pruner: min_trials is a parameter of a pruner"),
    ({"name": "asha", "min_epochs": 2}, "pruner.min_epochs: 2 is not below workload.epochs (2)"),
    ({"name": "asha", "reduction_factor": 1}, "pruner.reduction_factor: Input should be greater than or equal to 2"),
    ({"name": "asha", "cost_factor": 0.9}, "pruner.cost_factor: Input should be greater than or equal to 1"),
    ({"name": "ash"}, "pruner.name: Input should be 'none', 'median', 'asha'"),
    ({"name": "asha", "grace": 1}, "pruner.grace: unknown key"),
])
def test_a_bad_pruner_field_is_named(pruner, message):
    with pytest.raises(SpecError, match=None) as error:
        spec_from_dict({**TINY_SPEC, "pruner": pruner})
    assert message in str(error.value)


def test_a_pruner_needs_quality_among_the_objectives():
    with pytest.raises(SpecError) as error:
        spec_from_dict({**TINY_SPEC, "pruner": "asha", "objectives": [{"metric": "relative_flops"}]})
    assert "pruner.name: asha compares trials by their validation quality" in str(error.value)


def test_pruner_by_name_and_the_default_keeps_the_digest():
    spec = spec_from_dict({**TINY_SPEC, "pruner": "hyperband"})
    assert spec.pruner.name == "hyperband" and spec.pruner.reduction_factor is None
    assert spec_from_dict({**TINY_SPEC, "pruner": "none"}).digest() == spec_from_dict(TINY_SPEC).digest()


# -- studies on a real local Ray -------------------------------------------------------------------

GOOD_LR, BAD_LR = 0.01, 1e-5


def _study(tmp_path, name="tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / (name + '.db')}")


def test_asha_prunes_the_bad_learning_rate_and_a_resume_does_not_rerun_pruned_trials(write_spec, tmp_path, capsys):
    """One family at one budget (every trial comparable), two learning rates, three seeds: the
    configuration of the first proposal (lr 0.01 with this sampler seed) runs under every seed
    first; the lr-1e-5 trials stay near chance (0.1) and are below the best half of the trials
    at rung 1, so each is stopped there (it waits after a rung epoch for the driver's verdict)
    and recorded PRUNED with its curve and the decision; the study finishes.  A resume then runs nothing again: not the pruned
    configurations, nor an earlier interrupted attempt of one."""
    spec = write_spec({
        "families": {"lowrank": {"budget": 0.3, "lr": {"choices": [BAD_LR, GOOD_LR]}}},
        "workload": {**TINY_SPEC["workload"], "epochs": 8, "batch_size": 16, "seeds": [0, 1, 2]},
        "constraints": [], "sampler": {"name": "random", "seed": 0}, "trials": 6, "concurrency": 1,
        "pruner": {"name": "asha", "min_epochs": 1, "reduction_factor": 2, "min_trials": 2},
    })
    summary = launch(spec, status_interval=1e9)
    trials = _study(tmp_path).get_trials()
    ran = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert ran[0].user_attrs["config"]["lr"] == GOOD_LR, "precondition: the sampler proposes lr 0.01 first"
    assert [t.user_attrs["config"]["lr"] for t in ran] == [GOOD_LR] * 3 + [BAD_LR] * 3
    bad = [t for t in ran if t.user_attrs["config"]["lr"] == BAD_LR]
    assert [t.state.name for t in bad] == ["PRUNED"] * 3
    for t in bad:
        decision = t.user_attrs["pruned"]
        assert decision["rule"] == "asha" and decision["epoch"] == 1
        # compared with the trials before it (all at the same family and budget) at rung 1
        assert set(decision["comparable"]) <= {r.number for r in ran if r.number < t.number}
        assert len(decision["comparable"]) >= 2
        assert decision["value"] < decision["threshold"]
        # stopped at the decision's epoch: the trial waited there for the driver's verdict (up to
        # 10 s; the driver, running one trial at a time, answers within a turn of its loop)
        assert decision["stopped_after_epoch"] == decision["epoch"]
        curve = t.user_attrs["epoch_quality"]
        assert [e for e, _ in curve] == list(range(1, decision["stopped_after_epoch"] + 1))
        assert curve[0][1] == pytest.approx(decision["value"])
        assert "asha" in t.user_attrs["prune_reason"] and "budget within 1.5x of 0.3" in t.user_attrs["prune_reason"]
        assert t.values is None
    complete = [t for t in ran if t.state.name == "COMPLETE"]
    assert complete and all(t.user_attrs["config"]["lr"] == GOOD_LR for t in complete)
    for t in complete:  # reporting: throughput, peak memory, precision, world size
        result = t.user_attrs["result"]
        assert result["samples_per_second"] > 0 and result["peak_memory_bytes"] > 0
        assert result["peak_memory_kind"] == "process_peak_rss"
        assert result["precision"] == "fp32" and result["world_size"] == 1
    assert summary.pruned == len([t for t in ran if t.state.name == "PRUNED"]) >= 3
    assert summary.completed + summary.pruned == 6
    err = capsys.readouterr().err
    assert "stops early: asha" in err and "PRUNED after epoch" in err
    assert f"6/6 done, 0 running, 0 failed, {summary.pruned} pruned" in err  # the progress line counts them

    # the dashboard's trial table: pruned trials as pruned, with the reason and the epochs they ran
    from gsmsearch.dashboard import DataCache, _data, dashboard_spec_from_dict, sources_in_storage

    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    board = dashboard_spec_from_dict({"title": "t", "storage": url, "studies": []}, from_command_line=True)
    [view] = DataCache(sources_in_storage(url)).views()
    rows = {r["number"]: r for r in _data.trial_rows(view, board.axes.x, board.axes.y)}
    for t in bad:
        assert rows[t.number]["state"] == "PRUNED"
        assert rows[t.number]["failure reason"] == "pruned: " + t.user_attrs["prune_reason"]
        assert rows[t.number]["epochs"] == t.user_attrs["pruned"]["stopped_after_epoch"]
    for t in complete:
        row = rows[t.number]
        assert row["samples/s"] == pytest.approx(t.user_attrs["result"]["samples_per_second"], abs=0.05)
        assert row["peak memory (MiB)"].endswith(" RSS") and row["precision"] == "fp32" and row["world size"] == 1
        assert row["epochs"] == 8

    # an interrupted attempt of a pruned configuration (FAIL, not final) must not be re-enqueued
    study = _study(tmp_path)
    victim = bad[0]
    study.add_trial(optuna.trial.create_trial(
        params=victim.params, distributions=victim.distributions, state=optuna.trial.TrialState.FAIL,
        user_attrs={"config": victim.user_attrs["config"], "config_digest": victim.user_attrs["config_digest"],
                    "family": "lowrank", "final": False, "failure_reason": "interrupted"}))
    before = len(study.get_trials())
    again = launch(spec, resume=True, status_interval=1e9)
    after = _study(tmp_path).get_trials()
    assert len(after) == before  # nothing asked: the 6 trials (pruned ones included) are the target
    assert not [t for t in after if t.state.name in ("WAITING", "RUNNING")]
    assert again.pruned == summary.pruned and again.completed == summary.completed


def test_the_cost_rule_keeps_cheap_trials_that_a_cost_blind_rule_prunes(write_spec, tmp_path):
    """Budgets 0.5 and 0.07 (a seventh), one learning rate, three seeds; the budget-0.5
    configuration runs first (this sampler seed).  The cheap trials are less accurate at every
    epoch; with cost_factor 1.5 none of them is compared with an expensive one, so the first
    cheap trial (no cheap trial before it) completes.  With cost_factor 20 the same study
    compares them with the expensive ones and prunes it: the rule is what keeps it."""
    def run(factor, name):
        spec = write_spec({
            "name": name,
            "families": {"lowrank": {"budget": [0.07, 0.5]}},
            "workload": {**TINY_SPEC["workload"], "epochs": 6, "batch_size": 16, "lr": GOOD_LR, "seeds": [0, 1, 2]},
            "constraints": [], "sampler": {"name": "random", "seed": 3}, "trials": 6, "concurrency": 1,
            "pruner": {"name": "asha", "min_epochs": 1, "reduction_factor": 2, "min_trials": 2,
                       "cost_factor": factor},
        }, name=f"{name}.yaml")
        launch(spec, status_interval=1e9)
        ran = [t for t in _study(tmp_path, name).get_trials() if "duplicate_of" not in t.user_attrs]
        assert [t.user_attrs["config"]["budget"] for t in ran] == [0.5] * 3 + [0.07] * 3, \
            "precondition: the sampler proposes budget 0.5 first"
        return ran

    ran = run(1.5, "costed")
    cheap = [t for t in ran if t.user_attrs["config"]["budget"] == 0.07]
    expensive = [t for t in ran if t.user_attrs["config"]["budget"] == 0.5]
    best_expensive = max(q for t in expensive for _, q in t.user_attrs["epoch_quality"][:1])
    first_cheap_curve = cheap[0].user_attrs.get("epoch_quality") or [
        [c["epoch"], c["val"]["quality"]] for c in cheap[0].user_attrs["curves"]]
    assert first_cheap_curve[0][1] < best_expensive  # it is worse at rung 1 ...
    assert cheap[0].state.name == "COMPLETE"  # ... and not pruned for it
    for t in ran:  # whatever was pruned, was compared with its own budget only
        if t.state.name == "PRUNED":
            same = {r.number for r in ran if r.user_attrs["config"]["budget"] == t.user_attrs["config"]["budget"]}
            assert set(t.user_attrs["pruned"]["comparable"]) <= same

    blind = run(20.0, "blind")
    first_cheap = [t for t in blind if t.user_attrs["config"]["budget"] == 0.07][0]
    assert first_cheap.state.name == "PRUNED"
    assert set(first_cheap.user_attrs["pruned"]["comparable"]) & {
        t.number for t in blind if t.user_attrs["config"]["budget"] == 0.5}


# -- the trainer's side: the epoch watch and the run figures (no Ray) ------------------------------

def test_the_epoch_watch_sees_every_epoch_stops_the_trial_and_replays_restored_epochs(tmp_path):
    """A watch that raises TrialStopped after epoch 2 ends the trial there (its checkpoint holds 2
    epochs, computed on the validation split); a resumed run first replays the 2 restored epochs
    to the watch, then trains and reports epochs 3 and 4; the result reports the training
    throughput over the 4 epochs: their training samples over their training-step seconds."""
    import torch

    from gsmsearch.trainer import TrialConfig, run_trial
    from gsmsearch.trainer._trial import TrialStopped, epoch_watch
    from gsmsearch.workloads import get_workload

    config = TrialConfig(workload="digits-mlp", workload_options={"hidden_sizes": [16]}, family="lowrank",
                         budget=0.5, epochs=4, batch_size=64, lr=0.01)
    seen = []

    def stop_after_two(report):
        seen.append(report)
        if report["epoch"] == 2:
            raise TrialStopped("enough", report["epoch"])

    with epoch_watch(stop_after_two), pytest.raises(TrialStopped) as stopped:
        run_trial(config, checkpoint_dir=tmp_path)
    assert stopped.value.epoch == 2 and [r["epoch"] for r in seen] == [1, 2]
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 2
    splits = get_workload("digits-mlp", hidden_sizes=[16]).load_data(seed=0)
    assert [r["samples"] for r in seen] == [len(splits.train)] * 2  # every training sample, once an epoch
    assert all(0 < r["step_seconds"] < r["seconds"] for r in seen)  # validation is outside the steps

    resumed = []
    with epoch_watch(resumed.append):
        result = run_trial(config, checkpoint_dir=tmp_path)
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    assert [r["val"] for r in resumed[:2]] == [r["val"] for r in seen]  # the restored epochs, as reported
    assert result.epochs_run == 4
    assert result.samples_per_second == pytest.approx(
        4 * len(splits.train) / sum(c["step_seconds"] for c in result.curves), rel=1e-12)
    assert result.peak_memory_kind == "process_peak_rss" and result.peak_memory_bytes > 0
    assert result.precision == "fp32" and result.world_size == 1
    from gsmsearch.trainer._trial import _WATCH

    assert getattr(_WATCH, "callback", None) is None  # the watch belongs to its block only


# -- the benchmark's replay (bench/pruning.py --replay) ------------------------------------------

def _row(number, curve_values, quality_cost):
    return {"number": number, "digest": f"d{number}", "state": "COMPLETE", "budget": 0.3, "lr": 0.01,
            "duplicate_of": None, "values": list(quality_cost),
            "curve": [[e + 1, q] for e, q in enumerate(curve_values)], "pruned_at": None}


def test_the_benchmark_replay_decides_as_the_pruner_and_counts_epochs():
    """Three trials of one budget, one at a time, asha (rungs 1 and 2, the best half continues):
    trial 0 has no comparable trial and runs its 4 epochs; trial 1 trails it after epoch 1 and
    stops there; trial 2 leads at both rungs and finishes.  Epochs 4 + 1 + 4; the front is trial
    2 alone, hypervolume 0.95 * (1 - 0.3).  With hindsight, trial 2 in full (and trial 0, which
    runs before any other starts) keeps the front: 4 + 4 + 1 epochs."""
    from bench.pruning import hindsight, replay

    trials = [_row(0, [0.5, 0.6, 0.7, 0.8], (0.8, 0.3)), _row(1, [0.4, 0.5, 0.6, 0.7], (0.7, 0.3)),
              _row(2, [0.6, 0.65, 0.9, 0.95], (0.95, 0.3))]
    pruner = Pruner("asha", epochs=4, min_epochs=1, reduction_factor=2, min_trials=1)
    result = replay(trials, pruner, epochs=4, concurrency=1)
    assert result["epochs"] == 9 and result["complete"] == 2
    assert result["hypervolume"] == pytest.approx(0.95 * 0.7, abs=1e-12)  # one rectangle, exact up to rounding
    assert hindsight(trials, epochs=4, concurrency=1) == {"epochs": 9, "full": [0, 2]}
    # two at a time: trial 1 reports epoch 1 after trial 0 did, and stops there all the same
    assert replay(trials, Pruner("asha", epochs=4, min_epochs=1, reduction_factor=2, min_trials=1),
                  epochs=4, concurrency=2)["epochs"] == 9


def test_the_benchmark_baseline_must_have_the_same_spec(tmp_path):
    from bench.pruning import load_baseline, spec

    body = spec("pruning-SEED", 0, {"name": "asha"}, quick=True, trials=6, epochs=4, concurrency=2)
    path = tmp_path / "result.json"
    path.write_text(__import__("json").dumps({"spec": body, "rows": [{"seed": 0, "none": {"epochs": 24}}]}))
    other_pruner = spec("pruning-SEED", 0, {"name": "median"}, quick=True, trials=6, epochs=4, concurrency=2)
    assert load_baseline(str(path), other_pruner, [0]) == {0: {"epochs": 24}}  # the pruner may differ
    with pytest.raises(SystemExit, match="spec differs"):
        load_baseline(str(path), spec("x", 0, {}, quick=True, trials=7, epochs=4, concurrency=2), [0])
    with pytest.raises(SystemExit, match=r"seed\(s\) \[1\]"):
        load_baseline(str(path), body, [0, 1])


def test_the_benchmark_file_without_a_pruner_serves_as_baseline_and_replay(tmp_path):
    """``--pruner none`` writes the runs without a pruner only: no ratios, no targets; the file is
    taken as ``--baseline`` by a pruned run of the same spec and replayed by ``--replay``."""
    import argparse
    import json

    from bench.pruning import load_baseline, replay_grid, spec, write_report

    body = spec("pruning-SEED", 0, {"name": "none"}, quick=True, trials=2, epochs=4, concurrency=1)
    none = {"epochs": 8, "hypervolume": 0.95 * 0.7,
            "trials": [_row(0, [0.5, 0.6, 0.7, 0.8], (0.8, 0.3)), _row(1, [0.6, 0.65, 0.9, 0.95], (0.95, 0.3))]}
    args = argparse.Namespace(pruner="none", baseline=None, out=str(tmp_path / "none.json"))
    report = write_report(args, body, [{"seed": 0, "none": none}])
    assert json.loads((tmp_path / "none.json").read_text()) == report
    assert set(report) == {"spec", "baseline", "rows"}  # no ratio without a pruned side
    asha = spec("pruning-SEED", 0, {"name": "asha"}, quick=True, trials=2, epochs=4, concurrency=1)
    assert load_baseline(args.out, asha, [0]) == {0: none}
    assert replay_grid(args.out, str(tmp_path / "replay.json")) == 0
    replayed = json.loads((tmp_path / "replay.json").read_text())
    # trial 0 runs alone before trial 1 starts, so no setting stops it; hindsight keeps both in full
    assert replayed["hindsight"] == [{"seed": 0, "epochs": 8, "full": [0, 1], "epochs_ratio": 1.0}]
