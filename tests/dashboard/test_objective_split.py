"""The dashboard and the report say which split each study's quality was measured on: a study the
driver records (``objective_split: val``) and one an older gsmsearch recorded (quality on the
test split) are each drawn on their own axes, titled with their split, with the other split's
quality beside every trial."""
from __future__ import annotations

import optuna
import pytest

from gsmsearch.dashboard import DataCache, _data, _figures, dashboard_spec_from_dict, render_report, sources_in_storage

from .conftest import _complete

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names

#: (family, relative_flops, validation quality, test quality) of both studies' trials
TRIALS = [("gblr", 0.1, 0.80, 0.78), ("gblr", 0.3, 0.90, 0.86), ("lowrank", 0.2, 0.75, 0.77)]


def _seed(url, name, split):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "relative_flops"])
    if split is not None:
        study.set_user_attr("objective_split", split)
    for index, (family, x, val, test) in enumerate(TRIALS):
        trial = _complete(family, x, val if split == "val" else test, index)
        result = dict(trial.user_attrs["result"], val_quality=val)
        if split == "val":
            result["test_quality"] = test
        trial.user_attrs["result"] = result
        study.add_trial(trial)


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('split') / 'split.db'}"
    _seed(url, "current", "val")
    _seed(url, "older", None)
    spec = dashboard_spec_from_dict({"title": "splits", "storage": url, "studies": []}, from_command_line=True)
    current, older = DataCache(sources_in_storage(url)).views()
    return current, older, spec


def test_each_study_knows_its_split(views):
    current, older, _ = views
    assert (current.name, current.objective_split) == ("current", "val")
    assert (older.name, older.objective_split) == ("older", "test")


def test_axis_titles_and_hover_name_the_split_and_show_the_other_one(views):
    current, older, spec = views
    for view, title, objective, other in ((current, "quality (val)", 2, 3), (older, "quality (test)", 3, 2)):
        fig = _figures.pareto_figure(view, spec)
        assert fig.layout.yaxis.title.text == title
        gblr = next(t for t in fig.data if t.name == "gblr")
        # gblr's front: budgets 0.1 and 0.3; the hover gives both splits' quality
        assert list(gblr.y) == [TRIALS[0][objective], TRIALS[1][objective]]
        other_title = "quality (test)" if title == "quality (val)" else "quality (val)"
        lines = gblr.text[1].split("<br>")
        assert lines[1:4] == [f"{title}: {TRIALS[1][objective]:.4g}", f"{other_title}: {TRIALS[1][other]:.4g}",
                              "relative_flops: 0.3"]
        assert _figures.comparison_figure(view, spec).layout.yaxis.title.text == title


def test_the_trial_table_has_a_column_per_split_for_every_study(views):
    current, older, spec = views
    for view, objective, other in ((current, 2, 3), (older, 3, 2)):
        rows = _data.trial_rows(view, spec.axes.x, spec.axes.y)
        val_index, test_index = (objective, other) if view is current else (other, objective)
        assert [(r["quality (val)"], r["quality (test)"]) for r in rows] == [
            (trial[val_index], trial[test_index]) for trial in TRIALS]
        assert "quality" not in rows[0]  # no column of unnamed split


def test_the_report_says_each_studys_split(views):
    current, older, spec = views
    page = render_report([current, older], spec, generated="now")
    assert "quality on the validation split (fronts chosen on it; test quality recorded beside it)" in page
    assert ("quality on the test split: recorded by an older gsmsearch, its fronts were chosen on test data "
            "(validation quality beside it where recorded)") in page
    assert "<h3>current: best quality (val)</h3>" in page and "<h3>older: best quality (test)</h3>" in page
    assert '<td>quality (test)</td><td>0.86</td>' in page  # a trial's detail: the test quality beside
