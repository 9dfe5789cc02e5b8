"""Every study a real storage can hold, from the dashboard's side: plain Optuna studies, empty
ones, malformed and huge user attrs, odd names (see ``seed_odd_studies`` in conftest).  Every view
of the report and of the app is built for each of them, and shows a figure or a note saying why
there is none, never an exception."""
import json
import math
import time

import pytest

from gsmsearch.cli import main
from gsmsearch.dashboard import (DataCache, _data, _figures, dashboard_spec_from_dict, render_report,
                                 sources_in_storage)
from gsmsearch.search import SpecError, TrialRecord

from .conftest import ODD_LAYERS, ODD_NAME, ODD_STUDIES, gblr_layers


def _spec(url):
    return dashboard_spec_from_dict({"title": "odd", "storage": url, "studies": []}, from_command_line=True)


@pytest.fixture(scope="module")
def odd_views(odd_db):
    _, url = odd_db
    return DataCache(sources_in_storage(url)).views(), _spec(url)


def _note(fig) -> str:
    return " ".join(a.text for a in fig.layout.annotations or []).replace("<br>", " ")


def _view(views, name):
    return next(v for v in views if v.name == name)


def test_every_view_of_every_odd_study_is_a_figure_or_a_note(odd_views):
    from plotly.utils import PlotlyJSONEncoder

    from gsmsearch.dashboard import _app

    views, spec = odd_views
    assert [v.name for v in views] == ODD_STUDIES and not any(v.error for v in views)
    for view in views:
        for make in (_figures.pareto_figure, _figures.comparison_figure, _figures.hypervolume_figure):
            json.dumps(make(view, spec), cls=PlotlyJSONEncoder)
        _figures.budget_rows(view, spec)
        for record in view.detailed(view.records):  # with their layers, as a click reads them
            detail = _app._detail(view, record, spec)
            text = json.dumps(detail, cls=PlotlyJSONEncoder)
            assert "could not be shown" not in text, (view.name, record.number)
    rows, columns = _app._trial_table_data(views, spec)
    assert len(rows) == sum(len(v.records) for v in views)
    assert len({row["id"] for row in rows}) == len(rows)  # a metric named "id" does not clobber them
    assert all(not set(c["id"]) & set('{}"') for c in columns)  # filter queries can name every column
    assert {"param x{y}", 'param q"uote', "id (metric)"} <= {c["name"] for c in columns}


@pytest.mark.parametrize("name, expected", [
    ("plain-one", "record no structure family"),
    ("plain-two", "record no structure family"),
    ("empty", "no trials yet"),
    ("no-complete", "no completed trials yet"),
    ("no-metric-names", "no completed trial has finite values of both quality and relative_flops "
                        "(the study's objectives: objective_0, objective_1)"),
])
def test_a_study_with_nothing_to_draw_says_why(odd_views, name, expected):
    views, spec = odd_views
    view = _view(views, name)
    for make in (_figures.pareto_figure, _figures.comparison_figure, _figures.hypervolume_figure):
        fig = make(view, spec)
        assert not fig.data and expected in _note(fig), (make.__name__, _note(fig))


def test_odd_studies_that_have_points_draw_them(odd_views):
    views, spec = odd_views
    points = {v.name: sum(len(t.x) for t in _figures.pareto_figure(v, spec).data) for v in views}
    assert points["one-complete"] == 1 and points["single-objective"] == 2
    assert points["three-objectives"] == 4 and points["both-maximize"] == 3
    assert points["inf-values"] == 1  # infinite values are left out
    assert points[ODD_NAME] == 3 and points["odd-layers"] == len(ODD_LAYERS)
    assert points["odd-families"] == 4  # four families that are not plain strings, and one empty
    assert {r.family for r in _view(views, "odd-families").records} == {"['gblr']", "{'a': 1}", "5", "", "Ω-family"}
    # the constraint that is not a number counts as violated: no feasible trial, said so
    odd_columns = _view(views, "odd-columns")
    assert not any(r.feasible for r in odd_columns.records)
    assert "no feasible completed trials" in _note(_figures.hypervolume_figure(odd_columns, spec))
    # seeds that are not integers, a seed with an infinite value, a trial with no seed, a
    # constraint that is not a number on one seed: three points, one dominated, one infeasible
    odd_seeds = _view(views, "odd-seeds")
    fig = _figures.pareto_figure(odd_seeds, spec)
    drawn = {(t.name, x, y) for t in fig.data if t.mode != "none" for x, y in zip(t.x, t.y)}
    assert drawn == {("gblr", 0.2, 0.8), ("gblr dominated", 0.2, 0.7), ("gblr infeasible", 0.3, 0.9)}
    # no error bars: one configuration has one usable seed, the other the same quality twice
    assert not [t for t in fig.data if t.mode == "none"]
    rows = {r["trials"]: r for r in _data.configuration_rows(odd_seeds, spec.axes.x, spec.axes.y)}
    assert set(rows) == {"0 (seed a)", "2 (seed None)", "3 (seed 0), 4 (seed 1)"}
    assert rows["3 (seed 0), 4 (seed 1)"]["feasible"] == "no" and rows["0 (seed a)"]["n"] == 1


def test_malformed_layer_records_give_notes_and_the_huge_one_is_drawn_block_averaged(odd_views):
    views, spec = odd_views
    view = _view(views, "odd-layers")
    records = view.detailed(view.records)  # with their layers, as a trial's detail reads them
    big = records[0]
    [(name, layer)] = _figures.structure_layers(big)
    start = time.perf_counter()
    fig = _figures.coverage_figure(name, layer)
    assert time.perf_counter() - start < 5
    heatmap = fig.data[0]
    assert len(heatmap.z) == 128 and len(heatmap.z[0]) == 128
    assert "2000 live component(s)" in fig.layout.title.text
    assert len(_figures.interval_rows(layer)) == 64  # the table shows the first 64
    for record in records[1:]:
        assert _figures.structure_notes(record) or _figures.structure_layers(record), record.number
        _figures.layer_flops_figure(record)
        for name, layer in _figures.structure_layers(record):
            _figures.coverage_figure(name, layer)
            _figures.interval_rows(layer)
    notes = [note for r in records for note in _figures.structure_notes(r)]
    assert any("not a mapping of layer names" in n for n in notes)
    assert any("interval 0 is not [row_start, row_len, col_start, col_len]" in n for n in notes)
    assert any("out_features and in_features must be whole numbers" in n for n in notes)
    # the clipped one ([0, -5, -3, 10**12] on 8x8) is drawn: no rows, every column
    [(name, layer)] = _figures.structure_layers(records[-1])
    assert _figures.interval_rows(layer)[0]["entries"] == 0
    # an escaped title: live_components from the study is shown only when it is a number
    assert "<b>" not in json.dumps([_figures.coverage_figure(n, l).layout.title.text
                                    for r in records for n, l in _figures.structure_layers(r)])


def test_coverage_of_a_layer_of_any_size_costs_only_its_blocks():
    start = time.perf_counter()
    counts, rows, cols = _data.coverage_counts([[5, 10 ** 9, 7, 3]], 2 ** 31, 2 ** 31, max_cells=64)
    assert time.perf_counter() - start < 1
    assert counts.shape == (64, 64)
    sizes = (rows[1:] - rows[:-1])[:, None] * (cols[1:] - cols[:-1])[None, :]
    assert math.isclose((counts * sizes).sum(), 10 ** 9 * 3, rel_tol=1e-9)


def test_layer_budget_ignores_records_that_are_not_mappings():
    assert _data.layer_budget("not a mapping") == [] and _data.layer_budget([1, 2]) == []
    assert len(_data.layer_budget(gblr_layers(0.5))) == 2


def test_the_report_of_every_odd_study(odd_views):
    views, spec = odd_views
    text = render_report(views, spec)
    assert "could not be drawn" not in text and "could not be shown" not in text
    assert "record no structure family" in text and "Not drawn from this trial" in text
    assert ODD_NAME in text


def test_a_figure_that_fails_becomes_a_note():
    from gsmsearch.dashboard import StudyView

    def broken(view, spec):
        raise RuntimeError("boom\nsecond line")

    fig = _figures.safe_figure(broken, StudyView(key="0", name="s", label="s", storage="x"), None)
    assert "could not be drawn (RuntimeError: boom)" in _note(fig)


def test_an_unchanged_study_keeps_its_view_object(odd_db):
    """So the app reuses what it computed from it (a storage of many studies refreshed every
    second stays responsive)."""
    _, url = odd_db
    cache = DataCache(sources_in_storage(url, ["one-complete", "plain-one"]), max_age=0)
    first = cache.views()
    second = cache.views(refresh=True)
    assert [a is b for a, b in zip(first, second)] == [True, True]


def test_a_whole_storage_may_hold_more_studies_than_a_spec_may_name(odd_db, tmp_path, capsys):
    _, url = odd_db
    assert len(ODD_STUDIES) > 12
    many = {"storage": url, "studies": [{"study": s} for s in ODD_STUDIES]}
    assert len(dashboard_spec_from_dict(many, from_command_line=True).studies) == len(ODD_STUDIES)
    with pytest.raises(SpecError, match="at most 12"):
        dashboard_spec_from_dict(many, "dash.yaml")
    output = tmp_path / "all.html"
    assert main(["report", "--storage", url, "-o", str(output)]) == 0
    assert f"{len(ODD_STUDIES)} studies" in capsys.readouterr().out
    assert main(["report", "--storage", url, "--study", "odd-layers", "--study", ODD_NAME,
                 "-o", str(tmp_path / "two.html")]) == 0


def test_trial_rows_give_a_metric_named_like_a_fixed_column_its_own_column():
    from gsmsearch.dashboard import StudyView

    record = TrialRecord(number=3, state="COMPLETE", family="gblr", values=[0.9, 0.2], params={},
                         user_attrs={}, constraints={})
    view = StudyView(key="0", name="s", label="s", storage="x", metric_names=["state", "id"],
                     directions=["maximize", "minimize"], records=[record])
    [row] = _data.trial_rows(view, "relative_flops", "quality")
    assert row["id"] == "0:3" and row["state"] == "COMPLETE"
    assert row["state (metric)"] == 0.9 and row["id (metric)"] == 0.2
