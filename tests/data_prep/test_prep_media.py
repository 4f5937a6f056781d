"""Media decoding and normalisation: resize policies, orientation, alpha, frame sampling, audio."""

import numpy as np
import pytest
import soundfile
from PIL import Image, ImageOps

from data_prep.errors import RejectedSample
from data_prep.media import (
    Blob,
    FrameList,
    decode_audio,
    decode_image,
    decode_video,
    frame_indices,
    load_image,
    resize_image,
    target_size,
)
from tests.data_prep.inputs import gradient_image, huge_png, png_bytes, sine, truncated_wav, write_mp4

PIXELS = 1_000_000  # budgets far above the test media
BUDGETS = {"max_pixels": PIXELS, "max_seconds": 60.0}


def blob_of(image: Image.Image) -> Blob:
    return Blob("x.png", "png", data=png_bytes(image))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (33, 33), (200, 7)])
def test_crop_pad_squash_give_square_outputs(shape):
    image = gradient_image(*shape)
    for policy in ("crop", "pad", "squash"):
        assert resize_image(image, 32, policy, 14).size == (32, 32)


@pytest.mark.parametrize(("shape", "size", "patch", "expected"), [
    ((400, 300), 384, 14, (378, 280)),  # 384 -> 27 patches; 288 -> 20 patches
    ((300, 400), 384, 14, (280, 378)),
    ((1000, 10), 64, 16, (64, 16)),  # the short side keeps one patch
    ((64, 64), 64, 16, (64, 64)),
    ((50, 20), 224, 14, (224, 84)),  # upscales: the longer side goes to size
])
def test_max_side_keeps_aspect_within_one_patch(shape, size, patch, expected):
    w, h = target_size(*shape, size, "max_side", patch)
    assert (w, h) == expected
    assert w % patch == 0 and h % patch == 0 and max(w, h) <= size
    scale = size / max(shape)
    assert abs(w - shape[0] * scale) < patch and abs(h - shape[1] * scale) < patch
    assert resize_image(gradient_image(*shape), size, "max_side", patch).size == expected


def test_crop_is_the_centre_square_scaled():
    image = gradient_image(40, 24)
    ours = np.asarray(resize_image(image, 32, "crop", 14), dtype=np.float64)
    expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC, box=(8, 0, 32, 24)), dtype=np.float64)
    assert np.array_equal(ours, expected)
    # An independent oracle: PIL's own fit (centre crop), up to its rounding of the crop box.
    fit = np.asarray(ImageOps.fit(image, (32, 32), Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(ours - fit).mean() < 2.0


def test_pad_letterboxes_with_black():
    image = Image.new("RGB", (40, 20), (200, 100, 50))
    out = np.asarray(resize_image(image, 32, "pad", 14))
    assert out.shape == (32, 32, 3)
    assert (out[:8] == 0).all() and (out[24:] == 0).all()  # 40x20 -> 32x16, centred: rows 8..23
    assert (out[8:24] == (200, 100, 50)).all()


def test_exif_orientation_and_alpha():
    tall = gradient_image(24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    import io

    buffer = io.BytesIO()
    tall.save(buffer, format="PNG", exif=exif)
    upright = load_image(Blob("t.png", "png", data=buffer.getvalue()), PIXELS)
    assert upright.size == (40, 24)
    assert np.array_equal(np.asarray(upright), np.asarray(tall.transpose(Image.Transpose.ROTATE_270)))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (np.asarray(load_image(blob_of(rgba), PIXELS)) == 255).all()  # transparent -> white, not black


def test_decode_image_rejects_garbage_and_missing(tmp_path):
    with pytest.raises(RejectedSample, match="cannot decode image 'bad.png'"):
        decode_image(Blob("bad.png", "png", data=b"not a png"), 32, "crop", 14, max_pixels=PIXELS)
    with pytest.raises(RejectedSample, match="image file 'nope.png' not found"):
        decode_image(Blob("nope.png", "png", path=tmp_path / "nope.png"), 32, "crop", 14, max_pixels=PIXELS)


def test_frame_indices_spread_and_stretch():
    assert frame_indices(12, 4) == [1, 4, 7, 10]
    assert frame_indices(4, 4) == [0, 1, 2, 3]
    assert frame_indices(2, 4) == [0, 0, 1, 1]  # short clip: frames held, deterministically
    assert frame_indices(1, 3) == [0, 0, 0]


def test_frame_list_sampling_fps_and_sizes():
    frames = FrameList(tuple(blob_of(Image.new("RGB", (20, 16), (40 * i,) * 3)) for i in range(6)))
    clip, fps = decode_video(frames, 4, 16, "squash", 8, fps=6.0, **BUDGETS)
    assert clip.shape == (4, 16, 16, 3)
    assert [int(f.mean()) for f in clip] == [0, 80, 120, 200]
    assert fps == pytest.approx(4.0)  # 4 frames over a 1 s clip
    mixed = FrameList((blob_of(Image.new("RGB", (20, 16))), blob_of(Image.new("RGB", (16, 16)))))
    with pytest.raises(RejectedSample, match="frames differ in size"):
        decode_video(mixed, 2, 16, "crop", 8, fps=None, **BUDGETS)


def test_mp4_sampling_and_short_clip(tmp_path):
    write_mp4(tmp_path / "c.mp4", 12)
    clip, fps = decode_video(Blob("c.mp4", "mp4", path=tmp_path / "c.mp4"), 4, 16, "crop", 8, fps=None, **BUDGETS)
    assert clip.shape == (4, 16, 16, 3) and fps == pytest.approx(4.0)
    assert np.allclose([f.mean() for f in clip], [30, 90, 150, 210], atol=3)
    write_mp4(tmp_path / "s.mp4", 2)
    data = (tmp_path / "s.mp4").read_bytes()
    clip, fps = decode_video(Blob("s.mp4", "mp4", data=data), 4, 16, "crop", 8, fps=None, **BUDGETS)
    assert np.allclose([f.mean() for f in clip], [10, 10, 30, 30], atol=3) and fps == pytest.approx(24.0)
    with pytest.raises(RejectedSample, match="cannot decode video 'x.mp4'"):
        decode_video(Blob("x.mp4", "mp4", data=data[: len(data) // 3]), 4, 16, "crop", 8, fps=None, **BUDGETS)


def wav(tmp_path, name, data, rate, subtype="PCM_16") -> Blob:
    soundfile.write(tmp_path / name, data, rate, subtype=subtype)
    return Blob(name, "wav", path=tmp_path / name)


def test_audio_mono_resample_and_exact_int16(tmp_path):
    left, right = sine(1000, 44_100, 0.25), sine(1000, 44_100, 0.25, amplitude=0.1)
    pcm = decode_audio(wav(tmp_path, "s.wav", np.stack([left, right], 1), 44_100, "FLOAT"), 16_000, 30.0)
    assert pcm.dtype == np.dtype("<i2") and pcm.size == 4000
    expected = 0.3 * np.sin(2 * np.pi * 1000 * np.arange(4000) / 16_000) * 32768  # mean of the channels
    assert np.abs(pcm[64:-64] - expected[64:-64]).max() < 0.005 * 32768
    native = (sine(300, 16_000, 0.1) * 32768).round().astype(np.int16)
    same = decode_audio(wav(tmp_path, "n.wav", native, 16_000), 16_000, 30.0)
    assert np.array_equal(same, native)


def test_audio_rejects(tmp_path):
    with pytest.raises(RejectedSample, match="has sample rate 500 Hz, which cannot be converted"):
        decode_audio(wav(tmp_path, "low.wav", sine(50, 500, 1.0), 500), 16_000, 30.0)
    with pytest.raises(RejectedSample, match="is 3.00 s long, more than max_audio_seconds=2"):
        decode_audio(wav(tmp_path, "long.wav", sine(50, 8000, 3.0), 8000), 16_000, 2.0)
    with pytest.raises(RejectedSample, match="cannot decode audio 'junk.wav'"):
        decode_audio(Blob("junk.wav", "wav", data=b"RIFF....WAVEjunk"), 16_000, 30.0)
    with pytest.raises(RejectedSample, match="is empty"):
        decode_audio(wav(tmp_path, "empty.wav", np.zeros(0), 8000), 16_000, 30.0)


# --------------------------------------------------------------------------- budgets and truncation


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding anything fails the test: a budget must be enforced from the header alone."""
    import soundfile
    from PIL import ImageFile

    import data_prep.media

    def decoded(*args, **kwargs):
        raise AssertionError("decoded before the budget check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    monkeypatch.setattr(data_prep.media, "_decode_picked", decoded)
    monkeypatch.setattr(soundfile.SoundFile, "read", decoded)


def test_pixel_budget_is_checked_from_the_header(no_decoding):
    bomb = Blob("bomb.png", "png", data=huge_png(12000, 12000))  # 17 KB on disk, 144 MP decoded
    with pytest.raises(RejectedSample) as caught:
        decode_image(bomb, 32, "crop", 14, max_pixels=64_000_000)
    assert caught.value.reason == (
        "image 'bomb.png' is 12000x12000 = 144,000,000 pixels, more than data.prep.max_image_pixels = 64,000,000 "
        "(read from its header, not decoded); shrink the file or raise the budget")


def test_pixel_budget_bounds_video_frames(tmp_path, no_decoding):
    write_mp4(tmp_path / "c.mp4", 12)  # 32x24 frames
    with pytest.raises(RejectedSample, match=r"^video 'c.mp4' is 32x24 = 768 pixels, more than "
                                             r"data.prep.max_image_pixels = 700 \(read from its header"):
        decode_video(Blob("c.mp4", "mp4", path=tmp_path / "c.mp4"), 4, 16, "crop", 8, fps=None, max_pixels=700,
                     max_seconds=60.0)
    frames = FrameList((Blob("f/000.png", "png", data=png_bytes(gradient_image(40, 20))),))
    with pytest.raises(RejectedSample, match=r"^video frame 'f/000.png' is 40x20 = 800 pixels, more than"):
        decode_video(frames, 2, 16, "crop", 8, fps=None, max_pixels=700, max_seconds=60.0)


def test_video_duration_budget_is_checked_before_decoding(tmp_path, no_decoding):
    write_mp4(tmp_path / "c.mp4", 12, fps=12)  # 1 s
    with pytest.raises(RejectedSample) as caught:
        decode_video(Blob("c.mp4", "mp4", path=tmp_path / "c.mp4"), 4, 16, "crop", 8, fps=None,
                     max_pixels=PIXELS, max_seconds=0.5)
    assert caught.value.reason == (
        "video 'c.mp4' is 1.00 s long, more than max_video_seconds=0.5 (the container's duration, read before "
        "decoding); cut it into shorter clips or raise data.prep.max_video_seconds")
    frames = FrameList(tuple(Blob(f"f/{i:03d}.png", "png", data=b"never read") for i in range(6)))
    with pytest.raises(RejectedSample, match=r"^video 'f' is 1.00 s long, more than max_video_seconds=0.5 "
                                             r"\(6 frames at 6 fps\)"):
        decode_video(frames, 4, 16, "crop", 8, fps=6.0, max_pixels=PIXELS, max_seconds=0.5)


def test_audio_duration_budget_is_checked_before_decoding(tmp_path, no_decoding):
    with pytest.raises(RejectedSample) as caught:
        decode_audio(wav(tmp_path, "long.wav", sine(50, 8000, 3.0), 8000), 16_000, 2.0)
    assert caught.value.reason == (
        "audio 'long.wav' is 3.00 s long, more than max_audio_seconds=2 (read from its header; long clips are "
        "rejected, not cut, so the text still matches the audio); cut it into shorter clips or raise "
        "data.prep.max_audio_seconds")


def test_a_folder_where_a_media_file_belongs(tmp_path):
    (tmp_path / "pics").mkdir()
    with pytest.raises(RejectedSample) as caught:
        decode_image(Blob("pics", "", path=tmp_path / "pics", root=tmp_path), 32, "crop", 14, max_pixels=PIXELS)
    assert caught.value.reason == "image 'pics' is a folder, expected a file"  # no absolute path


def test_truncated_wav_is_rejected(tmp_path):
    path = truncated_wav(tmp_path / "cut.wav", seconds=1.0, rate=16_000, keep=0.5)  # 32,000 data bytes promised
    with pytest.raises(RejectedSample) as caught:
        decode_audio(Blob("cut.wav", "wav", path=path), 16_000, 30.0)
    assert caught.value.reason == (
        "audio 'cut.wav' is truncated: its WAV header promises 32,000 bytes of samples, the file holds 15,978 "
        "(50%); copy the whole file again")
    with pytest.raises(RejectedSample, match="^audio 'cut.wav' is truncated"):  # a tar member: the same bytes
        decode_audio(Blob("cut.wav", "wav", data=path.read_bytes()), 16_000, 30.0)


def test_whole_wavs_with_trailing_chunks_or_unknown_size_are_not_truncated(tmp_path):
    import struct

    blob = wav(tmp_path, "w.wav", sine(440, 8000, 0.25), 8000)
    whole = blob.path.read_bytes()
    listed = whole + b"LIST" + struct.pack("<I", 5) + b"INFO\x00\x00"  # odd size: padded to even
    listed = listed[:4] + struct.pack("<I", len(listed) - 8) + listed[8:]
    streamed = whole[:40] + struct.pack("<I", 0xFFFFFFFF) + whole[44:]  # a writer that could not seek back
    for data in (listed, streamed):
        assert decode_audio(Blob("w.wav", "wav", data=data), 8000, 30.0).size == 2000


def test_truncated_flac_is_undecodable(tmp_path):
    soundfile.write(tmp_path / "a.flac", np.random.default_rng(0).random(8000) * 0.1, 16_000, subtype="PCM_16")
    data = (tmp_path / "a.flac").read_bytes()
    with pytest.raises(RejectedSample, match="^cannot decode audio 'a.flac': .*lost sync"):
        decode_audio(Blob("a.flac", "flac", data=data[: len(data) // 2]), 16_000, 30.0)
