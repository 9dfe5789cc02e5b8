"""Tests shared by the hand-crafted structured families, parametrised over the registry names."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

# importing the private modules registers the families
from gsmsearch.structured import _blast, _blockdiag, _blocklowrank, _blocksparse_linear, _dense  # noqa: F401
from gsmsearch.structured import _lowrank, _monarch  # noqa: F401
from gsmsearch.structured._base import family_names, get_family

FAMILIES = ["dense", "lowrank", "blockdiag", "monarch", "blocksparse", "blocklowrank", "blast"]
STRUCTURED = [f for f in FAMILIES if f != "dense"]

# (family, knobs, even): even = no padding anywhere for in=64, out=96
CONFIGS = [
    ("dense", {}, True),
    ("lowrank", {"rank": 5}, True),
    ("blockdiag", {"num_blocks": 4}, True),
    ("blockdiag", {"num_blocks": 5}, False),
    ("monarch", {"num_blocks": 4}, True),
    ("monarch", {"num_blocks": 5}, False),
    ("blocksparse", {"block_size": 8, "butterfly_size": 2, "lowrank_rank": 3}, True),
    ("blocksparse", {"block_size": 7, "butterfly_size": 2, "lowrank_rank": 2}, False),
    ("blocklowrank", {"num_blocks": 4, "rank": 2}, True),
    ("blocklowrank", {"num_blocks": 5, "rank": 3}, False),
    ("blast", {"num_blocks": 4, "rank": 6}, True),
    ("blast", {"num_blocks": 5, "rank": 3}, False),
]
IDS = [f"{f}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for f, kw, _ in CONFIGS]
# families whose padded execution is what flops() counts (the rest count live entries only)
COUNTS_PADDING = {"monarch", "blocksparse"}


def make(family, knobs, in_features=64, out_features=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return get_family(family)(in_features, out_features, bias=bias, **knobs)


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


def test_all_families_registered():
    assert set(FAMILIES) <= set(family_names())
    for name in FAMILIES:
        assert get_family(name).family == name


@pytest.mark.parametrize("family,knobs,even", CONFIGS, ids=IDS)
@pytest.mark.parametrize("in_features,out_features", [(64, 96), (96, 64)])
def test_forward_matches_to_dense(family, knobs, even, in_features, out_features):
    layer = make(family, knobs, in_features, out_features)
    x = torch.randn(2, 3, in_features)
    y = layer(x)
    assert y.shape == (2, 3, out_features)
    weight = layer.to_dense()
    assert weight.shape == (out_features, in_features)
    torch.testing.assert_close(y, x @ weight.T + layer.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,knobs,even", CONFIGS, ids=IDS)
def test_init_has_linear_scale(family, knobs, even):
    layer = make(family, knobs, bias=False)
    x = torch.randn(512, 64)
    with torch.no_grad():
        ratio = float(layer(x).std() / (x.square().mean() / 3).sqrt())  # nn.Linear: about 1
    assert 0.6 < ratio < 1.5, ratio


# Uneven configs of families whose padded storage runs more than their live-entry count are
# checked against closed-form counts in test_flops_and_params_uneven instead.
COUNTER_CONFIGS = [c for c in CONFIGS if c[2] or c[0] in COUNTS_PADDING]


@pytest.mark.parametrize("family,knobs,even", COUNTER_CONFIGS,
                         ids=[i for c, i in zip(CONFIGS, IDS) if c in COUNTER_CONFIGS])
def test_flops_match_flop_counter(family, knobs, even):
    layer = make(family, knobs, bias=False)
    tokens = 6
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(torch.randn(2, 3, 64))
    assert isinstance(layer.flops(), int)
    assert counter.get_total_flops() == 2 * tokens * layer.flops()


def test_flops_and_params_uneven():
    # blockdiag: every live entry of a random layer is non-zero, so nnz == sum_i h_i c_i
    layer = make("blockdiag", {"num_blocks": 5})
    assert layer.flops() == int((layer.to_dense() != 0).sum())
    assert layer.num_params() == layer.flops() + 96
    layer = make("blocklowrank", {"num_blocks": 5, "rank": 3})
    assert layer.flops() == 5 * 3 * (64 + 96)
    assert layer.num_params() == 5 * 3 * (64 + 96) + 96
    layer = make("blast", {"num_blocks": 5, "rank": 3})
    assert layer.flops() == 3 * (64 + 96) + 3 * 25
    assert layer.num_params() == 3 * (64 + 96) + 3 * 25 + 96
    layer = make("lowrank", {"rank": 5})
    assert layer.num_params() == 5 * (64 + 96) + 96


def test_blocksparse_pattern_is_flat_butterfly():
    layer = make("blocksparse", {"block_size": 8, "butterfly_size": 4, "lowrank_rank": 0},
                 in_features=64, out_features=64)
    occupied = layer.to_dense().detach().reshape(8, 8, 8, 8).abs().sum((1, 3)) > 0
    expected = torch.tensor([[(i ^ j) in (0, 1, 2) for j in range(8)] for i in range(8)])
    assert torch.equal(occupied, expected)
    assert layer.flops() == 24 * 64


# fewer refinement rounds where from_dense iterates: these tests are about budgets, not fit quality
QUICK_FIT = {"blast": {"num_iters": 3}, "blocksparse": {"num_iters": 3}}


@pytest.mark.parametrize("family", STRUCTURED)
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("out_features,in_features", [(64, 96), (96, 64)])
def test_from_dense_respects_budget(family, budget, out_features, in_features):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features)
    layer = get_family(family).from_dense(weight, bias, budget=budget, **QUICK_FIT.get(family, {}))
    assert (layer.in_features, layer.out_features) == (in_features, out_features)
    dense = in_features * out_features
    # from_dense takes the largest integer knobs within the budget: never over it, and the
    # coarsest knob grid here (lowrank at 0.1: rank 3 of the 3.84 that would fit) spends 0.78 of it
    assert 0.75 * budget * dense <= layer.flops() <= budget * dense
    # W is i.i.d. Gaussian: a least-squares fit to a structure whose parameters cost a fraction b
    # of the dense layer keeps about b of its energy (error^2 ~ 1 - b), an SVD-based one more;
    # measured error^2 + budget over these families, shapes and budgets: 0.877 .. 1.036 (monarch
    # at 0.1, whose cost counts its padding)
    assert rel_error(layer.to_dense().detach(), weight) ** 2 + budget <= 1.05
    torch.testing.assert_close(layer.bias.detach(), bias)


def test_dense_from_dense_needs_full_budget():
    weight = torch.randn(96, 64)
    layer = get_family("dense").from_dense(weight, budget=1.0)
    torch.testing.assert_close(layer.to_dense().detach(), weight)
    with pytest.raises(ValueError, match=r"budget=0\.5"):
        get_family("dense").from_dense(weight, budget=0.5)


# knobs pinning the structure in from_dense, and the tolerance of the recovery
RECOVERY = [
    ("dense", {}, {}, 1e-6),
    ("lowrank", {"rank": 5}, {}, 1e-4),
    ("blockdiag", {"num_blocks": 5}, {}, 1e-6),
    ("monarch", {"num_blocks": 4}, {"num_blocks": 4}, 1e-4),
    ("monarch", {"num_blocks": 5}, {"num_blocks": 5}, 1e-4),
    ("blocksparse", {"block_size": 8, "butterfly_size": 2, "lowrank_rank": 3},
     {"block_size": 8, "butterfly_size": 2}, 1e-3),
    ("blocklowrank", {"num_blocks": 5, "rank": 3}, {"num_blocks": 5}, 1e-4),
    ("blast", {"num_blocks": 5, "rank": 3}, {"num_blocks": 5, "num_iters": 100}, 1e-3),
]


@pytest.mark.parametrize("family,knobs,fit_knobs,tol", RECOVERY, ids=[r[0] + str(i) for i, r in
                                                                      enumerate(RECOVERY)])
def test_from_dense_recovers_own_matrix(family, knobs, fit_knobs, tol):
    layer = make(family, knobs)
    weight = layer.to_dense().detach()
    budget = min(1.0, layer.relative_flops())
    fitted = get_family(family).from_dense(weight, layer.bias, budget=budget, **fit_knobs)
    assert fitted.flops() <= layer.flops()
    assert rel_error(fitted.to_dense().detach(), weight) < tol
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(fitted(x), expected, rtol=1e-3,
                                   atol=1e-3 * float(expected.abs().max()))


def test_from_dense_recovers_planted_matrices():
    torch.manual_seed(1)
    planted = torch.randn(96, 3) @ torch.randn(3, 64)                      # rank 3
    layer = get_family("lowrank").from_dense(planted, budget=0.08)        # 491 / 160: rank 3
    assert layer.rank == 3
    assert rel_error(layer.to_dense().detach(), planted) < 1e-4
    blocks = torch.block_diag(*torch.randn(4, 24, 16).unbind(0))          # (96, 64), 4 blocks
    layer = get_family("blockdiag").from_dense(blocks, budget=0.25)       # smallest b: 4
    assert layer.num_blocks == 4
    assert rel_error(layer.to_dense().detach(), blocks) < 1e-6
    # every block of rank 2 on a 4 x 4 grid: the (b, r') search finds it
    grid = torch.randn(4, 4, 24, 2) @ torch.randn(4, 4, 2, 16)
    planted = grid.permute(0, 2, 1, 3).reshape(96, 64)
    layer = get_family("blocklowrank").from_dense(planted, budget=4 * 2 * 160 / 6144)
    assert (layer.num_blocks, layer.rank) == (4, 2)
    assert rel_error(layer.to_dense().detach(), planted) < 1e-4


@pytest.mark.parametrize("family,knobs,even", CONFIGS, ids=IDS)
def test_gradient_reaches_every_parameter(family, knobs, even):
    layer = make(family, knobs)
    layer(torch.randn(2, 3, 64)).square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        assert float(param.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("family,knobs,even", CONFIGS, ids=IDS)
def test_config_rebuilds_the_layer(family, knobs, even):
    layer = make(family, knobs)
    rebuilt = get_family(family)(**layer.config())
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(rebuilt(x), layer(x))
    summary = layer.structure_summary()
    assert summary["family"] == family and summary["flops"] == layer.flops()
    for knob, value in knobs.items():
        assert summary[knob] == value


BAD_KNOBS = [
    ("lowrank", {"rank": 0}, r"rank must be in \[1, 64\].*got 0"),
    ("lowrank", {"rank": 65}, r"rank must be in \[1, 64\].*got 65"),
    ("lowrank", {"rank": 2.5}, r"rank must be an integer, got 2\.5"),
    ("blockdiag", {"num_blocks": 0}, r"num_blocks must be in \[1, 64\].*got 0"),
    ("monarch", {"num_blocks": 65}, r"num_blocks must be in \[1, 64\].*got 65"),
    ("blocksparse", {"block_size": 8, "butterfly_size": 3}, r"butterfly_size must be a power of two, got 3"),
    ("blocksparse", {"block_size": 8, "butterfly_size": 16}, r"butterfly_size must be in \[1, 8\].*got 16"),
    ("blocksparse", {"block_size": 0, "butterfly_size": 1}, r"block_size must be in \[1, 64\].*got 0"),
    ("blocksparse", {"block_size": 8, "butterfly_size": 1, "lowrank_rank": -1}, r"lowrank_rank must be in \[0, 64\].*got -1"),
    ("blocklowrank", {"num_blocks": 4, "rank": 17}, r"rank must be in \[1, 16\].*num_blocks=4.*got 17"),
    ("blast", {"num_blocks": 4, "rank": 0}, r"rank must be in \[1, 64\].*got 0"),
]


@pytest.mark.parametrize("family,knobs,match", BAD_KNOBS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_KNOBS)])
def test_bad_knobs_raise(family, knobs, match):
    with pytest.raises(ValueError, match=match):
        get_family(family)(64, 96, **knobs)


@pytest.mark.parametrize("family", STRUCTURED)
def test_from_dense_rejects_impossible_budget(family):
    weight = torch.randn(96, 64)
    with pytest.raises(ValueError, match=r"budget=0\.001 is too small for a " + family):
        get_family(family).from_dense(weight, budget=0.001)
    with pytest.raises(ValueError, match=r"budget must be a fraction"):
        get_family(family).from_dense(weight, budget=1.5)


def test_from_dense_rejects_knob_over_budget():
    weight = torch.randn(96, 64)
    with pytest.raises(ValueError, match=r"num_blocks=2 costs 3072 multiply-adds, more than budget=0\.25"):
        get_family("blockdiag").from_dense(weight, budget=0.25, num_blocks=2)
    with pytest.raises(ValueError, match=r"rank=20 costs 3200 multiply-adds, more than budget=0\.25"):
        get_family("lowrank").from_dense(weight, budget=0.25, rank=20)
    with pytest.raises(ValueError, match=r"weight must be a 2-D"):
        get_family("monarch").from_dense(torch.randn(96), budget=0.5)
