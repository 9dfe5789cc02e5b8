"""Studies on a multi-node Ray cluster on this machine (``ray_cluster.py``: a head and two
one-CPU nodes, every server on 127.0.0.1), against the real PostgreSQL of the fixtures, with the
workdir in a folder every node sees: trials record the node and host they ran on and spread over
the nodes; a node killed mid-trial costs that trial one attempt, which runs again on the surviving
node from the trial's last checkpoint, ahead of the trials not started yet."""
import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from .conftest import TINY_SPEC
from .ray_cluster import start as start_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def ray_cluster():
    with start_cluster(nodes=2, cpus=1) as cluster:
        yield cluster


def _spec(tmp_path, storage, address, **overrides):
    spec = {**TINY_SPEC, "storage": storage, "executor": {"address": address}, **overrides}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _launch(spec, log):
    # the cluster runs without Ray's token authentication; so must its client (Ray turns the token
    # on in a process that finds one in ~/.ray with RAY_AUTH_MODE unset, and its children inherit it)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec), "--status-interval", "2"],
                            cwd=ROOT, stdout=log, stderr=log, start_new_session=True, env=env)


def _finish(driver, log_path, timeout=420):
    try:
        assert driver.wait(timeout) == 0, log_path.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)


def _check_complete(storage, expected):
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * expected
    digests = [t.user_attrs["config_digest"] for t in trials]
    assert len(set(digests)) == len(digests)  # no configuration ran twice
    return trials


def test_trials_spread_over_the_nodes_and_record_where_they_ran(ray_cluster, postgres_url, tmp_path):
    spec = _spec(tmp_path, postgres_url, ray_cluster["address"], trials=4, concurrency=2)
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        _finish(_launch(spec, log), log_path)
    nodes = {node["node_id"] for node in ray_cluster["nodes"]}
    trials = _check_complete(postgres_url, 4)
    for trial in trials:
        assert trial.user_attrs["node_id"] in nodes
        assert trial.user_attrs["host"] == socket.gethostname()
        (placement,) = trial.user_attrs["placements"]  # one attempt each
        assert placement["node_id"] == trial.user_attrs["node_id"] and placement["attempt"] == 1
    # the head has no CPUs: each node's one worker ran trials
    assert {t.user_attrs["node_id"] for t in trials} == nodes


def test_a_node_killed_mid_trial_costs_one_attempt_and_the_study_completes(ray_cluster, postgres_url, tmp_path):
    # 3 trials on two one-CPU nodes: when a node dies, the survivor runs the retry before the
    # trial not started yet (a retry queued behind it, or its worker waiting for the dead
    # node's CPU, would never run)
    slow = {**TINY_SPEC["workload"], "epochs": 60}
    spec = _spec(tmp_path, postgres_url, ray_cluster["address"], trials=3, concurrency=2, workload=slow,
                 retries=1, trial_timeout=600)
    checkpoints = tmp_path / ".gsmsearch" / "tiny" / "checkpoints"
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = _launch(spec, log)
        try:
            victim = _wait_for_a_checkpointed_trial(postgres_url, checkpoints)
            node = victim.user_attrs["placements"][0]["node_id"]
            checkpoint = checkpoints / victim.user_attrs["config_digest"] / "last.pt"
            ray_cluster["process"].stdin.write(f"kill {node}\n")
            ray_cluster["process"].stdin.flush()
            assert ray_cluster["process"].stdout.readline().strip() == f"KILLED {node}"
        except BaseException:
            os.killpg(driver.pid, signal.SIGKILL)
            raise
        _finish(driver, log_path)
    text = log_path.read_text()
    assert f"trial {victim.number} attempt 1 failed (worker died" in text
    trials = _check_complete(postgres_url, 3)
    retried = trials[victim.number]
    survivor = ({n["node_id"] for n in ray_cluster["nodes"]} - {node}).pop()
    assert retried.user_attrs["attempts"] == 2
    assert [(p["attempt"], p["node_id"]) for p in retried.user_attrs["placements"]] == [(1, node), (2, survivor)]
    assert retried.user_attrs["node_id"] == survivor
    assert checkpoint.exists()  # the retry ran in the same checkpoint folder (the config's digest)
    # every trial after the kill ran on the surviving node
    assert all(t.user_attrs["node_id"] == survivor for t in trials if t.number != victim.number
               and t.user_attrs["placements"][0]["node_id"] != node)


def _wait_for_a_checkpointed_trial(storage, checkpoints, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
        except Exception:  # noqa: BLE001 - not created yet
            trials = []
        for trial in trials:
            placements = trial.user_attrs.get("placements")
            digest = trial.user_attrs.get("config_digest")
            if (trial.state.name == "RUNNING" and placements and digest
                    and (checkpoints / digest / "last.pt").exists()):
                return trial
        time.sleep(0.5)
    raise AssertionError("no trial reached its first checkpoint in time")
