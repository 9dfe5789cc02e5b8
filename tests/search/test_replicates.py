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
