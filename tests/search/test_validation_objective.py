"""A study selects on validation quality: its front is the same whatever the test labels are, and
a study an older gsmsearch recorded (quality on the test split) is not continued.

The studies run through :func:`gsmsearch.search.launch` on a local Ray, with the trials executed
in this process (a worker stand-in hands each outcome to Ray with ``ray.put``) so that the test
split can be changed here, by patching the workload's loader."""
from __future__ import annotations

import optuna
import pytest
import torch
import yaml

from gsmsearch.cli import main
from gsmsearch.search import front_records, launch, study_records
from gsmsearch.workloads._digits import DigitsMLP

from .conftest import TINY_SPEC

SPEC = {**TINY_SPEC, "trials": 4, "concurrency": 1, "constraints": [],
        "families": {"gblr": {"budget": {"low": 0.1, "high": 0.5}}, "lowrank": {"budget": [0.1, 0.3, 0.5]}}}


class InProcessWorkers:
    """Stands in for ``_runner.make_worker``: each trial runs in this process when submitted,
    its outcome stored in Ray's object store (what the driver waits on and reads)."""

    def __call__(self, cpus, gpus):
        import ray

        from gsmsearch.search._runner import execute_trial

        class Run:
            @staticmethod
            def remote(config, checkpoint_dir, cache_dir, structure_path, **_):
                outcome = execute_trial(config, checkpoint_dir, cache_dir, structure_path)
                return ray.put({**outcome, "actor_id": "in-process"})

        class Info:
            @staticmethod
            def remote():
                return ray.put({"pid": 0, "node": "this-process", "host": "localhost"})

        class Worker:
            run = Run
            info = Info

        return Worker()


def _permuted_test_labels(monkeypatch):
    original = DigitsMLP.load_data

    def load_data(self, seed=0):
        splits = original(self, seed)
        inputs, labels = splits.test.tensors
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))
        splits.test = torch.utils.data.TensorDataset(inputs, labels[order])
        return splits

    monkeypatch.setattr(DigitsMLP, "load_data", load_data)


def _run(folder, monkeypatch):
    import gsmsearch.search._runner as runner

    folder.mkdir()
    spec = folder / "study.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    monkeypatch.setattr(runner, "make_worker", InProcessWorkers())
    summary = launch(spec, status_interval=1e9)
    assert summary.completed == SPEC["trials"]
    return spec, optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'tiny.db'}")


def _front(study):
    return [(r.number, r.user_attrs["config_digest"], r.values) for r in
            front_records(study_records(study), ["maximize", "minimize"])]


def test_the_front_is_chosen_on_validation_and_blind_to_the_test_labels(tmp_path, monkeypatch, capsys):
    _, plain = _run(tmp_path / "plain", monkeypatch)
    assert plain.user_attrs["objective_split"] == "val"
    for trial in plain.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        result = trial.user_attrs["result"]
        assert trial.values[0] == result["quality"] == result["val_quality"]
        assert result["test_quality"] == result["test_metrics"]["quality"]
    with monkeypatch.context() as patch:
        _permuted_test_labels(patch)
        _, permuted = _run(tmp_path / "permuted", patch)
    plain_test = [t.user_attrs["result"]["test_quality"] for t in plain.get_trials()]
    permuted_test = [t.user_attrs["result"]["test_quality"] for t in permuted.get_trials()]
    assert plain_test != permuted_test  # the test labels did change the test metrics ...
    assert _front(permuted) == _front(plain)  # ... and nothing the study chose
    assert [t.values for t in permuted.get_trials()] == [t.values for t in plain.get_trials()]

    # readers name the split: launch's summary, status and export
    spec = tmp_path / "plain" / "study.yaml"
    capsys.readouterr()
    assert main(["launch", str(spec), "--resume"]) == 0  # finished: runs nothing, prints the front
    header = _front_header(capsys.readouterr().out, "Pareto front:")
    assert header[header.index("quality (val)") + 1:header.index("quality (val)") + 3] == ["relative_flops",
                                                                                           "quality (test)"]
    assert main(["status", str(spec)]) == 0
    out = capsys.readouterr().out
    assert ("  quality is measured on the validation split (what the front is chosen on); quality (test) is "
            "recorded beside it, never selected on") in out.splitlines()
    header = _front_header(out, "Pareto front (feasible trials):")
    assert header[:4] == ["trial", "family", "quality (val)", "quality (test)"]
    _check_export(spec, tmp_path / "plain.csv", plain, "val")

    # an older gsmsearch's study (no objective_split, completed trials) is not continued
    older = tmp_path / "older"
    older.mkdir()
    (older / "study.yaml").write_text(yaml.safe_dump(SPEC))
    storage = f"sqlite:///{older / 'tiny.db'}"
    optuna.copy_study(from_study_name="tiny", from_storage=f"sqlite:///{tmp_path / 'plain' / 'tiny.db'}",
                      to_storage=storage)
    _forget_objective_split(storage)
    capsys.readouterr()
    assert main(["launch", str(older / "study.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("gsmsearch: error: study 'tiny' was recorded with quality on the test split by an older "
                   "gsmsearch; its fronts cannot be mixed with validation-selected trials: launch the spec under "
                   "a new name, or delete the study first (optuna delete-study --study-name tiny --storage URL)")
    assert len(optuna.load_study(study_name="tiny", storage=storage).get_trials()) == SPEC["trials"]
    # ... and read back labelled: its quality is the test metric (here: the validation one, under
    # that older meaning, so the labels are what is checked)
    assert main(["status", str(older / "study.yaml")]) == 0
    out = capsys.readouterr().out
    assert ("  quality is measured on the test split: this study was recorded by an older gsmsearch and its "
            "front was chosen on test data; quality (val) beside it where recorded") in out.splitlines()
    header = _front_header(out, "Pareto front (feasible trials):")
    assert header[:4] == ["trial", "family", "quality (test)", "quality (val)"]
    _check_export(older / "study.yaml", tmp_path / "older.csv",
                  optuna.load_study(study_name="tiny", storage=storage), "test")


def _front_header(out, title):
    """The column names of the table printed under ``title`` (columns are 2+ spaces apart)."""
    import re

    lines = out.splitlines()
    return re.split(r"\s{2,}", lines[lines.index(title) + 1].strip())


def _check_export(spec, path, study, split):
    import pandas as pd

    assert main(["export", str(spec), "--format", "csv", "-o", str(path)]) == 0
    frame = pd.read_csv(path).set_index("number")
    assert set(frame["quality_split"]) == {split}
    for trial in study.get_trials():
        result = trial.user_attrs["result"]
        test = result["test_quality"] if split == "val" else result["quality"]
        assert frame.loc[trial.number, "val_quality"] == pytest.approx(result["val_quality"], rel=1e-12)
        assert frame.loc[trial.number, "test_quality"] == pytest.approx(test, rel=1e-12)


def _forget_objective_split(storage):
    """Remove the study attribute, as a study written before it existed lacks it (Optuna has no
    call that deletes a study attribute)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(storage)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("DELETE FROM study_user_attributes WHERE key = 'objective_split'"))
    engine.dispose()
    assert "objective_split" not in optuna.load_study(study_name="tiny", storage=storage).user_attrs
