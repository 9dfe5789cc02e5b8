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
