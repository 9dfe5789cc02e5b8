"""`gsmsearch list`, `gsmsearch status`, `gsmsearch export`: read studies from any storage."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from ._errors import UsageError
from ._output import check_output_path, write_output

STORAGE_HELP = "storage URL (e.g. sqlite:///studies/quickstart.db); or give a spec file as STUDY"


def is_file(text: str) -> bool:
    """Whether a command-line argument names an existing file, or something there that is not a
    folder (a FIFO, a device, a link loop: reading it as a spec says what it is).  A study name
    too long to be a file name is not one, instead of an OSError."""
    try:
        return Path(text).is_file() or (os.path.lexists(text) and not Path(text).is_dir())
    except OSError:
        return False


def _resolve(study_arg: str, storage: str):
    """(study name, storage URL) from a spec path or a name plus --storage."""
    if study_arg.endswith((".yaml", ".yml")) or is_file(study_arg):
        # the study's name and storage alone, and the spec's folder as the driver resolves it
        # (``study_paths``): the read commands import neither the driver nor the training stack
        from ..search._spec import load_study_location
        from ..search._storage import resolve_storage_url

        spec = load_study_location(study_arg)
        if storage:
            return spec.name, storage
        check_storage_variables(study_arg, spec.storage)
        url = resolve_storage_url(spec.storage, spec_dir=Path(study_arg).resolve().parent, study_name=spec.name)
        return spec.name, url
    if not storage:
        raise UsageError("give --storage URL with a study name (or pass the study's spec file)")
    return study_arg, storage


def check_storage_variables(spec_path, storage: Optional[str]) -> None:
    """A SpecError naming the spec file when its storage URL uses a ${VAR} that is not set."""
    from ..search._spec import SpecError
    from ..search._storage import unset_variables

    missing = unset_variables(storage or "")
    if missing:
        raise SpecError(f"{spec_path}: storage: ${{{missing[0]}}} is not set in the environment (the storage URL "
                        f"uses it)")


def _read(name: str, url: str, user_keys, lazy_keys=()):
    """(reader, the study's data) from :mod:`gsmsearch.search._records`: the trials' records
    holding the user attributes ``user_keys`` (``lazy_keys``: parsed when read), read in a few
    queries."""
    from ..search._records import StudyReader

    reader = StudyReader(url)
    try:
        return reader, reader.read(name, user_keys=user_keys, lazy_keys=lazy_keys)
    except KeyError:
        names = reader.study_names()
        reader.close()
        raise UsageError(f"no study {name!r} in that storage; it has: {', '.join(names) or '(none)'}") from None


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
    from ..search._records import StudyReader
    from ._format import table

    reader = StudyReader(args.storage)
    counts = reader.state_counts()
    rows = []
    for name in reader.study_names():
        states = counts.get(name, {})
        rows.append({"study": name, "trials": sum(states.values()), "complete": states.get("COMPLETE", 0),
                     "running": states.get("RUNNING", 0), "failed": states.get("FAIL", 0)})
    reader.close()
    print(table(rows, ["study", "trials", "complete", "running", "failed"]) if rows else "(no studies)")
    return 0


#: how ``status`` says what a study's quality values are, by the split they were measured on
SPLIT_NOTES = {
    "val": "quality is measured on the validation split (what the front is chosen on); quality (test) is "
           "recorded beside it, never selected on",
    "test": "quality is measured on the test split: this study was recorded by an older gsmsearch and its "
            "front was chosen on test data; quality (val) beside it where recorded",
}


def _quality_columns(record, metrics, split: str) -> dict:
    """The front row's objective columns, quality named with its split and followed by the other
    split's quality."""
    from ..search import metric_label, split_qualities

    row = {}
    for metric, value in zip(metrics, record.values):
        row[metric_label(metric, split)] = value
        if metric == "quality":
            val, test = split_qualities(record, split)
            other = "test" if split == "val" else "val"
            row[metric_label("quality", other)] = test if other == "test" else val
    return row


def run_status(args) -> int:
    from ..search._records import STATUS_KEYS
    from ..search._study import front_records, objective_split, study_hypervolume
    from ._format import table

    name, url = _resolve(args.study, args.storage)
    reader, study = _read(name, url, STATUS_KEYS)
    records = study.records
    directions, metrics = study.directions, study.metric_names
    counts = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
    print(f"study {name}: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())))
    split = objective_split(study.user_attrs)
    if "quality" in metrics:
        print(f"  {SPLIT_NOTES[split]}")
    families = sorted({r.family for r in records if r.family})
    for family in families:
        fam = [r for r in records if r.family == family]
        hv = study_hypervolume(fam, metrics, directions)
        hv_text = "" if hv != hv else f", hypervolume {hv:.4f}"
        print(f"  {family}: {sum(r.state == 'COMPLETE' for r in fam)} complete{hv_text}")
    front = front_records(records, directions)
    # the recorded result (the qualities on each split) of the front trials alone
    results = reader.user_attrs(study.study_id, [r.number for r in front], keys=("result",))
    reader.close()
    for r in front:
        r.user_attrs.update(results[r.number])
    rows = [{"trial": r.number, "family": r.family, **_quality_columns(r, metrics, split),
             **{k: v for k, v in r.params.items() if k != "family"}} for r in front]
    if rows:
        columns = list(dict.fromkeys(c for row in rows for c in row))
        print("Pareto front (feasible trials):\n" + table(rows, columns))
    failed = [r for r in records if r.state == "FAIL"]
    for r in failed[-5:]:
        print(f"  trial {r.number} failed: {r.failure_reason}")
    return 0


#: The result metrics ``export`` writes as columns of their own (beside ``val_quality`` and
#: ``test_quality``), from each trial's recorded result.
EXPORT_RESULT_COLUMNS = ("relative_flops", "structured_relative_flops", "relative_linear_flops", "flops_per_sample",
                         "dense_flops_per_sample", "params", "dense_params", "latency_ms", "dense_latency_ms",
                         "train_seconds", "epochs_run")


def _add_result_columns(frame, records, split: str, results=None) -> None:
    """``val_quality`` and ``test_quality`` (the objective's split and the other one's value
    recorded beside it), ``family``, ``feasible`` (a complete trial whose every constraint
    holds; empty for a trial that did not complete) and :data:`EXPORT_RESULT_COLUMNS` (empty
    where a trial did not record the metric), from the trials' records keyed by number and
    their recorded ``result``: ``results`` (number, result) of the complete trials, each used
    once as it comes; None: the records' own."""
    from types import SimpleNamespace

    import pandas as pd

    from ..search import split_qualities

    def number_or_none(value):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    if results is None:
        results = ((n, r.user_attrs.get("result")) for n, r in records.items() if r.state == "COMPLETE")
    qualities, metrics = {}, {}
    for number, value in results:
        record = records[number]
        if record.state != "COMPLETE":
            continue
        qualities[number] = split_qualities(SimpleNamespace(user_attrs={"result": value}), split)
        value = value if isinstance(value, dict) else {}
        metrics[number] = [number_or_none(value.get(metric)) for metric in EXPORT_RESULT_COLUMNS]
    qualities = {n: qualities.get(n, (None, None)) for n in records}
    nothing = [None] * len(EXPORT_RESULT_COLUMNS)
    results = {n: metrics.get(n, nothing) for n in records}
    frame["val_quality"] = frame["number"].map(lambda n: qualities[n][0])
    frame["test_quality"] = frame["number"].map(lambda n: qualities[n][1])
    frame["family"] = frame["number"].map(lambda n: records[n].family)
    frame["feasible"] = pd.array([records[n].feasible if records[n].state == "COMPLETE" else None
                                  for n in frame["number"]], dtype="boolean")
    for index, metric in enumerate(EXPORT_RESULT_COLUMNS):
        frame[metric] = pd.array([results[n][index] for n in frame["number"]], dtype="Float64")


#: trials per chunk of the export's file: a multiple of the rows pandas formats at a time (its
#: ``to_csv`` chunk), so that each value is written as writing the whole table at once writes it
_EXPORT_CHUNKS = 6


def _rows_per_slice(columns: int) -> int:
    """The rows pandas' ``to_csv`` formats at a time in a table of ``columns`` columns (its
    default chunk size): it writes a datetime column's slice with the digits that slice needs."""
    return (100000 // columns) or 1


def run_export(args) -> int:
    name, url = _resolve(args.study, args.storage)
    output = args.output or f"{name}.{args.format}"
    if output == "-" and args.format != "csv":
        raise UsageError("-o - (stdout) is for --format csv; give a file for parquet")
    if output != "-":
        spec = args.study if is_file(args.study) else None
        check_output_path(output, databases=[url], specs=[spec])
    # Optuna's trials_dataframe columns, read from the tables (with the nested attributes as
    # their stored JSON text) instead of building every trial.  The table is written a chunk of
    # trials at a time: every column but the nested attributes (the bulk of a study's text) is
    # made for the whole study first, so each column has the type it has in the whole table;
    # the nested ones (text) are read for each chunk as it is written
    import pandas as pd

    from ..search import objective_split
    from ..search._records import ExportTable

    reader, data = _read(name, url, ("family", "duplicate_of", "failure_reason"))
    try:
        table = ExportTable(reader, data, nested_apart=True)
        frame = pd.DataFrame(table.rows, columns=table.row_columns)
        table.rows = None
        # quality by split, the same columns whatever the study's age: the objective's split and
        # the other one's value recorded beside it (an older study's quality is on the test split)
        split = objective_split(data.user_attrs)
        frame.insert(frame.columns.get_loc("state") + 1, "quality_split", split)
        complete = [r.number for r in data.records if r.state == "COMPLETE"]
        _add_result_columns(frame, {r.number: r for r in data.records}, split, table.user_attr("result", complete))
        # nested user attrs (layers, curves, config) are JSON strings in a flat file
        import json

        for column in frame.columns:
            if frame[column].map(lambda v: isinstance(v, (dict, list))).any():
                frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
        columns = list(table.columns)
        columns.insert(columns.index("state") + 1, "quality_split")
        columns += [c for c in frame.columns if c not in columns]
        rows_per_slice = _rows_per_slice(len(columns))
        step = rows_per_slice * _EXPORT_CHUNKS

        def chunks():
            for start in range(0, max(len(frame), 1), step):
                part = frame.iloc[start:start + step].copy()
                texts = table.nested_rows(part["number"].tolist())
                for column in table.nested:
                    part[column] = pd.Series([texts[n].get(column, float("nan")) for n in part["number"]],
                                             index=part.index, dtype=object)
                yield part[columns]

        if args.format == "csv":
            def write_csv(handle):
                for index, part in enumerate(chunks()):
                    part.to_csv(handle, index=False, header=index == 0, chunksize=rows_per_slice)

            if output == "-":
                write_csv(sys.stdout)
            else:
                write_output(output, lambda tmp: _with_open(tmp, write_csv))
        else:
            write_output(output, lambda tmp: _write_parquet(tmp, frame, table.nested, columns, chunks()))
    finally:
        reader.close()
    if output != "-":
        print(f"wrote {len(frame)} trials to {output}")
    return 0


def _with_open(path, write) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        write(handle)


def _write_parquet(path, frame, nested, columns, chunks) -> None:
    """The chunks as one Parquet file, a row group each, with the schema the whole table has
    (``frame``: every column but the ``nested`` ones, which are text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    whole = frame.assign(**{column: "" for column in nested})[columns]
    schema = pa.Schema.from_pandas(whole, preserve_index=False)
    del whole
    with pq.ParquetWriter(path, schema) as writer:
        for part in chunks:
            writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False))
