"""What the generation benchmarks (``bench.gen_image``, ``bench.gen_video``) share.

* **Prompts**: each attribute word (colour, shape, direction) is a fixed random vector of the
  generator's ``cond_dim`` (drawn once from a seeded generator, never trained), and a prompt is the
  sequence of its words' vectors, (L, cond_dim) with every position valid: text-like states, as a
  frozen text encoder would give, so only the generator can learn the mapping.
* **Judges**: colour by pixel statistics (the per-channel median of the foreground, the pixels far
  from the known background, nearest palette colour of the prompt set); shape by a small CNN over the
  soft foreground mask (so it cannot read the colour), trained on real rendered images and scored on
  fresh real ones. Chance is 1 / the number of classes.
* **Training**: Adam with a linear warm-up, the routers' expert bias balanced after every step as the
  trainer does (``ExpertBalancer``), an exponential moving average of the weights for sampling.
* **Baselines for the flow loss**: the best constant velocity (the mean of eps - x0 over the
  training latents, i.e. -mean(x0)) and the zero velocity (an untrained adaLN-Zero DiT outputs 0),
  scored by the very loss function with the same generator seed, so t, eps and the CFG drop are the
  same draws as for the trained model.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xoron_dist.synth.scenes import PALETTE
from xoron_dist.train.expert_balance import ExpertBalancer

FOREGROUND_DISTANCE = 60.0  # RGB distance (0..441) from the background above which a pixel is foreground
MIN_FOREGROUND_PIXELS = 6  # fewer foreground pixels than this: no object, no colour


def generation_parser(description: str, *, per_pair: int, per_pair_help: str, flow_steps: int, sample_steps: int,
                      guidance: float, guidance_help: str) -> argparse.ArgumentParser:
    """The options both generation benchmarks take (autoencoder, flow, sampling, run); each bench adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--per-pair", type=int, default=per_pair, help=per_pair_help)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-channels", type=int, default=16)
    parser.add_argument("--flow-steps", type=int, default=flow_steps)
    parser.add_argument("--flow-lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2, help="dual and single blocks each")
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--sample-steps", type=int, default=sample_steps)
    parser.add_argument("--guidance", type=float, default=guidance, help=guidance_help)
    parser.add_argument("--seeds", type=int, default=8, help="noise seeds per held-out prompt (seen: a quarter)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="drop the earlier runs' attempts list")
    return parser


def pixels_of(images: Sequence) -> torch.Tensor:
    """PIL images or uint8 arrays (H, W, 3) -> (n, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def uint8_of(pixels: torch.Tensor) -> torch.Tensor:
    """(n, 3, [T,] H, W) in [-1, 1] -> uint8 (n, [T,] H, W, 3) (as ``heads.to_uint8``)."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1)


def background_distance(images: torch.Tensor, background: str) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> (..., H, W) Euclidean RGB distance of each pixel from the background colour."""
    bg = torch.tensor(PALETTE[background], dtype=torch.float32)
    return (images.float() - bg).norm(dim=-1)


def dominant_colours(images: torch.Tensor, background: str, names: Sequence[str]) -> list[str | None]:
    """uint8 (n, H, W, 3) -> per image the name in ``names`` nearest to the median foreground colour (None:
    no foreground)."""
    palette = torch.tensor([PALETTE[n] for n in names], dtype=torch.float32)
    dist, out = background_distance(images, background), []
    for image, d in zip(images, dist, strict=True):
        fg = image[d > FOREGROUND_DISTANCE].float()
        if fg.shape[0] < MIN_FOREGROUND_PIXELS:
            out.append(None)
            continue
        median = fg.median(dim=0).values
        out.append(names[int((palette - median).norm(dim=-1).argmin())])
    return out


def soft_mask(images: torch.Tensor, background: str) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> (n, 1, H, W) in [0, 1]: how far each pixel is from the background (colour-blind)."""
    return (background_distance(images, background) / (2 * FOREGROUND_DISTANCE)).clamp(0, 1)[:, None]


class ShapeJudge(nn.Module):
    """Tiny CNN over the soft foreground mask (n, 1, 32, 32) -> logits (n, classes)."""

    def __init__(self, classes: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(4 * width, classes),
        )  # fmt: skip

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.net(mask)


def train_shape_judge(masks: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300,
                      batch: int = 64, lr: float = 3e-3, seed: int = 0) -> tuple[ShapeJudge, dict]:  # fmt: skip
    """A ``ShapeJudge`` trained on real masks (n, 1, H, W) with labels (n,) (Adam, random flips of nothing:
    the shapes are drawn upright, as the prompts ask)."""
    torch.manual_seed(seed)
    judge, order = ShapeJudge(classes), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(judge.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(masks), (batch,), generator=order)
        loss = F.cross_entropy(judge(masks[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    judge.eval()
    return judge, {"steps": steps, "batch": batch, "lr": lr, "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def judge_shapes(judge: ShapeJudge, masks: torch.Tensor, names: Sequence[str]) -> list[str]:
    return [names[i] for i in torch.cat([judge(m).argmax(-1) for m in masks.split(256)]).tolist()]


def accuracy(predicted: Sequence, wanted: Sequence) -> float:
    return round(sum(p == w for p, w in zip(predicted, wanted, strict=True)) / max(len(wanted), 1), 4)


class WordVectors:
    """Fixed random word vectors (cond_dim,) ~ N(0, 1), one per word, drawn in ``words`` order from ``seed``."""

    def __init__(self, words: Sequence[str], dim: int, seed: int = 1234) -> None:
        table = torch.randn(len(words), dim, generator=torch.Generator().manual_seed(seed))
        self.index = {w: i for i, w in enumerate(words)}
        self.table = table

    def states(self, prompts: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts of equal length L -> states (n, L, dim) and an all-valid mask (n, L)."""
        ids = torch.tensor([[self.index[w] for w in p] for p in prompts])
        return self.table[ids], torch.ones(ids.shape, dtype=torch.bool)


def warmup_adam(params, lr: float, warmup: int, total: int) -> tuple[torch.optim.Optimizer, object]:
    """Adam, linear warm-up over ``warmup`` steps, then cosine to 10% of ``lr`` at ``total``."""
    opt = torch.optim.Adam(params, lr=lr)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_autoencoder(vae: nn.Module, vae_loss: nn.Module, data: torch.Tensor, steps: int, batch: int,
                      lr: float, seed: int = 0) -> dict:  # fmt: skip
    """The generator's own autoencoder loss (``VAELoss.generator_loss`` on a posterior sample), Adam."""
    opt, sched = warmup_adam(vae.parameters(), lr, 20, steps)
    order, losses, start = torch.Generator().manual_seed(seed), [], time.perf_counter()
    vae.train()
    for step in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=order)]
        posterior = vae.encode(x)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=order)
        loss, _ = vae_loss.generator_loss(x, vae.decode(z), posterior, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    return {"steps": steps, "batch": batch, "lr": lr, "seconds": round(time.perf_counter() - start, 1),
            "first_loss": round(losses[0], 4), "last_loss": round(sum(losses[-20:]) / 20, 4)}  # fmt: skip


@torch.no_grad()
def encode_all(vae: nn.Module, data: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every item, in chunks."""
    parts = [vae.encode(x) for x in data.split(chunk)]
    return torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])


def fit_latent_scale(vae: nn.Module, means: torch.Tensor) -> dict:
    """Set the autoencoder's shift/scaling so the diffusion latents have mean 0 and std 1 over ``means``
    (SD3/FLUX pick their factors the same way, from data)."""
    vae.cfg.shift_factor = float(means.mean())
    vae.cfg.scaling_factor = float(1.0 / means.std())
    return {"shift_factor": round(vae.cfg.shift_factor, 4), "scaling_factor": round(vae.cfg.scaling_factor, 4)}


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over items of 10·log10(1 / MSE) on pixels in [0, 1]."""
    mse = ((pred.clamp(-1, 1) - target) / 2).square().flatten(1).mean(1)
    return round(float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()), 3)


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers (a frozen copy)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay, self.module = decay, copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for ema, live in zip(self.module.state_dict().values(), module.state_dict().values(), strict=True):
            if ema.is_floating_point():
                ema.lerp_(live, 1 - self.decay)


def train_flow(dit: nn.Module, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
               ema_decay: float, log_every: int = 100) -> tuple[EMA, dict]:  # fmt: skip
    """``loss_fn(step)`` -> the batch's mean flow loss; Adam (warm-up 50, cosine), expert-bias balancing
    after each step (``ExpertBalancer``, each router's own ``bias_update_rate``), EMA of the weights."""
    opt, sched = warmup_adam(dit.parameters(), lr, 50, steps)
    balancer, ema = ExpertBalancer(dit), EMA(dit, ema_decay)
    losses, curve, start = [], [], time.perf_counter()
    dit.train()
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        balancer.update()
        ema.update(dit)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            curve.append([step + 1, round(sum(losses[-log_every:]) / log_every, 4)])
            print(f"  flow step {step + 1:5d}  loss {curve[-1][1]:.4f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    balancer.detach()
    dit.eval()
    return ema, {"steps": steps, "lr": lr, "ema_decay": ema_decay, "seconds": round(time.perf_counter() - start, 1),
                 "train_loss_curve": curve}  # fmt: skip


def expert_load_entropy(dit: nn.Module, run: Callable[[], None]) -> dict:
    """Routing balance during ``run()``: per router the entropy of its expert load over log(experts)
    (1 = perfectly even; ORACLES B.3 asks > 0.8)."""
    from xoron_dist.model.common.moe import ExpertBiasRouter

    routers = [m for m in dit.modules() if isinstance(m, ExpertBiasRouter)]
    for r in routers:
        r.load.zero_()
    run()
    ratios = []
    for r in routers:
        p = r.load / r.load.sum().clamp_min(1)
        ratios.append(round(float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(r.num_experts)), 3))
    return {"normalised_entropy_per_router": ratios, "min": min(ratios) if ratios else None}


__all__ = [
    "EMA", "ShapeJudge", "WordVectors", "accuracy", "background_distance", "dominant_colours", "encode_all",
    "expert_load_entropy", "fit_latent_scale", "judge_shapes", "pixels_of", "psnr", "soft_mask",
    "train_autoencoder", "train_flow", "train_shape_judge", "uint8_of", "warmup_adam",
]  # fmt: skip
