"""``synthesize``: the whole synthetic corpus, one JSONL per sample kind plus its media files.

Layout under ``out`` (paths in the JSONL are relative to ``out``, as ``xoron_dist.data.schema``
asks)::

    text.jsonl  image_caption.jsonl  ...        one per kind with a count > 0
    conversation.jsonl  tool_use.jsonl           capability samples (capability.py), no media
    document.jsonl  sysadmin.jsonl  jupyter.jsonl  more capability sources, samples of kind conversation
    images/<id>.png|.jpg                         image_caption, text_to_image (1 in 5 JPEG)
    videos/<id>/frame000.png ...  videos/<id>.mp4  video_caption, text_to_video (1 in 4 MP4)
    audio/<id>.wav                               audio_transcript, text_to_speech
    bad.jsonl, images|videos|audio/bad/          only with bad_samples (see bad_samples.py)
    synth.json                                   config, counts (per kind; jsonl_counts per file),
                                                 content hash; written last

Every sample is a pure function of ``(cfg.seed, kind, index)`` and the media settings: its own
``random.Random`` (string seeds hash with SHA-512, so they are stable across processes and
Python runs) and a numpy ``Generator`` drawn from it. So the output is byte-identical for the
same config on the same install, and a larger count extends a smaller one: the first N samples
of a kind do not change when its count grows.

Clip frame rate: all clips run at ``VIDEO_FPS``, recorded in every video sample's optional
``fps`` field (which ``xoron prep`` reads for frame folders; a folder has no rate of its own), in
the MP4 streams, and in ``synth.json``.

Speakers: the vowels of audio sample ``index`` (id ``<kind>-{index + 1:06d}``) are spoken by
``sounds.SPEAKERS[index % len(SPEAKERS)]`` (round robin, so every speaker gets the same share).
The speaker is a function of the id (``speaker_of``) rather than a JSONL field or an id suffix:
the id is what ``xoron prep`` keeps in its Arrow rows (it drops unknown fields), and the id form
``<kind>-NNNNNN`` stays what the media paths and the corpus tests expect. A clip without vowels
carries no voice; espeak-ng speech (``espeak=True``) is espeak's voice, not the speaker's.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from xoron_dist.config import SynthConfig
from xoron_dist.data.schema import CHAT_KINDS, KINDS
from xoron_dist.data.synthetic_text import FRAMES, generate_documents
from xoron_dist.synth import clips, scenes, sounds
from xoron_dist.synth.bad_samples import BAD_FILE, write_bad_samples
from xoron_dist.synth.capability import SOURCES, capability_samples
from xoron_dist.synth.encoders import write_frame_folder, write_image, write_mp4, write_wav
from xoron_dist.utils.typed_config import field_error

SYNTH_FILE = "synth.json"
SYNTH_FORMAT = "xoron-synth-v1"
PARTIAL_MARKER = ".synth-partial"  # present while a run writes; lets the next run clean up after a crash
MEDIA_DIRS = ("images", "videos", "audio")
VIDEO_FPS = 8
MIN_AUDIO_RATE = 8000
JPEG_SHARE = 0.2
MP4_SHARE = 0.25
# (soundfile subtype, channels) and how often each is written: prep must convert all of them.
WAV_FORMATS = ((("PCM_16", 1), 5), (("FLOAT", 1), 2), (("PCM_16", 2), 2), (("FLOAT", 2), 1), (("PCM_24", 1), 1))
DESCRIBE_IMAGE = ("Describe the image.", "What is in this picture?", "Describe the scene.")
DESCRIBE_VIDEO = ("Describe the video.", "What happens in the video?", "Describe the motion in this clip.")
TRANSCRIBE = ("Transcribe the audio.", "What sounds do you hear, in order?", "Describe the audio.")
SPEECH_PROMPTS = ("Transcribe the speech.", "What is said?")


class SynthOutputError(RuntimeError):
    """The output folder cannot be used (it holds files that are not a synth corpus)."""


@dataclass(frozen=True)
class _Context:
    cfg: SynthConfig
    out: Path
    espeak: bool


def sample_id(kind: str, index: int) -> str:
    return f"{kind}-{index + 1:06d}"


def sample_speaker(index: int) -> int:
    """The speaker (index into ``sounds.SPEAKERS``) of audio sample ``index`` (0-based)."""
    return index % len(sounds.SPEAKERS)


def speaker_of(audio_id: str) -> int:
    """The speaker of an audio sample from its id: "text_to_speech-000012" -> sample 11 -> speaker 3."""
    kind, _, number = audio_id.rpartition("-")
    if kind not in ("audio_transcript", "text_to_speech") or not number.isdigit() or int(number) < 1:
        raise ValueError(f"audio sample id '{audio_id}' is not a synth audio id: expected "
                         "'audio_transcript-NNNNNN' or 'text_to_speech-NNNNNN' (NNNNNN from 000001)")
    return sample_speaker(int(number) - 1)


def sample_rng(seed: int, kind: str, index: int) -> random.Random:
    return random.Random(f"xoron-synth/{seed}/{kind}/{index}")


def _record(kind: str, index: int, text: str, prompt: str | None = None, **fields: str | int) -> dict[str, str | int]:
    record = {"id": sample_id(kind, index), "kind": kind}
    if prompt is not None:
        record["prompt"] = prompt
    record["text"] = text
    record.update(fields)  # the media path, and fps for clips
    return record


def _understanding(rng: random.Random, caption: str, description: str, describe: tuple[str, ...],
                   question: tuple[str, str]) -> tuple[str | None, str]:
    """(prompt, text) of an understanding sample: a bare caption, "Describe ..." + the full
    description, or a question and its answer. The caller computes all three, so that every mode
    draws the same random numbers."""
    mode = rng.choices(("caption", "describe", "question"), weights=(3, 3, 4))[0]
    if mode == "caption":
        return None, caption
    if mode == "describe":
        return rng.choice(describe), description
    return question


# --------------------------------------------------------------------------- per kind


def text_records(cfg: SynthConfig) -> list[dict[str, str | int]]:
    """``generate_documents`` as samples; where a document ends in a question and answer, half of
    them put everything up to the last question in ``prompt`` and the answer alone in ``text``."""
    records = []
    for index, document in enumerate(generate_documents(cfg.text, cfg.seed)):
        rng = sample_rng(cfg.seed, "text", index)
        lines = document.split("\n")
        markers = [answer for _, answer in FRAMES if lines[-1].startswith(answer)]
        if len(lines) > 1 and markers and rng.random() < 0.5:
            records.append(_record("text", index, lines[-1][len(markers[0]):], prompt="\n".join(lines[:-1])))
        else:
            records.append(_record("text", index, document))
    return records


# capability sources with a JSONL of their own but no kind of their own (their samples are conversations)
EXTRA_SOURCES = tuple(source for source in SOURCES if source not in KINDS)


def capability_records(cfg: SynthConfig, source: str) -> list[dict[str, Any]]:
    """The chat samples of a capability ``source`` (conversation, tool_use, document, sysadmin, jupyter)
    from ``synth/capability.py``; ids are ``<source>-NNNNNN``, the kind is the source's schema kind."""
    samples = capability_samples(cfg.seed, source, getattr(cfg, source), cfg.dedup_threshold)
    kind = SOURCES[source][0]
    return [{"id": sample_id(source, index), "kind": kind, **sample} for index, sample in enumerate(samples)]


def image_record(ctx: _Context, kind: str, index: int) -> dict[str, str | int]:
    rng = sample_rng(ctx.cfg.seed, kind, index)
    width, height = scenes.sample_image_size(rng, ctx.cfg.min_image_size, ctx.cfg.max_image_size)
    scene = scenes.sample_scene(rng, width, height)
    path = f"images/{sample_id(kind, index)}.{'jpg' if rng.random() < JPEG_SHARE else 'png'}"
    caption = scenes.scene_caption(scene, rng)
    if kind == "text_to_image":
        prompt, text = None, caption
    else:
        question = scenes.scene_question(scene, rng)
        prompt, text = _understanding(rng, caption, scenes.describe_scene(scene), DESCRIBE_IMAGE, question)
    write_image(scenes.render_scene(scene), ctx.out / path)
    return _record(kind, index, text, prompt, image=path)


def video_record(ctx: _Context, kind: str, index: int) -> dict[str, str | int]:
    rng = sample_rng(ctx.cfg.seed, kind, index)
    clip = clips.sample_clip(rng, ctx.cfg.video_size, ctx.cfg.min_video_frames, ctx.cfg.max_video_frames)
    as_mp4 = rng.random() < MP4_SHARE and ctx.cfg.video_size % 2 == 0  # H.264 yuv420p needs even sides
    caption = clips.clip_caption(clip)
    if kind == "text_to_video":
        prompt, text = None, caption
    else:
        prompt, text = _understanding(rng, caption, caption, DESCRIBE_VIDEO, clips.clip_question(clip, rng))
    frames = clips.render_clip(clip)
    path = f"videos/{sample_id(kind, index)}"
    if as_mp4:
        path += ".mp4"
        write_mp4(frames, ctx.out / path, VIDEO_FPS)
    else:
        write_frame_folder(frames, ctx.out / path)
    return _record(kind, index, text, prompt, video=path, fps=VIDEO_FPS)


def speech_sentence(rng: random.Random) -> str:
    """A short sentence to speak: what a small scene holds ("Two red circles and a blue square ...")."""
    return scenes.count_caption(scenes.sample_scene(rng, 90, 90))


def audio_record(ctx: _Context, kind: str, index: int) -> dict[str, str | int]:
    rng = sample_rng(ctx.cfg.seed, kind, index)
    rate = ctx.cfg.audio_sample_rate
    # Drawn whether or not espeak is used, so the non-speech samples match between the two modes.
    wants_speech = rng.random() < (0.5 if kind == "text_to_speech" else 0.3)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    (subtype, channels), = rng.choices([f for f, _ in WAV_FORMATS], weights=[w for _, w in WAV_FORMATS])
    if wants_speech and ctx.espeak:
        text = speech_sentence(rng)
        wave = sounds.speak(text, rate, rng) * rng.uniform(0.5, 1.0)
        describe = SPEECH_PROMPTS
        question = (rng.choice(SPEECH_PROMPTS), text)
    else:
        describe = TRANSCRIBE
        voice = sounds.SPEAKERS[sample_speaker(index)]
        events = sounds.sample_events(rng, voice)
        wave = sounds.render_events(events, rate, noise_rng, voice)
        text = sounds.transcript(events)
        question = sounds.events_question(events, rng)
    prompt = None
    if kind == "audio_transcript":
        prompt, text = _understanding(rng, text, text, describe, question)
    if channels == 2:  # a little louder on the left, so the channels differ
        wave = np.stack([wave, 0.8 * wave], axis=1)
    path = f"audio/{sample_id(kind, index)}.wav"
    write_wav(wave, ctx.out / path, rate, subtype)
    return _record(kind, index, text, prompt, audio=path)


RECORD_BUILDERS = {
    "image_caption": image_record, "text_to_image": image_record,
    "video_caption": video_record, "text_to_video": video_record,
    "audio_transcript": audio_record, "text_to_speech": audio_record,
}  # fmt: skip


# --------------------------------------------------------------------------- the corpus


def _prepare_output(out: Path) -> None:
    """Create ``out``, or clear a previous corpus from it; refuse a folder holding anything else."""
    if out.exists() and not out.is_dir():
        raise SynthOutputError(f"--out {out} is a file; give a folder (new or empty)")
    out.mkdir(parents=True, exist_ok=True)
    entries = list(out.iterdir())
    if not entries:
        return
    if not ((out / SYNTH_FILE).is_file() or (out / PARTIAL_MARKER).is_file()):
        raise SynthOutputError(
            f"--out {out} is not empty and holds no {SYNTH_FILE}, so it is not a synth corpus; "
            "give a new or empty folder (synth replaces only its own earlier output)"
        )
    for name in MEDIA_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in [f"{kind}.jsonl" for kind in (*KINDS, *EXTRA_SOURCES)] + [BAD_FILE, SYNTH_FILE, PARTIAL_MARKER]:
        (out / name).unlink(missing_ok=True)


def content_sha256(out: Path) -> tuple[str, int]:
    """sha256 over (relative path, file sha256) of every file under ``out`` but synth.json, in path order."""
    digest = hashlib.sha256()
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in (SYNTH_FILE, PARTIAL_MARKER))
    for path in files:
        digest.update(f"{path.relative_to(out).as_posix()}\t{hashlib.sha256(path.read_bytes()).hexdigest()}\n"
                      .encode())
    return digest.hexdigest(), len(files)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def synthesize(cfg: SynthConfig, out: Path, *, progress: bool = True, bad_samples: bool = False,
               espeak: bool = False) -> list[Path]:
    """Write the corpus ``cfg`` describes into ``out``; return the JSONL files written, in
    ``schema.KINDS`` order, then the extra capability sources (document, sysadmin, jupyter), then
    ``bad.jsonl`` when ``bad_samples``.

    ``espeak``: speak some audio_transcript (3 in 10) and text_to_speech (1 in 2) samples with
    espeak-ng instead of tones (raises ``EspeakError`` when it is not on PATH). ``out`` must be new,
    empty, or an earlier corpus (which is replaced).
    """
    cfg.validate("data.synth")
    if (cfg.audio_transcript or cfg.text_to_speech) and cfg.audio_sample_rate < MIN_AUDIO_RATE:
        raise field_error("data.synth.audio_sample_rate", cfg.audio_sample_rate,
                          f"must be >= {MIN_AUDIO_RATE}: the synthetic sounds reach 2 kHz (chirps, vowel formants)")
    out = Path(out)
    version = sounds.espeak_version() if espeak else None
    if espeak and version is None:
        raise sounds.EspeakError("--espeak asks for espeak-ng, but it is not on PATH (apt-get install espeak-ng)")
    _prepare_output(out)
    (out / PARTIAL_MARKER).touch()
    ctx = _Context(cfg, out, espeak)
    files = {name: getattr(cfg, name) for name in (*KINDS, *EXTRA_SOURCES) if getattr(cfg, name) > 0}
    counts: dict[str, int] = {}  # per schema kind, as xoron prep counts the rows
    for name, count in files.items():
        kind = SOURCES[name][0] if name in SOURCES else name
        counts[kind] = counts.get(kind, 0) + count
    written = []
    show = progress and sys.stderr.isatty()
    with tqdm(total=sum(files.values()), unit="sample", disable=not show, desc="xoron synth") as bar:
        for kind, count in files.items():
            bar.set_postfix_str(kind)
            if kind == "text":
                records = text_records(cfg)
                bar.update(count)
            elif kind in CHAT_KINDS or kind in EXTRA_SOURCES:
                records = capability_records(cfg, kind)
                bar.update(count)
            else:
                records = []
                for index in range(count):
                    records.append(RECORD_BUILDERS[kind](ctx, kind, index))
                    bar.update(1)
            written.append(out / f"{kind}.jsonl")
            _write_jsonl(written[-1], records)
    if bad_samples:
        written.append(write_bad_samples(out))
    digest, num_files = content_sha256(out)
    info = {
        "format": SYNTH_FORMAT,
        "config": asdict(cfg),
        "counts": counts,
        "jsonl_counts": files,
        "jsonl": [p.name for p in written],
        "bad_samples": bad_samples,
        "video_fps": VIDEO_FPS,
        "espeak": version,
        "files": num_files,
        "content_sha256": digest,
    }
    (out / SYNTH_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    (out / PARTIAL_MARKER).unlink()
    return written
