"""The Xoron LLM backbone: a DeepSeek-V3-family decoder (MLA + MoE, RMSNorm, SwiGLU).

    tokens ─► embed ─► [ RMSNorm ─► MLA ─► + ─► RMSNorm ─► MoE (top-k of 8 + shared) ─► + ] × L ─► RMSNorm ─► LM head

The first ``dense_layers`` layers use a dense SwiGLU instead of the MoE (DeepSeek's
``first_k_dense_replace``; Xoron uses MoE in every layer). Names of submodules are
ours; ``hf_adapter`` maps them to and from HF ``DeepseekV3ForCausalLM``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from xoron_dist.config import LLMConfig
from xoron_dist.model.attention import LatentKVCache, MultiLatentAttention
from xoron_dist.model.layers import LayerBuilder, RMSNorm, SwiGLU, tp_slice
from xoron_dist.model.moe import ExpertBiasRouter, MoEFeedForward, RoutedExperts
from xoron_dist.model.rope import RotaryEmbedding
from xoron_dist.parallel.experts import ExpertParallelExperts

IGNORE_INDEX = -100


@dataclass
class LLMOutput:
    logits: torch.Tensor | None  # (batch, seq, padded_vocab); None when the loss ran in chunks
    loss: torch.Tensor | None = None  # mean token cross-entropy over labels != IGNORE_INDEX
    num_tokens: int = 0  # labelled tokens the loss averages over


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, index: int, builder: LayerBuilder, softmax_scale_multiplier: float) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MultiLatentAttention(cfg, builder, softmax_scale_multiplier)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if index < cfg.dense_layers:
            self.ffn = SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size, builder)
        else:
            self.ffn = MoEFeedForward(cfg.hidden_size, cfg.moe, builder)

    def forward(self, x, rope, positions, document_ids=None, cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, positions, document_ids, cache, self.index)
        return x + self.ffn(self.ffn_norm(x))


class XoronLLM(nn.Module):
    """Decoder-only MoE language model. ``forward`` trains; ``generate_text`` decodes with the latent cache."""

    def __init__(self, cfg: LLMConfig, builder: LayerBuilder | None = None) -> None:
        super().__init__()
        builder = builder or LayerBuilder()
        self.cfg = cfg
        self.builder = builder
        self.vocab_rows = cfg.vocab_rows(builder.tp_size)
        self.rope = RotaryEmbedding(cfg)
        self.embed_tokens = builder.embedding(self.vocab_rows, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, builder, self.rope.softmax_scale_multiplier) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = builder.output_layer(cfg.hidden_size, self.vocab_rows)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False
        self.loss_chunk_tokens = 0  # > 0: head + loss in chunks of this many tokens (see _head)
        self._routers = [m for m in self.modules() if isinstance(m, ExpertBiasRouter)]  # not registered twice
        self.moe_layer_ids = [layer.index for layer in self.layers if isinstance(layer.ffn, MoEFeedForward)]
        # Tokens per expert since the last bias update, one row per MoE layer (see update_expert_biases).
        self.register_buffer("expert_load", torch.zeros(len(self._routers), cfg.moe.num_experts), persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------ set-up

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices, unit norms, zero expert biases. A tensor-parallel slice is
        cut from a full tensor drawn in the same order, so any TP size starts from the same weights."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, ExpertBiasRouter):
                self._normal_(module.weight)
                module.expert_bias.zero_()
            elif isinstance(module, RoutedExperts):
                self._normal_(module.gate_up)
                self._normal_(module.down)
            elif isinstance(module, ExpertParallelExperts):  # cut this rank's experts from the same full draw
                moe = self.cfg.moe
                shape = (moe.num_experts, moe.expert_intermediate_size, self.cfg.hidden_size)
                gate_up = torch.empty(shape[0], 2 * shape[1], shape[2]).normal_(std=self.cfg.init_std)
                down = torch.empty(shape[0], shape[2], shape[1]).normal_(std=self.cfg.init_std)
                module.load_full(gate_up, down)
            elif not list(module.children()) and isinstance(getattr(module, "weight", None), nn.Parameter):
                self._normal_(module.weight)

    def _normal_(self, param: nn.Parameter) -> None:
        if not getattr(param, "tensor_model_parallel", False):
            nn.init.normal_(param, std=self.cfg.init_std)
            return
        dim, stride = param.partition_dim, param.partition_stride
        shape = list(param.shape)
        shape[dim] *= self.builder.tp_size
        full = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(std=self.cfg.init_std)
        param.copy_(tp_slice(full, dim, stride, self.builder.tp_rank, self.builder.tp_size))

    def keep_router_state_fp32(self) -> None:
        """Cast the expert biases back to fp32 after an engine cast the model to bf16/fp16: updates
        of 1e-3 would round away in bf16 (8 mantissa bits), as HF keeps them fp32 too."""
        for router in self._routers:
            router.expert_bias.data = router.expert_bias.data.float()
            router.last_load.data = router.last_load.data.float()
        self.expert_load.data = self.expert_load.data.float()

    def routers(self) -> list[ExpertBiasRouter]:
        """The MoE routers, in layer order (dense layers have none)."""
        return self._routers

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
        before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> LLMOutput:
        """input_ids (batch, seq) or inputs_embeds (batch, seq, hidden); labels (batch, seq) already shifted.

        ``position_ids`` default to 0..seq-1 (offset by the cache length when decoding);
        ``document_ids`` (batch, seq) keep packed documents from attending to each other.
        ``before_layer(index, x) -> x`` runs before decoder layer ``index`` (the multimodal fusion layers).
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = x.shape[:2]
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + seq, device=x.device).expand(batch, -1)
        cos, sin = self.rope(position_ids)
        rope = (cos.to(x.dtype), sin.to(x.dtype))
        for layer in self.layers:
            if before_layer is not None:
                x = before_layer(layer.index, x)
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, rope, position_ids, document_ids, use_reentrant=False)
            else:
                x = layer(x, rope, position_ids, document_ids, cache)
        if cache is not None:
            cache.length += seq
        if self.training and torch.is_grad_enabled() and self._routers:
            # Harvest after the layer loop: activation-checkpoint recompute re-runs the routers in
            # backward, and must not count the same tokens twice.
            self.expert_load += torch.stack([r.last_load for r in self._routers])
        return self._head(x, labels)

    def _head(self, x: torch.Tensor, labels: torch.Tensor | None) -> LLMOutput:
        """Final norm, LM head and (with ``labels``) the mean token loss of hidden states x (batch, seq, hidden).

        With ``loss_chunk_tokens`` set, training never holds the whole (tokens, vocabulary) logits:
        the head and the loss run on chunks of that many tokens, each recomputed in backward, so the
        step keeps one chunk's logits and softmax instead of all of them (at 32K tokens and the full
        152K vocabulary that is ~20 GB of fp32 per row). Same loss and gradients; ``logits`` is None.
        """
        chunk = self.loss_chunk_tokens
        if labels is None or not chunk or not (self.training and torch.is_grad_enabled()):
            logits = self._mask_padding_rows(self.lm_head(self.norm(x)))  # (batch, seq, vocab_rows / tp)
            if labels is None:
                return LLMOutput(logits=logits)
            labelled = labels != IGNORE_INDEX
            num_tokens = int(labelled.sum())
            loss = (self.builder.token_losses(logits, labels) * labelled).sum() / max(num_tokens, 1)
            return LLMOutput(logits=logits, loss=loss, num_tokens=num_tokens)
        hidden, targets = self.norm(x).flatten(0, 1), labels.flatten()
        num_tokens = int((targets != IGNORE_INDEX).sum())
        total = sum(checkpoint(self._chunk_loss_sum, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
                    for i in range(0, hidden.shape[0], chunk))
        return LLMOutput(logits=None, loss=total / max(num_tokens, 1), num_tokens=num_tokens)

    def _chunk_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed token loss of hidden (n, hidden) against targets (n,) (-100: no loss)."""
        logits = self._mask_padding_rows(self.lm_head(hidden))
        return (self.builder.token_losses(logits, targets) * (targets != IGNORE_INDEX)).sum()

    def _mask_padding_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on the embedding's padding rows: never predicted, and the loss is then the same
        however many padding rows a TP size adds."""
        usable = self.cfg.usable_vocab_size
        if self.vocab_rows == usable:
            return logits
        ids = torch.arange(logits.shape[-1], device=logits.device) + self.builder.vocab_offset(self.vocab_rows)
        return logits.masked_fill(ids >= usable, float("-inf"))

    # ------------------------------------------------------------------ expert balancing

    @torch.no_grad()
    def update_expert_biases(
        self, group: torch.distributed.ProcessGroup | None = None, enabled: bool | None = None,
        rate: float | None = None,
    ) -> torch.Tensor:
        """Apply the auxiliary-loss-free bias update from the load since the last call; returns that load.

        ``group``: the ranks whose tokens go through the same experts (data/sequence parallel);
        loads are summed over it first so every replica moves its biases identically.
        ``enabled``/``rate``: override ``moe.bias_update``/``moe.bias_update_rate`` (per curriculum stage).
        """
        load = self.expert_load.clone()
        if group is not None and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, group=group)
        if self.cfg.moe.bias_update if enabled is None else enabled:
            for router, layer_load in zip(self.routers(), load, strict=True):
                router.update_bias(layer_load, self.cfg.moe.bias_update_rate if rate is None else rate)
        self.expert_load.zero_()
        return load

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_text(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Autoregressive decoding. input_ids (batch, prompt) -> (batch, prompt + new).

        ``temperature=0`` is greedy. With ``use_cache`` the prompt is prefilled once and every
        step attends against the latent KV cache; without it, every step re-runs the whole
        sequence (the reference the cache is tested against). Rows that emitted
        ``eos_token_id`` keep emitting it.
        """
        was_training = self.training
        self.eval()
        batch, prompt = input_ids.shape
        if prompt + max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(
                f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
                f"({self.cfg.max_position_embeddings})"
            )
        cache = None
        if use_cache:
            dtype = self.embed_tokens.weight.dtype
            cache = LatentKVCache.allocate(self.cfg, batch, prompt + max_new_tokens, input_ids.device, dtype)
        tokens, step_input = input_ids, input_ids
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_input if use_cache else tokens, cache=cache).logits[:, -1]
            logits = self.builder.gather_logits(logits)[:, : self.cfg.usable_vocab_size]
            nxt = sample_next_token(logits.float(), temperature, top_p, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            tokens = torch.cat((tokens, nxt[:, None]), dim=1)
            step_input = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return tokens



def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (batch, vocab) -> ids (batch,). Greedy at temperature 0; else top-k, then nucleus (top-p)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the mass *before* it already reaches top_p (the first token always stays).
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_ids, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
