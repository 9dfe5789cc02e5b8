"""Mixed precision (``precision: bf16``, CPU autocast here): every family trains close to
float32; the GBLR widths, locations, masks and budget step stay float32; exported and saved
bf16 models are the float32 ones rounded once; a bf16 study runs end to end and records its
precision; fp16 is refused on CPUs.

Tolerances: bfloat16 keeps 8 significant bits, so rounding an operand moves it by at most
2^-9 = 0.2% of itself; CPU bf16 GEMMs accumulate in float32, so a layer's output is off by about
that much, relative, and a mean loss over a batch averages such errors.  Over the 18 steps
below the relative train-loss difference stayed under 1e-3 for every family (GBLR: 9e-4, its
rounded intervals can land on the other grid point; the others 1e-4 at most), and the tests
allow 1e-2: ten times what was seen, and far below what a lost term or a wrong update does."""
import copy

import optuna
import pytest
import torch
import yaml

from gsmsearch.structured import GBLRLinear, ProjectFlops, export, family_names, gblr_layers
from gsmsearch.trainer import TrainingLoop, TrialConfig, TrialFailed, run_trial
from gsmsearch.trainer._config import resolve_precision
from gsmsearch.trainer._trial import build_trial_model
from gsmsearch.workloads import get_workload
from torch.utils._python_dispatch import TorchDispatchMode

FAMILIES = ["dense"] + [f for f in family_names() if f != "dense"]
WORKLOAD = dict(hidden_sizes=[64, 64])


@pytest.fixture(scope="module")
def digits():
    workload = get_workload("digits-mlp", **WORKLOAD)
    return workload, workload.load_data(seed=0)


def _train(digits, family, precision, *, epochs=2, controller=None, **extra):
    workload, splits = digits
    model = build_trial_model(TrialConfig(workload="digits-mlp", workload_options=WORKLOAD, family=family,
                                          budget=0.5, epochs=epochs), workload)
    loop = TrainingLoop(workload, model, splits, epochs=epochs, batch_size=128, lr=3e-3, structure_lr=5e-3,
                        controller=controller, precision=precision, **extra)
    with _GemmDtypes() as gemms:
        curves = loop.run()
    return loop, curves, gemms.dtypes


class _GemmDtypes(TorchDispatchMode):
    """The dtypes of every matrix product (mm, bmm, addmm, ...) run inside it, forward and backward."""

    GEMMS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "_addmm_activation"}

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in self.GEMMS:
            self.dtypes.add(out.dtype)
        return out


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_training_of_every_family_stays_near_float32(digits, family):
    """2 epochs x 9 steps of each family in float32 and under CPU bf16 autocast, from the same
    init and data order: per-epoch train loss and validation loss within 1e-2 relative (see the
    module docstring), while every matrix product (forward and backward) ran in bf16 and the
    weights and optimizer state stayed float32."""
    _, fp32, fp32_dtypes = _train(digits, family, "fp32")
    loop, bf16, bf16_dtypes = _train(digits, family, "bf16")
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in loop.model.parameters())  # master weights
    assert all(v.dtype == torch.float32 for s in loop.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.is_floating_point())
    for a, b in zip(fp32, bf16):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-2 * a["train_loss"], (a, b)
        assert abs(a["val"]["loss"] - b["val"]["loss"]) <= 1e-2 * a["val"]["loss"], (a, b)
    # not trivially equal: bf16 rounding did change the trajectory
    assert any(a["train_loss"] != b["train_loss"] for a, b in zip(fp32, bf16))


def test_gblr_structure_masks_and_budget_step_stay_float32_under_bf16(digits, monkeypatch):
    """Under bf16 autocast the GBLR layers' GEMMs run in bf16, but the masks (prefix-sum
    tables, mask values, the width/location gradients) are computed in float32, the widths and
    locations stay float32 parameters, and the FLOPs projection after each step meets the budget."""
    import gsmsearch.structured._gblr_autograd as autograd_module
    import gsmsearch.structured._mask as mask_module

    seen = {"tables": set(), "masks": set(), "mask_grads": set(), "autocast_around": set()}
    tables, forward, backward = mask_module._index_tables, autograd_module.index_mask_forward, \
        autograd_module.index_mask_backward

    def recorded_tables(n, sigma, dtype, device):
        seen["tables"].add(dtype)
        return tables(n, sigma, dtype, device)

    def recorded_forward(width, *args, **kwargs):
        out = forward(width, *args, **kwargs)
        seen["masks"].add(out[0].dtype)
        return out

    def recorded_backward(grad_mask, *args, **kwargs):
        out = backward(grad_mask, *args, **kwargs)
        seen["mask_grads"].update(g.dtype for g in out if g is not None)
        return out

    monkeypatch.setattr(mask_module, "_index_tables", recorded_tables)
    monkeypatch.setattr(autograd_module, "index_mask_forward", recorded_forward)
    monkeypatch.setattr(autograd_module, "index_mask_backward", recorded_backward)
    controller = ProjectFlops(0.3)
    loop, curves, dtypes = _train(digits, "gblr", "bf16", controller=controller)
    assert dtypes == {torch.bfloat16}  # every GEMM, the GBLR layers' included
    assert seen["tables"] == seen["masks"] == seen["mask_grads"] == {torch.float32}
    layers = gblr_layers(loop.model)
    assert layers and all(l.widths.dtype == l.locations.dtype == torch.float32 for l in layers)
    assert all(l.widths.grad is None or l.widths.grad.dtype == torch.float32 for l in layers)
    assert curves[-1]["relative_flops"] <= 0.3 + 1e-9  # the float32 projection met the budget
    for layer in layers:
        widths, locations = layer.widths.detach(), layer.locations.detach()
        assert float(widths.min()) >= 0 and float(widths.max()) <= 1
        assert float(locations.min()) >= 0 and float(locations.max()) < 1


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("plan", ["grouped", "factored", "tiled", "exact"])
def test_bf16_export_is_the_float32_export_to_bf16_rounding(digits, plan):
    """``export(model, dtype=torch.bfloat16)``: every floating tensor bf16, each weight the
    float32 plan's rounded once (bit-equal to rounding it), the same intervals (the plan was
    built from the float32 widths); outputs within 2e-2 of float32 (three roundings -- input,
    weights, the intermediate -- of 2^-9 each, plus the output's: 0.8% at most, normwise less;
    0.2-0.7% seen).  Under autocast the float32 plan runs in its own dtype."""
    workload, splits = digits
    loop, _, _ = _train(digits, "gblr", "fp32", epochs=1)
    model = loop.model
    from gsmsearch.structured import set_sigma

    set_sigma(model, None)
    full = export(model, plan=plan)
    half = export(model, plan=plan, dtype=torch.bfloat16)
    floats = [t for t in list(half.parameters()) + list(half.buffers()) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    for (name, a), (_, b) in zip(full.named_parameters(), half.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    x = next(iter(splits.loader("val", 200, shuffle=False)))[0]
    with torch.no_grad():
        reference = full(x)
        assert _relative(half(x.to(torch.bfloat16)), reference) < 2e-2
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the fp32 plan under autocast (trial evaluation)
            mixed = full(x)
        assert _relative(mixed, reference) < 2e-2
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        export(model, dtype=torch.int8)


def test_bf16_save_keeps_widths_float32_and_loads_in_bf16(digits, tmp_path):
    """``save(model, path, dtype=torch.bfloat16)``: the factors stored bf16 (bit-equal to
    rounding them), widths and locations float32 and exact; ``load`` returns those dtypes and
    the same intervals; a smaller file."""
    import gsmsearch

    workload, _ = digits
    loop, _, _ = _train(digits, "gblr", "fp32", epochs=1)
    model = loop.model
    full_path = gsmsearch.save(model, tmp_path / "fp32.safetensors")
    half_path = gsmsearch.save(model, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert half_path.stat().st_size < 0.7 * full_path.stat().st_size
    loaded = gsmsearch.load(half_path, workload.build_model)
    original = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        if name.endswith(("widths", "locations")):
            assert p.dtype == torch.float32 and torch.equal(p, original[name]), name
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p, original[name].detach().to(torch.bfloat16)), name
    for a, b in zip(gblr_layers(model), gblr_layers(loaded)):
        assert torch.equal(a.interval_lengths(), b.interval_lengths())
        assert torch.equal(a.interval_starts(), b.interval_starts())


def test_fp16_on_cpu_is_refused_with_a_reason(tmp_path):
    """fp16 needs CUDA (CPU autocast is bf16): the spec is refused at validation, naming the
    field, exit 2, nothing written; a trial config asking for it on a CPU fails before training."""
    from gsmsearch.cli import main

    from tests.search.conftest import TINY_SPEC

    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({**TINY_SPEC, "precision": "fp16"}))
    assert main(["launch", str(spec), "--dry-run"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(TrialFailed, match="fp16 needs a CUDA device"):
        run_trial(TrialConfig(workload="digits-mlp", family="lowrank", epochs=1, precision="fp16",
                              measure_latency=False))
    with pytest.raises(ValueError, match="precision must be one of"):
        TrialConfig(precision="fp64")
    assert resolve_precision("auto", "cpu") == "fp32"  # CPU default


def test_fp16_spec_error_names_the_field(capsys, tmp_path):
    from gsmsearch.search import SpecError
    from gsmsearch.search._spec import spec_from_dict

    from tests.search.conftest import TINY_SPEC

    with pytest.raises(SpecError, match=r"precision: fp16 needs GPU trials"):
        spec_from_dict({**TINY_SPEC, "precision": "fp16"})
    with pytest.raises(SpecError, match=r"precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"):
        spec_from_dict({**TINY_SPEC, "precision": "fp64"})
    assert spec_from_dict({**TINY_SPEC, "precision": "fp16", "resources": {"gpus_per_trial": 1}}).precision == "fp16"


def test_precision_at_its_default_leaves_config_digests_unchanged():
    """A config at ``precision: auto`` hashes as one without the field (digests stored with a
    study's trials stay valid); another precision is another configuration."""
    import dataclasses
    import hashlib
    import json

    config = TrialConfig(family="lowrank")
    data = {k: v for k, v in config.to_dict().items()
            if k not in ("device", "measure_latency", "latency_batch", "precision")}
    without = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert config.digest() == without
    assert dataclasses.replace(config, precision="bf16").digest() != without


def test_bf16_study_runs_end_to_end_and_records_its_precision(tmp_path, capsys):
    """A tiny digits study with ``precision: bf16`` on a real local Ray and SQLite: every trial
    completes, with bf16 in its recorded config and in its result's resolved values."""
    from gsmsearch.cli import main

    from tests.search.conftest import TINY_SPEC

    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump({**TINY_SPEC, "name": "bf16", "precision": "bf16", "trials": 2,
                                    "workload": {**TINY_SPEC["workload"], "epochs": 1}}))
    assert main(["launch", str(spec), "--status-interval", "60"]) == 0
    study = optuna.load_study(study_name="bf16", storage=f"sqlite:///{tmp_path / 'bf16.db'}")
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    for trial in complete:
        assert trial.user_attrs["config"]["precision"] == "bf16"
        assert trial.user_attrs["result"]["resolved"]["precision"] == "bf16"
        assert 0 < trial.values[0] <= 1


def test_dense_start_is_keyed_on_its_precision(monkeypatch):
    """The dense model a fine-tune trial starts from is trained at the trial's precision, so its
    cache key holds the precision -- left out for fp32, whose keys stay those of a recipe
    without it."""
    from gsmsearch.trainer import _trial

    recipes = {}

    def captured(workload, *, seed, recipe, train, cache_dir=None):
        recipes[len(recipes)] = dict(recipe)
        return {}

    monkeypatch.setattr(_trial, "cached_dense_state", captured)
    workload = get_workload("digits-mlp", **WORKLOAD)
    _trial.dense_state(workload, seed=0)
    _trial.dense_state(workload, seed=0, precision="fp32")
    _trial.dense_state(workload, seed=0, precision="bf16")
    assert "precision" not in recipes[0] and recipes[0] == recipes[1]
    assert recipes[2] == {**recipes[0], "precision": "bf16"}


def test_precision_step_benchmark_smoke(tmp_path, capsys):
    """``bench/precision_step.py`` (run by ``bench/gpu.sh`` after ``bench.gpu``): skipped without
    CUDA unless ``--smoke``; the smoke run reports fp32 and bf16 for each family, fp32 as the
    reference, and bf16's loss after the same steps within the training tolerance above."""
    from bench import precision_step

    if not torch.cuda.is_available():
        assert precision_step.main(["--out", str(tmp_path / "gpu.json")]) == 0
        assert "skipped" in capsys.readouterr().out and not list(tmp_path.iterdir())
    assert precision_step.main(["--smoke", "--repeats", "1", "--out", str(tmp_path / "gpu.json")]) == 0
    import json

    report = json.loads((tmp_path / "gpu-smoke-precision.json").read_text())
    assert set(report["results"]) == {"dense", "gblr", "lowrank"}
    for family, entries in report["results"].items():
        assert {"fp32", "bf16"} <= set(entries)
        assert entries["fp32"]["ms_vs_fp32"] == 1.0 and entries["fp32"]["loss_rel_diff_vs_fp32"] == 0.0
        assert 0 < entries["bf16"]["loss_rel_diff_vs_fp32"] < 1e-2, (family, entries)


_BF16_KERNELS = '''
import json, torch
import gsmsearch.structured._gblr_autograd as autograd_module
import gsmsearch.structured._mask as mask_module
from gsmsearch.structured import GBLRLinear

tables = set()
flat, index_tables = autograd_module.flat_index_tables, mask_module._index_tables
def flat_recorded(n, sigma, dtype, device):
    tables.add(str(dtype)); return flat(n, sigma, dtype, device)
def index_recorded(n, sigma, dtype, device):
    tables.add(str(dtype)); return index_tables(n, sigma, dtype, device)
autograd_module.flat_index_tables = flat_recorded
mask_module._index_tables = index_recorded

torch.manual_seed(0)
reference = GBLRLinear(40, 48, num_components=12, sigma=2.0)
with torch.no_grad():
    reference.widths.copy_(torch.rand(2, 12) * 0.8 + 0.1)
    reference.locations.copy_(torch.rand(2, 12))
layer = GBLRLinear(40, 48, num_components=12, sigma=2.0)
layer.load_state_dict(reference.state_dict())
layer.to(torch.bfloat16)  # the factors and bias in bf16; widths and locations stay float32
with torch.no_grad():  # the float32 reference holds the same (bf16-rounded) factors
    for name in ("row_factors", "col_factors", "bias"):
        getattr(reference, name).copy_(getattr(layer, name).float())
dtypes = {name: str(p.dtype) for name, p in layer.named_parameters()}
x = torch.randn(37, 40).to(torch.bfloat16)
target = torch.randn(37, 48)
runs = {}
for name, module, kernels in (("kernels", layer, True), ("torch", layer, False), ("fp32", reference, False)):
    module.use_kernels = kernels
    module.zero_grad()
    xi = (x.float() if name == "fp32" else x).clone().requires_grad_(True)
    y = module(xi)
    (y.float() * target).sum().backward()
    runs[name] = [y.detach().float(), xi.grad.float()] + [p.grad.float() for p in module.parameters()]
    runs[name + " grad dtypes"] = sorted({str(p.grad.dtype) for p in (module.widths, module.locations)})
def error(a, b):
    return max(float((u - v).norm() / v.norm().clamp_min(1e-12)) for u, v in zip(a, b))
print("RESULT " + json.dumps({
    "dtypes": dtypes, "tables": sorted(tables),
    "structure_grad_dtypes": runs["kernels grad dtypes"] + runs["torch grad dtypes"],
    "kernels_vs_torch": error(runs["kernels"], runs["torch"]),
    "kernels_vs_fp32": error(runs["kernels"], runs["fp32"]),
    "torch_vs_fp32": error(runs["torch"], runs["fp32"])}))
'''


def test_gblr_with_bf16_factors_keeps_float32_structure_on_both_paths():
    """A GBLR layer cast to bf16 (a bf16 checkpoint being fine-tuned): its widths and locations
    stay float32, and the Triton kernels (CPU interpreter) and the torch ops both build masks,
    prefix-sum tables and width/location gradients in float32 while the factors, input and
    GEMMs are bf16.  Against the float32 layer holding the same bf16-rounded factors: within 3e-2
    normwise (bf16 rounding of the input products and of the masked factors, 2^-9 each, over
    the GEMMs' outputs and the gradients; the interpreter rounds its bf16 stores toward zero,
    the torch ops to nearest, see tests/structured/test_mask_kernel.py)."""
    from tests.structured.interpreter import interpreted

    result = interpreted(_BF16_KERNELS)
    assert result["dtypes"] == {"widths": "torch.float32", "locations": "torch.float32",
                                "row_factors": "torch.bfloat16", "col_factors": "torch.bfloat16",
                                "bias": "torch.bfloat16"}
    assert result["tables"] == ["torch.float32"]
    assert result["structure_grad_dtypes"] == ["torch.float32", "torch.float32"]
    assert result["kernels_vs_torch"] < 3e-2
    assert result["kernels_vs_fp32"] < 3e-2 and result["torch_vs_fp32"] < 3e-2


def test_loss_scaler_steps_skip_overflows_and_resume_with_their_scale(tmp_path):
    """The fp16 step's wiring (``TrainingLoop._backward_step`` through a GradScaler; fp16 itself
    needs CUDA, so a CPU GradScaler under bf16 autocast stands in): with a power-of-two scale the
    scaled steps are bit-identical to unscaled ones, a step whose loss overflows leaves every
    weight as it was and halves the scale, and the scale is checkpointed and resumed."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    plain = TrainingLoop(None, copy.deepcopy(model), None, epochs=1, batch_size=4, lr=1e-2, precision="bf16")
    scaled = TrainingLoop(None, model, None, epochs=1, batch_size=4, lr=1e-2, precision="bf16",
                          checkpoint_path=tmp_path / "last.pt", checkpoint_tag="t")
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(32, 8)

    def step(loop, factor=1.0):
        with loop.autocast():
            loss = loop.model(x).float().pow(2).mean() * factor
        loop._backward_step(loss)

    for _ in range(3):
        step(plain)
        step(scaled)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), scaled.model.parameters()))
    before = [p.detach().clone() for p in scaled.model.parameters()]
    step(scaled, float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.model.parameters()))
    assert scaled.scaler.get_scale() == 2.0 ** 9
    scaled._save_checkpoint(1)
    resumed = TrainingLoop(None, copy.deepcopy(model), None, epochs=1, batch_size=4, lr=1e-2, precision="bf16",
                           checkpoint_path=tmp_path / "last.pt", checkpoint_tag="t")
    resumed.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    resumed._maybe_resume()
    assert resumed.scaler.get_scale() == 2.0 ** 9 and resumed.start_epoch == 1
