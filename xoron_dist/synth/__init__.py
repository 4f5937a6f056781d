"""``xoron synth``: a seeded synthetic multimodal corpus (text, images, clips, audio) written as the
raw JSONL + media that ``xoron prep`` reads (contract: ``xoron_dist.data.schema``).

    from xoron_dist.synth import synthesize
    jsonl_files = synthesize(SynthConfig(text=10, image_caption=5), Path("data/synth"))

Modules: ``scenes`` (still images and their words), ``clips`` (moving shapes), ``sounds`` (tones,
chirps, vowels, espeak-ng), ``encoders`` (deterministic file writers), ``bad_samples`` (broken
samples for prep's tests), ``capability`` (chat samples: reasoning, anti-hallucination, agentic, tool
use; filters and deduplication) with its sources ``documents`` (files and questions on them),
``sysadmin`` (server diagnostics in shell commands) and ``notebooks`` (Jupyter sessions, outputs from
running the cells), ``corpus`` (one sample per (seed, kind, index); the output layout), ``cli`` (the
``xoron synth`` verb).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xoron_dist.synth.corpus import SYNTH_FILE, SynthOutputError, synthesize

__all__ = ["SYNTH_FILE", "SynthOutputError", "synthesize"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): ``xoron <any verb>`` imports xoron_dist.synth.cli, and with it this package;
    # PIL, PyAV, numpy and torch load only when the corpus is really built.
    if name in __all__:
        from xoron_dist.synth import corpus

        return getattr(corpus, name)
    raise AttributeError(f"module 'xoron_dist.synth' has no attribute '{name}'")
