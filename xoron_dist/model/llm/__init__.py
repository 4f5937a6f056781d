"""The Xoron LLM (DeepSeek-V3 family): ``model`` (decoder), ``attention`` (MLA + latent cache),
``head`` (LM head + chunked loss), ``generate``, ``sharding`` (tensor-parallel plan), ``hf`` (HF names)."""

from xoron_dist.model.llm.head import IGNORE_INDEX, LLMOutput
from xoron_dist.model.llm.model import DecoderLayer, XoronLLM

__all__ = ["IGNORE_INDEX", "DecoderLayer", "LLMOutput", "XoronLLM"]
