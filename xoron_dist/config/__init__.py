"""The one config tree of a Xoron run: model / parallel / train / data / tokenizer / stages.

    model.py     the LLM (MLA, MoE, RoPE), vision, video, audio (Conformer), projector, fusion sections
    generators.py  image_gen / video_gen sections (with generation.py: DiT, video_generation.py, latents.py)
    speech.py    speech generation: the codec's BigVGAN decoder and its GAN, the TTS text encoder and decoder
    run.py       parallel layout, train (incl. objectives), data (prep, synth), tokenizer, stages
    loading.py   ``XoronConfig`` (the root) and ``ModelConfig``, presets, ``load_config`` (YAML + ``a.b=c`` overrides)
    checks.py    range checks the sections share

Every field is checked where it is defined (``validate``); a wrong value, type or unknown key
raises ``ConfigError`` naming the dotted field, the value and what is allowed. Checks that need
the world size (divisibility of heads by TP and so on) live in ``xoron_dist.parallel.layout``.
Import everything from here: ``from xoron_dist.config import XoronConfig, load_config``.
"""

from xoron_dist.config.loading import (
    PRESET_DIR,
    ModelConfig,
    XoronConfig,
    available_presets,
    load_config,
    preset_dict,
)
from xoron_dist.config.model import (
    AudioConfig,
    ConformerConfig,
    FusionConfig,
    LLMConfig,
    MoEConfig,
    ProjectorConfig,
    RopeConfig,
    VideoConfig,
    VisionConfig,
)
from xoron_dist.config.run import (
    DataConfig,
    ParallelConfig,
    PrepConfig,
    ProfileConfig,
    StageConfig,
    SynthConfig,
    TokenGroupConfig,
    TokenizerConfig,
    TrainConfig,
)
from xoron_dist.config.speech import SpeechConfig, VocoderConfig
from xoron_dist.utils.typed_config import ConfigError

__all__ = [
    "PRESET_DIR",
    "AudioConfig",
    "ConformerConfig",
    "ConfigError",
    "DataConfig",
    "FusionConfig",
    "LLMConfig",
    "MoEConfig",
    "ModelConfig",
    "ParallelConfig",
    "PrepConfig",
    "ProfileConfig",
    "ProjectorConfig",
    "RopeConfig",
    "StageConfig",
    "SpeechConfig",
    "SynthConfig",
    "TokenGroupConfig",
    "TokenizerConfig",
    "TrainConfig",
    "VideoConfig",
    "VisionConfig",
    "VocoderConfig",
    "XoronConfig",
    "available_presets",
    "load_config",
    "preset_dict",
]
