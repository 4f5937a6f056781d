"""DeepSeek-V3 mixture of experts: sigmoid router with expert bias, routed + shared SwiGLU experts.

Routing (DeepSeek-V3 §2.1.2, arXiv:2412.19437): s = sigmoid(u·e); the top-k experts are
chosen by s + b (b: per-expert bias, a buffer, never a parameter), and the combine
weights are the *unbiased* s of the chosen experts, normalised over the k and
scaled by ``routed_scaling_factor``. So the bias steers load, never gradients.

Auxiliary-loss-free balancing: after each optimizer step, b_i += γ·sign(mean_load − load_i)
(loads summed over all micro-batches and, in a distributed run, over every rank that
routes tokens, so every replica applies the same update); the mean of the update is
subtracted so the biases do not drift together (as torchtitan does).

Experts compute with a *sorted* dropless dispatch: the (token, choice) pairs are sorted
by expert once, each expert runs one matmul over its contiguous slice, and the results
are scattered back with one ``index_add_`` — no per-expert masks over all tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import MoEConfig
from xoron_dist.model.layers import LayerBuilder, SwiGLU, expert_tp_split, mark_tp_split
from xoron_dist.parallel.experts import build_expert_parallel_experts


class ExpertBiasRouter(nn.Module):
    """Top-k sigmoid router. Returns (expert ids (tokens, k), combine weights (tokens, k) fp32)."""

    def __init__(self, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        # Tokens routed to each expert by the most recent forward (read by the model, see XoronLLM).
        self.register_buffer("last_load", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (tokens, experts)
        chosen = torch.topk(scores + self.expert_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, chosen)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        with torch.no_grad():
            self.last_load.copy_(torch.bincount(chosen.flatten(), minlength=self.num_experts))
        return chosen, weights * self.scaling

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Move the bias of over-loaded experts down and of under-loaded ones up by ``rate``."""
        delta = rate * torch.sign(load.float().mean() - load.float())
        self.expert_bias.add_(delta - delta.mean())


class RoutedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as stacked weights (HF DeepseekV3Experts layout).

    gate_up: (experts, 2·intermediate, hidden) — gate rows first, then up rows.
    down:    (experts, hidden, intermediate).
    With a tensor-parallel ``builder`` whose ``split_experts`` is set, each rank holds 1/tp of every expert's
    intermediate dim (of both gate and up) and the experts' partial outputs are summed over the
    ranks before the combine weights apply, so the router's gradient is complete on every rank.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, builder: LayerBuilder | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.builder, local = expert_tp_split(builder, intermediate)
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * local, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, local))
        if self.builder.tp_size > 1:
            mark_tp_split(self.gate_up, dim=1, stride=2)
            mark_tp_split(self.down, dim=2)

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (tokens, hidden), chosen/weights (tokens, k) -> (tokens, hidden)."""
        k = chosen.shape[1]
        flat = chosen.flatten()
        order = flat.argsort(stable=True)  # (token, choice) pairs grouped by expert
        token_of = order // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        grouped = self.builder.copy_to_tp(x)[token_of]
        # unbind once: indexing the stacked weight per expert would make autograd build one
        # full-size zero gradient per expert and add them up; unbind's backward stacks once.
        gate_ups, downs = self.gate_up.unbind(0), self.down.unbind(0)
        outputs = []
        for expert, rows in enumerate(grouped.split(counts)):
            if rows.shape[0] == 0:
                continue
            gate, up = F.linear(rows, gate_ups[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, downs[expert]))
        combined = self.builder.reduce_from_tp(torch.cat(outputs)) * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, combined)


class MoEFeedForward(nn.Module):
    """Routed experts (top-k of ``num_experts``) plus ``num_shared_experts`` always-on experts."""

    def __init__(self, hidden: int, cfg: MoEConfig, builder: LayerBuilder) -> None:
        super().__init__()
        self.router = ExpertBiasRouter(hidden, cfg)
        if builder.experts is not None:  # spread over expert-parallel ranks, tokens moved by all-to-all
            self.experts = build_expert_parallel_experts(cfg.num_experts, hidden, cfg.expert_intermediate_size, builder)
        else:
            self.experts = RoutedExperts(cfg.num_experts, hidden, cfg.expert_intermediate_size, builder)
        self.shared = (
            SwiGLU(hidden, cfg.expert_intermediate_size * cfg.num_shared_experts, builder)
            if cfg.num_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden)."""
        flat = x.reshape(-1, x.shape[-1])
        chosen, weights = self.router(flat)
        out = self.experts(flat, chosen, weights)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x)
