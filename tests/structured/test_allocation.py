"""Global budget allocation: per-layer budgets from the weights' spectra under one FLOP budget."""
import pytest
import torch

from gsmsearch.structured import allocate_budgets


def _rank(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)


def _spent(shares, weights, tokens=None):
    tokens = tokens or {}
    used = sum(shares[k] * tokens.get(k, 1) * w.numel() for k, w in weights.items())
    return used / sum(tokens.get(k, 1) * w.numel() for k, w in weights.items())


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_equal_layers_get_the_uniform_budget(budget):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    shares = allocate_budgets({"a": w, "b": w.clone(), "c": w.clone()}, budget)
    assert shares["a"] == pytest.approx(budget, rel=1e-6)
    assert shares["a"] == shares["b"] == shares["c"]


def test_budget_goes_where_the_spectrum_needs_it_and_the_total_holds():
    weights = {
        "lowrank": _rank(64, 64, 2, 1),           # two directions hold all the energy
        "full": torch.randn(64, 64, generator=torch.Generator().manual_seed(2)),
        "tall": torch.randn(128, 32, generator=torch.Generator().manual_seed(3)),
    }
    for budget in (0.1, 0.3, 0.6):
        shares = allocate_budgets(weights, budget)
        assert _spent(shares, weights) == pytest.approx(budget, rel=1e-6)  # spent, not exceeded
        assert all(0 < s <= 1 for s in shares.values())
        assert shares["lowrank"] < shares["full"]
    # the rank-2 layer needs only 2 rank-1 steps (2 * 128 of 4096 multiply-adds) before the rest
    # of the model: its share stays near that however large the budget
    assert allocate_budgets(weights, 0.3)["lowrank"] < 2.5 * 128 / 4096


def test_layers_seen_by_more_rows_pay_more_per_step():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    weights = {"few": w, "many": w.clone()}
    tokens = {"few": 1, "many": 16}
    shares = allocate_budgets(weights, 0.3, tokens=tokens)
    assert shares["few"] > shares["many"]
    assert _spent(shares, weights, tokens) == pytest.approx(0.3, rel=1e-6)


def test_a_cheap_layer_can_be_kept_whole():
    weights = {
        "small": torch.randn(8, 8, generator=torch.Generator().manual_seed(0)),
        "big": _rank(256, 256, 8, 1) + 0.01 * torch.randn(256, 256, generator=torch.Generator().manual_seed(2)),
    }
    shares = allocate_budgets(weights, 0.2)
    assert shares["small"] == 1.0  # cheaper to make exact than the big layer's small singular values
    assert _spent(shares, weights) <= 0.2 * (1 + 1e-9)


def test_too_small_a_budget_for_one_step_per_layer_falls_back_to_uniform():
    weights = {"a": torch.randn(64, 64), "b": torch.randn(32, 16)}
    shares = allocate_budgets(weights, 0.01)
    assert shares == {"a": 0.01, "b": 0.01}


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": 0.0}, "budget must be in"),
    ({"budget": 1.5}, "budget must be in"),
    ({"budget": 0.3, "min_components": 0}, "min_components"),
    ({"budget": 0.3, "tokens": {"a": 0}}, "tokens of 'a'"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate_budgets({"a": torch.randn(8, 8)}, **kwargs)


def test_family_minimums_are_respected_and_the_total_still_holds():
    g = torch.Generator().manual_seed(0)
    weights = {"a": _rank(64, 64, 1, 1) + 1e-3 * torch.randn(64, 64, generator=g),
               "b": torch.randn(64, 64, generator=g)}
    free = allocate_budgets(weights, 0.3)
    assert free["a"] < 0.1  # nearly rank-1: one step or so
    bound = allocate_budgets(weights, 0.3, min_fractions={"a": 0.15})
    assert bound["a"] >= 0.15 - 1e-12
    assert _spent(bound, weights) == pytest.approx(0.3, rel=1e-6)
    # minimums the budget cannot pay: uniform (the family then says what it needs)
    assert allocate_budgets(weights, 0.1, min_fractions={"a": 0.15, "b": 0.15}) == {"a": 0.1, "b": 0.1}
