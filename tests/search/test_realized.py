"""Realised keys (``gsmsearch.search._realized``): two configurations get the same key exactly
when they build the same model, for every family whose structure a budget quantises (unit tests,
no Ray); and a study on a real local Ray with SQLite trains such a model once."""
import itertools

import pytest
import torch

from gsmsearch.search._realized import KEYED_FAMILIES, STRUCTURAL_OPTIONS, Realizer, realized_structure
from gsmsearch.structured import get_family
from gsmsearch.trainer import TrialConfig, build_trial_model
from gsmsearch.workloads import get_workload

from .conftest import TINY_SPEC

QUANTISED = sorted(STRUCTURAL_OPTIONS)  # every family with a quantised budget
# the families whose key is the structure itself (the others: the candidates from_dense scores)
DETERMINED = ("lowrank", "blockdiag", "monarch", "blast")
SUMMARY_KEYS = {"blocklowrank": ("num_blocks", "rank"),
                "blocksparse": ("block_size", "butterfly_size", "lowrank_rank")}
BUDGETS = [round(0.02 * i, 2) for i in range(1, 51)]  # 0.02 .. 1.0
MLP = {"hidden_sizes": [32, 32]}  # digits-mlp: layers 64 -> 32 and 32 -> 32


def config(family="lowrank", budget=0.1, **fields) -> TrialConfig:
    return TrialConfig(**{"workload": "digits-mlp", "workload_options": dict(MLP), "family": family,
                          "budget": budget, "epochs": 1, **fields})


def built_structure(family, weight, budget, options=None):
    """What from_dense builds, as the realised structure names it (or the error class)."""
    try:
        summary = get_family(family).from_dense(weight, None, budget=budget, **(options or {})).structure_summary()
    except ValueError as error:
        return type(error).__name__
    return summary


@pytest.mark.parametrize("family", QUANTISED)
def test_the_realised_structure_is_what_from_dense_builds(family):
    """On three shapes (one square, two with sizes that do not divide) and 50 budgets: the
    realised structure is the layer from_dense builds from a random weight, or, for the families
    that choose by approximation error, the layer built is one of the realised candidates; a
    budget the family refuses is refused by both."""
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for out_features, in_features in [(32, 64), (20, 12), (17, 33)]:
        weight = torch.randn(out_features, in_features, generator=generator)
        for budget in BUDGETS:
            built = built_structure(family, weight, budget)
            try:
                realised = realized_structure(family, in_features, out_features, budget)
            except ValueError as error:
                assert built == type(error).__name__, (out_features, in_features, budget, built)
                continue
            assert isinstance(built, dict), (out_features, in_features, budget, realised, built)
            if "candidates" in realised:
                assert [built[k] for k in SUMMARY_KEYS[family]] in realised["candidates"]
            else:
                assert {k: built[k] for k in realised} == realised, (out_features, in_features, budget)
            checked += 1
    assert checked >= 60  # most budgets fit the family


@pytest.mark.parametrize("family, options", [
    ("lowrank", {"rank": 3}), ("blockdiag", {"num_blocks": 4}), ("monarch", {"num_blocks": 4}),
    ("blast", {"num_blocks": 2}), ("blast", {"rank": 3}), ("blocklowrank", {"num_blocks": 2}),
    ("blocklowrank", {"rank": 1}), ("blocksparse", {"block_size": 8}), ("blocksparse", {"lowrank_rank": 2}),
])
def test_the_realised_structure_follows_the_structural_options(family, options):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 64, generator=generator)
    for budget in BUDGETS[::3]:
        built = built_structure(family, weight, budget, options)
        try:
            realised = realized_structure(family, 64, 32, budget, options)
        except ValueError as error:
            assert built == type(error).__name__, (budget, built)
            continue
        if "candidates" in realised:
            assert [built[k] for k in SUMMARY_KEYS[family]] in realised["candidates"]
        else:
            assert {k: built[k] for k in realised} == realised, budget


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory):
    """One trained dense digits-mlp for the fine-tuning builds of every family."""
    return tmp_path_factory.mktemp("dense-cache")


def keys_by_budget(family, **fields):
    realizer = Realizer()
    return {budget: realizer.key(config(family, budget, **fields)) for budget in BUDGETS}


@pytest.mark.parametrize("family", QUANTISED)
@pytest.mark.parametrize("mode", ["scratch", "finetune"])
def test_budgets_with_the_same_key_build_the_same_model_and_others_do_not(family, mode, dense_cache):
    """Budgets from 0.02 to 1 on digits-mlp: wherever two budgets share a key, the trial models
    they build (the family's layers fitted to the same seeded weights: a random init from scratch,
    the trained dense model in fine-tuning) are equal tensor for tensor; there are such pairs;
    and for the families whose key is the structure itself, different keys build different
    structures."""
    fields = {"mode": mode, "measure_latency": False}
    keys = keys_by_budget(family, **fields)
    groups = {}
    for budget, key in keys.items():
        if key is not None:
            groups.setdefault(key, []).append(budget)
    assert len(groups) >= 2, groups
    workload = get_workload("digits-mlp", **MLP)

    def build(budget):
        model = build_trial_model(config(family, budget, **fields), workload, cache_dir=dense_cache)
        summary = [m.structure_summary() for m in model.modules() if hasattr(m, "structure_summary")]
        return model.state_dict(), summary

    shared = [budgets for budgets in groups.values() if len(budgets) >= 2]
    assert shared, groups  # some budgets realise the same model
    summaries = {}
    for budgets in groups.values():
        state, summaries[budgets[0]] = build(budgets[0])
        for other in (budgets[-1],) if len(budgets) > 1 else ():
            other_state, other_summary = build(other)
            assert other_summary == summaries[budgets[0]]
            assert state.keys() == other_state.keys()
            for name in state:  # exactly: the same fit of the same weights
                assert torch.equal(state[name], other_state[name]), (budgets[0], other, name)
    if family in DETERMINED:
        shown = [repr(s) for s in summaries.values()]
        assert len(set(shown)) == len(shown)  # one key per structure


def test_lowrank_budgets_between_two_rank_steps_share_a_key():
    """The evidence of the issue in small: low-rank budgets 0.1 and 0.12 give ranks (2, 1) on
    digits-mlp 64 -> 32 -> 32; 0.13 gives (2, 2)."""
    realizer = Realizer()
    assert realizer.key(config(budget=0.1)) == realizer.key(config(budget=0.12))
    assert realizer.key(config(budget=0.12)) != realizer.key(config(budget=0.13))
    assert [realizer.structure("lowrank", i, o, 0.12, {}) for _, i, o in realizer.shapes(config().to_dict())] == [
        {"rank": 2}, {"rank": 1}]


def test_a_structural_option_and_the_budget_that_realises_it_share_a_key():
    realizer = Realizer()
    assert realizer.key(config(budget=0.5, family_options={"rank": 2})) != realizer.key(config(budget=0.1))
    # rank 1 everywhere: an explicit rank at a large budget, or a budget that allows no more
    at_budget = realizer.key(config(budget=0.07))
    assert at_budget is not None
    assert realizer.key(config(budget=0.9, family_options={"rank": 1})) == at_budget


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"lr": 0.01}, {"epochs": 2}, {"weight_decay": 0.1}, {"batch_size": 16},
    {"mode": "finetune"}, {"lr_schedule": "cosine"}, {"warmup_epochs": 0.5}, {"exclude": ["layers.1"]},
])
def test_a_different_non_structural_knob_is_a_different_key(change):
    realizer = Realizer()
    base = config(budget=0.1, epochs=3) if "warmup_epochs" in change or "epochs" in change else config(budget=0.1)
    fields = {k: v for k, v in base.to_dict().items()}
    assert realizer.key(TrialConfig(**{**fields, **change})) != realizer.key(base)
    assert realizer.key(TrialConfig(**{**fields, **change, "budget": 0.12})) == realizer.key(
        TrialConfig(**{**fields, **change}))


def test_a_fitting_option_and_the_workload_options_are_in_the_key():
    realizer = Realizer()
    sparse = config("blocksparse", 0.3)
    assert realizer.key(config("blocksparse", 0.3, family_options={"num_iters": 5})) != realizer.key(sparse)
    assert realizer.key(config("blast", 0.3, family_options={"seed": 1})) != realizer.key(config("blast", 0.3))
    wider = TrialConfig(**{**config(budget=0.1).to_dict(), "workload_options": {"hidden_sizes": [32, 48]}})
    assert realizer.key(wider) != realizer.key(config(budget=0.1))
    # what the config digest leaves out (where it runs, latency measurement) is left out too
    assert realizer.key(config(budget=0.1, measure_latency=False, device="cuda")) == realizer.key(config(budget=0.1))


def test_dense_ignores_the_budget_and_gblr_and_shared_budgets_are_not_keyed():
    realizer = Realizer()
    assert realizer.key(config("dense", 0.1)) == realizer.key(config("dense", 0.9)) is not None
    assert realizer.key(config("dense", 0.1)) != realizer.key(config("dense", 0.1, seed=3))
    # GBLR's structure is learned (scratch) or fitted to the trained weights (finetune)
    assert realizer.key(config("gblr", 0.1)) is None
    assert realizer.key(config("gblr", 0.1, mode="finetune")) is None
    # per-layer budgets read from the trained dense weights
    assert realizer.key(config("lowrank", 0.1, mode="finetune", budget_allocation="global")) is None
    # an option no family function knows, a budget the family refuses: the trial says why
    assert realizer.key(config("lowrank", 0.1, family_options={"colour": 1})) is None
    assert realizer.key(config("lowrank", 0.02)) is None  # not even rank 1 fits 32 -> 32
    assert realizer.key(TrialConfig(workload="no-such-workload", family="lowrank")) is None
    assert set(KEYED_FAMILIES) == set(QUANTISED) | {"dense"}


def test_a_realised_key_is_never_a_config_digest():
    realizer = Realizer()
    for family, budget in itertools.product(("dense", "lowrank"), (0.1, 0.5)):
        assert realizer.key(config(family, budget)) != config(family, budget).digest()


# -- end to end: real Ray, SQLite ------------------------------------------------------------


def test_a_study_trains_a_model_once_when_two_budgets_realise_it(write_spec, tmp_path):
    """Low-rank budgets 0.1 and 0.12 give the same ranks: a two-configuration space holds one
    model.  With the random sampler of seed 0 (it proposes 0.12, then 0.1) the second proposal
    is recorded as a duplicate of the first trial with its values, not trained; the study stops
    with the space exhausted after one training, and a resumed launch trains nothing more."""
    import optuna

    from gsmsearch.search import launch, study_records

    spec = write_spec({"families": {"lowrank": {"budget": [0.1, 0.12]}}, "trials": 2, "concurrency": 1,
                       "constraints": [], "sampler": {"name": "random", "seed": 0},
                       "workload": {**TINY_SPEC["workload"], "epochs": 1}})
    summary = launch(spec, status_interval=1e9)
    assert summary.completed == 1
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    trained, duplicate = study.get_trials()
    assert trained.state.name == "COMPLETE" and "duplicate_of" not in trained.user_attrs
    assert (trained.params["lowrank.budget"], duplicate.params["lowrank.budget"]) == (0.12, 0.1)
    assert duplicate.user_attrs["duplicate_of"] == trained.number
    assert duplicate.user_attrs["duplicate_reason"] == f"realises the same structure as trial {trained.number}"
    assert duplicate.state.name == "COMPLETE" and duplicate.values == trained.values  # told to the sampler
    workdir = tmp_path / ".gsmsearch" / "tiny"
    assert len(list((workdir / "checkpoints").iterdir())) == 1  # one training
    assert [p.name for p in (workdir / "structures").iterdir()] == [f"trial-{trained.number}.safetensors"]
    assert [(r.number, r.state) for r in study_records(study)] == [(0, "COMPLETE"), (1, "PRUNED")]
    assert [m["number"] for m in summary.front] == [trained.number]
    # the duplicate's model is the one its original trained
    from gsmsearch import structure_file
    storage = f"sqlite:///{tmp_path / 'tiny.db'}"
    assert structure_file((storage, "tiny", duplicate.number)) == structure_file((storage, "tiny", trained.number))

    resumed = launch(spec, resume=True, status_interval=1e9)
    assert resumed.completed == 1
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}").get_trials()
    assert [t.number for t in trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs] == [
        trained.number]
    assert all(t.user_attrs.get("duplicate_of") == trained.number for t in trials[1:])
    assert len(list((workdir / "checkpoints").iterdir())) == 1
