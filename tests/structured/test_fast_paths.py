"""Fast paths compute the same function as the slow reference definitions (CPU, random inputs).

- masks: index-space evaluation vs the frequency-domain definition (irfft, autograd through complex
  ops), values and gradients, tolerance: 1e-12 (float64) / 1e-5 relative (float32) for every sigma;
- GBLR forward/backward (factored and dense-build paths, no-grad cache) vs the reference
  dense-masked-matrix computation;
- export plans ("grouped", "exact") vs the trained layer, FLOP accounting.
"""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gsmsearch.structured import GBLRLinear, ProjectFlops, export, param_groups
from gsmsearch.structured._export import ExportedGBLR, PlanCost
from gsmsearch.structured._mask import gaudi_mask, gaudi_mask_fft, gaudi_mask_reference

SIGMAS = [None, 0.05, 0.5, 2.0, 5.0, 40.0, 1e4]


def grid_params(K, n, generator, dtype=torch.float64):
    width = torch.randint(0, n + 1, (K,), generator=generator).to(dtype) / n
    location = torch.randint(0, n, (K,), generator=generator).to(dtype) / n
    width[0], width[1], width[2] = 0.0, 1.0, 1 / n  # widths 0, full, one element
    width[3], location[3] = 0.5, (n - 2) / n  # wraps past the end
    return width, location


def mask_and_grads(fn, width, location, n, sigma, weights):
    w, l = width.clone().requires_grad_(), location.clone().requires_grad_()
    mask = fn(w, l, n, sigma)
    (mask * weights).sum().backward()
    return mask.detach(), w.grad, l.grad


@pytest.mark.parametrize("n", [1, 2, 9, 64, 257])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_index_space_mask_matches_frequency_definition_float64(n, sigma):
    g = torch.Generator().manual_seed(n)
    width, location = grid_params(12, n, g)
    weights = torch.randn(12, n, generator=g, dtype=torch.float64)
    fast = mask_and_grads(gaudi_mask, width, location, n, sigma, weights)
    ref = mask_and_grads(gaudi_mask_reference, width, location, n, sigma, weights)
    for a, b in zip(fast, ref):
        scale = max(1.0, float(b.abs().max()))
        assert float((a - b).abs().max()) <= 1e-12 * scale * n


@pytest.mark.parametrize("sigma", [None, 1.0, 5.0, 100.0])
def test_index_space_mask_float32_tolerance(sigma):
    n = 768
    g = torch.Generator().manual_seed(0)
    width, location = grid_params(64, n, g)
    weights = torch.randn(64, n, generator=g, dtype=torch.float64)
    ref = mask_and_grads(gaudi_mask_reference, width, location, n, sigma, weights)
    fast = mask_and_grads(gaudi_mask, width.float(), location.float(), n, sigma, weights.float())
    assert float((fast[0].double() - ref[0]).abs().max()) <= 1e-5
    for a, b in zip(fast[1:], ref[1:]):
        assert float((a.double() - b).norm() / b.norm()) <= 1e-5


def test_index_space_mask_off_range_widths_and_locations():
    """Widths outside [0, 1] and locations outside [0, 1) follow the definition too (the FFT
    path's sigma=None forward clamps the boxcar instead, so it is compared with a finite sigma)."""
    n = 20
    width = torch.tensor([-0.35, 1.25, 2.0, 0.3], dtype=torch.float64)
    location = torch.tensor([0.1, 0.95, 0.5, -1.3], dtype=torch.float64)
    weights = torch.randn(4, n, dtype=torch.float64)
    for sigma in (None, 3.0):
        fast = mask_and_grads(gaudi_mask, width, location, n, sigma, weights)
        ref = mask_and_grads(gaudi_mask_reference, width, location, n, sigma, weights)
        for a, b in zip(fast, ref):
            assert torch.allclose(a, b, atol=1e-10)
        if sigma is not None:
            fft = mask_and_grads(gaudi_mask_fft, width, location, n, sigma, weights)
            for c, b in zip(fft, ref):
                assert torch.allclose(c, b, atol=1e-10)


def random_layer(m=48, n=40, K=14, r=2, seed=0, sigma=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    layer = GBLRLinear(n, m, rank_per_component=r, num_components=K, sigma=sigma).to(dtype)
    with torch.no_grad():
        layer.row_factors.copy_(torch.randn(K, r, m, generator=g))
        layer.col_factors.copy_(torch.randn(K, r, n, generator=g))
        layer.widths.copy_(torch.rand(2, K, generator=g))
        layer.locations.copy_(torch.rand(2, K, generator=g))
        layer.widths[:, 0] = 0.0  # dead: dropped
        layer.widths[0, 1] = 0.0  # one side empty: kept (its width gradient)
        layer.widths[:, 2] = 1.0
        layer.widths[:, 3], layer.locations[:, 3] = 0.5, 0.8  # wraps
        layer.widths[:, 4] = 1 / m  # one row: a dense-rule block
        layer.bias.copy_(torch.randn(m, generator=g))
    return layer


def reference_forward(layer, x):
    """The reference code's way: frequency-domain masks, dense masked matrix, one GEMM."""
    m, n = layer.out_features, layer.in_features
    row_mask = gaudi_mask_reference(layer.widths[0], layer.locations[0], m, layer.sigma)
    col_mask = gaudi_mask_reference(layer.widths[1], layer.locations[1], n, layer.sigma)
    W = torch.einsum("krm,km,krn,kn->mn", layer.row_factors, row_mask, layer.col_factors, col_mask)
    return x @ W.T + layer.bias


@pytest.mark.parametrize("sigma", [None, 0.7, 6.0])
@pytest.mark.parametrize("path", ["factored", "factored-recompute", "dense-build"])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("frozen", [False, True], ids=["learned", "frozen-structure"])
def test_gblr_forward_backward_matches_reference(sigma, path, input_grad, frozen):
    """Frozen: widths and locations need no gradient, so the layer keeps its masks between steps;
    two steps with a factor update between them, and a sigma change before the second."""
    layer = random_layer(seed=3, sigma=sigma)
    layer._use_factored = lambda *args: path.startswith("factored")  # force the path under test
    layer.recompute_intermediate = path == "factored-recompute"
    params = [layer.widths, layer.locations, layer.row_factors, layer.col_factors, layer.bias]
    if frozen:
        for p in params[:2]:
            p.requires_grad_(False)
        params = params[2:]
    for step in range(2 if frozen else 1):
        if step:
            with torch.no_grad():
                layer.row_factors.mul_(1.5)  # content changes, the structure does not
            layer.sigma = None if sigma is None else sigma * 2
        x = torch.randn(37, 40, dtype=torch.float64, requires_grad=input_grad)
        target = torch.randn(37, 48, dtype=torch.float64)
        layer.zero_grad()
        (layer(x) * target).sum().backward()
        got = [p.grad.clone() for p in params] + ([x.grad.clone()] if input_grad else [])
        layer.zero_grad()
        x.grad = None
        out = reference_forward(layer, x)
        (out * target).sum().backward()
        ref = [p.grad for p in params] + ([x.grad] if input_grad else [])
        with torch.no_grad():
            assert torch.allclose(layer(x), out, atol=1e-10)
        for a, b in zip(got, ref):
            assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)
    if frozen:
        assert "_mask_cache" in layer.__dict__  # the path under test kept its masks


@pytest.mark.parametrize("widths", [
    [[0.5, 0.2, 0.0], [0.3, 0.0, 0.0]],  # one dead component, nothing wraps
    [[1.25, -0.35, 0.3], [0.4, 2.0, 0.0]],  # both sides wrap, off-range widths
    [[0.3, 1.0, 0.2], [0.7, 0.2, 0.5]],  # a full row interval wraps (length == size), all live
])
def test_training_structure_reads_match_the_masks(widths):
    """The training forward reads the live components and whether each side wraps in one
    transfer (``_training_structure``); those must be what the mask code would read itself,
    and the layer's gradients must stay the reference's with them."""
    from gsmsearch.structured._mask import index_mask_forward, round_to_grid

    layer = random_layer(m=20, n=12, K=5, r=1, seed=5, sigma=2.0)
    widths = [row + [0.4, 0.6] for row in widths]  # components 3-4 live, not wrapping
    with torch.no_grad():
        layer.widths.copy_(torch.tensor(widths, dtype=torch.float64))
    active, row_wrapped, col_wrapped = layer._training_structure()
    expected_active = layer._active_components()
    assert (active is None) == (expected_active is None)
    if active is not None:
        assert active.tolist() == expected_active.tolist()
    for side, size, wrapped in ((0, 20, row_wrapped), (1, 12, col_wrapped)):
        w, l = round_to_grid(layer.widths[side], size), round_to_grid(layer.locations[side], size)
        assert index_mask_forward(w.detach(), l.detach(), size, 2.0)[3] == wrapped
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(9, 20, dtype=torch.float64)
    (layer(x) * target).sum().backward()
    got = [p.grad.clone() for p in (layer.widths, layer.locations, layer.row_factors, x)]
    layer.zero_grad()
    x.grad = None
    (reference_forward(layer, x) * target).sum().backward()
    ref = [p.grad for p in (layer.widths, layer.locations, layer.row_factors, x)]
    if active is not None:  # the reference differentiates dead components too; the layer drops them
        dead = [k for k in range(5) if k not in active.tolist()]
        for t in (ref[0], ref[1]):
            t[:, dead] = 0.0
        ref[2][dead] = 0.0
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)


def saved_for_backward(layer, x):
    """Shapes of the tensors autograd keeps for backward, other than x and the parameters."""
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    own.add(x.untyped_storage().data_ptr())
    shapes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return shapes


@pytest.mark.parametrize("recompute", [False, True])
def test_gblr_training_keeps_no_masks_or_masked_factors(recompute):
    # autograd through the plain composition kept both masks and both masked factors (K x out,
    # K x in) until backward; the fused Function keeps only per-component vectors and, unless
    # recompute_intermediate, the T x K r intermediate
    m, n, K, r, T = 96, 80, 24, 2, 50
    layer = GBLRLinear(n, m, num_components=K, rank_per_component=r, sigma=3.0)
    layer.recompute_intermediate = recompute
    x = torch.randn(T, n, requires_grad=True)
    shapes = saved_for_backward(layer, x)
    large = [s for s in shapes if len(s) > 1]
    assert large == ([] if recompute else [(T, K * r)]), shapes
    assert all(s == (K,) for s in shapes if len(s) == 1)  # rounded widths and locations


def test_gblr_training_under_cpu_bf16_autocast_matches_float32():
    layer = random_layer(seed=5, sigma=4.0, dtype=torch.float32)
    x = torch.randn(64, 40, requires_grad=True)
    target = torch.randn(64, 48)
    (layer(x) * target).sum().backward()
    ref = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # as F.linear under autocast
    (y.float() * target).sum().backward()
    got = [p.grad for p in layer.parameters()] + [x.grad]
    assert all(g.dtype == torch.float32 for g in got)  # gradients in the parameters' dtype
    for a, b in zip(got, ref):
        assert (a - b).norm() <= 0.03 * b.norm() + 1e-3, (a - b).norm() / b.norm()


def test_path_choice_counts_backward_work():
    layer = GBLRLinear(768, 3072, num_components=768)
    assert layer._use_factored(2048, 768, True, True)  # inside a network: factored (1.25x GEMM)
    assert not layer._use_factored(2048, 768, True, False)  # first layer: dense build is cheaper
    assert layer._use_factored(4, 768, False, False)  # inference on a few tokens: factored
    wide = GBLRLinear(64, 64, rank_per_component=4)  # K r = 256 > 64: building W is cheaper
    assert not wide._use_factored(1000, 256, False, False)


def test_no_grad_cache_is_invalidated_by_updates():
    layer = random_layer(seed=4, dtype=torch.float32)
    x = torch.randn(5, 40)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)  # served from the cache
        layer.row_factors.mul_(2.0)  # in-place update bumps the version: recomputed
        assert torch.allclose(layer(x) - layer.bias, 2 * (first - layer.bias), atol=1e-5)
    before = layer(x).detach()
    opt = torch.optim.SGD(param_groups(layer, lr=1e-4, structure_lr=1e-6), lr=1e-4)
    layer(x).sum().backward()
    opt.step()  # the optimizer's in-place updates invalidate the cache as well
    with torch.no_grad():
        after = layer(x)
        assert not torch.allclose(after, before)
        expected = x @ layer.to_dense().T + layer.bias
        assert float((after - expected).norm() / expected.norm()) < 1e-5


def test_training_structure_is_read_again_only_when_the_widths_change(monkeypatch):
    """The training forward's host read of the live components and wrap flags is kept while the
    widths are unchanged (a frozen structure reads once), and every way the widths change in
    training -- a copy, the optimizer, the budget controller -- makes it read again."""
    reads = []
    original = GBLRLinear._read_training_structure
    monkeypatch.setattr(GBLRLinear, "_read_training_structure", lambda self: reads.append(1) or original(self))
    layer = random_layer(m=24, n=16, K=6, r=1, seed=2, sigma=None)
    layer.widths.requires_grad_(False)
    layer.locations.requires_grad_(False)
    x = torch.randn(7, 16, dtype=torch.float64)

    def check():  # the output is the dense definition's with the current widths
        y = layer(x)
        y.sum().backward()
        expected = x @ layer.to_dense().T + layer.bias
        assert torch.allclose(y, expected, atol=1e-10)

    for _ in range(3):
        check()
    assert len(reads) == 1
    with torch.no_grad():
        layer.widths[:, 0] = 0.0  # component 0 dies: it must be dropped, not served stale
    check()
    assert len(reads) == 2
    assert layer._training_structure()[0].tolist() == [1, 2, 3, 4, 5]
    with torch.no_grad():
        layer.locations += 0.3  # the locations alone: the table rows are computed again
    check()
    assert len(reads) == 2
    layer.widths.requires_grad_(True)
    opt = torch.optim.SGD(param_groups(layer, lr=1e-3, structure_lr=1e-2), lr=1e-3)
    layer(x).pow(2).sum().backward()
    opt.step()
    check()
    assert len(reads) == 3  # the step changed the widths
    ProjectFlops(0.2).step([layer], lam=1e-3, lr_width=1e-2)
    check()
    assert len(reads) == 4


def learned_layer(budget=0.3, size=64, steps=40):
    """A structure learned by a short proximal run (sigma 2, ProjectFlops)."""
    torch.manual_seed(0)
    teacher = torch.randn(size, 8) @ torch.randn(8, size) / size
    layer = GBLRLinear(size, size, sigma=2.0)
    opt = torch.optim.Adam(param_groups(layer, lr=3e-3, structure_lr=1e-2))
    controller = ProjectFlops(budget)
    for _ in range(steps):
        x = torch.randn(64, size)
        loss = (layer(x) - x @ teacher.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        controller.step([layer], lam=1e-3, lr_width=1e-2)
    layer.sigma = None
    return layer


@pytest.mark.parametrize("plan", ["grouped", "factored", "tiled", "bsr", "auto", "exact"])
@pytest.mark.parametrize("source", ["random-0", "random-1", "random-2", "learned", "lowrank"])
def test_export_plans_match_trained_layer(plan, source):
    if source == "learned":
        layer = learned_layer()
    elif source == "lowrank":
        layer = random_layer(m=64, n=56, K=6, r=1, seed=9, dtype=torch.float32)
        with torch.no_grad():
            layer.widths.fill_(1.0)
    else:
        layer = random_layer(m=64, n=56, K=20, r=2, seed=int(source[-1]), dtype=torch.float32)
    # small per-call overhead so the grouped plan really forms several padded groups here
    exported = export(layer, plan=plan, cost=PlanCost(tokens=64, gemm_overhead_us=1.0))
    x = torch.randn(3, 11, layer.in_features)
    with torch.no_grad():
        ref = layer(x)
        got = exported(x)
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    assert exported.flops() == layer.flops()
    assert exported.executed_flops() >= exported.flops()
    if plan == "exact":
        assert exported.executed_flops() == layer.flops()
    # the executed count is what a FLOP counter sees (2 per multiply-add)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        exported(x.reshape(33, -1))
    assert counter.get_total_flops() // 2 // 33 == exported.executed_flops()
    assert not any(p.requires_grad for p in exported.parameters())


def test_grouped_plan_falls_back_to_dense_when_cheaper():
    layer = random_layer(m=64, n=56, K=20, r=2, seed=0, dtype=torch.float32)
    with torch.no_grad():
        layer.widths.fill_(1.0)  # 20 rank-2 full-width components: 40 (64 + 56) > 64 x 56
    exported = ExportedGBLR.from_gblr(layer, plan="grouped")
    assert exported.blocks == [(0, 64, 0, 56)] and exported.executed_flops() == 64 * 56
    x = torch.randn(9, 56)
    with torch.no_grad():
        assert torch.allclose(exported(x), layer(x), atol=1e-4)


def _long_and_short_layer(m=512, n=256, long=6, short=90, seed=5):
    """A few near-full-length components among many short ones at scattered starts -- the shape
    of a greedy fit of a real weight (bench/RESULTS.md "Export speed", "MiniLM greedy")."""
    g = torch.Generator().manual_seed(seed)
    K = long + short
    layer = GBLRLinear(n, m, num_components=K, bias=True)
    with torch.no_grad():
        layer.row_factors.copy_(torch.randn(K, 1, m, generator=g))
        layer.col_factors.copy_(torch.randn(K, 1, n, generator=g))
        layer.locations.copy_(torch.rand(2, K, generator=g))
        layer.widths[:, :long] = 0.9 + 0.1 * torch.rand(2, long, generator=g)
        layer.widths[:, long:] = 0.01 + 0.03 * torch.rand(2, short, generator=g)
    return layer


def test_grouped_plan_keeps_long_components_out_of_short_ones_windows():
    """Grouping runs within classes of similar length: a run that is contiguous in start order
    alone holds every short component starting between two long ones, and so pads them to the
    whole axis (10x the method's count here; by length class 2.4x -- what is left is the cost
    model's trade of padding for fewer narrow GEMM calls), and the result is the same function."""
    from gsmsearch.structured._export._grouped import _length_class_runs, _segment_runs

    layer = _long_and_short_layer()
    exported = ExportedGBLR.from_gblr(layer, plan="grouped")
    assert exported.executed_flops() < 3 * exported.flops()
    x = torch.randn(40, layer.in_features)
    with torch.no_grad():
        ref = layer(x)
        assert float((exported(x) - ref).norm() / ref.norm()) < 1e-5
    # the partition covers every component once, and never models worse than one start-ordered DP
    cost = PlanCost()
    modelled = {}
    for side, size in ((0, layer.out_features), (1, layer.in_features)):
        live = layer.live_components()
        starts = layer.interval_starts()[side, live].numpy()
        ends = starts + layer.interval_lengths()[side, live].numpy()
        ranks = np.ones(len(starts), dtype=np.int64)
        args = (starts, ends, ranks, cost.overhead(), cost.rank_offset, 1, size)
        runs, by_class = _length_class_runs(*args)
        assert sorted(np.concatenate(runs).tolist()) == list(range(len(starts)))
        single_runs, single = _segment_runs(*args)
        assert by_class <= single
        modelled[side] = (by_class, single)
    # and here better (the model's per-call and narrow-GEMM terms, which the classes do not
    # change, are most of what is left)
    assert sum(c for c, _ in modelled.values()) < 0.75 * sum(s for _, s in modelled.values())


def test_export_rejects_unknown_plan():
    with pytest.raises(ValueError, match="plan must be one of"):
        export(random_layer(dtype=torch.float32), plan="fastest")


# -- hand-crafted families: the batched forwards vs x @ to_dense().T ---------------------------
@pytest.mark.parametrize("in_features,out_features,knobs,spare_slots", [
    (64, 96, {"block_size": 8, "butterfly_size": 2, "lowrank_rank": 2}, False),   # every row full
    (100, 60, {"block_size": 8, "butterfly_size": 4, "lowrank_rank": 3}, True),   # padded, uneven rows
    (96, 64, {"block_size": 7, "butterfly_size": 4, "lowrank_rank": 0}, True),
])
@pytest.mark.parametrize("chunk", [256, 3], ids=["one-chunk", "chunks-of-3"])
def test_blocksparse_forward_backward_match_dense_definition(in_features, out_features, knobs, spare_slots, chunk):
    from gsmsearch.structured import BlockSparseLinear

    torch.manual_seed(0)
    layer = BlockSparseLinear(in_features, out_features, **knobs).double()
    layer.cpu_token_chunk = chunk  # 10 tokens: one chunk, or four (the last of one token)
    # the uneven case really exercises the zero-filled spare slots
    assert (layer.blocks.shape[0] < layer.grid[0] * layer.slots_per_row) == spare_slots
    _check_against_dense_definition(layer, in_features)


@pytest.mark.parametrize("in_features,out_features,num_blocks", [
    (64, 64, 8),    # q divisible by b: the 4-d permutation
    (64, 96, 4),
    (60, 100, 7),   # padding on both sides, q not divisible by b
])
def test_monarch_forward_backward_match_dense_definition(in_features, out_features, num_blocks):
    from gsmsearch.structured import MonarchLinear

    torch.manual_seed(0)
    layer = MonarchLinear(in_features, out_features, num_blocks=num_blocks).double()
    _check_against_dense_definition(layer, in_features)


def _check_against_dense_definition(layer, in_features):
    """Output and every gradient (parameters and input) of the layer's forward equal those of
    ``x @ to_dense().T + bias`` (``to_dense`` builds the matrix from its definition)."""
    x = torch.randn(2, 5, in_features, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, layer.out_features, dtype=torch.float64)
    inputs = [x, *(p for p in layer.parameters() if p.numel())]  # rank-0 factors are empty
    fast = layer(x)
    grads_fast = torch.autograd.grad((fast * upstream).sum(), inputs)
    slow = x @ layer.to_dense().T + layer.bias
    grads_slow = torch.autograd.grad((slow * upstream).sum(), inputs)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    for fast_grad, slow_grad in zip(grads_fast, grads_slow):
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_tiled_plan_many_tiles_wrapping_arcs_and_chunks(bias, monkeypatch):
    """A layer big enough for several 64-wide tiles per axis: some arcs wrap past the last
    column of t (two GEMMs), some output rows are touched by no component (bias only), and a
    batch that is not a multiple of the token chunk runs in several chunks."""
    from gsmsearch.structured._export import _tiled

    monkeypatch.setattr(_tiled, "TILE_SIZES", (64,))
    m, n, K = 300, 260, 40
    g = torch.Generator().manual_seed(3)
    layer = GBLRLinear(n, m, rank_per_component=2, num_components=K, bias=bias)
    with torch.no_grad():
        layer.row_factors.copy_(torch.randn(K, 2, m, generator=g))
        layer.col_factors.copy_(torch.randn(K, 2, n, generator=g))
        layer.widths.copy_(0.05 + 0.4 * torch.rand(2, K, generator=g))
        layer.locations.copy_(torch.rand(2, K, generator=g))
        layer.locations[0] = 0.6 * layer.locations[0]      # rows start in [0, 0.6) and end
        layer.widths[0] = layer.widths[0].clamp(max=0.25)  # by 0.85: the last rows untouched
        layer.widths[1, 3], layer.locations[1, 3] = 0.4, 0.9  # a column interval that wraps
        layer.widths[1, 4] = 1.0                              # a full-width column interval
    exported = ExportedGBLR.from_gblr(layer, plan="tiled")
    assert exported.plan == "tiled"
    assert len(exported.column_tiles) > 2 and len(exported.row_tiles) > 2
    segments = [segs for _, _, segs in exported.column_tiles + exported.row_tiles]
    assert any(len(s) == 2 for s in segments)  # an arc wrapping past t's last column
    assert exported.executed_flops() < K * 2 * (m + n)  # less than running every component in full
    exported.token_chunk = 16
    x = torch.randn(37, n)  # chunks of 16, 16 and 5 tokens
    with torch.no_grad():
        ref = layer(x)
        got = exported(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    covered = torch.zeros(m, dtype=torch.bool)
    starts, lengths = layer.interval_starts(), layer.interval_lengths()
    for k in layer.live_components().tolist():
        covered[torch.arange(int(starts[0, k]), int(starts[0, k] + lengths[0, k])) % m] = True
    assert not bool(covered.all())  # some output rows are the bias (or zero) alone
    if bias:
        torch.testing.assert_close(got[:, ~covered], layer.bias[~covered].expand(37, -1).detach())


@pytest.mark.parametrize("family,in_features,out_features,knobs", [
    ("blockdiag", 64, 96, {"num_blocks": 4}),
    ("blockdiag", 60, 100, {"num_blocks": 7}),   # uneven blocks: padded slots
    ("blast", 64, 96, {"num_blocks": 4, "rank": 6}),
    ("blast", 60, 100, {"num_blocks": 7, "rank": 3}),
])
def test_batched_block_families_match_dense_definition(family, in_features, out_features, knobs):
    from gsmsearch.structured import create_linear

    torch.manual_seed(0)
    layer = create_linear(family, in_features, out_features, **knobs).double()
    _check_against_dense_definition(layer, in_features)
