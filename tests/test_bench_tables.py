"""bench/accuracy_tables.py: the accuracy tables of bench/RESULTS.md choose each row's leader on
validation data, show test beside it, and compute means, sample stds and margins correctly."""
import json

import pytest

from bench.accuracy_tables import main, render


def _trial(family, budget, seed, val, test):
    # the grid file layout of bench/workloads.py: `quality` is the test metric when no
    # `test_quality` is stored
    return {"config": {"family": family, "budget": budget, "seed": seed}, "val_quality": val,
            "quality": test, "test_metrics": {"quality": test, "accuracy": test}}


def _grid(tmp_path, trials, name="grid.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"meta": {}, "dense_pretrained": [], "trials": trials}))
    return str(path)


@pytest.fixture
def grid(tmp_path):
    # budget 0.1: gblr leads on validation (0.80, 0.82, 0.84 -> 82.00 ± 2.00) while lowrank
    # leads on test (0.78 vs 0.74); blast is third on both.
    # budget 0.2: lowrank leads on validation by 5.00 with stds 1.00 and 1.00: beyond noise.
    trials = [
        *[_trial("gblr", 0.1, s, v, t) for s, v, t in [(0, 0.80, 0.73), (1, 0.82, 0.74), (2, 0.84, 0.75)]],
        *[_trial("lowrank", 0.1, s, v, t) for s, v, t in [(0, 0.80, 0.77), (1, 0.81, 0.78), (2, 0.82, 0.79)]],
        *[_trial("blast", 0.1, s, v, t) for s, v, t in [(0, 0.70, 0.70), (1, 0.70, 0.70), (2, 0.70, 0.70)]],
        *[_trial("gblr", 0.2, s, v, 0.9) for s, v in [(0, 0.84), (1, 0.85), (2, 0.86)]],
        *[_trial("lowrank", 0.2, s, v, 0.8) for s, v in [(0, 0.89), (1, 0.90), (2, 0.91)]],
        *[_trial("dense", 1.0, s, v, 0.95) for s, v in [(0, 0.90), (1, 0.92), (2, 0.94)]],
    ]
    return _grid(tmp_path, trials)


def test_leader_is_the_validation_leader_even_when_test_disagrees(grid):
    text, leads = render([grid])
    first, second = leads
    assert first.row == "0.1" and first.leaders == ["gblr"] and first.runner_up == "lowrank"
    assert first.test_leaders == ["lowrank"]
    # margins from the unrounded per-seed means; 1e-9 covers float summation only
    assert first.val_margin == pytest.approx(82.0 - 81.0, abs=1e-9)
    assert first.test_difference == pytest.approx(74.0 - 78.0, abs=1e-9)
    assert first.noise == pytest.approx(2.0, abs=1e-9)  # gblr's sample std (n - 1), larger than lowrank's 1.00
    assert first.within_noise
    assert second.leaders == ["lowrank"] and second.val_margin == pytest.approx(5.0, abs=1e-9)
    assert not second.within_noise
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| 0.")}
    assert rows["| 0.1"] == ("| 0.1 | **82.00 ± 2.00** (74.00 ± 1.00) | 81.00 ± 1.00 (78.00 ± 1.00) | "
                             "70.00 ± 0.00 (70.00 ± 0.00) |")
    assert rows["| 0.2"].startswith("| 0.2 | 85.00 ± 1.00 (90.00 ± 0.00) | **90.00 ± 1.00** (80.00 ± 0.00) |")
    assert "dense: validation 92.00 ± 2.00% (test 95.00 ± 0.00%)" in text
    assert ("- 0.1: gblr leads on validation by +1.00 over lowrank (test -4.00); within noise "
            "(larger validation std 2.00); test leader: lowrank") in text
    assert "- 0.2: lowrank leads on validation by +5.00 over gblr (test -10.00); ahead" in text


def test_a_later_file_gives_its_cells_and_dense_can_be_a_column(grid, tmp_path, capsys):
    other = _grid(tmp_path, [_trial("gblr", 0.1, s, 0.90, 0.60) for s in range(3)], "gblr.json")
    _, leads = render([grid, other])
    assert leads[0].leaders == ["gblr"] and leads[0].val_margin == pytest.approx(9.0, abs=1e-9)
    assert main(["--rows", "file", "--dense-column", "--label", "lr", grid]) == 0
    out = capsys.readouterr().out
    assert "| grid | dense | gblr | lowrank | blast |" in out
    assert "- lr: dense leads on validation" in out  # 92.00 on validation beats every family


def test_a_tie_on_validation_names_both_and_compares_with_the_next(tmp_path):
    trials = [_trial(f, 0.3, s, 0.8, t) for f, t in (("blockdiag", 0.9), ("blocksparse", 0.7)) for s in range(2)]
    trials += [_trial("gblr", 0.3, s, 0.75, 0.95) for s in range(2)]
    _, (item,) = render([_grid(tmp_path, trials)])
    assert item.leaders == ["blockdiag", "blocksparse"] and item.runner_up == "gblr"
    assert item.val_margin == pytest.approx(5.0, abs=1e-9) and item.test_leaders == ["gblr"]
