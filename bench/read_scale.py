"""The read commands on a large study: ``status``, ``export``, ``report`` and the dashboard's first
load, by study size.

    .venv/bin/python -m bench.read_scale --sizes 1000 10000 100000
    .venv/bin/python -m bench.read_scale --sizes 1000 10000 --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres

For each storage and size N: two real trials run first (``gsmsearch launch``, digits-mlp, 1
epoch, local Ray), in a study of their own; then a study created the way ``launch`` creates it
is filled with N finished trials, each a copy of one of the real ones with its own budget,
values, constraint and configuration digest.  About 1% of them FAIL (with a failure reason), 1%
are PRUNED and 0.5% are duplicates (told COMPLETE with the trial they repeat as
``duplicate_of``), as a long study holds.  The rows are written in Optuna's own schema (its
SQLAlchemy models' tables: trials, trial_values, trial_params, trial_user_attributes,
trial_system_attributes), in one transaction, which takes seconds where ``Study.add_trials``
(one transaction per trial) takes many minutes at 100,000; ``optuna.load_study`` reads the
result as any other study.

Then each command runs in its own process, as a user runs it (``python -m gsmsearch ...``), and
its wall time and peak RSS are recorded, with the report's file size.  The dashboard is served
(``gsmsearch dashboard``) and its first paint timed in Chromium: from the page request to the
first Pareto figure drawn (``.js-plotly-plot .trace``); the server's start (reading the study)
is timed separately, from the command to the port answering.

``--folder DIR`` keeps the databases and outputs in DIR (else a temporary folder, removed after)
and reuses a study pre-filled there by an earlier run (same storage and size); ``--repeats K``
runs each command K times and records each run and their median.  PostgreSQL databases are
reused the same way with ``--folder`` (the database ``gsm_read_N`` is not dropped when its study
holds N trials).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.driver_scale import _spec  # the same study spec

ROOT = Path(__file__).resolve().parent.parent


def prefill(spec_path: str, size: int) -> dict:
    """Run 2 real trials, then write ``size`` finished trials modelled on them (see the module
    docstring)."""
    import optuna
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    from gsmsearch.search import launch
    from gsmsearch.search._launch import Driver
    from gsmsearch.search._spec import load_spec
    from gsmsearch.search._storage import open_storage, resolve_storage_url

    spec = load_spec(spec_path)
    real = yaml.safe_load(Path(spec_path).read_text())
    template_spec = Path(spec_path).with_name(f"{spec.name}-template.yaml")
    template_spec.write_text(yaml.safe_dump({**real, "name": f"{spec.name}_template", "trials": 2}))
    launch(template_spec, status_interval=1e9, out=open(os.devnull, "w"))
    url = resolve_storage_url(spec.storage, spec_dir=Path(spec_path).parent, study_name=spec.name)
    study = Driver(spec, spec_path, out=open(os.devnull, "w")).open(url)  # created as `launch` creates it
    storage = open_storage(url)
    source = optuna.load_study(study_name=f"{spec.name}_template", storage=storage)
    templates = [t for t in source.get_trials() if t.state == TrialState.COMPLETE]
    study_id = study._study_id
    started = time.perf_counter()
    rng = random.Random(0)
    engine = sqlalchemy.create_engine(url)
    tables = {name: models.BaseModel.metadata.tables[name] for name in
              ("trials", "trial_values", "trial_params", "trial_user_attributes", "trial_system_attributes")}
    with engine.begin() as connection:
        first_id = (connection.execute(sqlalchemy.select(sqlalchemy.func.max(tables["trials"].c.trial_id)))
                    .scalar() or 0) + 1
        rows = {name: [] for name in tables}
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        for number in range(size):
            trial_id = first_id + number
            template = templates[number % len(templates)]
            family = template.params["family"]
            budget = rng.uniform(0.1, 0.9)
            quality, flops = rng.uniform(0.3, 0.97), budget * rng.uniform(0.9, 1.1)
            attrs = json.loads(json.dumps(template.user_attrs))
            attrs["config"]["budget"] = budget
            attrs["config_digest"] = f"{rng.getrandbits(64):016x}"
            attrs["result"].update(quality=quality, val_quality=quality, relative_flops=flops,
                                   test_quality=quality - rng.uniform(0, 0.02))
            draw = rng.random()
            state = "COMPLETE"
            if draw < 0.01:
                state = "FAIL"
                attrs = {"family": family, "config": attrs["config"], "config_digest": attrs["config_digest"],
                         "attempts": 1, "failure_reason": f"RuntimeError: trial {number} ran out of memory"}
            elif draw < 0.02:
                state = "PRUNED"
                attrs.pop("result")
                attrs["pruned"] = {"stopped_after_epoch": 1}
                attrs["prune_reason"] = "below the running median"
            elif draw < 0.025 and number > 10:
                attrs["duplicate_of"] = number - 7
            rows["trials"].append({"trial_id": trial_id, "number": number, "study_id": study_id,
                                   "state": state, "datetime_start": now, "datetime_complete": now})
            if state == "COMPLETE":
                for objective, value in enumerate((quality, flops)):
                    rows["trial_values"].append({"trial_id": trial_id, "objective": objective, "value": value,
                                                 "value_type": "FINITE"})
                rows["trial_system_attributes"].append({"trial_id": trial_id, "key": "constraints:relative_flops",
                                                        "value_json": json.dumps(flops - 0.6)})
            for name, distribution in template.distributions.items():
                value = budget if name.endswith(".budget") else template.params[name]
                rows["trial_params"].append({
                    "trial_id": trial_id, "param_name": name,
                    "param_value": distribution.to_internal_repr(value),
                    "distribution_json": optuna.distributions.distribution_to_json(distribution)})
            for key, value in attrs.items():
                rows["trial_user_attributes"].append({"trial_id": trial_id, "key": key,
                                                      "value_json": json.dumps(value)})
            if len(rows["trials"]) == 5000 or number == size - 1:
                for name in tables:  # parents first
                    if rows[name]:
                        connection.execute(tables[name].insert(), rows[name])
                rows = {name: [] for name in tables}
        if engine.dialect.name == "postgresql":  # the ids were given: move each table's sequence on
            for name, table in tables.items():
                key = table.primary_key.columns.values()[0].name
                connection.execute(sqlalchemy.text(
                    f"SELECT setval(pg_get_serial_sequence('{name}', '{key}'), (SELECT max({key}) FROM {name}))"))
    engine.dispose()
    count = len(optuna.load_study(study_name=spec.name, storage=storage).get_trials(deepcopy=False))
    return {"prefill_s": time.perf_counter() - started, "trials": count}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_first_paint(spec_path: Path, folder: Path) -> dict:
    """Serve the dashboard of the study and time (a) the server's start, to the port answering
    and (b) in Chromium, the page request to the first Pareto figure drawn."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    begin = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "gsmsearch", "dashboard", str(spec_path), "--port", str(port)],
                              cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"dashboard exited: {server.stderr.read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        started = time.perf_counter() - begin
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            begin = time.perf_counter()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#pareto-row .js-plotly-plot .trace", timeout=600_000)
            paint = time.perf_counter() - begin
            page.wait_for_function("document.querySelectorAll('#trials tbody tr').length > 1", timeout=600_000)
            table = time.perf_counter() - begin
            browser.close()
        return {"server_start_s": started, "first_paint_s": paint, "trial_table_s": table,
                "load_average_1min": os.getloadavg()[0]}
    finally:
        server.terminate()
        server.wait(timeout=30)


def _step(name: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.read_scale", "--step", name, *args], cwd=ROOT,
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
    # CPU seconds beside the wall time: on a shared machine the wall time counts other
    # processes' turns too
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
            "load_average_1min": os.getloadavg()[0]}


def _filled(storage: str, name: str) -> int:
    """How many trials the study ``name`` holds in ``storage`` (0: no such study or database)."""
    from gsmsearch.search._records import StudyReader

    try:
        reader = StudyReader(storage)
    except (ValueError, OSError):  # no database yet, or no Optuna tables in it
        return 0
    try:
        return sum(reader.state_counts().get(name, {}).values())
    finally:
        reader.close()


def _median_of(runs: list) -> dict:
    """The runs' median of each number, the runs beside it (one run: that run)."""
    if len(runs) == 1:
        return runs[0]
    import statistics

    out = {key: statistics.median(run[key] for run in runs) for key in runs[0]
           if isinstance(runs[0][key], (int, float))}
    out["runs"] = runs
    return out


def run_size(storage_kind: str, storage: str, size: int, folder: Path, dashboard: bool, repeats: int = 1) -> dict:
    name = f"read_{storage_kind}_{size}"
    spec_path = folder / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(name, storage, size, str(folder / name))))
    if _filled(storage, name) == size:  # pre-filled by an earlier run in this folder
        filled = {"prefill_s": None, "trials": size, "reused": True}
    else:
        if storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///"):]).unlink(missing_ok=True)  # a partial fill of an earlier run
        filled = _step("prefill", str(spec_path), str(size))
    gsmsearch = [sys.executable, "-m", "gsmsearch"]
    runs = {
        "status": lambda: _timed_command(gsmsearch + ["status", str(spec_path)], folder),
        "export_csv": lambda: _timed_command(gsmsearch + ["export", str(spec_path), "--format", "csv", "-o",
                                                          str(folder / f"{name}.csv")], folder),
        "export_parquet": lambda: _timed_command(gsmsearch + ["export", str(spec_path), "--format", "parquet", "-o",
                                                              str(folder / f"{name}.parquet")], folder),
        "report": lambda: _timed_command(gsmsearch + ["report", str(spec_path), "-o", str(folder / f"{name}.html")],
                                         folder),
    }
    commands = {command: _median_of([run() for _ in range(repeats)]) for command, run in runs.items()}
    commands["report"]["size_mb"] = (folder / f"{name}.html").stat().st_size / 1e6
    commands["export_csv"]["size_mb"] = (folder / f"{name}.csv").stat().st_size / 1e6
    row = {"storage": storage_kind, "size": size, **filled, "commands": commands}
    if dashboard:
        row["dashboard"] = _median_of([dashboard_first_paint(spec_path, folder) for _ in range(repeats)])
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.read_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--postgres", default=None, help="a PostgreSQL server URL (a database per size is created)")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--no-dashboard", action="store_true", help="skip the dashboard's first paint")
    parser.add_argument("--folder", default=None,
                        help="keep the studies and outputs here and reuse a study pre-filled here earlier")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command (the median is recorded)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "driver-scale-read.json"))
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        name, *rest = args.step
        print(json.dumps(prefill(rest[0], int(rest[1]))))
        return 0
    from bench._timing import machine_info

    report = {"command": " ".join(["python -m bench.read_scale"] + (sys.argv[1:] if argv is None else argv)),
              "machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": []}
    out = Path(args.out)
    # runs of other storages or sizes, from an earlier command, stay in the file beside this one's
    kept = [r for r in (json.loads(out.read_text()).get("earlier", []) + json.loads(out.read_text())["runs"]
                        if out.exists() else [])
            if not (r["size"] in args.sizes and (r["storage"] == "sqlite" and not args.no_sqlite
                                                 or r["storage"] == "postgresql" and args.postgres))]
    if kept:
        report["earlier"] = kept
    with tempfile.TemporaryDirectory(prefix="gsm-read-scale-") as tmp:
        folder = Path(args.folder or tmp).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            storages = [] if args.no_sqlite else [("sqlite", f"sqlite:///{folder / f'read-{size}.db'}")]
            if args.postgres:
                storages.append(("postgresql", _fresh_database(args.postgres, f"gsm_read_{size}",
                                                               keep=f"read_postgresql_{size}" if args.folder else None,
                                                               size=size)))
            for kind, url in storages:
                row = run_size(kind, url, size, folder, not args.no_dashboard, args.repeats)
                row["command"], row["started"] = report["command"], report["started"]
                report["runs"].append(row)
                print(f"{kind:10s} {size:7d} trials (pre-fill "
                      + ("reused" if row.get("reused") else f"{row['prefill_s']:.0f} s") + "): "
                      + ", ".join(f"{k} {v['wall_s']:.1f} s ({v['peak_rss_mib']:.0f} MiB)"
                                  for k, v in row["commands"].items())
                      + f"; report {row['commands']['report']['size_mb']:.1f} MB"
                      + (f"; dashboard start {row['dashboard']['server_start_s']:.1f} s, first paint "
                         f"{row['dashboard']['first_paint_s']:.1f} s" if "dashboard" in row else ""), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=1))
            for path in folder.glob("read_*"):  # the workdirs and outputs of this size
                if path.is_dir() and not args.folder:
                    shutil.rmtree(path, ignore_errors=True)
    return 0


def _fresh_database(server_url: str, name: str, keep: str = None, size: int = 0) -> str:
    """The URL of the database ``name`` on the server, created empty; with ``keep``, a database
    whose study ``keep`` holds ``size`` trials is kept as it is (to be reused)."""
    import sqlalchemy

    url = str(sqlalchemy.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False))
    engine = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        exists = connection.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                                    {"name": name}).first()
        if exists and keep and _filled(url, keep) == size:
            engine.dispose()
            return url
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url


if __name__ == "__main__":
    sys.exit(main())
