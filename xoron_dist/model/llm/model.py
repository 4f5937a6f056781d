"""The Xoron LLM backbone: a DeepSeek-V3-family decoder (MLA + MoE, RMSNorm, SwiGLU).

    tokens ─► embed ─► [ RMSNorm ─► MLA ─► + ─► RMSNorm ─► FFN ─► + ] × L ─► RMSNorm ─► LM head (+ loss)

The FFN of layer i is the MoE (top-k of the routed experts + shared experts) when
``cfg.is_moe_layer(i)``, else a dense SwiGLU (``dense_layers`` leading dense layers, as DeepSeek's
``first_k_dense_replace``, and ``moe_layer_freq``: MoE on every n-th layer). Names of submodules
are ours; ``hf.py`` maps them to and from HF ``DeepseekV3ForCausalLM``.

This is the single-rank model, and every parallel layout is this model transformed from outside
(``xoron_dist.parallel.parallelize``). A pipeline stage is this model with the modules of the
other stages removed: ``forward`` runs whatever is present. Without ``embed_tokens`` it takes the
previous stage's hidden states as ``inputs_embeds``; without ``lm_head`` it returns its hidden
states (``LLMOutput.hidden``). Layers are keyed by their global index (``layers.<i>``), so a
stage's parameter names, and its checkpoints, are those of the whole model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from xoron_dist.config import LLMConfig
from xoron_dist.model.common.init import empty_embedding, init_weights_
from xoron_dist.model.common.mlp import SwiGLU
from xoron_dist.model.common.moe import MoEFeedForward
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.model.common.rope import RotaryEmbedding
from xoron_dist.model.llm.attention import LatentKVCache, MultiLatentAttention
from xoron_dist.model.llm.generate import generate_text
from xoron_dist.model.llm.head import LLMOutput, LMHead, lm_loss


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int, softmax_scale_multiplier: float) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MultiLatentAttention(cfg, softmax_scale_multiplier)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(index):
            self.ffn = MoEFeedForward(cfg.hidden_size, cfg.moe, cfg.rms_norm_eps)
        else:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size)

    def forward(self, x, rope, positions, document_ids=None, cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, positions, document_ids, cache, self.index)
        return x + self.ffn(self.ffn_norm(x))


class XoronLLM(nn.Module):
    """Decoder-only MoE language model. ``forward`` trains; ``generate_text`` decodes with the latent cache."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rope = RotaryEmbedding(cfg)
        self.embed_tokens = empty_embedding(cfg.vocab_rows(1), cfg.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, i, self.rope.softmax_scale_multiplier) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices, unit norms, zero expert biases (``common.init``)."""
        init_weights_(self, self.cfg.init_std)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        loss_weights: torch.Tensor | None = None,
        keep_normed: bool = False,
    ) -> LLMOutput:
        """input_ids (batch, seq) or inputs_embeds (batch, seq, hidden); labels (batch, seq) already shifted.

        ``position_ids`` default to 0..seq-1 (offset by the cache length when decoding);
        ``document_ids`` (batch, seq) keep packed documents from attending to each other.
        ``before_layer(index, x) -> x`` runs before decoder layer ``index`` (the multimodal fusion layers).
        ``loss_weights`` (batch, seq): per-token loss weights (``LMHead``).
        ``keep_normed``: also return the final-normed hidden states (``LLMOutput.normed``).
        """
        if inputs_embeds is not None:
            x = inputs_embeds
        elif self.embed_tokens is not None:
            x = self.embed_tokens(input_ids)
        else:
            raise ValueError("this model has no embedding (a later pipeline stage): pass the hidden states "
                             "of the previous stage as inputs_embeds")
        batch, seq = x.shape[:2]
        if position_ids is None:  # 0..seq-1 after the cached positions: their rotary angles come from a table
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + seq, device=x.device).expand(batch, -1)
            cos, sin = self.rope.span(start, seq, x.device)  # (1, seq, rope_dim/2): broadcast over the rows
        else:
            cos, sin = self.rope(position_ids)
        rope = (cos.to(x.dtype), sin.to(x.dtype))
        for layer in self.layers.values():
            if before_layer is not None:
                x = before_layer(layer.index, x)
            x = layer(x, rope, position_ids, document_ids, cache)
        if cache is not None:
            cache.length += seq
        if self.lm_head is None:
            return LLMOutput(logits=None, hidden=x)
        normed = self.norm(x)
        out = lm_loss(self.lm_head, normed, labels, loss_weights)
        if keep_normed:
            out.normed = normed
        return out

    @torch.no_grad()
    def generate_text(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Autoregressive decoding with the latent KV cache (see ``xoron_dist.model.llm.generate``)."""
        return generate_text(self, input_ids, max_new_tokens, **kwargs)
