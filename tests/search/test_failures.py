"""Failures during a study: a killed worker is retried, Ctrl-C stops cleanly and resumes,
a PostgreSQL restart mid-study is survived."""
import os
import signal
import subprocess
import sys
import time

import optuna

from gsmsearch.search import launch

from .conftest import TINY_SPEC

SLOW = {**TINY_SPEC["workload"], "epochs": 80}  # long enough that Ctrl-C lands while trials run


def _ray_worker_pids(driver: int):
    """The TrialWorker processes of the driver's own Ray (its descendants: other tests running at
    the same time have theirs)."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue

    def descends(pid):
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == driver:
                return True
        return False

    out = subprocess.run(["pgrep", "-f", "ray::TrialWorker"], capture_output=True, text=True)
    return [pid for pid in map(int, out.stdout.split()) if descends(pid)]


def _wait(predicate, timeout=180, interval=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def _trials(db):
    try:
        return optuna.load_study(study_name="tiny", storage=db).get_trials()
    except Exception:  # noqa: BLE001 - not created yet
        return []


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


def test_postgres_restart_mid_study_is_survived(write_spec, postgres_server, postgres_url, tmp_path):
    spec = write_spec({"storage": postgres_url, "trials": 4, "workload": SLOW})
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec), "--status-interval", "1"],
                              stdout=log, stderr=log, start_new_session=True)
    try:
        _wait(lambda: any(t.state.name == "COMPLETE" for t in _trials(postgres_url)), timeout=240)
        # the restarted server must not inherit our pipes (it outlives pg_ctl): log to a file
        subprocess.run(postgres_server["ctl"] + ["-m", "fast", "-w", "-l", str(postgres_server["root"] / "log"),
                       "restart", "-o",
                       f"-c listen_addresses=127.0.0.1 -p {postgres_server['port']} -k {postgres_server['sock']}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        code = driver.wait(300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert code == 0, (tmp_path / "driver.log").read_text()[-3000:]
    trials = _trials(postgres_url)
    assert [t.state.name for t in trials].count("COMPLETE") == 4
    assert not [t for t in trials if t.state.name == "RUNNING"]
