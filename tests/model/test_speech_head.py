"""The speech generator inside Xoron: objectives per micro-batch, requests, generation, layout rules.

Data parallelism needs each objective to be a sum of per-item terms: the trainer all-reduces the
item counts and the gradients of Σ/N, so a batch split over ranks must give the same sums (and
gradients) as the whole batch on one rank. ``test_objective_sums_split_like_data_parallel_ranks``
checks exactly that on the same weights and data.
"""

from __future__ import annotations

import pytest
import torch

from xoron_dist.config import ConfigError, load_config
from xoron_dist.model.audio.encoder import batch_clips
from xoron_dist.model.prompts import prompt_states
from xoron_dist.model.xoron import build_model
from xoron_dist.parallel.layout import LayoutError, validate_layout

SMOKE = "pipelines/smoke.yaml"
RATE = 16_000


def _cfg(*overrides):
    alone = ["model.image_gen.enabled=false", "model.video_gen.enabled=false"]  # the speech generator alone
    return load_config(SMOKE, ["model.speech.enabled=true", *alone, *overrides])


def _clip(seconds: float, seed: int) -> torch.Tensor:
    """A few tones with noise, int16: enough structure for the codec and MAS to see."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * RATE)) / RATE
    freqs = 150 + 400 * torch.rand(3, generator=gen)
    wave = sum(torch.sin(2 * torch.pi * f * t) for f in freqs) / 4 + 0.05 * torch.randn(t.shape, generator=gen)
    return (wave * 12000).to(torch.int16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg()).train()


def _batch(cfg, clips, spans, targets, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.llm.usable_vocab_size, (2, 48), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    documents = torch.zeros(2, 48, dtype=torch.long)
    documents[0, 24:] = 1
    return dict(input_ids=ids, labels=labels, document_ids=documents, audios=clips,
                audio_spans=torch.tensor(spans), audio_is_target=torch.tensor(targets))


def test_requests_are_the_document_tokens_before_the_target():
    states = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1)
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [0] * 10])
    request, mask = prompt_states(states, torch.tensor([[0, 6, 2], [1, 4, 3], [0, 8, 1]]), documents)
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True], [False] * 4]
    assert request[0, :3, 0].tolist() == [3, 4, 5]  # document 1 of row 0 starts at 3, the span at 6
    assert request[1, :, 0].tolist() == [10, 11, 12, 13]
    assert request[2].abs().sum() == 0  # a target opening its document has an empty request


def test_objective_sums_split_like_data_parallel_ranks(model, one_thread):
    cfg = model.cfg
    clips = [_clip(0.5, 1), _clip(0.4, 2), _clip(0.3, 3), _clip(0.35, 4)]
    lengths = [model.span_lengths("audio", [c]).item() for c in clips]
    spans = [[0, 2, lengths[0]], [0, 30, lengths[1]], [1, 10, lengths[2]], [1, 30, lengths[3]]]
    targets = [False, True, True, True]
    whole = model(**_batch(cfg, clips, spans, targets)).objective_sums
    # rank A: row 0 (clips 0, 1), rank B: row 1 (clips 2, 3), each with the same token rows it would hold
    batch = _batch(cfg, clips, spans, targets)
    parts = []
    for row, chosen in ((0, [0, 1]), (1, [2, 3])):
        part = {k: v[row: row + 1] for k, v in batch.items() if k in ("input_ids", "labels", "document_ids")}
        part_spans = torch.tensor([[0, *spans[i][1:]] for i in chosen])
        parts.append(model(**part, audios=[clips[i] for i in chosen], audio_spans=part_spans,
                           audio_is_target=torch.tensor([targets[i] for i in chosen])).objective_sums)
    for name in ("codec", "tts"):
        assert torch.isfinite(whole[name]) and whole[name] > 0
        assert (parts[0][name] + parts[1][name]).item() == pytest.approx(whole[name].item(), rel=2e-5), name


def test_every_parameter_gets_a_gradient_with_and_without_speech(model, one_thread):
    cfg = model.cfg
    clips = [_clip(0.4, 5), _clip(0.3, 6)]
    lengths = [model.span_lengths("audio", [c]).item() for c in clips]
    batch = _batch(cfg, clips, [[0, 3, lengths[0]], [1, 20, lengths[1]]], [False, True])
    for inputs in (batch, {k: batch[k] for k in ("input_ids", "labels", "document_ids")}):
        model.zero_grad()
        out = model(**inputs)
        (out.loss + out.objective_sums["codec"] + out.objective_sums["tts"]).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:5]
    assert out.objective_sums["codec"].item() == 0 and out.objective_sums["tts"].item() == 0
    speech = [p.grad for n, p in model.named_parameters() if n.startswith("speech.")]
    assert all(g.abs().sum() == 0 for g in speech)  # the blank paths add exact zeros


def test_speaker_batch_norm_keeps_stored_statistics_in_training(model):
    fresh = build_model(_cfg())  # never switched with .train(): the trainer does not call it
    for candidate in (fresh, model.train()):
        norms = [m for m in candidate.speech.speaker.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        assert norms and candidate.training and not any(m.training for m in norms)


def test_generate_speech_is_seeded_and_frames_times_hop_long(model, one_thread):
    model.eval()
    try:
        ids = torch.randint(0, model.cfg.llm.usable_vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, 5:] = False
        reference = [_clip(0.3, 7), _clip(0.2, 8)]
        first = model.generate_speech(ids, prompt_mask=mask, speaker_audio=reference, seed=4)
        again = model.generate_speech(ids, prompt_mask=mask, speaker_audio=reference, seed=4)
        other = model.generate_speech(ids, prompt_mask=mask, speaker_audio=reference, seed=5)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert not torch.equal(first[0], other[0])
        hop = model.speech.vocoder.hop
        assert all(w.numel() % hop == 0 and w.numel() >= 5 * hop and w.abs().max() <= 1 for w in first)
        with pytest.raises(ValueError, match="one reference clip per request"):
            model.generate_speech(ids, speaker_audio=reference[:1])
        with pytest.raises(ValueError, match="exactly one of prompt_ids and prompt_embeds"):
            model.generate_speech(speaker_audio=reference)
    finally:
        model.train()


def test_snapped_generation_decodes_the_requantised_latents(model, one_thread):
    model.eval()
    try:
        ids = torch.randint(0, model.cfg.llm.usable_vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
        request, mask = model.requests(ids, torch.ones(1, 6, dtype=torch.bool))
        reference = [_clip(0.3, 7)]
        snapped = model.speech.generate(request, mask, reference, seed=4, snap_to=model.audio.quantizer)[0]
        voice = model.speech.speaker(*batch_clips(reference, request.device))
        latents, frames = model.speech.tts.generate(request, mask, voice, model.speech.flow_steps,
                                                    torch.Generator().manual_seed(4))
        requantised = model.audio.quantizer(latents[frames]).latents[None]
        torch.testing.assert_close(snapped, model.speech.vocoder.decode(requantised)[0])
        assert not torch.equal(snapped, model.speech.generate(request, mask, reference, seed=4)[0])
    finally:
        model.train()


def test_speech_config_and_layout_errors_name_the_fix():
    with pytest.raises(ConfigError, match="set model.audio.enabled: true"):
        _cfg("model.audio.enabled=false")
    with pytest.raises(ConfigError, match="multiple of the codec's hop"):
        _cfg("model.speech.vocoder.segment_samples=3000")
    with pytest.raises(LayoutError, match="model.speech.decoder.num_heads = 3"):
        validate_layout(_cfg("parallel.tp=2", "model.speech.decoder.num_heads=3",
                             "model.speech.decoder.v_head_dim=16"), 2)
    with pytest.raises(LayoutError, match="zero_stage<=2"):
        validate_layout(_cfg("parallel.zero_stage=3"), 1)


# --------------------------------------------------------------------------- TP=2 parity


def _speech_batch(model):
    clips = [_clip(0.4, 11), _clip(0.3, 12)]
    lengths = [model.span_lengths("audio", [c]).item() for c in clips]
    return _batch(model.cfg, clips, [[0, 3, lengths[0]], [1, 20, lengths[1]]], [False, True])


def _total(out):
    return out.loss + out.objective_sums["codec"] + out.objective_sums["tts"]


def _tp_body(state_path):
    from tests.parallel.test_tensor_parallel import load_sharded
    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize

    torch.set_num_threads(1)
    cfg = _cfg("parallel.tp=2")
    state.initialize(cfg)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), cfg).model
    load_sharded(model, torch.load(state_path))
    out = model(**_speech_batch(model))
    _total(out).backward()
    meta = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
                getattr(p, "partition_stride", 1)) for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if n.startswith("speech.")}
    return {k: v.item() for k, v in out.objective_sums.items()}, grads, meta


@pytest.mark.multirank
def test_tensor_parallel_speech_step_equals_single_rank(one_thread, tmp_path):
    """The TTS Conformers split over TP=2 (the vocoder and speaker encoder whole) give the single-rank
    objective sums and gradients."""
    from tests.parallel.harness import run_ranks
    from xoron_dist.parallel.tensor import tp_slice

    torch.manual_seed(0)
    model = build_model(_cfg()).train()
    torch.save(model.state_dict(), tmp_path / "state.pt")  # a file: too many tensors to pass each as an fd
    out = model(**_speech_batch(model))
    _total(out).backward()
    for rank, (sums, grads, meta) in enumerate(run_ranks(_tp_body, 2, str(tmp_path / "state.pt"))):
        for name in ("codec", "tts"):
            assert sums[name] == pytest.approx(out.objective_sums[name].item(), rel=1e-5), (rank, name)
        assert any(meta[n][0] for n in grads if n.startswith("speech.tts.velocity."))
        for name, grad in grads.items():
            split, dim, stride = meta[name]
            ref = dict(model.named_parameters())[name].grad
            ref = tp_slice(ref, dim, stride, rank, 2) if split else ref
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6, msg=f"rank {rank} grad of {name}")
