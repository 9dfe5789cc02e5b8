"""Faults on a multi-node Ray cluster (``ray_cluster.py``: a head with Ray's job server and two
one-CPU nodes, every server on 127.0.0.1), against the fixtures' real PostgreSQL, with the
workdir in a folder every node sees.  Each fault loses nothing: every trial finished before it
keeps its values and configuration, the study completes with the trials it asked for, nothing is
left RUNNING or WAITING, no completed configuration ran twice.

- the driver SIGKILLed mid-study, relaunched directly with ``--resume --address``;
- the same through Ray Jobs: the job's driver SIGKILLed, a new submission with ``--resume``;
- PostgreSQL restarted mid-study, then stopped for 30 s mid-study;
- a node killed under a trial that has no retries left: the trial is recorded resumable, the
  launch ends (exit status 75) and ``--resume`` runs it on the surviving node.

One cluster serves the whole module; the node-killing test runs last (it leaves one node)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from .conftest import TINY_SPEC
from .faults import assert_nothing_lost, finished, pg_restart, pg_start, pg_stop, trials, wait
from .ray_cluster import ROOT, start as start_cluster

BIN = os.path.dirname(sys.executable)  # the environment's `ray` and `gsmsearch`, as a user's PATH has them
# trials long enough that a fault lands while one runs (a few seconds each on one CPU of this
# machine), short enough for the suite
SLOW = {**TINY_SPEC["workload"], "epochs": 30}


@pytest.fixture(scope="module")
def cluster():
    with start_cluster(nodes=2, cpus=1, dashboard=True) as running:
        yield running


def _env(**extra):
    # the cluster runs without Ray's token authentication; so must its clients (Ray turns the token
    # on in a process that finds one in ~/.ray with RAY_AUTH_MODE unset, and its children inherit it)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", **extra)
    return env


def _spec(tmp_path, storage, **overrides):
    """The study spec, in a folder of its own (a Ray Jobs working dir); the workdir is an absolute
    folder every node sees."""
    folder = tmp_path / "spec"
    folder.mkdir(exist_ok=True)
    spec = {**TINY_SPEC, "storage": storage, "executor": {}, "workdir": str(tmp_path / "work"),
            "workload": SLOW, **overrides}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _launch(spec, log_path, *extra, **env):
    log = open(log_path, "a")
    return subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec), "--status-interval", "2", *extra],
                            cwd=ROOT, stdout=log, stderr=log, start_new_session=True, env=_env(**env))


def _finish(driver, log_path, timeout=300):
    try:
        code = driver.wait(timeout)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    return code


def _mid_study(url, checkpoints, completed=1):
    """The study's trials once ``completed`` have completed and another runs past its first
    checkpoint."""
    def ready():
        now = trials(url)
        running = [t for t in now if t.state.name == "RUNNING" and t.user_attrs.get("config_digest")
                   and (checkpoints / t.user_attrs["config_digest"] / "last.pt").exists()]
        return now if running and len(finished(now)) >= completed else None

    return wait(ready, timeout=240, interval=0.3)


def _status_lines(log_path):
    """How many progress lines ("[tiny] 1/4 done, ...") the driver has written."""
    return sum(1 for line in log_path.read_text().splitlines() if re.match(r"\[tiny\] \d+/\d+ done", line))


def _requeued_from(url):
    return {t.user_attrs["requeued_from"] for t in trials(url) if "requeued_from" in t.user_attrs}


def test_driver_killed_then_relaunched_with_resume_loses_nothing(cluster, postgres_url, tmp_path):
    spec = _spec(tmp_path, postgres_url, trials=3, concurrency=2)
    log_path = tmp_path / "driver.log"
    driver = _launch(spec, log_path, "--address", cluster["address"])
    try:
        _mid_study(postgres_url, tmp_path / "work" / "checkpoints")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # its own session: the driver alone (workers belong to the raylets)
    driver.wait(60)
    left = trials(postgres_url)
    before = finished(left)
    stale = {t.number for t in left if t.state.name == "RUNNING"}
    assert before and stale
    # the relaunch on this host takes over the dead driver's lock at once (its process is gone)
    relaunch = _launch(spec, log_path, "--resume", "--address", cluster["address"])
    assert _finish(relaunch, log_path) == 0, log_path.read_text()[-4000:]
    assert f"marked {len(stale)} stale RUNNING trial(s) FAIL; re-enqueued {len(stale)}" in log_path.read_text()
    after = assert_nothing_lost(postgres_url, before, 3)
    assert _requeued_from(postgres_url) == stale  # each unfinished configuration ran again, once
    nodes = {n["node_id"] for n in cluster["nodes"]}
    assert all(t.user_attrs["node_id"] in nodes for t in after if t.state.name == "COMPLETE")


def _job(*args, timeout=120):
    done = subprocess.run([f"{BIN}/ray", "job", *args], env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _job_status(address, job, wanted, timeout=300):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)

    def status():
        found = str(client.get_job_status(job)).rsplit(".", 1)[-1]
        return found if found in wanted else None

    try:
        return wait(status, timeout=timeout, interval=1), client.get_job_logs(job)
    except AssertionError:
        raise AssertionError(f"job {job} not {wanted} in {timeout}s:\n{client.get_job_logs(job)[-3000:]}") from None


def test_job_driver_killed_then_resubmitted_with_resume_loses_nothing(cluster, postgres_url, tmp_path):
    """Ray Jobs on the multi-node cluster: `ray job submit ... -- gsmsearch launch study.yaml
    --resume` (harmless on a new study), its driver SIGKILLed mid-study, the same command
    submitted again."""
    spec = _spec(tmp_path, postgres_url, trials=3, concurrency=2)
    address = cluster["dashboard"]
    command = ["--address", address, "--working-dir", str(spec.parent), "--no-wait", "--",
               "gsmsearch", "launch", "study.yaml", "--resume", "--status-interval", "2"]
    first = f"gsm-{time.time_ns()}"
    _job("submit", "--submission-id", first, *command)
    try:
        _mid_study(postgres_url, tmp_path / "work" / "checkpoints")
        # the job's driver process, as it records itself on the study (this host, a gsmsearch launch)
        driver = optuna.load_study(study_name="tiny", storage=postgres_url).user_attrs["driver"]
        assert driver["host"] == socket.gethostname()
        with open(f"/proc/{driver['pid']}/cmdline", "rb") as f:
            assert b"launch\0study.yaml" in f.read()
        os.kill(driver["pid"], signal.SIGKILL)
    except BaseException:
        subprocess.run([f"{BIN}/ray", "job", "stop", "--address", address, first], env=_env(),
                       capture_output=True, timeout=120)
        raise
    status, logs = _job_status(address, first, {"FAILED", "SUCCEEDED", "STOPPED"})
    assert status == "FAILED", logs[-3000:]
    # the job ran on this cluster (Ray Jobs' drivers find it through the cluster's own temp folder)
    assert f"Ray cluster at {cluster['address']};" in logs
    left = trials(postgres_url)
    before = finished(left)
    stale = {t.number for t in left if t.state.name == "RUNNING"}
    assert before and stale

    second = f"gsm-{time.time_ns()}"
    _job("submit", "--submission-id", second, *command)
    status, logs = _job_status(address, second, {"FAILED", "SUCCEEDED", "STOPPED"})
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"marked {len(stale)} stale RUNNING trial(s) FAIL; re-enqueued {len(stale)}" in logs
    assert_nothing_lost(postgres_url, before, 3)
    assert _requeued_from(postgres_url) == stale


def test_postgres_restarted_then_away_for_30_seconds_mid_study_loses_nothing(cluster, postgres_server, postgres_url,
                                                                            tmp_path):
    """One study through both database faults: a restart, then 30 s without the server (within
    the retry bound, 240 s here); each while a trial runs.  The driver reconnects, then waits;
    results that arrive meanwhile are recorded once the server is back."""
    spec = _spec(tmp_path, postgres_url, trials=4, concurrency=2)
    checkpoints = tmp_path / "work" / "checkpoints"
    log_path = tmp_path / "driver.log"
    driver = _launch(spec, log_path, "--address", cluster["address"], GSMSEARCH_STORAGE_RETRY_SECONDS="240")
    try:
        # at the first completion: the others still have most of their epochs to run
        first = finished(_mid_study(postgres_url, checkpoints))
        lines = _status_lines(log_path)
        pg_restart(postgres_server)
        # the driver has read the study since (a progress line, every 2 s, reads it), and a trial runs
        wait(lambda: _status_lines(log_path) > lines, timeout=120, interval=0.2)
        before = finished(_mid_study(postgres_url, checkpoints))
        pg_stop(postgres_server)
        try:
            time.sleep(30)
            assert driver.poll() is None  # still waiting for the database
        finally:
            pg_start(postgres_server)
    except BaseException:
        os.killpg(driver.pid, signal.SIGKILL)
        raise
    assert _finish(driver, log_path) == 0, log_path.read_text()[-4000:]
    assert {n: v for n, v in before.items() if n in first} == first
    after = assert_nothing_lost(postgres_url, before, 4)
    assert [t.state.name for t in after] == ["COMPLETE"] * 4  # no trial lost an attempt to either fault


def test_a_trial_whose_node_died_with_no_retry_left_is_resumed_later(cluster, postgres_url, tmp_path):
    """Last in the module: it kills one of the two nodes.  With ``retries: 0`` the trial on the
    killed node is recorded FAIL, not final, ``worker_died``; it counts toward the launch's
    target, so the launch ends (exit status 75, the command to continue); ``--resume`` runs it
    again from its checkpoint on the surviving node."""
    spec = _spec(tmp_path, postgres_url, trials=2, concurrency=2, retries=0)
    checkpoints = tmp_path / "work" / "checkpoints"
    log_path = tmp_path / "driver.log"
    driver = _launch(spec, log_path, "--address", cluster["address"])
    try:
        def placed_and_checkpointed():
            # the gblr trial: it runs several times as long as the lowrank one, so it is still
            # running when its node dies
            now = [t for t in trials(postgres_url) if t.state.name == "RUNNING" and t.user_attrs.get("placements")
                   and t.user_attrs.get("family") == "gblr"
                   and (checkpoints / t.user_attrs.get("config_digest", "-") / "last.pt").exists()]
            return now[0] if now else None

        victim = wait(placed_and_checkpointed, timeout=240, interval=0.3)
        node = victim.user_attrs["placements"][0]["node_id"]
        cluster["process"].stdin.write(f"kill {node}\n")
        cluster["process"].stdin.flush()
        assert cluster["process"].stdout.readline().strip() == f"KILLED {node}"
    except BaseException:
        os.killpg(driver.pid, signal.SIGKILL)
        raise
    assert _finish(driver, log_path) == 75, log_path.read_text()[-4000:]
    text = log_path.read_text()
    assert "1 to resume (their worker or node died)" in text
    assert f"continue the study with: gsmsearch launch {spec} --resume" in text
    lost = trials(postgres_url)[victim.number]
    assert lost.state.name == "FAIL" and lost.user_attrs["final"] is False and lost.user_attrs["worker_died"]
    assert lost.user_attrs["failure_reason"].startswith("worker died: ")
    assert lost.user_attrs["failure_reason"].endswith(
        "(after 1 attempt(s)): its worker or node died, nothing its configuration did; "
        "`launch --resume` runs it again from its checkpoint")
    before = finished(trials(postgres_url))
    assert len(before) == 1  # the other trial completed on its node

    relaunch = _launch(spec, log_path, "--resume", "--address", cluster["address"])
    assert _finish(relaunch, log_path) == 0, log_path.read_text()[-4000:]
    after = assert_nothing_lost(postgres_url, before, 2)
    (rerun,) = [t for t in after if t.user_attrs.get("requeued_from") == victim.number]
    survivor = ({n["node_id"] for n in cluster["nodes"]} - {node}).pop()
    assert rerun.state.name == "COMPLETE" and rerun.user_attrs["node_id"] == survivor
    assert rerun.user_attrs["config_digest"] == lost.user_attrs["config_digest"]  # its checkpoint folder
    assert len(after) == 3  # the lost trial, its re-run, the other trial
