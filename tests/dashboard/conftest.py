"""Seeded studies for the dashboard tests: written directly with Optuna (no training), covering
several families, front / dominated / infeasible trials, failures, a duplicate and a running trial,
with a study name and failure messages that are HTML/JS."""
import math
import socket
import warnings

import pytest

HOSTILE_NAME = "<b>bold</b><script>window.__xss = 'name'</script>&amp;"
HOSTILE_REASONS = [
    '<img src=x onerror="window.__xss = \'img\'">',
    "<script>window.__xss = 'reason'</script> RuntimeError: loss is nan",
]
CONSTRAINT_MAX = 0.5  # relative_flops <= 0.5

#: (family, relative_flops, quality) of the COMPLETE trials of the main study, in trial order
MAIN_TRIALS = [
    ("gblr", 0.10, 0.80), ("gblr", 0.20, 0.85), ("gblr", 0.30, 0.90), ("gblr", 0.25, 0.82),
    ("gblr", 0.60, 0.95), ("gblr", 0.40, 0.88),
    ("lowrank", 0.15, 0.70), ("lowrank", 0.30, 0.80), ("lowrank", 0.35, 0.75),
    ("monarch", 0.20, 0.78), ("monarch", 0.45, 0.86),
    ("dense", 1.00, 0.97),
]
#: expected Pareto-figure traces of the main study: gblr front/dominated/infeasible, lowrank
#: front/dominated, monarch front, dense model
MAIN_TRACES = 7
MAIN_POINTS = len(MAIN_TRIALS)

#: the second study (e.g. the same workload on another sampler): gblr and lowrank only
SECOND_TRIALS = [("gblr", 0.12, 0.83), ("gblr", 0.22, 0.87), ("lowrank", 0.2, 0.74), ("lowrank", 0.4, 0.79)]
SECOND_TRACES = 2  # gblr front, lowrank front


def gblr_layers(relative: float):
    """Two GBLR layers whose intervals wrap around the matrix edges."""
    return {
        "blocks.0.fc1": {"family": "gblr", "in_features": 24, "out_features": 16, "flops": int(384 * relative),
                         "dense_flops": 384, "rank_per_component": 1, "num_components": 16,
                         "live_components": 3, "mean_width": 0.3,
                         "intervals": [[0, 8, 0, 12], [12, 8, 20, 10], [4, 4, 6, 6]]},
        "blocks.0.fc2": {"family": "gblr", "in_features": 16, "out_features": 8, "flops": int(128 * relative),
                         "dense_flops": 128, "rank_per_component": 1, "num_components": 8,
                         "live_components": 2, "mean_width": 0.4, "intervals": [[6, 4, 14, 5], [0, 8, 0, 16]]},
    }


def other_layers(family: str, relative: float):
    return {"blocks.0.fc1": {"family": family, "in_features": 24, "out_features": 16,
                             "flops": int(384 * relative), "dense_flops": 384, "rank": 2},
            "blocks.0.fc2": {"family": family, "in_features": 16, "out_features": 8,
                             "flops": int(128 * relative), "dense_flops": 128, "rank": 1}}


def _complete(family, x, y, number_hint):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    params = {"family": family}
    distributions = {"family": CategoricalDistribution(["gblr", "lowrank", "monarch", "dense"])}
    if family != "dense":
        params[f"{family}.budget"] = x
        distributions[f"{family}.budget"] = FloatDistribution(0.01, 1.0)
    layers = gblr_layers(x) if family == "gblr" else {} if family == "dense" else other_layers(family, x)
    trial = optuna.trial.create_trial(
        params=params, distributions=distributions, values=[y, x],
        user_attrs={
            "family": family, "config_digest": f"digest-{number_hint}",
            "config": {"workload": "digits-mlp", "family": family, "budget": x, "lr": 0.003,
                       "family_options": {}, "epochs": 2},
            "result": {"quality": y, "relative_flops": x, "params": 1000, "latency_ms": 0.5,
                       "flops_per_sample": 512 * x, "dense_flops_per_sample": 512},
            "layers": layers,
            "curves": [{"epoch": 1, "train_loss": 1.0, "val": {"quality": y}, "relative_flops": x}],
        },
        system_attrs={"constraints:relative_flops": x - CONSTRAINT_MAX},
    )
    return trial


def seed_study(url: str, name: str, trials, *, failures=(), duplicate: bool = False, running: bool = False):
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["quality", "relative_flops"])
    study.set_user_attr("spec", {"name": "seeded", "workload": {"name": "digits-mlp"},
                                 "constraints": [{"metric": "relative_flops", "max": CONSTRAINT_MAX}]})
    for index, (family, x, y) in enumerate(trials):
        study.add_trial(_complete(family, x, y, index))
    family_dist = {"family": CategoricalDistribution(["gblr", "lowrank", "monarch", "dense"])}
    for reason in failures:
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.FAIL, params={"family": "gblr"}, distributions=family_dist,
            user_attrs={"family": "gblr", "failure_reason": reason, "final": True}))
    if duplicate:
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.PRUNED, params={"family": "monarch"}, distributions=family_dist,
            user_attrs={"family": "monarch", "duplicate_of": 9}))
    if running:
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.RUNNING, params={"family": "lowrank"}, distributions=family_dist,
            user_attrs={"family": "lowrank"}))
    return study


@pytest.fixture(scope="session")
def seeded_db(tmp_path_factory):
    """An SQLite file with the hostile-named main study and a second study; returns
    (path, url, main study name, second study name)."""
    path = tmp_path_factory.mktemp("dashboard") / "studies.db"
    url = f"sqlite:///{path}"
    seed_study(url, HOSTILE_NAME, MAIN_TRIALS, failures=HOSTILE_REASONS, duplicate=True, running=True)
    seed_study(url, "second-sampler", SECOND_TRIALS)
    return path, url, HOSTILE_NAME, "second-sampler"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


#: malformed or huge `layers` user attrs, one trial each in the "odd-layers" study
ODD_LAYERS = [
    {"big": {"family": "gblr", "in_features": 4096, "out_features": 4096, "flops": 10 ** 9, "dense_flops": 2 * 10 ** 9,
             "intervals": [[i * 7 % 4096, 100 + i % 900, i * 13 % 4096, 50 + i % 1000] for i in range(2000)]}},
    "not a mapping",
    [1, 2, 3],
    {"fc": "not a layer"},
    {"fc": {"family": "gblr", "in_features": "x", "out_features": 8, "intervals": [[0, 1, 0, 1]]}},
    {"fc": {"family": "gblr", "in_features": 8, "out_features": 8, "intervals": [[0, 1, 0], "x", [None, 1, 2, 3]]}},
    {"fc": {"family": "gblr", "in_features": -8, "out_features": 8, "intervals": [[0, 1, 0, 1]]}},
    {"fc": {"family": "gblr", "in_features": 8.5, "out_features": 1e30, "intervals": [[0.5, 1, 0, 1]],
            "live_components": "<b>x</b>", "flops": "many", "dense_flops": 0}},
    {"fc": {"family": ["gblr"], "in_features": True, "out_features": 8, "intervals": [[0, 1, 0, 1]]}},
    {"fc": {"family": "gblr", "in_features": 8, "out_features": 8, "intervals": [[0, -5, -3, 10 ** 12]],
            "flops": float("nan"), "dense_flops": float("inf")}},
]
ODD_NAME = "ünïcødé-名前-" + "L" * 300

#: the "odd-seeds" study: (budget, seed, quality, user attrs, constraint) per trial: seeds that are
#: not integers or None, a seed with an infinite quality, a config that is not a mapping, a
#: constraint that is not a number on one seed
ODD_SEEDS = [
    (0.2, "a", 0.8, {}, -0.1), (0.2, 1.5, float("inf"), {}, -0.1),  # one usable seed of two
    (0.2, None, 0.7, {"config": "not a mapping"}, -0.1),  # no seed: a configuration of its own
    (0.3, 0, 0.9, {}, -0.1), (0.3, 1, 0.9, {}, "not a number"),  # infeasible on average
]

#: the studies of the odd database, in creation order
ODD_STUDIES = ["plain-one", "plain-two", "empty", "no-complete", "one-complete", "single-objective", "three-objectives",
               "no-metric-names", "both-maximize", "inf-values", "odd-layers", ODD_NAME, "spec-not-a-dict",
               "odd-families", "odd-columns", "odd-seeds"]


def _like(trial, **changes):
    """A copy of a FrozenTrial from :func:`_complete` with some fields changed."""
    import optuna

    fields = dict(params=trial.params, distributions=trial.distributions, values=trial.values,
                  user_attrs=dict(trial.user_attrs), system_attrs=trial.system_attrs)
    user_attrs = changes.pop("user_attrs", {})
    fields.update(changes)
    fields["user_attrs"].update(user_attrs)
    return optuna.trial.create_trial(**fields)


def seed_odd_studies(url: str) -> None:
    """Studies a real storage can hold that gsmsearch did not write the usual way: plain Optuna
    studies (one and two objectives, params only), no trials, no completed trial, one trial, one
    and three objectives, no metric names, both objectives maximised, infinite values, malformed
    and huge layer records, non-ASCII and very long text, a spec that is not a mapping, families
    that are not strings, and parameter / metric names that clash with the table's columns."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _seed_odd_studies(url)


def _seed_odd_studies(url: str) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(study_name="plain-one", storage=url)
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2 + t.suggest_int("n", 0, 3), n_trials=3)
    study = optuna.create_study(study_name="plain-two", storage=url, directions=["minimize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1 - t.suggest_float("y", 0, 1)), n_trials=3)
    optuna.create_study(study_name="empty", storage=url, directions=["maximize", "minimize"])
    study = optuna.create_study(study_name="no-complete", storage=url, directions=["maximize", "minimize"])
    family = {"family": CategoricalDistribution(["gblr", "lowrank"])}
    study.add_trial(create_trial(state=TrialState.FAIL, params={"family": "gblr"}, distributions=family,
                                 user_attrs={"family": "gblr", "failure_reason": "boom"}))
    study.add_trial(create_trial(state=TrialState.RUNNING, params={"family": "lowrank"}, distributions=family))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"family": "lowrank"}, distributions=family))
    study.add_trial(create_trial(state=TrialState.WAITING, params={}, distributions={}))
    seed_study(url, "one-complete", [("gblr", 0.2, 0.8)])
    study = optuna.create_study(study_name="single-objective", storage=url, direction="maximize")
    study.set_metric_names(["quality"])
    for index, (fam, x, y) in enumerate([("gblr", 0.3, 0.9), ("lowrank", 0.2, 0.7)]):
        study.add_trial(_like(_complete(fam, x, y, index), values=[y]))
    study = optuna.create_study(study_name="three-objectives", storage=url,
                                directions=["maximize", "minimize", "minimize"])
    study.set_metric_names(["quality", "relative_flops", "latency_ms"])
    for index, (fam, x, y) in enumerate(MAIN_TRIALS[:4]):
        study.add_trial(_like(_complete(fam, x, y, index), values=[y, x, 0.5]))
    study = optuna.create_study(study_name="no-metric-names", storage=url, directions=["maximize", "minimize"])
    for index, (fam, x, y) in enumerate(MAIN_TRIALS[:3]):
        trial = _complete(fam, x, y, index)
        trial.user_attrs.pop("result")
        study.add_trial(_like(trial))
    study = optuna.create_study(study_name="both-maximize", storage=url, directions=["maximize", "maximize"])
    study.set_metric_names(["quality", "relative_flops"])
    for index, (fam, x, y) in enumerate(MAIN_TRIALS[:3]):
        study.add_trial(_complete(fam, x, y, index))
    study = optuna.create_study(study_name="inf-values", storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "relative_flops"])
    inf = float("inf")
    for index, (y, x) in enumerate([(0.8, 0.1), (inf, 0.2), (0.7, inf), (-inf, 0.3), (0.9, -inf)]):
        study.add_trial(_like(_complete("gblr", 0.1, 0.8, index), values=[y, x],
                              user_attrs={"result": {"quality": y, "relative_flops": x}}))
    study = optuna.create_study(study_name="odd-layers", storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "relative_flops"])
    for index, layers in enumerate(ODD_LAYERS):
        x, y = 0.05 + 0.03 * index, 0.5 + 0.03 * index
        study.add_trial(_like(_complete("gblr", x, y, index), user_attrs={"layers": layers}))
    study = optuna.create_study(study_name=ODD_NAME, storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "relative_flops"])
    study.set_user_attr("spec", {"name": "ü", "workload": "not a mapping"})
    for index, (fam, x, y) in enumerate(MAIN_TRIALS[:3]):
        trial = _complete(fam, x, y, index)
        study.add_trial(_like(trial, user_attrs={
            "failure_reason": "émoji 🎉 " + "z" * 20000,
            "config": dict(trial.user_attrs["config"], note="日本語 " * 3000),
            "layers": {"層" * 200 + name: layer for name, layer in trial.user_attrs["layers"].items()}}))
    study = optuna.create_study(study_name="spec-not-a-dict", storage=url, directions=["maximize", "minimize"])
    study.set_user_attr("spec", "a string")
    study.add_trial(_complete("gblr", 0.2, 0.8, 0))
    study = optuna.create_study(study_name="odd-families", storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "relative_flops"])
    for index, fam in enumerate([["gblr"], {"a": 1}, 5, "", "Ω-family"]):
        study.add_trial(_like(_complete("gblr", 0.1 + 0.1 * index, 0.8, index), params={"x": 0.1},
                              distributions={"x": FloatDistribution(0, 1)}, values=[0.8, 0.1 + 0.1 * index],
                              user_attrs={"family": fam, "result": "not a mapping", "config": ["x"]}))
    study = optuna.create_study(study_name="odd-columns", storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "id"])  # a metric named like the table's row id
    names = ["x{y}", 'q"uote', "state"]
    for index in range(2):
        params = {name: 0.1 * (index + 1) for name in names}
        params["family"] = "gblr"
        distributions = {name: FloatDistribution(0, 1) for name in names}
        distributions["family"] = CategoricalDistribution(["gblr"])
        study.add_trial(_like(_complete("gblr", 0.1 * (index + 1), 0.8, index), params=params,
                              distributions=distributions,
                              system_attrs={"constraints:relative_flops": "not a number"}))
    study = optuna.create_study(study_name="odd-seeds", storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "relative_flops"])
    for index, (budget, seed, y, attrs, constraint) in enumerate(ODD_SEEDS):
        params = {"family": "gblr", "gblr.budget": budget, "seed": seed}
        distributions = {"family": CategoricalDistribution(["gblr"]), "gblr.budget": FloatDistribution(0, 1),
                         "seed": CategoricalDistribution([None, "a", 1.5, 0, 1])}
        study.add_trial(_like(_complete("gblr", budget, 0.8, index), params=params, distributions=distributions,
                              values=[y, budget],
                              user_attrs=dict(attrs, result={"quality": y, "relative_flops": budget}),
                              system_attrs={"constraints:relative_flops": constraint}))


@pytest.fixture(scope="session")
def odd_db(tmp_path_factory):
    """An SQLite file holding the studies of :func:`seed_odd_studies`; returns (path, url)."""
    path = tmp_path_factory.mktemp("odd") / "odd.db"
    url = f"sqlite:///{path}"
    seed_odd_studies(url)
    return path, url


#: the multi-seed study: (family, budget knob, seed, relative_flops, quality) of its COMPLETE
#: trials; GBLR's relative FLOPs vary a little with the seed (learned widths), the others' do not
SEEDED_TRIALS = [
    ("gblr", 0.2, 0, 0.20, 0.84), ("gblr", 0.2, 1, 0.21, 0.86), ("gblr", 0.2, 2, 0.19, 0.85),
    ("gblr", 0.3, 0, 0.30, 0.88), ("gblr", 0.3, 1, 0.30, 0.90),  # seed 2 failed
    ("gblr", 0.1, 0, 0.10, 0.80),  # one seed only (its others not run yet)
    ("lowrank", 0.2, 0, 0.20, 0.83), ("lowrank", 0.2, 1, 0.20, 0.70), ("lowrank", 0.2, 2, 0.20, 0.72),
    ("lowrank", 0.3, 0, 0.30, 0.80), ("lowrank", 0.3, 1, 0.30, 0.81), ("lowrank", 0.3, 2, 0.30, 0.79),
    ("dense", None, 0, 1.00, 0.97), ("dense", None, 1, 1.00, 0.96), ("dense", None, 2, 1.00, 0.98),
]
#: (family, budget knob, seed) of its failed trial
SEEDED_FAILED = ("gblr", 0.3, 2)
#: configurations drawn (one point each): gblr 0.1 / 0.2 / 0.3, lowrank 0.2 / 0.3, dense
SEEDED_POINTS = 6


def _seeded_trial(family, budget, seed, x, y, index, state=None):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState

    trial = _complete(family, x, y, index)
    params = {"family": family, "seed": seed}
    distributions = {"family": trial.distributions["family"], "seed": CategoricalDistribution([0, 1, 2])}
    config = dict(trial.user_attrs["config"], seed=seed, budget=budget)
    if budget is not None:
        params[f"{family}.budget"] = budget
        distributions[f"{family}.budget"] = FloatDistribution(0.01, 1.0)
    if state == TrialState.FAIL:
        return optuna.trial.create_trial(
            state=state, params=params, distributions=distributions,
            user_attrs={"family": family, "config": config, "failure_reason": "loss is nan", "final": True})
    return _like(trial, params=params, distributions=distributions, user_attrs={"config": config})


def seed_multi_seed_study(url: str, name: str):
    """A study whose configurations ran with seeds 0, 1 and 2 (see ``SEEDED_TRIALS``)."""
    from optuna.trial import TrialState

    study = seed_study(url, name, [])
    for index, (family, budget, seed, x, y) in enumerate(SEEDED_TRIALS):
        study.add_trial(_seeded_trial(family, budget, seed, x, y, index))
    family, budget, seed = SEEDED_FAILED
    study.add_trial(_seeded_trial(family, budget, seed, 0.3, 0.0, len(SEEDED_TRIALS), state=TrialState.FAIL))
    return study


@pytest.fixture(scope="session")
def multi_seed_db(tmp_path_factory):
    """An SQLite file with the multi-seed study "seeds"; returns (path, url)."""
    path = tmp_path_factory.mktemp("seeds") / "seeds.db"
    url = f"sqlite:///{path}"
    seed_multi_seed_study(url, "seeds")
    return path, url
