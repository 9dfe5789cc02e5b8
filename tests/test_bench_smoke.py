"""The benchmark scripts run (tiny sizes) and report what they claim to measure.  No speed is
asserted here (speed targets live in bench/RESULTS.md); memory accounting and numerical
agreement are, since they do not depend on the machine's load."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_cpu_bench_quick_train_step_reports_time_and_memory(tmp_path):
    out = tmp_path / "cpu.json"
    done = run(["-m", "bench", "--quick", "--threads", "1", "--skip", "export", "baselines",
                "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "x Linear" in done.stdout
    for train in report["train"]:
        results = train["results"]
        assert results["nn.Linear"]["wall_ratio"] == 1.0
        assert all(r["wall_ms"] > 0 for r in results.values())
        kept = {name: m["saved_for_backward_mib"] for name, m in train["tensor_memory_mib"].items()}
        fused, unfused = kept["gblr sigma=5"], kept["gblr sigma=5 unfused"]
        assert kept["nn.Linear"] == 0.0
        # the fused Function keeps at most the intermediate; the unfused composition also kept
        # both masks and both masked factors
        assert fused < unfused
        assert kept["gblr sigma=5 recompute intermediate"] <= fused


def test_gpu_bench_skips_without_cuda_and_smoke_runs_anywhere(tmp_path):
    import torch

    if not torch.cuda.is_available():
        skipped = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120, env={**os.environ, "PYTHON": sys.executable})
        assert skipped.returncode == 0 and "skipped" in skipped.stdout
    out = tmp_path / "gpu.json"
    done = run(["-m", "bench.gpu", "--smoke", "--repeats", "2", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert report["train"]["fused_vs_unfused_grad_error"] < 1e-4
    assert set(report["train"]["memory"]) >= {"nn.Linear", "gblr", "gblr unfused"}
    assert report["export"] and all(max(r["relative_error"].values()) < 1e-4 for r in report["export"])
    assert any(plan.startswith("bsr") for plan in report["export"][0]["speedups"])
    assert report["train"]["kernels_vs_torch_ops_grad_error_fp32"] < 1e-4
    assert report["train"]["sync_free_vs_gblr_grad_error"] < 1e-4
    # what the run decides: each one from the numbers above it
    decided = report["decisions"]
    ratios = report["train"]["ratio_vs_linear"]
    assert decided["training"]["faster"] == min(("gblr", "gblr sync-free"), key=ratios.get)
    best = max((n for n in report["export"][0]["speedups"] if n.startswith("bsr")),
               key=lambda n: decided["bsr"]["geomean_speedup"][n])
    assert decided["bsr"]["best"] == best
    for r in report["export"]:
        assert decided["targets"][r["structure"]]["met"] == (r["speedup"] >= 0.6 / r["f"])


def test_live_only_structures_keep_function_and_cost(tmp_path):
    """The GPU run's prepared real structures are saved with dead components dropped: same
    function, same structure, same FLOPs, read back intact."""
    import torch

    from bench import structures
    from tests.structured.test_fast_paths import learned_layer

    layer = learned_layer(budget=0.2)
    layer.bias.data.normal_()
    assert layer.live_components().numel() < layer.num_components  # something to drop
    compact = structures.live_only(layer)
    path = str(tmp_path / "layer.pt")
    structures.save_layer(compact, path, {"kind": "test"})
    loaded = structures.load_layer(path)
    assert loaded.num_components == layer.live_components().numel()
    assert loaded.flops() == layer.flops()
    x = torch.randn(17, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(loaded(x), layer(x), atol=1e-5)
    assert loaded.structure_summary()["intervals"] == layer.structure_summary()["intervals"]
