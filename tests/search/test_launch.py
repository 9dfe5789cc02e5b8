"""End-to-end studies on a real local Ray (loopback) with SQLite and PostgreSQL storages."""
import json
import re
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from gsmsearch.cli import main
from gsmsearch.search import launch

from .conftest import TINY_SPEC
from .test_pareto import brute_front


def check_study(storage_url, name="tiny", expected=4):
    study = optuna.load_study(study_name=name, storage=storage_url)
    trials = study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == expected
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert study.metric_names == ["quality", "relative_flops"]
    families = set()
    for t in complete:
        assert len(t.values) == 2 and 0 <= t.values[0] <= 1 and 0 < t.values[1] <= 1
        assert t.params["family"] == t.user_attrs["family"] == t.user_attrs["config"]["family"]
        families.add(t.params["family"])
        # the constraint is recorded (Optuna 5 set_constraint) and consistent with the value
        assert t.system_attrs["constraints:relative_flops"] == pytest.approx(t.values[1] - 0.35)
        assert t.user_attrs["result"]["relative_flops"] == t.values[1]
        assert t.user_attrs["layers"]  # per-layer structure summary
    assert families == {"gblr", "lowrank"}  # both arms ran (balanced allocation)
    # the study's front = brute-force non-dominated filter of the feasible trials
    feasible = [t for t in complete if t.system_attrs["constraints:relative_flops"] <= 0]
    expected_front = {feasible[i].number for i in brute_front([t.values for t in feasible],
                                                              ["maximize", "minimize"])}
    assert {t.number for t in study.best_trials} == expected_front
    return study


def test_study_on_sqlite_end_to_end(write_spec, tmp_path, capsys):
    spec = write_spec()
    assert main(["launch", str(spec), "--status-interval", "5"]) == 0
    out = capsys.readouterr()
    assert "Pareto front" in out.out and "4 complete" in out.out
    study = check_study(f"sqlite:///{tmp_path / 'tiny.db'}")
    assert study.user_attrs["spec_hash"]
    assert list((tmp_path / ".gsmsearch" / "tiny" / "structures").glob("trial-*.safetensors"))
    # status / list / export read it back
    assert main(["status", str(spec)]) == 0
    assert "Pareto front (feasible trials)" in capsys.readouterr().out
    assert main(["list", "--storage", f"sqlite:///{tmp_path / 'tiny.db'}"]) == 0
    assert "tiny" in capsys.readouterr().out
    for fmt in ("csv", "parquet"):
        out_file = tmp_path / f"trials.{fmt}"
        assert main(["export", str(spec), "--format", fmt, "-o", str(out_file)]) == 0
        import pandas as pd

        frame = pd.read_csv(out_file) if fmt == "csv" else pd.read_parquet(out_file)
        assert len(frame) == 4 and {"values_quality", "values_relative_flops", "params_family"} <= set(frame.columns)
    # the optuna CLI reads our database as a standard study
    optuna_cli = os.path.join(os.path.dirname(sys.executable), "optuna")
    cli = subprocess.run([optuna_cli, "best-trials", "--study-name", "tiny",
                          "--storage", f"sqlite:///{tmp_path / 'tiny.db'}", "-f", "json"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert {t["number"] for t in json.loads(cli.stdout)} == {t.number for t in study.best_trials}
    # relaunching with a different spec refuses; --resume on a finished study runs nothing new
    changed = write_spec({"trials": 5}, name="changed.yaml")
    assert main(["launch", str(changed), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different spec (trials: 4 -> 5)" in err, err
    assert main(["launch", str(spec)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["launch", str(spec), "--resume"]) == 0
    check_study(f"sqlite:///{tmp_path / 'tiny.db'}")


def test_study_recorded_by_an_older_canonical_form_resumes(write_spec, tmp_path, capsys):
    """Studies written before canonical() left defaults out recorded every field spelled out,
    so their digest differs; the same spec must still resume, and a real change still refuses
    naming the field."""
    import hashlib

    from gsmsearch.search._spec import load_spec

    spec = write_spec({"trials": 2})
    assert main(["launch", str(spec)]) == 0
    db = f"sqlite:///{tmp_path / 'tiny.db'}"
    study = optuna.load_study(study_name="tiny", storage=db)
    spelled_out = json.loads(load_spec(spec).model_dump_json())  # the older form: defaults included
    study.set_user_attr("spec", spelled_out)
    study.set_user_attr("spec_hash", hashlib.sha256(json.dumps(spelled_out, sort_keys=True).encode()).hexdigest())
    assert study.user_attrs["spec_hash"] != load_spec(spec).digest()
    capsys.readouterr()
    assert main(["launch", str(spec), "--resume"]) == 0
    assert optuna.load_study(study_name="tiny", storage=db).user_attrs["spec_hash"] == load_spec(spec).digest()
    study.set_user_attr("spec", spelled_out)
    study.set_user_attr("spec_hash", "0" * 64)
    changed = write_spec({"trials": 2, "retries": 3}, name="changed.yaml")
    assert main(["launch", str(changed), "--resume"]) == 2
    assert "different spec (retries: 1 -> 3)" in capsys.readouterr().err


def test_study_on_postgres_end_to_end(write_spec, postgres_url):
    spec = write_spec({"storage": postgres_url})
    summary = launch(spec, status_interval=5)
    assert summary.completed == 4 and not summary.interrupted
    check_study(postgres_url)


def test_killed_driver_then_resume_keeps_every_finished_trial(write_spec, tmp_path):
    spec = write_spec({"trials": 6, "workload": {**TINY_SPEC["workload"], "epochs": 12}})
    db = f"sqlite:///{tmp_path / 'tiny.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "gsmsearch", "launch", str(spec),
                               "--status-interval", "2"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "driver.log", "w"))
    finished_before = {}
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(1.0)
            if not (tmp_path / "tiny.db").exists():
                continue
            try:
                trials = optuna.load_study(study_name="tiny", storage=db).get_trials()
            except Exception:  # noqa: BLE001 - the study may not exist yet
                continue
            done = [t for t in trials if t.state.name == "COMPLETE"]
            if len(done) >= 2 and any(t.state.name == "RUNNING" for t in trials):
                finished_before = {t.number: (t.values, t.user_attrs["config_digest"]) for t in done}
                break
        assert finished_before, "the driver never got two trials done:\n" + (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait(30)
    time.sleep(1.0)
    study = optuna.load_study(study_name="tiny", storage=db)
    assert any(t.state.name == "RUNNING" for t in study.get_trials())  # left behind by the kill

    summary = launch(spec, resume=True, status_interval=5)
    assert not summary.interrupted
    trials = optuna.load_study(study_name="tiny", storage=db).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    # every trial finished before the kill is still there, unchanged
    for number, (values, digest) in finished_before.items():
        assert trials[number].state.name == "COMPLETE" and trials[number].values == values
    # the killed trials were marked stale and their configurations re-run, never a finished one twice
    stale = [t for t in trials if t.state.name == "FAIL"]
    assert stale and all(t.user_attrs["failure_reason"].startswith("stale") for t in stale)
    digests = [t.user_attrs["config_digest"] for t in complete]
    assert len(digests) == len(set(digests))
    for t in stale:
        digest = t.user_attrs.get("config_digest")
        if digest is not None:
            assert digest in set(digests)
        elif t.params:  # killed between ask and recording its config: its sampled params re-ran
            assert any(x.user_attrs.get("requeued_from") == t.number for x in trials)


def test_dry_run_validates_and_writes_nothing(write_spec, tmp_path, capsys):
    spec = write_spec()
    assert main(["launch", str(spec), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "valid (hash" in err and err.count("example trial:") == 2  # one per family
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_trial_time_limit_fails_the_trial_with_its_reason(write_spec, tmp_path):
    spec = write_spec({"trials": 1, "concurrency": 1, "retries": 0, "trial_timeout": 1.0,
                       "families": {"gblr": {"budget": 0.3}},
                       "workload": {**TINY_SPEC["workload"], "epochs": 200}})
    summary = launch(spec, status_interval=60)
    assert summary.completed == 0 and summary.failed == 1
    trial = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}").trials[0]
    assert trial.state.name == "FAIL"
    assert "exceeded trial_timeout of 1s" in trial.user_attrs["failure_reason"]


def test_a_finite_space_is_run_in_full_without_repeats(write_spec, tmp_path, capsys):
    """6 configurations (2 budgets x 3 seeds), a random sampler that repeats itself (with seed
    1 its second proposal is the first one's budget again): every configuration runs exactly
    once (each proposal under all three seeds; a repeat hands its turn to one not run yet), and
    asking for more trials than the space holds stops at the space, saying why."""
    spec = write_spec({"families": {"lowrank": {"budget": [0.1, 0.3]}},
                       "workload": {**TINY_SPEC["workload"], "epochs": 1, "seeds": [0, 1, 2]},
                       "constraints": [], "sampler": {"name": "random", "seed": 1}, "trials": 9})
    summary = launch(spec, status_interval=1e9)
    assert summary.completed == 6
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    runs = sorted((t.user_attrs["config"]["budget"], t.user_attrs["config"]["seed"]) for t in complete)
    assert runs == [(b, s) for b in (0.1, 0.3) for s in (0, 1, 2)]
    pruned = [t for t in study.get_trials() if t.state.name == "PRUNED"]
    assert pruned and all("duplicate_of" in t.user_attrs for t in pruned)  # the sampler did repeat
    assert "search space is exhausted" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`gsmsearch list ... | head` where the reader has gone: no error message, no traceback,
    the status of a command stopped by SIGPIPE (141)."""
    db = tmp_path / "s.db"
    optuna.create_study(study_name="piped", storage=f"sqlite:///{db}")
    reader = subprocess.Popen([sys.executable, "-m", "gsmsearch", "list", "--storage", f"sqlite:///{db}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # before the command writes anything
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 141, err
    assert err == ""


@pytest.mark.parametrize("extra,message", [
    ({"workdir": "afile/sub"}, r"workdir .*afile/sub: cannot create it, .*afile is a file, not a folder"),
    ({"resources": {"cpus_per_trial": 64}}, r"resources\.cpus_per_trial: a trial asks for 64 CPUs, the Ray cluster has \d+"),
    ({"resources": {"gpus_per_trial": 1}}, r"resources\.gpus_per_trial: a trial asks for 1 GPUs, the Ray cluster has 0"),
    ({"executor": {"address": "127.0.0.1:1"}}, r"cannot reach the Ray cluster at 127\.0\.0\.1:1"),
])
def test_what_the_environment_cannot_offer_fails_before_anything_is_written(write_spec, tmp_path, extra, message):
    """A workdir under a file, more CPUs/GPUs per trial than the cluster has (a trial would wait
    forever), an address nobody answers on (Ray would retry for minutes): a clear error at once,
    exit 2, no database, no workdir.  A fresh process, so the Ray address is really dialled."""
    (tmp_path / "afile").write_text("x")
    spec = write_spec(extra)
    done = subprocess.run([sys.executable, "-m", "gsmsearch", "launch", str(spec)], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 2, done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "study.yaml"]
