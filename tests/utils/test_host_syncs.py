"""HostSyncCounter sees every kind of device-to-host sync it names, and nothing else."""

from __future__ import annotations

import pytest
import torch

from xoron_dist.utils.host_syncs import (
    HostSyncCounter,
    TensorMemo,
    host_copy,
    host_list,
    keep_host_copy,
    mask_lengths,
    on_host,
    prefix_mask,
    select_rows,
    upload,
    with_host_copy,
)


def test_counts_host_reads_and_value_shaped_ops():
    t = torch.tensor([3, 0, 2, 2])
    with HostSyncCounter() as syncs:
        t.tolist()
        t[0].item()
        if t[0] > 1:
            int(t[1])
        float(t[2])
        torch.bincount(t)
        t.nonzero()
        t[t > 1]
        torch.unique(t)
        torch.repeat_interleave(t, t)
        t.repeat_interleave(2)  # a fixed count: no sync
        torch.equal(t, t)
        t.allclose(t)
    assert syncs.calls == {"tolist": 1, "item": 1, "__bool__": 1, "__int__": 1, "__float__": 1, "bincount": 1,
                           "nonzero": 1, "boolean-mask indexing": 1, "unique": 1, "repeat_interleave": 1,
                           "equal": 1, "allclose": 1}
    assert syncs.total == 12


def test_device_side_work_is_not_counted():
    x = torch.randn(16, 8, requires_grad=True)
    idx = torch.randint(0, 16, (32,))
    with HostSyncCounter() as syncs:
        order = idx.argsort(stable=True)
        ends = torch.searchsorted(idx[order], torch.arange(1, 17))
        out = torch.zeros(16, 8).index_add_(0, idx[order], x[idx[order]] * ends[:1].float())
        out.square().sum().backward()
    assert syncs.total == 0, syncs.calls


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # the tensor case below, on purpose
def test_host_values_made_on_a_device_are_counted_and_upload_is_not():
    device = torch.ones(1).device  # the compute device; on CUDA these would be copies that drain the stream
    with HostSyncCounter() as syncs:
        torch.tensor([1, 2], device=device)
        torch.as_tensor([1.0], dtype=torch.float32, device=device)
        torch.tensor([1, 2])  # on the host: nothing to wait for
        torch.tensor([1, 2], device="cpu")  # the CPU on purpose
        torch.tensor(torch.ones(2), device=device)  # a tensor already: its copy is not a host-values upload
        made = upload([3, 4], device=device, dtype=torch.int64)
    assert syncs.calls == {"host-to-device copy": 2}, syncs.calls
    assert made.tolist() == [3, 4] and made.dtype == torch.int64


def test_upload_to_an_accelerator_goes_through_pinned_memory_without_blocking(monkeypatch):
    """The accelerator branch, against stand-ins: ``meta`` for the device, a recording ``pin_memory`` (a
    CPU-only torch cannot pin) and ``to`` recording its ``non_blocking``."""
    pinned, moves = [], []
    real_to = torch.Tensor.to

    def pin_memory(self):
        pinned.append(self.tolist())
        return self

    def to(self, *args, **kwargs):
        moves.append(kwargs.get("non_blocking"))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    made = upload([[1, 2], [3, 4]], device=torch.device("meta"), dtype=torch.int32)
    assert made.device.type == "meta" and made.shape == (2, 2) and made.dtype == torch.int32
    assert pinned == [[[1, 2], [3, 4]]] and moves == [True]


@pytest.mark.parametrize("values", [[], 3, [[1.5]]])
def test_upload_makes_what_torch_tensor_makes(values):
    torch.testing.assert_close(upload(values, device="cpu"), torch.tensor(values))


def test_a_moved_tensor_is_read_from_its_host_copy(monkeypatch):
    """``meta`` stands in for the GPU (no values to read: a right answer comes from the host copy)."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # upload's accelerator path, CPU-only torch
    host = torch.tensor([[0, 1, 2], [1, 3, 4], [0, 9, 4]])
    moved = host.to("meta")
    keep_host_copy(host, moved)
    host[0, 0] = 7  # the copy is the batch's at the move, not a view of the loader's buffer
    with HostSyncCounter() as syncs:
        assert host_list(moved) == [[0, 1, 2], [1, 3, 4], [0, 9, 4]]
        taken = select_rows(moved, [2, 0])
        assert taken.device.type == "meta" and taken.shape == (2, 3)
        assert host_list(taken) == [[0, 9, 4], [0, 1, 2]]
        again = moved.to("meta")  # moved again (a copy on the device): the copy travels on
        keep_host_copy(moved, again)
        assert host_list(again) == host_list(moved)
        unmarked = torch.ones(2, device="meta")
        keep_host_copy(unmarked, unmarked)  # a device tensor is never marked as host memory
        assert host_copy(unmarked) is None
    assert syncs.total == 0, syncs.calls
    on_cpu = torch.tensor([5, 6])
    keep_host_copy(on_cpu, on_cpu)  # a CPU run: the move was no move, its own values are the host's
    with HostSyncCounter() as syncs:
        assert host_list(on_cpu) == [5, 6] and host_list(select_rows(on_cpu, [1])) == [6]
        assert host_list(torch.tensor([1])) == [1]  # no host copy: a read
    assert syncs.calls == {"tolist": 1}, syncs.calls


def _reads_twice(t: torch.Tensor) -> int:
    return int(t.sum()) + len(t.tolist())


def test_where_names_the_calling_line():
    t = torch.tensor([1, 2])
    with HostSyncCounter(where=True) as syncs:
        _reads_twice(t)
    line = _reads_twice.__code__.co_firstlineno + 1
    assert syncs.sites == {f"utils/test_host_syncs.py:{line} __int__": 1,
                           f"utils/test_host_syncs.py:{line} tolist": 1}


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        grad.sum().item()  # a read the autograd engine runs, with no torch-function mode active
        return grad * 2


def test_reads_in_backward_and_in_a_checkpoint_recompute_are_counted():
    from torch.utils.checkpoint import checkpoint

    def block(x):
        x.sum().tolist()  # read in the forward and again when backward recomputes it
        return (x * x).sin()

    x = torch.randn(4, requires_grad=True)
    with HostSyncCounter() as syncs:
        _ReadsInBackward.apply(x).sum().backward()
        checkpoint(block, x, use_reentrant=False).sum().backward()
    assert syncs.calls == {"item": 1, "tolist": 2}


def test_nested_calls_count_once_and_counters_nest():
    t = torch.tensor([3, 1, 3])
    with HostSyncCounter() as outer:
        t.unique()  # Tensor.unique calls torch.unique
        with HostSyncCounter() as inner:
            t.nonzero()
    assert outer.calls == {"unique": 1, "nonzero": 1} and inner.calls == {"nonzero": 1}
    assert "item" not in vars(torch.Tensor) and torch.nonzero is torch._C._VariableFunctions.nonzero  # restored


def test_reads_and_derived_masks_come_from_the_host_copies(monkeypatch):
    """``on_host`` reads several tensors' host copies at once; ``with_host_copy`` gives a tensor derived from
    them its own; ``prefix_mask`` makes a mask with one. ``meta`` stands in for the GPU (it has no values: a
    right answer comes from the host)."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # upload's accelerator path, CPU-only torch
    mask = prefix_mask([2, 0, 3], 4, "meta")
    assert mask.device.type == "meta" and mask.dtype == torch.bool and mask.shape == (3, 4)
    drop = upload([False, True, False], device="meta", keep_host=True)
    with HostSyncCounter() as syncs:
        assert host_list(mask) == [[True, True, False, False], [False] * 4, [True, True, True, False]]
        assert mask_lengths(mask) == [2, 0, 3]
        assert on_host(lambda m, d, none: (m.sum(1) * ~d).tolist() if none is None else None, mask, drop, None) \
            == [2, 0, 3]
        derived = with_host_copy(lambda m, d: m & ~d[:, None], mask, drop)
        assert derived.device.type == "meta" and host_list(derived)[1:] == [[False] * 4, [True] * 3 + [False]]
    assert syncs.total == 0, syncs.calls
    # one input without a host copy: the derived tensor keeps none, and a read of it reads the device
    assert host_copy(with_host_copy(lambda m, o: m & o, mask, torch.ones(3, 4, dtype=torch.bool, device="meta"))) \
        is None
    with HostSyncCounter() as syncs:
        plain = torch.tensor([[True, False]])
        assert on_host(lambda m, d: m.sum().tolist(), plain, drop) == 1  # ``plain`` keeps no copy: read itself
        assert on_host(lambda m: 1 / 0, plain, otherwise=lambda: "what the device has") == "what the device has"
        assert on_host(len, mask, otherwise=lambda: 1 / 0) == 3  # with copies, ``otherwise`` is not called
    assert syncs.calls == {"tolist": 1}, syncs.calls
    # all in host memory (a CPU run): the derived tensor is marked as host memory itself, no second copy
    on_cpu = prefix_mask([1, 2], 2, "cpu")
    derived = with_host_copy(lambda m: m.sum(1), on_cpu)
    assert host_copy(derived) is derived and derived.tolist() == [1, 2]


def test_upload_moves_a_host_tensor_and_refuses_a_device_one():
    host = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    made = upload(host, device="cpu", dtype=torch.int64, keep_host=True)
    assert made.dtype == torch.int64 and made.tolist() == [[1, 0], [0, 1]] and host_copy(made) is made
    with pytest.raises(ValueError, match="on meta already"):
        upload(torch.ones(2, device="meta"), device="cpu")


def test_tensor_memo_recomputes_for_another_tensor_or_an_in_place_write():
    memo, calls = TensorMemo(), []

    def make(t):
        calls.append(t)
        return int(t.sum())

    a = torch.tensor([1, 2])
    assert memo.get(a, make) == memo.get(a, make) == 3 and len(calls) == 1
    a.add_(1)  # a new version of the same tensor
    assert memo.get(a, make) == 5 and len(calls) == 2
    b = torch.tensor([1, 2])  # equal values, another tensor
    assert memo.get(b, make) == 3 and len(calls) == 3
    b.add_(10)
    memo.put(b, 23)  # the caller knows the value after its own update: no recompute
    assert memo.get(b, make) == 23 and len(calls) == 3
