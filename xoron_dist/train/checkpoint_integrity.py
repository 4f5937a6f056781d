"""What keeps a checkpoint honest: a sha256 per file, the files on disk before the checkpoint is
published, the hashes checked before anything is read back, and unpickling that builds only tensors
and a short list of allow-listed types.

**Hash: sha256.** ``hashlib.file_digest`` reads a file at ~1.5 GB/s per core here (the CPU's SHA
extensions); zlib's CRC-32 (zlib has no CRC-32C) ran at ~3.4 GB/s on the same buffer. Both catch
flipped bytes and torn writes; we take sha256 because the recorded digest also names the content
(``sha256sum -c`` checks a checkpoint copied elsewhere, and a digest kept outside the run directory
vouches for it), and 1.5 GB/s per rank is still faster than a shared filesystem writes one rank's
shard. The files are hashed round-robin by all ranks, after every rank has flushed what it wrote.

**Durability.** Every rank flushes the filesystem that holds the checkpoint (``syncfs``: the pages
this node wrote, whichever process wrote them; an ``fsync`` from another node would not flush them)
before rank 0 records the manifest; rank 0 then fsyncs the manifest and the directory before the
renaming that publishes the checkpoint, and the checkpoint root after it.

**Trust.** A hash in ``trainer_state.json`` proves a file is what the saving run wrote, not that the
run directory is trustworthy: whoever can write the files can write the manifest too. So nothing is
unpickled with arbitrary globals: our RNG/data files are tensors and plain containers, and while a
checkpoint loads, every ``torch.load`` (DeepSpeed's own included, which asks for
``weights_only=False``) runs with ``weights_only=True`` and only ``SAFE_GLOBALS`` beyond tensors
and containers. A file that needs anything else is refused, naming the file and the global.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import pickle
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from numpy._core.multiarray import _reconstruct

# What DeepSpeed's checkpoints hold besides tensors and containers (found by
# ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-0..3 and offload checkpoints,
# fp32 and bf16): the loss scaler, the ZeRO stage enum, the fp32 fragment addresses. And numpy's
# array reconstruction, for RNG files written before format 2 (numpy's MT19937 key as an array):
# ``_reconstruct`` only builds an array of an allow-listed subtype.
SAFE_GLOBALS: list = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
                      _reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]

_CHUNK = 16 << 20


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint file asks the unpickler for a global that is neither a tensor type nor allow-listed."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def flush_filesystem(folder: Path) -> None:
    """Write to disk what this node wrote on ``folder``'s filesystem (Linux ``syncfs``; elsewhere ``sync``)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs({folder}) failed: {os.strerror(err)}")
        else:
            os.sync()
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gathered(local: dict) -> dict:
    """The union of every rank's ``local`` (world 1: ``local``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def broadcast_from_rank0(value):
    """Rank 0's ``value`` on every rank (a directory listing: other nodes' views of a shared
    filesystem may lag behind); collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _my_share(names: list[str]) -> list[str]:
    """This rank's files of ``names``, round-robin over the ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return sorted(names)[rank::world]


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of every file in ``names`` (under ``folder``), hashed round-robin by the ranks; collective."""
    return _gathered({name: file_sha256(folder / name) for name in _my_share(names)})


def verify_hashes(folder: Path, expected: dict[str, str]) -> list[str]:
    """Files of ``folder`` whose sha256 differs from ``expected``, as messages (same on every rank); collective."""
    found = hash_files(folder, list(expected))
    return [f"{name}: sha256 {found[name][:12]}..., {expected[name][:12]}... was recorded at save"
            for name in sorted(expected) if found[name] != expected[name]]


@contextlib.contextmanager
def tensors_only_unpickling() -> Iterator[None]:
    """Inside: every ``torch.load`` in this process loads with ``weights_only=True`` and ``SAFE_GLOBALS``.

    DeepSpeed's checkpoint engine calls ``torch.load(path, weights_only=False)`` itself; replacing the
    function for the duration of a checkpoint load is the one place that covers all of its paths.
    """
    real = torch.load

    def load(f, map_location=None, *args, weights_only=None, **kwargs):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:
                return real(f, map_location, *args, weights_only=True, **kwargs)
            except pickle.UnpicklingError as err:
                raise UnsafePickleError(f"{f}: refused to unpickle: {_why(err)}") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _why(err: pickle.UnpicklingError) -> str:
    """The one informative line of torch's weights-only error (it runs to a dozen lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = next((m.group(0) for line in lines if (m := re.search(r"(?i)unsupported.*", line))), lines[-1])
    reason = re.split(r" was not an allowed global| Please use", found)[0].rstrip(".")
    return f"{reason} (only tensors and allow-listed types are loaded; see README, Reliability)"


__all__ = ["SAFE_GLOBALS", "UnsafePickleError", "broadcast_from_rank0", "file_sha256", "flush_filesystem",
           "fsync_dir", "hash_files", "tensors_only_unpickling", "verify_hashes"]
