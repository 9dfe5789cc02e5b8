"""Every registered workload: builds, trains one step, evaluates, uses the linear factory."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gsmsearch.workloads import DataSplits, Workload, get_workload, register_workload, workload_names

ALL = workload_names()


class CountingFactory:
    """A linear factory that records every layer it builds (and builds nn.Linear)."""

    def __init__(self) -> None:
        self.built = []

    def __call__(self, in_features, out_features, bias=True):
        layer = nn.Linear(in_features, out_features, bias=bias)
        self.built.append(layer)
        return layer


@pytest.fixture(scope="module")
def workloads(workload_options):
    return {name: get_workload(name, **workload_options.get(name, {})) for name in ALL}


def test_builtin_workloads_are_registered():
    assert {"digits-mlp", "digits-vit", "animal-mnist-vit", "animal-mnist-mixer", "minilm-compress",
            "vit-b16-imagenet", "gpt2-wikitext"} <= set(ALL)


def test_unknown_workload_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown workload 'nope'.*digits-mlp"):
        get_workload("nope")


def test_unknown_option_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"workload 'digits-mlp' has no option 'hidden'.*hidden_sizes"):
        get_workload("digits-mlp", hidden=[3])


@pytest.mark.parametrize("bad", [dict(hidden_sizes=[0]), dict(split=(0.5, 0.5, 0.5)), dict(dropout=1.0)])
def test_invalid_option_values_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_workload("digits-mlp", **bad)


def test_registering_a_second_class_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        register_workload("digits-mlp")(type("Other", (Workload,), {}))


@pytest.mark.parametrize("name", ALL)
def test_example_batch_forward_loss_backward(name, workloads):
    workload = workloads[name]
    torch.manual_seed(0)
    model = workload.build_model()
    batch = workload.example_batch(3)
    loss = workload.loss(workload.forward(model, batch), batch)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("name", ALL)
def test_linear_factory_builds_exactly_the_candidates(name, workloads):
    workload = workloads[name]
    factory = CountingFactory()
    model = workload.build_model(linear_factory=factory)
    candidates = workload.candidate_layer_names(model)
    built = {id(layer) for layer in factory.built}
    modules = dict(model.named_modules())
    assert len(factory.built) == len(candidates) > 0
    assert {id(modules[n]) for n in candidates} == built
    # and the factory's modules are really used: a factory that adds an offset changes outputs
    plain_out = workload.forward(model.eval(), workload.example_batch(2))
    torch.manual_seed(0)
    model_a = workload.build_model()
    torch.manual_seed(0)
    model_b = workload.build_model(linear_factory=OffsetFactory())
    out_a = workload.forward(model_a.eval(), workload.example_batch(2))
    out_b = workload.forward(model_b.eval(), workload.example_batch(2))
    assert plain_out.shape == out_a.shape
    assert not torch.allclose(out_a, out_b)


class OffsetLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 0.5


class OffsetFactory:
    def __call__(self, in_features, out_features, bias=True):
        return OffsetLinear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("name", ALL)
def test_dense_factory_build_is_identical_to_default(name, workloads):
    workload = workloads[name]
    torch.manual_seed(1)
    model_default = workload.build_model().eval()
    torch.manual_seed(1)
    model_factory = workload.build_model(linear_factory=lambda i, o, bias=True: nn.Linear(i, o, bias=bias)).eval()
    batch = workload.example_batch(2)
    with torch.no_grad():
        assert torch.equal(workload.forward(model_default, batch), workload.forward(model_factory, batch))


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_init(name, workloads):
    workload = workloads[name]
    torch.manual_seed(7)
    first = workload.build_model().state_dict()
    torch.manual_seed(7)
    second = workload.build_model().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", ALL)
def test_tokens_per_sample_matches_the_candidates(name, workloads):
    workload = workloads[name]
    model = workload.build_model()
    tokens = workload.layer_tokens_per_sample(model)
    candidates = workload.candidate_layer_names(model)
    assert set(candidates) <= set(tokens)
    if "mixer" not in name:
        assert {tokens[c] for c in candidates} == {workload.tokens_per_sample}


def test_mixer_token_mixing_layers_see_channels_as_rows(workloads):
    workload = workloads["animal-mnist-mixer"]
    tokens = workload.layer_tokens_per_sample(workload.build_model())
    assert tokens["blocks.0.mlp_tokens.fc1"] == workload.config.dim
    assert tokens["blocks.0.mlp_channels.fc1"] == workload.config.num_patches == workload.tokens_per_sample


# Loading data: the real (offline) data sets are small enough for digits; the rest use fixtures.
DATA_WORKLOADS = ["digits-mlp", "digits-vit", "animal-mnist-vit", "vit-b16-imagenet", "gpt2-wikitext", "minilm-compress"]


@pytest.fixture(scope="module")
def loaded(workloads):
    cache = {}

    def load(name, seed=0):
        if (name, seed) not in cache:
            cache[name, seed] = workloads[name].load_data(seed=seed)
        return cache[name, seed]

    return load


def _rows(dataset):
    """A hashable identity for every item (its input tensor's bytes)."""
    rows = []
    for i in range(len(dataset)):
        item = dataset[i]
        first = item["input_ids"] if isinstance(item, dict) else item[0]
        rows.append(first.numpy().tobytes())
    return rows


@pytest.mark.parametrize("name", DATA_WORKLOADS)
def test_train_step_and_evaluate_on_loaded_data(name, workloads, loaded):
    workload = workloads[name]
    splits = loaded(name)
    assert isinstance(splits, DataSplits) and all(n > 0 for n in splits.sizes().values())
    torch.manual_seed(0)
    model = workload.build_model()
    batch = next(iter(splits.loader("train", 4, shuffle=True, seed=0)))
    loss = workload.loss(workload.forward(model, batch), batch)
    assert math.isfinite(loss.item())
    loss.backward()
    metrics = workload.evaluate(model, splits.val, batch_size=256, collate_fn=splits.collate_fn)
    assert math.isfinite(metrics["quality"]) and math.isfinite(metrics["loss"])


@pytest.mark.parametrize("name", ["digits-mlp", "animal-mnist-vit", "vit-b16-imagenet", "minilm-compress"])
def test_splits_are_disjoint_and_deterministic(name, workloads, loaded):
    splits = loaded(name)
    again = workloads[name].load_data(seed=0)
    rows = {split: _rows(splits[split]) for split in ("train", "val", "test")}
    if name == "vit-b16-imagenet":  # images decode with random crops; compare the file lists
        rows = {s: [str(p) for p, _ in splits[s].samples] for s in ("train", "val", "test")}
        assert rows == {s: [str(p) for p, _ in again[s].samples] for s in ("train", "val", "test")}
    else:
        assert rows == {s: _rows(again[s]) for s in ("train", "val", "test")}
    train, val, test = (set(rows[s]) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    other = workloads[name].load_data(seed=1)
    if name == "vit-b16-imagenet":
        assert [str(p) for p, _ in other.val.samples] != rows["val"]
    else:
        assert _rows(other.train) != rows["train"]


def test_animal_splits_are_disjoint_by_index_and_balanced():
    from gsmsearch.workloads._animal import read_animal_mnist
    from gsmsearch.workloads._splits import stratified_split_indices

    images, labels = read_animal_mnist()
    assert images.shape == (10000, 28, 28) and sorted(set(labels.tolist())) == list(range(10))
    train, val, test = stratified_split_indices(labels, (0.7, 0.1, 0.2), 0)
    assert len(train) + len(val) + len(test) == 10000
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    assert set((labels[test] == c).sum() for c in range(10)) == {200}


def test_animal_workload_drops_duplicate_images(workloads, loaded):
    splits = loaded("animal-mnist-vit")
    assert sum(splits.sizes().values()) == 9716
