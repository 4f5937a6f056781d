"""Logging for a multi-rank job: every line says which rank wrote it, and only rank 0 is chatty.

    configure_logging(ctx.rank, ctx.world_size)     # "[rank 1/4] 12:00:01 WARNING xoron_dist.x: ..."
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "[rank {rank}/{world}] %(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(rank: int, world_size: int, level: int | str | None = None) -> None:
    """Route the root logger to stderr with a ``[rank r/N]`` prefix.

    ``level`` defaults to INFO on rank 0 and WARNING elsewhere, so N ranks do not print N copies
    of the same progress line while every rank's warnings and errors still show. Calling it again
    replaces the handler (the entry point calls it once ranks are known).
    """
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank, world=world_size), datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Megatron-core announces its FSDP/Transformer-Engine fallbacks at INFO on import; not ours to show.
    logging.getLogger("megatron").setLevel(max(logging.WARNING, logging.getLogger().level))


__all__ = ["configure_logging"]
