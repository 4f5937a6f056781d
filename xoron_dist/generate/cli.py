"""``xoron generate text|image|video|speech --model PATH --prompt TEXT ...``: run a trained Xoron.

    text    the prompt's continuation, streamed to the terminal as it is decoded (latent KV cache)
    image   a PNG   (``generate_image``: rectified flow in the image autoencoder's latents)
    video   an MP4  (``generate_video``: chunk by chunk, block-causal)
    speech  a WAV   (``generate_speech``: in the voice of ``--speaker-wav``, default a synthetic voice)

``--model`` is an export (``xoron export --format hf``) or a checkpoint of any layout (consolidated on
this process: ``xoron_dist/loading.py``). A generation request is laid out as training lays it out
(``prompt <|gen_x|> <|x_start|>``), so the generator sees the condition it learnt from. Sizes, steps,
guidance and sampler default to the run config's (the TensorBoard samples' choices). Same seed, same
output. Every wrong flag or value is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MEDIA = {"image": (".png", "image"), "video": (".mp4", "video"), "speech": (".wav", "audio")}


class UsageError(ValueError):
    """A flag's value ``xoron generate`` cannot use."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{text,image,video,speech}")
    for kind, help_text in (("text", "continue a prompt, streaming the tokens"), ("image", "write a PNG"),
                            ("video", "write an MP4"), ("speech", "write a 16 kHz WAV")):
        sub = kinds.add_parser(kind, help=help_text, description=help_text)
        sub.add_argument("--model", required=True, help="an export directory, or a checkpoint (run directory, "
                                                        "its checkpoints/ folder or a stepNNNNNNNN tag)")
        sub.add_argument("--prompt", required=True, help="the prompt text ('-': read it from stdin)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the export's or run's)")
        sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
        if kind == "text":
            sub.add_argument("--max-new-tokens", type=int, default=64)
            sub.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
            sub.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
            sub.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
            sub.add_argument("--no-stream", action="store_true", help="print the text once, at the end")
            continue
        sub.add_argument("--out", required=True, help=f"the {MEDIA[kind][0]} file to write")
        sub.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
        if kind in ("image", "video"):
            sub.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (>= 1)")
            sub.add_argument("--sampler", choices=("euler", "heun"), default=None)
            sub.add_argument("--height", type=int, default=None)
            sub.add_argument("--width", type=int, default=None)
        if kind == "video":
            sub.add_argument("--frames", type=int, default=None)
            sub.add_argument("--fps", type=int, default=8)
        if kind == "speech":
            sub.add_argument("--speaker-wav", default=None, help="reference clip of the voice (any rate, mono or "
                                                                 "stereo); default: a synthetic speaker")


def _check(args: argparse.Namespace) -> None:
    """The flags' values, before the (slow) model load."""
    rules = [("--seed", args.seed >= 0, "must be >= 0")]
    if args.kind == "text":
        rules += [("--max-new-tokens", args.max_new_tokens >= 1, "must be >= 1"),
                  ("--temperature", args.temperature >= 0, "must be >= 0 (0: greedy)"),
                  ("--top-p", 0 < args.top_p <= 1, "must be in (0, 1]"),
                  ("--top-k", args.top_k >= 0, "must be >= 0 (0: no top-k)")]
    else:
        suffix = MEDIA[args.kind][0]
        rules += [("--out", Path(args.out).suffix.lower() == suffix, f"must name a {suffix} file"),
                  ("--steps", args.steps is None or args.steps >= 1, "must be >= 1")]
        if args.kind in ("image", "video"):
            rules += [("--guidance", args.guidance is None or args.guidance >= 1, "must be >= 1 (1: no guidance)")]
            rules += [(flag, value is None or value > 0, "must be > 0")
                      for flag, value in (("--height", args.height), ("--width", args.width))]
        if args.kind == "video":
            rules += [("--frames", args.frames is None or args.frames >= 1, "must be >= 1"),
                      ("--fps", args.fps >= 1, "must be >= 1")]
        if args.kind == "speech" and args.speaker_wav is not None and not Path(args.speaker_wav).is_file():
            rules.append(("--speaker-wav", False, "is not a file"))
    for flag, ok, why in rules:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise UsageError(f"{flag} {value} {why}")


def run(args: argparse.Namespace) -> int:
    from xoron_dist.generate.loading import LoadError, load

    try:
        _check(args)
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        loaded = load(args.model, args.device, args.tokenizer)
        if args.kind != "text":
            _require_generator(loaded.model, args)
        print(f"loaded {loaded.source}", file=sys.stderr)
        if args.kind == "text":
            _text(loaded, prompt, args)
        else:
            out = _media(loaded, prompt, args)
            print(f"wrote {out}", file=sys.stderr)
    except (UsageError, LoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _text(loaded, prompt: str, args: argparse.Namespace) -> None:
    import torch

    from xoron_dist.generate.streaming import TextStream

    tok, model = loaded.tokenizer, loaded.model
    ids = tok.encode(prompt)
    if not ids:
        raise UsageError("--prompt is empty: give at least one token of text")
    device = next(model.parameters()).device
    stream = None if args.no_stream else TextStream(tok, sys.stdout)
    out = model.generate_text(torch.tensor([ids], device=device), args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              eos_token_id=tok.eos_id, generator=torch.Generator(device=device).manual_seed(args.seed),
                              on_token=None if stream is None else stream.push)
    new = out[0, len(ids):].tolist()
    if stream is not None:
        stream.close()
    else:
        print(tok.decode(_before_eos(new, tok.eos_id)))


def _before_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def _require_generator(model, args: argparse.Namespace) -> None:
    generator = {"image": "image_gen", "video": "video_gen", "speech": "speech"}[args.kind]
    if getattr(model, generator, None) is None:
        raise UsageError(f"--model {args.model} has no {args.kind} generator (its config leaves "
                         f"model.{generator}.enabled false)")


def _media(loaded, prompt: str, args: argparse.Namespace) -> Path:
    import numpy as np
    import torch
    from PIL import Image

    from xoron_dist.synth.encoders import write_image, write_mp4, write_wav
    from xoron_dist.train.samples import default_image_size, default_video_shape, reference_voice, request_ids

    model, cfg, out = loaded.model, loaded.cfg, Path(args.out)
    device = next(model.parameters()).device
    ids = torch.tensor([request_ids(loaded.tokenizer, prompt, MEDIA[args.kind][1])], device=device)
    if args.kind == "image":
        side = default_image_size(cfg)
        image = model.generate_image(ids, height=args.height or side, width=args.width or side, steps=args.steps,
                                     guidance=args.guidance, seed=args.seed, sampler=args.sampler)[0]
        write_image(Image.fromarray(image.cpu().numpy()), out)
    elif args.kind == "video":
        frames, side = default_video_shape(cfg)
        clip = model.generate_video(ids, frames=args.frames or frames, height=args.height or side,
                                    width=args.width or side, steps=args.steps, guidance=args.guidance,
                                    seed=args.seed, sampler=args.sampler)[0]
        write_mp4([Image.fromarray(frame) for frame in clip.cpu().numpy()], out, args.fps)
    else:
        rate = cfg.model.audio.sample_rate
        voice = reference_voice(rate) if args.speaker_wav is None else _read_voice(Path(args.speaker_wav), rate)
        wave = model.generate_speech(ids, speaker_audio=[voice], steps=args.steps, seed=args.seed)[0]
        write_wav(np.clip(wave.float().cpu().numpy(), -1.0, 1.0), out, rate, "PCM_16")
    return out


def _read_voice(path: Path, rate: int):
    """A reference clip as float mono samples at ``rate`` (prep's resampler where the file's rate differs)."""
    import numpy as np
    import soundfile as sf
    import torch

    from data_prep.resample import resample_poly

    try:
        samples, file_rate = sf.read(path, dtype="float32", always_2d=True)
    except RuntimeError as err:
        raise UsageError(f"--speaker-wav {path} cannot be read as audio: {err}") from None
    mono = samples.mean(axis=1)
    if file_rate != rate:
        mono = resample_poly(mono, file_rate, rate).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(mono))


__all__ = ["add_arguments", "run"]
