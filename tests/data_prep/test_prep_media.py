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
from tests.data_prep.inputs import gradient_image, png_bytes, sine, write_mp4


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
    upright = load_image(Blob("t.png", "png", data=buffer.getvalue()))
    assert upright.size == (40, 24)
    assert np.array_equal(np.asarray(upright), np.asarray(tall.transpose(Image.Transpose.ROTATE_270)))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (np.asarray(load_image(blob_of(rgba))) == 255).all()  # transparent -> white, not black


def test_decode_image_rejects_garbage_and_missing(tmp_path):
    with pytest.raises(RejectedSample, match="cannot decode image 'bad.png'"):
        decode_image(Blob("bad.png", "png", data=b"not a png"), 32, "crop", 14)
    with pytest.raises(RejectedSample, match="image file 'nope.png' not found"):
        decode_image(Blob("nope.png", "png", path=tmp_path / "nope.png"), 32, "crop", 14)


def test_frame_indices_spread_and_stretch():
    assert frame_indices(12, 4) == [1, 4, 7, 10]
    assert frame_indices(4, 4) == [0, 1, 2, 3]
    assert frame_indices(2, 4) == [0, 0, 1, 1]  # short clip: frames held, deterministically
    assert frame_indices(1, 3) == [0, 0, 0]


def test_frame_list_sampling_fps_and_sizes():
    frames = FrameList(tuple(blob_of(Image.new("RGB", (20, 16), (40 * i,) * 3)) for i in range(6)))
    clip, fps = decode_video(frames, 4, 16, "squash", 8, fps=6.0)
    assert clip.shape == (4, 16, 16, 3)
    assert [int(f.mean()) for f in clip] == [0, 80, 120, 200]
    assert fps == pytest.approx(4.0)  # 4 frames over a 1 s clip
    mixed = FrameList((blob_of(Image.new("RGB", (20, 16))), blob_of(Image.new("RGB", (16, 16)))))
    with pytest.raises(RejectedSample, match="frames differ in size"):
        decode_video(mixed, 2, 16, "crop", 8, fps=None)


def test_mp4_sampling_and_short_clip(tmp_path):
    write_mp4(tmp_path / "c.mp4", 12)
    clip, fps = decode_video(Blob("c.mp4", "mp4", path=tmp_path / "c.mp4"), 4, 16, "crop", 8, fps=None)
    assert clip.shape == (4, 16, 16, 3) and fps == pytest.approx(4.0)
    assert np.allclose([f.mean() for f in clip], [30, 90, 150, 210], atol=3)
    write_mp4(tmp_path / "s.mp4", 2)
    data = (tmp_path / "s.mp4").read_bytes()
    clip, fps = decode_video(Blob("s.mp4", "mp4", data=data), 4, 16, "crop", 8, fps=None)
    assert np.allclose([f.mean() for f in clip], [10, 10, 30, 30], atol=3) and fps == pytest.approx(24.0)
    with pytest.raises(RejectedSample, match="cannot decode video 'x.mp4'"):
        decode_video(Blob("x.mp4", "mp4", data=data[: len(data) // 3]), 4, 16, "crop", 8, fps=None)


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
