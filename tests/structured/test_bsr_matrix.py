"""The "bsr" export plan and its Triton kernel.

CI has no GPU, so the kernel runs under Triton's CPU interpreter (``TRITON_INTERPRET=1``, which
must be set before the kernel is defined): those checks run in a fresh interpreter process
(``interpreter.interpreted``) and compare the kernel with the torch path of the same blocks and with the
dense products.  ``bench/gpu.sh`` runs the compiled kernel on a GPU against the same references.
"""
import textwrap

import pytest
import torch

from gsmsearch.structured import export
from gsmsearch.structured._bsr_matrix import BlockSparseMatrix
from gsmsearch.structured._common import triton_runs
from gsmsearch.structured._export import ExportedGBLR

from .interpreter import interpreted
from .test_fast_paths import learned_layer, random_layer


def banded(K, N, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(K, N, generator=g)
    rows = torch.arange(K)[:, None] * N / K
    dense[(torch.arange(N)[None, :] - rows).abs() > width] = 0.0
    return dense


@pytest.mark.parametrize("shape,block", [((100, 70), (16, 32)), ((64, 64), (64, 64)), ((33, 130), (8, 16))])
def test_block_sparse_matrix_keeps_exactly_the_nonzero_blocks(shape, block):
    dense = banded(*shape, width=10)
    matrix = BlockSparseMatrix(dense, block)
    assert torch.equal(matrix.to_dense(), dense)
    BK, BN = block
    tiles = [(i, j) for i in range(0, shape[0], BK) for j in range(0, shape[1], BN)
             if dense[i : i + BK, j : j + BN].ne(0).any()]
    assert matrix.stored_blocks == len(tiles)
    assert matrix.executed_macs() == len(tiles) * BK * BN


def gathered_case():
    """A banded 100 x 70 matrix in (16, 32) blocks (partial blocks on both axes), an input whose
    columns are gathered through a permutation, a bias, and the dense answer."""
    dense = banded(100, 70, width=12, seed=1)
    matrix = BlockSparseMatrix(dense, (16, 32))
    a = torch.randn(37, 120)
    index = torch.randperm(120)[:100].to(torch.int32)
    bias = torch.randn(70)
    return dense, matrix, a, index, bias, a[:, index.long()] @ dense + bias


def test_block_sparse_torch_path_matches_dense_with_index_bias_and_out():
    dense, matrix, a, index, bias, expected = gathered_case()
    assert torch.allclose(matrix(a, index=index, bias=bias), expected, atol=1e-4)
    out = torch.empty(37, 200)[:, 10:80]  # a strided view is written in place
    matrix(a, index=index, bias=bias, out=out)
    assert torch.allclose(out, expected, atol=1e-4)
    assert torch.allclose(matrix(a[:, :100]), a[:, :100] @ dense, atol=1e-4)


@pytest.mark.parametrize("block", [8, 16, 32, (16, 8)])
@pytest.mark.parametrize("source", ["learned", "random", "dead"])
def test_bsr_plan_matches_the_layer_and_skips_empty_blocks(block, source):
    if source == "learned":
        layer = learned_layer(budget=0.2)
    else:
        layer = random_layer(m=64, n=56, K=20, r=2, seed=7, dtype=torch.float32)
        if source == "dead":
            with torch.no_grad():
                layer.widths.zero_()  # every component dead: the bias alone
    exported = ExportedGBLR.from_gblr(layer, plan="bsr", block=block)
    x = torch.randn(29, layer.in_features)
    with torch.no_grad():
        ref = layer(x)
        got = exported(x)
    assert torch.allclose(got, ref, atol=1e-4 * max(1.0, float(ref.abs().max())))
    exported.bsr_gather = False  # t' written out between the stages instead
    with torch.no_grad():
        assert torch.allclose(exported(x), got, atol=1e-5 * max(1.0, float(ref.abs().max())))
    assert exported.flops() == layer.flops()
    assert exported.executed_flops() >= exported.flops()
    # stage 1 stores only the blocks its factor matrix touches
    features, columns = (block, block) if isinstance(block, int) else block
    assert exported.stage1.block == (features, columns) and exported.stage2.block == (columns, features)
    dense_stage = exported.stage1.to_dense()
    assert exported.stage1.stored_blocks == sum(
        bool(dense_stage[i : i + features, j : j + columns].ne(0).any())
        for i in range(0, dense_stage.shape[0], features) for j in range(0, dense_stage.shape[1], columns))
    if source == "learned" and features <= 16:  # a learned structure at 0.2 leaves blocks out
        assert exported.executed_flops() < 0.7 * layer.in_features * layer.out_features


def test_bsr_layout_groups_short_pieces_apart_from_long_ones(monkeypatch):
    """A few long components among many short ones: in cyclic-centre order every block of t's
    columns holds a long one and so spans the whole axis; laid out by length class first the
    short ones share blocks that stay short (here 86 blocks instead of 126).  The plan takes the
    layout storing fewer blocks, and computes the same function."""
    from gsmsearch.structured._export import _bsr, _common

    from .test_fast_paths import _long_and_short_layer

    layer = _long_and_short_layer()
    x = torch.randn(23, layer.in_features)
    with torch.no_grad():
        ref = layer(x)
        chosen = ExportedGBLR.from_gblr(layer, plan="bsr", block=(32, 8))
        assert torch.allclose(chosen(x), ref, atol=1e-4 * float(ref.abs().max()))
        centre_only = lambda intervals, ranks, size, block: _common._first_columns(
            _common._centre_order(intervals, size), ranks)
        monkeypatch.setattr(_bsr, "_bsr_layout", centre_only)
        centre = ExportedGBLR.from_gblr(layer, plan="bsr", block=(32, 8))
        assert torch.allclose(centre(x), ref, atol=1e-4 * float(ref.abs().max()))
    stored = lambda e: e.stage1.stored_blocks + e.stage2.stored_blocks
    assert stored(chosen) < 0.75 * stored(centre)
    assert chosen.executed_flops() < 0.75 * centre.executed_flops()


def test_occupied_block_count_matches_the_dense_layout():
    """The layout choice counts blocks without building the matrices: the count equals the
    non-zero blocks of the dense stage matrix, wrapping intervals and ragged last blocks
    included."""
    import numpy as np

    from gsmsearch.structured._export._bsr import _occupied_blocks
    from gsmsearch.structured._export._common import _first_columns

    rng = np.random.default_rng(0)
    for _ in range(100):
        size, features, columns = int(rng.integers(5, 300)), int(rng.integers(1, 40)), int(rng.integers(1, 9))
        k = int(rng.integers(1, 30))
        intervals = [(int(rng.integers(0, size)), int(rng.integers(1, size + 5))) for _ in range(k)]
        ranks = rng.integers(1, 4, size=k)
        first = _first_columns(rng.permutation(k), ranks)
        dense = np.zeros((size, int(ranks.sum())), bool)
        for (start, length), a, rank in zip(intervals, first, ranks):
            dense[np.ix_((start + np.arange(min(length, size))) % size, np.arange(a, a + rank))] = True
        expected = sum(dense[i : i + features, j : j + columns].any()
                       for i in range(0, size, features) for j in range(0, dense.shape[1], columns))
        assert _occupied_blocks(intervals, first, ranks, size, (features, columns)) == expected


def test_bsr_plan_is_not_timed_by_auto_on_cpu(monkeypatch):
    """On a CPU the bsr plan runs its torch path (slower than tiled): ``auto`` must not even build
    it there, so its construction failing here would show."""
    assert not triton_runs(torch.zeros(1))

    def built(*args, **kwargs):
        raise AssertionError("auto built the bsr plan on a CPU")

    monkeypatch.setattr(ExportedGBLR, "_build_bsr", built)
    exported = export(random_layer(m=64, n=56, K=20, r=2, seed=2, dtype=torch.float32), plan="auto")
    assert exported.plan in ("grouped", "factored", "tiled")


_KERNEL_CHECKS = textwrap.dedent(
    """
    import json, os, torch
    assert os.environ["TRITON_INTERPRET"] == "1"
    from gsmsearch.structured._bsr_matrix import BlockSparseMatrix
    from gsmsearch.structured._common import triton_runs
    from gsmsearch.structured._export import ExportedGBLR
    from tests.structured.test_bsr_matrix import gathered_case
    from tests.structured.test_fast_paths import learned_layer, random_layer

    torch.manual_seed(0)
    assert triton_runs(torch.zeros(1))
    errors = {}
    # the kernel itself: partial blocks on every axis, gathered columns, bias, strided output
    dense, matrix, a, index, bias, expected = gathered_case()
    errors["kernel index+bias"] = float((matrix(a, index=index, bias=bias) - expected).abs().max())
    out = torch.zeros(37, 200)
    matrix(a, index=index, bias=bias, out=out[:, 10:80])
    errors["kernel strided out"] = float((out[:, 10:80] - expected).abs().max())
    errors["kernel untouched"] = float(out[:, :10].abs().max() + out[:, 80:].abs().max())
    matrix.tokens_as_n = True  # the transposed kernel (tensor cores' M side = the column block)
    errors["kernel tokens as n"] = float((matrix(a, index=index, bias=bias) - expected).abs().max())
    out = torch.zeros(37, 200)
    matrix(a, index=index, bias=bias, out=out[:, 10:80])
    errors["kernel tokens as n strided out"] = float((out[:, 10:80] - expected).abs().max())
    errors["kernel tokens as n untouched"] = float(out[:, :10].abs().max() + out[:, 80:].abs().max())
    matrix.tokens_as_n = False
    errors["kernel vs torch path"] = float(
        (matrix(a, index=index) - matrix._torch_matmul(a, index, None, None)).abs().max())
    empty = BlockSparseMatrix(torch.zeros(40, 48), (16, 16))
    errors["kernel no blocks"] = float(empty(torch.randn(5, 40), bias=torch.ones(48)).sub(1).abs().max())
    # the whole plan on learned and random structures, several block sizes
    for name, layer in (("learned", learned_layer(budget=0.2)),
                        ("random", random_layer(m=64, n=56, K=20, r=2, seed=7, dtype=torch.float32))):
        x = torch.randn(45, layer.in_features)
        with torch.no_grad():
            ref = layer(x)
            for block in (16, 32, (32, 16)):
                plan = ExportedGBLR.from_gblr(layer, plan="bsr", block=block)
                got = plan(x)
                torch_path = plan.stage2._torch_matmul(plan.stage1._torch_matmul(x, None, None, None),
                                                       plan.t_order, plan.bias, None)
                errors[f"plan {name} block {block}"] = float((got - ref).abs().max() / ref.abs().max())
                errors[f"plan {name} block {block} vs torch path"] = float((got - torch_path).abs().max())
                plan.bsr_gather = False
                errors[f"plan {name} block {block} copied t"] = float((plan(x) - ref).abs().max() / ref.abs().max())
                plan.stage1.tokens_as_n = not plan.stage1.tokens_as_n
                errors[f"plan {name} block {block} stage 1 flipped"] = float((plan(x) - ref).abs().max() / ref.abs().max())
    print("RESULT " + json.dumps(errors))
    """
)


def test_triton_kernel_under_the_interpreter_matches_dense_and_torch_path():
    errors = interpreted(_KERNEL_CHECKS)
    assert set(errors) >= {"kernel index+bias", "kernel strided out", "kernel no blocks", "kernel tokens as n",
                           "plan learned block 16", "plan random block 32", "plan learned block (32, 16)"}
    for name, error in errors.items():
        assert error < 1e-4, (name, error)


def test_auto_skips_a_bsr_candidate_that_fails(monkeypatch):
    """On a GPU, ``auto`` also times "bsr"; a Triton that rejects its kernel must cost the user
    that candidate (with a warning), not the export."""
    from gsmsearch.structured._export._auto import _fastest

    layer = random_layer(m=64, n=56, K=20, r=2, seed=2, dtype=torch.float32)
    grouped = ExportedGBLR.from_gblr(layer, plan="grouped")
    bsr = ExportedGBLR.from_gblr(layer, plan="bsr", block=16)

    def rejected(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")  # what a Triton compile error looks like

    monkeypatch.setattr(BlockSparseMatrix, "forward", rejected)
    with pytest.warns(UserWarning, match="bsr plan failed"):
        assert _fastest([bsr, grouped]) is grouped
    monkeypatch.setattr(ExportedGBLR, "_run_grouped", rejected)
    with pytest.raises(RuntimeError):  # any other plan's failure is a bug, not skipped
        _fastest([grouped])
