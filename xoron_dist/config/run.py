"""The run half of the config tree: parallel layout, training, data (prep, synth), tokenizer, stages."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from xoron_dist.config.checks import non_negative, ordered, positive
from xoron_dist.utils.typed_config import field_error, from_dict


@dataclass
class ParallelConfig:
    """Sizes of the parallel dimensions; data parallelism takes what the world size leaves.

    world = dp * tp * pp * sp ; experts are spread over ``ep`` ranks carved out of dp*sp.
    """

    tp: int = 1
    pp: int = 1
    sp: int = 1
    ep: int = 1
    zero_stage: int = 1
    sequence_parallel: bool = False
    tp_experts: bool = True  # split routed experts on their FFN dim over TP; False: whole experts per rank
    ring_latent: bool = True  # ring attention passes MLA's latent + rope key instead of full K/V
    # ep > 1: None = dropless dispatch (uneven all-to-all); a factor c caps every expert at
    # ceil(c * tokens * top_k / num_experts) rows per rank (fixed shapes; overflow choices dropped).
    expert_capacity_factor: float | None = None

    def validate(self, where: str) -> None:
        positive(self, where, "tp", "pp", "sp", "ep")
        if self.expert_capacity_factor is not None and not self.expert_capacity_factor > 0:
            raise field_error(f"{where}.expert_capacity_factor", self.expert_capacity_factor,
                              "must be > 0 (or null for dropless expert dispatch)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise field_error(f"{where}.zero_stage", self.zero_stage, "allowed values are 0, 1, 2, 3")
        if self.sequence_parallel and self.tp == 1:
            raise field_error(f"{where}.sequence_parallel", True,
                              "Megatron sequence parallelism splits the TP group's work; it needs tp > 1")


@dataclass
class TokenGroupConfig:
    """A group of tokens whose LM loss counts ``weight`` times (the seed's reasoning, tool-call,
    uncertainty and code-execution blocks): a target token is in the group from one of its ``open``
    tokens up to and including the next of its ``close`` tokens, within one packed document. A token
    in several groups takes the largest weight. Tokens are written as the tokenizer spells them
    (``<|think|>``); each must be one token of the vocabulary."""

    name: str = "group"
    open: list[str] = field(default_factory=list)
    close: list[str] = field(default_factory=list)
    weight: float = 1.0

    def validate(self, where: str) -> None:
        positive(self, where, "weight")
        if not self.open or not self.close:
            raise field_error(f"{where}.open", self.open, "a token group needs open and close tokens")


@dataclass
class ProfileConfig:
    """``torch.profiler`` over a window of optimizer steps (``train/profiler.py``): steps ``start`` to
    ``start + steps - 1`` are traced on each rank of ``ranks``, after ``warmup`` steps in which the profiler
    runs untraced (its start-up cost stays out of the trace). ``start: 0`` = off. Traced steps run slower
    (the step log's tokens/s shows it); the trace goes to ``<run>/profile/``."""

    start: int = 0
    steps: int = 2
    warmup: int = 1
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that trace; [] = every rank
    memory: bool = False  # also the allocations (profile_memory) and every op's input shapes
    stack: bool = False  # also the Python stack of each op (a larger trace)

    def validate(self, where: str) -> None:
        non_negative(self, where, "start", "warmup")
        positive(self, where, "steps")
        for i, rank in enumerate(self.ranks):
            if rank < 0:
                raise field_error(f"{where}.ranks[{i}]", rank, "a global rank, >= 0")

    @property
    def last(self) -> int:
        """The last traced step (0 when off)."""
        return self.start + self.steps - 1 if self.start else 0


@dataclass
class TrainConfig:
    name: str = "xoron"
    output_dir: str = "runs"
    steps: int = 1000
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    seq_len: int = 4096
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # fp32 matmuls and convolutions on CUDA in TF32 (10-bit mantissa inputs, fp32 accumulation): what
    # stays fp32 in a bf16 run (router, losses) and whole fp32 runs. Off: full fp32. No effect on CPU.
    tf32: bool = True
    # One device's peak TFLOP/s for the MFU in the step log; None = from the table of known GPUs
    # (train/metrics.py DEVICE_PEAKS). Set it for a GPU the table lacks, or to report MFU on CPU.
    peak_tflops: float | None = None
    optimizer: Literal["auto", "adamw", "cpu_adam", "fused_adam"] = "auto"
    # dtype the micro-batches' gradients are summed in (DeepSpeed data_types.grad_accum_dtype), bf16 runs
    # only: auto = fp32 when grad_accum_steps > 1 under ZeRO 1-3, else bf16 (train/ds_config.py)
    grad_accum_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    ds_config: str = "ds_configs/zero1.json"
    seed: int = 1234
    # --resume from a checkpoint of another world size, parallel layout or ZeRO stage: consolidate it and
    # reslice it into this layout (train/reshard.py; ``xoron train --resume --reshard``). Off: refused.
    reshard: bool = False
    # With reshard: Adam's moments and step count resliced too (train/reshard.py). None: when the checkpoint's
    # layout holds readable moments (ZeRO 1-3), else they start at zero with a warning; true: carried, or the
    # resume is refused naming why; false: they start at zero.
    reshard_optimizer: bool | None = None
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True
    # Every N steps each enabled generator makes one sample per prompt of sample_prompts into TensorBoard
    # (samples/image/i, samples/video/i as a strip of frames, samples/speech/i); 0 = never.
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: [
        "A red circle on a black background.", "A blue square is left of a yellow star."])
    activation_checkpointing: bool = False
    # with activation_checkpointing: recompute every N-th block (1 = every block; 2 = half of them,
    # the other half keep their activations: less recompute for more memory)
    activation_checkpointing_every: int = 1
    # torch.compile every LLM decoder block (train/compile.py; the local routed experts compile with it, the
    # expert-parallel experts and the ring core stay eager). The first step pays the compile (tens of seconds
    # cold on CPU). Off by default: bench/llm_step.py --compile measures it (1.25x eager on CPU, smoke shape).
    compile: bool = False
    # > 0: the LM head and loss run on chunks of this many tokens (LinearCrossEntropy: each chunk's gradients
    # made in its forward), so the whole (tokens x vocabulary) logits never exist at once; also faster than one
    # piece (bench/lm_head_loss.py, CPU, chunks of 256: 1.03x at the smoke size, 1.85x at 4096 x 32K vocab).
    # 0 = in one piece (autograd's head, the logits returned). None = by device (``loss_chunk_for``).
    loss_chunk_tokens: int | None = None
    # parallel.ep > 1, dropless: the expert dispatch runs as a pipeline of this many chunks of tokens, so one
    # chunk's all-to-all travels while another chunk's experts compute (parallel/experts.py); 1 = no overlap.
    # An execution choice, not a layout: checkpoints do not depend on it (so it is not in the config hash).
    ep_overlap_chunks: int = 1
    # Collectives that wait longer than this fail (torch.distributed's timeout; minutes, fractions allowed).
    dist_timeout_minutes: float = 10.0
    # A rank whose training makes no progress for this long dumps its Python stacks into
    # <run>/watchdog/ and says where it waits; rank 0 names the ranks that did not arrive
    # (train/watchdog.py). Below dist_timeout_minutes, so the report comes before the timeout; None = half
    # of it; 0 = off.
    watchdog_minutes: float | None = None
    # Numerics guard (train/guard.py). A step whose loss or gradient norm is not finite is skipped (its
    # update is never applied) and counted. After more than max_skipped_steps such steps in a row, or a
    # loss spike, the run has diverged, and nonfinite_policy says what follows: "rollback" reloads the
    # newest checkpoint from before the trouble and skips the batches since (at most max_rollbacks
    # times, then stops); "skip" stops; "stop" stops already at the first non-finite step or spike.
    # A stop for divergence exits with status 4.
    nonfinite_policy: Literal["skip", "rollback", "stop"] = "rollback"
    max_skipped_steps: int = 3
    max_rollbacks: int = 3
    # > 1: a finite loss above this factor times the mean of the last loss_spike_window losses is a
    # spike (checked once the window is full); 0 = off
    loss_spike_factor: float = 0.0
    loss_spike_window: int = 50
    # objective name -> weight of its loss in the step's total (``xoron_dist.train.objectives``);
    # unset objectives take their default weight (the LM 1.0; the seed's generation losses 0.1)
    objectives: dict[str, float] = field(default_factory=dict)
    token_groups: list[TokenGroupConfig] = field(default_factory=list)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    @property
    def watchdog_seconds(self) -> float:
        """Seconds without progress before the hang watchdog reports (0: off)."""
        minutes = self.dist_timeout_minutes / 2 if self.watchdog_minutes is None else self.watchdog_minutes
        return 60.0 * minutes

    def loss_chunk_for(self, device_type: str) -> int:
        """``loss_chunk_tokens`` on a device of this type ("cpu", "cuda", ...): the set value, else by device.

        Each chunk adds its ∂W (vocabulary x hidden, fp32) to an accumulator: a read and a write of it per chunk
        against 2 x chunk FLOPs per element, so the accumulation stays compute-bound only from about chunk / 4
        FLOPs per byte up: a few on a CPU (whose small chunks also stay in cache: 256 measured fastest, 64-256
        alike), some 300 on an H100-class GPU (2048: about 500; at the full 152K vocabulary a chunk's fp32 logits
        are then 1.2 GB). Under TP each chunk also all-reduces twice over the TP group: larger chunks, fewer.
        ``bench/gpu_check.sh``'s head part measures 256 to 4096 on the GPU."""
        if self.loss_chunk_tokens is not None:
            return self.loss_chunk_tokens
        return 256 if device_type == "cpu" else 2048

    def validate(self, where: str) -> None:
        positive(self, where, "steps", "micro_batch_size", "grad_accum_steps", "seq_len", "lr", "eps",
                  "log_every", "save_every", "keep_checkpoints", "dist_timeout_minutes",
                  "activation_checkpointing_every", "loss_spike_window", "peak_tflops", "ep_overlap_chunks")
        non_negative(self, where, "warmup_steps", "weight_decay", "grad_clip", "loss_chunk_tokens", "watchdog_minutes",
                     "max_skipped_steps", "max_rollbacks", "loss_spike_factor", "sample_every")
        if self.sample_every and not self.sample_prompts:
            raise field_error(f"{where}.sample_prompts", self.sample_prompts,
                              "give at least one prompt, or set train.sample_every: 0")
        if self.watchdog_minutes is not None and self.watchdog_minutes >= self.dist_timeout_minutes:
            raise field_error(f"{where}.watchdog_minutes", self.watchdog_minutes,
                              f"must be below train.dist_timeout_minutes ({self.dist_timeout_minutes}): the watchdog "
                              "reports a hang before the collective times out (0 turns it off)")
        if 0 < self.loss_spike_factor <= 1:
            raise field_error(f"{where}.loss_spike_factor", self.loss_spike_factor,
                              "a spike factor must be > 1 (or 0 to turn spike detection off)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise field_error(f"{where}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise field_error(f"{where}.{name}", getattr(self, name), "must be in [0, 1)")
        if not self.name or "/" in self.name:
            raise field_error(f"{where}.name", self.name, "a non-empty run name without '/'")
        for name, weight in self.objectives.items():
            if weight < 0:
                raise field_error(f"{where}.objectives.{name}", weight, "objective weights must be >= 0")
        if self.profile.start > self.steps:
            raise field_error(f"{where}.profile.start", self.profile.start,
                              f"comes after the run's last step (train.steps = {self.steps}): nothing would be "
                              "traced; pick a step of the run (or 0 for no profile)")


ResizePolicy = Literal["crop", "pad", "squash", "max_side", "native"]


@dataclass
class PrepConfig:
    """How ``xoron prep`` turns raw media into training-ready arrays (recorded in the manifest).

    Resize policies: ``crop`` (shorter side to size, centre crop: square), ``pad`` (longer side
    to size, pad to square), ``squash`` (to size x size, aspect ignored), ``max_side`` (longer
    side to size, aspect kept, both sides rounded down to multiples of ``patch_multiple``; for
    native-resolution encoders), ``native`` (the medium's own size within ``size²`` pixels, never
    enlarged, aspect kept, sides rounded down to multiples of ``patch_multiple``; for video also its
    own frame count, capped at ``video_frames``). ``data_prep.media`` has the exact rules.
    """

    image_size: int = 384
    image_resize: ResizePolicy = "crop"
    video_frames: int = 16
    video_size: int = 256
    video_resize: ResizePolicy = "crop"
    patch_multiple: int = 14
    audio_sample_rate: int = 16_000
    max_audio_seconds: float = 30.0
    # Budgets checked from the file's header before decoding (a 12000x12000 PNG is 140 KB on disk and took
    # ~780 MB to decode): pixels of an image or of one video frame; seconds of a video clip.
    max_image_pixels: int = 64_000_000
    max_video_seconds: float = 600.0
    max_text_tokens: int = 8192
    shard_bytes: int = 256 * 1024 * 1024
    samples_per_unit: int = 256

    def validate(self, where: str) -> None:
        positive(self, where, "image_size", "video_frames", "video_size", "patch_multiple", "audio_sample_rate",
                  "max_audio_seconds", "max_image_pixels", "max_video_seconds", "max_text_tokens", "shard_bytes",
                  "samples_per_unit")
        for medium in ("image", "video"):
            size = getattr(self, f"{medium}_size")
            if getattr(self, f"{medium}_resize") == "native" and size < self.patch_multiple:
                raise field_error(f"{where}.{medium}_size", size,
                                  f"with {medium}_resize: native the budget is {medium}_size² pixels, which must hold "
                                  f"one patch: use at least patch_multiple ({self.patch_multiple})")


@dataclass
class SynthConfig:
    """What ``xoron synth`` generates: samples per kind, and the media sizes (seeded, deterministic)."""

    seed: int = 0
    text: int = 2000
    image_caption: int = 400
    video_caption: int = 60
    audio_transcript: int = 200
    text_to_image: int = 200
    text_to_video: int = 40
    text_to_speech: int = 100
    # capability samples (xoron_dist/synth/capability.py): chain-of-thought, anti-hallucination and agentic
    # conversations, and tool-use conversations; deduplicated (dedup_threshold: the largest Jaccard
    # similarity of word 3-grams two kept samples of a kind may share) and quality-filtered
    conversation: int = 0
    tool_use: int = 0
    # more capability conversations, each source in its own JSONL (document.jsonl ...) of kind conversation:
    # a file attached and questions on it; server diagnostics in shell commands; Jupyter sessions
    document: int = 0
    sysadmin: int = 0
    jupyter: int = 0
    dedup_threshold: float = 0.9
    min_image_size: int = 128
    max_image_size: int = 512
    min_video_frames: int = 8
    max_video_frames: int = 32
    video_size: int = 128
    audio_sample_rate: int = 22_050

    def validate(self, where: str) -> None:
        non_negative(self, where, "text", "image_caption", "video_caption", "audio_transcript", "text_to_image",
                      "text_to_video", "text_to_speech", "conversation", "tool_use", "document", "sysadmin", "jupyter")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise field_error(f"{where}.dedup_threshold", self.dedup_threshold,
                              "a Jaccard similarity in (0, 1]; 1 drops only exact duplicates")
        positive(self, where, "min_image_size", "max_image_size", "min_video_frames", "max_video_frames",
                  "video_size", "audio_sample_rate")
        ordered(self, where, "min_image_size", "max_image_size")
        ordered(self, where, "min_video_frames", "max_video_frames")


@dataclass
class ScalePhaseConfig:
    """One phase of the ``curriculum`` multi-scale strategy: from the end of the phase before up to
    ``until`` (a fraction of the schedule), buckets are drawn from these subsets of the scale lists
    (empty: the whole list), with the configured probabilities renormalised over the subset."""

    until: float = 1.0
    image_scales: list[int] = field(default_factory=list)
    video_scales: list[int] = field(default_factory=list)
    video_frames: list[int] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if not 0.0 < self.until <= 1.0:
            raise field_error(f"{where}.until", self.until, "a fraction of the schedule in (0, 1]")


@dataclass
class MultiScaleConfig:
    """Scale buckets of the Arrow loader (``xoron_dist.data.multiscale``): each micro-batch draws one
    image scale, one video scale and one frame count, and every image/video of the micro-batch is
    brought to that bucket (square ``scale x scale`` by ``fit``; frames sampled evenly), so media
    shapes are static within a micro-batch. The seed's ranges: images 128-512, videos 128-384 at
    8-32 frames; scales here are multiples of the encoders' patches (``image_patch``: the vision
    tower's 14, ``video_patch``: the video encoder's 16).

    ``strategy``: ``random`` (each axis drawn by its probabilities; empty = uniform), ``progressive``
    (each axis steps through its list from smallest to largest in equal shares of the schedule),
    ``curriculum`` (``phases`` by schedule fraction, random within a phase). The schedule runs over
    ``schedule_batches`` micro-batches of a rank (0: the stage's steps x grad_accum_steps); it is a
    pure function of (``seed``, micro-batch index), so a resumed loader draws the same buckets.
    ``fit``: ``pad`` keeps the aspect ratio (longer side to the scale, black letterbox), ``crop``
    takes the centred square, ``squash`` ignores the aspect.
    """

    strategy: Literal["random", "progressive", "curriculum"] = "random"
    image_scales: list[int] = field(default_factory=lambda: [126, 252, 378, 504])
    video_scales: list[int] = field(default_factory=lambda: [128, 192, 256, 320, 384])
    video_frames: list[int] = field(default_factory=lambda: [8, 16, 24, 32])
    image_probabilities: list[float] = field(default_factory=list)
    video_probabilities: list[float] = field(default_factory=list)
    frame_probabilities: list[float] = field(default_factory=list)
    image_patch: int = 14
    video_patch: int = 16
    fit: Literal["pad", "crop", "squash"] = "pad"
    seed: int = 0
    schedule_batches: int = 0
    phases: list[ScalePhaseConfig] = field(default_factory=list)

    def validate(self, where: str) -> None:
        positive(self, where, "image_patch", "video_patch")
        non_negative(self, where, "schedule_batches", "seed")
        for axis, probs, patch in (("image_scales", "image_probabilities", "image_patch"),
                                   ("video_scales", "video_probabilities", "video_patch"),
                                   ("video_frames", "frame_probabilities", None)):
            values, weights = getattr(self, axis), getattr(self, probs)
            if not values:
                raise field_error(f"{where}.{axis}", values, "give at least one value (the seed's: see the docstring)")
            if any(v <= 0 for v in values) or len(set(values)) != len(values):
                raise field_error(f"{where}.{axis}", values, "values must be > 0 and distinct")
            if patch is not None and any(v % getattr(self, patch) for v in values):
                bad = [v for v in values if v % getattr(self, patch)]
                raise field_error(f"{where}.{axis}", values, f"{bad} are not multiples of {patch} = "
                                  f"{getattr(self, patch)}; round them to multiples of the patch size")
            if weights and len(weights) != len(values):
                raise field_error(f"{where}.{probs}", weights, f"needs one probability per entry of {axis} "
                                  f"({len(values)}), or none for uniform")
            if weights and (any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6):
                raise field_error(f"{where}.{probs}", weights, f"probabilities must be >= 0 and sum to 1 "
                                  f"(they sum to {sum(weights):g})")
        if self.strategy == "curriculum" and not self.phases:
            raise field_error(f"{where}.phases", self.phases, "strategy curriculum needs at least one phase")
        if self.phases and self.strategy != "curriculum":
            raise field_error(f"{where}.phases", "[...]", f"phases are read only by strategy curriculum, this is "
                              f"{self.strategy!r}; drop them or set strategy: curriculum")
        last = 0.0
        for i, phase in enumerate(self.phases):
            if phase.until <= last:
                raise field_error(f"{where}.phases[{i}].until", phase.until, f"phases must end in increasing order "
                                  f"(the phase before ends at {last})")
            last = phase.until
            for axis in ("image_scales", "video_scales", "video_frames"):
                extra = sorted(set(getattr(phase, axis)) - set(getattr(self, axis)))
                if extra:
                    raise field_error(f"{where}.phases[{i}].{axis}", getattr(phase, axis),
                                      f"{extra} are not in {where}.{axis} {getattr(self, axis)}")
        if self.phases and last != 1.0:
            raise field_error(f"{where}.phases[{len(self.phases) - 1}].until", last,
                              "the last phase must end at 1.0 (the end of the schedule)")

    def largest(self) -> tuple[int, int, int]:
        """(image scale, video scale, frames): the largest each axis can draw (a curriculum: within its phases)."""
        axes = ("image_scales", "video_scales", "video_frames")
        if self.phases:
            return tuple(max(v for phase in self.phases for v in (getattr(phase, a) or getattr(self, a)))
                         for a in axes)
        return tuple(max(getattr(self, a)) for a in axes)


@dataclass
class DataConfig:
    """Where batches come from.

    ``synthetic_text``: the built-in deterministic text generator (no files).
    ``arrow``: prepared shards in ``path`` (``xoron prep``). With ``synth`` set, a missing
    ``path`` is first filled by ``xoron synth`` + ``xoron prep`` (rank 0; cached by content).
    ``mix``: dataset (kind) -> blend weight; empty = every dataset in proportion to its rows.
    ``image_tokens``/``video_tokens``/``audio_tokens_per_second``: length of the placeholder
    span each medium occupies in the token stream (what the encoder + projector emit).
    ``multiscale``: per-micro-batch scale buckets of images and videos (``MultiScaleConfig``).
    """

    source: Literal["synthetic_text", "arrow"] = "synthetic_text"
    num_documents: int = 4096
    seed: int = 0
    path: str | None = None
    mix: dict[str, float] = field(default_factory=dict)
    num_workers: int = 1
    verify_checksums: bool = True
    image_tokens: int = 64
    video_tokens: int = 64
    audio_tokens_per_second: float = 12.5
    prep: PrepConfig = field(default_factory=PrepConfig)
    synth: SynthConfig | None = None
    multiscale: MultiScaleConfig | None = None  # None: media as prepared (no scale buckets)

    def validate(self, where: str) -> None:
        positive(self, where, "num_documents", "image_tokens", "video_tokens", "audio_tokens_per_second")
        non_negative(self, where, "num_workers")
        if self.source == "arrow" and not self.path:
            raise field_error(f"{where}.path", self.path, "data.source=arrow needs the prepared dataset folder")
        for key, weight in self.mix.items():
            if weight < 0:
                raise field_error(f"{where}.mix.{key}", weight, "blend weights must be >= 0")


@dataclass
class TokenizerConfig:
    """``path``: a local Qwen2.5 tokenizer directory. Without one, a byte-level BPE is trained on
    ``train_text`` (default: the text shipped with the package) and saved with the run."""

    path: str | None = None
    train_text: str | None = None

    def validate(self, where: str) -> None:
        for name in ("path", "train_text"):
            value = getattr(self, name)
            if value is not None and not value:
                raise field_error(f"{where}.{name}", value, "a path, or null")


@dataclass
class StageConfig:
    """One curriculum stage; unset fields inherit from ``train``. Stages run in order, each
    resuming from the checkpoint of the one before."""

    name: str = "stage"
    steps: int = 100
    seq_len: int | None = None
    lr: float | None = None
    mix: dict[str, float] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    # with model.lora: all | base (adapters frozen) | adapters (base frozen); None: adapters when lora is on
    trains: Literal["all", "base", "adapters"] | None = None
    expert_bias_update: bool | None = None
    expert_bias_update_rate: float | None = None  # gamma of this stage; None: model.llm.moe.bias_update_rate
    # This stage's own parallel layout: ParallelConfig fields (tp, pp, sp, ep, zero_stage, ...) that override
    # the run's ``parallel``; empty: the run's. A change between stages reslices the weights (train/reshard.py).
    parallel: dict[str, Any] = field(default_factory=dict)
    # Adam's moments and step count from the previous stage's final checkpoint, resliced into this stage's
    # layout (train/reshard.py); false: this stage's optimizer starts afresh. Refused when they cannot be read.
    carry_optimizer: bool = False
    # objective name -> this stage's weight, over ``train.objectives`` (unset: the run's weight); e.g. a
    # codec stage that trains the audio tokenizer and BigVGAN alone: {lm: 0, codec: 1}
    objectives: dict[str, float] = field(default_factory=dict)

    def parallel_over(self, base: ParallelConfig) -> ParallelConfig:
        """The stage's layout: ``base`` (the run's ``parallel``) with this stage's fields replaced."""
        if not self.parallel:
            return base
        typed = from_dict(ParallelConfig, self.parallel, "stage.parallel")  # the YAML values, typed
        return replace(base, **{name: getattr(typed, name) for name in self.parallel})

    def validate(self, where: str) -> None:
        positive(self, where, "steps", "seq_len", "lr")
        non_negative(self, where, "expert_bias_update_rate")
        from_dict(ParallelConfig, self.parallel, f"{where}.parallel")  # known fields, right types
        for key, weight in self.mix.items():
            if weight < 0:
                raise field_error(f"{where}.mix.{key}", weight, "blend weights must be >= 0")
        for name, weight in self.objectives.items():
            if weight < 0:
                raise field_error(f"{where}.objectives.{name}", weight, "objective weights must be >= 0")
