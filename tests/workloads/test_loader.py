"""``make_loader`` reads a TensorDataset a batch at a time and yields what the default DataLoader
yields: the same batches, in the same order, with the same values, and the same use of the
shuffle generator and of torch's global generator (so a trial's training is unchanged)."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gsmsearch.workloads._registry import make_loader, share_of


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


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("custom_collation", [False, True])
def test_a_sharded_loader_gives_each_rank_its_share_of_the_one_process_batches(world_size, custom_collation):
    """With ``shard=(rank, world)`` every rank's loader yields its contiguous slice of each batch
    the one-process loader yields (same shuffle, same generator use), the slices in rank order
    making up the batch; the collation sees only the rank's samples; a rank with an empty share
    of the last batch (10 samples, batches of 4: the last holds 2) gets that batch's first
    sample."""
    data = _dataset(10)
    seen = []

    def collate(samples):  # records how many samples each rank's collation was handed
        seen.append(len(samples))
        return tuple(torch.stack(parts) for parts in zip(*samples))

    collate_fn = collate if custom_collation else None
    whole = [tuple(part.clone() for part in batch) for batch in make_loader(
        data, 4, shuffle=True, generator=torch.Generator().manual_seed(3), collate_fn=collate_fn)]
    seen.clear()
    shares = []
    for rank in range(world_size):
        generator = torch.Generator().manual_seed(3)
        loader = make_loader(data, 4, shuffle=True, generator=generator, collate_fn=collate_fn,
                             shard=(rank, world_size))
        assert len(loader) == len(whole) == 3
        shares.append(list(loader))
    for step, batch in enumerate(whole):
        total = batch[0].shape[0]
        parts = []
        for rank in range(world_size):
            start, size = share_of(total, rank, world_size)
            x, y = shares[rank][step]
            if size:
                assert torch.equal(x, batch[0][start:start + size]) and torch.equal(y, batch[1][start:start + size])
                parts.append(x)
            else:  # world 3, last batch of 2: rank 2 holds the batch's first sample, weighted 0
                assert world_size == 3 and step == 2 and rank == 2
                assert torch.equal(x, batch[0][:1])
        assert torch.equal(torch.cat(parts), batch[0])
    if custom_collation:
        expected = [share_of(n, rank, world_size)[1] or 1 for rank in range(world_size) for n in (4, 4, 2)]
        assert seen == expected
