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

The media come from the modality table (``xoron_dist.model.modalities``): each understood medium
has an encoder and a projector under the names its row gives, and this model loops over the
table, so a new medium adds no code here. An encoder whose output carries an ``aux_loss`` (the vision
tower's TiTok reconstruction, in training) adds it to ``objective_sums`` under the objective it names
(``aux_objective``), summed over the media this rank encodes (a blank medium's times 0); on a pipeline
stage before the last it rides in the ``StageOutput``. Parameter names: ``llm.*`` (the text model, same
names under the prefix), ``vision.*``, ``video.*``, ``image_projector.*``, ``video_projector.*``,
``fusion.*``; curriculum stages freeze any of them by prefix (``train/stages.py``).

In training, the encoders, projectors and fusion layers run the same module calls in the same
order whatever the micro-batch holds: an enabled encoder whose medium is absent encodes one blank
dummy (an image, a one-frame video) and adds ``0 ·`` its sum to the embeddings (frozen encoders
too); without any media each fusion layer reads the dummy tokens before its own decoder layer,
as it would read real media there; each encoder embeds all its items in one call per module
(e.g. one ``patch_embed`` call for all images). So data-parallel ranks with and without a medium
reduce the same gradients (exact zeros instead of missing: DeepSpeed reduces per parameter as
gradients arrive) and, under ZeRO-3, which gathers a module's weights around each call of it, make
the same all-gathers in the same order. (The generators still call their parts once per item and
per target, so the layout rules keep them off ZeRO-3: ``xoron_dist.parallel.layout``.)

``row_layout`` says which media this rank encodes and which part of the rows it computes: here
(``WholeRows``) all of both. Sequence parallelism swaps in ``ZigzagMediaRows``
(``xoron_dist.parallel.media_exchange``): the SP ranks share out the encoding, exchange the projected
media, fill the whole rows' spans and keep their zig-zag part of the rows.

Pipeline parallelism prunes this model to a stage (``xoron_dist.parallel.pipeline.split``): stage 0
keeps the encoders and projectors, each stage the fusion layers before its own decoder layers. A stage
before the last returns a ``StageOutput``: the hidden states and the fusion layers' media tokens
(``MediaContext.tokens``), which the next stage takes as ``inputs_embeds`` and ``media_tokens``; it
rebuilds the rest of the media context (which text reads which media) from the spans and document ids
of the same micro-batch (``media_carry_shape``: the tokens' shape, known on every stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from xoron_dist.config import XoronConfig
from xoron_dist.model.common.moe import uncounted_routing
from xoron_dist.model.fusion import FusionLayers, MediaContext
from xoron_dist.model.llm import LLMOutput, XoronLLM
from xoron_dist.model.modalities import MODALITIES, Modality, generated, understood
from xoron_dist.model.prompts import prompt_states
from xoron_dist.utils.host_syncs import host_list, prefix_mask, select_rows, where_true


@dataclass
class StageOutput(LLMOutput):
    """A pipeline stage's output before the last stage: the hidden states and, when the micro-batch has
    media and the model fusion layers, the fusion layers' media tokens (batch, width, hidden)
    (``MediaContext.tokens``), which travel to the next stage beside the hidden states."""

    media_tokens: torch.Tensor | None = None


class WholeRows:
    """``XoronMultimodalModel.row_layout`` on one rank: it encodes every medium and computes whole rows."""

    def owned(self, count: int) -> list[int]:
        """Indices of the ``count`` media of a modality this rank encodes."""
        return list(range(count))

    def gather_media(self, mine: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """This rank's projected media (n, longest, D) -> every medium's (here: the same)."""
        return mine

    def positions(self, seq: int, device: torch.device) -> torch.Tensor | None:
        """The positions of the rows this rank computes (None: all ``seq``)."""
        return None

    def cut(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's part of a (batch, seq, ...) tensor of the whole rows."""
        return rows


class XoronMultimodalModel(nn.Module):
    """``model(input_ids, images=..., image_spans=..., videos=..., video_spans=..., labels=...)``."""

    def __init__(self, cfg: XoronConfig) -> None:
        super().__init__()
        hidden, std = cfg.llm.hidden_size, cfg.llm.init_std
        self.cfg = cfg
        self.llm = XoronLLM(cfg.llm)
        self.media = understood(cfg)  # the rows of the media this model encodes, in encoding order
        for row in MODALITIES:
            if row.encoder is not None:
                setattr(self, row.encoder, None)
                setattr(self, row.projector, None)
            if row.generator is not None:
                setattr(self, row.generator, None)
        for row in self.media:
            encoder = row.build(cfg)
            setattr(self, row.encoder, encoder)
            setattr(self, row.projector, row.build_projector(cfg, row, encoder))  # emits exactly the span's tokens
        for row in self.media:
            if row.attach is not None:  # e.g. video frames through the vision tower (shared weights)
                row.attach(self, getattr(self, row.encoder))
        self.generators = generated(cfg)  # the rows of the media this model produces
        for row in self.generators:
            setattr(self, row.generator, row.build_generator(cfg))
        self.fusion = (FusionLayers(hidden, cfg.model.fusion, std, cfg.llm.rms_norm_eps) if cfg.model.fusion.layers
                       else None)
        self.row_layout = WholeRows()  # sequence parallelism swaps it (see the module docstring)

    def media_inputs(self, batch) -> dict[str, object]:
        """The ``forward`` keyword arguments for a ``PackedBatch``'s media this model encodes (none
        for a batch without media fields, e.g. the synthetic text source)."""
        inputs: dict[str, object] = {}
        for row in dict.fromkeys([*self.media, *self.generators]):
            if hasattr(batch, row.batch_field):
                for field in (row.batch_field, f"{row.name}_spans", f"{row.name}_is_target"):
                    inputs[field] = getattr(batch, field)
        return inputs

    def encode(self, medium: str, media: list[torch.Tensor]) -> torch.Tensor:
        """Images (H, W, 3) / videos (T, H, W, 3) uint8 / audio (samples,) int16 -> projected tokens
        (n, longest span, llm hidden); medium i fills the first ``span_lengths`` of its row."""
        return self._encode(next(r for r in self.media if r.name == medium), media)[0]

    def _encode(self, row: Modality, media: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``encode``'s tokens, and the encoder's auxiliary loss summed over the media (its output's
        ``aux_loss``, e.g. the vision tower's reconstruction in training), or None."""
        output = getattr(self, row.encoder)(media)
        features, mask = output[:2]  # every encoder returns (features, mask, ...)
        tokens = getattr(self, row.projector)(features, mask, self.span_lengths(row.name, media))
        return tokens, getattr(output, "aux_loss", None)

    def span_lengths(self, medium: str, media: list[torch.Tensor]) -> list[int]:
        """The tokens each medium takes in the stream: the fixed span of an image or video, or the
        per-second count of an audio clip (the packer's rule, ``xoron_dist.data.packing``). Known on the
        host from the media's shapes, so checks against them read nothing from the device."""
        row = next(r for r in self.media if r.name == medium)
        return [row.span_length(self.cfg, item) for item in media]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        media_tokens: torch.Tensor | None = None,
        **media: object,
    ) -> LLMOutput:
        """input_ids/labels/position_ids/document_ids/loss_weights as ``XoronLLM.forward``; per medium x
        of the table, ``xs`` (a list: images uint8 (H, W, 3), videos uint8 (T, H, W, 3)) with ``x_spans``
        (n, 3) = row, start, length in ``input_ids`` and optional ``x_is_target`` (n,) flags (True: a
        generation target, not encoded here).

        A later pipeline stage (no embedding, no encoders: ``parallel/pipeline/split.py``) takes the
        previous stage's hidden states as ``inputs_embeds`` and its ``StageOutput.media_tokens`` as
        ``media_tokens`` (with ``input_ids`` and the media spans still given: they place the media); a
        stage without the LM head returns a ``StageOutput``."""
        given = _media_arguments(media)
        if inputs_embeds is not None:
            return self._later_stage(input_ids, inputs_embeds, media_tokens, given, labels, position_ids,
                                     document_ids, loss_weights)
        embeds = self.llm.embed_tokens(input_ids)  # the whole rows (under SP, on every SP rank: one lookup)
        encoded: list[tuple[torch.Tensor, torch.Tensor]] = []
        unused = None  # dummy media tokens, when an encoder had nothing to encode
        aux_sums: dict[str, torch.Tensor] = {}  # encoders' auxiliary objectives: name -> Σ over this rank's media
        for row in MODALITIES:
            items, spans = _understanding(row, *given.get(row.name, (None, None, None)), row in self.media)
            if row not in self.media:
                continue
            if not items:  # the same calls on every rank, every parameter in the graph (see the module docstring)
                if self.training:
                    unused, aux = self._encode_blank(row, input_ids.device)
                    embeds = embeds + 0.0 * unused.sum()
                    _add_aux(aux_sums, getattr(self, row.encoder), aux, 0.0)
                continue
            tokens, aux = self._encode_shared(row, items, input_ids.device)
            _add_aux(aux_sums, getattr(self, row.encoder), aux)
            embeds = fill_spans(embeds, tokens, spans, row, self.span_lengths(row.name, items))
            encoded.append((tokens, spans))
        batch, seq = input_ids.shape
        local = self.row_layout.positions(seq, input_ids.device)
        if local is not None:  # this rank computes part of the rows: cut them now that the media sit in them
            if position_ids is None:
                position_ids = torch.arange(seq, device=input_ids.device).expand(batch, -1)
            embeds, labels, position_ids, loss_weights = map(self.row_layout.cut,
                                                             (embeds, labels, position_ids, loss_weights))
        whole_documents, document_ids = document_ids, self.row_layout.cut(document_ids)
        before_layer, context = None, None
        if self.fusion is not None:
            context = MediaContext.build(encoded, batch, seq, whole_documents, local)
            if context is not None:
                before_layer = lambda index, x: self.fusion.before_layer(index, x, context)  # noqa: E731
            elif self.training:  # each fusion layer still runs once, before its own decoder layer
                probe = self._fusion_probe_context(unused, embeds.dtype)
                before_layer = lambda index, x: x + 0.0 * self._fusion_probe(index, probe)  # noqa: E731
        generate = labels is not None and bool(self.generators)
        out = self.llm(labels=labels, position_ids=position_ids, document_ids=document_ids, inputs_embeds=embeds,
                       before_layer=before_layer, loss_weights=loss_weights, keep_normed=generate)
        out.objective_sums.update(aux_sums)
        if self.llm.lm_head is None:  # a pipeline stage before the last: the media travel on
            return _stage_output(out, context.tokens if context is not None else None)
        if generate:
            for row in self.generators:
                out.objective_sums.update(self._generator_losses(row, given.get(row.name), out.normed, document_ids))
        return out

    def _understood_spans(self, given: dict[str, tuple]) -> list[tuple[Modality, torch.Tensor]]:
        """(row, spans) of every medium with items to understand in this micro-batch, in encoding order."""
        out = []
        for row in self.media:
            items, spans = _understanding(row, *given.get(row.name, (None, None, None)), True)
            if items:
                out.append((row, spans))
        return out

    def media_carry_shape(self, batch: dict) -> tuple[int, int, int] | None:
        """The shape (batch, width, hidden) of the media tokens a pipeline stage sends beside its hidden
        states for the micro-batch ``batch`` (the forward keywords), or None when it sends none (no fusion
        layers, or no media): every stage computes it from the spans alone, so the receiving stage knows
        what to receive."""
        given = _media_arguments({k: v for k, v in batch.items() if k not in _TEXT_KEYWORDS})
        spans = self._understood_spans(given)
        if self.fusion is None or not spans:
            return None
        rows = batch["input_ids"].shape[0]
        per_row = [0] * rows
        for _, medium_spans in spans:
            for row, _, length in medium_spans.tolist():
                per_row[row] += length
        return rows, max(per_row), self.cfg.llm.hidden_size

    def _later_stage(self, input_ids, hidden, media_tokens, given, labels, position_ids, document_ids,
                     loss_weights) -> LLMOutput:
        """A pipeline stage after the first: ``hidden`` (batch, local seq, D) from the previous stage, the
        fusion layers' media context rebuilt from the spans with the received ``media_tokens``."""
        batch, seq = input_ids.shape
        local = self.row_layout.positions(seq, input_ids.device)
        if local is not None:  # the received hidden states are this rank's part already
            if position_ids is None:
                position_ids = torch.arange(seq, device=input_ids.device).expand(batch, -1)
            labels, position_ids, loss_weights = map(self.row_layout.cut, (labels, position_ids, loss_weights))
        whole_documents, document_ids = document_ids, self.row_layout.cut(document_ids)
        before_layer = None
        if self.fusion is not None:
            spans = self._understood_spans(given)
            width = self.cfg.llm.hidden_size
            placed = [(torch.zeros(len(s), int(s[:, 2].max()), width, dtype=hidden.dtype, device=hidden.device), s)
                      for _, s in spans]  # values come from media_tokens; these only place them
            context = MediaContext.build(placed, batch, seq, whole_documents, local)
            if context is not None:
                if media_tokens is None or media_tokens.shape != context.tokens.shape:
                    got = None if media_tokens is None else tuple(media_tokens.shape)
                    raise ValueError(f"pipeline stage: the micro-batch's media spans need media_tokens of shape "
                                     f"{tuple(context.tokens.shape)}, got {got}: pass the previous stage's "
                                     "StageOutput.media_tokens")
                context.tokens = media_tokens
                before_layer = lambda index, x: self.fusion.before_layer(index, x, context)  # noqa: E731
            elif self.training:  # as on the first stage: each fusion layer runs, times 0, on a zero medium
                probe = self._fusion_probe_context(hidden.new_zeros(1, 1, width), hidden.dtype)
                before_layer = lambda index, x: x + 0.0 * self._fusion_probe(index, probe)  # noqa: E731
        generate = labels is not None and bool(self.generators) and self.llm.lm_head is not None
        out = self.llm(labels=labels, position_ids=position_ids, document_ids=document_ids, inputs_embeds=hidden,
                       before_layer=before_layer, loss_weights=loss_weights, keep_normed=generate)
        if self.llm.lm_head is None:
            return _stage_output(out, media_tokens)
        if generate:  # the generator heads sit on the last stage, beside the LM head
            for row in self.generators:
                out.objective_sums.update(self._generator_losses(row, given.get(row.name), out.normed, document_ids))
        return out

    def _generator_losses(self, row: Modality, given: tuple | None, states: torch.Tensor,
                          document_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The row's generator objectives summed over this micro-batch (its items, the targets' requests)."""
        items, spans, is_target = given if given is not None else (None, None, None)
        items = list(items) if items is not None else []
        spans = spans if spans is not None else torch.zeros((0, 3), dtype=torch.long)
        targets = select_rows(spans, [i for i, t in enumerate(host_list(is_target)) if t]) if is_target is not None \
            else spans[:0]
        request, mask = prompt_states(states, targets, document_ids)
        encoder = getattr(self, row.encoder) if row in self.media else None
        return getattr(self, row.generator).objective_sums(encoder, items, is_target, request, mask)

    def _encode_shared(self, row: Modality, items: list[torch.Tensor],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected tokens (n, longest, D) of all ``items``, of which this rank encodes its share
        (``row_layout.owned``), and the encoder's auxiliary loss summed over that share (or None); a rank
        with an empty share encodes the blank medium times 0, so every rank calls the same modules (and
        touches no other weight: under ZeRO-3 that would gather it)."""
        lengths = self.span_lengths(row.name, items)
        owned = self.row_layout.owned(len(items))
        if owned:
            mine, aux = self._encode(row, [items[i] for i in owned])
        else:
            blank, aux = self._encode_blank(row, device)
            mine = blank[:0] + 0.0 * blank.sum()  # no rows, but the encoder in the graph (zero gradients)
            aux = 0.0 * aux if aux is not None else None
        return self.row_layout.gather_media(mine, lengths), aux

    def _encode_blank(self, row: Modality, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected tokens (1, length, D) of the row's blank medium and its auxiliary loss (see ``_encode``);
        its routing is not counted as expert load."""
        encoder = getattr(self, row.encoder)
        with uncounted_routing(encoder):
            return self._encode(row, [row.blank(encoder).to(device)])

    def _fusion_probe_context(self, media_tokens: torch.Tensor | None, dtype: torch.dtype) -> MediaContext:
        """One zero query that reads ``media_tokens`` (1, n, D) (a dummy medium's): what the fusion layers
        see in a training forward without media."""
        if media_tokens is None:  # no encoder ran (cannot happen in training; kept for direct calls)
            media_tokens = self._encode_blank(self.media[0], self.llm.embed_tokens.weight.device)[0]
        tokens = media_tokens[:1].to(dtype)
        device, width = tokens.device, tokens.shape[1]
        return MediaContext(tokens, torch.zeros(1, 1, dtype=torch.long, device=device),
                            torch.ones(1, 1, dtype=torch.bool, device=device),
                            torch.ones(1, 1, width, dtype=torch.bool, device=device))

    def _fusion_probe(self, index: int, probe: MediaContext) -> torch.Tensor:
        """Sum of the fusion layers placed before decoder layer ``index`` applied to the probe's zero
        query: a scalar through every parameter of those layers (0 when none sits there)."""
        x = torch.zeros(1, 1, probe.tokens.shape[-1], dtype=probe.tokens.dtype, device=probe.tokens.device)
        return self.fusion.before_layer(index, x, probe).sum()

    @torch.no_grad()
    def requests(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None):
        """prompt_ids (n, L) of whole requests as training lays them out (prompt + text, then ``<|gen_x|>
        <|x_start|>``), left-aligned, ``prompt_mask`` (n, L) True on real tokens -> the LLM's final-normed
        states (n, L, D) zero at padding and the mask: a generator's condition."""
        mask = torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()
        out = self.llm(input_ids=prompt_ids, labels=torch.full_like(prompt_ids, -100), keep_normed=True)
        return out.normed * mask[..., None].to(out.normed.dtype), mask

    def _request(self, prompt_ids, prompt_embeds, prompt_mask, generator: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition of a generate_* call: LLM states of ``prompt_ids``, or ``prompt_embeds`` as given."""
        if getattr(self, generator) is None:
            raise ValueError(f"this model has no {generator} generator: set model.{generator}.enabled: true")
        if (prompt_ids is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt_ids and prompt_embeds")
        if prompt_ids is not None:
            return self.requests(prompt_ids, prompt_mask)
        if prompt_mask is None:
            prompt_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.bool, device=prompt_embeds.device)
        return prompt_embeds, prompt_mask.bool()

    @torch.no_grad()
    def generate_speech(self, prompt_ids: torch.Tensor | None = None, *, prompt_embeds: torch.Tensor | None = None,
                        prompt_mask: torch.Tensor | None = None, speaker_audio: list[torch.Tensor],
                        steps: int | None = None, seed: int = 0) -> list[torch.Tensor]:
        """Speech for n requests, each in the voice of its reference clip: float waveforms at
        ``model.audio.sample_rate``. Give ``prompt_ids`` (see ``requests``) or ``prompt_embeds`` (n, L, D),
        the LLM states of the requests; ``prompt_mask`` (n, L) marks real tokens."""
        request, mask = self._request(prompt_ids, prompt_embeds, prompt_mask, "speech")
        return self.speech.generate(request, mask, speaker_audio, steps, seed)

    @torch.no_grad()
    def generate_image(self, prompt_ids: torch.Tensor | None = None, *, prompt_embeds: torch.Tensor | None = None,
                       prompt_mask: torch.Tensor | None = None, height: int = 512, width: int = 512,
                       steps: int | None = None, guidance: float | None = None, seed: int = 0,
                       sampler: str | None = None) -> torch.Tensor:
        """uint8 images (n, height, width, 3) for n requests (as ``generate_speech``'s); steps, guidance and
        sampler default to ``model.image_gen``'s. Same seed, same images."""
        request, mask = self._request(prompt_ids, prompt_embeds, prompt_mask, "image_gen")
        return self.image_gen.generate(request, mask, height, width, steps=steps, guidance=guidance, seed=seed,
                                       sampler=sampler)

    @torch.no_grad()
    def generate_video(self, prompt_ids: torch.Tensor | None = None, *, prompt_embeds: torch.Tensor | None = None,
                       prompt_mask: torch.Tensor | None = None, frames: int = 9, height: int = 128, width: int = 128,
                       steps: int | None = None, guidance: float | None = None, seed: int = 0,
                       sampler: str | None = None) -> torch.Tensor:
        """uint8 videos (n, frames, height, width, 3), generated chunk by chunk (see ``generate_image``)."""
        request, mask = self._request(prompt_ids, prompt_embeds, prompt_mask, "video_gen")
        return self.video_gen.generate(request, mask, frames, height, width, steps=steps, guidance=guidance,
                                       seed=seed, sampler=sampler)

    @torch.no_grad()
    def generate_text(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Text-only decoding with the LLM (see ``XoronLLM.generate_text``)."""
        return self.llm.generate_text(input_ids, max_new_tokens, **kwargs)


_TEXT_KEYWORDS = ("input_ids", "labels", "position_ids", "document_ids", "loss_weights", "inputs_embeds",
                  "media_tokens")


def _stage_output(out: LLMOutput, media_tokens: torch.Tensor | None) -> StageOutput:
    return StageOutput(**{f.name: getattr(out, f.name) for f in fields(out)}, media_tokens=media_tokens)


def _add_aux(sums: dict[str, torch.Tensor], encoder: nn.Module, aux: torch.Tensor | None, times: float = 1.0) -> None:
    """Add an encoder's auxiliary loss sum (times ``times``: 0 for a blank medium, which keeps the loss's
    modules in the graph with zero gradients) to ``sums`` under the objective the encoder names."""
    if aux is not None:
        name = encoder.aux_objective
        sums[name] = sums[name] + times * aux if name in sums else times * aux


def _media_arguments(media: dict[str, object]) -> dict[str, tuple]:
    """``forward``'s media keywords grouped per medium: name -> (items, spans, is_target)."""
    known = {f"{row.batch_field}": (row.name, 0) for row in MODALITIES}
    known.update({f"{row.name}_spans": (row.name, 1) for row in MODALITIES})
    known.update({f"{row.name}_is_target": (row.name, 2) for row in MODALITIES})
    grouped: dict[str, list] = {}
    for key, value in media.items():
        if key not in known:
            raise TypeError(f"XoronMultimodalModel.forward() got an unexpected keyword argument '{key}' "
                            f"(media keywords: {', '.join(sorted(known))})")
        name, slot = known[key]
        grouped.setdefault(name, [None, None, None])[slot] = value
    return {name: tuple(values) for name, values in grouped.items()}


def _understanding(row: Modality, media, spans, is_target, enabled: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The media (and spans) to encode: generation targets dropped; checks the lists match."""
    medium = row.name
    media = list(media) if media is not None else []
    if spans is None:
        if media:
            raise ValueError(f"{len(media)} {medium}(s) given without {medium}_spans: each medium needs its "
                             "placeholder span (row, start, length) in input_ids")
        return [], torch.zeros((0, 3), dtype=torch.long)
    if len(media) != spans.shape[0]:
        raise ValueError(f"{len(media)} {medium}(s) but {spans.shape[0]} {medium}_spans")
    flags = host_list(is_target) if is_target is not None else []
    if any(flags):
        keep = [i for i, target in enumerate(flags) if not target]
        media, spans = [media[i] for i in keep], select_rows(spans, keep)
    if media and not enabled:
        where = (f"model.{row.section}.enabled is false" if row.section
                 else "this version of xoron_dist has no encoder for it")
        raise ValueError(f"the batch holds {len(media)} {medium}(s) to understand but {where}")
    return media, spans


def fill_spans(embeds: torch.Tensor, tokens: torch.Tensor, spans: torch.Tensor, row: Modality,
               lengths: Sequence[int] | None = None) -> torch.Tensor:
    """Replace the placeholder embeddings of each span (row, start, length) by that medium's tokens.

    embeds (batch, seq, D), tokens (n, longest, D), ``lengths`` the tokens medium i emits (default: all
    ``longest``) -> (batch, seq, D); out of place (autograd reaches the projector; the placeholder
    ids' embedding rows get no gradient from these positions). The spans are checked against the lengths
    on the host (the batch's host copy of the spans: no read of the device).
    """
    count, longest = tokens.shape[:2]
    lengths = [longest] * count if lengths is None else list(lengths)
    for i, ((_, _, span), emits) in enumerate(zip(host_list(spans), lengths, strict=True)):
        if span != emits:
            raise ValueError(f"{row.name} {i}'s span has {span} placeholders but the {row.name} projector emits "
                             f"{emits} tokens: the data was packed with another data.{row.span}")
    device = embeds.device
    valid = prefix_mask(lengths, longest, device)  # (n, longest)
    index = where_true(valid, sum(lengths))  # the valid (medium, offset) pairs, in order
    medium, offset = index // longest, index % longest
    spans = spans.to(device)
    return embeds.index_put((spans[medium, 0], spans[medium, 1] + offset),
                            tokens.flatten(0, 1)[index].to(embeds.dtype))


def build_model(cfg: XoronConfig) -> XoronLLM | XoronMultimodalModel:
    """``XoronLLM`` when no encoder or generator is enabled, else ``XoronMultimodalModel``."""
    if understood(cfg) or generated(cfg):
        return XoronMultimodalModel(cfg)
    return XoronLLM(cfg.llm)
