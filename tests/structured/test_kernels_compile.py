"""The Triton kernels compile for the GPU the benchmarks target (an H100, sm_90), without one.

CI has no GPU: the interpreter tests (``test_bsr_matrix``, ``test_mask_kernel``) check what the
kernels compute; this checks that the compiler takes them -- the interpreter accepts code the
compiler rejects -- with the specialisations Triton's launcher gives them on a GPU (16-byte
aligned pointers and sizes, unit strides as constants), and that the block-sparse kernel gets
what makes it fast there: tensor-core dots (``warp_group_dot``, Hopper's wgmma) and a software
pipeline (asynchronous copies into shared memory, more than one buffer).  Uses Triton's bundled
``ptxas``; nothing runs.
"""
import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gsmsearch.structured import _bsr_kernel, _mask_kernel
from gsmsearch.structured._common import TRITON_FP_FUSION

H100 = GPUTarget("cuda", 90, 32)


def compile_for_h100(fn, signature: dict, constants: dict, aligned: tuple, **options):
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constants}},
                       constexprs=constants, attrs=attrs)
    return triton.compile(source, target=H100, options={"enable_fp_fusion": TRITON_FP_FUSION, **options})


BSR_SIGNATURE = {"a_ptr": "*bf16", "index_ptr": "*i32", "blocks_ptr": "*bf16", "pointers_ptr": "*i32",
                 "rows_ptr": "*i32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "K": "i32",
                 "N": "i32", "stride_am": "i32", "stride_ak": "i32", "stride_om": "i32", "stride_on": "i32"}


@pytest.mark.parametrize("block,tokens_as_n", [((128, 32), False), ((32, 128), False), ((128, 128), False),
                                               ((128, 64), True)])
@pytest.mark.parametrize("gather", [False, True])
def test_bsr_kernel_compiles_to_pipelined_wgmma(block, tokens_as_n, gather):
    BK, BN = block
    kernel = compile_for_h100(
        _bsr_kernel._kernel, BSR_SIGNATURE,
        {"stride_ak": 1, "stride_on": 1, "GATHER": gather, "HAS_BIAS": True, "TOKENS_AS_N": tokens_as_n,
         "BM": 128, "BK": BK, "BN": BN},
        aligned=tuple(n for n in BSR_SIGNATURE if n not in ("stride_ak", "stride_on")),
        num_warps=8 if BN >= 128 and not tokens_as_n else 4, num_stages=3)
    ttgir = kernel.asm["ttgir"]
    assert kernel.asm["cubin"]
    assert "warp_group_dot" in ttgir
    assert ttgir.count("async_copy_global_to_local") >= 2
    one_stage = 2 * (128 * BK + BK * BN)  # bf16 A and B tiles, one buffer each
    assert kernel.metadata.shared > one_stage  # more than one buffer: loads overlap the dots
    if not gather:  # contiguous A tiles: both operands double-buffered
        assert kernel.metadata.shared >= 2 * one_stage


def test_mask_kernels_compile():
    masked = compile_for_h100(
        _mask_kernel._masked_kernel,
        {"factors_ptr": "*fp32", "prefix_ptr": "*fp32", "upper_ptr": "*i64", "lower_ptr": "*i64",
         "wraps_ptr": "*fp32", "out_ptr": "*bf16", "R": "i32", "D": "i32"},
        {"BD": 1024}, aligned=("factors_ptr", "out_ptr", "D"))
    grads = compile_for_h100(
        _mask_kernel._side_grads_kernel,
        {"d_masked_ptr": "*bf16", "factors_ptr": "*fp32", "prefix_ptr": "*fp32", "q_ptr": "*fp32",
         "upper_ptr": "*i64", "lower_ptr": "*i64", "wraps_ptr": "*fp32", "d_factors_ptr": "*fp32",
         "d_width_ptr": "*fp32", "d_location_ptr": "*fp32", "R": "i32", "D": "i32"},
        {"BD": 1024}, aligned=("d_masked_ptr", "factors_ptr", "d_factors_ptr", "D"))
    for kernel in (masked, grads):
        assert kernel.asm["cubin"]
        assert "ld.global" in kernel.asm["ptx"] and "st.global" in kernel.asm["ptx"]
