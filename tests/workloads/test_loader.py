"""``make_loader`` reads a TensorDataset a batch at a time and yields what the default DataLoader
yields: the same batches, in the same order, with the same values, and the same use of the
shuffle generator and of torch's global generator (so a trial's training is unchanged)."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gsmsearch.workloads._registry import make_loader


def _dataset(n=203):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 5, 3, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 16, 64, 500])
def test_same_batches_as_the_default_loader(shuffle, drop_last, batch_size):
    data = _dataset()
    default_gen, ours_gen = (torch.Generator().manual_seed(7) if shuffle else None for _ in range(2))
    default = DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=default_gen, drop_last=drop_last)
    ours = make_loader(data, batch_size, shuffle=shuffle, generator=ours_gen, drop_last=drop_last)
    assert len(ours) == len(default)
    for epoch in range(2):  # a second pass continues from the generator's state
        torch.manual_seed(epoch)
        expected = [tuple(part.clone() for part in batch) for batch in default]
        after_default = torch.get_rng_state()
        torch.manual_seed(epoch)
        got = list(ours)
        assert torch.equal(torch.get_rng_state(), after_default)
        assert len(got) == len(expected) == (203 // batch_size if drop_last else -(-203 // batch_size))
        for (x, y), (ex, ey) in zip(got, expected):
            assert torch.equal(x, ex) and torch.equal(y, ey)
            assert x.dtype == ex.dtype and y.dtype == ey.dtype and x.is_contiguous()
    if shuffle:
        assert torch.equal(ours_gen.get_state(), default_gen.get_state())


def test_a_custom_collation_keeps_the_default_path():
    data = _dataset(10)
    loader = make_loader(data, 4, collate_fn=lambda samples: len(samples))
    assert list(loader) == [4, 4, 2]
