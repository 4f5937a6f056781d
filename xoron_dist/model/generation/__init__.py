"""Image generation (issue 13): ``dit`` (MoE-DiT velocity network: MMDiT dual-stream then Flux
single-stream blocks, 2D-RoPE, adaLN-Zero, image-gen MoE), ``dit_blocks`` (its blocks, reusable with
3D RoPE and block-causal masks), ``flow`` (rectified-flow loss, timestep sampling and shift, Euler and
Heun samplers with classifier-free guidance) and ``sharding`` (its tensor-parallel plan)."""
