"""The trial trainer on tiny digits models: results, determinism, checkpoints, cache, failures."""
import json
import math
import multiprocessing
import subprocess
import sys

import pytest
import torch

from gsmsearch.structured import DenseLinear, GBLRLinear, ProjectFlops, StructuredLinear
from gsmsearch.trainer import TrialConfig, TrialFailed, build_trial_model, dense_state, layer_budgets, run_trial
from gsmsearch.trainer._loop import TrainingLoop, lr_factor
from gsmsearch.workloads import get_workload

TINY = {"hidden_sizes": [32, 32]}


def tiny(**overrides):
    base = dict(workload="digits-mlp", workload_options=TINY, epochs=2, batch_size=64, lr=3e-3,
                measure_latency=False)
    base.update(overrides)
    return TrialConfig(**base)


def test_gblr_trial_result_is_complete_and_flops_add_up(tmp_path):
    result = run_trial(tiny(family="gblr", budget=0.3, epochs=3), cache_dir=tmp_path)
    assert 0.0 <= result.quality <= 1.0 and result.quality > 0.3  # learned something
    assert result.epochs_run == 3 and len(result.curves) == 3
    assert set(result.layers) == {"layers.0", "layers.1"}  # the 10-way head stays dense
    # reported linear FLOPs = sum of the layers' flops() (one token per sample in an MLP)
    head = 32 * 10
    assert result.flops_per_sample == sum(layer["flops"] for layer in result.layers.values()) + head
    assert result.dense_flops_per_sample == 64 * 32 + 32 * 32 + head
    assert result.structured_relative_flops <= 0.3 + 1e-9  # the budget controller held the budget
    assert result.structured_relative_flops > 0.2  # ... without overshooting (lam = 0)
    assert result.curves[-1]["relative_flops"] == pytest.approx(result.structured_relative_flops)
    # deployed params: the GBLR layers' live cropped factors (= their flops) + biases + dense head
    assert result.params == sum(layer["flops"] for layer in result.layers.values()) + 32 + 32 + head + 10
    for layer in result.layers.values():
        assert layer["family"] == "gblr" and layer["live_components"] <= layer["num_components"]
    json.dumps(result.to_dict())  # JSON-able


def test_same_seed_gives_the_same_result(tmp_path):
    a = run_trial(tiny(family="gblr", budget=0.4, seed=3), cache_dir=tmp_path)
    b = run_trial(tiny(family="gblr", budget=0.4, seed=3), cache_dir=tmp_path)
    c = run_trial(tiny(family="gblr", budget=0.4, seed=4), cache_dir=tmp_path)
    assert a.quality == b.quality and a.curves[-1]["train_loss"] == b.curves[-1]["train_loss"]
    assert a.layers == b.layers
    assert a.curves[-1]["train_loss"] != c.curves[-1]["train_loss"]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_checkpoint_resume_continues_where_it_stopped(tmp_path, schedule):
    def config(**overrides):
        return tiny(lr_schedule=schedule, **overrides)

    full = run_trial(config(family="gblr", budget=0.3, epochs=3), checkpoint_dir=tmp_path / "full",
                     cache_dir=tmp_path)
    # a run interrupted after its first epoch ...
    with pytest.raises(KeyboardInterrupt):
        def stop(report):
            if report.epoch == 1:
                raise KeyboardInterrupt
        run_trial(config(family="gblr", budget=0.3, epochs=3), checkpoint_dir=tmp_path / "cut",
                  cache_dir=tmp_path, on_epoch=stop)
    seen = []
    resumed = run_trial(config(family="gblr", budget=0.3, epochs=3), checkpoint_dir=tmp_path / "cut",
                        cache_dir=tmp_path, on_epoch=lambda r: seen.append(r.epoch))
    assert seen == [2, 3]  # epoch 1 was not trained again
    assert resumed.curves[0]["train_loss"] == full.curves[0]["train_loss"]  # kept from the checkpoint
    assert resumed.curves[-1]["train_loss"] == pytest.approx(full.curves[-1]["train_loss"], rel=1e-5)
    assert resumed.quality == pytest.approx(full.quality)
    # a checkpoint of a different configuration is not resumed
    other = []
    run_trial(config(family="gblr", budget=0.5, epochs=3), checkpoint_dir=tmp_path / "cut",
              cache_dir=tmp_path, on_epoch=lambda r: other.append(r.epoch))
    assert other == [1, 2, 3]


def test_dense_cache_is_per_cpu_thread_count(tmp_path):
    workload = get_workload("digits-mlp", **TINY)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dense_state(workload, seed=0, cache_dir=tmp_path)
        assert torch.equal(dense_state(workload, seed=0, cache_dir=tmp_path)["layers.0.weight"],
                           one["layers.0.weight"])  # cached: the same start again
        torch.set_num_threads(2)
        dense_state(workload, seed=0, cache_dir=tmp_path)
    finally:
        torch.set_num_threads(before)
    assert len(list(tmp_path.glob("digits-mlp-s0-*.safetensors"))) == 2


def test_nan_loss_fails_with_a_reason(tmp_path):
    with pytest.raises(TrialFailed, match="non-finite training loss"):
        run_trial(tiny(family="dense", lr=1e30, epochs=2), cache_dir=tmp_path)


def test_finetune_starts_from_the_cached_dense_model(tmp_path):
    workload = get_workload("digits-mlp", **TINY)
    cfg = tiny(family="lowrank", budget=0.5, mode="finetune", epochs=1)
    model = build_trial_model(cfg, workload, cache_dir=tmp_path)
    cached = list(tmp_path.glob("digits-mlp-*.safetensors"))
    assert len(cached) == 1
    # the structured layers were fit to the trained dense weights (not to a random init)
    from safetensors.torch import load_file

    dense = load_file(str(cached[0]))
    layer = model.get_submodule("layers.0")
    assert isinstance(layer, StructuredLinear)
    W = dense["layers.0.weight"]  # (32, 64)
    err = float((layer.to_dense().detach() - W).norm() / W.norm())
    # lowrank's fit is the truncated SVD at the largest rank within budget: 10 x (64 + 32) <= 0.5 x
    # 2048, so its error is the rank-10 truncation error of the trained W (0.455 here), to float32
    # rounding (measured 7e-8 relative)
    assert layer.rank == 10
    singular = torch.linalg.svdvals(W.double())
    assert err == pytest.approx(float(singular[10:].norm() / singular.norm()), rel=1e-5)


@pytest.mark.parametrize("mode,structure_lr,moves", [
    ("finetune", None, False),   # default in finetune: the from_dense structure is kept
    ("finetune", 0.05, True),    # an explicit structure lr learns it
    ("scratch", None, True),     # default in scratch: learned (5e-4)
])
def test_structure_learning_defaults_by_mode(tmp_path, mode, structure_lr, moves):
    from gsmsearch.structured import load_structure

    workload = get_workload("digits-mlp", **TINY)
    cfg = tiny(family="gblr", budget=0.3, mode=mode, epochs=2, structure_lr=structure_lr)
    start = build_trial_model(cfg, workload, cache_dir=tmp_path)
    result = run_trial(cfg, cache_dir=tmp_path, structure_path=tmp_path / "end.safetensors")
    expected_lr = structure_lr if structure_lr is not None else (0.0 if mode == "finetune" else 5e-4)
    assert result.resolved["structure_lr"] == expected_lr  # the result says what "default" meant
    assert result.resolved["budget_anneal_epochs"] == (0.0 if mode == "finetune" else 1.0)
    assert (result.resolved["sigma_schedule"] is None) == (mode == "finetune")
    end = load_structure(workload.build_model(), tmp_path / "end.safetensors")
    changed = False
    for name in ("layers.0", "layers.1"):
        a, b = start.get_submodule(name), end.get_submodule(name)
        assert isinstance(b, GBLRLinear)
        same = (torch.equal(a.interval_lengths(), b.interval_lengths())
                and torch.equal(a.interval_starts(), b.interval_starts()))
        changed |= not same
    assert changed == moves


@pytest.mark.parametrize("family", ["gblr", "lowrank"])
def test_global_allocation_shares_the_budget_by_the_dense_spectra(tmp_path, family):
    workload = get_workload("digits-mlp", **TINY)
    dense = workload.build_model()
    dense.load_state_dict(cached_dense_state_for(workload, tmp_path))
    uniform = layer_budgets(tiny(family=family, budget=0.3, mode="finetune"), workload, dense)
    assert uniform == {"layers.0": 0.3, "layers.1": 0.3}
    cfg = tiny(family=family, budget=0.3, mode="finetune", epochs=1, budget_allocation="global")
    shares = layer_budgets(cfg, workload, dense)
    assert shares["layers.0"] != shares["layers.1"]  # the 64 -> 32 and 32 -> 32 layers differ
    dense_flops = {"layers.0": 64 * 32, "layers.1": 32 * 32}
    spent = sum(shares[k] * dense_flops[k] for k in shares) / sum(dense_flops.values())
    assert spent == pytest.approx(0.3, rel=1e-6)
    result = run_trial(cfg, cache_dir=tmp_path)
    for name, share in shares.items():  # each layer was fit at its own share
        assert result.layers[name]["flops"] <= share * dense_flops[name] + 1e-9
    assert result.structured_relative_flops <= 0.3 + 1e-9
    assert result.structured_relative_flops > 0.2
    assert result.resolved["budget_allocation"] == "global"
    assert result.resolved["layer_budgets"] == pytest.approx(shares)


def test_global_allocation_gives_every_layer_at_least_its_family_minimum(tmp_path):
    from gsmsearch.trainer._trial import family_min_budget

    # Monarch's cheapest 64 -> 32 / 32 -> 32 layers cost 0.094 / 0.0625 of dense; at 0.15 the
    # spectra alone would starve one of them below that
    assert family_min_budget("monarch", 32, 64) == pytest.approx(192 / 2048)
    assert family_min_budget("lowrank", 32, 64) == pytest.approx(96 / 2048)
    assert family_min_budget("gblr", 32, 64) == 0.0
    workload = get_workload("digits-mlp", **TINY)
    cfg = tiny(family="monarch", budget=0.15, mode="finetune", epochs=1, budget_allocation="global")
    dense = workload.build_model()
    dense.load_state_dict(cached_dense_state_for(workload, tmp_path))
    shares = layer_budgets(cfg, workload, dense)
    assert shares["layers.0"] >= 192 / 2048 - 1e-12 and shares["layers.1"] >= 64 / 1024 - 1e-12
    model = build_trial_model(cfg, workload, cache_dir=tmp_path)  # every layer fits
    assert all(isinstance(model.get_submodule(n), StructuredLinear) for n in shares)


def test_global_allocation_keeps_a_layer_given_its_whole_cost_dense(tmp_path):
    workload = get_workload("digits-mlp", **TINY)
    cfg = tiny(family="gblr", budget=0.9, mode="finetune", budget_allocation="global")
    dense = workload.build_model()
    dense.load_state_dict(cached_dense_state_for(workload, tmp_path))
    shares = layer_budgets(cfg, workload, dense)
    whole = [name for name, share in shares.items() if share >= 1.0]
    assert whole  # at 0.9 the cheaper 32 x 32 layer is cheaper to keep exact
    model = build_trial_model(cfg, workload, cache_dir=tmp_path)
    for name in whole:
        layer = model.get_submodule(name)
        assert isinstance(layer, DenseLinear)
        assert torch.equal(layer.weight, dense.get_submodule(name).weight)
    assert any(isinstance(model.get_submodule(n), GBLRLinear) for n in shares if n not in whole)


def test_distillation_loss_is_the_softened_kl_for_samples_and_tokens():
    workload = get_workload("digits-mlp", **TINY)
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    assert workload.distillation_loss(teacher, teacher, None, 2.0) == pytest.approx(0.0, abs=1e-6)
    t = 3.0
    p = torch.softmax(teacher / t, -1)
    expected = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert workload.distillation_loss(student, teacher, None, t) == pytest.approx(float(expected), rel=1e-5)
    # sequences (B, T, vocab): averaged over every token
    seq_s, seq_t = student.view(2, 4, 10), teacher.view(2, 4, 10)
    assert workload.distillation_loss(seq_s, seq_t, None, t) == pytest.approx(float(expected), rel=1e-5)
    # the gradient reaches the student only
    s = student.clone().requires_grad_()
    tt = teacher.clone().requires_grad_()
    workload.distillation_loss(s, tt, None, t).backward()
    assert s.grad.abs().sum() > 0 and tt.grad is None


def test_distill_trains_against_the_dense_teacher(tmp_path):
    plain = run_trial(tiny(family="lowrank", budget=0.3, mode="finetune", epochs=2), cache_dir=tmp_path)
    taught = run_trial(tiny(family="lowrank", budget=0.3, mode="finetune", epochs=2, distill=1.0,
                            distill_temperature=1.0), cache_dir=tmp_path)
    assert taught.resolved["distill"] == 1.0 and plain.resolved["distill"] == 0.0
    assert taught.curves[0]["train_loss"] != plain.curves[0]["train_loss"]
    # with distill = 1 the loss is the KL to the teacher alone: the student starts close to the
    # teacher (a from_dense fit), so it is far below the cross-entropy against the labels
    assert taught.curves[0]["train_loss"] < plain.curves[0]["train_loss"]
    assert taught.quality > 0.5


def test_project_flops_counts_layers_by_their_rows_per_sample():
    torch.manual_seed(0)
    a, b = GBLRLinear(32, 32, num_components=32), GBLRLinear(32, 32, num_components=32)
    controller = ProjectFlops(0.3, weights=[1.0, 9.0])
    with torch.no_grad():
        a.widths.fill_(0.2)
        b.widths.fill_(0.6)
    controller.step([a, b], lam=0.0, lr_width=0.0)
    weighted = (a.flops() + 9 * b.flops()) / (10 * 32 * 32)
    assert weighted <= 0.3 + 1e-9 and weighted > 0.25  # held per sample, not per token
    assert (a.flops() + b.flops()) / (2 * 32 * 32) != pytest.approx(weighted, abs=0.02)
    with pytest.raises(ValueError, match="1 weights for 2 layers"):
        ProjectFlops(0.3, weights=[1.0]).step([a, b], lam=0.0, lr_width=0.0)


def cached_dense_state_for(workload, cache_dir):
    return dense_state(workload, seed=0, cache_dir=cache_dir)


def _train_counting(path, key, result_queue):
    from gsmsearch.trainer._dense_cache import cached_dense_state as cache
    from gsmsearch.workloads import get_workload as gw

    calls = []

    def train():
        import time

        calls.append(1)
        time.sleep(1.0)  # long enough for the other process to be waiting on the lock
        model = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(model.weight, float(key))
        return model

    state = cache(gw("digits-mlp", **TINY), seed=0, recipe={"k": key}, train=train, cache_dir=path)
    result_queue.put((len(calls), float(state["weight"][0, 0])))


def test_dense_cache_trains_once_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_train_counting, args=(tmp_path, 7, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = [queue.get(timeout=5) for _ in procs]
    assert sorted(calls for calls, _ in results) == [0, 1]  # exactly one process trained
    assert all(value == 7.0 for _, value in results)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="mode must be one of"):
        TrialConfig(mode="later")
    with pytest.raises(ValueError, match="budget must be in"):
        TrialConfig(budget=1.5)
    with pytest.raises(ValueError, match="needs target_mean_width"):
        TrialConfig(budget_control="stop-shrinking")
    with pytest.raises(ValueError, match="unknown trial config key 'epoch'"):
        TrialConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="budget_allocation must be one of uniform, global"):
        TrialConfig(budget_allocation="greedy")
    with pytest.raises(ValueError, match="budget_allocation 'global' needs mode finetune"):
        TrialConfig(budget_allocation="global", mode="scratch")
    with pytest.raises(ValueError, match=r"distill must be in \[0, 1\]"):
        TrialConfig(distill=1.5, mode="finetune")
    with pytest.raises(ValueError, match="distill needs mode finetune"):
        TrialConfig(distill=0.5)
    with pytest.raises(ValueError, match="distill_temperature must be > 0"):
        TrialConfig(distill_temperature=0.0)
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, got 'linear'"):
        TrialConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match=r"warmup_epochs must be in \[0, epochs=3\)"):
        TrialConfig(epochs=3, warmup_epochs=3)


def test_lr_factor_warmup_then_cosine_to_zero():
    assert lr_factor("constant", 7.3, 10) == 1.0
    assert lr_factor("cosine", 0.0, 10) == 1.0
    assert lr_factor("cosine", 5.0, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 10.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 2.5, 10) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    # warm-up: linear ramp, never exactly 0, then the schedule over the remaining epochs
    assert lr_factor("cosine", 0.5, 10, warmup_epochs=2) == pytest.approx(0.25)
    assert 0 < lr_factor("constant", 0.0, 10, warmup_epochs=2) < 0.01
    assert lr_factor("cosine", 2.0, 10, warmup_epochs=2) == pytest.approx(1.0)
    assert lr_factor("cosine", 6.0, 10, warmup_epochs=2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lr_factor("step", 1.0, 10)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_loop_scales_every_group_lr_by_the_schedule(tmp_path, schedule):
    workload = get_workload("digits-mlp", **TINY)
    splits = workload.load_data(seed=0)
    model = build_trial_model(tiny(family="gblr", budget=0.4), workload)
    loop = TrainingLoop(workload, model, splits, epochs=3, batch_size=256, lr=2e-3,
                        structure_lr=4e-3, lr_schedule=schedule, warmup_epochs=0.5)
    steps = len(splits.loader("train", 256, shuffle=True, seed=0))
    seen = []
    loop.run(lambda report: seen.append([g["lr"] for g in loop.optimizer.param_groups]))
    assert len(seen) == 3 and all(len(lrs) == 2 for lrs in seen)  # content and structure groups
    for epoch, lrs in enumerate(seen):
        last_step = epoch + (steps - 1) / steps  # progress of the epoch's last step
        factor = lr_factor(schedule, last_step, 3, 0.5)
        assert lrs == pytest.approx([2e-3 * factor, 4e-3 * factor])
    if schedule == "cosine":
        assert seen[-1][0] < 0.05 * 2e-3  # decayed nearly to 0 by the end


def test_cli_train_json(tmp_path):
    env = {"GSMSEARCH_CACHE": str(tmp_path)}
    import os

    env = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-m", "gsmsearch.cli", "train", "--workload", "digits-mlp",
         "--workload-options", json.dumps(TINY), "--family", "gblr", "--budget", "0.3",
         "--epochs", "1", "--no-latency", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["config"]["family"] == "gblr" and result["structured_relative_flops"] <= 0.3 + 1e-9
    bad = subprocess.run(
        [sys.executable, "-m", "gsmsearch.cli", "train", "--family", "nope", "--epochs", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert bad.returncode == 2
    assert "unknown structured family 'nope'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("argv, message", [
    (["--family-options", '{"rankk": 1}'],
     "--family-options: unknown option 'rankk' of gblr in scratch mode; known: num_components, rank_per_component"),
    (["--family", "lowrank", "--mode", "finetune", "--family-options", '{"rank_per_component": 1}'],
     "--family-options: unknown option 'rank_per_component' of lowrank in finetune mode; known: rank"),
    (["--device", "tpu9"], "--device tpu9: not a device; expected cpu, cuda"),
    (["--device", "cuda"], "--device cuda: no CUDA device here"),
    (["--checkpoint-dir", "afile/sub"], "--checkpoint-dir afile/sub: cannot create it"),
    (["--checkpoint-dir", "afile"], "--checkpoint-dir afile: exists and is not a folder"),
])
def test_cli_train_refuses_bad_options_before_training(tmp_path, monkeypatch, capsys, argv, message):
    from gsmsearch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GSMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    (tmp_path / "afile").write_text("not a folder")
    assert main(["train", "--workload-options", json.dumps(TINY), "--epochs", "1", "--no-latency", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "unexpected" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing trained, cached or written


def test_recompute_intermediate_option_trains_the_same_model(tmp_path):
    plain = run_trial(tiny(family="gblr", budget=0.3), cache_dir=tmp_path)
    lean = run_trial(tiny(family="gblr", budget=0.3, family_options={"recompute_intermediate": True}),
                     cache_dir=tmp_path, structure_path=tmp_path / "lean.safetensors")
    assert lean.curves[-1]["train_loss"] == plain.curves[-1]["train_loss"]  # same function, same order
    assert lean.quality == plain.quality
    from gsmsearch.structured import load_structure

    model = load_structure(get_workload("digits-mlp", **TINY).build_model(), tmp_path / "lean.safetensors")
    layers = [m for m in model.modules() if isinstance(m, GBLRLinear)]
    assert layers and all(layer.recompute_intermediate for layer in layers)  # kept in the saved config


def test_gblr_fits_are_cached_and_read_back_exactly(tmp_path, monkeypatch):
    from gsmsearch.trainer._fit_cache import cached_gblr_fit, gblr_fit_key

    first = run_trial(tiny(family="gblr", budget=0.3, mode="finetune"), cache_dir=tmp_path)
    fits = sorted((tmp_path / "gblr-fits").glob("*.safetensors"))
    assert len(fits) == len(first.layers) >= 2  # one per structured layer of the tiny MLP
    # a trial that differs only in its lr fits the same layers: read back, never refitted
    calls = []
    original = GBLRLinear.from_dense.__func__
    monkeypatch.setattr(GBLRLinear, "from_dense",
                        classmethod(lambda cls, *a, **k: calls.append(1) or original(cls, *a, **k)))
    again = run_trial(tiny(family="gblr", budget=0.3, mode="finetune"), cache_dir=tmp_path)
    assert calls == [] and again.to_dict()["curves"][-1]["train_loss"] == first.curves[-1]["train_loss"]
    assert again.quality == first.quality and again.layers == first.layers
    other_lr = run_trial(tiny(family="gblr", budget=0.3, mode="finetune", lr=1e-3), cache_dir=tmp_path)
    assert calls == [] and other_lr.layers.keys() == first.layers.keys()
    # the same state to the last bit as a fresh fit; another budget or seed is another entry
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    bias = torch.randn(24, generator=torch.Generator().manual_seed(1))
    cached = cached_gblr_fit(weight, bias, budget=0.3, cache_dir=tmp_path, seed=0)
    read = cached_gblr_fit(weight, bias, budget=0.3, cache_dir=tmp_path, seed=0)
    fresh = original(GBLRLinear, weight, bias, budget=0.3, seed=0)
    assert len(calls) == 1  # the first cached call fitted; the read fitted nothing
    for name, value in fresh.state_dict().items():
        assert torch.equal(cached.state_dict()[name], value) and torch.equal(read.state_dict()[name], value)
    assert read.config() == fresh.config()
    keys = {gblr_fit_key(weight, bias, budget=0.3, seed=0), gblr_fit_key(weight, bias, budget=0.2, seed=0),
            gblr_fit_key(weight, bias, budget=0.3, seed=1), gblr_fit_key(weight * 2, bias, budget=0.3, seed=0),
            gblr_fit_key(weight, None, budget=0.3, seed=0)}
    assert len(keys) == 5


def test_cache_keys_follow_code_not_comments_or_docstrings(tmp_path):
    import importlib.util
    import textwrap

    from gsmsearch.trainer._dense_cache import code_fingerprint

    def fingerprint(name, source):
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return code_fingerprint(module)

    base = fingerprint("m0", '''
        """Module doc."""
        def step(x):
            """Doc."""
            return x * 2  # twice
    ''')
    reworded = fingerprint("m1", '''
        """Another module doc."""
        def step(x):
            """Other doc."""
            # a new comment
            return x * 2  # double
    ''')
    changed = fingerprint("m2", '''
        """Module doc."""
        def step(x):
            """Doc."""
            return x * 3  # twice
    ''')
    assert base == reworded and base != changed and base


def test_cache_keys_read_each_module_once_per_process(monkeypatch):
    """A fine-tune trial asks for a dozen fit keys and a dense key; the code fingerprints behind
    them are parsed once per module and process (1.3 s of a Mixer trial when each key parsed
    its modules again), and the keys stay the same."""
    import inspect

    from gsmsearch.trainer._dense_cache import dense_cache_key
    from gsmsearch.trainer._fit_cache import gblr_fit_key

    weight = torch.randn(8, 6)
    first = gblr_fit_key(weight, None, budget=0.3)
    workload = get_workload("digits-mlp", **TINY)
    dense_first = dense_cache_key(workload, seed=0, recipe={})

    def no_source(*args, **kwargs):
        raise AssertionError("a module's source was read again")

    monkeypatch.setattr(inspect, "getsource", no_source)
    assert gblr_fit_key(weight, None, budget=0.3) == first
    assert gblr_fit_key(weight * 2, None, budget=0.3) != first  # other weights: another key
    assert dense_cache_key(workload, seed=0, recipe={}) == dense_first


def test_activation_weighting_is_w_times_the_root_of_the_input_moment():
    from gsmsearch.trainer._calibration import activation_weighted

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=gen)
    assert torch.allclose(activation_weighted(weight, torch.eye(5)), weight.double(), atol=1e-12)
    scales = torch.tensor([4.0, 1.0, 0.25, 9.0, 0.0], dtype=torch.float64)
    assert torch.allclose(activation_weighted(weight, torch.diag(scales)), weight.double() * scales.sqrt(),
                          atol=1e-12)
    # in general: its singular values squared are the eigenvalues of W C W^T
    x = torch.randn(200, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 5, generator=gen, dtype=torch.float64)
    moment = x.T @ x / 200
    weighted = activation_weighted(weight, moment)
    expected = torch.linalg.eigvalsh(weight.double() @ moment @ weight.double().T).flip(0).clamp_min(0)
    assert torch.allclose(torch.linalg.svdvals(weighted).square(), expected[:5], rtol=1e-8, atol=1e-10)


def test_calibration_leaves_padding_tokens_out():
    """A padded sequence batch: the padding positions' inputs must not count (they would weigh
    every short sentence's pad embeddings into MiniLM's moments)."""
    from types import SimpleNamespace

    from gsmsearch.trainer._calibration import input_second_moments

    gen = torch.Generator().manual_seed(0)
    embed = torch.nn.Embedding(10, 4)
    proj = torch.nn.Linear(4, 3)
    model = torch.nn.ModuleDict({"embed": embed, "proj": proj})
    ids = torch.randint(1, 10, (2, 5), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids[mask == 0] = 0
    with torch.no_grad():
        embed.weight[0] = 100.0  # the pad embedding: would dominate if counted
    batch = {"input_ids": ids, "attention_mask": mask}
    splits = SimpleNamespace(loader=lambda split, size, shuffle: iter([batch]))
    workload = SimpleNamespace(forward=lambda m, b: m["proj"](m["embed"](b["input_ids"])))
    moments = input_second_moments(model, [("proj", proj)], workload, splits, samples=2, batch_size=2)
    tokens = embed(ids[mask.bool()]).detach().double()  # the 8 real tokens
    assert torch.allclose(moments["proj"], tokens.T @ tokens / 8, atol=1e-10)


def test_activation_allocation_calibrates_on_training_inputs(tmp_path):
    from gsmsearch.structured import matching_linears
    from gsmsearch.trainer._calibration import input_second_moments

    workload = get_workload("digits-mlp", **TINY)
    dense = workload.build_model()
    dense.load_state_dict(cached_dense_state_for(workload, tmp_path))
    splits = workload.load_data(seed=0)
    targets = matching_linears(dense, list(workload.candidate_patterns))
    moments = input_second_moments(dense, targets, workload, splits, samples=300, batch_size=100)
    first = splits.train.tensors[0][:300].double()  # the first layer's inputs are the pixels
    assert torch.allclose(moments["layers.0"], first.T @ first / 300, atol=1e-10)
    assert moments["layers.1"].shape == (32, 32)
    cfg = tiny(family="lowrank", budget=0.3, mode="finetune", epochs=1, budget_allocation="activation")
    shares = layer_budgets(cfg, workload, dense, splits, cache_dir=tmp_path)
    spectra = layer_budgets(tiny(family="lowrank", budget=0.3, mode="finetune", budget_allocation="global"),
                            workload, dense)
    assert shares != spectra  # the inputs change the split
    dense_flops = {"layers.0": 64 * 32, "layers.1": 32 * 32}
    spent = sum(shares[k] * dense_flops[k] for k in shares) / sum(dense_flops.values())
    assert spent == pytest.approx(0.3, rel=1e-6)
    result = run_trial(cfg, cache_dir=tmp_path)
    assert result.resolved["budget_allocation"] == "activation"
    assert result.resolved["layer_budgets"] == pytest.approx(shares)
    assert result.structured_relative_flops <= 0.3 + 1e-9
    with pytest.raises(ValueError, match="budget_allocation 'activation' needs mode finetune"):
        tiny(family="lowrank", budget=0.3, mode="scratch", budget_allocation="activation")


def test_calibration_is_computed_once_per_model_and_read_back_after(tmp_path):
    """Every trial (and every rank of a data-parallel trial) starting from one dense model reads
    the moments the first one computed: the same tensors to the bit, without loading the data;
    another model (one weight changed) or another calibration size computes its own."""
    from gsmsearch.structured import matching_linears
    from gsmsearch.trainer._calibration import cached_input_moments, input_second_moments

    workload = get_workload("digits-mlp", **TINY)
    dense = workload.build_model()
    dense.load_state_dict(cached_dense_state_for(workload, tmp_path))
    splits = workload.load_data(seed=0)
    targets = matching_linears(dense, list(workload.candidate_patterns))
    loads = []

    def load():
        loads.append(1)
        return splits

    def cached(model, samples=300):
        return cached_input_moments(model, targets, workload, load, seed=0, samples=samples, batch_size=100,
                                    cache_dir=tmp_path)

    first = cached(dense)
    assert len(loads) == 1 and len(list((tmp_path / "calibration").glob("*.safetensors"))) == 1
    direct = input_second_moments(dense, targets, workload, splits, samples=300, batch_size=100)
    assert first.keys() == direct.keys() and all(torch.equal(first[k], direct[k]) for k in direct)
    again = cached(dense)
    assert len(loads) == 1 and all(torch.equal(again[k], first[k]) for k in first)
    cached(dense, samples=200)
    assert len(loads) == 2
    with torch.no_grad():
        dense.layers[0].bias[0] += 1.0  # the second layer sees its first input move
    changed = cached(dense)
    assert len(loads) == 3 and not torch.equal(changed["layers.1"], first["layers.1"])
    assert torch.equal(changed["layers.0"], first["layers.0"])  # the pixels: no weight before them


def test_a_fixed_structure_computes_no_structure_gradients():
    """With structure_lr = 0 (fine-tuning a fit) the widths' and locations' gradients would only
    be multiplied by a zero learning rate: the loop does not compute them, the structure stays
    exactly where it was, and the content still trains.  With a structure lr they are learned."""
    workload = get_workload("digits-mlp", **TINY)
    splits = workload.load_data(seed=0)
    for structure_lr in (0.0, 1e-2):
        model = build_trial_model(tiny(family="gblr", budget=0.4, mode="scratch"), workload)
        layers = [m for m in model.modules() if isinstance(m, GBLRLinear)]
        before = [(l.widths.detach().clone(), l.locations.detach().clone(), l.row_factors.detach().clone())
                  for l in layers]
        loop = TrainingLoop(workload, model, splits, epochs=1, batch_size=64, lr=3e-3, structure_lr=structure_lr)
        loop.run()
        frozen = structure_lr == 0
        for layer, (widths, locations, factors) in zip(layers, before):
            assert layer.widths.requires_grad is not frozen and layer.locations.requires_grad is not frozen
            assert (layer.widths.grad is None) == frozen
            assert torch.equal(layer.widths, widths) == frozen and torch.equal(layer.locations, locations) == frozen
            assert not torch.equal(layer.row_factors, factors)  # the content trained either way


def test_cli_train_has_a_flag_for_every_trial_config_field():
    """`gsmsearch train --help` lists every trial-config flag: each field parses from its flag
    (dashes for underscores) into the config the command builds, at a non-default value."""
    import dataclasses

    from gsmsearch.cli import build_parser
    from gsmsearch.trainer import TrialConfig

    parser = build_parser()
    defaults = vars(parser.parse_args(["train"]))
    missing = [f.name for f in dataclasses.fields(TrialConfig)
               if f.name not in defaults and f.name != "measure_latency"]
    assert missing == [], f"no gsmsearch train flag for: {missing}"
    assert "no_latency" in defaults
    args = parser.parse_args(["train", "--fit-method", "reference", "--sigma-start-epoch", "1.5",
                              "--sigma-end-epoch", "3", "--budget-anneal-epochs", "2", "--latency-batch", "8"])
    assert (args.fit_method, args.sigma_start_epoch, args.sigma_end_epoch, args.budget_anneal_epochs,
            args.latency_batch) == ("reference", 1.5, 3.0, 2.0, 8)


@pytest.mark.parametrize("method", ["greedy", "reference"])
def test_a_study_may_set_each_fit_methods_knobs_and_each_trial_uses_its_own(method, tmp_path):
    """A spec searching fit_method over both may give `steps` (reference) and `refit_passes`
    (greedy): each trial's fit takes its own method's knobs, not the other's (which it refuses)."""
    from gsmsearch.trainer._trial import gblr_fit_options

    options = {"steps": 5, "refit_passes": 1, "recompute_intermediate": True}
    assert gblr_fit_options("greedy", options) == {"refit_passes": 1, "recompute_intermediate": True}
    assert gblr_fit_options("reference", options) == {"steps": 5, "recompute_intermediate": True}
    result = run_trial(tiny(family="gblr", budget=0.3, mode="finetune", epochs=1, fit_method=method,
                            family_options={"steps": 5, "refit_passes": 1}), cache_dir=tmp_path)
    assert result.config["fit_method"] == method and result.structured_relative_flops <= 0.3 + 1e-9


def _trained_gblr(path):
    from gsmsearch.structured import gblr_layers, load_structure

    model = load_structure(get_workload("digits-mlp", **TINY).build_model(), path)
    return model, gblr_layers(model)


def test_budget_control_none_runs_the_proximal_step_without_a_projection(tmp_path):
    """`budget_control: none` drops the budget projection only: lam still shrinks the widths,
    widths stay in [0, 1] and locations in [0, 1), and the reported FLOPs and the exported model
    are those of the trained layers."""
    from gsmsearch.structured import export, mean_width

    widths = {}
    for lam in (0.0, 20.0):
        path = tmp_path / f"lam{lam}.safetensors"
        result = run_trial(tiny(family="gblr", budget=0.3, budget_control="none", lam=lam), cache_dir=tmp_path,
                           structure_path=path)
        model, layers = _trained_gblr(path)
        widths[lam] = mean_width(layers)
        for layer in layers:
            assert float(layer.widths.detach().min()) >= 0.0 and float(layer.widths.detach().max()) <= 1.0
            assert float(layer.locations.detach().min()) >= 0.0 and float(layer.locations.detach().max()) < 1.0
        for name, summary in result.layers.items():
            assert summary["flops"] == model.get_submodule(name).flops()
        x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            trained, deployed = model(x), export(model)(x)
        assert torch.allclose(deployed, trained, atol=1e-5, rtol=0)
        for name, exported in export(model).named_modules():
            if hasattr(exported, "method_flops"):
                assert exported.flops() == model.get_submodule(name).flops()
    # 2 epochs x 17 steps of threshold lam * structure_lr = 20 * 5e-4 remove up to 0.34 of each
    # width; Adam moves a width by at most ~5e-4 a step (0.017 in all) and widths that reach 0
    # stop shrinking: measured 0.327 on seed 0 (0.326-0.328 on seeds 0-2)
    assert widths[0.0] - widths[20.0] > 0.30


def test_a_loop_without_a_controller_still_runs_the_proximal_step():
    """TrainingLoop(controller=None) applies the proximal step: a threshold lam * structure_lr
    above every width's reach empties every interval, and with lam = 0 widths and locations set
    outside their ranges come back into [0, 1] and [0, 1) after training."""
    workload = get_workload("digits-mlp", **TINY)
    splits = workload.load_data(seed=0)
    model = build_trial_model(tiny(family="gblr", budget=0.4), workload)
    layers = [m for m in model.modules() if isinstance(m, GBLRLinear)]
    # widths <= 1 + structure_lr after any Adam step, so a threshold of 1.1 leaves 0 everywhere
    TrainingLoop(workload, model, splits, epochs=1, batch_size=256, lr=3e-3, structure_lr=1e-2,
                 lam=110.0).run()
    assert all(torch.equal(layer.widths, torch.zeros_like(layer.widths)) for layer in layers)
    assert all(layer.flops() == 0 for layer in layers)
    model = build_trial_model(tiny(family="gblr", budget=0.4), workload)
    layers = [m for m in model.modules() if isinstance(m, GBLRLinear)]
    with torch.no_grad():
        for layer in layers:
            layer.widths.fill_(1.5)
            layer.locations.fill_(-0.7)
    TrainingLoop(workload, model, splits, epochs=1, batch_size=256, lr=3e-3, structure_lr=1e-3).run()
    for layer in layers:
        assert float(layer.widths.detach().max()) <= 1.0 and float(layer.widths.detach().min()) >= 0.0
        assert float(layer.locations.detach().min()) >= 0.0 and float(layer.locations.detach().max()) < 1.0


class _QueuedDevice:
    """A device whose calls return when their work is queued (as CUDA kernels do): ``launch``
    advances the clock by the launch cost only, ``synchronize`` by the queued work."""

    def __init__(self, work_ms):
        self.now, self.queued, self.work = 0.0, 0.0, list(work_ms)
        self.synchronized = 0

    def clock(self):
        return self.now

    def launch(self, model, batch):
        self.now += 1e-6  # 1 us to queue the kernels
        self.queued += self.work.pop(0) / 1e3

    def synchronize(self):
        self.synchronized += 1
        self.now += self.queued
        self.queued = 0.0


def test_latency_waits_for_queued_work_and_reports_the_median_after_warmup():
    from gsmsearch.trainer._trial import measure_latency

    # two warm-up runs (slow: compilation, caches) then five timed runs of 3, 1, 2, 5, 4 ms
    device = _QueuedDevice([500.0, 400.0, 3.0, 1.0, 2.0, 5.0, 4.0])
    latency = measure_latency(torch.nn.Identity(), None, device.launch, repeats=5, warmup=2,
                              synchronize=device.synchronize, clock=device.clock)
    assert latency == pytest.approx(3.0 + 1e-3, abs=1e-9)  # the median run's work + its launch
    assert device.work == [] and device.synchronized == 10  # before and after each timed run
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_latency(torch.nn.Identity(), None, device.launch, repeats=0)


def test_latency_synchronizes_the_cuda_devices_of_the_model_and_batch(monkeypatch):
    from gsmsearch.trainer._trial import _devices, device_synchronizer

    model = torch.nn.Linear(3, 2)
    batch = {"x": [torch.zeros(2, 3)], "y": torch.zeros(2)}
    assert _devices(model, batch) == {torch.device("cpu")}
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    device_synchronizer({torch.device("cpu")})()
    assert synced == []  # CPU work is done when the call returns
    device_synchronizer({torch.device("cpu"), torch.device("cuda", 1), torch.device("cuda", 0)})()
    assert synced == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_latency_on_cuda_counts_the_kernels_not_their_launch():
    from gsmsearch.trainer._trial import measure_latency

    a = torch.randn(4096, 4096, device="cuda")
    one = measure_latency(torch.nn.Identity(), a, lambda m, x: x @ x, repeats=5)
    eight = measure_latency(torch.nn.Identity(), a, lambda m, x: [x @ x for _ in range(8)], repeats=5)
    assert eight > 4 * one  # eight GEMMs take about eight times one; their launches do not
