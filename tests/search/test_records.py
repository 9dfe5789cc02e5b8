"""The read commands' reader (``gsmsearch.search._records``) gives the records Optuna's API gives
(``study_records`` over ``get_trials``), field by field, on SQLite and PostgreSQL: for a study a
real launch wrote and for one holding every state, duplicates, both constraint forms, infinite
values and every kind of parameter.  And the read commands import neither torch nor Ray."""
import math

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from gsmsearch.cli import main
from gsmsearch.search._records import LAZY_KEYS, STATUS_KEYS, VIEW_KEYS, StudyReader, read_study
from gsmsearch.search._study import study_records
from tests.fresh_process import fresh_python

from .conftest import TINY_SPEC


def _same(a, b):
    """Equal, NaN equal to NaN (a constraint or value that is not a number)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


def check_reader_matches_optuna(url, name):
    """Every record the reader gives equals Optuna's, field by field; with a subset of the user
    attributes, it equals Optuna's restricted to them."""
    study = optuna.load_study(study_name=name, storage=url)
    expected = study_records(study)
    data = read_study(url, name, user_keys=None)
    assert data.directions == ["maximize" if d.name == "MAXIMIZE" else "minimize" for d in study.directions]
    assert data.metric_names == (study.metric_names or [f"objective_{i}" for i in range(len(study.directions))])
    assert _same(data.user_attrs, study.user_attrs)
    assert [r.number for r in data.records] == [r.number for r in expected]
    for got, want in zip(data.records, expected):
        for field in ("number", "state", "family", "values", "params", "user_attrs", "constraints"):
            assert _same(getattr(got, field), getattr(want, field)), (got.number, field)
        assert list(got.params) == list(want.params)  # the parameters in Optuna's order
        assert got.feasible == want.feasible
    for keys, lazy in ((STATUS_KEYS, ()), (VIEW_KEYS, ()), (VIEW_KEYS, LAZY_KEYS), (None, LAZY_KEYS)):
        narrow = read_study(url, name, user_keys=keys, lazy_keys=lazy)
        for got, want in zip(narrow.records, expected):
            # a lazily read attribute reads as the parsed one (as a whole, and key by key)
            wanted = {k: v for k, v in want.user_attrs.items() if keys is None or k in keys}
            assert _same(dict(got.user_attrs), wanted) and got.user_attrs == wanted
            assert all(_same(got.user_attrs[k], v) for k, v in wanted.items())
            assert (got.state, got.family, got.values, got.params) == (want.state, want.family, want.values,
                                                                         want.params)
    reader = StudyReader(url)
    try:
        numbers = [r.number for r in expected][::2]
        full = reader.user_attrs(data.study_id, numbers)
        assert all(_same(full[n], next(r for r in expected if r.number == n).user_attrs) for n in numbers)
        with pytest.raises(KeyError):
            reader.read("no-such-study")
    finally:
        reader.close()
    return expected


def _synthetic(url, name="synthetic", odd_constraint=False, one_type_flag=False):
    """A study holding every state, told duplicates, both constraint forms (and a constraint that
    is no number), infinite values, float/int/categorical parameters and a second study beside it
    (``one_type_flag``: the categorical parameter's choices are all strings, as Parquet needs)."""
    study = optuna.create_study(study_name=name, storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "relative_flops"])
    study.set_user_attr("objective_split", "val")
    study.set_user_attr("spec", {"name": name, "nested": {"a": [1, 2]}})
    other = optuna.create_study(study_name=f"{name}-other", storage=url, directions=["maximize", "minimize"])
    distributions = {"family": CategoricalDistribution(["gblr", "lowrank", None]),
                     "gblr.budget": FloatDistribution(0.05, 0.9, log=True),
                     "lowrank.rank": IntDistribution(1, 64, step=1),
                     "flag": CategoricalDistribution(["a", "b", "c", "x"] if one_type_flag else [True, False, 2.5, "x"])}
    states = [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE, TrialState.WAITING,
              TrialState.COMPLETE, TrialState.RUNNING]
    for i in range(40):
        state = states[i % len(states)]
        family = ["gblr", "lowrank", None][i % 3]
        params = {"family": family, "flag": (["a", "b", "c", "x"] if one_type_flag else [True, False, 2.5, "x"])[i % 4]}
        if family == "gblr":
            params["gblr.budget"] = 0.05 + 0.02 * i
        elif family == "lowrank":
            params["lowrank.rank"] = 1 + i
        values = None
        if state == TrialState.COMPLETE:
            values = [0.5 + i / 100, (-math.inf if i == 3 else math.inf if i == 10 else 0.1 + i / 200)]
        user = {"config": {"budget": i / 40, "seed": 0}, "result": {"quality": 0.5 + i / 100, "test_quality": 0.4},
                "layers": {"fc": {"intervals": [[0, 1, 0, 1]]}} if i % 2 else {}}
        if family is None:
            user["family"] = "blockdiag"  # a family recorded only as an attribute
        if state == TrialState.FAIL:
            user["failure_reason"] = f"RuntimeError: boom {i}"
            user["final"] = i % 2 == 0
        if state == TrialState.COMPLETE and i % 5 == 0 and i:
            user["duplicate_of"] = i - 1  # told COMPLETE with its original's values: read as PRUNED
        system = {}
        if i % 4 == 0:
            system["constraints:relative_flops"] = i / 40 - 0.5
            system["constraints"] = [i / 40 - 0.5]
        elif i % 4 == 1:
            system["constraints"] = [0.1 - i / 40, -1.0]  # the list form alone (other tools)
        elif i % 4 == 2:
            system["constraints:params"] = "not a number" if i == 6 and odd_constraint else 0.0
        system["other:key"] = {"kept": "out of the records"}
        trial = create_trial(state=state, values=values, params={k: v for k, v in params.items()},
                             distributions={k: distributions[k] for k in params}, user_attrs=user,
                             system_attrs=system)
        (other if i == 7 else study).add_trial(trial)
    return study


@pytest.fixture
def synthetic_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'synthetic.db'}"
    _synthetic(url)
    return url


def test_the_reader_gives_optunas_records_on_sqlite(synthetic_sqlite):
    expected = check_reader_matches_optuna(synthetic_sqlite, "synthetic")
    assert len(expected) == 39  # trial 7 went to the other study
    assert {r.state for r in expected} == {"COMPLETE", "FAIL", "PRUNED", "WAITING", "RUNNING"}
    assert any(r.user_attrs.get("duplicate_of") is not None and r.state == "PRUNED" for r in expected)
    assert any(math.isinf(r.values[1]) for r in expected if r.values)
    assert {r.family for r in expected} == {"gblr", "lowrank", "blockdiag"}
    assert {tuple(r.constraints) for r in expected} == {("relative_flops",), ("0", "1"), ("params",), ()}


def test_the_reader_gives_optunas_records_on_postgresql(postgres_url):
    _synthetic(postgres_url)
    expected = check_reader_matches_optuna(postgres_url, "synthetic")
    assert len(expected) == 39


def test_a_constraint_that_is_no_number(tmp_path):
    """status refuses it as Optuna's path does (float()); the dashboard reads it as NaN, which
    never holds."""
    from gsmsearch.dashboard._source import StudySource, load_view

    url = f"sqlite:///{tmp_path / 'odd.db'}"
    _synthetic(url, odd_constraint=True)
    with pytest.raises(ValueError):
        study_records(optuna.load_study(study_name="synthetic", storage=url))
    with pytest.raises(ValueError):
        read_study(url, "synthetic")
    view = load_view(StudySource(name="synthetic", url=url, label="s"), "0")
    (odd,) = [r for r in view.records if r.number == 6]
    assert math.isnan(odd.constraints["params"]) and not odd.feasible


def check_export_matches_optuna(url, name):
    """The export table equals Optuna's trials_dataframe, its nested values as JSON text."""
    import json

    import pandas as pd

    from gsmsearch.search._records import export_table

    study = optuna.load_study(study_name=name, storage=url)
    expected = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "system_attrs",
                                             "datetime_start", "datetime_complete", "duration"))
    for column in expected.columns:
        expected[column] = expected[column].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
    reader = StudyReader(url)
    try:
        rows, columns = export_table(reader, reader.read(name, user_keys=("duplicate_of",)))
    finally:
        reader.close()
    pd.testing.assert_frame_equal(pd.DataFrame(rows, columns=columns), expected)


def test_the_export_table_is_optunas_trials_dataframe(synthetic_sqlite, postgres_url):
    check_export_matches_optuna(synthetic_sqlite, "synthetic")
    _synthetic(postgres_url)
    check_export_matches_optuna(postgres_url, "synthetic")


def _launched(tmp_path):
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({**TINY_SPEC, "trials": 3, "concurrency": 1,
                                    "workload": {**TINY_SPEC["workload"], "epochs": 1}}))
    assert main(["launch", str(spec), "--status-interval", "30"]) == 0
    return spec, f"sqlite:///{tmp_path / 'tiny.db'}"


def test_a_launched_study_reads_the_same_on_sqlite_and_postgresql(tmp_path, postgres_url, capsys):
    spec, url = _launched(tmp_path)
    expected = check_reader_matches_optuna(url, "tiny")
    assert [r.state for r in expected] == ["COMPLETE"] * 3
    assert all(r.user_attrs.get("layers") and r.user_attrs.get("result") for r in expected)
    check_export_matches_optuna(url, "tiny")
    optuna.copy_study(from_study_name="tiny", from_storage=url, to_storage=postgres_url)
    check_reader_matches_optuna(postgres_url, "tiny")
    check_export_matches_optuna(postgres_url, "tiny")
    # the commands read both the same way
    capsys.readouterr()
    assert main(["status", str(spec)]) == 0
    from_sqlite = capsys.readouterr().out
    assert main(["status", "tiny", "--storage", postgres_url]) == 0
    assert capsys.readouterr().out == from_sqlite
    assert "Pareto front (feasible trials)" in from_sqlite


def test_read_commands_import_neither_torch_nor_ray(synthetic_sqlite, tmp_path):
    """status, list, export and report, run as a user runs them, never import the training or
    execution stack (about 3 s of each command's start)."""
    spec = tmp_path / "synthetic.yaml"
    spec.write_text(yaml.safe_dump({**TINY_SPEC, "name": "numbers", "storage": f"sqlite:///{tmp_path / 'n.db'}"}))
    _synthetic(f"sqlite:///{tmp_path / 'n.db'}", "numbers")
    commands = [["status", str(spec)], ["list", "--storage", synthetic_sqlite],
                ["export", str(spec), "-o", str(tmp_path / "out.csv")],
                ["report", str(spec), "-o", str(tmp_path / "out.html")]]
    script = (
        "import json, sys\n"
        "from gsmsearch.cli import main\n"
        f"codes = [main(c) for c in {commands!r}]\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'dash'}"
        " | {m for m in sys.modules if m.startswith(('gsmsearch.workloads', 'gsmsearch.trainer', 'gsmsearch.search._launch'))})\n"
        "print('RESULT ' + json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    result = fresh_python(script, timeout=240)
    assert result["codes"] == [0, 0, 0, 0]
    assert result["heavy"] == []


def _whole_export(url, name, fmt, path, rows_per_slice=None):
    """The export as one table written at once (``rows_per_slice``: pandas' to_csv chunk size)."""
    import json

    import pandas as pd

    from gsmsearch.cli._studies import _add_result_columns
    from gsmsearch.search import objective_split
    from gsmsearch.search._records import export_table

    reader = StudyReader(url)
    try:
        data = reader.read(name, user_keys=("family", "duplicate_of", "failure_reason", "result"))
        rows, columns = export_table(reader, data)
    finally:
        reader.close()
    frame = pd.DataFrame(rows, columns=columns)
    split = objective_split(data.user_attrs)
    frame.insert(frame.columns.get_loc("state") + 1, "quality_split", split)
    _add_result_columns(frame, {r.number: r for r in data.records}, split)
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, (dict, list))).any():
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
    if fmt == "csv":
        frame.to_csv(path, index=False, **({"chunksize": rows_per_slice} if rows_per_slice else {}))
    else:
        frame.to_parquet(path, index=False)
    return frame


@pytest.mark.parametrize("rows_per_slice", [None, 1, 2, 5])
def test_export_writes_the_whole_table_chunk_by_chunk(tmp_path, monkeypatch, rows_per_slice):
    """``export`` reads and writes a chunk of trials at a time; its CSV is byte for byte the one
    the whole table written at once gives, with chunks of one trial up (each column keeps the
    type it has in the whole table: an integer parameter some trials lack is written 3.0 in
    every chunk), and its Parquet file reads back as that table."""
    import pandas as pd

    from gsmsearch.cli import _studies

    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    study = _synthetic(url, one_type_flag=True)
    for rank in range(8):  # trials 39-46: a chunk of them all hold the integer parameter (and a count)
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, values=[0.5, 0.2], params={"family": "lowrank", "lowrank.rank": 3 + rank},
            distributions={"family": CategoricalDistribution(["gblr", "lowrank", None]),
                           "lowrank.rank": IntDistribution(1, 64, step=1)},
            user_attrs={"attempts": 1, "result": {"quality": 0.5, "test_quality": 0.4}}))
    if rows_per_slice is not None:  # chunks of 6 x this many trials, formatted this many at a time
        monkeypatch.setattr(_studies, "_rows_per_slice", lambda columns: rows_per_slice)
    out = tmp_path / "out.csv"
    assert main(["export", "synthetic", "--storage", url, "-o", str(out)]) == 0
    whole = _whole_export(url, "synthetic", "csv", tmp_path / "whole.csv", rows_per_slice)
    assert out.read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert len(whole) == 47 and whole["params_lowrank.rank"].dtype == float  # some trials lack it
    # ... and a table of trials 42-47 alone would hold it as integers (written 3, not 3.0)
    assert pd.DataFrame({"rank": [3 + rank for rank in range(3, 8)]})["rank"].dtype == "int64"
    import csv

    written = list(csv.DictReader(out.open(newline="")))
    assert [row["params_lowrank.rank"] for row in written[-5:]] == [f"{3 + rank}.0" for rank in range(3, 8)]
    assert {"user_attrs_layers", "system_attrs_other:key", "system_attrs_constraints"} <= set(whole.columns)
    out = tmp_path / "out.parquet"
    assert main(["export", "synthetic", "--storage", url, "--format", "parquet", "-o", str(out)]) == 0
    _whole_export(url, "synthetic", "parquet", tmp_path / "whole.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(tmp_path / "whole.parquet"))


def test_export_of_a_study_with_mixed_parameter_types_writes_every_chunk_alike(synthetic_sqlite, tmp_path,
                                                                                monkeypatch):
    """A categorical parameter holding booleans, a number and a string, a key holding a mapping
    for some trials and nothing for others: chunks of two trials write what one table does."""
    from gsmsearch.cli import _studies

    monkeypatch.setattr(_studies, "_rows_per_slice", lambda columns: 2)
    out = tmp_path / "out.csv"
    assert main(["export", "synthetic", "--storage", synthetic_sqlite, "-o", str(out)]) == 0
    _whole_export(synthetic_sqlite, "synthetic", "csv", tmp_path / "whole.csv", 2)
    assert out.read_bytes() == (tmp_path / "whole.csv").read_bytes()
