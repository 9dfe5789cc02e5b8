"""Every built-in workload has train, validation and test splits that share no sample, of the
sizes its docstring states (the data read offline here: digits, Animal-MNIST, the pydoc
sentences; the folder-based workloads on the tiny on-disk fixtures)."""
from __future__ import annotations

import itertools

import pytest
import torch

from gsmsearch.workloads import get_workload


def _rows(dataset):
    """The samples of a TensorDataset split, one bytes key each (the inputs; standardisation is
    the same map for every split, so equal keys mean equal images)."""
    return [row.numpy().tobytes() for row in dataset.tensors[0]]


def _assert_disjoint(keys_by_split):
    for (a, keys_a), (b, keys_b) in itertools.combinations(keys_by_split.items(), 2):
        assert not set(keys_a) & set(keys_b), f"{a} and {b} share samples"
    for name, keys in keys_by_split.items():
        assert keys and len(set(keys)) == len(keys), f"{name}: empty, or a sample twice"


@pytest.mark.parametrize("name, sizes", [
    ("digits-mlp", {"train": 1078, "val": 359, "test": 360}),
    ("digits-vit", {"train": 1078, "val": 359, "test": 360}),
    ("animal-mnist-vit", {"train": 6801, "val": 972, "test": 1943}),
    ("animal-mnist-mixer", {"train": 6801, "val": 972, "test": 1943}),
])
@pytest.mark.parametrize("seed", [0, 3])
def test_image_splits_are_disjoint_and_of_the_documented_sizes(name, sizes, seed):
    splits = get_workload(name).load_data(seed=seed)
    assert splits.sizes() == sizes
    _assert_disjoint({split: _rows(splits[split]) for split in ("train", "val", "test")})


def test_the_seed_draws_other_validation_images():
    first, other = (get_workload("digits-mlp").load_data(seed=seed) for seed in (0, 3))
    assert set(_rows(first.val)) != set(_rows(other.val))


@pytest.mark.parametrize("options, sizes", [
    ({"max_sentences": 50}, {"train": 30, "val": 10, "test": 10}),
    ({"max_sentences": 3}, {"train": 2, "val": 1, "test": 1}),
])
def test_sentence_splits_are_disjoint(options, sizes):
    from gsmsearch.workloads._sentences import pydoc_sentences
    from gsmsearch.workloads._splits import split_indices

    splits = get_workload("minilm-compress", max_seq_length=32, **options).load_data(seed=0)
    assert splits.sizes() == sizes
    _assert_disjoint({split: splits[split].sentences for split in ("train", "val", "test")})
    _assert_disjoint({split: [tuple(ids) for ids in splits[split].token_ids] for split in ("train", "val", "test")})
    # the full data set's sizes, as the workload's docstring states them (CPython 3.11's pydoc)
    full = [len(part) for part in split_indices(len(pydoc_sentences()), (0.6, 0.2, 0.2), 0)]
    if len(pydoc_sentences()) == 1523:
        assert full == [914, 305, 304]
    assert sum(full) == len(pydoc_sentences())


def test_image_folder_validation_is_held_out_of_training(workload_options):
    workload = get_workload("vit-b16-imagenet", **workload_options["vit-b16-imagenet"])
    splits = workload.load_data(seed=0)
    paths = {split: [path for path, _ in splits[split].samples] for split in ("train", "val", "test")}
    _assert_disjoint(paths)
    assert all(path.parent.parent.name == "train" for path in paths["train"] + paths["val"])
    assert all(path.parent.parent.name == "val" for path in paths["test"])
    assert splits.train.train and not splits.val.train and not splits.test.train  # augmentation: training only


def test_image_folder_refuses_a_validation_fraction_that_holds_out_nothing(workload_options):
    options = {**workload_options["vit-b16-imagenet"], "val_fraction": 0.01}
    workload = get_workload("vit-b16-imagenet", **options)  # 6 training images per class
    with pytest.raises(ValueError, match=r"val_fraction 0.01 holds out no image of .*train' \(too few per class\); raise it"):
        workload.load_data(seed=0)


def test_text_splits_are_the_three_files(wikitext_gpt2, tmp_path):
    from gsmsearch.workloads._wikitext import SPLIT_FILES, load_gpt2_tokenizer

    _, checkpoint_dir = wikitext_gpt2
    texts = {"train": " the game began development in 2010 ." * 8, "val": " it retained the standard features ." * 8,
             "test": " such as making the game more forgiving ." * 8}
    for split, name in zip(("train", "val", "test"), SPLIT_FILES):
        (tmp_path / name).write_text(texts[split], encoding="utf-8")
    workload = get_workload("gpt2-wikitext", data_dir=tmp_path, checkpoint_dir=checkpoint_dir, context_length=8)
    splits = workload.load_data()
    tokenizer = load_gpt2_tokenizer(checkpoint_dir)
    for split in ("train", "val", "test"):
        ids = torch.tensor(tokenizer.encode(texts[split]).ids)
        blocks = len(ids) // 8
        assert torch.equal(splits[split].tensors[0], ids[: blocks * 8].view(blocks, 8))
