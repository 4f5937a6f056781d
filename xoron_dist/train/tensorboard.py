"""TensorBoard events of a run: written by rank 0 only, read back by tests and the smoke check.

Tag scheme (``step`` = optimizer updates done, the same number as the progress log):

    train/loss                          training loss of the step (mean over the global batch)
    train/lr                            learning rate of the step
    train/grad_norm                     global gradient norm before clipping
    train/tokens_seen                   tokens consumed so far (all ranks)
    perf/tokens_per_s                   global throughput over the StepTimer window
    perf/step_s                         mean seconds per step over the window
    perf/tflops                         achieved model TFLOP/s per device (train/metrics.py FlopsRate)
    perf/mfu                            model FLOP utilisation, a fraction of the device's peak (only
                                        with a known GPU or train.peak_tflops)
    moe/layer{i}/max_over_mean          max over mean of the tokens routed to each expert of layer i
                                        (1.0 = perfectly even load)
    moe/layer{i}/expert{j}/tokens       tokens routed to expert j of layer i in the step
    moe/layer{i}/expert{j}/bias         expert j's selection bias (DeepSeek-V3 aux-loss-free balancing)
    config                              the run config as YAML (text, at step 0)
    samples/{image,video,speech}/{i}    what each generator makes of train.sample_prompts[i]
                                        (images; a video as its frames side by side; audio)

Use ``moe_scalars`` to build the ``moe/`` entries so the names stay in one place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from xoron_dist.train.metrics import global_rank

TEXT_SUFFIX = "/text_summary"  # SummaryWriter.add_text stores "<tag>/text_summary"


def moe_scalars(
    layer: int, tokens_per_expert: Sequence[float], bias: Sequence[float] | None = None
) -> dict[str, float]:
    """The ``moe/layer{i}/...`` scalars of one MoE layer for one step.

    tokens_per_expert: (num_experts,) tokens routed to each expert; bias: (num_experts,) router bias.
    """
    tokens = [float(t) for t in tokens_per_expert]
    out: dict[str, float] = {}
    mean = sum(tokens) / len(tokens) if tokens else 0.0
    out[f"moe/layer{layer}/max_over_mean"] = max(tokens) / mean if mean > 0 else 0.0
    for j, count in enumerate(tokens):
        out[f"moe/layer{layer}/expert{j}/tokens"] = count
    if bias is not None:
        for j, value in enumerate(bias):
            out[f"moe/layer{layer}/expert{j}/bias"] = float(value)
    return out


class TensorBoardWriter:
    """A ``SummaryWriter`` on rank 0; a no-op elsewhere or when ``enabled`` is False.

    ``purge_step``: when resuming from the checkpoint of step s, pass s + 1 (the first step
    the resumed run logs) so TensorBoard hides the events >= s + 1 that the interrupted run
    wrote after that checkpoint (they would otherwise show twice).
    """

    def __init__(self, log_dir: str | os.PathLike[str], enabled: bool, *, rank: int | None = None,
                 purge_step: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.active = enabled and (global_rank() if rank is None else rank) == 0
        self._writer = None
        if self.active:
            # Imported here: only the writing rank pays for loading tensorboard.
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One point per tag at ``step``; tensors and numpy scalars are accepted (``float()``-able)."""
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """A text entry (rendered as Markdown: the text is indented so it shows verbatim, e.g. YAML)."""
        if self._writer is None:
            return
        block = "\n".join("    " + line for line in text.splitlines())
        self._writer.add_text(tag, block, global_step=step)

    def image(self, tag: str, pixels, step: int) -> None:
        """An image (H, W, 3) uint8."""
        if self._writer is not None:
            self._writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def audio(self, tag: str, samples, sample_rate: int, step: int) -> None:
        """A mono clip (samples,) of floats in [-1, 1]."""
        if self._writer is not None:
            self._writer.add_audio(tag, samples[None], global_step=step, sample_rate=sample_rate)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accumulator(log_dir: str | os.PathLike[str]):  # -> EventAccumulator (tensorboard import kept local)
    from tensorboard.backend.event_processing import event_accumulator

    if not Path(log_dir).is_dir():
        raise FileNotFoundError(f"TensorBoard log directory {log_dir} does not exist")
    # size_guidance 0 = keep every event (the default keeps a reservoir sample of 10,000 scalars).
    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return acc


def read_scalars(log_dir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """All scalar events under ``log_dir`` (the directory holding the event files): tag -> [(step, value)]."""
    acc = _accumulator(log_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_media_tags(log_dir: str | os.PathLike[str]) -> dict[str, list[str]]:
    """The image and audio tags under ``log_dir``: {"images": [...], "audio": [...]}."""
    tags = _accumulator(log_dir).Tags()
    return {"images": sorted(tags["images"]), "audio": sorted(tags["audio"])}


def read_text(log_dir: str | os.PathLike[str]) -> dict[str, list[tuple[int, str]]]:
    """All text entries under ``log_dir``: tag (as given to ``text``) -> [(step, text)], indentation removed."""
    acc = _accumulator(log_dir)
    out: dict[str, list[tuple[int, str]]] = {}
    for tag in acc.Tags()["tensors"]:
        if not tag.endswith(TEXT_SUFFIX):
            continue
        entries = []
        for event in acc.Tensors(tag):
            raw = event.tensor_proto.string_val[0].decode()
            entries.append((event.step, "\n".join(line.removeprefix("    ") for line in raw.split("\n"))))
        out[tag[: -len(TEXT_SUFFIX)]] = entries
    return out
