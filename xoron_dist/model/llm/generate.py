"""Autoregressive text decoding for ``XoronLLM``: prefill once, then one token at a time against the
latent KV cache (or, ``use_cache=False``, the whole sequence every step: the reference the cache
is tested against)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from xoron_dist.model.llm.attention import LatentKVCache


def generate_text(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``model``: an ``XoronLLM``. input_ids (batch, prompt) -> (batch, prompt + new).

    ``temperature=0`` is greedy. Rows that emitted ``eos_token_id`` keep emitting it; decoding
    stops early once every row has. ``on_token(ids)`` sees each step's new ids (batch,) as they come
    (streaming to a terminal: ``xoron generate text``).

    Decoding runs under ``torch.inference_mode`` (no autograd bookkeeping per op); the returned ids
    are copied out of it, so a caller may feed them to a training forward.
    """
    cfg = model.cfg
    batch, prompt = input_ids.shape
    if prompt + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
            f"({cfg.max_position_embeddings})"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            tokens = _decode(model, input_ids, max_new_tokens, temperature, top_p, top_k, eos_token_id, use_cache,
                             generator, on_token)
    finally:
        model.train(was_training)
    return tokens.clone()


def _decode(model, input_ids, max_new_tokens, temperature, top_p, top_k, eos_token_id, use_cache, generator,
            on_token) -> torch.Tensor:
    """The decode loop of ``generate_text`` (arguments as there); ids land in one preallocated buffer."""
    cfg = model.cfg
    batch, prompt = input_ids.shape
    cache = None
    if use_cache:
        dtype = model.embed_tokens.weight.dtype
        cache = LatentKVCache.allocate(cfg, batch, prompt + max_new_tokens, input_ids.device, dtype)
    tokens = torch.empty(batch, prompt + max_new_tokens, dtype=input_ids.dtype, device=input_ids.device)
    tokens[:, :prompt] = input_ids
    end, step_input = prompt, input_ids
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else tokens[:, :end], cache=cache).logits[:, -1]
        logits = model.lm_head.gather(logits)[:, : cfg.usable_vocab_size]
        nxt = sample_next_token(logits.float(), temperature, top_p, top_k, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        tokens[:, end] = nxt
        step_input = tokens[:, end : end + 1]
        end += 1
        if on_token is not None:
            on_token(nxt)
        if eos_token_id is not None and bool(done.all()):
            break
    return tokens[:, :end]


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
