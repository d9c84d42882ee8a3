"""Speed machinery that must not change what is computed: data.BatchLoader / FixedBatches (batches read
ahead in DataLoader workers) against reading in the training process, exact resume of the sampler."""
import os

import pytest
import torch

import data


class _Toy(data._ServeOrSkip):
    """Item i: {"x": tensor [i, use, epoch]}, the worker's pid; a DataError for the indices in `bad`."""

    def __init__(self, n: int, bad=(), on_error: str = "raise"):
        super().__init__(None, 0, on_error, data.Skips())
        self.n, self.bad, self.use, self.epoch = n, set(bad), 0, 0

    def __len__(self) -> int:
        return self.n

    def _item(self, i: int) -> dict:
        if i in self.bad:
            raise data.DataError("broken image", "toy.json", i)
        return {"x": torch.tensor([i, self.use, self.epoch]), "pid": os.getpid()}


def _collate(items):
    return {"x": torch.stack([it["x"] for it in items]), "pids": {it["pid"] for it in items}}


def _setup(ds, epoch, k):
    ds.use, ds.epoch = 100 + k // 2, epoch


def _by_hand(n_items, seed, n, steps, start=None):
    """What the training loops did: take n, set use / epoch as _setup says, read the items here."""
    s = data.ResumableSampler(n_items, seed=seed)
    if start:
        s.load_state_dict(start)
    out = []
    for k in range(steps):
        idx = s.take(n)
        out.append(torch.tensor([[i, 100 + k // 2, s.epoch] for i in idx]))
    return out, s.state_dict()


def test_batch_loader_in_workers_is_the_in_process_loop_and_resumes_exactly():
    n_items, n = 10, 3                                            # 3 per batch over 10 items: epochs roll over
    want, state_after = _by_hand(n_items, 4, n, 7)
    for workers in (0, 2):
        ds = _Toy(n_items)
        sampler = data.ResumableSampler(n_items, seed=4)
        loader = data.BatchLoader(ds, sampler, n, _collate, workers, prefetch=3, setup=_setup)
        got = [loader.next() for _ in range(7)]
        assert all(torch.equal(g["x"], w) for g, w in zip(got, want))
        # the sampler that checkpoints save is at what was handed out, not at what the workers read ahead
        assert sampler.state_dict() == state_after
        assert all((g["pids"] == {os.getpid()}) == (workers == 0) for g in got)   # read in workers
        loader.close()
    # resume: a new sampler loaded from the state after 4 batches, a new loader -> the batches 5..7
    _, mid = _by_hand(n_items, 4, n, 4)
    s2 = data.ResumableSampler(n_items, seed=4)
    s2.load_state_dict(mid)
    ds = _Toy(n_items)
    loader = data.BatchLoader(ds, s2, n, _collate, 2, setup=lambda d, e, k: _setup(d, e, k + 4))
    for k in range(4, 7):
        assert torch.equal(loader.next()["x"], want[k])


def test_batch_loader_leaves_the_global_rng_alone():
    """Checkpoints save the global RNG: starting the workers must not draw from it."""
    torch.manual_seed(11)
    want = torch.rand(3)
    torch.manual_seed(11)
    loader = data.BatchLoader(_Toy(6), data.ResumableSampler(6), 2, _collate, 2)
    loader.next()
    assert torch.equal(torch.rand(3), want)


def test_batch_loader_errors_and_skips_arrive_as_read_here():
    """A DataError in a worker is raised at next() as it was raised (type and message naming file and
    record); with on_error skip the worker's skips are counted in the dataset's Skips of this process
    and the next record is served, as in-process reading does."""
    s = data.ResumableSampler(8, shuffle=False)
    loader = data.BatchLoader(_Toy(8, bad={4}), s, 2, _collate, 2)
    assert loader.next()["x"][:, 0].tolist() == [0, 1]
    assert loader.next()["x"][:, 0].tolist() == [2, 3]
    with pytest.raises(data.DataError, match=r"^toy.json: record 4: broken image$"):
        loader.next()
    got = {}
    for workers in (0, 2):
        ds = _Toy(8, bad={4, 5}, on_error="skip")
        loader = data.BatchLoader(ds, data.ResumableSampler(8, shuffle=False), 4, _collate, workers)
        got[workers] = [loader.next()["x"][:, 0].tolist() for _ in range(2)], ds.skips.count, ds.skips.reasons
    assert got[0] == got[2]
    assert got[2][0] == [[0, 1, 2, 3], [6, 6, 6, 7]] and got[2][1] == 3   # 4 -> 5 -> 6 (two skips), 5 -> 6


def test_fixed_batches_are_read_when_iterated():
    ds = _Toy(7)
    lists = [[0, 1, 2], [3, 4, 5], [6]]
    for workers in (0, 2):
        fb = data.FixedBatches(ds, lists, _collate, workers)
        for _ in range(2):   # iterable again, as every evaluation reads it
            got = [b["x"][:, 0].tolist() for b in fb]
            assert got == lists and len(fb) == 3
