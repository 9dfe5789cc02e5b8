"""`sbatch deploy/slurm.sbatch STUDY.yaml` on a real one-node Slurm cluster (munged, slurmctld and
slurmd on this machine, see slurm_cluster.py), each job starting its own Ray inside the allocation
(on 127.0.0.1: GSMSEARCH_RAY_NODE_IP) and running its study against PostgreSQL.  One test, two
jobs at once on the node (the slow parts overlap): one is cancelled mid-study and submitted
again, the other reaches its time limit mid-study and requeues itself; both studies complete
with nothing lost and both jobs write their reports."""
import functools
import os
import re
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from .conftest import TINY_SPEC
from .slurm_cluster import SlurmCluster

SBATCH = Path(__file__).resolve().parents[2] / "deploy" / "slurm.sbatch"
DONE = ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"]


@pytest.fixture(scope="module")
def slurm():
    cluster = SlurmCluster(cpus=2).start()  # fails with the daemons' logs if they do not come up
    try:
        yield cluster
    finally:
        cluster.stop()


def _spec(folder: Path, storage: str, name: str, *, trials: int, epochs: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**TINY_SPEC, "name": name, "storage": storage, "workdir": str(folder / "work"), "trials": trials,
            "concurrency": 1, "executor": {}, "workload": {**TINY_SPEC["workload"], "epochs": epochs}}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _submit(slurm, spec: Path, *options: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the Ray temp dirs in the cluster's folder: short (Ray's socket paths must stay within 107 bytes)
    env.update(GSMSEARCH_VENV=sys.prefix, GSMSEARCH_RAY_NODE_IP="127.0.0.1", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", GSMSEARCH_RAY_TMPDIR=str(slurm.root))
    folder = spec.parent
    return slurm.sbatch(f"--chdir={folder}", f"--output={folder}/job-%j.out", "--cpus-per-task=1", *options,
                        str(SBATCH), str(spec), **{k: v for k, v in env.items() if not k.startswith("SLURM_")})


def _log(spec: Path, job: str) -> str:
    path = spec.parent / f"job-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


@functools.lru_cache(maxsize=None)
def _storage(url: str):
    """One storage (one connection pool) per database for the whole test: the loop below reads
    twice a second, and a storage per read would leave its pooled connections open until the
    garbage collector runs, past the server's max_connections."""
    return optuna.storages.RDBStorage(url)


def _trials(storage: str, name: str):
    return optuna.load_study(study_name=name, storage=_storage(storage)).get_trials(deepcopy=False)


def _assert_complete(storage, name, trials_wanted, finished_before):
    """The study has its trials: every one COMPLETE or FAIL-not-final (interrupted, then run again
    under a new number), nothing RUNNING, no finished configuration run twice, and each trial that
    had finished earlier unchanged."""
    trials = _trials(storage, name)
    states = [t.state.name for t in trials]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == trials_wanted and "RUNNING" not in states, states
    assert all(t.user_attrs.get("final") is False for t in trials if t.state.name == "FAIL"), states
    digests = [t.user_attrs["config_digest"] for t in complete]
    assert len(set(digests)) == len(digests)
    for number, (values, digest) in finished_before.items():
        assert trials[number].state.name == "COMPLETE"
        assert (trials[number].values, trials[number].user_attrs["config_digest"]) == (values, digest)
    return trials


def _trials_if_any(storage, name):
    try:
        return _trials(storage, name)
    except KeyError:  # not created yet
        return []


def _seconds(runtime: str) -> int:
    """scontrol's [D-]HH:MM:SS in seconds."""
    days, _, clock = runtime.rpartition("-")
    h, m, sec = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def _finished(trials):
    return {t.number: (t.values, t.user_attrs["config_digest"]) for t in trials if t.state.name == "COMPLETE"}


def test_two_jobs_on_one_node_through_scancel_and_a_time_limit(slurm, postgres_url, tmp_path):
    """Two jobs submitted at once share the node, each with its own Ray.  One is cancelled
    mid-study and submitted again; the other reaches its time limit mid-study: warned by Slurm
    (--signal=B:USR1), it stops its driver the way Ctrl-C does and requeues itself, and its next
    run completes the study.  Both studies end complete with nothing lost, each with its report."""
    # long enough that the study outlasts Slurm's next limit check (every 30 s) after the cut below
    limited = _spec(tmp_path / "limited", postgres_url, "limited", trials=5, epochs=500)
    cancelled = _spec(tmp_path / "cancelled", postgres_url, "cancelled", trials=3, epochs=100)
    # warned 100 s before its limit; the limit is cut short once a trial has finished (below)
    job = _submit(slurm, limited, "--time=10", "--signal=B:USR1@100")
    first = _submit(slurm, cancelled)
    again = None
    finished = {}  # study name -> {number: (values, config digest)} when its first run stopped
    shared = cut = False  # both jobs running at one moment; the time limit cut short
    held = 0.0  # when the requeued job was first seen held
    deadline = time.monotonic() + 600
    while True:
        assert time.monotonic() < deadline, f"{_log(limited, job)[-3000:]}\n{_log(cancelled, first)[-3000:]}"
        fields = slurm.job(job)
        if again is None:
            states = [t.state.name for t in _trials_if_any(postgres_url, "cancelled")]
            if "COMPLETE" in states and "RUNNING" in states:  # mid-study
                shared = shared or fields.get("JobState") == "RUNNING"
                slurm.run("scancel", first)
                ended = slurm.wait(first, DONE, 120, cancelled.parent / f"job-{first}.out")
                assert ended["JobState"] == "CANCELLED"
                # the driver stopped the way Ctrl-C stops it: nothing left RUNNING
                assert "RUNNING" not in [t.state.name for t in _trials(postgres_url, "cancelled")]
                finished["cancelled"] = _finished(_trials(postgres_url, "cancelled"))
                again = _submit(slurm, cancelled)
            assert slurm.job(first).get("JobState") not in DONE or again, _log(cancelled, first)[-4000:]
        if not cut and fields.get("JobState") == "RUNNING":
            states = [t.state.name for t in _trials_if_any(postgres_url, "limited")]
            if "COMPLETE" in states and "RUNNING" in states:
                # mid-study, whatever the machine's speed: a limit 65-125 s away.  Slurm checks
                # limits every 30 s, so its warning (100 s before) comes within 55 s and leaves
                # the job at least 35 s to stop its driver and requeue itself before the limit
                elapsed = _seconds(fields["RunTime"])
                slurm.run("scontrol", "update", f"JobId={job}", f"TimeLimit={-(-(elapsed + 65) // 60)}")
                cut = True
        if int(fields.get("Restarts", 0)) and "limited" not in finished:
            # the first run stopped its driver the way Ctrl-C does: nothing left RUNNING
            trials = _trials(postgres_url, "limited")
            assert "RUNNING" not in [t.state.name for t in trials], _log(limited, job)[-4000:]
            finished["limited"] = _finished(trials)
        if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
            # Slurm holds a requeued job for about two minutes before it may start: start it sooner,
            # with a limit the rest of the study fits in.  Not at once: slurmd refuses a launch
            # whose credential dates from the second it revoked the job's previous one ("already
            # killed, do not launch batch job") and the job then fails
            held = held or time.monotonic()
            if time.monotonic() - held > 3:
                slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", "TimeLimit=10")
        if fields.get("JobState") in DONE and again and slurm.job(again).get("JobState") in DONE:
            break
        time.sleep(0.5)

    log = _log(limited, job)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{log[-4000:]}\n{slurm.daemon_logs()}"
    assert cut and int(fields["Restarts"]) >= 1 and "time limit near: requeueing this job" in log
    ended = slurm.job(again)
    assert (ended["JobState"], ended["ExitCode"]) == ("COMPLETED", "0:0"), _log(cancelled, again)[-4000:]
    assert shared
    # each job its own Ray: its own port block
    ports = {re.search(r"Ray at (127\.0\.0\.1:\d+): 1 node\(s\) up", text).group(1)
             for text in (_log(limited, job), _log(cancelled, first))}
    assert len(ports) == 2
    _assert_complete(postgres_url, "limited", 5, finished["limited"])
    _assert_complete(postgres_url, "cancelled", 3, finished["cancelled"])
    for spec, done in ((limited, job), (cancelled, again)):
        report = spec.parent / f"gsmsearch-report-{done}.html"
        assert report.exists() and spec.parent.name in report.read_text()
    for done in (job, first, again):
        assert not (slurm.root / f"ray-{done}").exists()  # a job's Ray temp dir goes with it
