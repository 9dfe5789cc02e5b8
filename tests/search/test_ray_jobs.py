"""A study submitted as a Ray Job (`ray job submit --working-dir ... -- gsmsearch launch`), the
way the deployment guide shows, on a real Ray head with its dashboard on 127.0.0.1: a study
database or workdir inside the folder Ray unpacks the working dir into is refused (the next
submission would not see it); `ray job stop` stops the driver the way Ctrl-C does, and a new
submission with `--resume` completes the study with nothing lost."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
import yaml

from .conftest import TINY_SPEC

BIN = os.path.dirname(sys.executable)  # the environment's `ray` and `gsmsearch`, as a user's PATH has them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    return env


@pytest.fixture(scope="module")
def ray_head():
    # a short temp dir: Ray's socket paths under it must stay within the 107 bytes Unix allows
    temp = tempfile.mkdtemp(prefix="gsm-jobs-", dir="/tmp")
    dashboard = _free_port()
    ports = ["--port", str(_free_port()), "--dashboard-port", str(dashboard),
             "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
             "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
             "--ray-client-server-port", str(_free_port())]
    started = subprocess.run([f"{BIN}/ray", "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                              "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=true",
                              "--disable-usage-stats", *ports], env=_env(), capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        yield address
    finally:
        # this head's processes only (`ray stop` would stop every Ray on the machine)
        subprocess.run(["pkill", "-KILL", "-f", temp], check=False)
        shutil.rmtree(temp, ignore_errors=True)


def _ray(*args, timeout=120):
    return subprocess.run([f"{BIN}/ray", "job", *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def _submit(address, working_dir, *command):
    job = f"gsm-{time.time_ns()}"
    done = _ray("submit", "--address", address, "--submission-id", job, "--working-dir", str(working_dir),
                "--no-wait", "--", *command)
    assert done.returncode == 0, done.stderr[-3000:]
    return job


def _wait_status(address, job, wanted, timeout=300):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job)).rsplit(".", 1)[-1]
        if status in wanted:
            return status, client.get_job_logs(job)
        time.sleep(1)
    raise AssertionError(f"job {job} not {wanted} in {timeout}s:\n{client.get_job_logs(job)[-3000:]}")


def _write(working_dir, spec):
    working_dir.mkdir(exist_ok=True)
    (working_dir / "study.yaml").write_text(yaml.safe_dump(spec))


def test_a_study_inside_the_unpacked_working_dir_is_refused(ray_head, tmp_path):
    working_dir = tmp_path / "wd"
    _write(working_dir, {**TINY_SPEC, "executor": {}})  # default storage: an SQLite file beside the spec
    job = _submit(ray_head, working_dir, "gsmsearch", "launch", "study.yaml")
    status, logs = _wait_status(ray_head, job, {"FAILED", "SUCCEEDED"})
    assert status == "FAILED"
    assert "storage: the SQLite file" in logs and "_ray_pkg_" in logs and "Set storage to an absolute path" in logs
    assert not list(working_dir.glob("*.db"))

    _write(working_dir, {**TINY_SPEC, "executor": {}, "storage": f"sqlite:///{tmp_path / 'tiny.db'}"})
    job = _submit(ray_head, working_dir, "gsmsearch", "launch", "study.yaml")
    status, logs = _wait_status(ray_head, job, {"FAILED", "SUCCEEDED"})
    assert status == "FAILED" and "workdir: the default workdir (beside the spec)" in logs
    assert not (tmp_path / "tiny.db").exists()  # refused before anything was written


def test_job_stop_then_resubmission_with_resume_loses_nothing(ray_head, tmp_path):
    storage = f"sqlite:///{tmp_path / 'tiny.db'}"
    spec = {**TINY_SPEC, "executor": {}, "storage": storage, "workdir": str(tmp_path / "work"), "trials": 3,
            "workload": {**TINY_SPEC["workload"], "epochs": 400}}
    working_dir = tmp_path / "wd"
    _write(working_dir, spec)
    job = _submit(ray_head, working_dir, "gsmsearch", "launch", "study.yaml")
    checkpoints = tmp_path / "work" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("*/last.pt")):
        assert time.time() < deadline, "no trial reached its first checkpoint"
        time.sleep(0.5)
    stopped = _ray("stop", "--address", ray_head, job)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    status, logs = _wait_status(ray_head, job, {"STOPPED", "FAILED", "SUCCEEDED"})
    assert status == "STOPPED"
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    # stopped the way Ctrl-C stops it: nothing left RUNNING, the unfinished trials resumable
    assert not [t for t in trials if t.state.name == "RUNNING"], [(t.number, t.state.name) for t in trials]
    interrupted = [t for t in trials if t.state.name == "FAIL"]
    assert interrupted and all(t.user_attrs["final"] is False for t in interrupted)
    finished_before = {t.number: t.values for t in trials if t.state.name == "COMPLETE"}

    # a second submission (a new unpack folder) finds the same study and continues it
    _write(working_dir, {**spec, "workload": {**spec["workload"], "epochs": 400}})
    (working_dir / "note.txt").write_text("another byte")
    job = _submit(ray_head, working_dir, "gsmsearch", "launch", "study.yaml", "--resume")
    status, logs = _wait_status(ray_head, job, {"FAILED", "SUCCEEDED", "STOPPED"}, timeout=600)
    assert status == "SUCCEEDED", logs[-3000:]
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and not [t for t in trials if t.state.name == "RUNNING"]
    digests = [t.user_attrs["config_digest"] for t in complete]
    assert len(set(digests)) == len(digests)  # no finished configuration ran twice
    for number, values in finished_before.items():
        assert trials[number].values == values  # finished trials intact
