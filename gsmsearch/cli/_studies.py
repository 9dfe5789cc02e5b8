"""`gsmsearch list`, `gsmsearch status`, `gsmsearch export`: read studies from any storage."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

from ._errors import UsageError

STORAGE_HELP = "storage URL (e.g. sqlite:///studies/quickstart.db); or give a spec file as STUDY"


def is_file(text: str) -> bool:
    """Whether a command-line argument names an existing file (a study name too long to be a
    file name is not one, instead of an OSError)."""
    try:
        return Path(text).is_file()
    except OSError:
        return False


def _resolve(study_arg: str, storage: str):
    """(study name, storage URL) from a spec path or a name plus --storage."""
    if study_arg.endswith((".yaml", ".yml")) or is_file(study_arg):
        from ..search import load_spec, resolve_storage_url, study_paths

        spec = load_spec(study_arg)
        url = storage or resolve_storage_url(spec.storage, spec_dir=study_paths(spec, Path(study_arg))["spec_dir"],
                                             study_name=spec.name)
        return spec.name, url
    if not storage:
        raise UsageError("give --storage URL with a study name (or pass the study's spec file)")
    return study_arg, storage


SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_file(url: str) -> Optional[Path]:
    """The resolved path of the SQLite file behind a storage URL (None for other databases or a
    URL that cannot be read here)."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(os.path.expandvars(url))
        if parsed.get_backend_name() != "sqlite":
            return None
        database = parsed.database or ""
        if database.startswith("file:"):
            database = database[len("file:"):].split("?", 1)[0]
        if database in ("", ":memory:"):
            return None
        return Path(database).expanduser().resolve()
    except Exception:  # noqa: BLE001 - the storage itself reports a bad URL
        return None


def check_output_path(output, *, databases: Iterable[str] = (), specs: Iterable = (),
                      flag: str = "-o/--output") -> Path:
    """``output`` as a Path once it is safe to write: its folder exists, it is not a folder, and
    it is neither a study's database (a storage URL in ``databases``), a spec file given (``specs``)
    nor any SQLite database.  Raises UsageError otherwise; nothing is written here."""
    path = Path(output)
    resolved = path.resolve()
    for url in databases:
        db = sqlite_file(url)
        if db is not None and resolved == db:
            raise UsageError(f"refusing to overwrite {output}: it is the study's database")
    for spec in specs:
        if spec is not None and resolved == Path(spec).resolve():
            raise UsageError(f"refusing to overwrite {output}: it is the spec file")
    if path.is_dir():
        raise UsageError(f"{flag} {output}: is a directory; expected an output file")
    parent = resolved.parent
    if not parent.exists():
        raise UsageError(f"{flag} {output}: its folder {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{flag} {output}: {parent} is not a folder")
    if path.is_file():
        try:
            with open(path, "rb") as handle:
                head = handle.read(16)
        except OSError:
            head = b""
        if head == SQLITE_MAGIC:
            raise UsageError(f"refusing to overwrite {output}: it is an SQLite database (a study's "
                             f"storage?); choose another -o file")
    return path


def _load(name: str, url: str):
    import optuna

    from ..search import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, must_exist=True)
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        raise UsageError(f"no study {name!r} in that storage; it has: {', '.join(names) or '(none)'}")
    return optuna.load_study(study_name=name, storage=storage)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list the studies in a storage",
                              epilog="example:\n  gsmsearch list --storage sqlite:///studies/quickstart.db",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", required=True,
                   help="storage URL (e.g. sqlite:///studies/quickstart.db or postgresql+psycopg://user@host/db)")
    p.set_defaults(run=run_list)

    p = subparsers.add_parser("status", help="trial counts and the Pareto front of a study",
                              epilog="examples:\n  gsmsearch status studies/quickstart.yaml\n"
                                     "  gsmsearch status quickstart --storage sqlite:///studies/quickstart.db",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study name, or its spec file")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.set_defaults(run=run_status)

    p = subparsers.add_parser("export", help="write a study's trials as CSV or Parquet",
                              epilog="example:\n  gsmsearch export studies/quickstart.yaml --format csv -o trials.csv",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study name, or its spec file")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("-o", "--output", default=None, help="output file (default: STUDY.FORMAT; '-' = stdout for csv)")
    p.set_defaults(run=run_export)


def run_list(args) -> int:
    import optuna

    from ..search import open_storage
    from ._format import table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(args.storage, must_exist=True)
    rows = []
    for summary in storage.get_all_studies():
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        rows.append({"study": summary.study_name, "trials": len(states),
                     "complete": states.count("COMPLETE"), "running": states.count("RUNNING"),
                     "failed": states.count("FAIL")})
    print(table(rows, ["study", "trials", "complete", "running", "failed"]) if rows else "(no studies)")
    return 0


def run_status(args) -> int:
    from ..search import front_records, study_hypervolume, study_records
    from ._format import table

    name, url = _resolve(args.study, args.storage)
    study = _load(name, url)
    records = study_records(study)
    directions = ["maximize" if d.name == "MAXIMIZE" else "minimize" for d in study.directions]
    metrics = study.metric_names or [f"objective_{i}" for i in range(len(directions))]
    counts = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
    print(f"study {name}: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())))
    families = sorted({r.family for r in records if r.family})
    for family in families:
        fam = [r for r in records if r.family == family]
        hv = study_hypervolume(fam, metrics, directions)
        hv_text = "" if hv != hv else f", hypervolume {hv:.4f}"
        print(f"  {family}: {sum(r.state == 'COMPLETE' for r in fam)} complete{hv_text}")
    front = front_records(records, directions)
    rows = [{"trial": r.number, "family": r.family, **dict(zip(metrics, r.values)),
             **{k: v for k, v in r.params.items() if k != "family"}} for r in front]
    if rows:
        columns = list(dict.fromkeys(c for row in rows for c in row))
        print("Pareto front (feasible trials):\n" + table(rows, columns))
    failed = [r for r in records if r.state == "FAIL"]
    for r in failed[-5:]:
        print(f"  trial {r.number} failed: {r.failure_reason}")
    return 0


def run_export(args) -> int:
    name, url = _resolve(args.study, args.storage)
    output = args.output or f"{name}.{args.format}"
    if output == "-" and args.format != "csv":
        raise UsageError("-o - (stdout) is for --format csv; give a file for parquet")
    if output != "-":
        spec = args.study if is_file(args.study) else None
        check_output_path(output, databases=[url], specs=[spec])
    study = _load(name, url)
    frame = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs",
                                          "system_attrs", "datetime_start", "datetime_complete",
                                          "duration"))
    # nested user attrs (layers, curves, config) are JSON strings in a flat file
    import json

    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, (dict, list))).any():
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
    if args.format == "csv":
        if output == "-":
            frame.to_csv(sys.stdout, index=False)
        else:
            frame.to_csv(output, index=False)
    else:
        frame.to_parquet(output, index=False)
    if output != "-":
        print(f"wrote {len(frame)} trials to {output}")
    return 0
