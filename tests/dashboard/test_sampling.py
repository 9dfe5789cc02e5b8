"""A big study's report and dashboard draw every front member and a uniform sample of the other
trials (at most ``max_points``, seed 0), and say so on the page."""
import json
import random
import re

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from gsmsearch.cli import main
from gsmsearch.dashboard import DataCache, _figures, dashboard_spec_from_dict, sources_in_storage

CAP = 20


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 60-trial study of two families (5 failed), its fronts known by brute force."""
    path = tmp_path_factory.mktemp("sampling") / "big.db"
    url = f"sqlite:///{path}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="big", storage=url, directions=["maximize", "minimize"])
    study.set_metric_names(["quality", "relative_flops"])
    rng = random.Random(3)
    trials = []
    for i in range(60):
        family = ("gblr", "lowrank")[i % 2]
        quality, flops = rng.uniform(0.3, 0.95), rng.uniform(0.05, 0.9)
        failed = i % 12 == 5
        study.add_trial(create_trial(
            state=TrialState.FAIL if failed else TrialState.COMPLETE, values=None if failed else [quality, flops],
            params={"family": family, f"{family}.budget": flops},
            distributions={"family": CategoricalDistribution(["gblr", "lowrank"]),
                           f"{family}.budget": FloatDistribution(0.01, 1.0)},
            user_attrs={"result": {"quality": quality, "relative_flops": flops}},
            system_attrs={"constraints:relative_flops": flops - 0.8}))
        if not failed:
            trials.append((i, family, quality, flops))
    front = set()
    for number, family, quality, flops in trials:
        if flops - 0.8 > 0:
            continue
        rivals = [(q, f) for n, fam, q, f in trials if fam == family and f - 0.8 <= 0 and n != number]
        if not any(q >= quality and f <= flops and (q > quality or f < flops) for q, f in rivals):
            front.add(number)
    return url, front, len(trials)


def _figure(html, index):
    found = re.search(rf'<script type="application/json" id="fig-{index}">(.*?)</script>', html, re.S)
    return json.loads(found.group(1))


def test_the_report_keeps_every_front_member_and_says_how_it_sampled(big, tmp_path, capsys):
    url, front, complete = big
    assert 4 <= len(front) < complete - CAP  # enough off the front for the cap to bite
    out = tmp_path / "big.html"
    assert main(["report", "big", "--storage", url, "--max-points", str(CAP), "-o", str(out)]) == 0
    html = out.read_text()
    off_front = complete - len(front)
    note = (f"showing {CAP} of {off_front} dominated and infeasible trials, sampled uniformly with seed 0; "
            f"every front member shown")
    assert note in html
    pareto = _figure(html, 0)
    drawn = [(trace.get("name", ""), n) for trace in pareto["data"] for _, n in trace.get("customdata") or []]
    numbers = [n for _, n in drawn]
    assert len(numbers) == len(set(numbers)) == len(front) + CAP
    assert front <= set(numbers)  # every front member of both families' fronts
    assert {n for name, n in drawn if name in ("gblr", "lowrank")} == front  # drawn as the fronts
    assert any(a["text"].startswith("showing") for a in pareto["layout"]["annotations"])
    # the trials table: every front trial and CAP of the other trials (the failed ones among them)
    rows = re.findall(r'<tr class="[^"]*" data-trial="0:(\d+)"', html)
    assert len(rows) == len(front) + CAP and front <= {int(n) for n in rows}
    assert f"showing {CAP} of {60 - len(front)} trials off the fronts, sampled uniformly with seed 0" in html
    # the same sample each time (seed 0)
    again = tmp_path / "again.html"
    assert main(["report", "big", "--storage", url, "--max-points", str(CAP), "-o", str(again)]) == 0
    assert re.findall(r'data-trial="0:(\d+)"', again.read_text()) == re.findall(r'data-trial="0:(\d+)"', html)
    # below the cap, nothing is sampled and nothing said
    whole = tmp_path / "whole.html"
    assert main(["report", "big", "--storage", url, "-o", str(whole)]) == 0
    assert "sampled uniformly" not in whole.read_text()
    assert main(["report", "big", "--storage", url, "--max-points", "-1", "-o", str(whole)]) == 2
    assert "--max-points must be between 0 and 1000000" in capsys.readouterr().err


def test_the_dashboard_figures_and_table_sample_the_same_way(big):
    from gsmsearch.dashboard import _app

    url, front, complete = big
    spec = dashboard_spec_from_dict({"storage": url, "studies": [{"study": "big"}], "max_points": CAP})
    views = DataCache(sources_in_storage(url)).views()
    for make in (_figures.pareto_figure, _figures.comparison_figure):
        fig = make(views[0], spec)
        numbers = {int(n) for trace in fig.data for _, n in (trace.customdata or [])}
        assert front <= numbers
        assert any("sampled uniformly with seed 0" in a.text for a in fig.layout.annotations)
    notes = []
    rows, _ = _app._trial_table_data(views, spec, notes)
    assert len(rows) == len(front) + CAP and front <= {r["number"] for r in rows}
    assert notes and "every front member shown" in notes[0]
