"""Does Xoron's video generator learn on CPU? Prompted motion direction and colour of generated clips (issue 13).

Data: a coloured 8x8 square on a white 32x32 background moving 3 px per frame in one of 4 directions
for ``FRAMES`` = 5 frames (12 px from first to last frame; start jittered by +-2 px on both axes),
4 colours x 4 directions = 16 prompts. Four (colour, direction) pairs never appear in training (each
of their words does, a Latin square so every colour and every direction is held out once):
generating them is the held-out-prompt test; the other 12 pairs are also generated from fresh seeds.

Model: ``VideoGenerator`` (``xoron_dist.model.generation.heads``): the 3D causal ``VideoVAE`` (f4 in
space, 4x in time: 5 frames -> 2 latent frames of 4x8x8, the first frame encoded alone) and the
block-causal ``VideoMoEDiT`` (patch 2: 16 tokens per latent frame, one latent frame per chunk, so
the second chunk, which carries the motion, is generated from the KV cache of the first). The
prompt is [colour word ; direction word] as fixed random vectors of cond_dim (``gen_common``).

Protocol: (1) the video autoencoder: by default (``--vae-init inflate``) an ``ImageVAE`` of the same
sizes trained on the clips' single frames with the generator's own loss (``VAELoss``), then inflated
into the ``VideoVAE`` (``VideoVAE.inflate_from``: latent frame j is the image latent of frame 4j,
decoded frames 1-4 all show latent frame 1), because training the 3D causal one costs ~3x per step
on CPU and fine-tuning inflated weights needs a very low lr (bench/latents_recon.py); ``--vae-init
scratch`` trains the ``VideoVAE`` itself on the clips. Then fit the latent scale to the data;
(2) train the DiT by the generator's own ``video_flow_loss`` (per-chunk
logit-normal t, clean-prefix teacher forcing at ``context_clean_prob``, CFG dropout) on posterior
samples; (3) generate held-out and seen prompts chunk by chunk with fixed seeds (Euler, guidance
swept, headline at ``--guidance``) from the EMA weights; (4) judge colour by the median foreground
pixel over all frames and direction by the displacement of the foreground centroid from the first
to the last frame (both exact on real clips, reported); the judges on the autoencoder's
reconstructions are the ceiling of any generator in this latent space; (5) ``video_flow_loss`` on
held-out latents against the mean-velocity and zero-velocity baselines under the same draws.

Peer: the same generator with its DiT untrained (random init; adaLN-Zero makes it output v = 0, so
it decodes its noise), the same autoencoder, prompts, seeds and judges.

What the attempts showed: as for images, the autoencoder sets the ceiling. With 400 image-VAE steps its
reconstructions keep the direction (1.0) but not the colour (0.5), and generated clips sit at that
ceiling; with 1000 steps both are 1.0 and so are the generated held-out prompts.

    python -m bench.gen_video [--flow-steps 800] [--vae-init inflate|scratch] [--fresh]

Writes bench/out/gen_video.json; "attempts" keeps every earlier run's levers and numbers (``--fresh``
starts the list again).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch

from bench.common import OUT_DIR, machine, write_result
from bench.gen_common import (
    WordVectors,
    accuracy,
    background_distance,
    dominant_colours,
    encode_all,
    expert_load_entropy,
    fit_latent_scale,
    generation_parser,
    psnr,
    train_autoencoder,
    train_flow,
    uint8_of,
)
from xoron_dist.config import load_config
from xoron_dist.config.latents import ImageVAEConfig, VideoVAEConfig
from xoron_dist.model.generation.flow import time_shift_for
from xoron_dist.model.generation.heads import VideoGenerator
from xoron_dist.model.generation.video_dit import VideoMoEDiT, video_flow_loss
from xoron_dist.model.latents import ImageVAE
from xoron_dist.synth.scenes import PALETTE

SIZE, FRAMES, BACKGROUND = 32, 5, "white"
HALF, SPEED, JITTER = 4, 3.0, 2.0  # square half-side, pixels per frame, start jitter (pixels, each axis)
COLORS = ("red", "blue", "green", "yellow")
DIRECTIONS = ("up", "down", "left", "right")
MOVES = {"up": (0.0, -1.0), "down": (0.0, 1.0), "left": (-1.0, 0.0), "right": (1.0, 0.0)}  # (dx, dy), y down
HELD_OUT = (("red", "up"), ("blue", "down"), ("green", "left"), ("yellow", "right"))
SEEN = tuple((c, d) for c in COLORS for d in DIRECTIONS if (c, d) not in HELD_OUT)
COND_DIM = 64
GUIDANCES = (1.0, 2.0, 4.0)
MIN_MOVE = 2.0  # pixels: a smaller centroid move is no direction (the real clips move 12)


def render(color: str, direction: str, rng: random.Random) -> np.ndarray:
    """uint8 (FRAMES, SIZE, SIZE, 3): the square's path is centred on the image, then jittered."""
    dx, dy = MOVES[direction]
    span = SPEED * (FRAMES - 1) / 2
    x0 = SIZE / 2 - dx * span + rng.uniform(-JITTER, JITTER)
    y0 = SIZE / 2 - dy * span + rng.uniform(-JITTER, JITTER)
    clip = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    clip[:] = PALETTE[BACKGROUND]
    for f in range(FRAMES):
        cx, cy = round(x0 + f * SPEED * dx), round(y0 + f * SPEED * dy)
        clip[f, max(cy - HALF, 0): cy + HALF, max(cx - HALF, 0): cx + HALF] = PALETTE[color]
    return clip


def dataset(pairs, per_pair: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """(n, 3, FRAMES, SIZE, SIZE) in [-1, 1] and the (colour, direction) of each, ``per_pair`` clips per pair."""
    rng, clips, labels = random.Random(seed), [], []
    for _ in range(per_pair):
        for color, direction in pairs:
            clips.append(render(color, direction, rng))
            labels.append((color, direction))
    pixels = torch.from_numpy(np.stack(clips)).float() / 127.5 - 1.0  # (n, T, H, W, 3)
    return pixels.permute(0, 4, 1, 2, 3).contiguous(), labels


def overrides(args: argparse.Namespace) -> list[str]:
    g = "model.video_gen"
    return [
        f"{g}.enabled=true", f"model.llm.hidden_size={COND_DIM}", f"{g}.dit.cond_dim={COND_DIM}",
        f"{g}.vae.spatial_factor=4", f"{g}.vae.channel_multipliers=[1,2,2]", f"{g}.vae.channels={args.vae_channels}",
        f"{g}.vae.temporal_factor=4", f"{g}.dit.chunk_frames=1", f"{g}.dit.motion_dim=16",
        f"{g}.dit.hidden_size={args.width}", f"{g}.dit.num_heads={args.width // 24}",
        f"{g}.dit.dual_layers={args.layers}", f"{g}.dit.single_layers={args.layers}",
        f"{g}.dit.moe.expert_intermediate_size={args.width}",
        f"{g}.dit.context_clean_prob={args.clean_prob}",
    ]  # fmt: skip


def directions_of(clips: torch.Tensor) -> tuple[list[str | None], list[float]]:
    """uint8 (n, T, H, W, 3) -> per clip the direction of the foreground centroid's move from the first to the
    last frame (None: a frame without foreground, or a move under ``MIN_MOVE`` px) and the move's length."""
    weight = (background_distance(clips, BACKGROUND) > 60.0).float()  # (n, T, H, W)
    ys, xs = torch.arange(SIZE, dtype=torch.float32)[:, None], torch.arange(SIZE, dtype=torch.float32)[None]
    units = torch.tensor([MOVES[d] for d in DIRECTIONS])
    names, lengths = [], []
    for w in weight:
        first, last = w[0], w[-1]
        if first.sum() < 6 or last.sum() < 6:
            names.append(None)
            lengths.append(0.0)
            continue
        centre = [torch.stack(((m * xs).sum() / m.sum(), (m * ys).sum() / m.sum())) for m in (first, last)]
        move = centre[1] - centre[0]
        names.append(DIRECTIONS[int((units @ move).argmax())] if move.norm() >= MIN_MOVE else None)
        lengths.append(round(float(move.norm()), 2))
    return names, lengths


def judge_clips(clips: torch.Tensor, wanted: list[tuple[str, str]]) -> dict:
    """uint8 (n, T, H, W, 3) against the wanted (colour, direction): accuracy per attribute and both."""
    n, frames, height, width, _ = clips.shape
    colours = dominant_colours(clips.reshape(n, frames * height, width, 3), BACKGROUND, COLORS)
    directions, lengths = directions_of(clips)
    both = list(zip(colours, directions, strict=True))
    return {"colour": accuracy(colours, [w[0] for w in wanted]),
            "direction": accuracy(directions, [w[1] for w in wanted]), "both": accuracy(both, wanted),
            "no_object_or_still": round(sum(d is None for d in directions) / n, 4),
            "mean_move_px": round(sum(lengths) / n, 2)}  # fmt: skip


class ConstantVelocity:
    """A velocity 'model' for ``video_flow_loss``: the DiT's config and grid, and a fixed velocity."""

    def __init__(self, dit: VideoMoEDiT, velocity: torch.Tensor) -> None:
        self.cfg, self.video_grid, self.velocity = dit.cfg, dit.video_grid, velocity

    def __call__(self, z, t, cond, drop) -> torch.Tensor:
        return self.velocity.expand_as(z)


def flow_eval(dits: dict, latents: torch.Tensor, states, mask) -> dict:
    """Held-out ``video_flow_loss`` of each model in ``dits`` on the same (t, eps, drop, prefix) draws."""
    out = {}
    with torch.no_grad():
        for name, model in dits.items():
            losses = torch.cat([video_flow_loss(model, x, (s, m), torch.Generator().manual_seed(100 + i))
                                for i, (x, s, m) in enumerate(zip(latents.split(64), states.split(64),
                                                                  mask.split(64), strict=True))])  # fmt: skip
            out[name] = round(float(losses.mean()), 4)
    return out


def generate(gen: VideoGenerator, dit, words: WordVectors, pairs, seeds: int, steps: int, guidance: float):
    """uint8 clips (len(pairs)·seeds, T, H, W, 3), seed s = noise seed 1000 + s, and the wanted labels."""
    gen.dit, clips, wanted = dit, [], []
    for s in range(seeds):
        states, mask = words.states(pairs)
        clips.append(gen.generate(states, mask, FRAMES, SIZE, SIZE, steps=steps, guidance=guidance, seed=1000 + s))
        wanted.extend(pairs)
    return torch.cat(clips), wanted


def image_config(video: VideoVAEConfig) -> ImageVAEConfig:
    """The image autoencoder whose weights ``VideoVAE.inflate_from`` maps onto a video one of ``video``'s sizes."""
    keep = ("in_channels", "channels", "channel_multipliers", "blocks_per_level", "latent_channels", "spatial_factor",
            "norm_groups", "mid_attention", "initial_logvar", "loss")  # fmt: skip
    return ImageVAEConfig(**{k: getattr(video, k) for k in keep})


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = generation_parser(__doc__.splitlines()[0], per_pair=80,
                               per_pair_help="training clips per seen (colour, direction) pair", flow_steps=800,
                               sample_steps=16, guidance=2.0,
                               guidance_help="the headline guidance (all of GUIDANCES too)")  # fmt: skip
    parser.add_argument("--vae-init", choices=("inflate", "scratch"), default="inflate",
                        help="inflate: train an image VAE on the frames and inflate it; scratch: train the VideoVAE")
    parser.add_argument("--clean-prob", type=float, default=0.5, help="dit.context_clean_prob (teacher forcing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = load_config("pipelines/smoke.yaml", overrides(args))
    torch.manual_seed(0)
    gen = VideoGenerator(cfg)
    peer_dit = VideoMoEDiT(cfg.model.video_gen.dit).eval()  # another random init: the untrained peer
    words = WordVectors(COLORS + DIRECTIONS, COND_DIM)

    train_x, train_labels = dataset(SEEN, args.per_pair, seed=0)
    eval_seen, eval_seen_labels = dataset(SEEN, 8, seed=1)
    eval_unseen, eval_unseen_labels = dataset(HELD_OUT, 24, seed=2)
    print(f"data: {len(train_x)} training clips, {len(eval_seen) + len(eval_unseen)} held-out", flush=True)
    real = judge_clips(uint8_of(eval_unseen), eval_unseen_labels)
    print(f"judges on real held-out clips: {real}", flush=True)

    # (1) the autoencoder
    if args.vae_init == "inflate":  # an image VAE of the same sizes trained on the frames, then inflated
        vae_run = train_autoencoder(image_vae := ImageVAE(image_config(gen.gen_cfg.vae)), gen.vae_loss,
                                    train_x.transpose(1, 2).flatten(0, 1), args.vae_steps, args.vae_batch,
                                    args.vae_lr)  # fmt: skip
        gen.vae.inflate_from(image_vae)
        gen.vae.eval()
        vae_run["init"] = "image VAE trained on single frames, inflated (VideoVAE.inflate_from), not fine-tuned"
    else:
        vae_run = train_autoencoder(gen.vae, gen.vae_loss, train_x, args.vae_steps, args.vae_batch, args.vae_lr)
        vae_run["init"] = "VideoVAE trained from scratch on the clips"
    held = torch.cat([eval_seen, eval_unseen])
    held_labels = eval_seen_labels + eval_unseen_labels
    with torch.no_grad():
        recon = torch.cat([gen.vae.decode(gen.vae.encode(x).mode()) for x in held.split(32)])
    mean_colour = held.mean((2, 3, 4), keepdim=True).expand_as(held)
    vae_run |= {"held_out_psnr_db": psnr(recon, held), "mean_colour_psnr_db": psnr(mean_colour, held),
                "judged_reconstructions": judge_clips(uint8_of(recon), held_labels)}  # fmt: skip
    print(f"autoencoder: PSNR {vae_run['held_out_psnr_db']} dB ({vae_run['seconds']} s), loss "
          f"{vae_run['first_loss']} -> {vae_run['last_loss']}, judged {vae_run['judged_reconstructions']}",
          flush=True)  # fmt: skip
    means, stds = encode_all(gen.vae, train_x, chunk=32)
    vae_run["latent_scale"] = fit_latent_scale(gen.vae, means)
    x_mean, x_std = gen.vae.to_diffusion(means), stds * gen.vae.cfg.scaling_factor
    mean_v = -x_mean.mean(0, keepdim=True)  # E[eps - x0] over the training latents
    states_all, mask_all = words.states(train_labels)

    # (2) the DiT
    order = torch.Generator().manual_seed(0)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(x_mean), (args.batch,), generator=order)
        x0 = x_mean[idx] + x_std[idx] * torch.randn(x_mean[idx].shape, generator=order)  # posterior sample
        return video_flow_loss(gen.dit, x0, (states_all[idx], mask_all[idx]), order).mean()

    ema, flow_run = train_flow(gen.dit, loss_fn, args.flow_steps, args.flow_lr, args.ema)
    dit, live = ema.module, gen.dit

    # (5) flow loss on held-out latents
    losses = {}
    for name, x, labels in (("seen_pairs", eval_seen, eval_seen_labels),
                            ("held_out_pairs", eval_unseen, eval_unseen_labels)):  # fmt: skip
        lat = gen.vae.to_diffusion(encode_all(gen.vae, x, chunk=32)[0])
        contenders = {"ours": dit, "ours_live_weights": live, "peer_untrained": peer_dit,
                      "mean_velocity": ConstantVelocity(dit, mean_v),
                      "zero_velocity": ConstantVelocity(dit, torch.zeros_like(mean_v))}  # fmt: skip
        losses[name] = flow_eval(contenders, lat, *words.states(labels))
    print(f"flow loss held-out pairs: {losses['held_out_pairs']}", flush=True)

    # (3, 4) generate and judge
    generation, sample_start = {}, time.perf_counter()
    for g in GUIDANCES:
        row = {}
        for who, model in (("ours", dit), ("peer_untrained", peer_dit)):
            if who == "peer_untrained" and g != args.guidance:
                continue  # v = 0 whatever the guidance
            clips, wanted = generate(gen, model, words, HELD_OUT, args.seeds, args.sample_steps, g)
            seen_clips, seen_wanted = generate(gen, model, words, SEEN, max(1, args.seeds // 4),
                                               args.sample_steps, g)  # fmt: skip
            row[who] = {"held_out_prompts": judge_clips(clips, wanted),
                        "seen_prompts": judge_clips(seen_clips, seen_wanted)}  # fmt: skip
        generation[f"guidance_{g:g}"] = row
        print(f"guidance {g:g}: held-out {row['ours']['held_out_prompts']}  seen {row['ours']['seen_prompts']}",
              flush=True)  # fmt: skip
    routing = expert_load_entropy(dit, lambda: generate(gen, dit, words, HELD_OUT, 2, 4, args.guidance))
    head = generation[f"guidance_{args.guidance:g}"]
    ours, peer = head["ours"]["held_out_prompts"], head["peer_untrained"]["held_out_prompts"]
    ours_mean = round((ours["colour"] + ours["direction"]) / 2, 4)
    peer_mean = round((peer["colour"] + peer["direction"]) / 2, 4)
    held_loss = losses["held_out_pairs"]
    summary = {
        "levers": {k: v for k, v in vars(args).items() if k not in ("threads", "fresh")},
        "held_out_colour": ours["colour"], "held_out_direction": ours["direction"], "held_out_both": ours["both"],
        "seen_colour": head["ours"]["seen_prompts"]["colour"],
        "seen_direction": head["ours"]["seen_prompts"]["direction"],
        "vae_psnr_db": vae_run["held_out_psnr_db"], "flow_loss": held_loss["ours"],
        "mean_velocity_loss": held_loss["mean_velocity"], "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    previous = OUT_DIR / "gen_video.json"
    attempts = [] if args.fresh or not previous.exists() else json.loads(previous.read_text()).get("attempts", [])
    shift = time_shift_for(cfg.model.video_gen.dit.chunk_frames * (x_mean.shape[-1] // 2) ** 2,
                           cfg.model.video_gen.dit.time_shift)  # fmt: skip
    result = {
        "metric": "held-out-prompt accuracy of generated 5-frame 32x32 clips, mean of colour and motion direction "
        "(higher is better; ratio = ours / peer)",
        "unit": "fraction correct",
        "ours": ours_mean,
        "peer": peer_mean,
        "peer_name": "the same VideoGenerator with its DiT untrained (random init, outputs v = 0), same "
        "autoencoder, prompts, seeds and judges",
        "ratio": round(ours_mean / max(peer_mean, 1e-4), 3),
        "goal": "colour and direction of held-out prompts far above chance (1/4 each), near the judges' ceiling "
        "on the autoencoder's reconstructions; held-out flow loss below the mean-velocity baseline",
        "machine": machine(),
        "chance": {"colour": round(1 / len(COLORS), 4), "direction": round(1 / len(DIRECTIONS), 4),
                   "both": round(1 / (len(COLORS) * len(DIRECTIONS)), 4)},  # fmt: skip
        "prompts": {"colours": COLORS, "directions": DIRECTIONS, "held_out_pairs": HELD_OUT,
                    "background": BACKGROUND, "motion": f"{2 * HALF}px square, {SPEED:g} px/frame, {FRAMES} "
                    "frames", "condition": f"[colour word ; direction word], fixed random N(0, 1) vectors of "
                    f"{COND_DIM}"},  # fmt: skip
        "judges": {"on_real_held_out_clips": real, "colour": "median foreground pixel over all frames, nearest "
                   "of the 4 colours", "direction": "foreground centroid, first to last frame, nearest of the "
                   "4 unit directions"},  # fmt: skip
        "autoencoder": vae_run,
        "flow": flow_run | {"batch": args.batch, "time_shift": round(shift, 4),
                            "cfg_dropout": cfg.model.video_gen.dit.cfg_dropout,
                            "context_clean_prob": args.clean_prob},  # fmt: skip
        "flow_loss_held_out": losses,
        "generation": generation | {"steps": args.sample_steps, "sampler": "euler, chunk by chunk with the KV "
                                    "cache", "headline_guidance": args.guidance,
                                    "seconds": round(time.perf_counter() - sample_start, 1),
                                    "held_out_clips": len(HELD_OUT) * args.seeds},  # fmt: skip
        "expert_routing_while_generating": routing,
        "sizes": {"frames": FRAMES, "image": SIZE, "latent": list(x_mean.shape[1:]), "dit_params": params(dit),
                  "vae_params": params(gen.vae), "dit_width": args.width, "dual_layers": args.layers,
                  "single_layers": args.layers, "training_clips": len(train_x)},  # fmt: skip
        "attempts": attempts + [summary],
        "seconds_total": summary["seconds"],
    }
    print(f"wrote {write_result('gen_video', result)} in {result['seconds_total']} s")


if __name__ == "__main__":
    main()
