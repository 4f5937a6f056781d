"""Building blocks every component shares: ``norm`` (RMSNorm), ``mlp`` (SwiGLU), ``moe`` (router +
experts), ``rope`` (1D, YaRN, LongRoPE) and ``rope_nd`` (axial 2D/3D), ``attention``
(cross-attention), ``perceiver`` (resampler), ``init`` (the one initialisation walk) and
``sharding`` (the vocabulary of tensor-parallel plans)."""
