"""A study whose configurations ran with several seeds (``SEEDED_TRIALS`` in conftest): one point
per configuration at its means, error bars of the sample std where values vary across seeds,
hover text and a per-configuration table with n and the failed seed, fronts, hypervolume and the
budget table from the means; a study with one seed per configuration is drawn as before."""
import statistics

import pytest

from gsmsearch.dashboard import DataCache, _data, _figures, dashboard_spec_from_dict, render_report, sources_in_storage

from .conftest import MAIN_TRACES, SEEDED_POINTS, SEEDED_TRIALS


def _spec(url):
    return dashboard_spec_from_dict({"title": "seeds", "storage": url, "studies": []}, from_command_line=True)


@pytest.fixture(scope="module")
def seeded(multi_seed_db):
    _, url = multi_seed_db
    [view] = DataCache(sources_in_storage(url)).views()
    return view, _spec(url)


def _qualities(family, budget):
    return [q for f, b, _, _, q in SEEDED_TRIALS if (f, b) == (family, budget)]


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


def test_each_configuration_is_one_point_at_its_means_with_std_error_bars(seeded):
    view, spec = seeded
    fig = _figures.pareto_figure(view, spec)
    markers = [t for t in fig.data if t.mode != "none"]
    assert sum(len(t.x) for t in markers) == SEEDED_POINTS
    gblr = _trace(fig, "gblr")  # every GBLR configuration is on its front: budgets 0.1, 0.2, 0.3
    assert list(gblr.x) == pytest.approx([0.10, 0.20, 0.30], abs=1e-12)
    assert list(gblr.y) == pytest.approx([0.80, 0.85, 0.89], abs=1e-12)
    assert all(t.error_x.array is None and t.error_y.array is None for t in markers)
    # the bars: y for the configurations with two or more seeds (not budget 0.1: one seed, no
    # bar rather than a zero one), the sample std of their seeds
    bars = _trace(fig, "gblr ± std (y)")
    assert (bars.mode, bars.hoverinfo, bars.showlegend, bars.legendgroup) == ("none", "skip", False, "gblr")
    assert list(bars.x) == pytest.approx([0.2, 0.3]) and list(bars.y) == pytest.approx([0.85, 0.89])
    assert bars.error_y.array == pytest.approx((statistics.stdev(_qualities("gblr", 0.2)),
                                                statistics.stdev(_qualities("gblr", 0.3))), rel=1e-9)
    # x: only where it varies across the seeds (GBLR at budget 0.2: 0.20, 0.21, 0.19)
    bars = _trace(fig, "gblr ± std (x)")
    assert list(bars.x) == pytest.approx([0.2]) and bars.error_x.array == pytest.approx((0.01,), rel=1e-9)
    # lowrank's FLOPs do not depend on the seed: no x bars at all
    assert not [t for t in fig.data if t.name == "lowrank ± std (x)"]
    assert len(_trace(fig, "lowrank ± std (y)").error_y.array) == 2
    assert "mean ± std over seeds" in fig.layout.yaxis.title.text
    assert fig.layout.xaxis.title.text.startswith(_figures.METRIC_LABELS["relative_flops"])
    assert "over seeds" in fig.layout.title.text


def test_hover_text_gives_n_each_seed_and_the_failed_one(seeded):
    view, spec = seeded
    gblr = _trace(_figures.pareto_figure(view, spec), "gblr")
    one, three, failed = gblr.text
    assert "n=1 seed" in one and "±" not in one.split("<br>")[1]
    assert "n=3 seeds" in three and "seed 2 (trial 2): quality (test) 0.85" in three
    assert f"0.85 ± {statistics.stdev(_qualities('gblr', 0.2)):.2g}" in three
    assert "n=2 of 3 seeds" in failed and "failed: seed 2 (trial 15)" in failed
    assert "relative_flops: 0.3 (every seed)" in failed
    assert [c[1] for c in gblr.customdata] == [5, 0, 3]  # a click opens the configuration's first trial


def test_the_configuration_table_gives_mean_spread_n_and_the_failed_seed(seeded):
    view, spec = seeded
    rows = _data.configuration_rows(view, spec.axes.x, spec.axes.y, spec.families)
    assert len(rows) == SEEDED_POINTS
    by_knobs = {(r["family"], r["configuration"]): r for r in rows}
    failed = by_knobs[("gblr", "budget=0.3")]
    assert failed["n"] == 2 and failed["failed seeds"] == "seed 2 (trial 15)"
    assert failed["quality (test) (mean ± std)"] == f"0.89 ± {statistics.stdev([0.88, 0.90]):.2g}"
    assert failed["relative_flops (mean ± std)"] == "0.3 ± 0"
    one = by_knobs[("gblr", "budget=0.1")]
    assert one["n"] == 1 and one["quality (test) (mean ± std)"] == "0.8" and one["failed seeds"] == ""
    assert by_knobs[("lowrank", "budget=0.2")]["trials"] == "6 (seed 0), 7 (seed 1), 8 (seed 2)"
    assert by_knobs[("dense", "(no knobs)")]["feasible"] == "no"  # its mean FLOPs break the constraint
    # every trial of a front configuration is marked on the front in the trial table
    trials = {r["number"]: r for r in _data.trial_rows(view, spec.axes.x, spec.axes.y)}
    assert [trials[n]["front"] for n in (0, 1, 2, 3, 4, 5)] == ["yes"] * 6


def test_fronts_hypervolume_and_budgets_come_from_the_means(seeded):
    view, spec = seeded
    # lowrank at 0.2: a lucky seed (0.83) would put it above GBLR's 0.2 trials (0.84 aside);
    # its mean (0.75) is below GBLR's mean at the same cost
    rows = {r["family"]: r for r in _figures.budget_rows(view, spec)}
    assert rows["gblr"]["<= 0.25"][:3] == pytest.approx((0.85, 0.20, 0), abs=1e-12)
    assert rows["gblr"]["<= 0.25"][4] == 3
    assert rows["lowrank"]["<= 0.25"][0] == pytest.approx(statistics.fmean(_qualities("lowrank", 0.2)))
    text = _figures.budget_cell_text(rows["gblr"]["<= 0.25"])
    assert text == f"0.8500 ± {statistics.stdev(_qualities('gblr', 0.2)):.2g} (n=3, configuration of trial 0, x=0.2)"
    assert _figures.budget_cell_text(rows["gblr"]["<= 0.1"]) == "0.8000 (n=1, configuration of trial 5, x=0.1)"
    # hypervolume over trials: at trial 1, GBLR's only configuration has the mean of seeds 0 and 1
    reference = (spec.reference.x, spec.reference.y)
    history = _data.hypervolume_history(view.records, spec.axes.x, spec.axes.y, view.metric_names, reference)
    assert [n for n, _ in history["gblr"]] == [0, 1, 2, 3, 4, 5]
    assert history["dense"] == []  # no feasible configuration: no line, as for trials
    assert [n for n, _ in history["all"]] == list(range(15))
    # lowrank at 0.2: its unlucky second seed lowers the mean and the hypervolume with it
    assert history["lowrank"][1][1] < history["lowrank"][0][1]
    assert history["gblr"][1][1] == pytest.approx((1.0 - 0.205) * 0.85, rel=1e-12)
    # at the end: the hypervolume of the three GBLR means (0.1, 0.8), (0.2, 0.85), (0.3, 0.89), as the bar shows
    expected = (0.2 - 0.1) * 0.8 + (0.3 - 0.2) * 0.85 + (1.0 - 0.3) * 0.89
    assert history["gblr"][-1][1] == pytest.approx(expected, rel=1e-12)
    drawn, _ = _data.drawn_records(view.records, spec.axes.x, spec.axes.y, view.metric_names)
    assert _data.family_hypervolumes(drawn, spec.axes.x, spec.axes.y, view.metric_names, reference)["gblr"] == \
        pytest.approx(expected, rel=1e-12)


def test_the_report_has_the_configuration_table(seeded):
    view, spec = seeded
    text = render_report([view], spec)
    assert 'id="configurations"' in text and "id=configurations-table" in text
    assert "seed 2 (trial 15)" in text and "sample standard deviation" in text


def test_a_study_with_one_seed_per_configuration_is_drawn_as_before(seeded_db):
    _, url, name, _ = seeded_db
    view = next(v for v in DataCache(sources_in_storage(url)).views() if v.name == name)
    spec = _spec(url)
    records, spreads = _data.drawn_records(view.records, spec.axes.x, spec.axes.y, view.metric_names)
    assert spreads == {} and records == view.records
    fig = _figures.pareto_figure(view, spec)
    assert len(fig.data) == MAIN_TRACES
    assert all(t.error_x.array is None and t.error_y.array is None and t.mode != "none" for t in fig.data)
    assert "over seeds" not in fig.layout.yaxis.title.text + fig.layout.title.text
    assert _data.configuration_rows(view, spec.axes.x, spec.axes.y) == []
    assert "configurations-table" not in render_report([view], spec)
    from gsmsearch.dashboard import _app

    assert _app._configuration_table_data([view], spec)[2] == {"display": "none"}


def test_a_big_report_details_the_front_configurations_first_trials_then_their_other_seeds(seeded):
    from gsmsearch.dashboard import _report

    view, spec = seeded
    # every configuration but dense (no layers) is on its family's front of means
    assert [r.number for r in _report._detail_trials(view, spec, 7)] == [0, 3, 5, 6, 9, 1, 2]
