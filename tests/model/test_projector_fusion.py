"""Perceiver resampler and gated cross-attention fusion: fixed token counts, masks, identity at init,
and packed documents that never see each other's media."""

import pytest
import torch

from tests.model.test_xoron_multimodal import packed_batch, tiny_cfg
from xoron_dist.config import FusionConfig, ProjectorConfig
from xoron_dist.model.fusion import FusionLayers, MediaContext
from xoron_dist.model.modalities import BY_NAME
from xoron_dist.model.xoron import XoronMultimodalModel, fill_spans


def test_resampler_emits_the_configured_tokens_and_ignores_padding():
    from xoron_dist.model.common.perceiver import PerceiverResampler

    torch.manual_seed(0)
    proj = PerceiverResampler(in_dim=24, hidden=64, num_latents=5, cfg=ProjectorConfig(2, 4, 96))
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 9, 24, generator=gen)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False  # the second sample has 6 real features
    out = proj(features, mask)
    assert out.shape == (2, 5, 64)
    garbage = features.clone()
    garbage[1, 6:] = 1e3
    torch.testing.assert_close(proj(garbage, mask), out, rtol=0, atol=1e-6)
    alone = proj(features[1:, :6])  # same as batched with padding
    torch.testing.assert_close(alone, out[1:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(proj(features[1:], None), out[1:], atol=1e-3)  # the mask is what hides them
    assert proj(features, mask, [5, 5]).shape == (2, 5, 64)  # the spans it fills, as host ints
    with pytest.raises(ValueError, match=r"emits 5 tokens per medium; spans of \[4, 5\] tokens were asked for"):
        proj(features, mask, [5, 4])


def test_media_context_sees_only_own_document_and_earlier_media():
    tokens = torch.randn(2, 4, 8)
    spans = torch.tensor([[0, 3, 4], [1, 2, 4]])
    docs = torch.tensor([[0] * 8 + [1] * 4, [0] * 12])
    ctx = MediaContext.build([(tokens, spans)], 2, 12, docs)
    sees = torch.zeros(2, 12, dtype=torch.bool)
    rows = torch.arange(2)[:, None].expand_as(ctx.queries)
    sees[rows[ctx.valid], ctx.queries[ctx.valid]] = True
    # row 0: the medium at 3 belongs to document 0 (positions 0-7): positions 3-7 read it, not 0-2 or document 1
    assert sees[0].tolist() == [False] * 3 + [True] * 5 + [False] * 4
    assert sees[1].tolist() == [False] * 2 + [True] * 10
    assert ctx.tokens.shape == (2, 4, 8) and torch.equal(ctx.tokens[1], tokens[1])
    assert MediaContext.build([(tokens[:0], spans[:0])], 2, 12, docs) is None


@pytest.mark.parametrize("seed", range(4))
def test_media_context_sizes_its_queries_on_the_host(seed):
    """``build`` sizes its queries (the most fusing positions of a row) from the media's rows and starts and
    the host copies of the document ids and positions, without a sync: equal to counting the device's
    ``sees``, for random packed documents, two modalities, an empty medium and a zig-zag half of the rows."""
    from xoron_dist.parallel.sequence import zigzag_positions
    from xoron_dist.utils.host_syncs import HostSyncCounter, keep_host_copy

    rng = torch.Generator().manual_seed(seed)
    batch, seq = 3, 16
    docs = torch.randint(0, 3, (batch, seq), generator=rng).sort(dim=1).values
    media = []
    for n, width in ((3, 2), (2, 3)):
        rows, starts = torch.randint(0, batch, (n, 1), generator=rng), torch.randint(0, seq, (n, 1), generator=rng)
        spans = torch.cat([rows, starts, torch.full((n, 1), width)], dim=1)
        spans[0, 2] = 0 if width == 3 else width  # an empty medium of the second modality: nothing to see
        keep_host_copy(spans, spans)
        media.append((torch.randn(n, width, 4, generator=rng), spans))
    keep_host_copy(docs, docs)
    for positions in (None, zigzag_positions(seq, 1, 2)):
        if positions is not None:
            keep_host_copy(positions, positions)
        with HostSyncCounter() as syncs:
            ctx = MediaContext.build(media, batch, seq, docs, positions)
        assert syncs.total == 0, syncs.calls
        query_pos = torch.arange(seq) if positions is None else positions
        sees = torch.zeros(batch, len(query_pos), dtype=torch.bool)
        for _, spans in media:
            for row, start, length in spans.tolist():
                if length:
                    sees[row] |= (docs[row, query_pos] == docs[row, start]) & (query_pos >= start)
        assert ctx.queries.shape[1] == max(int(sees.sum(1).max()), 1)
        assert ctx.valid.sum(1).tolist() == sees.sum(1).tolist()


def test_scatter_writes_only_the_valid_queries_with_their_gradients_and_reads_nothing():
    """Row 0 fuses at 5 positions, row 1 at 10: row 0's last 5 queries are invalid (positions that fuse
    nothing), kept as they were; against the boolean-mask write it replaced, values and gradients."""
    from xoron_dist.utils.host_syncs import HostSyncCounter

    spans = torch.tensor([[0, 3, 4], [1, 2, 4]])
    docs = torch.tensor([[0] * 8 + [1] * 4, [0] * 12])
    ctx = MediaContext.build([(torch.randn(2, 4, 8), spans)], 2, 12, docs)
    assert ctx.valid.sum(1).tolist() == [5, 10]
    x = torch.randn(2, 12, 8, requires_grad=True)
    fused = torch.randn(2, ctx.queries.shape[1], 8, requires_grad=True)
    weight = torch.randn(2, 12, 8)
    with HostSyncCounter() as syncs:
        out = ctx.scatter(x, fused)
    assert syncs.total == 0, syncs.calls
    grads = torch.autograd.grad((out * weight).sum(), (x, fused))
    rows = torch.arange(2)[:, None].expand_as(ctx.queries)
    valid = (rows[ctx.valid], ctx.queries[ctx.valid])
    expected = x.index_put(valid, fused[ctx.valid])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want in zip(grads, torch.autograd.grad((expected * weight).sum(), (x, fused)), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fill_spans_writes_each_medium_emitted_tokens_and_checks_the_spans_on_the_host():
    from xoron_dist.utils.host_syncs import HostSyncCounter, keep_host_copy

    embeds = torch.randn(2, 10, 4, requires_grad=True)
    tokens = torch.randn(3, 4, 4, requires_grad=True)  # medium 1 emits 2 of its 4 rows, medium 2 three
    spans = torch.tensor([[0, 1, 4], [0, 7, 2], [1, 0, 3]])
    keep_host_copy(spans, spans)  # as the batch's move gives it
    with HostSyncCounter() as syncs:
        out = fill_spans(embeds, tokens, spans, BY_NAME["audio"], [4, 2, 3])
    assert syncs.total == 0, syncs.calls
    expected = embeds.detach().clone()
    expected[0, 1:5], expected[0, 7:9], expected[1, 0:3] = tokens[0], tokens[1, :2], tokens[2, :3]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert tokens.grad[:, :, 0].tolist() == [[1.0] * 4, [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    assert embeds.grad[0, :, 0].tolist() == [1.0, 0, 0, 0, 0, 1.0, 1.0, 0, 0, 1.0]
    with pytest.raises(ValueError, match=r"audio 1's span has 2 placeholders but the audio projector emits 3 tokens"):
        fill_spans(embeds, tokens, spans, BY_NAME["audio"], [4, 3, 3])


def test_fusion_at_init_is_the_identity():
    """The multimodal model equals the text-only LLM fed the same (span-filled) embeddings, bit for bit."""
    torch.manual_seed(0)
    model = XoronMultimodalModel(tiny_cfg()).eval()
    batch = packed_batch()
    out = model(**batch)
    embeds = model.llm.embed_tokens(batch["input_ids"])
    embeds = fill_spans(embeds, model.encode("image", batch["images"]), batch["image_spans"], BY_NAME["image"])
    embeds = fill_spans(embeds, model.encode("video", batch["videos"]), batch["video_spans"], BY_NAME["video"])
    ref = model.llm(inputs_embeds=embeds, labels=batch["labels"], position_ids=batch["position_ids"],
                    document_ids=batch["document_ids"])
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    # and the layers are really there: open gates change the result
    with torch.no_grad():
        model.fusion.layers[0].attn_gate.fill_(1.0)
    assert not torch.allclose(model(**batch).logits, ref.logits, atol=1e-4)


def _open_gates(model):
    with torch.no_grad():
        for layer in model.fusion.layers:
            layer.attn_gate.fill_(1.0)
            layer.ffn_gate.fill_(1.0)


# Across documents of a row, outputs are compared to 1e-6, not bit for bit: the LLM's experts run one
# matmul per expert over the row's tokens, and when another document's tokens route differently the
# matmul's row count (and so its blocking) may change the last bit of a sum.
def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_packed_documents_never_see_each_others_media():
    torch.manual_seed(0)
    model = XoronMultimodalModel(tiny_cfg()).eval()
    _open_gates(model)  # fusion active: isolation must hold through it too
    batch = packed_batch()
    base = model(**batch).logits
    other = dict(batch, images=[torch.zeros_like(batch["images"][0]), batch["images"][1]])  # row 0, document 0
    changed = model(**other).logits
    assert not torch.allclose(changed[0, :15], base[0, :15], atol=1e-4)  # its own document reads it
    same(changed[0, 15:], base[0, 15:])  # documents 1 (text) and 2 (video) of the row do not
    same(changed[1], base[1])
    # text before its document's image does not read it either (row 1, document 1 starts at 10, image at 13)
    other = dict(batch, images=[batch["images"][0], torch.zeros_like(batch["images"][1])])
    changed = model(**other).logits
    same(changed[1, :13], base[1, :13])
    assert not torch.allclose(changed[1, 13:26], base[1, 13:26], atol=1e-4)


def test_text_only_documents_stay_text_only_with_open_gates():
    """Fusion runs only on tokens that see media: a text-only packed document computes exactly what the
    text-only LLM computes for it, however far training opened the gates."""
    torch.manual_seed(0)
    model = XoronMultimodalModel(tiny_cfg()).eval()
    _open_gates(model)
    batch = packed_batch()
    out = model(**batch).logits
    text = model.llm(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]).logits
    same(out[0, 15:24], text[0, 15:24])  # row 0, document 1
    same(out[1, :10], text[1, :10])  # row 1, document 0


@pytest.mark.parametrize("layers", [[0, 0, 1, 1], [1]])
def test_fusion_layers_run_before_their_decoder_layer(layers):
    torch.manual_seed(0)
    fusion = FusionLayers(16, FusionConfig(layers=layers, num_heads=2, intermediate_size=32))
    calls = []
    for i, layer in enumerate(fusion.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    ctx = MediaContext.build([(torch.randn(1, 3, 16), torch.tensor([[0, 0, 3]]))], 1, 6, None)
    x = torch.randn(1, 6, 16)
    for index in range(2):
        before = len(calls)
        assert torch.equal(fusion.before_layer(index, x, ctx), x)  # gates at 0: identity
        assert calls[before:] == [i for i, at in enumerate(layers) if at == index]
