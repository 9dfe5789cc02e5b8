"""Seeds as replicates: the parameters queued so that a configuration runs under every seed."""
import optuna
import pytest

from gsmsearch.search._replicates import replicate_params, waiting_params
from gsmsearch.search._space import trial_config
from gsmsearch.search._spec import spec_from_dict
from gsmsearch.trainer import TrialConfig

from .conftest import TINY_SPEC

SEEDS = {**TINY_SPEC, "workload": {**TINY_SPEC["workload"], "seeds": [0, 1, 2]}}


def digest(spec, params):
    config = trial_config(spec, optuna.trial.FixedTrial(params)).to_dict()
    return TrialConfig.from_dict(config).digest()


def test_every_other_seed_of_the_configuration_is_queued():
    spec = spec_from_dict(SEEDS)
    params = {"family": "gblr", "gblr.budget": 0.25, "seed": 1}
    siblings = replicate_params(spec, params, known={}, waiting=set())
    assert siblings == [{**params, "seed": 0}, {**params, "seed": 2}]
    # each sibling is the same configuration but for its seed
    configs = [trial_config(spec, optuna.trial.FixedTrial(p)).to_dict() for p in [params] + siblings]
    assert [c.pop("seed") for c in configs] == [1, 0, 2]
    assert configs[0] == configs[1] == configs[2]


def test_a_seed_run_running_or_waiting_is_not_queued_again():
    spec = spec_from_dict(SEEDS)
    params = {"family": "lowrank", "lowrank.budget": 0.3, "seed": 0}
    ran = {digest(spec, {**params, "seed": 1}): 7}
    queued = {"family": "lowrank", "lowrank.budget": 0.3, "seed": 2}

    class Waiting:  # a FrozenTrial's two fields that waiting_params reads
        state = optuna.trial.TrialState.WAITING
        system_attrs = {"fixed_params": dict(reversed(list(queued.items())))}  # order does not matter

    assert replicate_params(spec, params, known=ran, waiting=waiting_params([Waiting])) == []
    assert replicate_params(spec, params, known=ran, waiting=set()) == [queued]
    assert replicate_params(spec, params, known={}, waiting=waiting_params([Waiting])) == [{**params, "seed": 1}]


def test_one_seed_queues_nothing():
    spec = spec_from_dict(TINY_SPEC)
    assert replicate_params(spec, {"family": "gblr", "gblr.budget": 0.2}, known={}, waiting=set()) == []


def test_waiting_params_reads_only_queued_trials(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'w.db'}", directions=["maximize"])
    study.enqueue_trial({"family": "gblr", "seed": 2})
    done = study.ask({"family": optuna.distributions.CategoricalDistribution(["gblr"])})
    study.tell(done, [1.0])
    study.enqueue_trial({"family": "lowrank", "seed": 1})
    keys = waiting_params(study.get_trials(deepcopy=False))
    assert keys == {(("family", "'lowrank'"), ("seed", "1"))}


@pytest.mark.parametrize("seed", [0, 2])
def test_queued_seeds_are_the_complement_of_the_proposed_one(seed):
    spec = spec_from_dict(SEEDS)
    params = {"family": "lowrank", "lowrank.budget": 0.1, "seed": seed}
    assert sorted(p["seed"] for p in replicate_params(spec, params, known={}, waiting=set())) == \
        sorted({0, 1, 2} - {seed})


# -- in the driver (real SQLite Optuna study, no Ray: see test_driver_units) ----------------------


def test_the_driver_runs_each_proposed_configuration_under_every_seed(tmp_path):
    from .test_driver_units import make_driver

    driver, workers = make_driver(tmp_path, {"workload": SEEDS["workload"], "concurrency": 6, "trials": 6})
    driver.fill()
    configs = [dict(c) for c, _, _ in workers.submitted]
    assert len(configs) == 6
    seeds = [c.pop("seed") for c in configs]
    # two configurations, each under seeds 0, 1 and 2, the replicates right after the proposal
    assert sorted(seeds[:3]) == sorted(seeds[3:]) == [0, 1, 2]
    assert configs[0] == configs[1] == configs[2] and configs[3] == configs[4] == configs[5]
    assert configs[0] != configs[3]
    assert not [t for t in driver.study.get_trials() if t.state.name == "WAITING"]


def test_a_resumed_driver_queues_no_replicate_twice(tmp_path):
    """A dead driver left seed s running and seeds s', s'' queued; the next driver re-enqueues s
    and runs the three, queueing nothing more (each replicate is run, running or queued)."""
    from .test_driver_units import finish, make_driver

    spec = {"workload": SEEDS["workload"], "concurrency": 1, "trials": 6, "families": {"lowrank": {"budget": [0.3]}}}
    first, workers = make_driver(tmp_path, spec)
    first.fill()
    (proposed,) = [c["seed"] for c, _, _ in workers.submitted]
    waiting = [t for t in first.study.get_trials() if t.state.name == "WAITING"]
    assert sorted(t.system_attrs["fixed_params"]["seed"] for t in waiting) == sorted({0, 1, 2} - {proposed})

    second, again = make_driver(tmp_path, spec, resume=True, force=True)  # force: first's heartbeat is fresh
    second.recover()
    for _ in range(3):
        second.fill()
        finish(second, quality=0.5, relative_flops=0.3, test_quality=0.4)
    assert sorted(c["seed"] for c, _, _ in again.submitted) == [0, 1, 2]
    states = [t.state.name for t in second.study.get_trials()]
    assert states.count("WAITING") == 0 and states.count("COMPLETE") == 3
