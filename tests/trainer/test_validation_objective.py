"""A trial's objective is measured on the validation split; the test split is only recorded and
changes nothing a trial chooses or reports besides its test metrics."""
from __future__ import annotations

import json
import math

import pytest
import torch

from gsmsearch.structured import export, load_structure, set_sigma
from gsmsearch.trainer import TrialConfig, run_trial
from gsmsearch.workloads import get_workload
from gsmsearch.workloads._digits import DigitsMLP

TINY_MODELS = {
    "digits-mlp": {"hidden_sizes": [32, 32]},
    "digits-vit": {"dim": 16, "depth": 1, "heads": 2},
    "animal-mnist-vit": {"dim": 16, "depth": 1, "heads": 2},
    "animal-mnist-mixer": {"dim": 16, "depth": 1},
}


def _trial(workload, options, **overrides):
    base = dict(workload=workload, workload_options=options, family="lowrank", budget=0.5, epochs=1,
                batch_size=64, lr=3e-3, measure_latency=False)
    base.update(overrides)
    return TrialConfig(**base)


@pytest.mark.parametrize("config", [
    *[_trial(name, options) for name, options in TINY_MODELS.items()],
    _trial("digits-mlp", TINY_MODELS["digits-mlp"], family="gblr", budget=0.3, epochs=2),
    _trial("minilm-compress", {"max_sentences": 40, "max_seq_length": 32}, mode="finetune", batch_size=8,
           lr=1e-4),
], ids=lambda config: f"{config.workload}-{config.family}")
def test_quality_is_the_validation_metric_and_test_quality_the_test_metric(config, tmp_path):
    structure = tmp_path / "model.safetensors"
    result = run_trial(config, cache_dir=tmp_path, structure_path=structure)
    # the deployed model, rebuilt from the saved structure and measured here, independently
    workload = get_workload(config.workload, **config.workload_options)
    model = load_structure(workload.build_model(), structure)
    set_sigma(model, None)
    deployed = export(model.eval())
    splits = workload.load_data(seed=config.seed)
    val = workload.evaluate(deployed, splits.val, collate_fn=splits.collate_fn)
    test = workload.evaluate(deployed, splits.test, collate_fn=splits.collate_fn)
    assert val["quality"] != test["quality"]  # the two splits can be told apart here
    assert result.quality == result.val_quality == pytest.approx(val["quality"], rel=0, abs=1e-9)
    assert result.test_quality == pytest.approx(test["quality"], rel=0, abs=1e-9)
    assert result.test_metrics == pytest.approx(test, rel=0, abs=1e-9)
    assert result.curves[-1]["val"]["quality"] == pytest.approx(val["quality"], abs=1e-6)
    assert json.loads(json.dumps(result.to_dict()))["test_quality"] == result.test_quality


def _with_test_split(change):
    """DigitsMLP.load_data with ``change(inputs, labels)`` applied to the test split only."""
    original = DigitsMLP.load_data

    def load_data(self, seed=0):
        splits = original(self, seed)
        inputs, labels = splits.test.tensors
        splits.test = torch.utils.data.TensorDataset(*change(inputs.clone(), labels.clone()))
        return splits

    return load_data


def _permute_labels(inputs, labels):
    return inputs, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]


def _nan_inputs(inputs, labels):
    return torch.full_like(inputs, float("nan")), labels


def _everything_but_test(result):
    record = result.to_dict()
    # and the clocks: training time, throughput, the process's peak memory
    for key in ("test_quality", "test_metrics", "train_seconds", "samples_per_second", "peak_memory_bytes"):
        record.pop(key)
    record["curves"] = [{k: v for k, v in epoch.items() if k not in ("seconds", "step_seconds")}
                        for epoch in record["curves"]]
    return record


@pytest.mark.parametrize("config", [
    # pre-trained dense start, activation calibration, distillation from the dense teacher
    _trial("digits-mlp", TINY_MODELS["digits-mlp"], mode="finetune", budget=0.3, epochs=2,
           budget_allocation="activation", distill=0.5),
    # structure learning: budget anneal, sigma schedule, FLOPs projection
    _trial("digits-mlp", TINY_MODELS["digits-mlp"], family="gblr", budget=0.3, epochs=2),
], ids=["finetune-activation-distill", "scratch-gblr"])
def test_nothing_a_trial_chooses_or_reports_depends_on_the_test_split(config, tmp_path, monkeypatch):
    plain = run_trial(config, cache_dir=tmp_path / "plain")
    monkeypatch.setattr(DigitsMLP, "load_data", _with_test_split(_permute_labels))
    permuted = run_trial(config, cache_dir=tmp_path / "permuted")  # its own dense start, trained again
    assert permuted.test_quality != plain.test_quality  # the change reached the test metrics ...
    assert _everything_but_test(permuted) == _everything_but_test(plain)  # ... and nothing else
    monkeypatch.setattr(DigitsMLP, "load_data", _with_test_split(_nan_inputs))
    broken = run_trial(config, cache_dir=tmp_path / "nan")
    # a test split the model cannot score fails nothing: the trial is kept by its validation
    assert broken.test_metrics["loss"] is None
    assert _everything_but_test(broken) == _everything_but_test(plain)


def test_a_non_finite_validation_metric_fails_the_trial(tmp_path, monkeypatch):
    from gsmsearch.trainer import TrialFailed

    original = DigitsMLP.load_data

    def load_data(self, seed=0):
        splits = original(self, seed)
        inputs, labels = splits.val.tensors
        splits.val = torch.utils.data.TensorDataset(torch.full_like(inputs, float("nan")), labels)
        return splits

    monkeypatch.setattr(DigitsMLP, "load_data", load_data)
    with pytest.raises(TrialFailed, match="non-finite validation metrics at epoch 1"):
        run_trial(_trial("digits-mlp", TINY_MODELS["digits-mlp"]), cache_dir=tmp_path)


def test_latency_is_timed_on_validation_inputs(tmp_path, monkeypatch):
    import gsmsearch.trainer._trial as trial_module

    batches = []

    def timed(model, batch, forward, *args, **kwargs):
        batches.append(batch)
        return 1.0

    monkeypatch.setattr(trial_module, "measure_latency", timed)
    config = _trial("digits-mlp", TINY_MODELS["digits-mlp"], measure_latency=True, latency_batch=50)
    result = run_trial(config, cache_dir=tmp_path)
    assert result.latency_ms == result.dense_latency_ms == 1.0
    val_inputs = get_workload("digits-mlp", **TINY_MODELS["digits-mlp"]).load_data(seed=0).val.tensors[0]
    for inputs, _ in batches:  # the deployed model's and the dense model's
        assert torch.equal(inputs, val_inputs[:50])
    assert len(batches) == 2


def test_summary_names_both_splits(tmp_path):
    result = run_trial(_trial("digits-mlp", TINY_MODELS["digits-mlp"]), cache_dir=tmp_path)
    line = result.summary()
    assert f"quality (val) {result.quality:.4f}, test quality {result.test_quality:.4f}" in line
    assert math.isfinite(result.test_quality)
