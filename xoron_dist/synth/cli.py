"""``xoron synth``: write the synthetic multimodal corpus (media files + JSONL) into a folder.

    xoron synth --out data/synth                                  # the default SynthConfig
    xoron synth --out data/synth --config pipelines/run.yaml      # its data.synth section
    xoron synth --out /tmp/s --text 3 --image-caption 2 --video-caption 0 max_image_size=256

Order of precedence: defaults < ``--config`` < ``key=value`` overrides < ``--seed`` / count flags.
Only light imports at the top: ``xoron_dist.cli`` imports this module for every verb.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from xoron_dist.config import ConfigError, SynthConfig, load_config
from xoron_dist.utils.typed_config import from_dict, parse_override, to_dict, validate_tree

# The per-kind sample counts of SynthConfig (the kinds of xoron_dist.data.schema, which imports pyarrow),
# then the capability sources that write conversations into files of their own (synth/capability.py SOURCES).
COUNT_FIELDS = ("text", "image_caption", "video_caption", "audio_transcript", "text_to_image", "text_to_video",
                "text_to_speech", "conversation", "tool_use", "document", "sysadmin", "jupyter")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (new, empty, or an earlier corpus)")
    parser.add_argument("--config", default=None, help="run YAML whose data.synth section to use")
    parser.add_argument("--seed", type=int, default=None, help="override data.synth.seed")
    for name in COUNT_FIELDS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None, metavar="N",
                            help=f"number of {name} samples")
    parser.add_argument("--bad-samples", action="store_true",
                        help="also write bad.jsonl: broken samples for testing xoron prep's rejects")
    parser.add_argument("--espeak", action="store_true",
                        help="speak some audio samples with espeak-ng (must be on PATH) instead of tones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="SynthConfig overrides, e.g. max_image_size=256 (data.synth.key=value also works)")


def synth_config_from_args(args: argparse.Namespace) -> SynthConfig:
    """The SynthConfig the arguments describe; ConfigError names a wrong field."""
    cfg = SynthConfig()
    if args.config is not None:
        run = load_config(args.config)
        if run.data.synth is None:
            raise ConfigError(f"{args.config} has no data.synth section: add one, or drop --config for the defaults")
        cfg = run.data.synth
    data = to_dict(cfg)
    for text in args.overrides:
        keys, value = parse_override(text)
        if keys[:2] == ["data", "synth"]:
            keys = keys[2:]
        if len(keys) != 1:
            raise ConfigError(f"override '{text}': synth overrides are SynthConfig fields, e.g. max_image_size=256")
        data[keys[0]] = value
    for name in ("seed", *COUNT_FIELDS):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    cfg = from_dict(SynthConfig, data, "data.synth")
    validate_tree(cfg, "data.synth")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = synth_config_from_args(args)
    from xoron_dist.synth.corpus import SYNTH_FILE, SynthOutputError, synthesize
    from xoron_dist.synth.sounds import EspeakError

    start = time.perf_counter()
    try:
        written = synthesize(cfg, args.out, progress=not args.no_progress, bad_samples=args.bad_samples,
                             espeak=args.espeak)
    except (SynthOutputError, EspeakError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        with open(path, "rb") as f:
            print(f"{path}: {sum(1 for _ in f)} lines")
    print(f"wrote {args.out / SYNTH_FILE} in {time.perf_counter() - start:.1f} s")
    return 0
