"""The losses a step optimises, and their weights, as data.

A step's loss is Σ_k w_k · mean_k, one term per objective k, each the mean of its per-item losses
over the *whole step* (every micro-batch, every data/sequence-parallel rank), so the gradient does
not depend on how the step is cut into micro-batches or ranks. An ``Objective`` says how to count
its items in a batch before the forward (so the step's totals are known, one all-reduce for all
objectives, before the first backward) and how to read their loss sum off the model's output.

    name   items                    loss                                           default weight
    lm     labelled target tokens   token cross-entropy                            1.0 (``train.objectives.lm``)
    codec  audio clips              codec GAN + mel + VQ on one segment per clip   0.002
    tts    speech targets           TTS prior + duration + flow losses             0.1
    image_vae      images           autoencoder L1 + spectral + gradient + KL      0.1
    text_to_image  image targets    rectified flow of the MoE-DiT                  0.1
    video_vae      videos           3D causal autoencoder, same terms              0.1
    text_to_video  video targets    per-chunk rectified flow                       0.1
    reconstruction understood images TiTok's reconstruction from the compressor's  ``model.vision.
                                    tokens: pixel MSE + codebook + β·commitment    reconstruction_weight``

The modality table (``xoron_dist.model.modalities``) names the objectives a medium's generator
adds; generation losses start at the seed's 0.1, except the codec's: at initialisation one clip's
codec gradient has norm ~200 in the vocoder and ~40 in the shared audio tokenizer against ~1.5 for
the LM's whole batch (measured on the tiny model), so at 0.1 it would own the global gradient
clipping and the tokenizer. Adam's per-parameter scaling keeps the vocoder's pace at any weight;
0.002 brings both norms to the LM's order. Token groups
(``train.token_groups``): the LM loss of tokens inside a group's blocks (``<|think|>`` ...
``<|/think|>``) counts ``weight`` times (the seed's chain-of-thought, tool-call, uncertainty and
code-execution groups, 1.2-1.5x); ``token_weights`` computes the per-token weights from the labels.

``reconstruction`` is an encoder's auxiliary objective, not a generator's: the vision tower's seed path
(``model.vision.reconstruction_weight`` > 0 builds TiTok's decoder) reconstructs each image it
understands from its compressed tokens. Its items are the images the model encodes (generation targets
left out) and an item's loss is that image's own pixel MSE (mean over its 3·S² values at
``titok_image_size``) plus its codebook and β·commitment terms (means over its k tokens): the tower sums
these over the images (``VisionOutput.aux_loss``), the model adds the sum to ``objective_sums``, and the
step divides by the step's image count, as for every per-item objective above. Its weight defaults to
``model.vision.reconstruction_weight`` (``train.objectives.reconstruction`` overrides it, e.g. per stage).
A micro-batch without images encodes a blank image whose loss enters times 0 (the decoder's gradients are
exact zeros, as ZeRO-3 and the data-parallel gradient reduction need). Under pipeline parallelism the
tower sits on stage 0, which computes the sum and back-propagates it there (``Objective.first_stage``;
``parallel/pipeline/schedule.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from xoron_dist.config import ConfigError, XoronConfig
from xoron_dist.model.llm import IGNORE_INDEX
from xoron_dist.model.modalities import MODALITIES


@dataclass(frozen=True)
class Objective:
    name: str
    default_weight: float | Callable[[XoronConfig], float]  # a constant, or read off the run's config
    # items of this objective in a micro-batch's model inputs: an int, or a device tensor (never read on the host)
    count: Callable[[dict], int | torch.Tensor]
    loss_sum: Callable[[object], torch.Tensor]  # the model output -> Σ of the items' losses
    first_stage: bool = False  # computed by an encoder: under pipeline parallelism on stage 0, not the last

    def weight(self, cfg: XoronConfig) -> float:
        """The run's weight: ``train.objectives.<name>`` when given, else the default."""
        if self.name in cfg.train.objectives:
            return float(cfg.train.objectives[self.name])
        return float(self.default_weight(cfg) if callable(self.default_weight) else self.default_weight)


def _lm_count(inputs: dict) -> torch.Tensor:
    return (inputs["labels"] != IGNORE_INDEX).sum()


def _lm_loss_sum(out) -> torch.Tensor:
    return out.loss * out.num_tokens


def _items(medium: str) -> Callable[[dict], int]:
    """Counts every item of a medium in a micro-batch (understood and generation targets alike)."""
    return lambda inputs: len(inputs.get(f"{medium}s") or ())


def _targets(medium: str) -> Callable[[dict], int]:
    """Counts a medium's generation targets in a micro-batch."""
    def count(inputs: dict) -> int | torch.Tensor:
        flags = inputs.get(f"{medium}_is_target")
        return flags.sum() if flags is not None else 0
    return count


def _understood(medium: str) -> Callable[[dict], int]:
    """Counts the items of a medium the model encodes in a micro-batch (generation targets left out)."""
    def count(inputs: dict) -> int | torch.Tensor:
        flags = inputs.get(f"{medium}_is_target")
        return len(inputs.get(f"{medium}s") or ()) - (flags.sum() if flags is not None else 0)
    return count


def _output_sum(name: str) -> Callable[[object], torch.Tensor]:
    """Reads an objective's sum off the model output's ``objective_sums`` (generators, encoders' aux losses)."""
    return lambda out: out.objective_sums[name]


def _reconstruction_weight(cfg: XoronConfig) -> float:
    return cfg.model.vision.reconstruction_weight


def _reconstructs(cfg: XoronConfig, multimodal: bool) -> bool:
    """Whether the run's model has the vision tower's reconstruction decoder (``VisionTower.reconstruction``)."""
    return multimodal and cfg.model.vision.enabled and cfg.model.vision.reconstruction_weight > 0


OBJECTIVES: dict[str, Objective] = {
    "lm": Objective("lm", 1.0, _lm_count, _lm_loss_sum),
    "codec": Objective("codec", 0.002, _items("audio"), _output_sum("codec")),
    "tts": Objective("tts", 0.1, _targets("audio"), _output_sum("tts")),
    "image_vae": Objective("image_vae", 0.1, _items("image"), _output_sum("image_vae")),
    "text_to_image": Objective("text_to_image", 0.1, _targets("image"), _output_sum("text_to_image")),
    "video_vae": Objective("video_vae", 0.1, _items("video"), _output_sum("video_vae")),
    "text_to_video": Objective("text_to_video", 0.1, _targets("video"), _output_sum("text_to_video")),
    "reconstruction": Objective("reconstruction", _reconstruction_weight, _understood("image"),
                                _output_sum("reconstruction"), first_stage=True),
}


def active_objectives(cfg: XoronConfig, where: str = "train.objectives") -> list[tuple[Objective, float]]:
    """The run's objectives with their weights: the LM's, and those of the media the model builds.
    Raises ``ConfigError`` for a weight given to an objective this run does not have (``where``: the
    config field that gave ``cfg.train.objectives``, e.g. a stage's)."""
    multimodal = cfg.data.source == "arrow"  # synthetic text trains the plain LLM (``train/build.py``)
    names = ["lm"] + [name for m in MODALITIES if multimodal and m.generated(cfg) for name in m.objectives]
    names += ["reconstruction"] if _reconstructs(cfg, multimodal) else []
    unknown = sorted(set(cfg.train.objectives) - set(names))
    if unknown:
        raise ConfigError(f"{where} names {', '.join(unknown)}, which this run does not optimise; "
                          f"its objectives are: {', '.join(names)}")
    return [(OBJECTIVES[n], OBJECTIVES[n].weight(cfg)) for n in names]


class TokenGroups:
    """Per-token LM loss weights from ``train.token_groups`` (see the module docstring), resolved
    against the run's tokenizer once."""

    def __init__(self, cfg: XoronConfig, token_to_id: Callable[[str], int | None]) -> None:
        self.groups = []
        for i, group in enumerate(cfg.train.token_groups):
            ids = {}
            for side in ("open", "close"):
                found = []
                for token in getattr(group, side):
                    token_id = token_to_id(token)
                    if token_id is None:
                        raise ConfigError(f"train.token_groups[{i}].{side}: '{token}' is not one token of the "
                                          "run's tokenizer; name a special token the tokenizer has")
                    found.append(token_id)
                ids[side] = torch.tensor(found, dtype=torch.long)
            self.groups.append((ids["open"], ids["close"], float(group.weight)))

    def __bool__(self) -> bool:
        return bool(self.groups)

    def weights(self, labels: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """(batch, seq) float weights of the labels' loss terms (1 outside every group), or None without
        groups. A group's block runs from an open token to the next close token (both included), within
        one document of a packed row; ignored labels (-100) neither open nor close one."""
        if not self.groups:
            return None
        best = torch.full(labels.shape, float("-inf"), device=labels.device)  # largest weight of a group around
        for open_ids, close_ids, weight in self.groups:
            opens = torch.isin(labels, open_ids.to(labels.device)).long()
            closes = torch.isin(labels, close_ids.to(labels.device)).long()
            depth = _segment_cumsum(opens, document_ids) - _segment_cumsum(closes, document_ids) + closes
            best = torch.where(depth > 0, best.clamp(min=weight), best)
        return torch.where(best > float("-inf"), best, torch.ones_like(best))


def _segment_cumsum(x: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """Cumulative sum of x (batch, seq) along each row, restarting where the document id changes."""
    total = x.cumsum(dim=1)
    if document_ids is None:
        return total
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    before = torch.where(starts, total - x, torch.zeros_like(total))  # the running sum just before each start
    return total - before.cummax(dim=1).values


__all__ = ["OBJECTIVES", "Objective", "TokenGroups", "active_objectives"]
