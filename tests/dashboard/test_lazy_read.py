"""The dashboard and the report read each trial's ``result`` and ``config`` as their stored JSON
text, parsed only for what a view shows (:class:`gsmsearch.search._records.LazyAttrs`): every
figure, table, detail and report built from a study read that way equals the one built from the
same study with every attribute parsed up front."""
import dataclasses
import json

import pytest

from gsmsearch.dashboard import _app, _data, _figures, dashboard_spec_from_dict, render_report
from gsmsearch.dashboard._source import DataCache, sources_in_storage
from gsmsearch.search._records import _UNPARSED, LAZY_KEYS, LazyAttrs, _Stored
from plotly.utils import PlotlyJSONEncoder


def _spec(url, **extra):
    return dashboard_spec_from_dict({"title": "lazy", "storage": url, "studies": [], **extra}, from_command_line=True)


def _parsed(view):
    """``view`` with every record's user attributes parsed into a plain dict (what reading every
    attribute up front gives)."""
    records = [dataclasses.replace(r, user_attrs={k: json.loads(json.dumps(v)) for k, v in r.user_attrs.items()})
               for r in view.records]
    return dataclasses.replace(view, records=records)


def _everything(views, spec):
    """What the dashboard's page and the report show, as one JSON text."""
    out = []
    for view in views:
        for make in (_figures.pareto_figure, _figures.comparison_figure, _figures.hypervolume_figure):
            out.append(_figures.safe_figure(make, view, spec))
        out.append(_figures.budget_rows(view, spec) if not view.error else None)
        for state in ("COMPLETE", "FAIL", "PRUNED"):  # a trial's detail panel of each state
            record = next((r for r in view.records if r.state == state), None)
            if record is not None:
                out.append(_app._detail(view, view.detailed([record])[0], spec))
    notes = []
    out.append(_app._trial_table_data(views, spec, notes))
    out.append(notes)
    out.append(_app._configuration_table_data(views, spec))
    out.append(_app._budget_tables(views, spec))
    return json.dumps(out, cls=PlotlyJSONEncoder, sort_keys=True)


@pytest.mark.parametrize("study_db, max_points", [("seeded_db", None), ("seeded_db", 3), ("multi_seed_db", None),
                                                   ("odd_db", None)])
def test_a_lazily_read_study_shows_what_a_fully_read_one_shows(study_db, max_points, request):
    url = request.getfixturevalue(study_db)[1]
    spec = _spec(url, **({"max_points": max_points} if max_points is not None else {}))
    views = DataCache(sources_in_storage(url)).views()
    lazy = [r for v in views for r in v.records if isinstance(r.user_attrs, LazyAttrs)]
    assert lazy and all(type(dict.__getitem__(r.user_attrs, k)) is _Stored
                        for r in lazy for k in LAZY_KEYS if k in r.user_attrs)  # nothing parsed yet
    full = [_parsed(v) for v in views]
    assert not any(isinstance(r.user_attrs, LazyAttrs) for v in full for r in v.records)
    assert _everything(views, spec) == _everything(full, spec)
    assert (render_report(views, spec, generated="then", max_details=4)
            == render_report(full, spec, generated="then", max_details=4))


def test_the_figures_parse_only_the_trials_they_show(seeded_db):
    """The fronts, hypervolumes and budget table need a trial's values, family and constraints:
    with the axes the study's objectives and every trial drawn, a ``result`` is parsed only for
    the trials whose hover text shows its other quality (the COMPLETE ones drawn)."""
    url = seeded_db[1]
    spec = _spec(url)
    (view,) = [v for v in DataCache(sources_in_storage(url)).views() if v.name == seeded_db[2]]
    assert view.metric_names[:2] == ["quality", "relative_flops"]

    def parsed():
        return {r.number for r in view.records if isinstance(r.user_attrs, LazyAttrs)
                and "result" in r.user_attrs and dict.__getitem__(r.user_attrs, "result").value
                is not _UNPARSED}

    _data.family_hypervolumes(view.records, "relative_flops", "quality", view.metric_names, (1.0, 0.0))
    _data.budget_table(view.records, "relative_flops", "quality", view.metric_names, [0.5])
    assert parsed() == set()
    _figures.pareto_figure(view, spec)
    drawn = {p.number for ps in _data.family_points(view.records, "relative_flops", "quality",
                                                    view.metric_names).values() for p in ps}
    assert parsed() == drawn


def test_lazy_attrs_read_as_the_parsed_dict():
    import copy
    import pickle

    def make():
        attrs = LazyAttrs(family="gblr")
        dict.__setitem__(attrs, "result", _Stored('{"quality": 0.5, "nested": [1, {"a": null}]}'))
        dict.__setitem__(attrs, "config", _Stored('{"seed": 3}'))
        return attrs

    plain = {"family": "gblr", "result": {"quality": 0.5, "nested": [1, {"a": None}]}, "config": {"seed": 3}}
    for read in (dict, lambda a: {**a}, lambda a: dict(a.items()), lambda a: dict(zip(a.keys(), a.values())),
                 lambda a: json.loads(json.dumps(a)), lambda a: pickle.loads(pickle.dumps(a)), copy.deepcopy,
                 lambda a: dict(a.copy()), lambda a: {k: a[k] for k in a}, lambda a: {k: a.get(k) for k in a},
                 lambda a: a | {}, lambda a: {} | a):
        got = read(make())
        assert got == plain and not any(isinstance(v, _Stored) for v in got.values())
    attrs = make()
    assert attrs == plain and plain == attrs and attrs == make()
    assert attrs != dict(plain, config={"seed": 4}) and make() != LazyAttrs(plain, family="x")
    other = make()
    dict.__setitem__(other, "config", _Stored('{"seed":  3}'))  # other text, same value
    assert other == make()
    dict.__setitem__(other, "config", _Stored('{"seed": 4}'))
    assert other != make()
    assert repr(make()) == repr(plain)
    assert make().pop("config") == {"seed": 3} and make().setdefault("result") == plain["result"]
    assert make().popitem() == ("config", {"seed": 3})
    updated = {"x": 1}
    updated.update(make())
    assert updated == {"x": 1, **plain}


def _random_study(seed):
    """Records of a small random study: families, knobs, seeds (as a parameter or in the
    recorded config), devices, states and retried failures."""
    import random

    from gsmsearch.search import TrialRecord

    rng = random.Random(seed)
    records = []
    for number in range(rng.randint(0, 14)):
        family = rng.choice(["gblr", "lowrank"] if seed % 2 else ["gblr", "lowrank", None])
        params = {"family": family, f"{family}.budget": rng.choice([0.1, 0.2, 0.2 + rng.random()])}
        if rng.random() < 0.4:
            params["seed"] = rng.choice([0, 1])
        attrs = {"config": {"budget": params[f"{family}.budget"], "seed": rng.choice([0, 1, 1, None]),
                            "device": rng.choice(["cpu", "cuda"]), "lr": rng.choice([0.1, 0.01])}}
        if rng.random() < 0.2:
            attrs = {}
        state = rng.choice(["COMPLETE", "COMPLETE", "FAIL", "PRUNED", "RUNNING"])
        if state == "FAIL":
            attrs["final"] = rng.choice([True, False])
        records.append(TrialRecord(number=number, state=state, family=family, values=None, params=params,
                                   user_attrs=attrs))
    return records


def test_the_repeats_check_is_group_configurations():
    """``_data._repeats`` (which reads no recorded config when no two trials share their family
    and knobs) says what ``has_repeats(group_configurations(...))`` says, on random studies of
    which some hold repeats."""
    from gsmsearch.search._pareto import group_configurations, has_repeats

    answers = []
    for seed in range(60):
        records = _random_study(seed)
        answers.append(has_repeats(group_configurations(records)))
        assert _data._repeats(records) == answers[-1], seed
    assert 5 <= sum(answers) <= 55  # both answers are checked
