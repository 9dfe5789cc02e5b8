"""Studies other tools read right: a study the driver wrote (a dense arm that breaks the FLOPs
constraint, and a low-rank arm that keeps it) read by optuna-dashboard's own server on 127.0.0.1
(from a copy of the SQLite file, never the live one), by Optuna, by our own readers (both of
Optuna's constraint forms), and by ``gsmsearch export`` (CSV and Parquet)."""
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from gsmsearch.cli import main
from gsmsearch.search import study_records
from gsmsearch.search._study import front_records, trial_constraints

from .search.conftest import TINY_SPEC

CONSTRAINT_MAX = 0.35
SPEC = {**TINY_SPEC, "name": "tools",
        "workload": {**TINY_SPEC["workload"], "epochs": 1},
        "families": {"dense": {}, "lowrank": {"budget": [0.1, 0.2]}},
        "constraints": [{"metric": "relative_flops", "max": CONSTRAINT_MAX},
                        {"metric": "params", "min": 1}],  # always holds: two constraints, in order
        "trials": 3}


def dominates(a, b):
    """``a`` dominates ``b`` for (quality: maximise, relative_flops: minimise)."""
    return a[0] >= b[0] and a[1] <= b[1] and a != b


def front(trials):
    return {t["number"] for t in trials if not any(dominates(o["values"], t["values"]) for o in trials)}


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    """(spec path, SQLite file) of a study the driver ran: one dense trial, two low-rank ones."""
    folder = tmp_path_factory.mktemp("tools")
    spec = folder / "tools.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    assert main(["launch", str(spec), "--status-interval", "30"]) == 0
    return spec, folder / "tools.db"


def load(db):
    return optuna.load_study(study_name="tools", storage=f"sqlite:///{db}")


def test_the_driver_records_both_constraint_forms(study_file):
    study = load(study_file[1])
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.params["family"] for t in complete) == ["dense", "lowrank", "lowrank"]
    for t in complete:
        flops, params = t.user_attrs["result"]["relative_flops"], t.user_attrs["result"]["params"]
        # the list form, in the spec's order, holds exactly the values set_constraint stored
        assert t.system_attrs["constraints"] == [t.system_attrs["constraints:relative_flops"],
                                                 t.system_attrs["constraints:params"]]
        assert t.system_attrs["constraints"] == pytest.approx([flops - CONSTRAINT_MAX, 1 - params], abs=1e-12)
        # our readers count each constraint once (the named form), whatever else the trial holds
        assert trial_constraints(t.system_attrs) == {"relative_flops": t.system_attrs["constraints:relative_flops"],
                                                     "params": t.system_attrs["constraints:params"]}
    (dense,) = [t for t in complete if t.params["family"] == "dense"]
    assert dense.values[1] == 1.0 and dense.system_attrs["constraints"][0] == pytest.approx(1 - CONSTRAINT_MAX)
    # Optuna reads both forms into one feasibility: the dense trial is never on its front
    feasible = {t.number for t in complete if t.values[1] <= CONSTRAINT_MAX}
    assert {t.number for t in study.best_trials} == front(
        [{"number": t.number, "values": t.values} for t in complete if t.number in feasible])
    assert dense.number not in {t.number for t in study.best_trials}
    assert {r.number for r in front_records(study_records(study), ["maximize", "minimize"])} \
        == {t.number for t in study.best_trials}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_optuna_dashboard_sees_the_dense_trial_as_infeasible(study_file, tmp_path):
    copy = tmp_path / "copy.db"  # never the live file
    shutil.copyfile(study_file[1], copy)
    port = free_port()
    cli = Path(sys.executable).parent / "optuna-dashboard"  # its console script, as users run it
    assert cli.is_file(), "optuna-dashboard is in the test extra: scripts/setup.sh --test installs it"
    server = subprocess.Popen([str(cli), f"sqlite:///{copy}", "--host", "127.0.0.1", "--port", str(port),
                               "--server", "wsgiref"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # readiness, not a timing: the first answer of its API
            try:
                studies = get_json(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "optuna-dashboard did not answer within 60 s"
                time.sleep(0.2)
        (listed,) = [s for s in studies if s["study_name"] == "tools"]
        detail = get_json(f"{base}/api/studies/{listed['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert len(complete) == 3
    study = load(study_file[1])
    dense = next(t.number for t in study.trials if t.params.get("family") == "dense")
    for t in complete:  # the list the dashboard reads is the one the driver recorded
        assert t["constraints"] == study.trials[t["number"]].system_attrs["constraints"]
    # the dense trial has the best quality and is dense: without constraints it is on the front
    # (the server's own best_trials ignores constraints, whatever the study records) ...
    unconstrained = front(complete)
    assert dense in unconstrained and {t["number"] for t in detail["best_trials"]} == unconstrained
    # ... and the dashboard's Pareto plot splits the trials by `constraints.every(c <= 0)` before
    # it draws the front (its bundle): the dense trial is infeasible there, off the front
    feasible = [t for t in complete if all(c <= 0 for c in t["constraints"])]
    assert dense not in {t["number"] for t in feasible}
    assert front(feasible) == {t.number for t in study.best_trials}


def test_our_readers_read_the_list_form_alone(tmp_path):
    """A study whose trials hold only the list form (Optuna's constraints_func, other tools):
    status, the dashboard's data and export see the same feasibility as Optuna."""
    from optuna.trial import create_trial

    db = tmp_path / "listed.db"
    study = optuna.create_study(study_name="listed", storage=f"sqlite:///{db}", directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "relative_flops"])
    for quality, flops in ((0.9, 1.0), (0.8, 0.2), (0.7, 0.3)):
        study.add_trial(create_trial(values=[quality, flops], params={}, distributions={},
                                     system_attrs={"constraints": [flops - CONSTRAINT_MAX]}))
    records = study_records(study)
    assert [r.constraints for r in records] == [{"0": pytest.approx(v - CONSTRAINT_MAX)} for v in (1.0, 0.2, 0.3)]
    assert [r.feasible for r in records] == [False, True, True]
    assert {r.number for r in front_records(records, ["maximize", "minimize"])} == \
        {t.number for t in study.best_trials} == {1}
    from gsmsearch.dashboard._source import StudySource, load_view

    view = load_view(StudySource(name="listed", url=f"sqlite:///{db}", label="listed"), "0")
    assert [r.feasible for r in view.records] == [False, True, True]
    out = tmp_path / "listed.csv"
    assert main(["export", "listed", "--storage", f"sqlite:///{db}", "-o", str(out)]) == 0
    assert pd.read_csv(out)["feasible"].tolist() == [False, True, True]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_has_feasibility_and_the_result_metrics_as_columns(study_file, tmp_path, fmt):
    spec, db = study_file
    out = tmp_path / f"trials.{fmt}"
    assert main(["export", str(spec), "--format", fmt, "-o", str(out)]) == 0
    frame = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    study = load(db)
    assert len(frame) == len(study.trials) == 3
    for row in frame.to_dict("records"):
        trial = study.trials[row["number"]]
        result = trial.user_attrs["result"]
        assert row["family"] == trial.params["family"]
        assert bool(row["feasible"]) == (result["relative_flops"] <= CONSTRAINT_MAX and result["params"] >= 1)
        assert bool(row["feasible"]) == (row["family"] != "dense")
        assert row["val_quality"] == result["val_quality"] == trial.values[0]
        assert row["test_quality"] == result["test_quality"]
        # exact in both formats: CSV writes floats with round-trip precision
        for metric in ("relative_flops", "params", "dense_params", "latency_ms", "epochs_run",
                       "flops_per_sample", "train_seconds"):
            assert row[metric] == result[metric], metric
        assert row["relative_flops"] == trial.values[1] and row["epochs_run"] == 1
    if fmt == "parquet":
        assert str(frame["feasible"].dtype) == "boolean"  # nullable: empty for a trial that did not complete


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("older", [False, True])
def test_a_gp_study_holds_one_constraint_form_per_trial(tmp_path, older):
    """Optuna's GPSampler refuses trials with different numbers of constraints (the list form
    counts again): a GP study whose completed trials hold only the named form (an older
    gsmsearch recorded them) goes on without the list; a fresh one records both.  Past the
    sampler's 10 startup trials, so that its next ask reads every trial's constraints."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from .search.test_driver_units import make_driver, outcome

    driver, _ = make_driver(tmp_path, {"sampler": {"name": "gp", "seed": 0}, "concurrency": 1, "trials": 20})
    for i in range(10 if older else 0):
        flops = 0.1 + 0.05 * i
        driver.study.add_trial(create_trial(
            values=[0.5 + 0.02 * i, flops], params={"family": "lowrank"},
            distributions={"family": CategoricalDistribution(["gblr", "lowrank"])},
            system_attrs={"constraints:relative_flops": flops - 0.35},
            user_attrs={"result": {"quality": 0.5 + 0.02 * i, "relative_flops": flops}}))
    for step in range(1 if older else 11):
        driver.fill()
        (ref, entry), = driver.running.items()
        driver.running.pop(ref)
        flops = 0.12 + 0.04 * step
        driver.tell(entry, outcome({"quality": 0.6 + 0.01 * step, "relative_flops": flops}), received=110.0)
    complete = driver.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 11
    told = complete[-1]
    assert told.system_attrs["constraints:relative_flops"] == pytest.approx(told.values[1] - CONSTRAINT_MAX)
    assert ("constraints" in told.system_attrs) == (not older)
    assert len({len(t.constraints) for t in complete}) == 1  # what GPSampler requires
    driver.fill()  # the GP sampler asks with every completed trial's constraints
    assert len(driver.running) == 1
