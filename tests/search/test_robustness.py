"""A driver no trial can break: whatever a trial raises becomes that trial's FAIL with its message
(the project's exceptions pickle; the worker hands the driver a plain error), SIGTERM stops the
driver as Ctrl-C does, and a database that stays away ends it with a message that says so and
how to resume."""
import importlib
import inspect
import os
import pickle
import pkgutil
import re
import signal
import subprocess
import sys
import time

import pytest

import gsmsearch
from gsmsearch.search import launch
from gsmsearch.search._runner import TrialError, describe_exception, execute_trial
from gsmsearch.trainer import TrialConfig

from .conftest import TINY_SPEC
from .faults import finished as _finished, pg_start as _pg_start, pg_stop as _pg_stop, trials as _trials, wait as _wait

SLOW = {**TINY_SPEC["workload"], "epochs": 80}  # long enough that a signal lands while trials run


# -- exceptions that cross processes ---------------------------------------------------------

#: One instance of every exception class gsmsearch defines (the test below fails when a class
#: is added without an entry here).
EXAMPLES = {
    "gsmsearch.structured._common.BudgetTooSmall": lambda c: c("budget=0.05 is too small", 0.14),
    "gsmsearch.trainer._loop.TrialFailed": lambda c: c("loss diverged"),
    "gsmsearch.workloads._registry.MissingFiles": lambda c: c("no file at /data/x"),
    "gsmsearch.workloads._plugins.WorkloadReferenceError": lambda c: c("no module named 'x'"),
    "gsmsearch.workloads._plugins.WorkloadCodeError": lambda c: c("x.py:3 in f: ValueError: bad"),
    "gsmsearch.search._space._OutOfBuilds": lambda c: c(),
    "gsmsearch.search._spec.SpecError": lambda c: c("study.yaml: trials: expected > 0"),
    "gsmsearch.search._spec._TooLarge": lambda c: c("nested deeper than 64 levels"),
    "gsmsearch.search._lock.DriverLockHeld": lambda c: c("another driver is running study 'x'"),
    "gsmsearch.search._lock.DriverLockLost": lambda c: c("lost"),
    "gsmsearch.search._runner.TrialError": lambda c: c("ValueError: bad (at x.py:3 in f)"),
    "gsmsearch.search._storage.DatabaseUnreachable": lambda c: c("connection refused", 12.5,
                                                                 "postgresql+psycopg://u@h/db", "gsmsearch launch s.yaml --resume"),
    "gsmsearch.cli._errors.UsageError": lambda c: c("bad argument"),
    "gsmsearch.search._realized.NotRealizable": lambda c: c("gblr: learned in training"),
    "gsmsearch.trainer._trial.TrialStopped": lambda c: c("asha: behind at epoch 2", 2),
    "gsmsearch.workloads._hf.MissingExtra": lambda c: c("hf-causal-lm needs transformers: pip install 'gsmsearch[hf]'"),
    "gsmsearch.trainer._distributed.RankStopped": lambda c: c("rank 0 stopped the trial at epoch 2"),
}


def _gsmsearch_exception_classes():
    found = {}
    for module_info in pkgutil.walk_packages(gsmsearch.__path__, "gsmsearch."):
        if module_info.name.startswith("gsmsearch.__main__") or module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_every_gsmsearch_exception_survives_pickling():
    """What Ray does to an exception between a worker and the driver: pickle and unpickle it."""
    classes = _gsmsearch_exception_classes()
    assert set(classes) == set(EXAMPLES), "give every exception class an example in EXAMPLES"
    for name, cls in classes.items():
        error = EXAMPLES[name](cls)
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is cls and str(again) == str(error) and again.args == error.args, name
        assert vars(again) == vars(error), name
    assert pickle.loads(pickle.dumps(EXAMPLES["gsmsearch.structured._common.BudgetTooSmall"](
        classes["gsmsearch.structured._common.BudgetTooSmall"]))).cheapest_fraction == 0.14


class _TwoArguments(Exception):
    """An exception that does not unpickle (its __init__ wants two arguments, args holds one)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def test_a_trial_exception_leaves_the_worker_as_a_plain_error_with_its_line(monkeypatch, tmp_path):
    import gsmsearch.trainer

    def run_trial(config, **kwargs):
        raise _TwoArguments("the loader broke\nsecond line", 7)

    line = inspect.getsourcelines(run_trial)[1] + 1
    monkeypatch.setattr(gsmsearch.trainer, "run_trial", run_trial)
    with pytest.raises(TypeError):  # the premise: such an exception does not survive pickling
        pickle.loads(pickle.dumps(_TwoArguments("x", 1)))
    config = TrialConfig(workload="digits-mlp", family="lowrank", budget=0.3).to_dict()
    with pytest.raises(TrialError) as raised:
        execute_trial(config, str(tmp_path / "ck"), str(tmp_path / "cache"))
    expected = f"_TwoArguments: the loader broke (at {__file__}:{line} in run_trial)"
    assert raised.value.reason == expected
    assert pickle.loads(pickle.dumps(raised.value)).reason == expected


def test_a_budget_below_the_cheapest_layer_is_a_final_failure_not_an_exception(monkeypatch, tmp_path):
    from gsmsearch.structured._common import no_fit_error

    import gsmsearch.trainer

    def run_trial(config, **kwargs):
        raise no_fit_error("monarch", 0.05, 64, 512, 4608, "layer (num_blocks=64)")

    monkeypatch.setattr(gsmsearch.trainer, "run_trial", run_trial)
    outcome = execute_trial(TrialConfig(workload="digits-mlp", family="monarch", budget=0.05).to_dict(),
                            str(tmp_path / "ck"), str(tmp_path / "cache"))
    assert outcome["ok"] is False and outcome["final"] is True
    assert outcome["reason"].startswith("BudgetTooSmall: budget=0.05 is too small for a monarch layer of "
                                        "64 -> 512: the cheapest layer (num_blocks=64) costs 4608")


def test_describe_exception_points_at_the_deepest_frame_outside_installed_libraries():
    def inner():
        return int("not a number")  # the frame inside the standard library is below this one

    line = inspect.getsourcelines(inner)[1] + 1
    try:
        inner()
    except ValueError as error:
        text = describe_exception(error)
    assert text == f"ValueError: invalid literal for int() with base 10: 'not a number' (at {__file__}:{line} in inner)"


# -- on real Ray workers -----------------------------------------------------------------------

BUDGET_TOO_SMALL = {
    # a monarch layer of 64 -> 512 costs at least 0.14 of dense: budget 0.05 cannot be built
    "workload": {"name": "digits-mlp", "options": {"hidden_sizes": [512]}, "epochs": 1, "batch_size": 64,
                 "lr": 0.003, "mode": "finetune"},
    "families": {"monarch": {"budget": [0.05, 0.3]}},
    "constraints": [],
    "trials": 2,
    "concurrency": 1,
    "retries": 2,
}


def test_a_trial_whose_budget_cannot_be_built_fails_for_good_and_the_study_finishes(write_spec, tmp_path, capsys):
    """The issue's case: BudgetTooSmall (it did not unpickle, so Ray's UnserializableException
    ended the driver, and every resume re-ran the trial and ended it again)."""
    from gsmsearch.cli import main

    spec = write_spec(BUDGET_TOO_SMALL)
    assert main(["launch", str(spec), "--status-interval", "1000"]) == 0
    assert "1 complete, 1 failed" in capsys.readouterr().out
    trials = _trials(f"sqlite:///{tmp_path / 'tiny.db'}")
    by_budget = {t.user_attrs["config"]["budget"]: t for t in trials}
    assert by_budget[0.3].state.name == "COMPLETE"
    failed = by_budget[0.05]
    assert failed.state.name == "FAIL" and failed.user_attrs["final"] is True
    assert failed.user_attrs["attempts"] == 1  # a configuration that cannot be built is not retried
    assert re.fullmatch(r"BudgetTooSmall: budget=0\.05 is too small for a monarch layer of 64 -> 512: .* "
                        r"\(at \S+/gsmsearch/structured/_monarch\.py:\d+ in monarch_num_blocks\)",
                        failed.user_attrs["failure_reason"]), failed.user_attrs["failure_reason"]
    # resuming runs nothing again
    assert main(["launch", str(spec), "--resume", "--status-interval", "1000"]) == 0
    assert [t.number for t in _trials(f"sqlite:///{tmp_path / 'tiny.db'}")] == [t.number for t in trials]


def test_a_worker_error_that_cannot_be_read_back_is_retried_then_recorded(write_spec, tmp_path, monkeypatch):
    """Whatever a Ray call raises in the driver (here: an exception Ray cannot deserialize,
    raised by a worker that does not go through execute_trial) is the trial's failure, never the
    driver's end."""
    import ray

    from gsmsearch.search import _runner

    class Unreadable(Exception):  # local, so Ray ships it by value (no import of this test module)
        def __init__(self, message, code):
            super().__init__(message)
            self.code = code

    @ray.remote(max_restarts=0)
    class Broken:
        def info(self):
            return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "host": "localhost"}

        def run(self, config, checkpoint_dir, cache_dir, structure_path=None, **_):
            raise Unreadable("cannot be read back", 3)

    monkeypatch.setattr(_runner, "make_worker", lambda cpus, gpus: Broken.options(num_cpus=cpus).remote())
    spec = write_spec({"trials": 2, "concurrency": 1, "retries": 1})
    summary = launch(spec, status_interval=1e9, out=open(os.devnull, "w"))
    assert (summary.completed, summary.failed) == (0, 2)
    for trial in _trials(f"sqlite:///{tmp_path / 'tiny.db'}"):
        assert trial.state.name == "FAIL" and trial.user_attrs["final"] is True
        reason = trial.user_attrs["failure_reason"]
        assert "cannot be read back" in reason and reason.endswith("(after 2 attempt(s))"), reason


# -- SIGTERM -------------------------------------------------------------------------------------


def test_sigterm_stops_like_ctrl_c_and_resume_finishes(write_spec, tmp_path):
    """`kill`, `ray job stop`, Slurm and container stops send SIGTERM to the driver."""
    spec = write_spec({"trials": 3, "workload": SLOW})
    db = f"sqlite:///{tmp_path / 'tiny.db'}"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec), "--status-interval", "2"],
                              stdout=log, stderr=log, start_new_session=True)
    try:
        _wait(lambda: any(t.state.name == "RUNNING" for t in _trials(db)))
        time.sleep(2.0)
        os.kill(driver.pid, signal.SIGTERM)
        code = driver.wait(120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = (tmp_path / "driver.log").read_text()
    assert code == 130, text[-3000:]  # what Ctrl-C gives
    assert f"stopped; continue with: gsmsearch launch {spec} --resume" in text
    trials = _trials(db)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert interrupted and all(t.user_attrs["failure_reason"].startswith("interrupted (SIGTERM)")
                               for t in interrupted)
    finished = {t.user_attrs["config_digest"] for t in trials if t.state.name == "COMPLETE"}
    summary = launch(spec, resume=True, status_interval=1e9, out=open(os.devnull, "w"))
    assert summary.completed == 3
    trials = _trials(db)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    complete = [t.user_attrs["config_digest"] for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == len(set(complete)) == 3 and finished <= set(complete)  # none run twice
    requeued = [t for t in trials if "requeued_from" in t.user_attrs]
    assert {t.user_attrs["requeued_from"] for t in requeued} == {t.number for t in interrupted}


# -- a database that goes away -------------------------------------------------------------------


def _launch_process(spec, tmp_path, *extra, env=None):
    log = open(tmp_path / "driver.log", "w")
    return subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec), "--status-interval", "1",
                             *extra], stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, **(env or {})})


def test_postgres_away_for_30_seconds_within_the_bound_is_waited_out(
        write_spec, postgres_server, postgres_url, tmp_path):
    """30 s without the server, within the retry bound (240 s here): the driver waits it out."""
    spec = write_spec({"storage": postgres_url, "trials": 3, "workload": SLOW})
    driver = _launch_process(spec, tmp_path, env={"GSMSEARCH_STORAGE_RETRY_SECONDS": "240"})
    try:
        _wait(lambda: any(t.state.name == "COMPLETE" for t in _trials(postgres_url)))
        _pg_stop(postgres_server)
        try:
            time.sleep(30)
        finally:
            _pg_start(postgres_server)
        code = driver.wait(400)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert code == 0, (tmp_path / "driver.log").read_text()[-3000:]
    trials = _trials(postgres_url)
    assert [t.state.name for t in trials].count("COMPLETE") == 3
    assert not [t for t in trials if t.state.name == "RUNNING"]


def test_postgres_away_past_the_bound_stops_the_driver_with_how_to_resume(
        write_spec, postgres_server, postgres_url, tmp_path):
    spec = write_spec({"storage": postgres_url, "trials": 3, "workload": SLOW})
    driver = _launch_process(spec, tmp_path, env={"GSMSEARCH_STORAGE_RETRY_SECONDS": "8"})
    try:
        _wait(lambda: any(t.state.name == "COMPLETE" for t in _trials(postgres_url)))
        before = _finished(_trials(postgres_url))
        _pg_stop(postgres_server)
        try:
            code = driver.wait(180)
        finally:
            _pg_start(postgres_server)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = (tmp_path / "driver.log").read_text()
    assert code == 75, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"gsmsearch: error: the database at {postgres_url} is unreachable ("), last
    assert (f"; every finished trial is safe in it; once it is back, continue the study with: "
            f"gsmsearch launch {spec} --resume") in last, last
    assert "invalid data in the commit" not in text
    # what was finished is there; the resume recovers the rest and completes the study
    trials = _trials(postgres_url)
    assert {n: v for n, v in _finished(trials).items() if n in before} == before
    summary = launch(spec, resume=True, status_interval=1e9, out=open(os.devnull, "w"))
    assert summary.completed == 3
    trials = _trials(postgres_url)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    after = _finished(trials)
    assert {n: v for n, v in after.items() if n in before} == before  # intact
    digests = [digest for _, digest in after.values()]
    assert len(digests) == len(set(digests)) == 3  # no finished configuration ran twice
