"""The driver on a large study: per-trial driver work and the read commands' cost, by study size.

    .venv/bin/python -m bench.driver_scale --sizes 1000 10000 100000
    .venv/bin/python -m bench.driver_scale --sizes 1000 10000 --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres

For each storage and size N: a study is pre-filled with N finished trials, written through
Optuna's storage API (``Study.add_trials``), each a copy of a real finished trial of the same
spec with its own budget, values and configuration digest (so the read commands see realistic
records and the driver's duplicate check sees N distinct configurations).  Then, in a fresh
process, ``launch --resume`` runs ``--more`` real trials (digits-mlp, 1 epoch, local Ray), and
what the driver itself spends per trial is measured: the wall time of its loop minus the time
it waits on Ray for a trial to return (``ray.wait`` / ``ray.get``), split into the sampler's
``ask`` and the rest.  Peak memory is the measuring process's peak RSS (torch and Ray's client
included; ``baseline_rss_mib`` is the same process before the study is opened).  Then ``status``,
``export`` (CSV) and ``report`` run on the study, each in its own process, with their wall time,
peak RSS and, for the report, the file's size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _spec(name: str, storage: str, trials: int, workdir: str) -> dict:
    return {
        "name": name,
        "storage": storage,
        "workdir": workdir,
        "workload": {"name": "digits-mlp", "options": {"hidden_sizes": [32, 32]}, "epochs": 1,
                     "batch_size": 64, "lr": 0.003},
        "families": {"lowrank": {"budget": {"low": 0.1, "high": 0.9}},
                     "gblr": {"budget": {"low": 0.1, "high": 0.9}}},
        "constraints": [{"metric": "relative_flops", "max": 0.6}],
        "trials": trials,
        "concurrency": 1,
        "executor": {"num_cpus": 2},
    }


# -- the steps, each run in its own process -------------------------------------------------


def prefill(spec_path: str, size: int) -> dict:
    """Run 2 real trials, then copy them to ``size`` finished trials in all."""
    import optuna
    from optuna.trial import FrozenTrial, TrialState

    from gsmsearch.search import launch
    from gsmsearch.search._spec import load_spec

    spec = load_spec(spec_path)
    real = yaml.safe_load(Path(spec_path).read_text())
    template_spec = Path(spec_path).with_name(f"{spec.name}-template.yaml")
    template_spec.write_text(yaml.safe_dump({**real, "name": f"{spec.name}_template", "trials": 2}))
    launch(template_spec, status_interval=1e9, out=open(os.devnull, "w"))
    from gsmsearch.search._launch import Driver
    from gsmsearch.search._storage import open_storage, resolve_storage_url

    url = resolve_storage_url(spec.storage, spec_dir=Path(spec_path).parent, study_name=spec.name)
    study = Driver(spec, spec_path, out=open(os.devnull, "w")).open(url)  # created as `launch` creates it
    source = optuna.load_study(study_name=f"{spec.name}_template", storage=open_storage(url))
    templates = [t for t in source.get_trials() if t.state == TrialState.COMPLETE]
    rng = random.Random(0)
    started = time.perf_counter()
    batch = []
    for index in range(size - len(study.trials)):
        template = templates[index % len(templates)]
        family = template.params["family"]
        budget = rng.uniform(0.1, 0.9)
        quality, flops = rng.uniform(0.3, 0.97), budget * rng.uniform(0.9, 1.1)
        attrs = json.loads(json.dumps(template.user_attrs))
        attrs["config"]["budget"] = budget
        attrs["config_digest"] = f"{rng.getrandbits(64):016x}"
        # a realised key of its own too: a copy shares its template's model, and a study whose
        # every proposal realises a model trained already would run no more trials
        attrs["realized_key"] = f"prefill-{attrs['config_digest']}"
        attrs["result"].update(quality=quality, val_quality=quality, relative_flops=flops,
                               test_quality=quality - rng.uniform(0, 0.02))
        params = {"family": family, f"{family}.budget": budget}
        batch.append(FrozenTrial(
            number=0, trial_id=0, state=TrialState.COMPLETE, value=None, values=[quality, flops],
            datetime_start=template.datetime_start, datetime_complete=template.datetime_complete,
            params=params, distributions={k: template.distributions[k] for k in params},
            user_attrs=attrs, system_attrs={"constraints:relative_flops": flops - 0.6},
            intermediate_values={}))
        if len(batch) == 2000:
            _bulk_add_trials(study, batch)
            batch = []
    if batch:
        _bulk_add_trials(study, batch)
    return {"prefill_s": time.perf_counter() - started, "trials": len(study.get_trials(deepcopy=False))}


def _bulk_add_trials(study, trials) -> None:
    """Add finished ``trials`` to ``study`` in one transaction, as ``Study.add_trials`` records
    them (the same rows in Optuna's own tables, through its SQLAlchemy models), numbered after
    the study's last trial.  ``add_trials`` takes one transaction and a count of the past trials
    per trial, which makes a 100,000-trial pre-fill quadratic."""
    import json as _json

    import sqlalchemy
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models

    rdb = study._storage._rdb  # RetryingStorage -> Optuna's RDBStorage
    session = rdb.scoped_session()
    try:
        numbers = session.execute(sqlalchemy.select(sqlalchemy.func.count()).select_from(models.TrialModel)
                                  .where(models.TrialModel.study_id == study._study_id)).scalar()
        trial_rows = []
        for offset, trial in enumerate(trials):
            row = models.TrialModel(number=numbers + offset, study_id=study._study_id, state=trial.state)
            row.datetime_start, row.datetime_complete = trial.datetime_start, trial.datetime_complete
            trial_rows.append({"number": row.number, "study_id": row.study_id, "state": row.state,
                               "datetime_start": row._datetime_start_utc,
                               "datetime_complete": row._datetime_complete_utc})
        table = models.TrialModel.__table__
        ids = session.execute(sqlalchemy.insert(table).returning(table.c.trial_id, sort_by_parameter_order=True),
                              trial_rows).scalars().all()
        values, params, user, system = [], [], [], []
        for trial_id, trial in zip(ids, trials):
            for objective, value in enumerate(trial.values or []):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                values.append({"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind})
            for name, value in trial.params.items():
                distribution = trial.distributions[name]
                params.append({"trial_id": trial_id, "param_name": name,
                               "param_value": distribution.to_internal_repr(value),
                               "distribution_json": distribution_to_json(distribution)})
            user += [{"trial_id": trial_id, "key": k, "value_json": _json.dumps(v)} for k, v in trial.user_attrs.items()]
            system += [{"trial_id": trial_id, "key": k, "value_json": _json.dumps(v)}
                       for k, v in trial.system_attrs.items()]
        for model, rows in ((models.TrialValueModel, values), (models.TrialParamModel, params),
                            (models.TrialUserAttributeModel, user), (models.TrialSystemAttributeModel, system)):
            if rows:
                session.execute(sqlalchemy.insert(model.__table__), rows)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def measure(spec_path: str) -> dict:
    """``launch --resume`` for the spec's remaining trials, with the driver's own time measured."""
    import ray

    from gsmsearch.search import _launch, launch

    baseline = _rss_mib()
    blocked = {"s": 0.0}
    asking = {"s": 0.0}
    run_wall = {}

    def timed(function, into):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                into["s"] += time.perf_counter() - begin
                into["n"] = into.get("n", 0) + 1
        return wrapper

    ray.wait, ray.get = timed(ray.wait, blocked), timed(ray.get, blocked)
    _launch._next_trial = timed(_launch._next_trial, asking)
    original_run = _launch.Driver.run

    collecting = {"s": 0.0, "full": 0}  # the garbage collector's passes while the loop runs

    def on_gc(phase, info, started={}):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            collecting["s"] += time.perf_counter() - started.pop("t")
            collecting["full"] += info.get("generation") == 2

    def run(self):
        import gc

        begin, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        gc.callbacks.append(on_gc)
        try:
            original_run(self)
        finally:
            gc.callbacks.remove(on_gc)
        run_wall["s"] = time.perf_counter() - begin
        run_wall["cpu_s"] = time.process_time() - cpu  # all of the process's threads (Ray's client too)
        run_wall["load"] = (load + os.getloadavg()[0]) / 2

    _launch.Driver.run = run
    profile_path = os.environ.get("DRIVER_SCALE_PROFILE")  # a cProfile of the launch, for finding where time goes
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        summary = profiler.runcall(launch, spec_path, resume=True, status_interval=1e9, out=open(os.devnull, "w"))
        profiler.dump_stats(profile_path)
    else:
        summary = launch(spec_path, resume=True, status_interval=1e9, out=open(os.devnull, "w"))
    trials = summary.completed
    return {"run_wall_s": run_wall["s"], "run_cpu_s": run_wall["cpu_s"], "load_average_1min": run_wall["load"],
            "asks": asking.get("n", 0), "gc_s": collecting["s"], "gc_full_passes": collecting["full"],
            "blocked_on_ray_s": blocked["s"], "ask_s": asking["s"],
            "completed": trials, "peak_rss_mib": _peak_rss_mib(), "baseline_rss_mib": baseline}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step(name: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.driver_scale", "--step", name, *args], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _timed_command(args, cwd) -> dict:
    begin = time.perf_counter()
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - begin
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{args} failed: {process.stderr.read()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def run_size(storage_kind: str, storage: str, size: int, more: int, folder: Path) -> dict:
    name = f"scale_{storage_kind}_{size}"
    spec_path = folder / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(name, storage, size + more, str(folder / name))))
    filled = _step("prefill", str(spec_path), str(size))
    measured = _step("measure", str(spec_path))
    gsmsearch = [sys.executable, "-m", "gsmsearch"]
    commands = {
        "status": _timed_command(gsmsearch + ["status", str(spec_path)], folder),
        "export_csv": _timed_command(gsmsearch + ["export", str(spec_path), "--format", "csv", "-o",
                                                  str(folder / f"{name}.csv")], folder),
        "report": _timed_command(gsmsearch + ["report", str(spec_path), "-o", str(folder / f"{name}.html")], folder),
    }
    commands["report"]["size_mib"] = (folder / f"{name}.html").stat().st_size / 2**20
    driver_s = measured["run_wall_s"] - measured["blocked_on_ray_s"]
    return {"storage": storage_kind, "size": size, "more": measured["completed"] - filled["trials"],
            **filled, **measured, "driver_s_per_trial": driver_s / more,
            "ask_s_per_trial": measured["ask_s"] / more,
            "other_driver_s_per_trial": (driver_s - measured["ask_s"]) / more, "commands": commands}


def run_driver_size(storage_kind: str, storage: str, size: int, more: int, folder: Path) -> dict:
    """The driver's part alone (``--driver-only``): pre-fill, then ``launch --resume`` measured.
    A spec holds at most 100,000 trials: at that size the pre-fill stops ``more`` short of it."""
    name = f"scale_{storage_kind}_{size}"
    spec_path = folder / f"{name}.yaml"
    total = min(size + more, 100_000)
    spec_path.write_text(yaml.safe_dump(_spec(name, storage, total, str(folder / name))))
    filled = _step("prefill", str(spec_path), str(total - more))
    measured = _step("measure", str(spec_path))
    driver_s = measured["run_wall_s"] - measured["blocked_on_ray_s"]
    ran = measured["completed"] - filled["trials"]
    return {"storage": storage_kind, "size": size, "more": ran, **filled, **measured,
            "driver_s_per_trial": driver_s / more, "ask_s_per_trial": measured["ask_s"] / more,
            "other_driver_s_per_trial": (driver_s - measured["ask_s"]) / more}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.driver_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--more", type=int, default=20, help="real trials run after the pre-fill")
    parser.add_argument("--postgres", default=None, help="a PostgreSQL server URL (a database per size is created)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "driver-scale.json"))
    parser.add_argument("--driver-only", action="store_true",
                        help="measure the driver alone (no status/export/report runs)")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        name, *rest = args.step
        result = prefill(rest[0], int(rest[1])) if name == "prefill" else measure(rest[0])
        print(json.dumps(result))
        return 0
    from bench._timing import machine_info

    report = {"command": " ".join(["python -m bench.driver_scale"] + sys.argv[1:]), "machine": machine_info(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": []}
    with tempfile.TemporaryDirectory(prefix="gsm-scale-") as tmp:
        folder = Path(tmp)
        for size in args.sizes:
            storages = [("sqlite", f"sqlite:///{folder / f'scale-{size}.db'}")]
            if args.postgres:
                storages.append(("postgresql", _fresh_database(args.postgres, f"gsm_scale_{size}")))
            for kind, url in storages:
                if args.driver_only:
                    row = run_driver_size(kind, url, size, args.more, folder)
                    report["runs"].append(row)
                    print(f"{kind:10s} {size:7d} trials: driver {row['driver_s_per_trial']:.3f} s/trial "
                          f"(ask {row['ask_s_per_trial']:.3f}, rest {row['other_driver_s_per_trial']:.3f}; "
                          f"{row['asks']} asks; load {row['load_average_1min']:.1f}), "
                          f"peak {row['peak_rss_mib']:.0f} MiB, pre-fill {row['prefill_s']:.0f} s", flush=True)
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # each size as it is measured
                    Path(args.out).write_text(json.dumps(report, indent=1))
                    continue
                row = run_size(kind, url, size, args.more, folder)
                report["runs"].append(row)
                print(f"{kind:10s} {size:7d} trials: driver {row['driver_s_per_trial']:.3f} s/trial "
                      f"(ask {row['ask_s_per_trial']:.3f}), peak {row['peak_rss_mib']:.0f} MiB; "
                      + ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in row["commands"].items())
                      + f"; report {row['commands']['report']['size_mib']:.1f} MiB", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def _fresh_database(server_url: str, name: str) -> str:
    import sqlalchemy

    engine = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return str(sqlalchemy.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False))


if __name__ == "__main__":
    sys.exit(main())
