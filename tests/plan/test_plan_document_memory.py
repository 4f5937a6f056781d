"""The planner's attention term with packed documents is what autograd really saves, linear in the sequence.

Saved bytes are read with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once) over one
MLA forward, with and without document ids; the planner's per-token difference between the two
layouts must be exactly the measured one, and both must be linear in the sequence length.
"""

from __future__ import annotations

import torch

from xoron_dist.config import load_config
from xoron_dist.model.llm.attention import MultiLatentAttention
from xoron_dist.plan.memory import layer_activation_bytes


def _saved_bytes(mla: MultiLatentAttention, seq: int, packed: bool) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(1, seq, mla.kv_down.in_features, requires_grad=True)
    angles = torch.rand(1, seq, mla.rope_dim // 2)
    ids = (torch.arange(seq) // 7)[None] if packed else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mla(x, (angles.cos(), angles.sin()), torch.arange(seq)[None], document_ids=ids)
    return sum(storages.values())


def test_packed_documents_term_equals_what_autograd_saves_and_is_linear_in_seq():
    llm = load_config(None, ["preset=tiny"]).llm
    torch.manual_seed(0)
    mla = MultiLatentAttention(llm)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.1)
    planned = (layer_activation_bytes(llm, 0, 1, False, 4, packed_documents=True)
               - layer_activation_bytes(llm, 0, 1, False, 4, packed_documents=False))
    for seq in (70, 140):
        measured = _saved_bytes(mla, seq, packed=True) - _saved_bytes(mla, seq, packed=False)
        assert measured == planned * seq, (seq, measured, planned * seq)

