"""Does Xoron's image generator learn on CPU? Prompted colour and shape of generated images (issue 13, ORACLES B.3).

Data: one shape per 32x32 image on a white background, drawn by the synth corpus's renderer
(``xoron_dist.synth.scenes.render_scene`` of a one-shape ``Scene``, radius 8-12 px, centre jittered
by +-3 px), 6 colours x 4 shapes = 24 prompts. Four (colour, shape) pairs never appear in training
(each of their words does): generating them is the held-out-prompt test; the other 20 pairs are
also generated from fresh noise seeds ("seen prompts").

Model: ``ImageGenerator`` (``xoron_dist.model.generation.heads``) from the tiny preset with wider
sizes (f4 autoencoder: 8x8x4 latents, patch 2: 16 image tokens; MoE-DiT 2 dual + 2 single blocks).
The prompt is [colour word ; shape word] as fixed random vectors of cond_dim (``gen_common``).

Protocol: (1) train the autoencoder with its own loss, fit the latent scale to the data; (2) train
the DiT by rectified flow on posterior samples (logit-normal t, Flux's shift for 16 tokens, CFG
dropout as configured); (3) generate held-out and seen prompts with fixed seeds (Euler, guidance
swept 1-4, headline at ``--guidance``) from the EMA weights; (4) judge colour by the median
foreground pixel (nearest of the 6 colours) and shape by a small CNN trained on real images (its
own held-out accuracy and its accuracy on the autoencoder's reconstructions, the ceiling of any
generator in this latent space, are reported); (5) flow loss on held-out latents against the mean-
velocity baseline E||(eps - x0) - E[eps - x0]||² under the same t, eps draws.

Peer: the same generator with its DiT untrained (random init; adaLN-Zero makes it output v = 0, so
it decodes its noise), the same autoencoder, prompts and seeds.

What the attempts showed: the autoencoder, not the DiT, is the bottleneck. At 300 steps (lr 1e-3) its
reconstructions of held-out pairs were judged colour 0.39 / shape 0.41 (17 dB: red decoded near black),
so generated images could not do better, though the flow loss was already 10x under the mean-velocity
baseline; at 1000 steps (lr 2e-3) 29.7 dB, colour 1.0 / shape 0.77, and the generated held-out prompts
reach that ceiling. A 40-step DiT under EMA 0.995 is still nearly its (v = 0) init: EMA 0.99 over
1000 steps is what the defaults use (live and EMA weights then score alike).

    python -m bench.gen_image [--flow-steps 1000] [--vae-steps 1000] [--ema 0.99] [--fresh]

Writes bench/out/gen_image.json; "attempts" keeps every earlier run's levers and numbers (``--fresh``
starts the list again).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from bench.common import OUT_DIR, machine, write_result
from bench.gen_common import (
    WordVectors,
    accuracy,
    dominant_colours,
    encode_all,
    expert_load_entropy,
    fit_latent_scale,
    generation_parser,
    judge_shapes,
    pixels_of,
    psnr,
    soft_mask,
    train_autoencoder,
    train_flow,
    train_shape_judge,
    uint8_of,
)
from xoron_dist.config import load_config
from xoron_dist.model.generation.dit import MoEDiT
from xoron_dist.model.generation.flow import flow_loss, sample_timesteps, time_shift_for
from xoron_dist.model.generation.heads import ImageGenerator
from xoron_dist.synth.scenes import Scene, SceneShape, render_scene

SIZE, BACKGROUND = 32, "white"
COLORS = ("red", "blue", "green", "yellow", "purple", "black")
SHAPES = ("circle", "square", "triangle", "star")
HELD_OUT = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"))
SEEN = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT)
COND_DIM = 64
GUIDANCES = (1.0, 2.0, 3.0, 4.0)


def render(color: str, shape: str, rng: random.Random):
    radius = rng.uniform(8.0, 12.0)
    cx, cy = SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 + rng.uniform(-3, 3)
    return render_scene(Scene(SIZE, SIZE, BACKGROUND, (SceneShape(shape, color, "large", 1, 1, cx, cy, radius),)))


def dataset(pairs, per_pair: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """(n, 3, SIZE, SIZE) in [-1, 1] and the (colour, shape) of each, ``per_pair`` images of every pair."""
    rng, images, labels = random.Random(seed), [], []
    for _ in range(per_pair):
        for color, shape in pairs:
            images.append(render(color, shape, rng))
            labels.append((color, shape))
    return pixels_of(images), labels


def overrides(args: argparse.Namespace) -> list[str]:
    g = "model.image_gen"
    return [
        f"{g}.enabled=true", f"model.llm.hidden_size={COND_DIM}", f"{g}.dit.cond_dim={COND_DIM}",
        f"{g}.vae.spatial_factor=4", f"{g}.vae.channel_multipliers=[1,2,2]", f"{g}.vae.channels={args.vae_channels}",
        f"{g}.dit.hidden_size={args.width}", f"{g}.dit.num_heads={args.width // 24}",
        f"{g}.dit.dual_layers={args.layers}", f"{g}.dit.single_layers={args.layers}",
        f"{g}.dit.moe.expert_intermediate_size={args.width}",
        *([f"{g}.dit.time_shift={args.time_shift}"] if args.time_shift else []),
    ]  # fmt: skip


def judge_images(images: torch.Tensor, wanted: list[tuple[str, str]], judge) -> dict:
    """uint8 (n, H, W, 3) against the wanted (colour, shape): accuracy per attribute and of both at once."""
    colours = dominant_colours(images, BACKGROUND, COLORS)
    shapes = judge_shapes(judge, soft_mask(images, BACKGROUND), SHAPES)
    both = [(c, s) for c, s in zip(colours, shapes, strict=True)]
    return {"colour": accuracy(colours, [w[0] for w in wanted]), "shape": accuracy(shapes, [w[1] for w in wanted]),
            "both": accuracy(both, wanted),
            "no_object": round(sum(c is None for c in colours) / len(colours), 4)}  # fmt: skip


def flow_eval(gen: ImageGenerator, dit, latents: torch.Tensor, states, mask, mean_v: torch.Tensor) -> dict:
    """Held-out flow loss of ``dit``, of the mean velocity and of v = 0, on the same (t, eps) draws; also
    per t quartile (time bins of the training t density)."""
    cfg = gen.gen_cfg.dit
    shift = time_shift_for((latents.shape[-1] // cfg.patch_size) ** 2, cfg.time_shift)
    kw = dict(logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, shift=shift, cfg_dropout=0.0)
    models = {"ours": dit, "mean_velocity": lambda z, t, c, d: mean_v.expand_as(z),
              "zero_velocity": lambda z, t, c, d: torch.zeros_like(z)}  # fmt: skip
    out = {}
    with torch.no_grad():
        t = torch.cat([sample_timesteps(len(x), torch.Generator().manual_seed(100 + i), **{k: kw[k] for k in
                       ("logit_mean", "logit_std", "shift")}) for i, x in enumerate(latents.split(128))])  # fmt: skip
        for name, fn in models.items():
            losses = torch.cat([flow_loss(fn, x, (s, m), torch.Generator().manual_seed(100 + i), **kw)
                                for i, (x, s, m) in enumerate(zip(latents.split(128), states.split(128),
                                                                  mask.split(128), strict=True))])  # fmt: skip
            bins = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75]))
            which = torch.bucketize(t, bins)
            out[name] = {"loss": round(float(losses.mean()), 4),
                         "by_t_quartile": [round(float(losses[which == q].mean()), 4) for q in range(4)]}  # fmt: skip
        out["t_quartile_edges"] = [round(float(b), 3) for b in bins]
    return out


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def generate(gen: ImageGenerator, dit, words: WordVectors, pairs, seeds: int, steps: int, guidance: float):
    """uint8 images (len(pairs)·seeds, H, W, 3), seed s of pair p = noise seed 1000 + s, and the wanted labels."""
    gen.dit, images, wanted = dit, [], []
    for s in range(seeds):
        states, mask = words.states(pairs)
        images.append(gen.generate(states, mask, SIZE, SIZE, steps=steps, guidance=guidance, seed=1000 + s))
        wanted.extend(pairs)
    return torch.cat(images), wanted


def main() -> None:
    parser = generation_parser(__doc__.splitlines()[0], per_pair=160,
                               per_pair_help="training images per seen (colour, shape) pair", flow_steps=1000,
                               sample_steps=20, guidance=3.0, guidance_help="the headline guidance (all of 1-4 "
                               "are reported)")  # fmt: skip
    parser.add_argument("--time-shift", type=float, default=None, help="fixed shift (default: Flux's for 16 tokens)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = load_config("pipelines/smoke.yaml", overrides(args))
    torch.manual_seed(0)
    gen = ImageGenerator(cfg)
    peer_dit = MoEDiT(cfg.model.image_gen.dit).eval()  # another random init: the untrained peer
    words = WordVectors(COLORS + SHAPES, COND_DIM)

    train_x, train_labels = dataset(SEEN, args.per_pair, seed=0)
    eval_seen, eval_seen_labels = dataset(SEEN, 8, seed=1)
    eval_unseen, eval_unseen_labels = dataset(HELD_OUT, 40, seed=2)
    judge_x, judge_labels = dataset(tuple((c, s) for c in COLORS for s in SHAPES), 60, seed=3)
    judge_test, judge_test_labels = dataset(tuple((c, s) for c in COLORS for s in SHAPES), 20, seed=4)
    print(f"data: {len(train_x)} training images, {len(eval_seen) + len(eval_unseen)} held-out", flush=True)

    # (4, first) the judges on real images
    shape_ids = torch.tensor([SHAPES.index(s) for _, s in judge_labels])
    judge, judge_run = train_shape_judge(soft_mask(uint8_of(judge_x), BACKGROUND), shape_ids, len(SHAPES))
    real = judge_images(uint8_of(judge_test), judge_test_labels, judge)
    print(f"judges on real held-out images: colour {real['colour']:.3f}  shape {real['shape']:.3f}", flush=True)

    # (1) the autoencoder
    vae_run = train_autoencoder(gen.vae, gen.vae_loss, train_x, args.vae_steps, args.vae_batch, args.vae_lr)
    held = torch.cat([eval_seen, eval_unseen])
    held_labels = eval_seen_labels + eval_unseen_labels
    with torch.no_grad():
        recon = torch.cat([gen.vae.decode(gen.vae.encode(x).mode()) for x in held.split(64)])
    mean_colour = held.mean((2, 3), keepdim=True).expand_as(held)
    vae_run |= {"held_out_psnr_db": psnr(recon, held), "mean_colour_psnr_db": psnr(mean_colour, held),
                "judged_reconstructions": judge_images(uint8_of(recon), held_labels, judge)}  # fmt: skip
    print(f"autoencoder: PSNR {vae_run['held_out_psnr_db']} dB ({vae_run['seconds']} s), judged reconstructions "
          f"{vae_run['judged_reconstructions']}", flush=True)
    means, stds = encode_all(gen.vae, train_x)
    vae_run["latent_scale"] = fit_latent_scale(gen.vae, means)
    x_mean, x_std = gen.vae.to_diffusion(means), stds * gen.vae.cfg.scaling_factor
    mean_v = -x_mean.mean(0, keepdim=True)  # E[eps - x0] over the training latents
    states_all, mask_all = words.states(train_labels)

    # (2) the DiT
    dit_cfg = gen.gen_cfg.dit
    shift = time_shift_for((x_mean.shape[-1] // dit_cfg.patch_size) ** 2, dit_cfg.time_shift)
    order = torch.Generator().manual_seed(0)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(x_mean), (args.batch,), generator=order)
        x0 = x_mean[idx] + x_std[idx] * torch.randn(x_mean[idx].shape, generator=order)  # posterior sample
        return flow_loss(gen.dit, x0, (states_all[idx], mask_all[idx]), order, logit_mean=dit_cfg.logit_mean,
                         logit_std=dit_cfg.logit_std, shift=shift, cfg_dropout=dit_cfg.cfg_dropout).mean()  # fmt: skip

    ema, flow_run = train_flow(gen.dit, loss_fn, args.flow_steps, args.flow_lr, args.ema)
    dit = ema.module

    # (5) flow loss on held-out latents: seen pairs (new images) and the held-out pairs
    losses = {}
    for name, x, labels in (("seen_pairs", eval_seen, eval_seen_labels), ("held_out_pairs", eval_unseen,
                                                                          eval_unseen_labels)):  # fmt: skip
        lat = gen.vae.to_diffusion(encode_all(gen.vae, x)[0])
        losses[name] = flow_eval(gen, dit, lat, *words.states(labels), mean_v)
        losses[name]["ours_live_weights"] = flow_eval(gen, gen.dit, lat, *words.states(labels), mean_v)["ours"]
    print(f"flow loss held-out pairs: ours {losses['held_out_pairs']['ours']['loss']}  mean-velocity "
          f"{losses['held_out_pairs']['mean_velocity']['loss']}", flush=True)

    # (3, 4) generate and judge
    generation, sample_start = {}, time.perf_counter()
    for g in GUIDANCES:
        row = {}
        for who, model in (("ours", dit), ("peer_untrained", peer_dit)):
            if who == "peer_untrained" and g != args.guidance:
                continue  # v = 0 whatever the guidance
            imgs, wanted = generate(gen, model, words, HELD_OUT, args.seeds, args.sample_steps, g)
            seen_imgs, seen_wanted = generate(gen, model, words, SEEN, max(1, args.seeds // 4), args.sample_steps, g)
            row[who] = {"held_out_prompts": judge_images(imgs, wanted, judge),
                        "seen_prompts": judge_images(seen_imgs, seen_wanted, judge)}  # fmt: skip
        generation[f"guidance_{g:g}"] = row
        print(f"guidance {g:g}: held-out {row['ours']['held_out_prompts']}  seen {row['ours']['seen_prompts']}",
              flush=True)
    routing = expert_load_entropy(dit, lambda: generate(gen, dit, words, HELD_OUT, 2, 4, args.guidance))
    head = generation[f"guidance_{args.guidance:g}"]
    ours, peer = head["ours"]["held_out_prompts"], head["peer_untrained"]["held_out_prompts"]
    ours_mean = round((ours["colour"] + ours["shape"]) / 2, 4)
    peer_mean = round((peer["colour"] + peer["shape"]) / 2, 4)
    held_loss = losses["held_out_pairs"]
    summary = {
        "levers": {k: v for k, v in vars(args).items() if k not in ("threads", "fresh")},
        "held_out_colour": ours["colour"], "held_out_shape": ours["shape"], "held_out_both": ours["both"],
        "seen_colour": head["ours"]["seen_prompts"]["colour"], "seen_shape": head["ours"]["seen_prompts"]["shape"],
        "flow_loss": held_loss["ours"]["loss"], "mean_velocity_loss": held_loss["mean_velocity"]["loss"],
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    previous = OUT_DIR / "gen_image.json"
    attempts = [] if args.fresh or not previous.exists() else json.loads(previous.read_text()).get("attempts", [])
    result = {
        "metric": "held-out-prompt accuracy of generated 32x32 images, mean of colour and shape (higher is better; "
        "ratio = ours / peer)",
        "unit": "fraction correct",
        "ours": ours_mean,
        "peer": peer_mean,
        "peer_name": "the same ImageGenerator with its DiT untrained (random init, outputs v = 0), same "
        "autoencoder, prompts, seeds and judges",
        "ratio": round(ours_mean / max(peer_mean, 1e-4), 3),
        "goal": "colour and shape of held-out prompts far above chance (1/6, 1/4), near the judges' ceiling on "
        "the autoencoder's reconstructions; held-out flow loss below the mean-velocity baseline",
        "machine": machine(),
        "chance": {"colour": round(1 / len(COLORS), 4), "shape": round(1 / len(SHAPES), 4),
                   "both": round(1 / (len(COLORS) * len(SHAPES)), 4)},  # fmt: skip
        "prompts": {"colours": COLORS, "shapes": SHAPES, "held_out_pairs": HELD_OUT, "background": BACKGROUND,
                    "condition": "[colour word ; shape word], fixed random N(0, 1) vectors of "
                                 f"{COND_DIM}"},  # fmt: skip
        "judges": {"shape_cnn": judge_run, "on_real_held_out_images": real,
                   "colour": "median foreground pixel, nearest of the 6 colours"},  # fmt: skip
        "autoencoder": vae_run,
        "flow": flow_run | {"batch": args.batch, "time_shift": round(shift, 4), "cfg_dropout": dit_cfg.cfg_dropout},
        "flow_loss_held_out": losses,
        "generation": generation | {"steps": args.sample_steps, "sampler": "euler", "headline_guidance":
                                    args.guidance, "seconds": round(time.perf_counter() - sample_start, 1),
                                    "held_out_images": len(HELD_OUT) * args.seeds},  # fmt: skip
        "expert_routing_while_generating": routing,
        "sizes": {"image": SIZE, "latent": list(x_mean.shape[1:]), "dit_params": params(dit),
                  "vae_params": params(gen.vae), "dit_width": args.width, "dual_layers": args.layers,
                  "single_layers": args.layers, "training_images": len(train_x)},  # fmt: skip
        "attempts": attempts + [summary],
        "seconds_total": summary["seconds"],
    }
    print(f"wrote {write_result('gen_image', result)} in {result['seconds_total']} s")


if __name__ == "__main__":
    main()
