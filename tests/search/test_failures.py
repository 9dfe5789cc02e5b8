"""Failures during a study: a killed worker is retried, Ctrl-C stops cleanly and resumes,
a PostgreSQL restart mid-study is survived."""
import os
import re
import signal
import subprocess
import sys
import time

from gsmsearch.search import launch

from .conftest import TINY_SPEC
from .ray_cluster import _descendants
from .faults import pg_restart, trials as _trials, wait as _wait

SLOW = {**TINY_SPEC["workload"], "epochs": 80}  # long enough that Ctrl-C lands while trials run


def _ray_worker_pids(driver: int):
    """The TrialWorker processes of the driver's own Ray (its descendants: other tests running at
    the same time have theirs)."""
    out = subprocess.run(["pgrep", "-f", "ray::TrialWorker"], capture_output=True, text=True)
    return sorted(set(map(int, out.stdout.split())) & set(_descendants(driver)))


def test_killed_worker_is_retried_and_the_study_completes(write_spec, tmp_path):
    spec = write_spec({"trials": 2, "concurrency": 1, "workload": SLOW})
    db = f"sqlite:///{tmp_path / 'tiny.db'}"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec), "--status-interval", "2"],
                              stdout=log, stderr=log, start_new_session=True)
    try:
        # once a checkpoint exists, the trial is mid-training: kill its worker process
        ckpt_root = tmp_path / ".gsmsearch" / "tiny" / "checkpoints"
        _wait(lambda: list(ckpt_root.glob("*/last.pt")) and _ray_worker_pids(driver.pid))
        for pid in _ray_worker_pids(driver.pid):
            os.kill(pid, signal.SIGKILL)
        assert driver.wait(300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = (tmp_path / "driver.log").read_text()
    assert "retrying from its last checkpoint" in text and "worker died" in text
    trials = _trials(db)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]


def test_ctrl_c_stops_cleanly_and_resume_finishes(write_spec, tmp_path):
    spec = write_spec({"trials": 4, "workload": SLOW})
    db = f"sqlite:///{tmp_path / 'tiny.db'}"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec), "--status-interval", "2"],
                              stdout=log, stderr=log, start_new_session=True)
    try:
        _wait(lambda: any(t.state.name == "RUNNING" for t in _trials(db)))
        time.sleep(2.0)
        os.killpg(driver.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the whole group
        code = driver.wait(120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = (tmp_path / "driver.log").read_text()
    assert code == 130, text[-3000:]
    assert "--resume" in text
    trials = _trials(db)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert interrupted and all("interrupted" in t.user_attrs["failure_reason"] for t in interrupted)
    summary = launch(spec, resume=True, status_interval=5)
    assert summary.completed == 4
    trials = _trials(db)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    requeued = [t for t in trials if "requeued_from" in t.user_attrs]
    assert {t.user_attrs["requeued_from"] for t in requeued} == {t.number for t in interrupted}


def test_ctrl_c_between_ask_and_submission_leaves_no_running_trial(write_spec, tmp_path, monkeypatch):
    """The narrow window the signal test above can hit by chance: Ctrl-C after a trial has been
    asked for and before it has a worker.  It is marked interrupted like the running one."""
    from gsmsearch.search import _runner

    spec = write_spec({"trials": 4, "workload": SLOW})
    original, calls = _runner.make_worker, []

    def make_worker(*args):
        calls.append(1)
        if len(calls) == 2:  # the second trial: asked, configured, no worker yet
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(_runner, "make_worker", make_worker)
    summary = launch(spec, status_interval=1e9, out=open(os.devnull, "w"))
    assert summary.interrupted
    trials = _trials(f"sqlite:///{tmp_path / 'tiny.db'}")
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    for t in trials:
        assert "interrupted" in t.user_attrs["failure_reason"] and t.user_attrs["final"] is False


def test_workers_that_always_die_end_the_launch_and_resume_runs_their_trials(write_spec, tmp_path, monkeypatch,
                                                                          capsys):
    """A worker environment where every trial's worker dies (here: its process exits as the trial
    starts; on a cluster, nodes that keep dying): each trial is retried, then recorded FAIL not
    final with ``worker_died``.  Those trials count toward the launch's target, so the launch
    ends after ``trials`` of them (it does not propose new trials without end), with exit status
    75 and the command that continues; ``--resume``, with workers that live, runs each of them
    again and completes the study with no other trial."""
    import ray

    from gsmsearch.cli import main
    from gsmsearch.search import _runner

    @ray.remote(max_restarts=0)
    class Dying:  # local, so Ray ships it by value (no import of this test module)
        def info(self):
            import os
            import socket

            return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                    "host": socket.gethostname()}

        def run(self, *args, **kwargs):
            import os
            import time

            time.sleep(1)  # the reply to ``info`` leaves the process first (it dies with it otherwise)
            os._exit(1)

    spec = write_spec({"trials": 3, "concurrency": 1, "retries": 1})
    db = f"sqlite:///{tmp_path / 'tiny.db'}"
    with monkeypatch.context() as patch:
        patch.setattr(_runner, "make_worker", lambda cpus, gpus: Dying.options(num_cpus=cpus).remote())
        assert main(["launch", str(spec), "--status-interval", "1000"]) == 75
    captured = capsys.readouterr()
    assert "study tiny: 0 complete, 0 failed, 3 to resume (their worker or node died)" in captured.out
    assert (f"gsmsearch: 3 trial(s) failed because their worker or node died; continue the study with: "
            f"gsmsearch launch {spec} --resume") in captured.err
    lost = _trials(db)
    assert [t.state.name for t in lost] == ["FAIL"] * 3  # bounded: the launch's target, no more
    for trial in lost:
        assert trial.user_attrs["final"] is False and trial.user_attrs["worker_died"] is True
        assert [p["attempt"] for p in trial.user_attrs["placements"]] == [1, 2]  # retried once
        # Ray names a dead actor by a subclass of RayActorError (ActorDiedError here)
        assert re.fullmatch(r"worker died: \w+ \(after 2 attempt\(s\)\): its worker or node died, nothing its "
                            r"configuration did; `launch --resume` runs it again from its checkpoint",
                            trial.user_attrs["failure_reason"]), trial.user_attrs["failure_reason"]
    assert main(["launch", str(spec), "--resume", "--status-interval", "1000"]) == 0
    assert "study tiny: 3 complete, 0 failed (" in capsys.readouterr().out
    trials = _trials(db)
    assert [t.state.name for t in trials] == ["FAIL"] * 3 + ["COMPLETE"] * 3
    assert [t.user_attrs["requeued_from"] for t in trials[3:]] == [0, 1, 2]
    assert [t.user_attrs["config_digest"] for t in trials[3:]] == [t.user_attrs["config_digest"] for t in lost]
    # a further resume finds nothing left to run
    assert main(["launch", str(spec), "--resume", "--status-interval", "1000"]) == 0
    assert len(_trials(db)) == 6


def test_postgres_restart_mid_study_is_survived(write_spec, postgres_server, postgres_url, tmp_path):
    spec = write_spec({"storage": postgres_url, "trials": 4, "workload": SLOW})
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec), "--status-interval", "1"],
                              stdout=log, stderr=log, start_new_session=True)
    try:
        _wait(lambda: any(t.state.name == "COMPLETE" for t in _trials(postgres_url)), timeout=240)
        pg_restart(postgres_server)
        code = driver.wait(300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert code == 0, (tmp_path / "driver.log").read_text()[-3000:]
    trials = _trials(postgres_url)
    assert [t.state.name for t in trials].count("COMPLETE") == 4
    assert not [t for t in trials if t.state.name == "RUNNING"]
