"""``XoronMultimodalModel``: the LLM with eyes (vision tower, video encoder, Perceiver projectors, fusion).

    images ─► VisionTower ─► PerceiverResampler ─┐            (n_img, image_tokens, D)
    videos ─► VideoEncoder ─► PerceiverResampler ─┤            (n_vid, video_tokens, D)
                                                 ▼
    input_ids ─► embed ─► placeholder spans filled with the projected media ─► XoronLLM ─► loss
                                                 └──► fusion layers, before decoder layers ``fusion.layers``

The loader writes every understanding medium as a run of ``<|x_pad|>`` placeholders whose
place is its span (row, start, length) (``xoron_dist.data.batch``); here the embeddings at those
positions are replaced by the projector's tokens, so the LLM reads the medium where it sits in
the text. Placeholders are never targets (their labels are -100), so the loss is on text only.
Media the batch marks as generation targets (``*_is_target``) belong to the generators and are
skipped. The fusion layers (``xoron_dist.model.fusion``) additionally let text attend to the
media tokens of its own document; their tanh gates start at 0, so an untrained fusion stack is
the identity.

Parameter names: ``llm.*`` (the text model, same names under the prefix), ``vision.*``,
``video.*``, ``image_projector.*``, ``video_projector.*``, ``fusion.*``; curriculum stages freeze
any of them by prefix (``train/stages.py``).

Every trainable parameter takes part in every forward: an enabled encoder whose medium is absent
from a micro-batch encodes one blank dummy (an image, a one-frame video) and adds ``0 ·`` its
sum to the embeddings; fusion layers without media read the dummy tokens the same way. Their
gradients are then exact zeros instead of missing, so data-parallel ranks with and without that
medium reduce the same gradient buckets (DeepSpeed reduces per parameter as gradients arrive),
and the dummy passes through the modules' own forwards, where ZeRO-3 gathers their parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from xoron_dist.config import XoronConfig
from xoron_dist.model.fusion import FusionLayers, MediaContext
from xoron_dist.model.layers import LayerBuilder
from xoron_dist.model.llm import LLMOutput, XoronLLM
from xoron_dist.model.moe import ExpertBiasRouter
from xoron_dist.model.projector import PerceiverResampler
from xoron_dist.model.video import VideoEncoder
from xoron_dist.model.vision import VisionTower, load_siglip_vision

MEDIA = ("image", "video")  # the understanding media this model encodes, in encoding order


class XoronMultimodalModel(nn.Module):
    """``model(input_ids, images=..., image_spans=..., videos=..., video_spans=..., labels=...)``."""

    def __init__(self, cfg: XoronConfig, builder: LayerBuilder | None = None) -> None:
        super().__init__()
        builder = builder or LayerBuilder()
        model, hidden, std = cfg.model, cfg.llm.hidden_size, cfg.llm.init_std
        self.cfg, self.builder = cfg, builder
        self.llm = XoronLLM(cfg.llm, builder)
        self.vision = self.image_projector = self.video = self.video_projector = None
        if model.vision.enabled:
            self.vision = (load_siglip_vision(model.vision.pretrained_path, model.vision, builder)
                           if model.vision.pretrained_path else VisionTower(model.vision, builder))
            self.image_projector = PerceiverResampler(self.vision.cfg.hidden_size, hidden, cfg.data.image_tokens,
                                                      model.projector, builder, std)
        if model.video.enabled:
            self.video = VideoEncoder(model.video, builder, std)
            self.video_projector = PerceiverResampler(model.video.hidden_size, hidden, cfg.data.video_tokens,
                                                      model.projector, builder, std)
        self.fusion = FusionLayers(hidden, model.fusion, builder, std, cfg.llm.rms_norm_eps) if model.fusion.layers \
            else None

    # ------------------------------------------------------------------ what the trainer asks of a model

    @property
    def activation_checkpointing(self) -> bool:
        return self.llm.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.llm.activation_checkpointing = value

    @property
    def loss_chunk_tokens(self) -> int:
        return self.llm.loss_chunk_tokens

    @loss_chunk_tokens.setter
    def loss_chunk_tokens(self, value: int) -> None:
        self.llm.loss_chunk_tokens = value

    @property
    def moe_layer_ids(self) -> list[int]:
        return self.llm.moe_layer_ids

    def routers(self) -> list[ExpertBiasRouter]:
        """The LLM's MoE routers (the expert-load monitor's rows); the video encoder balances its own."""
        return self.llm.routers()

    def keep_router_state_fp32(self) -> None:
        self.llm.keep_router_state_fp32()
        if self.video is not None:
            for router in self.video.routers():
                router.expert_bias.data = router.expert_bias.data.float()
                router.last_load.data = router.last_load.data.float()
            self.video.expert_load.data = self.video.expert_load.data.float()

    def update_expert_biases(self, group=None, enabled: bool | None = None, rate: float | None = None) -> torch.Tensor:
        """Bias update of the LLM's experts and the video encoder's temporal experts (at their own rate,
        ``model.video.bias_update_rate``); returns the LLM's load. ``rate``: the LLM's, see ``XoronLLM``."""
        if self.video is not None:
            self.video.update_expert_biases(group, self.cfg.llm.moe.bias_update if enabled is None else enabled)
        return self.llm.update_expert_biases(group, enabled, rate)

    def media_inputs(self, batch) -> dict[str, object]:
        """The ``forward`` keyword arguments for a ``PackedBatch``'s media this model encodes (none
        for a batch without media fields, e.g. the synthetic text source)."""
        inputs: dict[str, object] = {}
        for medium, encoder in (("image", self.vision), ("video", self.video)):
            if encoder is not None and hasattr(batch, f"{medium}s"):
                inputs[f"{medium}s"] = getattr(batch, f"{medium}s")
                inputs[f"{medium}_spans"] = getattr(batch, f"{medium}_spans")
                inputs[f"{medium}_is_target"] = getattr(batch, f"{medium}_is_target")
        return inputs

    # ------------------------------------------------------------------ forward

    def encode(self, medium: str, media: list[torch.Tensor]) -> torch.Tensor:
        """Images (H, W, 3) / videos (T, H, W, 3) uint8 -> projected tokens (n, span length, llm hidden)."""
        if medium == "image":
            out = self.vision(media)
            return self.image_projector(out.features, out.mask)
        features, mask = self.video(media)
        return self.video_projector(features, mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        images: list[torch.Tensor] | None = None,
        image_spans: torch.Tensor | None = None,
        image_is_target: torch.Tensor | None = None,
        videos: list[torch.Tensor] | None = None,
        video_spans: torch.Tensor | None = None,
        video_is_target: torch.Tensor | None = None,
    ) -> LLMOutput:
        """input_ids/labels/position_ids/document_ids as ``XoronLLM.forward``; ``images`` uint8 (H, W, 3)
        and ``videos`` uint8 (T, H, W, 3) with their spans (n, 3) = row, start, length in ``input_ids``
        and optional ``*_is_target`` (n,) flags (True: a generation target, not encoded here)."""
        embeds = self.llm.embed_tokens(input_ids)
        given = {"image": (images, image_spans, image_is_target), "video": (videos, video_spans, video_is_target)}
        encoders = {"image": (self.vision, self.image_projector), "video": (self.video, self.video_projector)}
        encoded: list[tuple[torch.Tensor, torch.Tensor]] = []
        unused = None  # dummy media tokens, when an encoder had nothing to encode
        for medium in MEDIA:
            media, spans, is_target = given[medium]
            modules = encoders[medium]
            media, spans = _understanding(medium, media, spans, is_target, modules[0] is not None)
            if modules[0] is None:
                continue
            if not media:  # keep every parameter in the graph (see the module docstring)
                if self.training and torch.is_grad_enabled() and _trainable(modules):
                    unused = self._encode_blank(medium, input_ids.device)
                    embeds = embeds + 0.0 * unused.sum()
                continue
            tokens = self.encode(medium, media)
            embeds = fill_spans(embeds, tokens, spans, medium)
            encoded.append((tokens, spans))
        before_layer = None
        if self.fusion is not None:
            context = MediaContext.build(encoded, *input_ids.shape, document_ids)
            if context is None:
                if self.training and torch.is_grad_enabled() and _trainable([self.fusion]):
                    embeds = embeds + 0.0 * self._fusion_probe(unused, embeds.dtype)
            else:
                before_layer = lambda index, x: self.fusion.before_layer(index, x, context)  # noqa: E731
        return self.llm(labels=labels, position_ids=position_ids, document_ids=document_ids, inputs_embeds=embeds,
                        before_layer=before_layer)

    def _encode_blank(self, medium: str, device: torch.device) -> torch.Tensor:
        """Projected tokens (1, length, D) of a dummy: a black ``image_size``² image, or one black
        ``min_resolution``² frame (whose routing is not counted as expert load)."""
        if medium == "image":
            size = self.vision.cfg.image_size
            return self.encode(medium, [torch.zeros(size, size, 3, dtype=torch.uint8, device=device)])
        size = self.video.cfg.min_resolution
        load = self.video.expert_load.clone()
        tokens = self.encode(medium, [torch.zeros(1, size, size, 3, dtype=torch.uint8, device=device)])
        self.video.expert_load.copy_(load)
        return tokens

    def _fusion_probe(self, media_tokens: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """Sum of every fusion layer's output for one zero query reading ``media_tokens`` (1, n, D) (a
        dummy medium's, or one encoded here): a scalar through every fusion parameter."""
        if media_tokens is None:  # every encoder frozen: read a dummy image or video anyway
            medium = "image" if self.vision is not None else "video"
            media_tokens = self._encode_blank(medium, self.llm.embed_tokens.weight.device)
        tokens = media_tokens[:1].to(dtype)
        device, width = tokens.device, tokens.shape[1]
        context = MediaContext(tokens, torch.zeros(1, 1, dtype=torch.long, device=device),
                               torch.ones(1, 1, dtype=torch.bool, device=device),
                               torch.ones(1, 1, width, dtype=torch.bool, device=device))
        x = torch.zeros(1, 1, tokens.shape[-1], dtype=dtype, device=device)
        for layer in self.fusion.layers:
            x = layer(x, context)
        return x.sum()

    @torch.no_grad()
    def generate_text(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Text-only decoding with the LLM (see ``XoronLLM.generate_text``)."""
        return self.llm.generate_text(input_ids, max_new_tokens, **kwargs)


def _understanding(medium: str, media, spans, is_target, enabled: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The media (and spans) to encode: generation targets dropped; checks the lists match."""
    media = list(media) if media is not None else []
    if spans is None:
        if media:
            raise ValueError(f"{len(media)} {medium}(s) given without {medium}_spans: each medium needs its "
                             "placeholder span (row, start, length) in input_ids")
        return [], torch.zeros((0, 3), dtype=torch.long)
    if len(media) != spans.shape[0]:
        raise ValueError(f"{len(media)} {medium}(s) but {spans.shape[0]} {medium}_spans")
    if is_target is not None and bool(is_target.any()):
        keep = (~is_target.bool()).nonzero().flatten().tolist()
        media, spans = [media[i] for i in keep], spans[keep]
    if media and not enabled:
        section = "vision" if medium == "image" else "video"
        raise ValueError(f"the batch holds {len(media)} {medium}(s) to understand but model.{section}.enabled is false")
    return media, spans


def fill_spans(embeds: torch.Tensor, tokens: torch.Tensor, spans: torch.Tensor, medium: str) -> torch.Tensor:
    """Replace the placeholder embeddings of each span (row, start, length) by that medium's tokens.

    embeds (batch, seq, D), tokens (n, length, D) -> (batch, seq, D); out of place (autograd reaches
    the projector; the placeholder ids' embedding rows get no gradient from these positions).
    """
    length = tokens.shape[1]
    lengths = spans[:, 2]
    if bool((lengths != length).any()):
        setting = "data.image_tokens" if medium == "image" else "data.video_tokens"
        raise ValueError(f"{medium} spans have lengths {sorted(set(lengths.tolist()))} but the {medium} projector "
                         f"emits {length} tokens: the data was packed with another {setting}")
    offsets = torch.arange(length, device=embeds.device)
    rows = spans[:, 0, None].to(embeds.device).expand(-1, length)
    cols = spans[:, 1, None].to(embeds.device) + offsets
    return embeds.index_put((rows.flatten(), cols.flatten()), tokens.reshape(-1, tokens.shape[-1]).to(embeds.dtype))


def _trainable(modules) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def build_model(cfg: XoronConfig, builder: LayerBuilder | None = None) -> XoronLLM | XoronMultimodalModel:
    """``XoronLLM`` when no understanding encoder is enabled, else ``XoronMultimodalModel``."""
    if cfg.model.vision.enabled or cfg.model.video.enabled:
        return XoronMultimodalModel(cfg, builder)
    return XoronLLM(cfg.llm, builder)
