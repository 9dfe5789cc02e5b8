"""Export: turn trained structured layers into inference modules that compute no masks.

For a GBLR layer, :class:`ExportedGBLR` keeps only live components (both intervals non-empty),
crops each to its intervals and runs them as an execution plan of two grouped stages:

    stage 1 (columns):  t[:, group]   = x[:, window] @ V_group        one GEMM per column group
    stage 2 (rows):     y[:, window] += t[:, group'] @ U_group'       one GEMM per row group

A group is a run of components, sorted by interval start, whose factors are zero-padded to the
union of their intervals (its window).  A window that wraps past the end runs as two slices of the
same GEMM (no gathers, no copies of x); between the stages, one column permutation of t (skipped
when the two orders agree).  GEMMs read and write strided slices in place (``addmm(out=...)``).
Plans:
- ``"grouped"``: the run boundaries minimise a measured cost model by dynamic programming over
  the sorted components (per GEMM: window x effective rank + a fixed per-call cost, see
  :class:`PlanCost`), within classes of similar interval length (so the few long components
  of a greedy fit do not pad the many short ones between them to the whole axis);
  stage-1 ranks below 16 are zero-padded to 16 (as fast, and counted).
  Small dense-rule components (h c <= r (h + c)) become factored pieces (their block times an
  identity), so they join groups too.
- ``"factored"``: every live component in one group over the whole axis on both sides (the
  trained layer's own factored form, cropped to live components): two GEMMs, no slicing.
- ``"tiled"``: the dual of grouping: each *axis* is cut into tiles (64..256 elements, chosen per
  stage by the cost model) and each tile runs one GEMM over the components that touch it.  The
  components are ordered by the cyclic centre of their interval, so those touching a tile form a
  short cyclic arc of t's columns (padded with the few in between that do not touch it):

      stage 1:  t[:, arc(tile)]  += x[:, tile] @ V_tile      (arc x tile, accumulated)
      stage 2:  y[:, tile]       += t'[:, arc'(tile)] @ U_tile   (each output tile written once)

  with one column permutation t -> t' between the stage orders.  On structures of many
  mid-width components (a learned layer at f = 0.3: 256 components of 40-80% width) it executes
  about 0.36 of the dense multiply-adds where the factored plan executes 0.5.
- ``"bsr"``: t's columns laid out per stage in the order that stores the fewest blocks (the
  tiled plan's cyclic-centre order, the grouped plan's runs, or by length class first), as two
  block-sparse matrices of (block x block) tiles, each stage one Triton kernel launch on a GPU
  (:class:`~gsmsearch.structured._bsr_matrix.BlockSparseMatrix`; the stage-2 kernel reads t
  through the permutation, so t' is never written).  On a CPU it runs the same blocks in torch:
  correct, slower than "tiled" there.
- ``"auto"`` (``export()``'s default, see :data:`DEFAULT_PLAN`): builds ``"grouped"``,
  ``"factored"`` and ``"tiled"`` (and on a GPU with Triton, ``"bsr"`` at each of
  :data:`BSR_BLOCKS`), times them on a calibration batch and keeps the fastest (the cost model
  alone misjudges strided slices and the permutation on learned structures; timing does not).
- ``"exact"``: only components with identical intervals share a GEMM and small components run
  as dense blocks, so the plan executes exactly the method's count
  (``executed_flops() == flops()``).

:meth:`ExportedGBLR.flops` is the method's count (equal to the trained layer's ``flops()``);
:meth:`ExportedGBLR.executed_flops` is what the plan really runs, padding included.

Layout: :mod:`._layer` (:class:`ExportedGBLR`: building a plan, running it, its accounting),
one module per plan family (:mod:`._grouped`: grouped, factored, exact; :mod:`._tiled`;
:mod:`._bsr`; :mod:`._auto`: timing the candidates), :mod:`._common` (the cost model and what
the plans share) and :mod:`._model` (:func:`export` of a layer or a whole model).
"""
from ._auto import CALIBRATION_TOKENS
from ._bsr import BSR_BLOCK, BSR_BLOCKS
from ._common import PlanCost
from ._layer import DEFAULT_PLAN, EXPORT_PLANS, ExportedGBLR
from ._model import export
from ._tiled import TILE_SIZES

__all__ = ["ExportedGBLR", "PlanCost", "export", "EXPORT_PLANS", "DEFAULT_PLAN", "BSR_BLOCK", "BSR_BLOCKS",
           "TILE_SIZES", "CALIBRATION_TOKENS"]
