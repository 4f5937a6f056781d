"""DeepSeek-V3 mixture of experts: a router with expert bias, routed + shared SwiGLU experts.

Routing (DeepSeek-V3 §2.1.2, arXiv:2412.19437): s = sigmoid(u·e) (or, with ``router_score:
softmax``, the softmax over the experts, as the seed's router); the top-k experts are chosen by
s + b (b: per-expert bias, a buffer, never a parameter), and the combine weights are the
*unbiased* s of the chosen experts, normalised over the k and scaled by ``routed_scaling_factor``.
So the bias steers load, never gradients. ``router_norm`` puts an RMSNorm on the router's input.

Auxiliary-loss-free balancing: after each optimizer step, b_i += γ·sign(mean_load − load_i), the
mean of the update removed so the biases do not drift together (as torchtitan does). The router
only counts: every forward adds the tokens it sent to each expert to ``load``; the balancing
itself (summing loads over ranks, updating every router's bias) is the trainer's
(``xoron_dist.train.expert_balance``), for every bias-routed MoE of the model at once.

Experts compute with a *sorted* dropless dispatch: the (token, choice) pairs are sorted by
expert once, each expert runs one matmul over its contiguous slice, and the results are scattered
back with one ``index_add_`` — no per-expert masks over all tokens. The slices' ends come from a
``searchsorted`` on the device, and the grouped GEMM (``common.grouped_mm``: ``torch._grouped_mm``,
traceable by ``torch.compile``) takes them there, so a forward asks the host nothing (no
device-to-host sync on a GPU); where its layout rules do not hold (odd widths, fp32 on CUDA) each
expert's matmul runs in a loop over slice sizes read once per layer (one sync; a graph break when
compiled). On CPU both run at about the same speed (bench/moe_layer.py, ``ours`` vs ``ours_loop``).

Precision: the router's scores and the combine weights are fp32 whatever the compute dtype (autocast
is switched off around the router, as HF DeepseekV3 computes its gate in fp32), and the weighted sum
of each token's k expert outputs is accumulated in fp32, then cast to the input's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.config import MoEConfig
from xoron_dist.model.common import grouped_mm
from xoron_dist.model.common.mlp import SwiGLU
from xoron_dist.model.common.norm import RMSNorm
from xoron_dist.model.common.sharding import SplitEntry, SplitExit


class ExpertBiasRouter(nn.Module):
    """Top-k router. Returns (expert ids (tokens, k), combine weights (tokens, k) fp32).

    ``family`` names the model part the router belongs to (``llm``, ``video``, ...): the balancer
    updates each family at its own rate (``bias_update_rate``, from the part's config).
    """

    def __init__(self, hidden: int, cfg: MoEConfig, eps: float = 1e-6, family: str = "llm") -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.score = cfg.router_score
        self.family, self.bias_update_rate = family, cfg.bias_update_rate
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        self.input_norm = RMSNorm(hidden, eps) if cfg.router_norm else None
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        # Tokens sent to each expert, summed over forwards until the balancer reads and clears it.
        self.register_buffer("load", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (tokens, hidden) -> expert ids (tokens, k), combine weights (tokens, k) fp32."""
        with without_autocast(x.device):  # autocast would run the gate's matmul in bf16 even on fp32 inputs
            if self.input_norm is not None:
                x = self.input_norm(x)
            logits = F.linear(x.float(), self.weight.float())  # (tokens, experts)
            scores = logits.sigmoid() if self.score == "sigmoid" else logits.softmax(dim=-1)
            chosen = torch.topk(scores + self.expert_bias.float(), self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, chosen)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        with torch.no_grad():  # index_add_, not bincount: no device-to-host sync
            flat = chosen.flatten()
            self.load.index_add_(0, flat, torch.ones_like(flat, dtype=self.load.dtype))
        return chosen, weights * self.scaling

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float | torch.Tensor) -> None:
        """Move the bias of over-loaded experts down and of under-loaded ones up by ``rate`` (a number, or a
        0-dim tensor on the bias's device: the trainer's is 0 for a skipped step)."""
        delta = rate * torch.sign(load.float().mean() - load.float())
        self.expert_bias.add_(delta - delta.mean())


class RoutedExperts(nn.Module):
    """``num_experts`` SwiGLU experts stored as stacked weights (HF DeepseekV3Experts layout).

    gate_up: (experts, 2·intermediate, hidden) — gate rows first, then up rows.
    down:    (experts, hidden, intermediate).
    ``entry``/``exit`` are identities here; tensor parallelism, which splits every expert's
    intermediate dim, makes them the copy-in (gradient summed) and the sum of the partial outputs,
    so the combine weights apply to whole expert outputs and the router's gradient is complete.
    """

    use_grouped_mm = True  # False: always the per-expert loop (benchmarks compare the two)

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.entry, self.exit = SplitEntry(), SplitExit()

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.gate_up, std=std)
        nn.init.normal_(self.down, std=std)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (gate_up, down) stacks the experts compute with (LoRA folds its adapters in here)."""
        return self.gate_up, self.down

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (tokens, hidden), chosen/weights (tokens, k) -> (tokens, hidden)."""
        k = chosen.shape[1]
        flat = chosen.flatten()
        order = flat.argsort(stable=True)  # (token, choice) pairs grouped by expert
        token_of = order // k
        # ends[e]: one past expert e's last pair in the sorted order (computed on the device)
        ends = torch.searchsorted(flat[order], torch.arange(1, self.num_experts + 1, device=flat.device))
        grouped = self.entry(x)[token_of]
        gate_up, down = self.expert_weights()
        gate_up_t, down_t = gate_up.transpose(-2, -1), down.transpose(-2, -1)  # (experts, in, out)
        if self.use_grouped_mm and grouped_mm.fits(grouped, gate_up_t, down_t):
            ends = ends.to(torch.int32)
            gate, up = grouped_mm.grouped_mm(grouped, gate_up_t, ends).chunk(2, dim=-1)
            out = grouped_mm.grouped_mm(F.silu(gate) * up, down_t, ends)
        else:
            out = _looped(grouped, ends, gate_up, down)
        combined = self.exit(out).float() * weights.flatten()[order, None].float()
        summed = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token_of, combined)
        return summed.to(x.dtype)


def _looped(rows: torch.Tensor, ends: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The experts with one matmul per expert: the slice sizes are read on the host (one sync)."""
    bounds = [0, *ends.tolist()]
    counts = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    # unbind once: indexing the stacked weight per expert would make autograd build one
    # full-size zero gradient per expert and add them up; unbind's backward stacks once.
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    outputs = []
    for expert, expert_rows in enumerate(rows.split(counts)):
        if expert_rows.shape[0] == 0:
            continue
        gate, up = F.linear(expert_rows, gate_ups[expert]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, downs[expert]))
    return torch.cat(outputs)


def without_autocast(device: torch.device) -> AbstractContextManager:
    """Autocast off for ``device`` inside the block (a no-op where autocast is off or does not exist)."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return nullcontext()


class MoEFeedForward(nn.Module):
    """Routed experts (top-k of ``num_experts``) plus ``num_shared_experts`` always-on experts."""

    def __init__(self, hidden: int, cfg: MoEConfig, eps: float = 1e-6, family: str = "llm") -> None:
        super().__init__()
        self.router = ExpertBiasRouter(hidden, cfg, eps, family)
        self.experts = RoutedExperts(cfg.num_experts, hidden, cfg.expert_intermediate_size)
        self.shared = (SwiGLU(hidden, cfg.expert_intermediate_size * cfg.num_shared_experts)
                       if cfg.num_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden)."""
        flat = x.reshape(-1, x.shape[-1])
        chosen, weights = self.router(flat)
        out = self.experts(flat, chosen, weights)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x)


@contextmanager
def uncounted_routing(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without adding to its routers' expert load (a blank input's routing is not load)."""
    routers = [m for m in module.modules() if isinstance(m, ExpertBiasRouter)]
    saved = [r.load.clone() for r in routers]
    try:
        yield
    finally:
        for router, load in zip(routers, saved, strict=True):
            router.load.copy_(load)
