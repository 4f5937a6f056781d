"""Audio understanding: the raw-waveform tokenizer, the residual quantiser, the frame-pooling projector,
and audio in ``XoronMultimodalModel`` (spans of ceil(seconds · rate) tokens, the packer's rule)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from xoron_dist.config import AudioConfig, ConformerConfig, load_config
from xoron_dist.model.audio.codec import ResidualQuantizer, WaveformEncoder
from xoron_dist.model.audio.encoder import AudioEncoder, FramePoolProjector
from xoron_dist.train.codebooks import CodebookKeeper

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CONFORMER = ["hidden_size=32", "num_layers=1", "num_heads=2", "ffn_dim=64", "kv_lora_rank=16",
                  "qk_nope_head_dim=8", "qk_rope_head_dim=8", "v_head_dim=16", "conv_kernel=3"]
AUDIO = AudioConfig(enabled=True, codec_channels=8, latent_dim=16, rvq_quantizers=3, rvq_codebook_size=16,
                    conformer=ConformerConfig(**{k: int(v) for k, v in (f.split("=") for f in TINY_CONFORMER)}))


def _clip(samples: int, seed: int) -> torch.Tensor:
    return torch.randint(-3000, 3000, (samples,), dtype=torch.int16, generator=torch.Generator().manual_seed(seed))


def test_tokenizer_frames_and_padding_invariance():
    torch.manual_seed(0)
    encoder = WaveformEncoder(8, [2, 4, 5, 8], 16)
    assert encoder.hop == 320
    short, long = torch.randn(1, 5000), torch.randn(1, 16000)
    alone = encoder(short)
    assert alone.shape == (1, math.ceil(5000 / 320), 16)
    batch = torch.zeros(2, 16000)
    batch[0, :5000], batch[1] = short, long
    together = encoder(batch, torch.tensor([5000, 16000]))
    torch.testing.assert_close(together[0, : alone.shape[1]], alone[0], rtol=0, atol=1e-5)
    assert bool((together[0, alone.shape[1]:] == 0).all())  # frames beyond the clip are zero


def test_random_tokenizer_tells_sounds_apart():
    """Bias-free convs: at init, the mean latents of a low tone, a high tone and noise differ by more than
    their size (with PyTorch's default biases they differ by ~6 %: every frame one bias-made vector)."""
    t = torch.arange(16000) / 16000
    sounds = [0.3 * torch.sin(2 * math.pi * 300 * t), 0.3 * torch.sin(2 * math.pi * 2000 * t),
              0.3 * torch.randn(16000, generator=torch.Generator().manual_seed(0))]
    torch.manual_seed(0)
    encoder = WaveformEncoder(8, [2, 4, 5, 8], 16)
    assert all(conv.bias is None for conv in encoder.modules() if isinstance(conv, torch.nn.Conv1d))
    with torch.no_grad():
        means = [encoder(x[None])[0].mean(0) for x in sounds]
    gaps = [float((means[i] - means[j]).norm() / ((means[i].norm() + means[j].norm()) / 2))
            for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > 0.5, gaps


def _gapped_notes(clips: int, seed: int) -> torch.Tensor:
    """(clips, 16000): three notes of random pitch and level per second, digital silence between them."""
    gen = torch.Generator().manual_seed(seed)
    t, out = torch.arange(16000) / 16000, torch.zeros(clips, 16000)
    for row in out:
        for _ in range(3):
            pitch, level = 200 + 1800 * torch.rand((), generator=gen), 0.1 + 0.4 * torch.rand((), generator=gen)
            start = int(torch.randint(12000, (), generator=gen))
            length = int(torch.randint(1500, 4000, (), generator=gen))
            row[start: start + length] += level * torch.sin(2 * math.pi * pitch * t[:length])
    return out


def test_codec_training_keeps_the_latents_apart():
    """Issue 12's collapse: trained as the codec (tokenizer + residual VQ + BigVGAN, mel loss x 15 + VQ losses,
    Adam 2e-3 on random 1280-sample crops), a tokenizer with learnable conv biases turned every frame into one
    constant vector within 15 steps (relative spread across frames 0.09-0.15, 1-2 codes per level) and never
    recovered; bias-free, the frames stay apart (spread ~1.0) and the codebooks in use (8-17 codes of 32)."""
    from xoron_dist.model.speech.bigvgan import BigVGANConfig, BigVGANGenerator
    from xoron_dist.model.speech.losses import MultiScaleMelLoss

    torch.manual_seed(0)
    encoder = AudioEncoder(dataclasses.replace(AUDIO, rvq_quantizers=2, rvq_codebook_size=32))
    decoder = BigVGANGenerator(BigVGANConfig(in_channels=16, upsample_initial_channel=32, resblock_kernel_sizes=(3,),
                                             resblock_dilation_sizes=((1, 3),)))
    mel, clips, order = MultiScaleMelLoss(16000), _gapped_notes(16, 1), torch.Generator().manual_seed(2)
    params = [*encoder.tokenizer.parameters(), *encoder.quantizer.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3, betas=(0.8, 0.99))
    for _ in range(15):
        rows, starts = torch.randint(16, (8,), generator=order), torch.randint(16000 - 1280, (8,), generator=order)
        crops = torch.stack([clips[r, s: s + 1280] for r, s in zip(rows.tolist(), starts.tolist(), strict=True)])
        q = encoder.quantizer(encoder.tokenizer(crops))
        loss = 15 * mel(decoder(q.latents.transpose(1, 2)), crops[:, None]) + q.codebook_loss + 0.25 * q.commitment_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        latents = encoder.tokenizer(_gapped_notes(4, 3)).flatten(0, 1)  # held-out clips, (frames, latent)
        ids = encoder.quantizer(latents).ids
    spread = float((latents - latents.mean(0)).pow(2).mean().sqrt() / latents.pow(2).mean().sqrt())
    assert spread > 0.5, spread
    assert all(ids[:, level].unique().numel() >= 4 for level in range(2)), ids


def test_residual_quantiser_decodes_its_ids_and_each_stage_refines():
    torch.manual_seed(0)
    rvq = ResidualQuantizer(16, 4, 32, 8)
    latents = torch.randn(64, 16)
    q = rvq(latents)
    assert q.ids.shape == (64, 4) and int(q.ids.max()) < 32
    torch.testing.assert_close(rvq.decode(q.ids), q.latents, rtol=0, atol=1e-5)
    opt = torch.optim.Adam(rvq.parameters(), lr=1e-2)
    for _ in range(150):  # fit the codebooks and projections to these latents (reconstruction + VQ losses)
        q = rvq(latents)
        loss = (q.latents - latents).pow(2).mean() + q.codebook_loss + 0.25 * q.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        errors = [float((rvq(latents, stages=k).latents - latents).pow(2).mean()) for k in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0], errors  # each stage refines
    assert len(CodebookKeeper(rvq).quantizers) == 4  # the trainer restarts every stage's dead codes


def test_frame_pool_projector_gives_each_token_its_frames_mean():
    torch.manual_seed(0)
    projector = FramePoolProjector(4, 8)
    features = torch.randn(2, 10, 4)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :10], mask[1, :7] = True, True
    out = projector(features, mask, [4, 3])
    assert out.shape == (2, 4, 8)
    x = projector.in_proj(features)
    # clip 1: 7 frames into 3 tokens -> frames {0,1,2}, {3,4}, {5,6} (frame f to token floor(f * 3 / 7))
    expected = torch.stack([x[1, 0:3].mean(0), x[1, 3:5].mean(0), x[1, 5:7].mean(0)])
    torch.testing.assert_close(out[1, :3], projector.out_proj(projector.norm(expected)))
    with pytest.raises(ValueError, match="audio_tokens_per_second must not exceed"):
        projector(features, mask, [4, 8])


def test_audio_encoder_is_padding_invariant_and_counts_only_real_frames():
    torch.manual_seed(0)
    encoder = AudioEncoder(AUDIO)
    clips = [_clip(16000, 1), _clip(5000, 2)]
    together = encoder(clips)
    alone = encoder(clips[1:])
    assert together.mask.sum(1).tolist() == [50, 16]
    torch.testing.assert_close(together.features[1, :16], alone.features[0], rtol=0, atol=1e-5)
    used = [int(q.pending[0].numel()) for q in encoder.quantizer.quantizers]
    assert used == [16] * 3  # the last (one clip) forward: real frames only, no padding as codebook usage


def test_audio_encoder_reads_continuous_latents_when_asked():
    """understand_from="latents": the Conformer reads the tokenizer's frames themselves, not their codes
    (whose straight-through forward is constant once a codebook collapses); the quantiser still counts usage."""
    torch.manual_seed(0)
    encoder = AudioEncoder(dataclasses.replace(AUDIO, understand_from="latents"))
    clips = [_clip(16000, 1), _clip(5000, 2)]
    out = encoder(clips)
    samples = torch.zeros(2, 16000)
    samples[0], samples[1, :5000] = clips[0].float() / 32768.0, clips[1].float() / 32768.0
    latents = encoder.tokenizer(samples, torch.tensor([16000, 5000]))
    expected = encoder.conformer(latents, out.mask).hidden
    torch.testing.assert_close(out.features, expected, rtol=0, atol=1e-6)
    codes = encoder.conformer(encoder.tokens(clips)[0], out.mask).hidden
    assert float((codes - expected).detach().abs().max()) > 1e-3  # the codes path would give other features
    assert [int(q.pending[0].numel()) for q in encoder.quantizer.quantizers] == [66] * 3  # usage still counted
    out.features.sum().backward()
    assert all(p.grad is not None for n, p in encoder.named_parameters() if "codebook" not in n)

def _audio_cfg(*extra):
    conformer = [f"model.audio.conformer.{item}" for item in TINY_CONFORMER]
    return load_config(None, ["preset=tiny", "model.audio.enabled=true", "model.audio.codec_channels=8",
                              "model.audio.latent_dim=16", "model.audio.rvq_quantizers=2",
                              "model.audio.rvq_codebook_size=16", "model.fusion.layers=[0]",
                              "model.projector.num_heads=4", "model.fusion.num_heads=4",
                              "data.audio_tokens_per_second=8.0", *conformer, *extra])


def test_multimodal_model_fills_audio_spans_of_ceil_seconds_times_rate():
    from xoron_dist.model.xoron import XoronMultimodalModel

    cfg = _audio_cfg()
    torch.manual_seed(0)
    model = XoronMultimodalModel(cfg)
    clips = [_clip(16000, 3), _clip(3000, 4)]  # 1 s -> 8 tokens, 0.1875 s -> ceil(1.5) = 2 tokens
    assert model.span_lengths("audio", clips) == [8, 2]
    ids = torch.randint(0, 100, (2, 24))
    spans = torch.tensor([[0, 2, 8], [1, 5, 2]])
    labels = ids.roll(-1, 1)
    out = model(ids, labels=labels, audios=clips, audio_spans=spans)
    out.loss.backward()
    assert model.audio.conformer.input_proj.weight.grad.abs().sum() > 0  # the LM's loss reaches the encoder
    with pytest.raises(ValueError, match="audio 0's span has 7 placeholders.*emits 8 tokens"):
        model(ids, audios=clips, audio_spans=torch.tensor([[0, 2, 7], [1, 5, 2]]))
    model.zero_grad()
    model(ids, labels=labels).loss.backward()  # no audio in this micro-batch: a blank clip keeps every gradient
    # (the codebooks learn from the codec's own losses, never through the straight-through path)
    assert all(p.grad is not None for n, p in model.audio.named_parameters() if "codebook" not in n)


def test_batch_clips_pads_without_reading_the_device():
    from xoron_dist.model.audio.encoder import batch_clips
    from xoron_dist.utils.host_syncs import HostSyncCounter

    clips = [torch.ones(5, dtype=torch.int16), torch.ones(3, dtype=torch.int16)]
    with HostSyncCounter() as syncs:
        samples, lengths = batch_clips(clips, torch.device("cpu"))
    assert syncs.total == 0, syncs.calls
    assert samples.shape == (2, 5) and lengths.tolist() == [5, 3] and samples[1, 3:].abs().sum() == 0


def test_batch_clips_lengths_are_read_from_their_host_copy():
    """The clip lengths are known on the host: the speaker check and the codec's crop read them from there."""
    from xoron_dist.model.audio.encoder import batch_clips
    from xoron_dist.model.speech.vocoder import crop_segments
    from xoron_dist.utils.host_syncs import HostSyncCounter, host_list

    samples, lengths = batch_clips([torch.full((5,), 3276, dtype=torch.int16), torch.ones(3)], torch.device("cpu"))
    with HostSyncCounter() as syncs:
        assert host_list(lengths) == [5, 3]
        segments = crop_segments(samples, lengths, 4, [2, 0])
    assert syncs.total == 0, syncs.calls
    assert segments[0].tolist() == pytest.approx([0.1] * 4, abs=1e-4) and segments[1].tolist() == [1.0, 1.0, 1.0, 0.0]
