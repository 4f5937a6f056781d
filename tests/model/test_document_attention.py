"""Packed-document attention without an (s x s) mask equals the masked reference, and never allocates s² elements.

Oracles: SDPA with the dense (batch, 1, s, s) document mask (``attention_mask``), and MLA run on every
document on its own. The memory check records the shape of every tensor any ATen op makes (a
``TorchDispatchMode``), so it does not depend on timing or on the allocator; the same recorder sees
the s² mask of the masked reference, so it can fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import xoron_dist.model.common.attention_kernels as ak
from tests.model import cuda_sdpa_emulator as emu
from xoron_dist.config import load_config
from xoron_dist.model.common.document_attention import DocumentLayout, DocumentLayoutCache, document_attention
from xoron_dist.model.llm.attention import MultiLatentAttention, attention_mask


class LargestTensor(TorchDispatchMode):
    """Records the largest element count of any tensor an ATen op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _documents(batch: int, seq: int, seed: int) -> torch.Tensor:
    """(batch, seq) ids: random boundaries, single-token documents, and one id that comes back later in the row."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq, generator=gen) < 0.15
    starts[:, 0] = True
    starts[0, 5:8] = True  # three one-token documents
    ids = starts.long().cumsum(-1)
    ids[1, -3:] = ids[1, 0]  # not adjacent: still one document (the mask's semantics: same id)
    return ids + 40  # ids need not start at 0


def _masked_reference(q, k, v, ids, scale):
    seq = q.shape[1]
    order = torch.arange(seq).expand(q.shape[0], -1)
    mask = attention_mask(order, order, ids, ids)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("device", ["cpu", "emulated_cuda"])
def test_document_attention_equals_the_masked_reference_forward_and_backward(monkeypatch, device):
    if device == "emulated_cuda":
        monkeypatch.setattr(ak, "_device_type", lambda t: "cuda")
        monkeypatch.setattr(ak, "CUDA_OPS", emu.EMULATED_CUDA_OPS)
    gen = torch.Generator().manual_seed(0)
    b, s, h, d, dv = 2, 64, 3, 12, 7
    q, k = (torch.randn(b, s, h, d, generator=gen) for _ in range(2))
    v, dout = (torch.randn(b, s, h, dv, generator=gen) for _ in range(2))
    ids = _documents(b, s, 1)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = document_attention(*ours, DocumentLayout.from_ids(ids), scale=0.3)
    expected = _masked_reference(*ref, ids, 0.3)
    out.backward(dout)
    expected.backward(dout)
    assert (out - expected).abs().max() <= 1e-5
    for a, r in zip(ours, ref, strict=True):
        assert (a.grad - r.grad).abs().max() <= 1e-5


def test_layout_groups_documents_by_length_and_inverts():
    ids = torch.tensor([[7, 7, 8, 9, 9, 7], [1, 1, 1, 1, 2, 2]])
    layout = DocumentLayout.from_ids(ids)
    assert [(length, index.tolist()) for length, index in layout.groups] == [
        (1, [[2]]), (2, [[3, 4], [10, 11]]), (3, [[0, 1, 5]]), (4, [[6, 7, 8, 9]])]
    concatenated = torch.cat([index.flatten() for _, index in layout.groups])
    assert concatenated[layout.inverse].tolist() == list(range(12))
    with pytest.raises(ValueError, match=r"document_ids must be \(batch, seq\) integers"):
        DocumentLayout.from_ids(ids.float())


def test_layout_from_ids_with_a_host_copy_reads_nothing_and_is_the_same(monkeypatch):
    """A batch moved to the device keeps its ids' host copy: the lengths come from it (``meta`` stands in
    for the GPU: it has no values, so the right groups can only come from the copy)."""
    from xoron_dist.utils.host_syncs import HostSyncCounter, keep_host_copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # upload's accelerator path, CPU torch
    ids = torch.tensor([[7, 7, 8, 9, 9, 7], [1, 1, 1, 1, 2, 2]])
    moved = ids.to("meta")
    keep_host_copy(ids, moved)
    with HostSyncCounter() as syncs:
        layout = DocumentLayout.from_ids(moved)
    assert syncs.total == 0, syncs.calls
    assert [(length, tuple(index.shape)) for length, index in layout.groups] == [(1, (1, 1)), (2, (2, 2)),
                                                                                  (3, (1, 3)), (4, (1, 4))]
    with HostSyncCounter() as syncs:  # without a copy: the one read
        DocumentLayout.from_ids(ids.clone())
    assert syncs.total == 2, syncs.calls  # unique_consecutive (its output size) and its tolist


def test_layout_cache_computes_once_per_batch_tensor():
    cache = DocumentLayoutCache()
    ids = torch.tensor([[0, 0, 1]])
    first = cache(ids)
    assert cache(ids) is first  # every layer of one forward
    assert cache(ids.clone()) is not first  # another batch
    again = cache(ids)
    ids[0, 2] = 0  # changed in place: recomputed
    assert cache(ids) is not again and len(cache(ids).groups) == 1


def _tiny_mla(seed: int = 0) -> MultiLatentAttention:
    cfg = load_config(None, ["preset=tiny"]).llm
    torch.manual_seed(seed)
    mla = MultiLatentAttention(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return mla


def _rope(batch: int, seq: int, rope_dim: int, seed: int):
    angles = torch.rand(batch, seq, rope_dim // 2, generator=torch.Generator().manual_seed(seed)) * 6
    return angles.cos(), angles.sin()


def test_mla_with_packed_documents_equals_each_document_run_alone():
    mla = _tiny_mla()
    b, s = 2, 48
    x = torch.randn(b, s, mla.kv_down.in_features, generator=torch.Generator().manual_seed(2))
    cos, sin = _rope(b, s, mla.rope_dim, 3)
    ids = _documents(b, s, 4)
    positions = torch.arange(s).expand(b, -1)
    out = mla(x, (cos, sin), positions, document_ids=ids)
    for row in range(b):
        for doc in ids[row].unique():
            cols = (ids[row] == doc).nonzero()[:, 0]
            alone = mla(x[row : row + 1, cols], (cos[row : row + 1, cols], sin[row : row + 1, cols]),
                        positions[row : row + 1, cols])
            assert (out[row, cols] - alone[0]).abs().max() <= 1e-5, (row, doc.item())


def test_packed_documents_never_allocate_a_seq_squared_tensor():
    mla = _tiny_mla()
    b, s = 1, 1024  # q is b*s*heads*24 = 98K elements; an s x s mask is 1M
    x = torch.randn(b, s, mla.kv_down.in_features, requires_grad=True)
    cos, sin = _rope(b, s, mla.rope_dim, 5)
    ids = (torch.arange(s) // 100)[None]  # documents of 100 tokens: the longest's scores are 100² = 10K
    positions = torch.arange(s)[None]
    ours = LargestTensor()
    with ours:
        mla(x, (cos, sin), positions, document_ids=ids).sum().backward()
    assert ours.largest < s * s // 4, ours.largest
    reference = LargestTensor()  # the recorder sees the dense mask of the reference: the check can fail
    with reference:
        q = torch.randn(b, s, 2, 8)
        _masked_reference(q, q, q, ids, 0.3)
    assert reference.largest >= s * s


def test_attention_dropout_still_applies_with_and_without_documents():
    cfg = load_config(None, ["preset=tiny", "model.llm.attention_dropout=0.5"]).llm
    torch.manual_seed(0)
    mla = MultiLatentAttention(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    b, s = 1, 32
    x = torch.randn(b, s, cfg.hidden_size)
    rope, positions = _rope(b, s, mla.rope_dim, 6), torch.arange(s)[None]
    for ids in (None, (torch.arange(s) // 10)[None]):
        mla.train()
        first, second = (mla(x, rope, positions, document_ids=ids) for _ in range(2))
        assert not torch.allclose(first, second)  # dropout drew different masks
        mla.eval()
        assert torch.equal(mla(x, rope, positions, document_ids=ids), mla(x, rope, positions, document_ids=ids))
