"""The image and video generators inside Xoron: objectives per micro-batch, gradients, generation API.

As for speech (``test_speech_head.py``): data parallelism needs each objective to be a sum of
per-item terms, so a batch split over ranks must give the same sums as the whole batch on one
rank, on the same weights and data.
"""

from __future__ import annotations

import pytest
import torch

from tests.parallel.harness import zero3_engine
from xoron_dist.config import ConfigError, load_config
from xoron_dist.model.xoron import build_model
from xoron_dist.parallel.layout import LayoutError, validate_layout

SMOKE = "pipelines/smoke.yaml"
GEN = ["model.image_gen.enabled=true", "model.video_gen.enabled=true"]
NAMES = ("image_vae", "text_to_image", "video_vae", "text_to_video")


def _cfg(*overrides):
    return load_config(SMOKE, [*GEN, *overrides])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg()).train()


def _media(seed: int):
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (64, 64, 3), generator=gen, dtype=torch.uint8) for _ in range(4)]
    videos = [torch.randint(0, 256, (8, 32, 32, 3), generator=gen, dtype=torch.uint8) for _ in range(2)]
    return images, videos


def _rows(cfg, rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.llm.usable_vocab_size, (rows, 96), generator=gen)
    documents = torch.zeros(rows, 96, dtype=torch.long)
    documents[:, 48:] = 1
    return dict(input_ids=ids, labels=ids.clone(), document_ids=documents)


def test_objective_sums_split_like_data_parallel_ranks(model, one_thread):
    images, videos = _media(1)
    n = model.cfg.data.image_tokens
    # row r holds images 2r (understood) and 2r + 1 (a target), and video r (a target)
    image_spans = [[r, start, n] for r in range(2) for start in (2, 60)]
    video_spans = [[r, 30, model.cfg.data.video_tokens] for r in range(2)]
    image_targets, video_targets = [False, True, False, True], [True, True]
    whole = model(**_rows(model.cfg, 2), images=images, image_spans=torch.tensor(image_spans),
                  image_is_target=torch.tensor(image_targets), videos=videos, video_spans=torch.tensor(video_spans),
                  video_is_target=torch.tensor(video_targets)).objective_sums
    rows = _rows(model.cfg, 2)
    parts = []
    for r in range(2):
        mine = [i for i, span in enumerate(image_spans) if span[0] == r]
        out = model(**{k: v[r: r + 1] for k, v in rows.items()}, images=[images[i] for i in mine],
                    image_spans=torch.tensor([[0, *image_spans[i][1:]] for i in mine]),
                    image_is_target=torch.tensor([image_targets[i] for i in mine]), videos=[videos[r]],
                    video_spans=torch.tensor([[0, *video_spans[r][1:]]]), video_is_target=torch.tensor([True]))
        parts.append(out.objective_sums)
    for name in NAMES:
        assert torch.isfinite(whole[name]) and whole[name] > 0, name
        assert (parts[0][name] + parts[1][name]).item() == pytest.approx(whole[name].item(), rel=2e-5), name


def test_every_parameter_gets_a_gradient_with_and_without_media(model, one_thread):
    images, videos = _media(2)
    batch = _rows(model.cfg, 1)
    with_media = dict(batch, images=images[:1], image_spans=torch.tensor([[0, 60, model.cfg.data.image_tokens]]),
                      image_is_target=torch.tensor([True]), videos=videos[:1],
                      video_spans=torch.tensor([[0, 10, model.cfg.data.video_tokens]]),
                      video_is_target=torch.tensor([False]))
    for inputs in (with_media, batch):
        model.zero_grad()
        out = model(**inputs)
        (out.loss + sum(out.objective_sums.values())).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:5]
    assert all(out.objective_sums[name].item() == 0 for name in NAMES)
    generator_grads = [p.grad for n, p in model.named_parameters() if n.startswith(("image_gen.", "video_gen."))]
    assert all(g.abs().sum() == 0 for g in generator_grads)  # the blank paths add exact zeros


@pytest.mark.parametrize("height, width", [(256, 256), (512, 512), (64, 160)])
def test_generate_image_sizes_and_seeds(model, one_thread, height, width):
    model.eval()
    try:
        ids = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(3))
        first = model.generate_image(ids, height=height, width=width, steps=2, seed=7)
        again = model.generate_image(ids, height=height, width=width, steps=2, seed=7)
        assert first.shape == (2, height, width, 3) and first.dtype == torch.uint8
        assert torch.equal(first, again)
        assert not torch.equal(first, model.generate_image(ids, height=height, width=width, steps=2, seed=8))
    finally:
        model.train()


def test_generate_video_and_size_errors_are_one_line(model, one_thread):
    model.eval()
    try:
        states = torch.randn(1, 5, model.cfg.llm.hidden_size)
        video = model.generate_video(prompt_embeds=states, frames=9, height=32, width=48, steps=2, seed=1)
        assert video.shape == (1, 9, 32, 48, 3)
        assert torch.equal(video, model.generate_video(prompt_embeds=states, frames=9, height=32, width=48,
                                                       steps=2, seed=1))
        for call, message in ((lambda: model.generate_image(prompt_embeds=states, height=250, width=256),
                               "multiples of 16"),
                              (lambda: model.generate_video(prompt_embeds=states, frames=8, height=32, width=32),
                               "1 \\+ 4·k frames")):
            with pytest.raises(ValueError, match=message) as error:
                call()
            assert "\n" not in str(error.value)
    finally:
        model.train()


def test_generator_config_and_layout_errors_name_the_fix():
    with pytest.raises(ConfigError, match="must equal llm.hidden_size"):
        _cfg("model.image_gen.dit.cond_dim=32")
    with pytest.raises(ConfigError, match="latent space"):
        _cfg("model.video_gen.dit.latent_channels=8")
    with pytest.raises(ConfigError, match="without its PatchGAN"):
        _cfg("model.image_gen.vae.loss.discriminator=true")
    with pytest.raises(LayoutError, match="image_gen.dit.moe.num_experts = 4 is not divisible by parallel.ep = 8"):
        validate_layout(_cfg("parallel.ep=8", "model.llm.moe.num_experts=8"), 8)
    with pytest.raises(LayoutError, match="model.video_gen.dit.num_heads = 3"):
        validate_layout(_cfg("parallel.tp=2", "model.video_gen.dit.num_heads=3", "model.video_gen.dit.head_dim=8"), 2)


# --------------------------------------------------------------------------- EP=2 parity

EP = ["model.audio.enabled=false", "model.speech.enabled=false"]  # the image and video generators' experts


def _split_batch(cfg, rank: int | None):
    """Two rows, whole (rank None) or row ``rank``: row 0 holds an understood image and a target, row 1 two
    targets (so the ranks' image DiTs run a different number of times), each row a target video."""
    images, videos = _media(3)
    n, nv = cfg.data.image_tokens, cfg.data.video_tokens
    image_spans = [[r, start, n] for r in range(2) for start in (2, 60)]
    targets = [False, True, True, True]
    rows = _rows(cfg, 2, seed=4)
    chosen = [0, 1] if rank is None else [rank]
    mine = [i for i, span in enumerate(image_spans) if span[0] in chosen]
    return dict({k: v[chosen] for k, v in rows.items()}, images=[images[i] for i in mine],
                image_spans=torch.tensor([[chosen.index(image_spans[i][0]), *image_spans[i][1:]] for i in mine]),
                image_is_target=torch.tensor([targets[i] for i in mine]), videos=[videos[r] for r in chosen],
                video_spans=torch.tensor([[j, 30, nv] for j in range(len(chosen))]),
                video_is_target=torch.tensor([True] * len(chosen)))


def _trained_like_generators(path):
    """The one-rank model with both generators, its DiT weights drawn as if trained (adaLN-Zero's zero gates
    would leave the experts without gradient), saved to ``path`` for the ranks."""
    torch.manual_seed(0)
    model = build_model(_cfg(*EP)).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("image_gen.dit.", "video_gen.dit.")) and not param.any():
                param.normal_(0.0, 0.05)
    torch.save(model.state_dict(), path)
    return model


def _load_full_state(model, full: dict) -> dict[str, int]:
    """Load the one-rank state into an expert-parallel model: this rank's experts are rows first + i of the
    stacked weights. Returns each MoE block's first local expert."""
    own, firsts = model.state_dict(), {}
    for name in own:
        if ".deepspeed_experts." in name:
            prefix, rest = name.split(".deepspeed_moe.experts.deepspeed_experts.")
            local, weight = rest.split(".")
            first = firsts.setdefault(prefix, model.get_submodule(prefix).first_expert)
            own[name] = full[f"{prefix}.{weight}"][first + int(local)]
        else:
            own[name] = full[name]
    model.load_state_dict(own)
    return firsts


def _expected_grad(name: str, ref: dict, firsts: dict[str, int]) -> torch.Tensor:
    """The one-rank gradient of ``name``: a local expert's is its row of the stacked one."""
    if ".deepspeed_experts." not in name:
        return ref[name]
    prefix, rest = name.split(".deepspeed_moe.experts.deepspeed_experts.")
    local, weight = rest.split(".")
    return ref[f"{prefix}.{weight}"][firsts[prefix] + int(local)]


def _ep_body(state_path):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize

    torch.set_num_threads(1)
    cfg = _cfg(*EP, "parallel.ep=2")
    state.initialize(cfg)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), cfg).model.train()
    firsts = _load_full_state(model, torch.load(state_path))
    out = model(**_split_batch(cfg, ps.get_data_parallel_rank()))
    sum(out.objective_sums[name] for name in NAMES).backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None or not name.startswith(("image_gen.", "video_gen.")):
            continue
        expert = ".deepspeed_experts." in name
        dist.all_reduce(param.grad, group=ps.get_expert_data_parallel_group() if expert else
                        ps.get_data_parallel_group())
        grads[name] = param.grad.detach().clone()
    sums = torch.stack([out.objective_sums[name].detach() for name in NAMES])
    dist.all_reduce(sums, group=ps.get_data_parallel_group())
    return sums.tolist(), grads, {prefix: first for prefix, first in firsts.items()}


@pytest.mark.multirank
def test_expert_parallel_generators_equal_single_rank(one_thread, tmp_path):
    """EP=2 (dp=2) spreads the DiT experts of both generators like the LLM's: the objective sums and every
    generator gradient (dense summed over dp, each local expert's against its row of the stacked one)
    equal one rank's on the whole batch. Rank 1 has one more image target than rank 0: rank 0's image
    DiT adds an idle call (times 0) so both run the experts' all-to-alls equally often (else: a gloo
    size mismatch, as the smoke run with parallel.ep=2 met)."""
    from tests.parallel.harness import run_ranks

    model = _trained_like_generators(tmp_path / "state.pt")
    out = model(**_split_batch(model.cfg, None))
    sum(out.objective_sums[name] for name in NAMES).backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    for rank, (sums, grads, firsts) in enumerate(run_ranks(_ep_body, 2, str(tmp_path / "state.pt"))):
        assert sums == pytest.approx([out.objective_sums[n].item() for n in NAMES], rel=1e-5), rank
        spread = [n for n in grads if ".deepspeed_experts." in n]
        assert any(n.startswith("image_gen.") for n in spread) and any(n.startswith("video_gen.") for n in spread)
        assert all(grads[n].abs().sum() > 0 for n in spread), rank
        for name, grad in grads.items():
            torch.testing.assert_close(grad, _expected_grad(name, ref, firsts), rtol=1e-4, atol=1e-6,
                                       msg=f"rank {rank} grad of {name}")


def _zero3_body(state_path, ep):
    from deepspeed.utils import safe_get_full_grad

    from xoron_dist.parallel import state
    from xoron_dist.parallel.parallelize import parallelize
    from xoron_dist.parallel.zero import generators_gathered

    torch.set_num_threads(1)
    cfg = _cfg(*EP, "parallel.zero_stage=3", "train.ds_config=ds_configs/zero3.json", "train.micro_batch_size=1",
               f"parallel.ep={ep}")
    ctx = state.initialize(cfg)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg), cfg).model.train()
    firsts = _load_full_state(model, torch.load(state_path))
    engine = zero3_engine(model, cfg, ctx)  # every weight partitioned; default buckets
    out = engine(**_split_batch(cfg, ctx.dp_rank))
    sums = torch.stack([out.objective_sums[name].detach() for name in NAMES])
    engine.backward((out.loss * out.num_tokens + sum(out.objective_sums[name] for name in NAMES)) * ctx.dp_size)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
             if n.startswith(("image_gen.", "video_gen."))}
    torch.distributed.all_reduce(sums)
    engine.module.eval()  # samples as the trainer makes them (train.samples): every rank generates
    samples = []
    for make in _SAMPLES:  # the weights gathered per sample, as the trainer does
        with torch.no_grad(), generators_gathered(engine.module):
            samples.append(make(engine.module))
    return sums.tolist(), grads, samples, firsts


_SAMPLES = (lambda model: model.generate_image(torch.arange(10, 18)[None], height=32, width=32, steps=2, seed=1),
            lambda model: model.generate_video(torch.arange(10, 18)[None], frames=5, height=32, width=32, steps=2,
                                               seed=1))


@pytest.mark.multirank
@pytest.mark.parametrize("ep", [1, 2], ids=["local_experts", "ep2"])
def test_zero3_generators_equal_single_rank(one_thread, tmp_path, ep):
    """ZeRO-3 on 2 ranks partitions both generators (every weight, DeepSpeed's default bucket sizes): the
    objective sums and every generator gradient equal one rank's on the whole batch. Rank 1 has one more
    image target than rank 0, so the ranks' DiTs run a different number of times unless the calls are
    agreed (a gloo size mismatch in the gathers); and a DiT's MoE blocks gathered as ZeRO-3 leaves would
    have their gradients reduced once per call (DeepSpeed asserts on the repeated parameters). The image
    and video samples every rank makes from its partitioned weights equal one rank's."""
    from tests.parallel.harness import run_ranks

    model = _trained_like_generators(tmp_path / "state.pt")
    out = model(**_split_batch(model.cfg, None))
    (out.loss * out.num_tokens + sum(out.objective_sums[name] for name in NAMES)).backward()
    ref = {n: p.grad for n, p in model.named_parameters() if n.startswith(("image_gen.", "video_gen."))}
    model.eval()
    with torch.no_grad():
        samples = [make(model) for make in _SAMPLES]
    for rank, (sums, grads, ranks_samples, firsts) in enumerate(run_ranks(_zero3_body, 2, str(tmp_path / "state.pt"),
                                                                          ep)):
        for ours, theirs in zip(ranks_samples, samples, strict=True):  # uint8: at most a rounding step apart
            assert ours.shape == theirs.shape and (ours.int() - theirs.int()).abs().max() <= 1, rank
        assert sums == pytest.approx([out.objective_sums[n].item() for n in NAMES], rel=1e-5), rank
        assert any(".experts." in n and grads[n].abs().sum() > 0 for n in grads)
        assert (ep > 1) == any(".deepspeed_experts." in n for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, _expected_grad(name, ref, firsts), rtol=1e-4, atol=1e-6,
                                       msg=f"rank {rank} grad of {name}")
