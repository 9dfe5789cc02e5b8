"""The Triton kernels of GBLR's training step (``_mask_kernel``, used on a GPU) compute the same
forward and gradients as the torch path and as the frequency-domain reference.

CI has no GPU: the kernels run under Triton's CPU interpreter in a fresh process.  Tolerances:
float64 1e-12 relative to the reference (the kernels do the torch path's arithmetic in the same
order: 1e-14 seen), float32 1e-4 (2e-5 seen); bfloat16 autocast 3e-2 normwise against the torch
path (0.8% seen: the interpreter rounds its bfloat16 stores toward zero where the GPU and torch
round to nearest, one unit in the last place apart), which checks the plumbing, while
``bench/gpu.sh`` compares bfloat16 on the GPU itself.
"""
import textwrap

import pytest

from .interpreter import interpreted

_CHECKS = textwrap.dedent(
    """
    import json, torch
    from gsmsearch.structured._gblr_autograd import kernels_work
    from tests.structured.test_fast_paths import random_layer, reference_forward

    assert kernels_work(torch.device("cpu"))  # the once-per-device check passes (and is done)
    PARAMS = ("widths", "locations", "row_factors", "col_factors", "bias")

    def gradients(layer, x, target, kernels, forward=None):
        layer.use_kernels = kernels
        launched = []
        if kernels:  # count that the kernels really ran
            import gsmsearch.structured._mask_kernel as kernel_module
            for name in ("masked_factors_kernel", "side_grads_kernel"):
                original = getattr(kernel_module, name)
                def counted(*args, _original=original, _name=name, **kwargs):
                    launched.append(_name)
                    return _original(*args, **kwargs)
                setattr(kernel_module, name, counted)
        try:
            layer.zero_grad()
            x.grad = None
            y = (forward or layer)(x)
            (y * target).sum().backward()
            grads = [getattr(layer, p).grad.clone() for p in PARAMS] + ([x.grad.clone()] if x.requires_grad else [])
            return y.detach(), grads, launched
        finally:
            if kernels:
                import importlib
                importlib.reload(kernel_module)

    def error(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    errors, launches = {}, {}
    for dtype in (torch.float64, torch.float32):
        for sigma in (None, 3.0):
            for path in ("factored", "factored-recompute", "dense-build"):
                for input_grad in (True, False):
                    layer = random_layer(seed=3, sigma=sigma, dtype=dtype)
                    layer._use_factored = lambda *a: path.startswith("factored")
                    layer.recompute_intermediate = path == "factored-recompute"
                    x = torch.randn(37, 40, dtype=dtype, requires_grad=input_grad)
                    target = torch.randn(37, 48, dtype=dtype)
                    y, got, launched = gradients(layer, x, target, True)
                    y_torch, torch_path, _ = gradients(layer, x, target, False)
                    y_ref, ref, _ = gradients(layer, x, target, False, lambda v: reference_forward(layer, v))
                    key = f"{str(dtype)[6:]} sigma={sigma} {path} input_grad={input_grad}"
                    errors[key] = max([error(y, y_ref)] + [error(a, b) for a, b in zip(got, ref)])
                    errors[key + " vs torch path"] = max([error(y, y_torch)] + [error(a, b) for a, b in zip(got, torch_path)])
                    launches[key] = launched
    # widths outside [0, 1] (whole periods) and a dead component, float64
    layer = random_layer(m=20, n=12, K=5, r=1, seed=5, sigma=2.0)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[1.25, -0.35, 0.3, 0.0, 0.6], [0.4, 2.0, 0.0, 0.0, 0.5]], dtype=torch.float64))
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(9, 20, dtype=torch.float64)
    y, got, launched = gradients(layer, x, target, True)
    y_torch, torch_path, _ = gradients(layer, x, target, False)
    errors["float64 off-range widths vs torch path"] = max([error(y, y_torch)] + [error(a, b) for a, b in zip(got, torch_path)])
    launches["off-range"] = launched
    # bfloat16 autocast: the plumbing (bf16 stores from the kernels, bf16 GEMMs), normwise; the
    # interpreter rounds bf16 stores toward zero, the torch path to nearest
    layer = random_layer(seed=3, sigma=2.0, dtype=torch.float32)
    x = torch.randn(37, 40)
    outs = []
    for kernels in (True, False):
        layer.use_kernels = kernels
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        outs.append([y.detach().float()] + [getattr(layer, p).grad.clone() for p in PARAMS])
    bf16 = max(float((a - b).norm() / b.norm()) for a, b in zip(*outs))
    print("RESULT " + json.dumps({"errors": errors, "launches": launches, "bf16": bf16}))
    """
)


def test_training_kernels_under_the_interpreter_match_reference_and_torch_path():
    result = interpreted(_CHECKS, timeout=600)
    errors, launches = result["errors"], result["launches"]
    assert result["bf16"] < 3e-2  # bf16 rounding (0.8% seen), not a wrong dtype or a lost term
    assert len(errors) == 2 * 2 * 2 * 3 * 2 + 1
    for name, err in errors.items():
        tolerance = 1e-12 if name.startswith("float64") else 1e-4
        assert err < tolerance, (name, err)
    # forward: one masked-factors launch per side; backward: both sides rebuilt once more (the
    # dense-build path's Vm only, the factored path both), one gradient launch per side
    for name, launched in launches.items():
        assert launched.count("side_grads_kernel") == 2, (name, launched)
        assert launched.count("masked_factors_kernel") == 4, (name, launched)


_SYNC_FREE = textwrap.dedent(
    """
    import json, torch
    import gsmsearch.structured._gblr as gblr_module
    from tests.structured.test_fast_paths import random_layer

    PARAMS = ("widths", "locations", "row_factors", "col_factors", "bias")

    def step(layer, x, target, sync_free):
        layer.sync_free = sync_free
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        (y * target).sum().backward()
        return [y.detach()] + [getattr(layer, p).grad.clone() for p in PARAMS] + (
            [x.grad.clone()] if x.requires_grad else [])

    def no_host_read(*args, **kwargs):
        raise AssertionError("the sync-free path read the widths to the host")

    errors, dead_grads = {}, {}
    for sigma in (None, 2.0):
        for path in ("factored", "dense-build"):
            for input_grad in (True, False):
                layer = random_layer(seed=4, sigma=sigma)  # component 0 dead, 1 one side empty
                with torch.no_grad():
                    layer.widths[:, 5] = -0.2  # negative on both sides: dead as well
                layer._use_factored = lambda *a: path == "factored"
                x = torch.randn(23, 40, dtype=torch.float64, requires_grad=input_grad)
                target = torch.randn(23, 48, dtype=torch.float64)
                dropped = step(layer, x, target, False)
                original = gblr_module.live_grid_rows
                gblr_module.live_grid_rows = no_host_read
                try:
                    every = step(layer, x, target, True)
                finally:
                    gblr_module.live_grid_rows = original
                key = f"sigma={sigma} {path} input_grad={input_grad}"
                errors[key] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
                                  for a, b in zip(every, dropped))
                # the dead components' gradients: exact zeros on both paths
                dead_grads[key] = max(float(g[..., k].abs().max()) if g.dim() == 2 else float(g[k].abs().max())
                                      for g in (every[1], every[2], every[3], every[4],
                                                dropped[1], dropped[2], dropped[3], dropped[4])
                                      for k in (0, 5))
    print("RESULT " + json.dumps({"errors": errors, "dead_grads": dead_grads}))
    """
)


def test_sync_free_path_computes_what_dropping_dead_components_does():
    """``layer.sync_free`` (Triton path, no host read of the widths): every component runs, the
    dead ones (zero or negative widths on both sides) with zero masks -- the same output and
    gradients as dropping them, float64, both evaluation orders, with and without input grad,
    and without calling the host read at all."""
    result = interpreted(_SYNC_FREE)
    assert len(result["errors"]) == 8
    for name, err in result["errors"].items():
        assert err < 1e-12, (name, err)
    for name, largest in result["dead_grads"].items():
        assert largest == 0.0, (name, largest)


_LAUNCHES = textwrap.dedent(
    """
    import collections, json, torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from gsmsearch.structured import GBLRLinear
    import gsmsearch.structured._mask_kernel as kernel_module

    VIEWS = {"view", "reshape", "t", "transpose", "detach", "as_strided", "select", "slice",
             "expand", "unsqueeze", "alias", "_unsafe_view", "permute", "squeeze"}
    inside_kernel = [False]  # pauses the count (kernels, host-side code)
    triton_launches = collections.Counter()

    class Ops(TorchDispatchMode):  # aten ops that launch work (views excluded)
        def __init__(self):
            super().__init__()
            self.count = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] not in VIEWS and not inside_kernel[0]:
                self.count += 1
            return func(*args, **(kwargs or {}))

    for name in ("masked_factors_kernel", "side_grads_kernel"):
        def launcher(*args, _original=getattr(kernel_module, name), _name=name, **kwargs):
            triton_launches[_name] += 1
            inside_kernel[0] = True  # the interpreter's own bookkeeping is not counted
            try:
                return _original(*args, **kwargs)
            finally:
                inside_kernel[0] = False
        setattr(kernel_module, name, launcher)

    import gsmsearch.structured._gblr as gblr_module

    def host_side(*args, _original=gblr_module.live_grid_rows):
        # on a GPU: one cat and one read on the device, the rest on the host, one copy back
        ops.count += 3
        inside_kernel[0] = True
        try:
            return _original(*args)
        finally:
            inside_kernel[0] = False
    gblr_module.live_grid_rows = host_side

    x = torch.randn(64, 48, requires_grad=True)
    counts = {}
    for label, module in (("linear", torch.nn.Linear(48, 96)),
                          ("kernels", GBLRLinear(48, 96, num_components=48, sigma=2.0)),
                          ("torch ops", GBLRLinear(48, 96, num_components=48, sigma=2.0))):
        if label != "linear":
            module.use_kernels = label == "kernels"
        for _ in range(2):  # the second step: gradients accumulate, caches are warm
            module.zero_grad(set_to_none=True)
            x.grad = None
            triton_launches.clear()
            if label != "linear":  # as an optimizer step would: the structure is read again
                with torch.no_grad():
                    module.widths.add_(0.0)
            with Ops() as ops:
                module(x).sum().backward()
        counts[label] = {"aten": ops.count, "triton": sum(triton_launches.values())}
    print("RESULT " + json.dumps(counts))
    """
)


def test_training_step_launches_far_fewer_ops_with_the_kernels():
    """What the kernels are for: a training step of small, launch-bound work.  Counted, not
    timed (CI has no GPU): aten ops that launch work plus Triton launches per forward+backward."""
    counts = interpreted(_LAUNCHES)
    kernels, torch_ops, linear = counts["kernels"], counts["torch ops"], counts["linear"]
    assert torch_ops["triton"] == 0 and linear["triton"] == 0
    assert kernels["triton"] == 6  # 2 masked factors forward, 2 rebuilt + 2 gradients backward
    launches = kernels["aten"] + kernels["triton"]
    assert launches * 3 < torch_ops["aten"], counts
    assert launches <= 5 * linear["aten"], counts


def test_kernels_that_fail_on_a_device_fall_back_to_torch_ops(monkeypatch):
    """A Triton that rejects the training kernels (checked once per device by a tiny forward and
    backward) costs a warning and the torch ops, not the training run."""
    import torch

    import gsmsearch.structured._gblr as gblr_module
    import gsmsearch.structured._gblr_autograd as autograd_module
    import gsmsearch.structured._mask_kernel as kernel_module

    from .test_fast_paths import random_layer, reference_forward

    def rejected(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(autograd_module, "triton_runs", lambda t: True)  # as if on a GPU
    monkeypatch.setattr(gblr_module, "triton_runs", lambda t: True)
    monkeypatch.setattr(kernel_module, "masked_factors_kernel", rejected)
    monkeypatch.setattr(autograd_module, "_KERNELS_WORK", {})
    layer = random_layer(seed=1, sigma=2.0)
    x = torch.randn(7, 40, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match="Triton kernels failed on cpu"):
        y = layer(x)
    y.sum().backward()
    assert autograd_module._KERNELS_WORK == {"cpu": False}
    grads = [layer.widths.grad.clone(), x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    expected = reference_forward(layer, x)
    expected.sum().backward()
    assert torch.allclose(y, expected, atol=1e-10)
    assert torch.allclose(grads[0], layer.widths.grad, atol=1e-8) and torch.allclose(grads[1], x.grad, atol=1e-8)
